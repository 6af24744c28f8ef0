//! The one error type of the node API, and its single mapping to gRPC and HTTP.
//!
//! Every error has a stable code string (sent as `floe-error-code` gRPC metadata and as
//! `error.code` in HTTP JSON), a status, and whether a retry is safe (the request certainly
//! did not take effect).

use crate::docs::DocError;
use crate::raft::host::GroupError;

/// Errors returned by `NodeApi`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Bad input; `code` names what was wrong (`invalid_json`, `too_deep`, ...).
    #[error("{message}")]
    InvalidArgument { code: &'static str, message: String },
    #[error("{message}")]
    TooLarge { message: String },
    #[error("{message}")]
    NotFound { code: &'static str, message: String },
    #[error("{message}")]
    AlreadyExists { message: String, current_version: u64 },
    #[error("{message}")]
    VersionMismatch { message: String, current_version: Option<u64> },
    #[error("{message}")]
    PreconditionFailed { code: &'static str, message: String },
    /// Try again later; `retry_safe` when the request certainly had no effect.
    #[error("{message}")]
    Unavailable { message: String, retry_safe: bool },
    /// No answer in time: the outcome of a write is unknown.
    #[error("{message}")]
    Timeout { message: String },
    #[error("internal error: {message}")]
    Internal { message: String },
}

impl ApiError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::InvalidArgument { code, message: message.into() }
    }

    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidArgument { code, .. } => code,
            ApiError::TooLarge { .. } => "too_large",
            ApiError::NotFound { code, .. } => code,
            ApiError::AlreadyExists { .. } => "already_exists",
            ApiError::VersionMismatch { .. } => "version_mismatch",
            ApiError::PreconditionFailed { code, .. } => code,
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::Timeout { .. } => "timeout",
            ApiError::Internal { .. } => "internal",
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            ApiError::InvalidArgument { .. } => 400,
            ApiError::TooLarge { .. } => 413,
            ApiError::NotFound { .. } => 404,
            ApiError::AlreadyExists { .. } | ApiError::VersionMismatch { .. } => 409,
            ApiError::PreconditionFailed { .. } => 409,
            ApiError::Unavailable { .. } => 503,
            ApiError::Timeout { .. } => 504,
            ApiError::Internal { .. } => 500,
        }
    }

    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            ApiError::InvalidArgument { .. } | ApiError::TooLarge { .. } => tonic::Code::InvalidArgument,
            ApiError::NotFound { .. } => tonic::Code::NotFound,
            ApiError::AlreadyExists { .. } => tonic::Code::AlreadyExists,
            ApiError::VersionMismatch { .. } => tonic::Code::Aborted,
            ApiError::PreconditionFailed { .. } => tonic::Code::FailedPrecondition,
            ApiError::Unavailable { .. } => tonic::Code::Unavailable,
            ApiError::Timeout { .. } => tonic::Code::DeadlineExceeded,
            ApiError::Internal { .. } => tonic::Code::Internal,
        }
    }

    /// True when the request certainly had no effect and may be sent again as is.
    pub fn retry_safe(&self) -> bool {
        match self {
            ApiError::Unavailable { retry_safe, .. } => *retry_safe,
            ApiError::Timeout { .. } | ApiError::Internal { .. } => false,
            // Refused requests changed nothing (retrying them gives the same answer).
            _ => true,
        }
    }

    /// The stored version, for conflicts.
    pub fn current_version(&self) -> Option<u64> {
        match self {
            ApiError::AlreadyExists { current_version, .. } => Some(*current_version),
            ApiError::VersionMismatch { current_version, .. } => *current_version,
            _ => None,
        }
    }

    /// A `tonic::Status` with `floe-error-code` (and retry/version hints) as metadata.
    pub fn to_status(&self) -> tonic::Status {
        let mut status = tonic::Status::new(self.grpc_code(), self.to_string());
        let md = status.metadata_mut();
        if let Ok(v) = self.code().parse() {
            md.insert("floe-error-code", v);
        }
        if matches!(self, ApiError::Unavailable { retry_safe: true, .. }) {
            if let Ok(v) = "true".parse() {
                md.insert("floe-retry-safe", v);
            }
        }
        if let Some(Ok(v)) = self.current_version().map(|v| v.to_string().parse()) {
            md.insert("floe-current-version", v);
        }
        status
    }
}

