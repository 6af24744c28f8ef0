//! The raft host: every raft group replica on this node, and the ways to reach their leaders.
//!
//! Owns: the registry of running groups (one `Raft` per group, ever), proposing commands
//! (locally when this node leads the group, else forwarded to the leader), linearizable read
//! positions (batched read index), and the inbound side of the node-to-node transport.
//!
//! Invariants:
//! - at most one running `Raft` per group id on a node (two cores on one log corrupt it);
//! - inbound messages addressed to another node or cluster are refused, never applied;
//! - a proposal reports `Unavailable { retry_safe: true }` only when it certainly was not
//!   appended anywhere; a timeout is an unknown outcome.

use super::freshness::{self, Freshness, Proof};
use super::log_store::LogStore;
use super::network::{GroupNetworkFactory, SnapshotHeader};
use super::state_machine::GroupStateMachine;
use super::types::{Command, CommandResponse, GroupId, NodeId, Raft, TypeConfig};
use crate::docs::DocBatch;
use crate::signal::Progress;
use crate::storage::group_commit::GroupCommit;
use crate::storage::Engine;
use crate::transport::{Envelope, Inbound, RpcKind, Transport, TransportError};
use futures::future::BoxFuture;
use openraft::error::{ChangeMembershipError, CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Timings and bounds of raft groups, the same for every group on a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftTuning {
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Upper bound on one proposal or read-index round, forwarding and retries included.
    pub request_timeout: Duration,
    /// Entries applied between snapshots.
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log behind a snapshot (lagging followers catch up from the log
    /// instead of a snapshot while they are within this distance).
    pub logs_kept_after_snapshot: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        Self {
            // Also openraft 0.9's timeout for one AppendEntries round trip, follower fsync
            // included: keep it well above a slow fsync on a busy disk.
            heartbeat_interval_ms: 200,
            election_timeout_min_ms: 600,
            election_timeout_max_ms: 1200,
            request_timeout: Duration::from_secs(5),
            snapshot_logs_since_last: 10_000,
            logs_kept_after_snapshot: 2_000,
        }
    }
}

/// Identity and tuning of a host.
#[derive(Clone, Debug)]
pub struct HostConfig {
    pub node_id: NodeId,
    pub cluster_id: String,
    pub tuning: RaftTuning,
}

/// Why a proposal or read could not be served by the group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum GroupError {
    #[error("group {0} is not hosted on this node")]
    UnknownGroup(GroupId),
    #[error("no leader for group {group} right now: {reason}")]
    Unavailable { group: GroupId, reason: String, retry_safe: bool },
    #[error("no answer from group {group} within {timeout_ms} ms; the outcome is unknown")]
    Timeout { group: GroupId, timeout_ms: u64 },
    #[error("group {group} failed: {reason}")]
    Fatal { group: GroupId, reason: String },
}

/// A request forwarded to a group leader.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ForwardRequest {
    Propose(Command),
    ReadIndex,
    ChangeMembers(MemberChange),
}

/// A change of a group's voters, run on its leader.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberChange {
    /// Add as learner, wait until it caught up (snapshot if the log was purged), promote to
    /// voter. A node that already votes (uniform config) is left as it is. `fresh`: the node
    /// has no raft state at all; a fresh node that is already a voter is refused (a wiped
    /// disk voting with an empty log can lose committed entries).
    AddVoter { id: NodeId, addr: String, fresh: bool },
    /// Remove a voter or learner (joint consensus; a leader removing itself steps down once
    /// the change commits). Refused when it would leave the group without voters.
    Remove { id: NodeId },
}

/// The leader's answer to a `ForwardRequest`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ForwardResponse {
    Proposed {
        index: u64,
        response: CommandResponse,
    },
    ReadIndex {
        index: u64,
    },
    /// The group's voters after a membership change and the log index of the membership
    /// they come from (the current one when nothing had to change).
    MembersChanged {
        index: u64,
        voters: Vec<NodeId>,
    },
    NotLeader {
        leader: Option<(NodeId, String)>,
    },
    Failed(GroupError),
}

type ReadWaiter = oneshot::Sender<Result<u64, LocalReadError>>;

#[derive(Clone, Debug)]
enum LocalReadError {
    NotLeader(Option<(NodeId, String)>),
    Other(String),
}

