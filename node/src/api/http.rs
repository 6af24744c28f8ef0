//! The HTTP/JSON gateway (DESIGN §4): an axum `Router` that translates HTTP requests into
//! `NodeApi` calls and their results back into HTTP.
//!
//! Owns: the routes, header parsing (`If-Match`, `If-None-Match`, `Floe-Tenant`,
//! `Floe-Session`, `Content-Type` of patches), query and body decoding, request body limits,
//! the JSON error shape `{"error": {"code", "message"}}`, the response headers (`ETag`,
//! `Floe-Session`, `Floe-Request-Units`, `Retry-After`), and recording every request in
//! `Metrics`.
//!
//! Invariants:
//! - every answer is either a success payload or the JSON error shape, also for refused
//!   extractions (bad path or query, oversized or non-UTF-8 body, unknown route or method);
//!   API errors take their status from `ApiError::http_status`, the one mapping;
//! - document and patch bodies reach `NodeApi` as raw text, so its own validation (malformed
//!   JSON, nesting depth, size) decides the error code, not a JSON extractor here;
//! - every request is recorded exactly once with `Metrics::observe`, and bounded in total by
//!   `NodeApi::request_timeout`.
//!
//! Must not depend on storage, raft or the catalog directly: all semantics live in `NodeApi`.

use super::{ClusterStatus, DocView, NodeApi, ReadConsistency, ResponseMeta, WriteRequest};
use crate::api::ApiError;
use crate::docs::{DocAction, DocWriteResult, Limits, DEFAULT_TENANT};
use crate::keys::to_hex;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use http::header::{CONTENT_TYPE, ETAG, IF_MATCH, IF_NONE_MATCH, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use tracing::Instrument;

const TENANT_HEADER: &str = "floe-tenant";
const SESSION_HEADER: &str = "floe-session";
const REQUEST_UNITS_HEADER: &str = "floe-request-units";

const JSON_MEDIA_TYPE: &str = "application/json";
const MERGE_PATCH_MEDIA_TYPE: &str = "application/merge-patch+json";
const JSON_PATCH_MEDIA_TYPE: &str = "application/json-patch+json";
const PROMETHEUS_TEXT_MEDIA_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Room above `doc_bytes_max` for a document body: the limit applies to the compact JSON
/// text, a body may carry whitespace that canonicalization drops.
const DOC_BODY_SLACK_BYTES: usize = 64 * 1024;
/// Largest `/v1/batch` body.
const BATCH_BODY_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Worst-case JSON text of one id byte (`\u00XX`), for the batch-get body bound.
const ESCAPED_ID_BYTE_BYTES_MAX: usize = 6;

/// Generic code for refused request syntax that is not about a document.
const INVALID_ARGUMENT: &str = "invalid_argument";

/// The HTTP gateway over `api`.
pub fn router(api: Arc<NodeApi>) -> Router {
    let doc_body_max = doc_body_bytes_max(&api.limits);
    let batch_get_body_max = batch_get_body_bytes_max(&api.limits);
    Router::new()
        .route(
            "/v1/collections/{c}/docs/{id}",
            get(get_doc).put(put_doc).patch(patch_doc).delete(delete_doc).layer(DefaultBodyLimit::max(doc_body_max)),
        )
        .route("/v1/collections/{c}/batch_get", post(batch_get).layer(DefaultBodyLimit::max(batch_get_body_max)))
        .route("/v1/batch", post(batch).layer(DefaultBodyLimit::max(BATCH_BODY_BYTES_MAX)))
        .route("/v1/collections/{c}", put(create_collection).delete(drop_collection))
        .route("/v1/collections", get(list_collections))
        .route("/v1/cluster", get(cluster))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        // Must follow the routes: it is applied to the routes registered so far.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(route_not_found)
        .with_state(api)
}

fn doc_body_bytes_max(limits: &Limits) -> usize {
    limits.doc_bytes_max.saturating_add(DOC_BODY_SLACK_BYTES)
}

fn batch_get_body_bytes_max(limits: &Limits) -> usize {
    let id_text_max = limits.id_bytes_max.saturating_mul(ESCAPED_ID_BYTE_BYTES_MAX).saturating_add(8);
    limits.batch_ops_max.saturating_mul(id_text_max).saturating_add(DOC_BODY_SLACK_BYTES)
}

// ---------------------------------------------------------------------------------------
// Errors

/// An error answer: status, stable code, message (and the stored version for conflicts).
#[derive(Clone, Debug, PartialEq, Eq)]
struct HttpError {
    status: StatusCode,
    code: &'static str,
    message: String,
    current_version: Option<u64>,
}

impl HttpError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), current_version: None }
    }

    fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// `{"error": {"code", "message", "current_version"?}}`.
    fn body(&self) -> Value {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(version) = self.current_version {
            error["current_version"] = json!(version);
        }
        json!({ "error": error })
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        Self {
            status: StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code: e.code(),
            message: e.to_string(),
            current_version: e.current_version(),
        }
    }
}

impl From<PathRejection> for HttpError {
    fn from(r: PathRejection) -> Self {
        Self::invalid(INVALID_ARGUMENT, format!("bad path: {}", r.body_text()))
    }
}

