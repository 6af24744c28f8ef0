//! Rust gRPC client for Floe, a Raft-replicated JSON document store.
//!
//! ```no_run
//! # async fn demo() -> floe_client::Result<()> {
//! use floe_client::{Client, ReadConsistency};
//! let client = Client::connect(["127.0.0.1:7700"]).await?;
//! let users = client.collection("users");
//! let outcome = users.put("alice", &serde_json::json!({"name": "Alice"})).await?;
//! // Reads default to read-your-writes: this client sees its own write from any node.
//! let doc = users.get::<serde_json::Value>("alice").await?;
//! assert_eq!(doc.map(|d| d.version), Some(outcome.version));
//! let _ = users.get_with::<serde_json::Value>("alice", ReadConsistency::Eventual).await?;
//! # Ok(()) }
//! ```
//!
//! Codemap:
//! - `client`: [`Client`], lazy channels, the single request loop (routing, per-attempt
//!   timeout, retries, leader learning).
//! - `config`: [`ClientBuilder`] and defaults.
//! - `collection`: [`Collection`], document reads and writes.
//! - `batch`: [`Batch`], atomic multi-document writes.
//! - `admin`: collections and cluster status on [`Client`].
//! - `error`: [`Error`] and the mapping from gRPC statuses (the server's error contract).
//! - `retry`: [`RetryPolicy`], full-jitter backoff, which errors allow which retries.
//! - `routing`: leader cache and endpoint rotation (pure).
//! - `session`: [`SessionTokens`], the newest position per shard group (read-your-writes).
//! - `endpoint`: address normalization (pure).
//! - `types`: [`Document`], [`WriteOutcome`], [`ReadConsistency`], [`CollectionInfo`].
//!
//! Invariant: a write is never sent twice unless the first attempt provably did not execute
//! (`floe-retry-safe: true` from the server, or no connection could be made). Timeouts and
//! connections broken mid-request surface as errors whose outcome is unknown
//! ([`Error::is_outcome_unknown`]).

mod admin;
mod batch;
mod client;
mod collection;
mod config;
mod endpoint;
mod error;
mod retry;
mod routing;
mod session;
mod types;

pub use admin::{ClusterStatus, ReplicaStatus};
pub use batch::Batch;
pub use client::{doc_key, Client};
pub use collection::Collection;
pub use config::{ClientBuilder, ClientConfig, CONNECT_TIMEOUT_DEFAULT, REQUEST_TIMEOUT_DEFAULT, TENANT_DEFAULT};
pub use endpoint::normalize_endpoint;
pub use error::{Error, Result, CURRENT_VERSION_KEY, ERROR_CODE_KEY, RETRY_SAFE_KEY};
pub use retry::RetryPolicy;
pub use session::SessionTokens;
pub use types::{CollectionInfo, Document, ReadConsistency, WriteOutcome};

/// The generated `floe.v1` messages, for callers that need the raw types.
pub use floe_proto::v1 as proto;