/// One running group replica.
pub struct GroupHandle {
    pub group: GroupId,
    pub raft: Raft,
    applied: Arc<Progress>,
    reads: mpsc::Sender<ReadWaiter>,
    /// The newest bounded-staleness proof of this replica (see `freshness`).
    pub freshness: Freshness,
    /// Document writes waiting for the proposal batcher (see `batcher`).
    proposals: mpsc::Sender<super::batcher::Proposal>,
}

impl GroupHandle {
    /// The leader as this replica knows it (a hint: only a proposal confirms it).
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let addr = m.membership_config.membership().get_node(&id).map(|n| n.addr.clone()).unwrap_or_default();
        Some((id, addr))
    }

    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    pub fn applied_index(&self) -> u64 {
        self.applied.get()
    }

    /// Waits until this replica applied `index`, up to `timeout`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.applied.wait_at_least(index)).await.is_ok()
    }
}

/// Every group replica on this node.
pub struct RaftHost {
    pub config: HostConfig,
    engine: Engine,
    writer: GroupCommit,
    transport: Arc<dyn Transport>,
    groups: Mutex<BTreeMap<GroupId, Arc<GroupHandle>>>,
}

fn leader_of_forward(e: &openraft::error::ForwardToLeader<NodeId, BasicNode>) -> Option<(NodeId, String)> {
    e.leader_id.map(|id| (id, e.leader_node.as_ref().map(|n| n.addr.clone()).unwrap_or_default()))
}

impl RaftHost {
    pub fn new(config: HostConfig, engine: Engine, writer: GroupCommit, transport: Arc<dyn Transport>) -> Arc<Self> {
        Arc::new(Self { config, engine, writer, transport, groups: Mutex::new(BTreeMap::new()) })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Group-commit counters of this node's log writer.
    pub fn writer_stats(&self) -> std::sync::Arc<crate::storage::group_commit::GroupCommitStats> {
        self.writer.stats.clone()
    }

    pub fn group(&self, group: GroupId) -> Option<Arc<GroupHandle>> {
        self.groups.lock().ok()?.get(&group).cloned()
    }

    pub fn group_ids(&self) -> Vec<GroupId> {
        self.groups.lock().map(|g| g.keys().copied().collect()).unwrap_or_default()
    }

    fn raft_config(&self) -> Result<Arc<openraft::Config>, String> {
        let c = openraft::Config {
            cluster_name: self.config.cluster_id.clone(),
            heartbeat_interval: self.config.tuning.heartbeat_interval_ms,
            election_timeout_min: self.config.tuning.election_timeout_min_ms,
            election_timeout_max: self.config.tuning.election_timeout_max_ms,
            install_snapshot_timeout: 10_000,
            max_payload_entries: 512,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.config.tuning.snapshot_logs_since_last),
            max_in_snapshot_log_to_keep: self.config.tuning.logs_kept_after_snapshot,
            purge_batch_size: 256,
            ..Default::default()
        };
        c.validate().map(Arc::new).map_err(|e| e.to_string())
    }

    /// Starts the replica of `group` with data range `range` (idempotent).
    pub async fn start_group(
        self: &Arc<Self>,
        group: GroupId,
        range: (Vec<u8>, Vec<u8>),
    ) -> Result<Arc<GroupHandle>, GroupError> {
        if let Some(h) = self.group(group) {
            return Ok(h);
        }
        let fatal = |reason: String| GroupError::Fatal { group, reason };
        let sm = GroupStateMachine::open(group, self.engine.clone(), range).map_err(|e| fatal(e.to_string()))?;
        let applied = sm.applied_progress();
        let log = LogStore::new(group, self.engine.clone(), self.writer.clone(), applied.clone());
        let network = GroupNetworkFactory {
            group,
            node_id: self.config.node_id,
            cluster_id: self.config.cluster_id.clone(),
            transport: self.transport.clone(),
        };
        let config = self.raft_config().map_err(fatal)?;
        let raft = Raft::new(self.config.node_id, config, network, log, sm).await.map_err(|e| fatal(e.to_string()))?;
        let (reads, rx) = mpsc::channel(READ_QUEUE_MAX);
        super::runtime::spawn(read_index_loop(raft.clone(), rx));
        let (proposals, queued) = mpsc::channel(super::batcher::QUEUE_MAX);
        super::runtime::spawn(super::batcher::run(Arc::downgrade(self), group, queued));
        let handle = Arc::new(GroupHandle { group, raft, applied, reads, freshness: Freshness::default(), proposals });
        let mut groups = self.groups.lock().map_err(|_| fatal("registry poisoned".into()))?;
        // Registered under the lock: a concurrent start of the same group loses here and its
        // Raft is dropped before it ever ran a round.
        Ok(groups.entry(group).or_insert(handle).clone())
    }