impl From<QueryRejection> for HttpError {
    fn from(r: QueryRejection) -> Self {
        Self::invalid(INVALID_ARGUMENT, format!("bad query string: {}", r.body_text()))
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

// ---------------------------------------------------------------------------------------
// Request plumbing shared by every handler

type DocPath = Result<Path<(String, String)>, PathRejection>;
type CollectionPath = Result<Path<String>, PathRejection>;
type QueryParams = Result<Query<BTreeMap<String, String>>, QueryRejection>;
type Body = Result<Bytes, BytesRejection>;

/// Runs one request: bounds it by the request timeout, turns errors into answers and
/// records it in the metrics.
async fn respond(api: &NodeApi, op: &'static str, work: impl Future<Output = Result<Response, HttpError>>) -> Response {
    let started = tokio::time::Instant::now();
    let span = tracing::debug_span!("http", node_id = api.node_id, op, collection = tracing::field::Empty);
    let timeout = api.request_timeout();
    let result = match tokio::time::timeout(timeout, work.instrument(span)).await {
        Ok(result) => result,
        Err(_) => Err(HttpError::from(ApiError::Timeout {
            message: format!("no answer within {timeout:?}; the outcome of a write is unknown"),
        })),
    };
    let (code, response) = match result {
        Ok(response) => ("ok", response),
        Err(e) => (e.code, e.into_response()),
    };
    api.metrics.observe(op, code, started.elapsed());
    if code == "internal" {
        tracing::error!(node = api.node_id, op, "request failed with an internal error");
    }
    response
}

fn doc_path(path: DocPath) -> Result<(String, String), HttpError> {
    let Path((collection, id)) = path?;
    tracing::Span::current().record("collection", collection.as_str());
    Ok((collection, id))
}

fn collection_path(path: CollectionPath) -> Result<String, HttpError> {
    let Path(collection) = path?;
    tracing::Span::current().record("collection", collection.as_str());
    Ok(collection)
}

/// The body within `limit_bytes`; an oversized one is `too_large` (413).
fn read_body(body: Body, limit_bytes: usize) -> Result<Bytes, HttpError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            HttpError::from(ApiError::TooLarge {
                message: format!("request body exceeds the limit of {limit_bytes} bytes"),
            })
        } else {
            HttpError::invalid("invalid_body", format!("could not read the request body: {}", rejection.body_text()))
        }
    })
}

/// The body as text, unparsed (`NodeApi` validates documents and patches).
fn body_text(body: Body, limit_bytes: usize) -> Result<String, HttpError> {
    let bytes = read_body(body, limit_bytes)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| HttpError::invalid("invalid_json", "request body is not valid UTF-8"))
}

/// A JSON request envelope: syntax errors are `invalid_json`, a well-formed body of the
/// wrong shape is `shape_code`.
fn parse_json_body<T: DeserializeOwned>(bytes: &[u8], shape_code: &'static str) -> Result<T, HttpError> {
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => HttpError::invalid(shape_code, format!("unexpected request body: {e}")),
        _ => HttpError::invalid("invalid_json", format!("malformed JSON body: {e}")),
    })
}

/// A header as text (UTF-8 allowed, unlike `HeaderValue::to_str`).
fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, HttpError> {
    headers
        .get(name)
        .map(|v| {
            std::str::from_utf8(v.as_bytes())
                .map_err(|_| HttpError::invalid(INVALID_ARGUMENT, format!("header {name} is not valid UTF-8")))
        })
        .transpose()
}

/// The `Floe-Tenant` header; empty means the default tenant (resolved by `NodeApi`).
fn request_tenant(headers: &HeaderMap) -> Result<&str, HttpError> {
    Ok(header_text(headers, TENANT_HEADER)?.unwrap_or(""))
}

/// The tenant name to show in answers, as `NodeApi` resolves it.
fn shown_tenant(tenant: &str) -> &str {
    if tenant.is_empty() {
        DEFAULT_TENANT
    } else {
        tenant
    }
}

// ---------------------------------------------------------------------------------------
// Preconditions, patch media types and read consistency (pure)

/// A parsed `If-Match`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IfMatch {
    /// `*`: the document must exist.
    Any,
    /// The stored version must be this one.
    Version(u64),
}

/// The version a write must find stored (`*` only asks for existence).
fn expected_version(if_match: Option<IfMatch>) -> Option<u64> {
    match if_match {
        Some(IfMatch::Version(v)) => Some(v),
        Some(IfMatch::Any) | None => None,
    }
}

/// One `If-Match` value: `*`, `"12"` or `12`. Weak tags and lists are refused, as versions
/// are exact.
fn parse_if_match_value(raw: &str) -> Result<IfMatch, HttpError> {
    let raw = raw.trim();
    if raw == "*" {
        return Ok(IfMatch::Any);
    }
    if raw.starts_with("W/") || raw.starts_with("w/") {
        return Err(HttpError::invalid(
            INVALID_ARGUMENT,
            "weak entity tags (W/) are not accepted in If-Match: versions compare exactly",
        ));
    }
    let unquoted = match raw.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"'),
        None => Some(raw),
    };
    unquoted
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|v| v.parse().ok())
        .map(IfMatch::Version)
        .ok_or_else(|| {
            HttpError::invalid(
                INVALID_ARGUMENT,
                format!("If-Match must be one document version (\"12\" or 12) or *, not {raw:?}"),
            )
        })
}

