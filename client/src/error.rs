//! The client's one error type and the single place that maps a `tonic::Status` to it.
//!
//! Owns: the server error contract as seen from the client, i.e. the metadata keys
//! (`floe-error-code`, `floe-retry-safe`, `floe-current-version`), the mapping of stable code
//! strings and gRPC codes to [`Error`] variants, and the two retry predicates
//! ([`Error::is_retryable`], [`Error::is_retry_safe`]).
//!
//! Invariant: a write error is only ever "retry safe" when the server said so
//! (`floe-retry-safe: true`) or the connection could not be established at all (tonic's
//! `ConnectError` in the status' source chain). A timeout or a connection that broke
//! mid-request is never retry safe: the outcome is unknown.
//!
//! Must not depend on: the retry loop, routing, or any I/O.

use std::error::Error as StdError;

use tonic::{Code, Status};

/// Metadata key carrying the stable error code string (e.g. `version_mismatch`).
pub const ERROR_CODE_KEY: &str = "floe-error-code";
/// Metadata key set to `true` when the server knows the request was not applied.
pub const RETRY_SAFE_KEY: &str = "floe-retry-safe";
/// Metadata key carrying the stored version on `version_mismatch`, when the document exists.
pub const CURRENT_VERSION_KEY: &str = "floe-current-version";

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error the client returns.
///
/// `code` fields hold the server's stable code string (see the module doc of the node's error
/// contract); client-side errors use their own codes (`transport`, `serialization`, `config`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// Bad input: invalid_json, not_an_object, too_large, too_deep, invalid_id, invalid_name,
    /// invalid_patch, invalid_batch, invalid_argument.
    #[error("invalid argument ({code}): {message}")]
    InvalidArgument { code: String, message: String },
    /// not_found or collection_not_found.
    #[error("not found ({code}): {message}")]
    NotFound { code: String, message: String },
    /// A create found an existing document (already_exists).
    #[error("already exists ({code}): {message}")]
    AlreadyExists { code: String, message: String },
    /// A conditional write did not match the stored version. `current` is the stored version
    /// when the document exists and the server reported it.
    #[error("version mismatch (current: {current:?}): {message}")]
    VersionMismatch { current: Option<u64>, message: String },
    /// A precondition inside the request failed, e.g. a JSON patch `test` op (patch_test_failed).
    #[error("precondition failed ({code}): {message}")]
    PreconditionFailed { code: String, message: String },
    /// not_leader, unavailable, or a connection failure. `retry_safe` is true only when the
    /// request provably did not execute; otherwise the outcome of a write is unknown.
    #[error("unavailable ({code}, retry_safe={retry_safe}): {message}")]
    Unavailable { code: String, message: String, retry_safe: bool },
    /// The attempt did not finish in time (client deadline or server `timeout`). The outcome of
    /// a write is unknown.
    #[error("timeout: {message}")]
    Timeout { message: String },
    /// A transport problem that is not a clean connect failure (connection broken mid-request,
    /// protocol error, bad endpoint). The outcome of a write is unknown.
    #[error("transport error: {0}")]
    Transport(String),
    /// The server failed internally (internal).
    #[error("internal server error: {0}")]
    Internal(String),
    /// A value could not be serialized to or deserialized from JSON on the client.
    #[error("serialization error: {0}")]
    Serialization(String),
    /// The client was configured or called wrongly (no endpoints, bad URI, version 0 ...).
    #[error("client configuration error: {0}")]
    Config(String),
    /// A gRPC status the contract does not name (e.g. UNIMPLEMENTED, PERMISSION_DENIED).
    #[error("server error {grpc_code:?} ({code}): {message}")]
    Other { grpc_code: Code, code: String, message: String },
}

impl Error {
    /// The stable code string: the server's `floe-error-code` for server errors, or one of
    /// `timeout`, `transport`, `internal`, `serialization`, `config` for client-side ones.
    pub fn code(&self) -> &str {
        match self {
            Error::InvalidArgument { code, .. }
            | Error::NotFound { code, .. }
            | Error::AlreadyExists { code, .. }
            | Error::PreconditionFailed { code, .. }
            | Error::Unavailable { code, .. }
            | Error::Other { code, .. } => code,
            Error::VersionMismatch { .. } => "version_mismatch",
            Error::Timeout { .. } => "timeout",
            Error::Transport(_) => "transport",
            Error::Internal(_) => "internal",
            Error::Serialization(_) => "serialization",
            Error::Config(_) => "config",
        }
    }