    /// Initializes `group` with `members` if it has never been initialized.
    pub async fn initialize(&self, group: GroupId, members: BTreeMap<NodeId, BasicNode>) -> Result<bool, GroupError> {
        let h = self.group(group).ok_or(GroupError::UnknownGroup(group))?;
        if h.raft.is_initialized().await.map_err(|e| GroupError::Fatal { group, reason: e.to_string() })? {
            return Ok(false);
        }
        match h.raft.initialize(members).await {
            Ok(()) => Ok(true),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(false),
            Err(e) => Err(GroupError::Fatal { group, reason: e.to_string() }),
        }
    }

    /// Stops every group (for a clean shutdown; a crash needs no call).
    pub async fn shutdown(&self) {
        let groups: Vec<Arc<GroupHandle>> =
            self.groups.lock().map(|g| g.values().cloned().collect()).unwrap_or_default();
        for g in groups {
            let _ = g.raft.shutdown().await;
        }
        // Dropping the handles ends their read-index tasks.
        if let Ok(mut registry) = self.groups.lock() {
            registry.clear();
        }
    }

    async fn propose_local(&self, group: GroupId, cmd: Command) -> ForwardResponse {
        let Some(h) = self.group(group) else { return ForwardResponse::Failed(GroupError::UnknownGroup(group)) };
        let timeout = self.config.tuning.request_timeout;
        match tokio::time::timeout(timeout, h.raft.client_write(cmd)).await {
            Err(_) => ForwardResponse::Failed(GroupError::Timeout { group, timeout_ms: timeout.as_millis() as u64 }),
            Ok(Ok(resp)) => ForwardResponse::Proposed { index: resp.log_id.index, response: resp.data },
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                ForwardResponse::NotLeader { leader: leader_of_forward(&f) }
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                ForwardResponse::Failed(GroupError::Fatal { group, reason: e.to_string() })
            }
            Ok(Err(RaftError::Fatal(e))) => {
                ForwardResponse::Failed(GroupError::Unavailable { group, reason: e.to_string(), retry_safe: false })
            }
        }
    }

    /// Runs a membership change on this node, the group's leader. One deadline bounds every
    /// step; callers run it as its own task so a dropped RPC cannot cancel it halfway.
    async fn change_members_local(&self, group: GroupId, change: MemberChange) -> ForwardResponse {
        let Some(h) = self.group(group) else { return ForwardResponse::Failed(GroupError::UnknownGroup(group)) };
        let membership = h.raft.metrics().borrow().membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let uniform = membership.get_joint_config().len() == 1;
        let membership_index = h.raft.metrics().borrow().membership_config.log_id().map(|l| l.index).unwrap_or(0);
        let unchanged = |voters: &BTreeSet<NodeId>| ForwardResponse::MembersChanged {
            index: membership_index,
            voters: voters.iter().copied().collect(),
        };
        let refuse = |reason: String| ForwardResponse::Failed(GroupError::Fatal { group, reason });
        let write_error = |e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                ForwardResponse::NotLeader { leader: leader_of_forward(&f) }
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(ChangeMembershipError::InProgress(e))) => {
                ForwardResponse::Failed(GroupError::Unavailable { group, reason: e.to_string(), retry_safe: true })
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                ForwardResponse::Failed(GroupError::Fatal { group, reason: e.to_string() })
            }
            RaftError::Fatal(e) => {
                ForwardResponse::Failed(GroupError::Unavailable { group, reason: e.to_string(), retry_safe: false })
            }
        };
        let deadline = tokio::time::Instant::now() + MEMBERSHIP_TIMEOUT;
        let timed_out = || {
            ForwardResponse::Failed(GroupError::Timeout { group, timeout_ms: MEMBERSHIP_TIMEOUT.as_millis() as u64 })
        };
        let result = match change {
            MemberChange::AddVoter { id, addr, .. } if membership.get_node(&id).is_some_and(|n| n.addr != addr) => {
                let known = membership.get_node(&id).map(|n| n.addr.clone()).unwrap_or_default();
                return refuse(format!("node {id} is a member at {known}, not {addr}; a node id names one machine"));
            }
            MemberChange::AddVoter { id, fresh: true, .. } if voters.contains(&id) => {
                return refuse(format!(
                    "node {id} votes in group {group} but has no data (a wiped or replaced machine); \
                     remove node {id} and join with a new id"
                ));
            }
            MemberChange::AddVoter { id, .. } if uniform && voters.contains(&id) => return unchanged(&voters),
            MemberChange::AddVoter { id, addr, .. } => {
                if !voters.contains(&id) {
                    // Not openraft's blocking add: it calls a learner within
                    // `replication_lag_threshold` (5,000 entries) "up to date", even one that
                    // never answered. Promote only once it holds the entry that added it.
                    let add = h.raft.add_learner(id, BasicNode { addr }, false);
                    let added = match tokio::time::timeout_at(deadline, add).await {
                        Err(_) => return timed_out(),
                        Ok(Err(e)) => return write_error(e),
                        Ok(Ok(resp)) => resp.log_id.index,
                    };
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    let caught_up = h
                        .raft
                        .wait(Some(left))
                        .metrics(
                            |m| match &m.replication {
                                None => true, // no longer leader: checked below
                                Some(r) => r.get(&id).and_then(|l| l.map(|l| l.index)).is_some_and(|i| i >= added),
                            },
                            "learner caught up",
                        )
                        .await;
                    match caught_up {
                        Err(_) => return timed_out(),
                        Ok(m) if m.replication.is_none() => return ForwardResponse::NotLeader { leader: None },
                        Ok(_) => {}
                    }
                }
                // Also finishes a change left joint by an interrupted earlier attempt.
                let add = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
                tokio::time::timeout_at(deadline, h.raft.change_membership(add, false)).await
            }
            MemberChange::Remove { id } if membership.get_node(&id).is_none() => return unchanged(&voters),
            MemberChange::Remove { id } if voters.len() == 1 && voters.contains(&id) => {
                return refuse(format!("node {id} is the group's only voter; add another node first"));
            }
            MemberChange::Remove { id } if voters.contains(&id) => {
                let remove = ChangeMembers::RemoveVoters(BTreeSet::from([id]));
                tokio::time::timeout_at(deadline, h.raft.change_membership(remove, false)).await
            }
            MemberChange::Remove { id } => {
                let remove = ChangeMembers::RemoveNodes(BTreeSet::from([id]));
                tokio::time::timeout_at(deadline, h.raft.change_membership(remove, false)).await
            }
        };
        match result {
            Err(_) => timed_out(),
            Ok(Err(e)) => write_error(e),
            Ok(Ok(resp)) => {
                let voters = resp
                    .membership
                    .map(|m| m.voter_ids().collect::<Vec<_>>())
                    .unwrap_or_else(|| voters.iter().copied().collect());
                ForwardResponse::MembersChanged { index: resp.log_id.index, voters }
            }
        }
    }

    /// `change_members_local` as its own task of this node: an RPC or caller that gives up
    /// does not cancel a change between its joint and its final step.
    async fn change_members_detached(self: &Arc<Self>, group: GroupId, change: MemberChange) -> ForwardResponse {
        let host = self.clone();
        match super::runtime::spawn(async move { host.change_members_local(group, change).await }).await {
            Ok(resp) => resp,
            Err(e) => ForwardResponse::Failed(GroupError::Unavailable {
                group,
                reason: format!("membership change task ended: {e}"),
                retry_safe: false,
            }),
        }
    }

    async fn read_index_local(&self, group: GroupId) -> ForwardResponse {
        let Some(h) = self.group(group) else { return ForwardResponse::Failed(GroupError::UnknownGroup(group)) };
        let (tx, rx) = oneshot::channel();
        if h.reads.try_send(tx).is_err() {
            return ForwardResponse::Failed(GroupError::Unavailable {
                group,
                reason: "read queue full".into(),
                retry_safe: true,
            });
        }
        let timeout = self.config.tuning.request_timeout;
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => ForwardResponse::Failed(GroupError::Timeout { group, timeout_ms: timeout.as_millis() as u64 }),
            Ok(Err(_)) => ForwardResponse::Failed(GroupError::Unavailable {
                group,
                reason: "group stopped".into(),
                retry_safe: true,
            }),
            Ok(Ok(Ok(index))) => ForwardResponse::ReadIndex { index },
            Ok(Ok(Err(LocalReadError::NotLeader(leader)))) => ForwardResponse::NotLeader { leader },
            Ok(Ok(Err(LocalReadError::Other(reason)))) => {
                ForwardResponse::Failed(GroupError::Unavailable { group, reason, retry_safe: true })
            }
        }
    }

    /// Runs `req` on the group leader: here if this node leads, else forwarded. Retries with
    /// the leader hint it learns, bounded by the request timeout.
    async fn on_leader(self: &Arc<Self>, group: GroupId, req: ForwardRequest) -> Result<ForwardResponse, GroupError> {
        let timeout = match req {
            ForwardRequest::ChangeMembers(_) => MEMBERSHIP_TIMEOUT,
            _ => self.config.tuning.request_timeout,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut hint: Option<(NodeId, String)> = None;
        let mut attempt = 0u32;
        let mut retry_safe = true;
        loop {
            attempt += 1;
            let h = self.group(group).ok_or(GroupError::UnknownGroup(group))?;
            let target = hint.take().or_else(|| h.leader());
            // Whether this attempt reached a raft core that may have appended a proposal.
            let mut reached = true;
            let resp = match target {
                Some((id, _)) if id == self.config.node_id => match &req {
                    ForwardRequest::Propose(cmd) => self.propose_local(group, cmd.clone()).await,
                    ForwardRequest::ReadIndex => self.read_index_local(group).await,
                    ForwardRequest::ChangeMembers(change) => self.change_members_detached(group, change.clone()).await,
                },
                Some((id, addr)) if !addr.is_empty() => {
                    let env = Envelope {
                        cluster_id: self.config.cluster_id.clone(),
                        group_id: group,
                        from_node: self.config.node_id,
                        to_node: id,
                    };
                    let payload =
                        serde_json::to_vec(&req).map_err(|e| GroupError::Fatal { group, reason: e.to_string() })?;
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match self.transport.call(addr, env, RpcKind::Forward, payload, left).await {
                        Ok(bytes) => serde_json::from_slice(&bytes)
                            .map_err(|e| GroupError::Fatal { group, reason: format!("bad forward reply: {e}") })?,
                        Err(TransportError::Unreachable(r)) | Err(TransportError::Refused(r)) => {
                            reached = false;
                            ForwardResponse::Failed(GroupError::Unavailable { group, reason: r, retry_safe: true })
                        }
                        Err(e) => {
                            // The leader may have received it: a write's outcome is now unknown.
                            retry_safe = false;
                            ForwardResponse::Failed(GroupError::Unavailable {
                                group,
                                reason: e.to_string(),
                                retry_safe: false,
                            })
                        }
                    }
                }
                _ => {
                    reached = false;
                    ForwardResponse::NotLeader { leader: None }
                }
            };
            // openraft answers ForwardToLeader also for an appended entry that a new leader
            // truncated — or may still commit: after such an answer a proposal's outcome is
            // unknown (found by review).
            let proposal = matches!(req, ForwardRequest::Propose(_));
            let ambiguous = matches!(
                resp,
                ForwardResponse::NotLeader { .. }
                    | ForwardResponse::Failed(GroupError::Unavailable { retry_safe: false, .. })
            );
            if proposal && reached && ambiguous {
                retry_safe = false;
            }
            // A write that is not idempotent is retried only while every attempt certainly
            // failed to reach a log; an idempotent one (deduplicated at apply) always may be.
            let idempotent = match &req {
                ForwardRequest::Propose(cmd) => cmd.is_idempotent(),
                ForwardRequest::ReadIndex | ForwardRequest::ChangeMembers(_) => true,
            };
            let retry = match &resp {
                ForwardResponse::NotLeader { leader } => {
                    hint = leader.clone();
                    idempotent || retry_safe
                }
                ForwardResponse::Failed(GroupError::Unavailable { retry_safe: true, .. }) => true,
                ForwardResponse::Failed(GroupError::Unavailable { retry_safe: false, .. }) => idempotent,
                _ => false,
            };
            if !retry {
                return match resp {
                    ForwardResponse::NotLeader { .. } => {
                        Err(GroupError::Unavailable { group, reason: "no leader elected".into(), retry_safe })
                    }
                    other => Ok(other),
                };
            }
            let backoff = Duration::from_millis((20u64 << attempt.min(5)).min(500));
            if tokio::time::Instant::now() + backoff >= deadline {
                let reason = match resp {
                    ForwardResponse::Failed(e) => e.to_string(),
                    _ => "no leader elected".to_string(),
                };
                return Err(GroupError::Unavailable { group, reason, retry_safe });
            }
            tokio::time::sleep(backoff).await;
        }
    }

    /// Proposes `cmd` to `group` and returns the applied index and the state machine's answer.
    pub async fn propose(self: &Arc<Self>, group: GroupId, cmd: Command) -> Result<(u64, CommandResponse), GroupError> {
        match self.on_leader(group, ForwardRequest::Propose(cmd)).await? {
            ForwardResponse::Proposed { index, response } => Ok((index, response)),
            ForwardResponse::Failed(e) => Err(e),
            ForwardResponse::ReadIndex { .. }
            | ForwardResponse::MembersChanged { .. }
            | ForwardResponse::NotLeader { .. } => {
                Err(GroupError::Unavailable { group, reason: "no leader elected".into(), retry_safe: true })
            }
        }
    }

    /// Proposes a document batch through the group's proposal batcher (it may share a log
    /// entry with concurrent batches). Returns the entry's index and this batch's answer.
    pub async fn propose_docs(
        self: &Arc<Self>,
        group: GroupId,
        batch: DocBatch,
    ) -> Result<(u64, CommandResponse), GroupError> {
        let h = self.group(group).ok_or(GroupError::UnknownGroup(group))?;
        let (tx, rx) = oneshot::channel();
        h.proposals.try_send((batch, tx)).map_err(|e| GroupError::Unavailable {
            group,
            reason: match e {
                mpsc::error::TrySendError::Full(_) => "too many writes queued".into(),
                mpsc::error::TrySendError::Closed(_) => "group stopped".into(),
            },
            retry_safe: true,
        })?;
        // Bounded: queueing plus the proposal's own retries. A dropped reply means the batcher
        // stopped with the proposal possibly sent; a timeout leaves it possibly proposed.
        let timeout = 2 * self.config.tuning.request_timeout;
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(GroupError::Timeout { group, timeout_ms: timeout.as_millis() as u64 }),
            Ok(Err(_)) => Err(GroupError::Unavailable { group, reason: "group stopped".into(), retry_safe: false }),
            Ok(Ok(result)) => result,
        }
    }

    /// Changes the voters of `group` on its leader (forwarded when another node leads).
    /// Returns the log index of the resulting membership and its voters.
    pub async fn change_members(
        self: &Arc<Self>,
        group: GroupId,
        change: MemberChange,
    ) -> Result<(u64, Vec<NodeId>), GroupError> {
        match self.on_leader(group, ForwardRequest::ChangeMembers(change)).await? {
            ForwardResponse::MembersChanged { index, voters } => Ok((index, voters)),
            ForwardResponse::Failed(e) => Err(e),
            _ => Err(GroupError::Unavailable { group, reason: "no leader elected".into(), retry_safe: true }),
        }
    }

    /// A linearizable read position: the leader confirms its leadership (batched read index),
    /// then this replica waits until it applied that position. Returns the position.
    /// Every successful call also records a freshness proof for bounded reads.
    pub async fn linearizable_position(self: &Arc<Self>, group: GroupId) -> Result<u64, GroupError> {
        // Taken before the request leaves: the leader confirms leadership after receiving
        // it, so the read index covers every write committed before this instant.
        let as_of = tokio::time::Instant::now();
        let index = match self.on_leader(group, ForwardRequest::ReadIndex).await? {
            ForwardResponse::ReadIndex { index } => index,
            ForwardResponse::Failed(e) => return Err(e),
            _ => return Err(GroupError::Unavailable { group, reason: "no leader elected".into(), retry_safe: true }),
        };
        let h = self.group(group).ok_or(GroupError::UnknownGroup(group))?;
        h.freshness.record(Proof { index, as_of });
        if h.wait_applied(index, self.config.tuning.request_timeout).await {
            Ok(index)
        } else {
            Err(GroupError::Unavailable {
                group,
                reason: format!("replica did not apply index {index} in time"),
                retry_safe: true,
            })
        }
    }

    /// A read position whose state is no older than `bound`: this replica's applied index
    /// when its freshness proof allows (no network round), else a new proof (one read-index
    /// round through the leader; fails when the leader cannot be reached). Returns the
    /// position and how it was obtained.
    pub async fn bounded_position(
        self: &Arc<Self>,
        group: GroupId,
        bound: Duration,
    ) -> Result<(u64, BoundedPath), GroupError> {
        let h = self.group(group).ok_or(GroupError::UnknownGroup(group))?;
        let now = tokio::time::Instant::now();
        match freshness::decide(h.freshness.newest(), h.applied_index(), now, bound) {
            freshness::Decision::Serve => return Ok((h.applied_index(), BoundedPath::Local)),
            freshness::Decision::WaitApplied { index, deadline } => {
                let deadline = deadline.min(now + self.config.tuning.request_timeout);
                if tokio::time::timeout_at(deadline, h.applied.wait_at_least(index)).await.is_ok() {
                    return Ok((h.applied_index(), BoundedPath::WaitedApply));
                }
            }
            freshness::Decision::Refresh => {}
        }
        let index = self.linearizable_position(group).await?;
        Ok((index, BoundedPath::Refreshed))
    }

    /// Every group replica on this node, from its raft metrics (for `floe ctl status`).
    pub fn replica_status(&self) -> Vec<ReplicaStatus> {
        let mut out = Vec::new();
        for group in self.group_ids() {
            let Some(h) = self.group(group) else { continue };
            let m = h.raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            let matched = m
                .replication
                .as_ref()
                .map(|r| r.iter().map(|(id, log)| (*id, log.map(|l| l.index).unwrap_or(0))).collect())
                .unwrap_or_default();
            out.push(ReplicaStatus {
                group,
                role: match m.state {
                    ServerState::Leader => "leader",
                    ServerState::Follower => "follower",
                    ServerState::Candidate => "candidate",
                    ServerState::Learner => "learner",
                    ServerState::Shutdown => "shutdown",
                },
                term: m.current_term,
                leader: m.current_leader,
                last_log_index: m.last_log_index.unwrap_or(0),
                applied_index: h.applied_index(),
                voters: membership.voter_ids().collect(),
                learners: membership.learner_ids().collect(),
                matched,
            });
        }
        out
    }

    fn check_envelope(&self, env: &Envelope) -> Result<Arc<GroupHandle>, String> {
        if env.cluster_id != self.config.cluster_id {
            return Err(format!("message for cluster {:?}, this is {:?}", env.cluster_id, self.config.cluster_id));
        }
        if env.to_node != self.config.node_id {
            return Err(format!("message for node {}, this is node {}", env.to_node, self.config.node_id));
        }
        self.group(env.group_id)
            .ok_or_else(|| format!("group {} is not running on node {}", env.group_id, self.config.node_id))
    }
}

