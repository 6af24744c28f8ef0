//! The raft host: every raft group replica on this node, and the ways to reach their leaders.
//!
//! Owns: the registry of group replicas (running, or dormant: on disk but not running, after
//! hibernation or since start), their lifecycle (start, wake, hibernate, one `Raft` per group
//! at a time), proposing commands (locally when this node leads the group, else forwarded to
//! the leader), linearizable read positions (batched read index), and starting the children
//! a split creates.
//!
//! Invariants:
//! - at most one running `Raft` per group id on a node (two cores on one log corrupt it): a
//!   group starts and stops only under its lifecycle lock;
//! - a dormant group costs no task, timer or message; anything that needs it wakes it;
//! - a proposal reports `Unavailable { retry_safe: true }` only when it certainly was not
//!   appended anywhere; a timeout is an unknown outcome.

use super::freshness::{self, Freshness, Proof};
use super::local_shards::{GroupEvent, LocalShards};
use super::log_store::LogStore;
use super::network::GroupNetworkFactory;
use super::state_machine::{self, GroupStateMachine, SmContext};
use super::types::{Command, CommandResponse, GroupId, NodeId, Raft};
use crate::catalog::{CatalogCommand, CatalogReader, ShardDesc, ShardMapCache};
use crate::docs::DocBatch;
use crate::keys;
use crate::signal::Progress;
use crate::storage::group_commit::GroupCommit;
use crate::storage::{Cf, Engine};
use crate::transport::{Envelope, RpcKind, Transport, TransportError};
use openraft::error::{ChangeMembershipError, CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// A shard group whose leader saw no request for this long hibernates: every replica
    /// stops (no task, timer or message) until a request or a raft message wakes it.
    /// `None`: never.
    pub hibernate_after: Option<Duration>,
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
            hibernate_after: Some(Duration::from_secs(30)),
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

/// A request forwarded to a group leader, or a leader's request to a replica.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ForwardRequest {
    Propose(Command),
    ReadIndex,
    ChangeMembers(MemberChange),
    /// From the group leader to a follower: stop if your log and state are exactly at
    /// `last_log_index` of `term` (see `hibernate`).
    Hibernate {
        term: u64,
        last_log_index: u64,
    },
    /// Create an empty replica of the group here if there is none (before the group adds
    /// this node: a join or a move).
    OpenReplica,
    /// A node's request rates and sampled keys per group, for the placement driver on the
    /// meta leader (sent on the meta group's envelope).
    ReportLoad {
        groups: Vec<(GroupId, f64, Vec<Vec<u8>>)>,
        /// The groups the reporting node leads (for leader balance).
        #[serde(default)]
        leading: Vec<GroupId>,
    },
    /// To the group leader: hand leadership to voter `to` (see `moves`).
    TransferLeader {
        to: NodeId,
    },
    /// To a voter: campaign now (the last step of a leader transfer).
    Elect,
    /// To the group leader: its current membership (voters and learners).
    Members,
    /// To a replica: start yours if it is hibernating (another replica is waking for a
    /// request). Never creates a replica.
    Wake,
    /// `Wake` from a node that led the group before its process restarted and is about to
    /// campaign for it: a dormant replica whose committed vote names the sender first keeps
    /// the vote but drops the commit (`RaftHost::release_lease_of`), so it grants the vote.
    WakeForCampaign,
    /// From a node that just restarted to every other member: it gave up its leadership of
    /// `groups` (`forget_leadership_after_restart`); a dormant replica of one whose
    /// committed vote names the sender drops the commit (`release_leases_of`), so whichever
    /// replica a request wakes first can win the group in one vote round.
    LeaderRestarted {
        groups: Vec<GroupId>,
    },
    /// From the meta leader to every node: `node` stopped reporting (`liveness`); wake your
    /// hibernated replicas of the groups it led, so they elect a new leader now.
    PeerDown {
        node: NodeId,
    },
    /// An API call another node cannot serve itself (the API layer's encoded request): a read
    /// of a shard with no replica there, a merge of shards hosted here (see
    /// `RaftHost::serve_api_calls`).
    ApiCall(String),
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
    /// The answer to `Hibernate`: whether the replica stopped.
    Hibernated(bool),
    /// Done (`OpenReplica`, `ReportLoad`, `Elect`).
    Done,
    /// The group's leader after `TransferLeader`.
    Leader(NodeId),
    /// The answer to `Members`: the leader's membership, its log index and every node in it.
    Members {
        index: u64,
        nodes: Vec<NodeId>,
    },
    /// The answer to `ApiCall`: the API layer's encoded reply.
    ApiCall(String),
}

/// Serves an API call another node forwarded: the API layer's encoded request in, its
/// encoded reply out. The API layer registers it once (`RaftHost::serve_api_calls`); the
/// host only carries the bytes.
pub type ApiCallHandler = Arc<dyn Fn(String) -> futures::future::BoxFuture<'static, String> + Send + Sync>;

/// One shard's load across the cluster (the sum of every node's latest report).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShardLoad {
    pub qps: f64,
    /// Sampled request keys from every reporting node.
    pub sample: Vec<Vec<u8>>,
}

/// A node's load report older than this no longer counts.
pub const LOAD_REPORT_TTL: Duration = Duration::from_secs(5);

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
    /// When a request last used this replica (ms on the host's clock), for hibernation.
    last_request_ms: AtomicU64,
    /// A leader transfer is running: proposals and read-index rounds wait (they would keep
    /// the followers' leader lease alive and the transfer's election would fail).
    pub(super) transferring: AtomicBool,
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

    /// When a request last used this replica (ms on the host's clock).
    pub fn last_request_ms(&self) -> u64 {
        self.last_request_ms.load(Ordering::Acquire)
    }
}

/// Every group replica on this node.
pub struct RaftHost {
    pub config: HostConfig,
    engine: Engine,
    writer: GroupCommit,
    pub(super) transport: Arc<dyn Transport>,
    /// Running replicas.
    groups: Mutex<BTreeMap<GroupId, Arc<GroupHandle>>>,
    /// Replicas with raft state on this node that are not running (hibernated, or not
    /// needed since the node started).
    dormant: Mutex<BTreeSet<GroupId>>,
    /// Groups this node led when its process last stopped (`forget_leadership_after_restart`)
    /// and has not started since; a request that wakes one campaigns at once.
    led_before_restart: Mutex<BTreeSet<GroupId>>,
    /// Since when each empty replica the catalog does not place here was seen so
    /// (`removed_replicas`).
    pub(super) empty_unlisted_since: Mutex<BTreeMap<GroupId, tokio::time::Instant>>,
    /// Split children applied here and not started yet (hosted: a request starts one).
    born: Mutex<BTreeSet<GroupId>>,
    /// One lock per group: starting and stopping a group happen under it.
    lifecycle: Mutex<BTreeMap<GroupId, Arc<tokio::sync::Mutex<()>>>>,
    /// Every local replica's applied state (range, epoch).
    pub local: Arc<LocalShards>,
    /// This node's copy of the shard map (the meta group invalidates it).
    pub catalog: CatalogReader,
    catalog_cache: Arc<ShardMapCache>,
    /// The host's clock origin (request timestamps are ms since it).
    started: tokio::time::Instant,
    /// Messages received from peers (for `/metrics`: an idle cluster should receive none).
    pub(super) messages_received: AtomicU64,
    /// Set while a node without raft state joins (`hold_votes`): it grants no vote until the
    /// cluster confirmed the join, since a wiped machine under a voter's old id would vote
    /// with an empty log.
    votes_held: std::sync::atomic::AtomicBool,
    /// Dormant replicas started again.
    wakes: AtomicU64,
    /// Dormant replicas woken because the node that led them went down.
    peer_down_wakes: AtomicU64,
    /// Replica starts and the wall time they took (µs), for `floe_group_start_seconds`.
    starts: AtomicU64,
    start_micros: AtomicU64,
    /// The latest load report of every node (kept on every node; used on the meta leader).
    load_reports: Mutex<BTreeMap<NodeId, LoadReport>>,
    /// Serves API calls other nodes forward (set by the API layer).
    api_calls: std::sync::OnceLock<ApiCallHandler>,
}

