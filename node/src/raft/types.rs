//! The openraft type configuration shared by every group, and the commands groups replicate.
//!
//! One `TypeConfig` serves the meta group and all shard groups: a node id is a node, whichever
//! group it serves. Commands carry everything apply needs (limits, ids), so apply never reads
//! a clock, a random number or the node's configuration (DESIGN invariant 8).

use crate::catalog::{CatalogCommand, CatalogResponse};
use crate::docs::{BatchError, DocBatch, DocWriteResult};
use crate::shard::{GroupState, MergeRefused, SplitAt, SplitRefused};
use serde::{Deserialize, Serialize};

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
    /// Splits a shard group at the given keys; each child group starts on the same replicas
    /// with the inherited data (see `shard::plan_split`). Refused unless the group is still
    /// at `expected_epoch`.
    Split { expected_epoch: u64, at: Vec<SplitAt> },
    /// Freezes the group for merging into group `into` with `partner` (see `shard`):
    /// refused unless it is at `expected_epoch` with range `[start, end)`, active, and its
    /// voters are `voters`.
    Freeze { into: GroupId, partner: GroupId, expected_epoch: u64, start: Vec<u8>, end: Vec<u8>, voters: Vec<NodeId> },
    /// The merge into `into` was aborted: the group serves writes again.
    Unfreeze { into: GroupId },
    /// The merge into `into` committed: the group retires (owns nothing from here on).
    Retire { into: GroupId },
}

impl Command {
    /// True when proposing it twice has the effect of proposing it once: document batches
    /// with a request id (deduplicated at apply), collection drops and catalog commands.
    pub fn is_idempotent(&self) -> bool {
        match self {
            Command::Docs(b) => b.request_id.is_some(),
            Command::DocsMany(batches) => batches.iter().all(|b| b.request_id.is_some()),
            // A repeated split is refused by its epoch check: it never splits twice; the merge
            // steps are idempotent per merge.
            Command::DropCollectionData { .. }
            | Command::Catalog(_)
            | Command::Split { .. }
            | Command::Freeze { .. }
            | Command::Unfreeze { .. }
            | Command::Retire { .. } => true,
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
    /// A split's outcome: the parent's and children's states after it.
    Split(Result<SplitDone, SplitRefused>),
    /// A merge step's outcome: the group's state after it.
    Merge(Result<GroupState, MergeRefused>),
}

/// What a split did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitDone {
    pub parent: GroupState,
    pub children: Vec<GroupState>,
}

openraft::declare_raft_types!(
    /// openraft types for every Floe group.
    pub TypeConfig:
        D = Command,
        R = CommandResponse,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = super::snapshot::SnapshotData,
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
pub type Membership = openraft::Membership<NodeId, openraft::BasicNode>;

/// One configuration, not a joint one (no voter change is half done).
pub fn is_uniform(membership: &Membership) -> bool {
    membership.get_joint_config().len() == 1
}

/// Uniform and without learners: no membership change is under way.
pub fn is_settled(membership: &Membership) -> bool {
    is_uniform(membership) && membership.learner_ids().next().is_none()
}