/// One group replica as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub group: GroupId,
    pub role: &'static str,
    pub term: u64,
    pub leader: Option<NodeId>,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// On the leader: the log index each replica matched.
    pub matched: BTreeMap<NodeId, u64>,
}

/// How a bounded-staleness read found its position (for metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoundedPath {
    /// The replica's proof covered it: local state, no waiting.
    Local,
    /// The proof was fresh enough but the replica had to apply up to it first.
    WaitedApply,
    /// A new proof was taken through the leader (one read-index round).
    Refreshed,
}

/// Bound on one membership change, including a learner's catch-up (snapshot streaming).
pub const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(120);

/// Bound on queued strong reads per group.
pub const READ_QUEUE_MAX: usize = 16_384;

/// Serves queued readers in rounds: one `ensure_linearizable` per round answers every reader
/// that was queued before the round started.
async fn read_index_loop(raft: Raft, mut rx: mpsc::Receiver<ReadWaiter>) {
    while let Some(first) = rx.recv().await {
        let mut waiters = vec![first];
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        let result = match raft.ensure_linearizable().await {
            Ok(log_id) => Ok(log_id.map(|l| l.index).unwrap_or(0)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(LocalReadError::NotLeader(leader_of_forward(&f)))
            }
            Err(e) => Err(LocalReadError::Other(e.to_string())),
        };
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(v).map_err(|e| e.to_string())
}

impl Inbound for Arc<RaftHost> {
    fn handle(&self, env: Envelope, kind: RpcKind, payload: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>, String>> {
        let host = self.clone();
        Box::pin(async move {
            let h = host.check_envelope(&env)?;
            match kind {
                RpcKind::AppendEntries => {
                    let req = serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
                    encode(&h.raft.append_entries(req).await)
                }
                RpcKind::Vote => {
                    let req = serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
                    encode(&h.raft.vote(req).await)
                }
                RpcKind::Forward => {
                    let req: ForwardRequest = serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
                    let resp = match req {
                        ForwardRequest::Propose(cmd) => host.propose_local(env.group_id, cmd).await,
                        ForwardRequest::ReadIndex => host.read_index_local(env.group_id).await,
                        ForwardRequest::ChangeMembers(change) => {
                            host.change_members_detached(env.group_id, change).await
                        }
                    };
                    encode(&resp)
                }
            }
        })
    }

    fn handle_snapshot(
        &self,
        env: Envelope,
        header: Vec<u8>,
        data: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, String>> {
        let host = self.clone();
        Box::pin(async move {
            let h = host.check_envelope(&env)?;
            let header: SnapshotHeader = serde_json::from_slice(&header).map_err(|e| e.to_string())?;
            let snapshot =
                openraft::Snapshot::<TypeConfig> { meta: header.meta, snapshot: Box::new(Cursor::new(data)) };
            encode(&h.raft.install_full_snapshot(header.vote, snapshot).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docs::{DocAction, DocOp, Limits};
    use crate::storage::mem::MemEngine;
    use crate::storage::{Cf, WriteBatch};
    use openraft::{CommittedLeaderId, LogId, Membership, StoredMembership, Vote};

    /// The groundwork a split needs (issue 5): a group whose log starts above an inherited
    /// position. Its state is seeded as if a snapshot at `base` had been installed (purged
    /// log, applied, membership and a vote in `base`'s term); the group then elects, and
    /// every new entry — so every new document version — is above `base`.
    #[tokio::test]
    async fn a_group_can_start_above_an_inherited_log_position() {
        let engine: Engine = Arc::new(MemEngine::new());
        let writer = GroupCommit::inline(engine.clone());
        let config = HostConfig { node_id: 1, cluster_id: "t".into(), tuning: RaftTuning::default() };
        let host =
            RaftHost::new(config, engine.clone(), writer, Arc::new(crate::transport::grpc::GrpcTransport::new()));
        let group = 7;
        let base = LogId::new(CommittedLeaderId::new(5, 1), 1_000);
        let members = Membership::new(
            vec![BTreeSet::from([1u64])],
            BTreeMap::from([(1u64, BasicNode { addr: "127.0.0.1:1".into() })]),
        );
        let meta = |field: &str| crate::keys::group_meta_key(group, field);
        let mut seed = WriteBatch::new();
        seed.put(Cf::RaftMeta, meta("purged"), serde_json::to_vec(&Some(base)).unwrap());
        seed.put(Cf::RaftMeta, meta("applied"), serde_json::to_vec(&Some(base)).unwrap());
        let stored = StoredMembership::new(Some(base), members);
        seed.put(Cf::RaftMeta, meta("membership"), serde_json::to_vec(&stored).unwrap());
        seed.put(Cf::RaftMeta, meta("vote"), serde_json::to_vec(&Vote::new(5, 1)).unwrap());
        engine.write(seed, true).unwrap();

        let range = crate::keys::initial_group_range(crate::keys::FIRST_SHARD);
        let h = host.start_group(group, range).await.expect("group starts");
        h.raft.trigger().elect().await.expect("elect");
        let leader = h.raft.wait(Some(Duration::from_secs(10))).current_leader(1, "leader").await;
        assert!(leader.is_ok(), "the seeded group elects itself: {leader:?}");
        let batch = DocBatch {
            tenant: "t".into(),
            ops: vec![DocOp {
                collection: "c".into(),
                id: "d".into(),
                action: DocAction::Put { json: "{}".into(), expected: None },
            }],
            limits: Limits::default(),
            request_id: Some("r".into()),
        };
        let (index, response) = host.propose(group, Command::Docs(batch)).await.expect("write");
        assert!(index > 1_000, "new entries go above the inherited position: {index}");
        match response {
            CommandResponse::Docs(Ok(results)) => assert!(results[0].version > 1_000, "{results:?}"),
            other => panic!("unexpected {other:?}"),
        }
        host.shutdown().await;
    }
}