/// One node's latest load report: when it came, each group's rate and sampled keys, and the
/// groups the node leads.
struct LoadReport {
    at: tokio::time::Instant,
    groups: Vec<(GroupId, f64, Vec<Vec<u8>>)>,
    leading: Vec<GroupId>,
}

/// Runs `work` (a leader-side step that must not stop halfway) as its own task of this node,
/// so a caller that gives up does not cancel it. A task that ended without an answer is
/// `Unavailable` with `retry_safe`.
pub(super) async fn run_detached(
    group: GroupId,
    what: &str,
    retry_safe: bool,
    work: impl std::future::Future<Output = ForwardResponse> + Send + 'static,
) -> ForwardResponse {
    match super::runtime::spawn(work).await {
        Ok(resp) => resp,
        Err(e) => ForwardResponse::Failed(GroupError::Unavailable {
            group,
            reason: format!("{what} task ended: {e}"),
            retry_safe,
        }),
    }
}

/// Builds a snapshot of `h`'s group at its applied index and purges its log through it, so
/// a replica added next can only catch up from a snapshot. Polls (no metrics waits: the
/// simulator's replay) until the purge shows or `deadline`.
async fn purge_through_applied(h: &GroupHandle, deadline: tokio::time::Instant) -> Result<(), String> {
    let metrics = || h.raft.metrics().borrow().clone();
    let applied = metrics().last_applied.map_or(0, |l| l.index);
    let purged = || metrics().purged.map_or(0, |l| l.index);
    if purged() >= applied {
        return Ok(());
    }
    let fatal = |e: openraft::error::Fatal<NodeId>| format!("group {} stopped: {e}", h.group);
    if metrics().snapshot.map_or(0, |l| l.index) < applied {
        h.raft.trigger().snapshot().await.map_err(fatal)?;
        while metrics().snapshot.map_or(0, |l| l.index) < applied {
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("no snapshot of group {} at index {applied} in time", h.group));
            }
            tokio::time::sleep(PURGE_POLL).await;
        }
    }
    h.raft.trigger().purge_log(applied).await.map_err(fatal)?;
    while purged() < applied {
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("group {}'s log not purged through {applied} in time", h.group));
        }
        tokio::time::sleep(PURGE_POLL).await;
    }
    Ok(())
}

/// How often adding a replica polls for its snapshot and purge.
const PURGE_POLL: Duration = Duration::from_millis(5);

/// How often a request polls a replica that just woke for its leader.
pub(super) const LEADER_POLL: Duration = Duration::from_millis(1);
/// Attempts `on_leader` retries at once (following a named leader, or polling a local
/// replica in an election for its winner) before it backs off.
const REDIRECTS_WITHOUT_BACKOFF: u32 = 2;

/// `Unavailable` (retry-safe: nothing was proposed) while a leader transfer holds `h`.
fn transfer_running(h: &GroupHandle) -> Option<ForwardResponse> {
    h.transferring.load(Ordering::Acquire).then(|| {
        ForwardResponse::Failed(GroupError::Unavailable {
            group: h.group,
            reason: "leadership is being transferred".into(),
            retry_safe: true,
        })
    })
}

fn leader_of_forward(e: &openraft::error::ForwardToLeader<NodeId, BasicNode>) -> Option<(NodeId, String)> {
    e.leader_id.map(|id| (id, e.leader_node.as_ref().map(|n| n.addr.clone()).unwrap_or_default()))
}

impl RaftHost {
    /// A host with no group running. Every group with raft state on disk is registered as
    /// dormant; the host's background tasks (children of splits, hibernation, reports to the
    /// meta group) start here, so call it inside the runtime (and the node's task owner).
    pub fn new(
        config: HostConfig,
        engine: Engine,
        writer: GroupCommit,
        transport: Arc<dyn Transport>,
    ) -> Result<Arc<Self>, GroupError> {
        let (local, events) = LocalShards::new();
        let catalog_cache: Arc<ShardMapCache> = Arc::default();
        let dormant = groups_on_disk(&engine)
            .map_err(|e| GroupError::Fatal { group: keys::META_GROUP, reason: e.to_string() })?;
        // What each dormant replica owns, for routing and overlap checks, without starting it.
        for g in &dormant {
            let state =
                state_machine::read_state(&engine, *g).ok().flatten().or_else(|| state_machine::bootstrap_state(*g));
            if let Some(state) = state {
                local.set(state);
            }
        }
        let host = Arc::new(Self {
            config,
            catalog: CatalogReader::new(engine.clone(), catalog_cache.clone()),
            engine,
            writer,
            transport,
            groups: Mutex::new(BTreeMap::new()),
            dormant: Mutex::new(dormant),
            led_before_restart: Mutex::new(BTreeSet::new()),
            empty_unlisted_since: Mutex::new(BTreeMap::new()),
            born: Mutex::new(BTreeSet::new()),
            lifecycle: Mutex::new(BTreeMap::new()),
            local,
            catalog_cache,
            started: tokio::time::Instant::now(),
            load_reports: Mutex::new(BTreeMap::new()),
            api_calls: std::sync::OnceLock::new(),
            messages_received: AtomicU64::new(0),
            votes_held: std::sync::atomic::AtomicBool::new(false),
            wakes: AtomicU64::new(0),
            peer_down_wakes: AtomicU64::new(0),
            starts: AtomicU64::new(0),
            start_micros: AtomicU64::new(0),
        });
        super::runtime::spawn(handle_events(Arc::downgrade(&host), events));
        let resuming = host.clone();
        super::runtime::spawn(async move { resuming.resume_merges().await });
        super::runtime::spawn(super::hibernate::run(Arc::downgrade(&host)));
        super::runtime::spawn(report_shards_loop(Arc::downgrade(&host)));
        Ok(host)
    }

    /// One call to a peer over this node's transport.
    pub async fn transport_call(
        &self,
        addr: String,
        envelope: Envelope,
        kind: RpcKind,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        self.transport.call(addr, envelope, kind, payload, timeout).await
    }

    /// Refuses vote requests until `release_votes` (a node that has no raft state and joins:
    /// if the cluster still counts a wiped machine with its id as a voter, the join is
    /// refused, and meanwhile it must not vote with its empty log for a stale candidate).
    pub fn hold_votes(&self) {
        self.votes_held.store(true, Ordering::Release);
    }

    /// Grants votes again (the join was confirmed).
    pub fn release_votes(&self) {
        self.votes_held.store(false, Ordering::Release);
    }

    /// True while vote requests are refused (see `hold_votes`).
    pub fn votes_held(&self) -> bool {
        self.votes_held.load(Ordering::Acquire)
    }

    /// Messages received from peers so far.
    pub fn messages_received(&self) -> u64 {
        self.messages_received.load(Ordering::Relaxed)
    }

    /// What this node's transport has sent (batches and the messages in them).
    pub fn transport_stats(&self) -> crate::transport::TransportStats {
        self.transport.stats()
    }