fn parse_if_match(headers: &HeaderMap) -> Result<Option<IfMatch>, HttpError> {
    if headers.get_all(IF_MATCH).iter().count() > 1 {
        return Err(HttpError::invalid(INVALID_ARGUMENT, "give at most one If-Match header"));
    }
    header_text(headers, IF_MATCH.as_str())?.map(parse_if_match_value).transpose()
}

/// True for `If-None-Match: *` (create only); other values are refused, since ignoring a
/// precondition could overwrite data.
fn parse_if_none_match(headers: &HeaderMap) -> Result<bool, HttpError> {
    match header_text(headers, IF_NONE_MATCH.as_str())?.map(str::trim) {
        None => Ok(false),
        Some("*") => Ok(true),
        Some(other) => Err(HttpError::invalid(
            INVALID_ARGUMENT,
            format!("only If-None-Match: * (create only) is supported, not {other:?}"),
        )),
    }
}

/// The write a `PUT` asks for, and its success status.
fn put_action(
    if_match: Option<IfMatch>,
    create_only: bool,
    json: String,
) -> Result<(DocAction, StatusCode), HttpError> {
    match (if_match, create_only) {
        (Some(_), true) => Err(HttpError::invalid(INVALID_ARGUMENT, "If-Match and If-None-Match exclude each other")),
        (None, true) => Ok((DocAction::Create { json }, StatusCode::CREATED)),
        (Some(IfMatch::Any), false) => Ok((DocAction::Replace { json, expected: None }, StatusCode::OK)),
        (Some(IfMatch::Version(v)), false) => Ok((DocAction::Put { json, expected: Some(v) }, StatusCode::OK)),
        (None, false) => Ok((DocAction::Put { json, expected: None }, StatusCode::OK)),
    }
}

/// The precondition of a `PATCH` or `DELETE`: the document must exist anyway, so
/// `If-Match: *` adds nothing and `If-None-Match` can never hold.
fn existing_doc_expected(headers: &HeaderMap) -> Result<Option<u64>, HttpError> {
    if parse_if_none_match(headers)? {
        return Err(HttpError::invalid(
            INVALID_ARGUMENT,
            "If-None-Match: * cannot hold for a write that needs an existing document",
        ));
    }
    Ok(expected_version(parse_if_match(headers)?))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PatchKind {
    Merge,
    Json,
}

impl PatchKind {
    /// From the `Content-Type` media type (parameters and case ignored).
    fn from_content_type(content_type: Option<&str>) -> Result<PatchKind, HttpError> {
        let media_type = content_type.and_then(|c| c.split(';').next()).map(|m| m.trim().to_ascii_lowercase());
        match media_type.as_deref() {
            Some(MERGE_PATCH_MEDIA_TYPE) => Ok(PatchKind::Merge),
            Some(JSON_PATCH_MEDIA_TYPE) => Ok(PatchKind::Json),
            _ => Err(HttpError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "PATCH needs Content-Type {MERGE_PATCH_MEDIA_TYPE} or {JSON_PATCH_MEDIA_TYPE}, not {:?}",
                    content_type.unwrap_or("")
                ),
            )),
        }
    }

    fn action(self, patch: String, expected: Option<u64>) -> DocAction {
        match self {
            PatchKind::Merge => DocAction::MergePatch { patch, expected },
            PatchKind::Json => DocAction::JsonPatch { patch, expected },
        }
    }
}

/// A read consistency from its name (`strong` when absent), bound and session token.
fn parse_consistency(
    name: Option<&str>,
    max_staleness_ms: Option<u64>,
    session: Option<&str>,
) -> Result<ReadConsistency, HttpError> {
    let name = name.map(|n| n.trim().to_ascii_lowercase()).unwrap_or_else(|| "strong".into());
    if max_staleness_ms.is_some() && name != "bounded" {
        return Err(HttpError::invalid(INVALID_ARGUMENT, "max_staleness_ms only applies to consistency=bounded"));
    }
    match name.as_str() {
        "strong" => Ok(ReadConsistency::Strong),
        "eventual" => Ok(ReadConsistency::Eventual),
        "bounded" => max_staleness_ms
            .filter(|ms| *ms > 0)
            .map(|max_staleness_ms| ReadConsistency::BoundedStaleness { max_staleness_ms })
            .ok_or_else(|| HttpError::invalid(INVALID_ARGUMENT, "consistency=bounded needs max_staleness_ms > 0")),
        "session" => session
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|token| ReadConsistency::Session { token: token.to_string() })
            .ok_or_else(|| {
                HttpError::invalid(INVALID_ARGUMENT, "consistency=session needs a session token (header Floe-Session)")
            }),
        other => Err(HttpError::invalid(
            INVALID_ARGUMENT,
            format!("unknown consistency {other:?}: use strong, bounded, session or eventual"),
        )),
    }
}

fn parse_staleness_ms(raw: Option<&String>) -> Result<Option<u64>, HttpError> {
    raw.map(|r| {
        r.trim().parse().map_err(|_| {
            HttpError::invalid(
                INVALID_ARGUMENT,
                format!("max_staleness_ms must be a number of milliseconds, not {r:?}"),
            )
        })
    })
    .transpose()
}

