//! The openraft type configuration shared by every group, and the commands groups replicate.
//!
//! One `TypeConfig` serves the meta group and all shard groups: a node id is a node, whichever
//! group it serves. Commands carry everything apply needs (limits, ids), so apply never reads
//! a clock, a random number or the node's configuration (DESIGN invariant 8).

use crate::catalog::{CatalogCommand, CatalogResponse};
use crate::docs::{BatchError, DocBatch, DocWriteResult};
use serde::{Deserialize, Serialize};
use std::io::Cursor;

/// Node id type (shared across groups).
pub type NodeId = u64;
/// Raft group id (0 = meta group).
pub type GroupId = u64;

/// A command replicated through a group's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Atomic document writes (shard groups).
    Docs(DocBatch),
    /// Independent atomic document batches proposed as one log entry (the proposal batcher's
    /// unit: one fsync and one replication round for many requests). The batches touch
    /// disjoint documents; each is applied, deduplicated and answered on its own.
    DocsMany(Vec<DocBatch>),
    /// Deletes every document of one collection (shard groups), after the meta group dropped it.
    DropCollectionData { tenant: String, collection: String },
    /// Catalog changes (meta group only).
    Catalog(CatalogCommand),
}

impl Command {
    /// True when proposing it twice has the effect of proposing it once: document batches
    /// with a request id (deduplicated at apply), collection drops and catalog commands.
    pub fn is_idempotent(&self) -> bool {
        match self {
            Command::Docs(b) => b.request_id.is_some(),
            Command::DocsMany(batches) => batches.iter().all(|b| b.request_id.is_some()),
            Command::DropCollectionData { .. } | Command::Catalog(_) => true,
        }
    }
}

/// The result of applying one log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResponse {
    /// Blank and membership entries.
    None,
    Docs(Result<Vec<DocWriteResult>, BatchError>),
    Dropped,
    Catalog(CatalogResponse),
    /// The command was sent to a group that does not own it (refused deterministically).
    WrongGroup(String),
    /// One answer per batch of a `DocsMany`, in order.
    Many(Vec<CommandResponse>),
    /// Refused deterministically, certainly not applied; safe to propose again (a batch of a
    /// `DocsMany` that touched a document an earlier batch of the entry wrote).
    Retry(String),
}

openraft::declare_raft_types!(
    /// openraft types for every Floe group.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = crate::raft::runtime::FloeRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