    /// Dormant replicas started again so far.
    /// Replica starts so far and their total duration in seconds.
    pub fn start_times(&self) -> (u64, f64) {
        (self.starts.load(Ordering::Relaxed), self.start_micros.load(Ordering::Relaxed) as f64 / 1e6)
    }

    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }

    /// The leader `group` last had as this replica knows it: the running replica's view, or
    /// for a dormant one the leader its committed vote names.
    pub fn last_leader(&self, group: GroupId) -> Option<NodeId> {
        if let Some(h) = self.group(group) {
            return h.leader().map(|l| l.0);
        }
        let vote = self.engine.get(Cf::RaftMeta, &keys::group_meta_key(group, "vote")).ok().flatten()?;
        let vote: super::types::Vote = serde_json::from_slice(&vote).ok()?;
        vote.is_committed().then(|| vote.leader_id().voted_for()).flatten()
    }

    /// Keeps `node`'s load report (the latest one wins).
    pub fn record_load_report(&self, node: NodeId, groups: Vec<(GroupId, f64, Vec<Vec<u8>>)>, leading: Vec<GroupId>) {
        if let Ok(mut reports) = self.load_reports.lock() {
            reports.insert(node, LoadReport { at: tokio::time::Instant::now(), groups, leading });
        }
    }

    /// When each node's latest load report came (for `liveness` on the meta leader).
    pub fn report_times(&self) -> BTreeMap<NodeId, tokio::time::Instant> {
        let Ok(reports) = self.load_reports.lock() else { return BTreeMap::new() };
        reports.iter().map(|(node, r)| (*node, r.at)).collect()
    }

    /// Node `down` went down: wakes every dormant replica here whose last known leader it
    /// was (a committed vote for it), one after another in a task of this node, so those
    /// groups elect a new leader before a request has to wait for it. Returns how many.
    pub fn wake_groups_led_by(self: &Arc<Self>, down: NodeId) -> usize {
        if down == self.config.node_id {
            return 0;
        }
        let led: Vec<GroupId> = self.dormant_ids().into_iter().filter(|g| self.last_leader(*g) == Some(down)).collect();
        let count = led.len();
        if count > 0 {
            tracing::info!(node = down, groups = count, "waking the hibernated groups a failed node led");
            let host = self.clone();
            super::runtime::spawn(async move {
                for group in led {
                    // Raft traffic, not a request: the group may sleep again once at rest.
                    match host.wake_for_raft(group).await {
                        Ok(_) => {
                            host.peer_down_wakes.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => tracing::debug!(group, error = %e, "could not wake a group its failed leader led"),
                    }
                }
            });
        }
        count
    }

    /// Tells `peers` (and this node) that node `down` went down, so each wakes the dormant
    /// groups it led (`wake_groups_led_by`). Best effort: a replica that misses it wakes on
    /// its next request instead.
    pub fn announce_peer_down(self: &Arc<Self>, down: NodeId, peers: Vec<(NodeId, String)>) {
        self.wake_groups_led_by(down);
        self.tell_peers(keys::META_GROUP, peers, ForwardRequest::PeerDown { node: down });
    }

    /// Sends `request` about `group` to each of `peers` in a task of its own, answers
    /// ignored (best effort: a failure is only logged).
    fn tell_peers(self: &Arc<Self>, group: GroupId, peers: Vec<(NodeId, String)>, request: ForwardRequest) {
        for (peer, addr) in peers {
            let host = self.clone();
            let request = request.clone();
            let timeout = self.config.tuning.request_timeout;
            super::runtime::spawn(async move {
                if let Err(e) = host.ask_node(group, peer, &addr, &request, timeout).await {
                    tracing::debug!(group, peer, ?request, error = %e, "a peer did not take a best-effort request");
                }
            });
        }
    }

    /// Dormant replicas woken because their leader's node went down.
    pub fn peer_down_wakes(&self) -> u64 {
        self.peer_down_wakes.load(Ordering::Relaxed)
    }

    /// The leader of every group some node reported leading recently (hibernated groups
    /// have none). With two claims (a term change between reports), the later report wins.
    pub fn reported_leaders(&self) -> BTreeMap<GroupId, NodeId> {
        let mut out = BTreeMap::new();
        let Ok(reports) = self.load_reports.lock() else { return out };
        let mut fresh: Vec<(&NodeId, &LoadReport)> =
            reports.iter().filter(|(_, r)| r.at.elapsed() <= LOAD_REPORT_TTL).collect();
        fresh.sort_by_key(|(_, r)| r.at);
        for (node, report) in fresh {
            for g in &report.leading {
                out.insert(*g, *node);
            }
        }
        out
    }

    /// Every shard's load summed over the nodes' recent reports.
    pub fn cluster_load(&self) -> BTreeMap<GroupId, ShardLoad> {
        let mut out: BTreeMap<GroupId, ShardLoad> = BTreeMap::new();
        let Ok(reports) = self.load_reports.lock() else { return out };
        for report in reports.values() {
            if report.at.elapsed() > LOAD_REPORT_TTL {
                continue;
            }
            for (group, qps, sample) in &report.groups {
                let load = out.entry(*group).or_default();
                load.qps += qps;
                load.sample.extend(sample.iter().cloned());
            }
        }
        out
    }

    /// Milliseconds since the host started (its clock for request timestamps).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Group-commit counters of this node's log writer.
    pub fn writer_stats(&self) -> std::sync::Arc<crate::storage::group_commit::GroupCommitStats> {
        self.writer.stats.clone()
    }

    /// The running replica of `group` (`None` when dormant or absent: see `wake`).
    pub fn group(&self, group: GroupId) -> Option<Arc<GroupHandle>> {
        self.groups.lock().ok()?.get(&group).cloned()
    }

    /// Running groups.
    pub fn group_ids(&self) -> Vec<GroupId> {
        self.groups.lock().map(|g| g.keys().copied().collect()).unwrap_or_default()
    }

    /// Dormant groups (on disk, not running).
    /// At process start, before any group runs: a replica that led its group gives up the
    /// claim (its vote stays, uncommitted), so it can only lead again by winning a new term.
    /// openraft 0.9 resumes a leader on a committed vote at once, with the commit index its
    /// durable state implies: an entry committed by the followers just before the crash, of
    /// which they had not yet heard the commit, was then below the resumed leader's read
    /// index, and a strong read on a follower missed an acknowledged write (found by the
    /// simulator, seed 81). A newly elected leader commits an entry of its own term first.
    /// A request that wakes such a group campaigns at once (`led_before_restart`; its peers
    /// drop their lease for it), so the election costs one vote round, not a timeout.
    /// Waking a hibernated group (no crash: everything was applied) still resumes at once.
    pub async fn forget_leadership_after_restart(&self) -> Result<usize, crate::storage::EngineError> {
        let me = self.config.node_id;
        let mut groups: BTreeSet<GroupId> = self.dormant_ids().into_iter().collect();
        groups.insert(keys::META_GROUP);
        let mut batch = crate::storage::WriteBatch::new();
        let mut led = BTreeSet::new();
        for group in groups {
            let Some(vote) = self.stored_vote(group)? else { continue };
            // Uncommitted: given up at an earlier start and not woken since, still the last
            // leader.
            if vote.leader_id().voted_for() == Some(me) {
                led.insert(group);
            }
            if let Some((key, value)) = uncommit(&vote, group, me) {
                batch.put(Cf::RaftMeta, key, value);
            }
        }
        let count = led.len();
        if count > 0 {
            self.write_synced(batch).await?;
        }
        if let Ok(mut before) = self.led_before_restart.lock() {
            *before = led;
        }
        Ok(count)
    }

    pub fn dormant_ids(&self) -> Vec<GroupId> {
        self.dormant.lock().map(|d| d.iter().copied().collect()).unwrap_or_default()
    }

    pub fn is_dormant(&self, group: GroupId) -> bool {
        self.dormant.lock().is_ok_and(|d| d.contains(&group))
    }

    /// True when this node has a replica of `group`, running or dormant.
    pub fn hosts(&self, group: GroupId) -> bool {
        self.group(group).is_some() || self.is_dormant(group) || self.is_born(group)
    }

    /// True for a split child applied here and not started yet.
    fn is_born(&self, group: GroupId) -> bool {
        self.born.lock().is_ok_and(|b| b.contains(&group))
    }

    /// The applied index of this node's replica of `group`, running or dormant (0: none).
    pub fn applied_index(&self, group: GroupId) -> u64 {
        if let Some(h) = self.group(group) {
            return h.applied_index();
        }
        let applied = self.engine.get(Cf::RaftMeta, &keys::group_meta_key(group, "applied")).ok().flatten();
        applied
            .and_then(|v| serde_json::from_slice::<Option<super::types::LogId>>(&v).ok())
            .flatten()
            .map_or(0, |l| l.index)
    }

    /// The running replica of `group`, started first if it is dormant (a request needs it:
    /// counts as activity). `UnknownGroup` when this node has no replica of it.
    pub async fn wake(self: &Arc<Self>, group: GroupId) -> Result<Arc<GroupHandle>, GroupError> {
        let h = match self.group(group) {
            Some(h) => h,
            None if self.is_dormant(group) => {
                let led_before = self.led_before_restart.lock().is_ok_and(|led| led.contains(&group));
                // A plain (uncommitted) vote: nobody is known to lead, typically because the
                // leader restarted and gave the group up.
                let leaderless = matches!(self.stored_vote(group), Ok(Some(v)) if !v.is_committed());
                self.wake_peers(group, led_before);
                let h = self.start_boxed(group).await?;
                if led_before || leaderless {
                    // Campaign now rather than after an election timeout. The peers dropped
                    // their lease for a restarted leader (`LeaderRestarted` at its start, or
                    // `WakeForCampaign` now), so one vote round elects this replica at a new
                    // term (a strong read of such a shard took ~1.6 s after a restart).
                    let _ = h.raft.trigger().elect().await;
                }
                h
            }
            None if self.is_born(group) => self.start_boxed(group).await?,
            None => return Err(GroupError::UnknownGroup(group)),
        };
        h.last_request_ms.store(self.now_ms(), Ordering::Release);
        Ok(h)
    }

    /// Asks the other replicas of a hibernating `group` to start theirs while this one
    /// starts: the woken leader's first heartbeat then finds them running, and a wake costs
    /// one replica start instead of two in a row (leader, then followers on its heartbeat).
    /// Best effort: a replica not reached starts on that heartbeat anyway.
    /// `led_before`: this node led the group before its process restarted and campaigns
    /// next (the peers drop their lease for it as they wake).
    fn wake_peers(self: &Arc<Self>, group: GroupId, led_before: bool) {
        let wake = if led_before { ForwardRequest::WakeForCampaign } else { ForwardRequest::Wake };
        self.tell_peers(group, self.other_replicas(group), wake);
    }

    /// Before a dormant replica of `group` starts for a campaign of `candidate`, the node its
    /// committed vote names: the vote stays, its commit goes. openraft 0.9 dates a stored
    /// vote "now" when a replica starts, and a follower with a committed vote refuses every
    /// candidate for a leader lease (the election timeout) after that, even the leader it
    /// names: the first wake of a shard after its leader's process restarted took ~1.6 s.
    /// Safe: the term and whom this replica voted for in it are unchanged (no second vote in
    /// that term); only the knowledge that the candidate won it goes, which only the lease
    /// uses, and the lease protects no one here (the replica was asleep, the candidate is
    /// the leader it would protect). A running replica is left alone.
    pub(super) async fn release_lease_of(self: &Arc<Self>, group: GroupId, candidate: NodeId) {
        self.release_leases_of(vec![group], candidate).await;
    }

    /// `release_lease_of` for many groups of one restarted `leader`, in one synced write:
    /// each group's lifecycle lock is held from the check to the write, so no replica starts
    /// (and persists a newer vote) in between.
    pub(super) async fn release_leases_of(self: &Arc<Self>, mut groups: Vec<GroupId>, leader: NodeId) -> usize {
        groups.sort_unstable();
        groups.dedup();
        let mut held = Vec::new();
        let mut batch = crate::storage::WriteBatch::new();
        for group in groups {
            if !self.is_dormant(group) {
                continue;
            }
            let lock = self.lifecycle_lock(group);
            let guard = lock.lock_owned().await;
            if self.group(group).is_some() || !self.is_dormant(group) {
                continue;
            }
            match self.uncommitted_vote(group, leader) {
                Ok(Some((key, value))) => {
                    batch.put(Cf::RaftMeta, key, value);
                    held.push(guard);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(group, error = %e, "reading a dormant replica's vote"),
            }
        }
        let released = held.len();
        if released > 0 {
            if let Err(e) = self.write_synced(batch).await {
                tracing::warn!(leader, error = %e, "releasing dormant replicas' leases");
                return 0;
            }
        }
        released
    }

    /// After a restart: tells every other member which groups this node gave up
    /// (`ForwardRequest::LeaderRestarted`; best effort, a member not reached keeps its lease
    /// and its replicas elect after a timeout, as before).
    pub fn announce_restart(self: &Arc<Self>) {
        let groups: Vec<GroupId> = match self.led_before_restart.lock() {
            Ok(led) => led.iter().copied().collect(),
            Err(_) => return,
        };
        if groups.is_empty() {
            return;
        }
        let Ok(nodes) = self.catalog.nodes() else { return };
        let peers = nodes.into_iter().filter(|n| n.id != self.config.node_id).map(|n| (n.id, n.grpc_addr)).collect();
        self.tell_peers(keys::META_GROUP, peers, ForwardRequest::LeaderRestarted { groups });
    }

    /// The vote record of `group` rewritten without its commit, when the stored vote is a
    /// committed one for `leader` (`None` otherwise).
    fn uncommitted_vote(
        &self,
        group: GroupId,
        leader: NodeId,
    ) -> Result<Option<crate::storage::engine::KvPair>, crate::storage::EngineError> {
        Ok(self.stored_vote(group)?.and_then(|vote| uncommit(&vote, group, leader)))
    }

    /// The vote `group`'s replica here has on disk (`None`: none, or unreadable).
    fn stored_vote(&self, group: GroupId) -> Result<Option<super::types::Vote>, crate::storage::EngineError> {
        let bytes = self.engine.get(Cf::RaftMeta, &keys::group_meta_key(group, "vote"))?;
        Ok(bytes.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// Like `wake`, for raft traffic (not a request: hibernation does not count it).
    pub async fn wake_for_raft(self: &Arc<Self>, group: GroupId) -> Result<Arc<GroupHandle>, GroupError> {
        match self.group(group) {
            Some(h) => Ok(h),
            None if self.is_dormant(group) || self.is_born(group) => self.start_boxed(group).await,
            None => Err(GroupError::UnknownGroup(group)),
        }
    }

    /// `start_group` behind a box: a group's tasks (the batcher) propose through `wake`,
    /// which may start the group, so the future types would otherwise contain themselves.
    fn start_boxed(
        self: &Arc<Self>,
        group: GroupId,
    ) -> futures::future::BoxFuture<'static, Result<Arc<GroupHandle>, GroupError>> {
        let host = self.clone();
        Box::pin(async move { host.start_hosted(group).await })
    }

    /// Starts a replica this node hosts (dormant, or a split child not started yet). Checked
    /// again under the lifecycle lock: a replica destroyed meanwhile (merged away, or
    /// removed from its group) must not come back as an empty one.
    async fn start_hosted(self: &Arc<Self>, group: GroupId) -> Result<Arc<GroupHandle>, GroupError> {
        let lock = self.lifecycle_lock(group);
        let _started = lock.lock().await;
        if let Some(h) = self.group(group) {
            return Ok(h);
        }
        if !self.is_dormant(group) && !self.is_born(group) {
            return Err(GroupError::UnknownGroup(group));
        }
        self.start_group_locked(group).await
    }

    pub(super) fn lifecycle_lock(&self, group: GroupId) -> Arc<tokio::sync::Mutex<()>> {
        match self.lifecycle.lock() {
            Ok(mut locks) => locks.entry(group).or_default().clone(),
            // A poisoned registry: a fresh lock still serializes nothing else; the start
            // below then fails on the poisoned group map.
            Err(_) => Arc::default(),
        }
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

    /// Starts the replica of `group` from its raft state on this node, or empty when it has
    /// none (it then waits for its leader: entries or a snapshot). Idempotent.
    pub async fn start_group(self: &Arc<Self>, group: GroupId) -> Result<Arc<GroupHandle>, GroupError> {
        if let Some(h) = self.group(group) {
            return Ok(h);
        }
        let lock = self.lifecycle_lock(group);
        let _started = lock.lock().await;
        self.start_group_locked(group).await
    }

    /// `start_group` for a caller that holds the group's lifecycle lock.
    pub(super) async fn start_group_locked(self: &Arc<Self>, group: GroupId) -> Result<Arc<GroupHandle>, GroupError> {
        if let Some(h) = self.group(group) {
            return Ok(h);
        }
        let fatal = |reason: String| GroupError::Fatal { group, reason };
        let began = std::time::Instant::now();
        let ctx = SmContext { local: self.local.clone(), catalog: self.catalog_cache.clone() };
        let sm = GroupStateMachine::open(group, self.engine.clone(), ctx).map_err(|e| fatal(e.to_string()))?;
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
        let handle = Arc::new(GroupHandle {
            group,
            raft,
            applied,
            reads,
            freshness: Freshness::default(),
            proposals,
            last_request_ms: AtomicU64::new(self.now_ms()),
            transferring: AtomicBool::new(false),
        });
        self.groups.lock().map_err(|_| fatal("registry poisoned".into()))?.insert(group, handle.clone());
        if let Ok(mut dormant) = self.dormant.lock() {
            if dormant.remove(&group) {
                self.wakes.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Ok(mut born) = self.born.lock() {
            born.remove(&group);
        }
        self.local.mark_open(group);
        self.starts.fetch_add(1, Ordering::Relaxed);
        self.start_micros.fetch_add(began.elapsed().as_micros() as u64, Ordering::Relaxed);
        if let Ok(mut led) = self.led_before_restart.lock() {
            led.remove(&group);
        }
        Ok(handle)
    }

    /// One synced write through the node's log writer.
    pub(super) async fn write_synced(
        &self,
        batch: crate::storage::WriteBatch,
    ) -> Result<(), crate::storage::EngineError> {
        self.writer.write_synced(batch).await
    }

    /// Stops `group`'s replica (running or dormant) and takes it out of the registry.
    pub(super) async fn retire_from_registry(self: &Arc<Self>, group: GroupId) {
        let lock = self.lifecycle_lock(group);
        let _stopping = lock.lock().await;
        let running = self.groups.lock().ok().and_then(|mut g| g.remove(&group));
        if let Ok(mut dormant) = self.dormant.lock() {
            dormant.remove(&group);
        }
        if let Some(h) = running {
            let _ = h.raft.shutdown().await;
        }
    }

    /// With `group`'s lifecycle lock held: stops its running replica and takes it out of the
    /// registry (a dormant one stays dormant). Returns whether it was running.
    pub(super) async fn stop_locked(&self, group: GroupId) -> bool {
        let running = self.groups.lock().ok().and_then(|mut g| g.remove(&group));
        match running {
            Some(h) => {
                let _ = h.raft.shutdown().await;
                true
            }
            None => false,
        }
    }

    /// Forgets `group` as a hosted replica that is not running (its raft state is gone).
    pub(super) fn forget_dormant(&self, group: GroupId) {
        if let Ok(mut dormant) = self.dormant.lock() {
            dormant.remove(&group);
        }
        if let Ok(mut born) = self.born.lock() {
            born.remove(&group);
        }
    }

    /// Keeps `group` as a dormant replica (its raft state is on disk; a request starts it).
    pub(super) fn keep_dormant(&self, group: GroupId) {
        if let Ok(mut dormant) = self.dormant.lock() {
            dormant.insert(group);
        }
    }

    /// Stops the running replica of `group`, keeps it dormant and purges its log but the
    /// last entry (hibernation; see `log_store::compact_stopped`). Returns false when it was
    /// not running or `still_idle` said no under the lifecycle lock.
    pub async fn hibernate_group(
        self: &Arc<Self>,
        group: GroupId,
        still_idle: impl FnOnce(&GroupHandle) -> bool,
    ) -> bool {
        let lock = self.lifecycle_lock(group);
        let _stopping = lock.lock().await;
        let Some(h) = self.group(group) else { return false };
        if !still_idle(&h) {
            return false;
        }
        if let Ok(mut groups) = self.groups.lock() {
            groups.remove(&group);
        }
        if let Ok(mut dormant) = self.dormant.lock() {
            dormant.insert(group);
        }
        // Requests arriving now wake a new incarnation after this one stopped (same lock).
        let _ = h.raft.shutdown().await;
        // Under the same lock, so no incarnation runs while the log shrinks.
        if let Err(e) = super::log_store::compact_stopped(&self.engine, group) {
            tracing::warn!(group, error = %e, "compacting a hibernated replica's log failed");
        }
        true
    }

    /// Initializes `group` with `members` if it has never been initialized.
    pub async fn initialize(
        self: &Arc<Self>,
        group: GroupId,
        members: BTreeMap<NodeId, BasicNode>,
    ) -> Result<bool, GroupError> {
        let h = self.wake_for_raft(group).await?;
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
        if let Ok(mut dormant) = self.dormant.lock() {
            // Nothing may wake while the node stops.
            dormant.clear();
        }
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

    pub(super) async fn propose_local(self: &Arc<Self>, group: GroupId, cmd: Command) -> ForwardResponse {
        let h = match self.wake(group).await {
            Ok(h) => h,
            Err(e) => return ForwardResponse::Failed(e),
        };
        if let Some(wait) = transfer_running(&h) {
            return wait;
        }
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
    async fn change_members_local(self: &Arc<Self>, group: GroupId, change: MemberChange) -> ForwardResponse {
        let h = match self.wake(group).await {
            Ok(h) => h,
            Err(e) => return ForwardResponse::Failed(e),
        };
        if let Some(into) = self.local.get(group).and_then(|s| s.merging_into()) {
            // A merge needs the parts' voters to stay as they were frozen.
            return ForwardResponse::Failed(GroupError::Unavailable {
                group,
                reason: format!("shard {group} is being merged into {into}; its replicas change after"),
                retry_safe: true,
            });
        }
        let membership = h.raft.metrics().borrow().membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        if !voters.contains(&self.config.node_id) {
            // A leader that removed itself (a move away) until it steps down: it must not
            // change the group's membership any more (openraft asserts it leads a
            // configuration it is in; found by the simulator, seed 1456 with 5 nodes).
            return ForwardResponse::NotLeader { leader: None };
        }
        let uniform = super::types::is_uniform(&membership);
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
                // A learner already (an earlier attempt added it and may still be waiting for
                // it): only wait and promote. Purging again would cut the log under the
                // snapshot it is being sent.
                let learner = membership.get_node(&id).is_some();
                if !voters.contains(&id) {
                    let added = if learner {
                        // The membership that names it is at least the entry that added it.
                        membership_index
                    } else {
                        // The new replica must start from a snapshot, never by replaying the log
                        // from before the group's last range change: entries before a split write
                        // keys the split's child owns now, and the node may host that child
                        // already (its newer documents were overwritten with old versions: found
                        // by the simulator, seed 289 with 5 nodes).
                        if let Err(reason) = purge_through_applied(&h, deadline).await {
                            return ForwardResponse::Failed(GroupError::Unavailable {
                                group,
                                reason,
                                retry_safe: true,
                            });
                        }
                        tracing::debug!(group, node = id, "adding a replica: log purged through the applied index");
                        // The node needs a replica (empty) to take the group's entries or snapshot.
                        if let Err(reason) = self.open_replica_on(group, id, &addr, deadline).await {
                            return ForwardResponse::Failed(GroupError::Unavailable {
                                group,
                                reason,
                                retry_safe: true,
                            });
                        }
                        // Not openraft's blocking add: it calls a learner within
                        // `replication_lag_threshold` (5,000 entries) "up to date", even one that
                        // never answered. Promote only once it holds the entry that added it.
                        let add = h.raft.add_learner(id, BasicNode { addr }, false);
                        let added = match tokio::time::timeout_at(deadline, add).await {
                            Err(_) => return timed_out(),
                            Ok(Err(e)) => {
                                tracing::debug!(group, node = id, error = %e, "adding a replica: learner not added");
                                return write_error(e);
                            }
                            Ok(Ok(resp)) => resp.log_id.index,
                        };
                        tracing::debug!(group, node = id, added, "adding a replica: learner added");
                        added
                    };
                    // Polled, not `Raft::wait`: the group's replica may restart meanwhile (a
                    // watch on the old instance never fires again), and watch waiters wake in
                    // a random order (the simulator's replay).
                    loop {
                        let Some(current) = self.group(group) else {
                            return ForwardResponse::NotLeader { leader: None };
                        };
                        let m = current.raft.metrics().borrow().clone();
                        match &m.replication {
                            None => return ForwardResponse::NotLeader { leader: current.leader() },
                            Some(r) if r.get(&id).and_then(|l| l.map(|l| l.index)).is_some_and(|i| i >= added) => break,
                            Some(r) => {
                                if tokio::time::Instant::now() >= deadline {
                                    tracing::info!(group, node = id, added, matched = ?r.get(&id), "learner did not catch up in time");
                                    return timed_out();
                                }
                            }
                        }
                        tokio::time::sleep(PURGE_POLL).await;
                    }
                }
                tracing::debug!(group, node = id, "adding a replica: promoting to voter");
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

    /// Sends `req` about `group` to node `to` at `addr` and decodes its answer (a transport
    /// or decoding failure as text).
    pub(super) async fn ask_node(
        &self,
        group: GroupId,
        to: NodeId,
        addr: &str,
        req: &ForwardRequest,
        timeout: Duration,
    ) -> Result<ForwardResponse, String> {
        let env = Envelope {
            cluster_id: self.config.cluster_id.clone(),
            group_id: group,
            from_node: self.config.node_id,
            to_node: to,
        };
        let payload = serde_json::to_vec(req).map_err(|e| e.to_string())?;
        let reply = self
            .transport
            .call(addr.to_string(), env, RpcKind::Forward, payload, timeout)
            .await
            .map_err(|e| e.to_string())?;
        serde_json::from_slice(&reply).map_err(|e| e.to_string())
    }

    /// Asks node `id` (at `addr`) to create an empty replica of `group` if it has none.
    async fn open_replica_on(
        &self,
        group: GroupId,
        id: NodeId,
        addr: &str,
        deadline: tokio::time::Instant,
    ) -> Result<(), String> {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match self.ask_node(group, id, addr, &ForwardRequest::OpenReplica, left).await? {
            ForwardResponse::Done => Ok(()),
            ForwardResponse::Failed(e) => Err(format!("node {id} could not open a replica of group {group}: {e}")),
            other => Err(format!("node {id} answered {other:?} to opening a replica of group {group}")),
        }
    }

    /// `change_members_local` as its own task of this node: an RPC or caller that gives up
    /// does not cancel a change between its joint and its final step.
    pub(super) async fn change_members_detached(
        self: &Arc<Self>,
        group: GroupId,
        change: MemberChange,
    ) -> ForwardResponse {
        let host = self.clone();
        // Whether the change happened is unknown when its task ended early.
        run_detached(group, "membership change", false, async move { host.change_members_local(group, change).await })
            .await
    }

    pub(super) async fn read_index_local(self: &Arc<Self>, group: GroupId) -> ForwardResponse {
        let h = match self.wake(group).await {
            Ok(h) => h,
            Err(e) => return ForwardResponse::Failed(e),
        };
        if let Some(wait) = transfer_running(&h) {
            return wait;
        }
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
    pub(super) async fn on_leader(
        self: &Arc<Self>,
        group: GroupId,
        req: ForwardRequest,
    ) -> Result<ForwardResponse, GroupError> {
        let timeout = match req {
            ForwardRequest::ChangeMembers(_) => MEMBERSHIP_TIMEOUT,
            ForwardRequest::TransferLeader { .. } => self.transfer_timeout(),
            _ => self.config.tuning.request_timeout,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut hint: Option<(NodeId, String)> = None;
        let mut attempt = 0u32;
        let mut retry_safe = true;
        loop {
            attempt += 1;
            // A node without a replica (a shard on other nodes) sends it to one of the
            // replicas the catalog lists; their answers point on to the leader.
            let local = if self.hosts(group) { Some(self.wake(group).await?) } else { None };
            let target = match hint.take().or_else(|| local.as_ref().and_then(|h| h.leader())) {
                Some(known) => Some(known),
                None if local.is_none() => self.catalog_replica(group, attempt),
                // A replica that just woke does not show its leader in its metrics until its
                // core ran: ask it directly. A leader answers (openraft restores a leader on
                // its committed vote at start); a follower answers "not leader" naming the
                // leader of its vote. Only for a read index: a proposal answered "not
                // leader" may still have been appended (the ambiguity rule below).
                None if attempt == 1 && matches!(req, ForwardRequest::ReadIndex) => {
                    Some((self.config.node_id, String::new()))
                }
                None => {
                    // A replica that just woke learns its leader (its committed vote, or the
                    // leader's first message) within milliseconds: poll for that instead of
                    // a blind backoff (measured: +40 ms on every wake of a hibernated shard).
                    // Polled, not `Raft::wait`: waiters on openraft's metrics `watch` wake in
                    // an order tokio picks at random, which broke the simulator's replay.
                    let until = tokio::time::Instant::now()
                        + Duration::from_millis(self.config.tuning.election_timeout_max_ms)
                            .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
                    let mut known = None;
                    while let Some(h) = local.as_ref().filter(|_| known.is_none()) {
                        if tokio::time::Instant::now() >= until {
                            break;
                        }
                        tokio::time::sleep(LEADER_POLL).await;
                        known = h.leader();
                    }
                    known
                }
            };
            // Whether this attempt reached a raft core that may have appended a proposal.
            let mut reached = true;
            let tried = target.as_ref().map(|(id, _)| *id);
            let resp = match target {
                Some((id, _)) if id == self.config.node_id => match &req {
                    ForwardRequest::Propose(cmd) => self.propose_local(group, cmd.clone()).await,
                    ForwardRequest::ReadIndex => self.read_index_local(group).await,
                    ForwardRequest::ChangeMembers(change) => self.change_members_detached(group, change.clone()).await,
                    ForwardRequest::TransferLeader { to } => self.transfer_leader_detached(group, *to).await,
                    ForwardRequest::Members => self.members_local(group).await,
                    ForwardRequest::Hibernate { .. }
                    | ForwardRequest::OpenReplica
                    | ForwardRequest::Elect
                    | ForwardRequest::Wake
                    | ForwardRequest::WakeForCampaign
                    | ForwardRequest::LeaderRestarted { .. }
                    | ForwardRequest::ApiCall(_)
                    | ForwardRequest::PeerDown { .. }
                    | ForwardRequest::ReportLoad { .. } => {
                        ForwardResponse::Failed(GroupError::Fatal { group, reason: "not a leader request".into() })
                    }
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
                    // A membership change runs detached on the leader and a re-run joins
                    // it where it is: one lost message must not hold the caller (the
                    // placement driver) for the whole change's bound (found by the
                    // simulator, seed 233 with 5 nodes: a move stalled 120 s halfway).
                    let attempt = match req {
                        ForwardRequest::ChangeMembers(_) => left.min(MEMBERSHIP_ATTEMPT_TIMEOUT),
                        _ => left,
                    };
                    match self.transport.call(addr, env, RpcKind::Forward, payload, attempt).await {
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
                _ => true,
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
            // A redirect to another node goes there at once (a woken follower names its
            // leader); a few times only, so two nodes naming each other still back off.
            let redirected =
                matches!(&resp, ForwardResponse::NotLeader { leader: Some((id, _)) } if Some(*id) != tried);
            // A replica here that answered "no leader" is most likely in an election (a
            // woken shard whose leader restarted campaigns at once): the next attempt polls
            // it for the winner, one vote round away, instead of the blind backoff below
            // (measured: +40 ms on every first wake after a restart).
            let electing = reached && local.is_some() && matches!(&resp, ForwardResponse::NotLeader { leader: None });
            if (redirected || electing) && attempt <= REDIRECTS_WITHOUT_BACKOFF {
                continue;
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

    /// Registers the handler of API calls other nodes forward here (once; a second
    /// registration is ignored).
    pub fn serve_api_calls(&self, handler: ApiCallHandler) {
        let _ = self.api_calls.set(handler);
    }

    /// Serves a forwarded API call with the registered handler.
    pub(super) async fn api_call_local(&self, group: GroupId, request: String) -> ForwardResponse {
        match self.api_calls.get() {
            Some(handler) => ForwardResponse::ApiCall(handler(request).await),
            None => ForwardResponse::Failed(GroupError::Unavailable {
                group,
                reason: format!("node {} is still starting", self.config.node_id),
                retry_safe: true,
            }),
        }
    }

    /// The replicas to send a call about `group` to from a node without one: the catalog's
    /// replicas with their addresses, the last leader this node knows of first (a strong read
    /// served there needs no extra hop).
    pub fn replica_targets(&self, group: GroupId) -> Vec<(NodeId, String)> {
        let mut targets = self.other_replicas(group);
        if let Some(leader) = self.last_leader(group) {
            if let Some(at) = targets.iter().position(|(id, _)| *id == leader) {
                let known = targets.remove(at);
                targets.insert(0, known);
            }
        }
        targets
    }

    /// Sends an API call (the API layer's encoded request) about `group` to node `to` at
    /// `addr`; its encoded reply, or why none came (transport failure, the node refused).
    pub async fn ask_api_call(
        &self,
        group: GroupId,
        to: NodeId,
        addr: &str,
        request: String,
        timeout: Duration,
    ) -> Result<String, String> {
        match self.ask_node(group, to, addr, &ForwardRequest::ApiCall(request), timeout).await? {
            ForwardResponse::ApiCall(reply) => Ok(reply),
            ForwardResponse::Failed(e) => Err(e.to_string()),
            other => Err(format!("node {to} answered {other:?} to an API call")),
        }
    }

    /// One of the replicas the catalog lists for `group` other than this node (rotating with
    /// `attempt`), with its address.
    fn catalog_replica(&self, group: GroupId, attempt: u32) -> Option<(NodeId, String)> {
        let others = self.other_replicas(group);
        others.get(attempt.saturating_sub(1) as usize % others.len().max(1)).cloned()
    }

    /// The replicas the catalog lists for `group` other than this node, with their addresses
    /// (empty when the catalog cannot be read or does not know the group).
    fn other_replicas(&self, group: GroupId) -> Vec<(NodeId, String)> {
        let (Ok(map), Ok(nodes)) = (self.catalog.shard_map(), self.catalog.nodes()) else { return Vec::new() };
        let Some(desc) = map.shards.get(&group) else { return Vec::new() };
        let others = desc.replicas.iter().filter(|r| **r != self.config.node_id);
        others.filter_map(|r| nodes.iter().find(|n| n.id == *r).map(|n| (n.id, n.grpc_addr.clone()))).collect()
    }

    /// Proposes `cmd` to `group` and returns the applied index and the state machine's answer.
    pub async fn propose(self: &Arc<Self>, group: GroupId, cmd: Command) -> Result<(u64, CommandResponse), GroupError> {
        match self.on_leader(group, ForwardRequest::Propose(cmd)).await? {
            ForwardResponse::Proposed { index, response } => Ok((index, response)),
            ForwardResponse::Failed(e) => Err(e),
            _ => Err(GroupError::Unavailable { group, reason: "no leader elected".into(), retry_safe: true }),
        }
    }

    /// Proposes a document batch through the group's proposal batcher (it may share a log
    /// entry with concurrent batches). Returns the entry's index and this batch's answer.
    pub async fn propose_docs(
        self: &Arc<Self>,
        group: GroupId,
        batch: DocBatch,
    ) -> Result<(u64, CommandResponse), GroupError> {
        if !self.hosts(group) {
            // No local batcher: straight to a replica (see `on_leader`).
            return self.propose(group, Command::Docs(batch)).await;
        }
        let h = self.wake(group).await?;
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
        let h = self.wake(group).await?;
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
        let h = self.wake(group).await?;
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
        for group in self.dormant_ids() {
            let membership = self
                .engine
                .get(Cf::RaftMeta, &keys::group_meta_key(group, "membership"))
                .ok()
                .flatten()
                .and_then(|v| serde_json::from_slice::<super::types::StoredMembership>(&v).ok())
                .unwrap_or_default();
            out.push(ReplicaStatus {
                group,
                role: "hibernating",
                term: 0,
                leader: None,
                last_log_index: 0,
                applied_index: self.applied_index(group),
                voters: membership.membership().voter_ids().collect(),
                learners: membership.membership().learner_ids().collect(),
                matched: BTreeMap::new(),
            });
        }
        out.sort_by_key(|r| r.group);
        out
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

/// `vote` (stored for `group`) without its commit, as the record to write, when it is a
/// committed vote for `leader`: same term, same choice, no lease.
fn uncommit(vote: &super::types::Vote, group: GroupId, leader: NodeId) -> Option<crate::storage::engine::KvPair> {
    if !(vote.is_committed() && vote.leader_id().voted_for() == Some(leader)) {
        return None;
    }
    let plain = super::types::Vote::new(vote.leader_id().term, leader);
    Some((keys::group_meta_key(group, "vote"), serde_json::to_vec(&plain).ok()?))
}

/// Bound on one membership change, including a learner's catch-up (snapshot streaming).
pub const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on one forwarded attempt of a membership change (the caller then asks again; the
/// change goes on on the leader meanwhile).
pub const MEMBERSHIP_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(15);

/// Bound on queued strong reads per group.
pub const READ_QUEUE_MAX: usize = 16_384;

/// Every group with raft state on disk (a `desc`, `vote` or `applied` field in `raft_meta`).
fn groups_on_disk(engine: &Engine) -> Result<BTreeSet<GroupId>, crate::storage::EngineError> {
    let mut groups = BTreeSet::new();
    // Seek from group to group: one short scan per group, not one per field.
    let mut from = Vec::new();
    while let Some((key, _)) = engine.scan(Cf::RaftMeta, &from, &[], 1)?.into_iter().next() {
        let Some(id) = key.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes) else { break };
        if state_machine::has_raft_state(engine, id)? {
            groups.insert(id);
        }
        match id.checked_add(1) {
            Some(next) => from = next.to_be_bytes().to_vec(),
            None => break,
        }
    }
    Ok(groups)
}

/// Starts the children a split created on this node. When this node leads the parent, the
/// children campaign at once (their leaders start where the parent's is, and requests routed
/// there find them) and the split is reported to the meta group.
async fn handle_events(host: std::sync::Weak<RaftHost>, mut events: mpsc::UnboundedReceiver<GroupEvent>) {
    while let Some(event) = events.recv().await {
        let Some(host) = host.upgrade() else { return };
        match event {
            GroupEvent::Retired { group, into } => {
                tracing::info!(group, into, "shard retired into a merged shard");
                if let Err(e) = host.on_part_retired(into).await {
                    tracing::error!(group, into, error = %e, "starting the merged shard failed");
                }
            }
            GroupEvent::ChildrenBorn { parent, children } => {
                let leads_parent = host.group(parent).is_some_and(|h| h.is_leader());
                // Hosted from now on: starting a child can take a while (openraft builds a
                // snapshot of its inherited range), and a request routed to it meanwhile
                // wakes it (waiting on its lifecycle lock) instead of failing.
                if let Ok(mut born) = host.born.lock() {
                    born.extend(children.iter().filter(|c| host.group(**c).is_none()));
                }
                for child in &children {
                    match host.start_group(*child).await {
                        Ok(h) if leads_parent => {
                            let _ = h.raft.trigger().elect().await;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            // Its state is on disk: the next request or message starts it.
                            tracing::error!(parent, child, error = %e, "starting a split child failed");
                            host.forget_dormant(*child);
                            host.keep_dormant(*child);
                        }
                    }
                }
                tracing::info!(parent, ?children, leads_parent, "split applied: children started");
                if leads_parent {
                    let report = host.clone();
                    super::runtime::spawn(async move {
                        let groups: Vec<GroupId> = std::iter::once(parent).chain(children).collect();
                        if let Err(e) = report.report_shards(&groups).await {
                            tracing::warn!(error = %e, "reporting a split to the meta group failed (the periodic report retries)");
                        }
                    });
                }
            }
        }
    }
}

/// How often each node reports the shards it leads whose catalog entry is behind.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(2);

/// Heals the catalog after a crash between a split and its report: every `REPORT_INTERVAL`,
/// the shards this node leads whose catalog entry is older (epoch, replicas) are reported.
async fn report_shards_loop(host: std::sync::Weak<RaftHost>) {
    loop {
        tokio::time::sleep(REPORT_INTERVAL).await;
        let Some(host) = host.upgrade() else { return };
        let Ok(map) = host.catalog.shard_map() else { continue };
        let behind: Vec<GroupId> = host
            .group_ids()
            .into_iter()
            .filter(|g| *g != keys::META_GROUP)
            .filter(|g| host.group(*g).is_some_and(|h| h.is_leader()))
            .filter(|g| host.catalog_behind_in(&map, *g))
            .collect();
        if !behind.is_empty() {
            if let Err(e) = host.report_shards(&behind).await {
                tracing::debug!(error = %e, "periodic shard report not accepted yet");
            }
        }
        for removed in host.removed_replicas() {
            host.drop_removed_replica(removed).await;
        }
        for obsolete in host.obsolete_replicas() {
            tracing::info!(group = obsolete, "destroying a replica of a shard that was merged away");
            host.destroy_group(obsolete).await;
        }
    }
}

impl RaftHost {
    /// This replica's view of `group` as a catalog entry: its applied range and epoch, and
    /// the voters of its current membership (with that membership's log index).
    pub fn shard_desc(&self, group: GroupId) -> Option<ShardDesc> {
        let state = self.local.get(group).filter(|s| !s.is_retired())?;
        let h = self.group(group)?;
        let m = h.raft.metrics().borrow().clone();
        let replicas = m.membership_config.membership().voter_ids().collect();
        let replicas_at = m.membership_config.log_id().map_or(0, |l| l.index);
        let merged = state.merged_from.iter().map(|(g, _)| *g).collect();
        Some(ShardDesc {
            id: group,
            start: state.start,
            end: state.end,
            epoch: state.epoch,
            replicas,
            replicas_at,
            merged,
        })
    }

    /// Local replicas of shards that were merged away (the catalog tombstoned them) while
    /// this node was behind; the shard that replaced them comes from its leader. Only a
    /// tombstone counts: destroying a replica of a live group would make it vote with an
    /// empty log later.
    pub fn obsolete_replicas(&self) -> Vec<GroupId> {
        // A merged-away shard has left the catalog's map: only those are looked up on disk.
        let Ok(map) = self.catalog.shard_map() else { return Vec::new() };
        self.local
            .all()
            .into_iter()
            .filter(|g| g.id != keys::META_GROUP && !map.shards.contains_key(&g.id))
            .filter(|g| self.catalog.is_merged_away(g.id).unwrap_or(false))
            .map(|g| g.id)
            .collect()
    }

    /// True when this node's copy of the catalog has `group` older than its replica here
    /// (range epoch or replica list).
    pub fn catalog_behind(&self, group: GroupId) -> bool {
        self.catalog.shard_map().is_ok_and(|map| self.catalog_behind_in(&map, group))
    }

    fn catalog_behind_in(&self, map: &crate::catalog::ShardMap, group: GroupId) -> bool {
        match (self.shard_desc(group), map.shards.get(&group)) {
            (Some(mine), Some(known)) => mine.epoch > known.epoch || mine.replicas_at > known.replicas_at,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// Reports the current state of `groups` (as this node's replicas applied them) to the
    /// meta group.
    pub async fn report_shards(self: &Arc<Self>, groups: &[GroupId]) -> Result<(), GroupError> {
        let shards: Vec<ShardDesc> = groups.iter().filter_map(|g| self.shard_desc(*g)).collect();
        if shards.is_empty() {
            return Ok(());
        }
        self.propose(keys::META_GROUP, Command::Catalog(CatalogCommand::ReportShards { shards })).await.map(|_| ())
    }
}

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
            RaftHost::new(config, engine.clone(), writer, Arc::new(crate::transport::grpc::GrpcTransport::new()))
                .expect("host");
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
        let state =
            crate::shard::GroupState::initial(group, crate::keys::initial_group_range(crate::keys::FIRST_SHARD));
        seed.put(Cf::RaftMeta, meta("desc"), serde_json::to_vec(&state).unwrap());
        engine.write(seed, true).unwrap();

        let h = host.start_group(group).await.expect("group starts");
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

    /// A joining node without data refuses vote requests until its join is confirmed (a
    /// wiped machine under a voter's old id must not vote with its empty log), then grants.
    #[tokio::test]
    async fn a_held_node_refuses_votes_until_released() {
        use crate::transport::{Envelope, Inbound, RpcKind};
        let engine: Engine = Arc::new(MemEngine::new());
        let writer = GroupCommit::inline(engine.clone());
        let config = HostConfig { node_id: 1, cluster_id: "t".into(), tuning: RaftTuning::default() };
        let host = RaftHost::new(config, engine, writer, Arc::new(crate::transport::grpc::GrpcTransport::new()))
            .expect("host");
        host.start_group(crate::keys::META_GROUP).await.expect("meta replica");
        let env = Envelope { cluster_id: "t".into(), group_id: crate::keys::META_GROUP, from_node: 2, to_node: 1 };
        let request = openraft::raft::VoteRequest::<NodeId> { vote: Vote::new(3, 2), last_log_id: None };
        let payload = serde_json::to_vec(&request).unwrap();
        host.hold_votes();
        let refused = host.handle(env.clone(), RpcKind::Vote, payload.clone()).await;
        assert!(refused.as_ref().is_err_and(|e| e.contains("joining")), "{refused:?}");
        host.release_votes();
        let reply = host.handle(env, RpcKind::Vote, payload).await.expect("a vote reply");
        let reply: Result<openraft::raft::VoteResponse<NodeId>, serde_json::Value> =
            serde_json::from_slice(&reply).unwrap();
        assert!(reply.is_ok_and(|r| r.vote_granted), "an empty replica grants the vote once released");
        host.shutdown().await;
    }
}