    /// True for transient failures where a later attempt may succeed: unavailable (incl.
    /// not_leader and connect failures), timeouts and transport errors.
    ///
    /// This says nothing about whether a *write* may be repeated; see [`Error::is_retry_safe`].
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Timeout { .. } | Error::Transport(_))
    }

    /// True when the request provably did not execute, so even a non-idempotent write may be
    /// sent again.
    pub fn is_retry_safe(&self) -> bool {
        matches!(self, Error::Unavailable { retry_safe: true, .. })
    }

    /// True when a write that failed with this error may or may not have been applied.
    pub fn is_outcome_unknown(&self) -> bool {
        match self {
            Error::Timeout { .. } | Error::Transport(_) => true,
            Error::Unavailable { retry_safe, .. } => !retry_safe,
            _ => false,
        }
    }

    /// Maps a gRPC status (from the server or produced locally by tonic) to an [`Error`].
    ///
    /// The `floe-error-code` metadata wins when present; otherwise the gRPC code decides.
    pub fn from_status(status: &Status) -> Error {
        let metadata = status.metadata();
        let code_server =
            metadata.get(ERROR_CODE_KEY).and_then(|value| value.to_str().ok()).map(|value| value.trim().to_owned());
        let retry_safe_server = metadata
            .get(RETRY_SAFE_KEY)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.trim().eq_ignore_ascii_case("true"));
        let version_current = metadata
            .get(CURRENT_VERSION_KEY)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok());
        let message = status.message().to_owned();

        if let Some(code) = code_server {
            if let Some(error) = from_floe_code(&code, &message, retry_safe_server, version_current) {
                return error;
            }
            return from_grpc_code(status, Some(code), message, retry_safe_server, version_current);
        }
        from_grpc_code(status, None, message, retry_safe_server, version_current)
    }
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        Error::from_status(&status)
    }
}

impl From<serde_json::Error> for Error {
    fn from(error: serde_json::Error) -> Self {
        Error::Serialization(error.to_string())
    }
}

/// Maps a known stable code string; `None` for codes this client version does not know.
fn from_floe_code(code: &str, message: &str, retry_safe: bool, version_current: Option<u64>) -> Option<Error> {
    let owned = || (code.to_owned(), message.to_owned());
    let error = match code {
        "invalid_json" | "not_an_object" | "too_large" | "too_deep" | "invalid_id" | "invalid_name"
        | "invalid_patch" | "invalid_batch" | "invalid_argument" => {
            let (code, message) = owned();
            Error::InvalidArgument { code, message }
        }
        "not_found" | "collection_not_found" => {
            let (code, message) = owned();
            Error::NotFound { code, message }
        }
        "already_exists" => {
            let (code, message) = owned();
            Error::AlreadyExists { code, message }
        }
        "version_mismatch" => Error::VersionMismatch { current: version_current, message: message.to_owned() },
        "patch_test_failed" => {
            let (code, message) = owned();
            Error::PreconditionFailed { code, message }
        }
        "not_leader" | "unavailable" => {
            let (code, message) = owned();
            Error::Unavailable { code, message, retry_safe }
        }
        "timeout" => Error::Timeout { message: message.to_owned() },
        "internal" => Error::Internal(message.to_owned()),
        _ => return None,
    };
    Some(error)
}

/// Maps by gRPC code, for statuses without a known `floe-error-code` (typically produced by
/// tonic itself for transport failures).
fn from_grpc_code(
    status: &Status,
    code_server: Option<String>,
    message: String,
    retry_safe_server: bool,
    version_current: Option<u64>,
) -> Error {
    let code_or = |fallback: &str| code_server.clone().unwrap_or_else(|| fallback.to_owned());
    match status.code() {
        Code::InvalidArgument | Code::OutOfRange => {
            Error::InvalidArgument { code: code_or("invalid_argument"), message }
        }
        Code::NotFound => Error::NotFound { code: code_or("not_found"), message },
        Code::AlreadyExists => Error::AlreadyExists { code: code_or("already_exists"), message },
        Code::Aborted => Error::VersionMismatch { current: version_current, message },
        Code::FailedPrecondition => Error::PreconditionFailed { code: code_or("failed_precondition"), message },
        Code::Unavailable => {
            let connect_failed = is_connect_error(status);
            let message = if connect_failed { format!("could not connect: {message}") } else { message };
            Error::Unavailable {
                code: code_or("unavailable"),
                message,
                retry_safe: retry_safe_server || connect_failed,
            }
        }
        Code::DeadlineExceeded => Error::Timeout { message },
        // tonic reports its own client-side deadline (`Request::set_timeout`) as CANCELLED
        // with a `TimeoutExpired` source.
        Code::Cancelled if is_timeout_expired(status) => Error::Timeout { message },
        Code::Internal | Code::DataLoss if code_server.is_none() => Error::Internal(message),
        // UNKNOWN or CANCELLED without a server code is how tonic reports a connection that
        // broke around the request (hyper "connection closed before message completed",
        // "operation was canceled: connection closed"): the outcome is unknown.
        Code::Unknown | Code::Cancelled if code_server.is_none() => Error::Transport(message),
        grpc_code => Error::Other { grpc_code, code: code_or(&format!("grpc_{}", i32::from(grpc_code))), message },
    }
}