impl From<DocError> for ApiError {
    fn from(e: DocError) -> Self {
        let message = e.to_string();
        match e {
            DocError::InvalidJson(_) => ApiError::invalid("invalid_json", message),
            DocError::NotAnObject => ApiError::invalid("not_an_object", message),
            DocError::TooLarge { .. } => ApiError::TooLarge { message },
            DocError::TooDeep { .. } => ApiError::invalid("too_deep", message),
            DocError::InvalidId(_) => ApiError::invalid("invalid_id", message),
            DocError::InvalidName(_) => ApiError::invalid("invalid_name", message),
            DocError::InvalidPatch(_) => ApiError::invalid("invalid_patch", message),
            DocError::InvalidBatch(_) => ApiError::invalid("invalid_batch", message),
            DocError::PatchTestFailed(_) => ApiError::PreconditionFailed { code: "patch_test_failed", message },
            DocError::NotFound => ApiError::NotFound { code: "not_found", message },
            DocError::AlreadyExists { version } => ApiError::AlreadyExists { message, current_version: version },
            DocError::VersionMismatch { actual, .. } => ApiError::VersionMismatch { message, current_version: actual },
        }
    }
}

impl From<GroupError> for ApiError {
    fn from(e: GroupError) -> Self {
        let message = e.to_string();
        match e {
            GroupError::UnknownGroup(_) => ApiError::Unavailable { message, retry_safe: true },
            GroupError::Unavailable { retry_safe, .. } => ApiError::Unavailable { message, retry_safe },
            GroupError::Timeout { .. } => ApiError::Timeout { message },
            GroupError::Fatal { .. } => ApiError::Internal { message },
        }
    }
}

impl From<crate::storage::EngineError> for ApiError {
    fn from(e: crate::storage::EngineError) -> Self {
        ApiError::Internal { message: e.to_string() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_errors_map_to_documented_statuses() {
        let cases: Vec<(DocError, u16, tonic::Code)> = vec![
            (DocError::InvalidJson("x".into()), 400, tonic::Code::InvalidArgument),
            (DocError::TooLarge { size_bytes: 2, limit_bytes: 1 }, 413, tonic::Code::InvalidArgument),
            (DocError::TooDeep { depth: 65, limit: 64 }, 400, tonic::Code::InvalidArgument),
            (DocError::NotFound, 404, tonic::Code::NotFound),
            (DocError::AlreadyExists { version: 3 }, 409, tonic::Code::AlreadyExists),
            (DocError::VersionMismatch { expected: 1, actual: Some(2) }, 409, tonic::Code::Aborted),
            (DocError::PatchTestFailed("t".into()), 409, tonic::Code::FailedPrecondition),
        ];
        for (doc, http, grpc) in cases {
            let api = ApiError::from(doc);
            assert_eq!(api.http_status(), http, "{api:?}");
            assert_eq!(api.grpc_code(), grpc, "{api:?}");
        }
    }

    #[test]
    fn status_carries_code_and_hints() {
        let s = ApiError::VersionMismatch { message: "m".into(), current_version: Some(9) }.to_status();
        assert_eq!(s.metadata().get("floe-error-code").and_then(|v| v.to_str().ok()), Some("version_mismatch"));
        assert_eq!(s.metadata().get("floe-current-version").and_then(|v| v.to_str().ok()), Some("9"));
        let s = ApiError::Unavailable { message: "m".into(), retry_safe: true }.to_status();
        assert_eq!(s.metadata().get("floe-retry-safe").and_then(|v| v.to_str().ok()), Some("true"));
    }
}
