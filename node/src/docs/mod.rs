//! Documents: the write commands a shard applies, their errors, limits, and the pure apply
//! logic (no I/O beyond the `read` callback it is given).
//!
//! Invariants:
//! - a document's version is the raft log index of the entry that last wrote it, so it
//!   strictly increases with every write to the document (DESIGN invariant 3);
//! - a batch applies all of its operations or none (atomic within a shard);
//! - apply is deterministic: it depends only on the entry, its index and the stored state.

pub mod apply;
pub mod limits;

pub use apply::{apply_batch, StoredDoc};
pub use limits::Limits;

use serde::{Deserialize, Serialize};

/// The tenant used when a request names none.
pub const DEFAULT_TENANT: &str = "default";

/// What one operation of a batch does to its document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DocAction {
    /// Upsert. With `expected`, only replaces that stored version.
    Put { json: String, expected: Option<u64> },
    /// Insert; fails if the document exists.
    Create { json: String },
    /// Replace an existing document (optionally only that version).
    Replace { json: String, expected: Option<u64> },
    /// RFC 7396 merge patch of an existing document.
    MergePatch { patch: String, expected: Option<u64> },
    /// RFC 6902 JSON patch of an existing document.
    JsonPatch { patch: String, expected: Option<u64> },
    /// Delete an existing document (optionally only that version).
    Delete { expected: Option<u64> },
}

/// One operation of a batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocOp {
    pub collection: String,
    pub id: String,
    pub action: DocAction,
}

/// An atomic group of writes within one tenant and one shard. The leader fixes the limits
/// into the entry so every replica checks patched results identically.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocBatch {
    pub tenant: String,
    pub ops: Vec<DocOp>,
    pub limits: Limits,
    /// Unique per client request. A batch whose id was applied before (a retried proposal)
    /// is not applied again: the stored answer is returned instead.
    #[serde(default)]
    pub request_id: Option<String>,
}

/// Result of one applied operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocWriteResult {
    pub collection: String,
    pub id: String,
    /// Version written (for a delete: the index of the delete).
    pub version: u64,
    /// The document after a patch (None for other actions).
    pub json: Option<String>,
}

/// Why a document operation was refused. Nothing is stored when any of these is returned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum DocError {
    #[error("malformed JSON: {0}")]
    InvalidJson(String),
    #[error("a document must be a JSON object")]
    NotAnObject,
    #[error("document is {size_bytes} bytes, the limit is {limit_bytes}")]
    TooLarge { size_bytes: usize, limit_bytes: usize },
    #[error("JSON nesting depth {depth} exceeds the limit of {limit}")]
    TooDeep { depth: usize, limit: usize },
    #[error("invalid document id: {0}")]
    InvalidId(String),
    #[error("invalid name: {0}")]
    InvalidName(String),
    #[error("invalid patch: {0}")]
    InvalidPatch(String),
    #[error("JSON patch test operation failed: {0}")]
    PatchTestFailed(String),
    #[error("document not found")]
    NotFound,
    #[error("document already exists (version {version})")]
    AlreadyExists { version: u64 },
    #[error("version mismatch: expected {expected}, stored {}", actual.map(|v| v.to_string()).unwrap_or_else(|| "none (document absent)".into()))]
    VersionMismatch { expected: u64, actual: Option<u64> },
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
}

/// A batch was refused because operation `op_index` failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("operation {op_index} ({collection}/{id}): {error}")]
pub struct BatchError {
    pub op_index: usize,
    pub collection: String,
    pub id: String,
    pub error: DocError,
}