// ---------------------------------------------------------------------------------------
// Batch bodies (pure)

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    #[serde(default)]
    tenant: Option<String>,
    ops: Vec<BatchOp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchOp {
    op: String,
    collection: String,
    id: String,
    /// The document (put, create, replace) or the patch (merge_patch, json_patch).
    #[serde(default)]
    value: Option<Value>,
    #[serde(default)]
    if_match: Option<u64>,
}

impl BatchOp {
    fn into_write(self, index: usize) -> Result<WriteRequest, HttpError> {
        let BatchOp { op, collection, id, value, if_match: expected } = self;
        let refuse =
            |message: &str| HttpError::invalid("invalid_batch", format!("operation {index} ({op}): {message}"));
        // Re-serialized compactly; `NodeApi` validates it like any document or patch.
        let text = value.map(|v| v.to_string());
        let action = match (op.as_str(), text) {
            ("delete", None) => DocAction::Delete { expected },
            ("delete", Some(_)) => return Err(refuse("takes no \"value\"")),
            ("create", _) if expected.is_some() => return Err(refuse("takes no \"if_match\": it fails if the document exists")),
            ("create", Some(json)) => DocAction::Create { json },
            ("put", Some(json)) => DocAction::Put { json, expected },
            ("replace", Some(json)) => DocAction::Replace { json, expected },
            ("merge_patch", Some(patch)) => DocAction::MergePatch { patch, expected },
            ("json_patch", Some(patch)) => DocAction::JsonPatch { patch, expected },
            ("create" | "put" | "replace" | "merge_patch" | "json_patch", None) => return Err(refuse("needs a \"value\"")),
            (other, _) => {
                return Err(HttpError::invalid(
                    "invalid_batch",
                    format!("operation {index}: unknown op {other:?}; use put, create, replace, merge_patch, json_patch or delete"),
                ))
            }
        };
        Ok(WriteRequest { collection, id, action })
    }
}