/// True when tonic could not establish the connection, so the request was never sent.
fn is_connect_error(status: &Status) -> bool {
    source_chain_contains(status, |error| error.downcast_ref::<tonic::ConnectError>().is_some())
}

fn is_timeout_expired(status: &Status) -> bool {
    source_chain_contains(status, |error| error.downcast_ref::<tonic::TimeoutExpired>().is_some())
}

/// Walks the status' source chain (bounded, to be safe against cyclic chains).
fn source_chain_contains(status: &Status, predicate: impl Fn(&(dyn StdError + 'static)) -> bool) -> bool {
    const SOURCE_CHAIN_DEPTH_MAX: usize = 32;
    let mut current: Option<&(dyn StdError + 'static)> = status.source();
    for _ in 0..SOURCE_CHAIN_DEPTH_MAX {
        match current {
            Some(error) if predicate(error) => return true,
            Some(error) => current = error.source(),
            None => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn status_with(code: Code, message: &str, metadata: &[(&'static str, &'static str)]) -> Status {
        let mut status = Status::new(code, message);
        for (key, value) in metadata {
            status.metadata_mut().insert(*key, MetadataValue::from_static(value));
        }
        status
    }

    #[test]
    fn maps_every_contract_code() {
        let cases: &[(&str, Code, &str)] = &[
            ("invalid_json", Code::InvalidArgument, "invalid_json"),
            ("not_an_object", Code::InvalidArgument, "not_an_object"),
            ("too_large", Code::InvalidArgument, "too_large"),
            ("too_deep", Code::InvalidArgument, "too_deep"),
            ("invalid_id", Code::InvalidArgument, "invalid_id"),
            ("invalid_name", Code::InvalidArgument, "invalid_name"),
            ("invalid_patch", Code::InvalidArgument, "invalid_patch"),
            ("invalid_batch", Code::InvalidArgument, "invalid_batch"),
            ("invalid_argument", Code::InvalidArgument, "invalid_argument"),
            ("not_found", Code::NotFound, "not_found"),
            ("collection_not_found", Code::NotFound, "collection_not_found"),
            ("already_exists", Code::AlreadyExists, "already_exists"),
            ("version_mismatch", Code::Aborted, "version_mismatch"),
            ("patch_test_failed", Code::FailedPrecondition, "patch_test_failed"),
            ("not_leader", Code::Unavailable, "not_leader"),
            ("unavailable", Code::Unavailable, "unavailable"),
            ("timeout", Code::DeadlineExceeded, "timeout"),
            ("internal", Code::Internal, "internal"),
        ];
        for (code, grpc_code, expected) in cases {
            let mut status = Status::new(*grpc_code, "boom");
            status.metadata_mut().insert(ERROR_CODE_KEY, MetadataValue::try_from(*code).expect("ascii"));
            let error = Error::from_status(&status);
            assert_eq!(error.code(), *expected, "{code} mapped to {error:?}");
        }
    }

    #[test]
    fn variant_per_code() {
        let error = Error::from_status(&status_with(Code::InvalidArgument, "deep", &[(ERROR_CODE_KEY, "too_deep")]));
        assert_eq!(error, Error::InvalidArgument { code: "too_deep".into(), message: "deep".into() });
        let error = Error::from_status(&status_with(Code::NotFound, "no", &[(ERROR_CODE_KEY, "collection_not_found")]));
        assert!(matches!(error, Error::NotFound { ref code, .. } if code == "collection_not_found"));
        let error = Error::from_status(&status_with(
            Code::FailedPrecondition,
            "test op",
            &[(ERROR_CODE_KEY, "patch_test_failed")],
        ));
        assert!(matches!(error, Error::PreconditionFailed { .. }));
        let error = Error::from_status(&status_with(Code::Internal, "oops", &[(ERROR_CODE_KEY, "internal")]));
        assert_eq!(error, Error::Internal("oops".into()));
        assert!(!error.is_retryable());
    }

    #[test]
    fn version_mismatch_carries_current_version() {
        let error = Error::from_status(&status_with(
            Code::Aborted,
            "expected 3",
            &[(ERROR_CODE_KEY, "version_mismatch"), (CURRENT_VERSION_KEY, "7")],
        ));
        assert_eq!(error, Error::VersionMismatch { current: Some(7), message: "expected 3".into() });
        let error = Error::from_status(&status_with(Code::Aborted, "gone", &[(ERROR_CODE_KEY, "version_mismatch")]));
        assert_eq!(error, Error::VersionMismatch { current: None, message: "gone".into() });
        let error = Error::from_status(&status_with(
            Code::Aborted,
            "garbage",
            &[(ERROR_CODE_KEY, "version_mismatch"), (CURRENT_VERSION_KEY, "x1")],
        ));
        assert!(matches!(error, Error::VersionMismatch { current: None, .. }));
    }

    #[test]
    fn retry_safe_only_when_server_says_so() {
        let safe = Error::from_status(&status_with(
            Code::Unavailable,
            "no leader",
            &[(ERROR_CODE_KEY, "not_leader"), (RETRY_SAFE_KEY, "true")],
        ));
        assert!(safe.is_retryable());
        assert!(safe.is_retry_safe());
        assert!(!safe.is_outcome_unknown());

        let unsafe_error =
            Error::from_status(&status_with(Code::Unavailable, "lost leadership", &[(ERROR_CODE_KEY, "not_leader")]));
        assert!(unsafe_error.is_retryable());
        assert!(!unsafe_error.is_retry_safe());
        assert!(unsafe_error.is_outcome_unknown());

        let false_flag = Error::from_status(&status_with(
            Code::Unavailable,
            "x",
            &[(ERROR_CODE_KEY, "unavailable"), (RETRY_SAFE_KEY, "false")],
        ));
        assert!(!false_flag.is_retry_safe());
    }

    #[test]
    fn timeouts_are_outcome_unknown() {
        let server = Error::from_status(&status_with(Code::DeadlineExceeded, "slow", &[(ERROR_CODE_KEY, "timeout")]));
        assert_eq!(server, Error::Timeout { message: "slow".into() });
        assert!(server.is_retryable());
        assert!(!server.is_retry_safe());
        assert!(server.is_outcome_unknown());

        let bare = Error::from_status(&Status::deadline_exceeded("deadline"));
        assert!(matches!(bare, Error::Timeout { .. }));

        // tonic's own client deadline: CANCELLED with a TimeoutExpired source.
        let local = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(local.code(), Code::Cancelled);
        assert!(matches!(Error::from_status(&local), Error::Timeout { .. }));
    }

    #[test]
    fn bare_statuses_fall_back_to_grpc_code() {
        let bare_unavailable = Error::from_status(&Status::unavailable("connection reset"));
        assert!(matches!(bare_unavailable, Error::Unavailable { retry_safe: false, .. }));
        assert_eq!(
            Error::from_status(&Status::unknown("connection closed")),
            Error::Transport("connection closed".into())
        );
        let canceled = Error::from_status(&Status::cancelled("operation was canceled"));
        assert!(matches!(canceled, Error::Transport(_)));
        assert!(canceled.is_retryable() && !canceled.is_retry_safe());
        assert!(matches!(Error::from_status(&Status::aborted("x")), Error::VersionMismatch { current: None, .. }));
        let other = Error::from_status(&Status::permission_denied("nope"));
        assert!(matches!(other, Error::Other { grpc_code: Code::PermissionDenied, .. }));
        assert!(!other.is_retryable());
    }

    #[test]
    fn unknown_server_code_keeps_code_string() {
        let error =
            Error::from_status(&status_with(Code::ResourceExhausted, "slow down", &[(ERROR_CODE_KEY, "throttled")]));
        assert_eq!(error.code(), "throttled");
        assert!(matches!(error, Error::Other { grpc_code: Code::ResourceExhausted, .. }));
    }

    #[test]
    fn connect_error_in_source_chain_is_retry_safe() {
        let connect =
            tonic::ConnectError(Box::new(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused")));
        let status = Status::from_error(Box::new(connect));
        assert_eq!(status.code(), Code::Unavailable);
        let error = Error::from_status(&status);
        assert!(error.is_retry_safe(), "{error:?}");
    }

    /// Proves the assumption the write-retry rule rests on: a lazily connected channel to a
    /// closed port fails with a status whose source chain holds tonic's `ConnectError`.
    #[tokio::test]
    async fn refused_connection_is_retry_safe_end_to_end() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("uri")
            .connect_timeout(std::time::Duration::from_secs(2))
            .connect_lazy();
        let mut client = floe_proto::v1::admin_client::AdminClient::new(channel);
        let status = client
            .cluster_status(floe_proto::v1::ClusterStatusRequest {})
            .await
            .expect_err("nothing listens on the port");
        let error = Error::from_status(&status);
        assert!(error.is_retry_safe(), "{error:?}");
    }
}