/// The batch's tenant: the body's, else the header's; both given must agree.
fn batch_tenant(header: &str, body: Option<String>) -> Result<String, HttpError> {
    match body {
        Some(tenant) if !header.is_empty() && tenant != header => Err(HttpError::invalid(
            INVALID_ARGUMENT,
            format!("the Floe-Tenant header ({header:?}) and the body's tenant ({tenant:?}) differ"),
        )),
        Some(tenant) => Ok(tenant),
        None => Ok(header.to_string()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchGetBody {
    ids: Vec<String>,
    #[serde(default)]
    consistency: Option<String>,
    #[serde(default)]
    max_staleness_ms: Option<u64>,
    /// Session token; the `Floe-Session` header is used when absent.
    #[serde(default)]
    session: Option<String>,
}

// ---------------------------------------------------------------------------------------
// Response shaping (pure)

fn set_header(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// Adds `ETag` (when the answer has a document version), `Floe-Session` and
/// `Floe-Request-Units`.
fn with_meta(mut response: Response, version: Option<u64>, meta: &ResponseMeta) -> Response {
    let headers = response.headers_mut();
    if let Some(version) = version {
        set_header(headers, ETAG, &format!("\"{version}\""));
    }
    set_header(headers, HeaderName::from_static(SESSION_HEADER), &meta.session_token);
    set_header(headers, HeaderName::from_static(REQUEST_UNITS_HEADER), &meta.request_units.to_string());
    response
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

/// Stored JSON text sent as is.
fn raw_json_response(status: StatusCode, json: String) -> Response {
    (status, [(CONTENT_TYPE, HeaderValue::from_static(JSON_MEDIA_TYPE))], json).into_response()
}

fn parse_stored_json(json: &str) -> Result<Value, HttpError> {
    serde_json::from_str(json)
        .map_err(|e| HttpError::from(ApiError::Internal { message: format!("stored document is not JSON: {e}") }))
}

/// `{"collection", "id", "version", "value"?}`; `value` is the document after a patch.
fn write_result_json(result: &DocWriteResult) -> Result<Value, HttpError> {
    let mut body = json!({ "collection": result.collection, "id": result.id, "version": result.version });
    if let Some(json) = &result.json {
        body["value"] = parse_stored_json(json)?;
    }
    Ok(body)
}

/// `{"id", "found", "version"?, "value"?}`.
fn batch_get_entry(id: &str, doc: Option<&DocView>) -> Result<Value, HttpError> {
    Ok(match doc {
        Some(doc) => {
            json!({ "id": id, "found": true, "version": doc.version, "value": parse_stored_json(&doc.json)? })
        }
        None => json!({ "id": id, "found": false }),
    })
}

fn cluster_json(status: &ClusterStatus) -> Value {
    let nodes: Vec<Value> = status
        .nodes
        .iter()
        .map(|(node, state)| json!({ "id": node.id, "grpc_addr": node.grpc_addr, "http_addr": node.http_addr, "state": state }))
        .collect();
    let shards: Vec<Value> = status
        .shards
        .iter()
        .map(|s| {
            json!({
                "id": s.desc.id,
                "start": to_hex(&s.desc.start),
                "end": to_hex(&s.desc.end),
                "epoch": s.desc.epoch,
                "leader": s.leader,
                "replicas": s.desc.replicas,
                "state": s.state,
                "qps": s.qps,
                "applied_index": s.applied_index,
            })
        })
        .collect();
    json!({ "answered_by": status.answered_by, "meta_leader": status.meta_leader, "nodes": nodes, "shards": shards })
}

// ---------------------------------------------------------------------------------------
// Handlers

type Api = State<Arc<NodeApi>>;

/// One document write; returns its single result.
async fn write_one(
    api: &NodeApi,
    headers: &HeaderMap,
    collection: String,
    id: String,
    action: DocAction,
) -> Result<(DocWriteResult, ResponseMeta), HttpError> {
    let (results, meta) = api.write(request_tenant(headers)?, vec![WriteRequest { collection, id, action }]).await?;
    let result = results
        .into_iter()
        .next()
        .ok_or_else(|| HttpError::from(ApiError::Internal { message: "a write returned no result".into() }))?;
    Ok((result, meta))
}

/// `{"collection", "id", "version"}` with the response headers.
fn written_response(status: StatusCode, result: &DocWriteResult, etag: bool, meta: &ResponseMeta) -> Response {
    let body = json!({ "collection": result.collection, "id": result.id, "version": result.version });
    with_meta(json_response(status, body), etag.then_some(result.version), meta)
}

async fn get_doc(State(api): Api, path: DocPath, query: QueryParams, headers: HeaderMap) -> Response {
    respond(&api, "get", async {
        let (collection, id) = doc_path(path)?;
        let Query(query) = query?;
        let consistency = parse_consistency(
            query.get("consistency").map(String::as_str),
            parse_staleness_ms(query.get("max_staleness_ms"))?,
            header_text(&headers, SESSION_HEADER)?,
        )?;
        let (doc, meta) = api.get(request_tenant(&headers)?, &collection, &id, &consistency).await?;
        Ok(with_meta(raw_json_response(StatusCode::OK, doc.json), Some(doc.version), &meta))
    })
    .await
}

async fn put_doc(State(api): Api, path: DocPath, headers: HeaderMap, body: Body) -> Response {
    respond(&api, "put", async {
        let (collection, id) = doc_path(path)?;
        let (if_match, create_only) = (parse_if_match(&headers)?, parse_if_none_match(&headers)?);
        let json = body_text(body, doc_body_bytes_max(&api.limits))?;
        let (action, status) = put_action(if_match, create_only, json)?;
        let (result, meta) = write_one(&api, &headers, collection, id, action).await?;
        Ok(written_response(status, &result, true, &meta))
    })
    .await
}

async fn patch_doc(State(api): Api, path: DocPath, headers: HeaderMap, body: Body) -> Response {
    respond(&api, "patch", async {
        let (collection, id) = doc_path(path)?;
        let kind = PatchKind::from_content_type(header_text(&headers, CONTENT_TYPE.as_str())?)?;
        let expected = existing_doc_expected(&headers)?;
        let patch = body_text(body, doc_body_bytes_max(&api.limits))?;
        let (mut result, meta) = write_one(&api, &headers, collection, id, kind.action(patch, expected)).await?;
        // The patched document is the answer; without it, answer like a put.
        Ok(match result.json.take() {
            Some(json) => with_meta(raw_json_response(StatusCode::OK, json), Some(result.version), &meta),
            None => written_response(StatusCode::OK, &result, true, &meta),
        })
    })
    .await
}

async fn delete_doc(State(api): Api, path: DocPath, headers: HeaderMap) -> Response {
    respond(&api, "delete", async {
        let (collection, id) = doc_path(path)?;
        let expected = existing_doc_expected(&headers)?;
        let (result, meta) = write_one(&api, &headers, collection, id, DocAction::Delete { expected }).await?;
        // No ETag: nothing is stored at this version.
        Ok(written_response(StatusCode::OK, &result, false, &meta))
    })
    .await
}

async fn batch(State(api): Api, headers: HeaderMap, body: Body) -> Response {
    respond(&api, "batch", async {
        let request: BatchBody = parse_json_body(&read_body(body, BATCH_BODY_BYTES_MAX)?, "invalid_batch")?;
        let tenant = batch_tenant(request_tenant(&headers)?, request.tenant)?;
        let writes =
            request.ops.into_iter().enumerate().map(|(i, op)| op.into_write(i)).collect::<Result<Vec<_>, _>>()?;
        let (results, meta) = api.write(&tenant, writes).await?;
        let results = results.iter().map(write_result_json).collect::<Result<Vec<_>, _>>()?;
        Ok(with_meta(json_response(StatusCode::OK, json!({ "results": results })), None, &meta))
    })
    .await
}

async fn batch_get(State(api): Api, path: CollectionPath, headers: HeaderMap, body: Body) -> Response {
    respond(&api, "batch_get", async {
        let collection = collection_path(path)?;
        let request: BatchGetBody =
            parse_json_body(&read_body(body, batch_get_body_bytes_max(&api.limits))?, INVALID_ARGUMENT)?;
        let session = match request.session.as_deref() {
            Some(token) => Some(token),
            None => header_text(&headers, SESSION_HEADER)?,
        };
        let consistency = parse_consistency(request.consistency.as_deref(), request.max_staleness_ms, session)?;
        let (docs, meta) = api.batch_get(request_tenant(&headers)?, &collection, &request.ids, &consistency).await?;
        let documents =
            docs.iter().map(|(id, doc)| batch_get_entry(id, doc.as_ref())).collect::<Result<Vec<_>, _>>()?;
        Ok(with_meta(json_response(StatusCode::OK, json!({ "documents": documents })), None, &meta))
    })
    .await
}

async fn create_collection(State(api): Api, path: CollectionPath, headers: HeaderMap) -> Response {
    respond(&api, "create_collection", async {
        let name = collection_path(path)?;
        let (info, created) = api.create_collection(request_tenant(&headers)?, &name).await?;
        Ok(json_response(StatusCode::OK, json!({ "tenant": info.tenant, "name": info.name, "created": created })))
    })
    .await
}

async fn list_collections(State(api): Api, headers: HeaderMap) -> Response {
    respond(&api, "list_collections", async {
        let collections = api.list_collections(request_tenant(&headers)?).await?;
        let collections: Vec<Value> = collections
            .iter()
            .map(|c| json!({ "tenant": c.tenant, "name": c.name, "created_at_index": c.created_at_index }))
            .collect();
        Ok(json_response(StatusCode::OK, json!({ "collections": collections })))
    })
    .await
}

async fn drop_collection(State(api): Api, path: CollectionPath, headers: HeaderMap) -> Response {
    respond(&api, "drop_collection", async {
        let name = collection_path(path)?;
        let tenant = request_tenant(&headers)?;
        let existed = api.drop_collection(tenant, &name).await?;
        Ok(json_response(StatusCode::OK, json!({ "tenant": shown_tenant(tenant), "name": name, "dropped": existed })))
    })
    .await
}

async fn cluster(State(api): Api) -> Response {
    respond(&api, "cluster_status", async {
        Ok(json_response(StatusCode::OK, cluster_json(&api.cluster_status_fresh().await?)))
    })
    .await
}

async fn healthz(State(api): Api) -> Response {
    respond(&api, "healthz", async { Ok("ok".into_response()) }).await
}

async fn readyz(State(api): Api) -> Response {
    respond(&api, "readyz", async {
        Ok(if api.is_ready() {
            (StatusCode::OK, "ready").into_response()
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
        })
    })
    .await
}

async fn metrics(State(api): Api) -> Response {
    respond(&api, "metrics", async {
        let text = api.metrics.render(&api);
        Ok(([(CONTENT_TYPE, HeaderValue::from_static(PROMETHEUS_TEXT_MEDIA_TYPE))], text).into_response())
    })
    .await
}

async fn route_not_found(State(api): Api, uri: Uri) -> Response {
    respond(&api, "unknown_route", async {
        Err(HttpError::new(StatusCode::NOT_FOUND, "route_not_found", format!("no route for {}", uri.path())))
    })
    .await
}

async fn method_not_allowed(State(api): Api, method: Method, uri: Uri) -> Response {
    respond(&api, "unknown_route", async {
        Err(HttpError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {}", uri.path()),
        ))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ShardStatus;
    use crate::catalog::{NodeInfo, ShardDesc};

    fn code_of<T: std::fmt::Debug>(r: Result<T, HttpError>) -> &'static str {
        r.expect_err("expected a refusal").code
    }

    #[test]
    fn if_match_accepts_quoted_bare_and_star_only() {
        assert_eq!(parse_if_match_value("\"12\""), Ok(IfMatch::Version(12)));
        assert_eq!(parse_if_match_value(" 12 "), Ok(IfMatch::Version(12)));
        assert_eq!(parse_if_match_value("*"), Ok(IfMatch::Any));
        for bad in
            ["W/\"12\"", "w/12", "\"12", "12\"", "\"\"", "", "abc", "-1", "+1", "\"1\", \"2\"", "99999999999999999999"]
        {
            let e = parse_if_match_value(bad).expect_err(bad);
            assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, INVALID_ARGUMENT), "{bad:?}");
        }
    }

    #[test]
    fn if_match_header_refuses_repeats_and_maps_to_expected_version() {
        let mut headers = HeaderMap::new();
        assert_eq!(parse_if_match(&headers), Ok(None));
        headers.insert(IF_MATCH, HeaderValue::from_static("\"7\""));
        assert_eq!(parse_if_match(&headers), Ok(Some(IfMatch::Version(7))));
        assert_eq!(existing_doc_expected(&headers), Ok(Some(7)));
        headers.append(IF_MATCH, HeaderValue::from_static("8"));
        assert_eq!(code_of(parse_if_match(&headers)), INVALID_ARGUMENT);

        let mut headers = HeaderMap::new();
        headers.insert(IF_MATCH, HeaderValue::from_static("*"));
        assert_eq!(existing_doc_expected(&headers), Ok(None));
        headers.insert(IF_NONE_MATCH, HeaderValue::from_static("*"));
        assert_eq!(code_of(existing_doc_expected(&headers)), INVALID_ARGUMENT);
    }

    #[test]
    fn put_preconditions_choose_the_action_and_status() {
        let j = || "{}".to_string();
        assert_eq!(put_action(None, false, j()), Ok((DocAction::Put { json: j(), expected: None }, StatusCode::OK)));
        assert_eq!(
            put_action(Some(IfMatch::Version(3)), false, j()),
            Ok((DocAction::Put { json: j(), expected: Some(3) }, StatusCode::OK))
        );
        assert_eq!(
            put_action(Some(IfMatch::Any), false, j()),
            Ok((DocAction::Replace { json: j(), expected: None }, StatusCode::OK))
        );
        assert_eq!(put_action(None, true, j()), Ok((DocAction::Create { json: j() }, StatusCode::CREATED)));
        assert_eq!(code_of(put_action(Some(IfMatch::Version(3)), true, j())), INVALID_ARGUMENT);

        let mut headers = HeaderMap::new();
        headers.insert(IF_NONE_MATCH, HeaderValue::from_static("\"4\""));
        assert_eq!(code_of(parse_if_none_match(&headers)), INVALID_ARGUMENT);
    }

    #[test]
    fn patch_media_types_pick_the_patch_kind_or_415() {
        assert_eq!(PatchKind::from_content_type(Some("application/merge-patch+json")), Ok(PatchKind::Merge));
        assert_eq!(
            PatchKind::from_content_type(Some("Application/JSON-Patch+JSON; charset=utf-8")),
            Ok(PatchKind::Json)
        );
        for bad in [None, Some("application/json"), Some("text/plain")] {
            let e = PatchKind::from_content_type(bad).expect_err("refused");
            assert_eq!((e.status, e.code), (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"));
        }
        assert_eq!(
            PatchKind::Json.action("[]".into(), Some(2)),
            DocAction::JsonPatch { patch: "[]".into(), expected: Some(2) }
        );
    }

    #[test]
    fn consistency_names_map_and_need_their_parameters() {
        assert_eq!(parse_consistency(None, None, None), Ok(ReadConsistency::Strong));
        assert_eq!(parse_consistency(Some("strong"), None, Some("1:5")), Ok(ReadConsistency::Strong));
        assert_eq!(parse_consistency(Some("EVENTUAL"), None, None), Ok(ReadConsistency::Eventual));
        assert_eq!(
            parse_consistency(Some("bounded"), Some(250), None),
            Ok(ReadConsistency::BoundedStaleness { max_staleness_ms: 250 })
        );
        assert_eq!(
            parse_consistency(Some("session"), None, Some("1:5")),
            Ok(ReadConsistency::Session { token: "1:5".into() })
        );
        assert_eq!(code_of(parse_consistency(Some("bounded"), None, None)), INVALID_ARGUMENT);
        assert_eq!(code_of(parse_consistency(Some("bounded"), Some(0), None)), INVALID_ARGUMENT);
        assert_eq!(code_of(parse_consistency(Some("session"), None, Some(" "))), INVALID_ARGUMENT);
        assert_eq!(code_of(parse_consistency(Some("strong"), Some(5), None)), INVALID_ARGUMENT);
        assert_eq!(code_of(parse_consistency(Some("linearizable"), None, None)), INVALID_ARGUMENT);
        assert_eq!(parse_staleness_ms(Some(&"40".to_string())), Ok(Some(40)));
        assert_eq!(code_of(parse_staleness_ms(Some(&"soon".to_string()))), INVALID_ARGUMENT);
    }

    #[test]
    fn error_body_has_the_documented_shape() {
        let e = HttpError::from(ApiError::VersionMismatch { message: "stale".into(), current_version: Some(9) });
        assert_eq!(e.status, StatusCode::CONFLICT);
        assert_eq!(
            e.body(),
            json!({ "error": { "code": "version_mismatch", "message": "stale", "current_version": 9 } })
        );
        let e = HttpError::from(ApiError::invalid("too_deep", "deep"));
        assert_eq!(e.body(), json!({ "error": { "code": "too_deep", "message": "deep" } }));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn unavailable_answers_carry_retry_after_and_json() {
        let response =
            HttpError::from(ApiError::Unavailable { message: "no leader".into(), retry_safe: true }).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers().get(RETRY_AFTER), Some(&HeaderValue::from_static("1")));
        assert_eq!(response.headers().get(CONTENT_TYPE), Some(&HeaderValue::from_static(JSON_MEDIA_TYPE)));
        let response = HttpError::invalid("invalid_json", "x").into_response();
        assert_eq!(response.headers().get(RETRY_AFTER), None);
    }

    #[test]
    fn json_bodies_split_syntax_from_shape_errors() {
        assert_eq!(code_of(parse_json_body::<BatchBody>(b"{\"ops\": [", "invalid_batch")), "invalid_json");
        assert_eq!(code_of(parse_json_body::<BatchBody>(b"\xff", "invalid_batch")), "invalid_json");
        assert_eq!(code_of(parse_json_body::<BatchBody>(b"{\"ops\": 3}", "invalid_batch")), "invalid_batch");
        assert_eq!(
            code_of(parse_json_body::<BatchBody>(b"{\"ops\": [], \"extra\": 1}", "invalid_batch")),
            "invalid_batch"
        );
        let body: BatchBody =
            parse_json_body(br#"{"tenant":"t","ops":[{"op":"delete","collection":"c","id":"a"}]}"#, "invalid_batch")
                .expect("valid batch");
        assert_eq!(body.tenant.as_deref(), Some("t"));
        assert_eq!(body.ops.len(), 1);
    }

    #[test]
    fn batch_ops_become_write_requests() {
        let op = |op: &str, value: Option<Value>, if_match: Option<u64>| BatchOp {
            op: op.into(),
            collection: "c".into(),
            id: "a".into(),
            value,
            if_match,
        };
        let action = |o: BatchOp| o.into_write(0).map(|w| w.action);
        let doc = || Some(json!({ "x": 1 }));
        assert_eq!(
            action(op("put", doc(), Some(4))),
            Ok(DocAction::Put { json: "{\"x\":1}".into(), expected: Some(4) })
        );
        assert_eq!(action(op("create", doc(), None)), Ok(DocAction::Create { json: "{\"x\":1}".into() }));
        assert_eq!(
            action(op("replace", doc(), None)),
            Ok(DocAction::Replace { json: "{\"x\":1}".into(), expected: None })
        );
        assert_eq!(
            action(op("merge_patch", doc(), Some(2))),
            Ok(DocAction::MergePatch { patch: "{\"x\":1}".into(), expected: Some(2) })
        );
        assert_eq!(
            action(op("json_patch", Some(json!([])), None)),
            Ok(DocAction::JsonPatch { patch: "[]".into(), expected: None })
        );
        assert_eq!(action(op("delete", None, Some(5))), Ok(DocAction::Delete { expected: Some(5) }));
        assert_eq!(code_of(action(op("put", None, None))), "invalid_batch");
        assert_eq!(code_of(action(op("delete", doc(), None))), "invalid_batch");
        assert_eq!(code_of(action(op("create", doc(), Some(1)))), "invalid_batch");
        assert_eq!(code_of(action(op("upsert", doc(), None))), "invalid_batch");
    }

    #[test]
    fn batch_tenant_prefers_body_and_refuses_disagreement() {
        assert_eq!(batch_tenant("", None), Ok(String::new()));
        assert_eq!(batch_tenant("h", None), Ok("h".into()));
        assert_eq!(batch_tenant("", Some("b".into())), Ok("b".into()));
        assert_eq!(batch_tenant("b", Some("b".into())), Ok("b".into()));
        assert_eq!(code_of(batch_tenant("h", Some("b".into()))), INVALID_ARGUMENT);
        assert_eq!(shown_tenant(""), DEFAULT_TENANT);
    }

    #[test]
    fn responses_carry_version_session_and_units() {
        let meta = ResponseMeta { session_token: "3:41".into(), request_units: 5.0, ..ResponseMeta::default() };
        let response = with_meta(raw_json_response(StatusCode::OK, "{\"a\":1}".into()), Some(41), &meta);
        let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        assert_eq!(header("etag").as_deref(), Some("\"41\""));
        assert_eq!(header(SESSION_HEADER).as_deref(), Some("3:41"));
        assert_eq!(header(REQUEST_UNITS_HEADER).as_deref(), Some("5"));
        assert_eq!(header("content-type").as_deref(), Some(JSON_MEDIA_TYPE));

        let patched =
            DocWriteResult { collection: "c".into(), id: "a".into(), version: 41, json: Some("{\"a\":1}".into()) };
        assert_eq!(
            write_result_json(&patched),
            Ok(json!({ "collection": "c", "id": "a", "version": 41, "value": { "a": 1 } }))
        );
    }

    #[test]
    fn batch_get_entries_mark_absent_documents() {
        let doc = DocView { collection: "c".into(), id: "a".into(), version: 6, json: "{\"n\":2}".into() };
        assert_eq!(
            batch_get_entry("a", Some(&doc)),
            Ok(json!({ "id": "a", "found": true, "version": 6, "value": { "n": 2 } }))
        );
        assert_eq!(batch_get_entry("b", None), Ok(json!({ "id": "b", "found": false })));
    }

    #[test]
    fn cluster_json_renders_hex_ranges() {
        let status = ClusterStatus {
            answered_by: 1,
            meta_leader: Some(1),
            nodes: vec![(NodeInfo { id: 1, grpc_addr: "g".into(), http_addr: "h".into() }, "up")],
            shards: vec![ShardStatus {
                desc: ShardDesc {
                    id: 2,
                    start: vec![0x01, 0xab],
                    end: vec![],
                    epoch: 3,
                    replicas: vec![1],
                    replicas_at: 0,
                    merged: vec![],
                },
                leader: None,
                state: "active",
                qps: 1.5,
                applied_index: 9,
            }],
        };
        assert_eq!(
            cluster_json(&status),
            json!({
                "answered_by": 1,
                "meta_leader": 1,
                "nodes": [{ "id": 1, "grpc_addr": "g", "http_addr": "h", "state": "up" }],
                "shards": [{
                    "id": 2, "start": "01ab", "end": "", "epoch": 3, "leader": null, "replicas": [1],
                    "state": "active", "qps": 1.5, "applied_index": 9
                }]
            })
        );
    }

    #[test]
    fn body_limits_leave_room_above_the_document_limit() {
        let limits = Limits::default();
        assert_eq!(doc_body_bytes_max(&limits), limits.doc_bytes_max + 64 * 1024);
        assert!(batch_get_body_bytes_max(&limits) > limits.batch_ops_max * limits.id_bytes_max);
    }
}
