//! The node's side of moving replicas and leadership: leader transfer, and destroying a
//! replica after its group removed this node.
//!
//! Owns:
//! - leader transfer on openraft 0.9, which has none: the leader holds its proposals and
//!   read-index rounds, stops heartbeats, waits out the followers' leader lease
//!   (`election_timeout_max`), and asks the target to campaign (RAFT-NOTES §1
//!   "pause-and-elect"). Costs about one lease plus one election of write latency. Another
//!   follower whose election timer fires first may win instead; the caller learns who leads;
//! - the garbage collection of replicas this node no longer belongs to (a move took the
//!   replica elsewhere): such a replica is stopped first, then the group's leader is asked
//!   for its membership, and only when the leader says this node is not in it are the raft
//!   state and the data deleted; otherwise it starts again.
//!
//! Invariants:
//! - a replica that a leader may count (voter or learner of the leader's membership) is never
//!   destroyed: it is stopped before the leader is asked, so it acknowledges nothing after
//!   the answer; a later re-add starts from an empty replica (leader progress for a new
//!   learner starts unmatched, so no leader ever sees this replica's log go backwards);
//! - a leader transfer never leaves heartbeats off or proposals held: the transfer runs as its
//!   own task and restores both on every path.

use super::host::{run_detached, ForwardRequest, ForwardResponse, GroupError, GroupHandle, RaftHost};
use super::types::{is_uniform, GroupId, NodeId, StoredMembership};
use crate::keys;
use crate::storage::engine::prefix_end;
use crate::storage::{Cf, WriteBatch};
use openraft::ServerState;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// An empty replica (no membership from a log) that the catalog does not place here is a
/// removal candidate after this long: a move delivers the learner's first snapshot well
/// within it (one forwarded membership attempt is bounded by 15 s).
pub const EMPTY_REPLICA_GRACE: Duration = Duration::from_secs(30);

/// How often a transfer checks whether leadership moved.
const TRANSFER_POLL: Duration = Duration::from_millis(5);

impl RaftHost {
    /// Bound on one leader transfer: the lease it waits out, an election, and the request.
    pub(super) fn transfer_timeout(&self) -> Duration {
        let t = &self.config.tuning;
        Duration::from_millis(3 * t.election_timeout_max_ms + t.heartbeat_interval_ms) + t.request_timeout
    }

    /// Hands `group`'s leadership to voter `to` (run on the leader, forwarded when another
    /// node leads). Returns the leader afterwards: `to`, or another voter that won the
    /// election first.
    pub async fn transfer_leader(self: &Arc<Self>, group: GroupId, to: NodeId) -> Result<NodeId, GroupError> {
        match self.on_leader(group, ForwardRequest::TransferLeader { to }).await? {
            ForwardResponse::Leader(id) => Ok(id),
            ForwardResponse::Failed(e) => Err(e),
            other => Err(GroupError::Fatal { group, reason: format!("unexpected answer to a transfer: {other:?}") }),
        }
    }

    /// `transfer_leader_local` as its own task: a caller that gives up does not leave the
    /// group with heartbeats off.
    pub(super) async fn transfer_leader_detached(self: &Arc<Self>, group: GroupId, to: NodeId) -> ForwardResponse {
        let host = self.clone();
        // A transfer is safe to retry whatever happened: it moves no data.
        run_detached(group, "leader transfer", true, async move { host.transfer_leader_local(group, to).await }).await
    }

    async fn transfer_leader_local(self: &Arc<Self>, group: GroupId, to: NodeId) -> ForwardResponse {
        let h = match self.wake(group).await {
            Ok(h) => h,
            Err(e) => return ForwardResponse::Failed(e),
        };
        let me = self.config.node_id;
        let m = h.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return ForwardResponse::NotLeader { leader: h.leader() };
        }
        if to == me {
            return ForwardResponse::Leader(me);
        }
        let membership = m.membership_config.membership().clone();
        if !is_uniform(&membership) {
            return ForwardResponse::Failed(GroupError::Unavailable {
                group,
                reason: "a membership change is in progress".into(),
                retry_safe: true,
            });
        }
        let Some(addr) = membership.voter_ids().any(|v| v == to).then(|| membership.get_node(&to)).flatten() else {
            return ForwardResponse::Failed(GroupError::Fatal {
                group,
                reason: format!("node {to} is not a voter of group {group}"),
            });
        };
        let addr = addr.addr.clone();
        if h.transferring.swap(true, Ordering::AcqRel) {
            return ForwardResponse::Failed(GroupError::Unavailable {
                group,
                reason: "a leader transfer is already running".into(),
                retry_safe: true,
            });
        }
        let tuning = self.config.tuning.clone();
        h.raft.runtime_config().heartbeat(false);
        // The followers refuse to vote while their lease on this leader runs.
        tokio::time::sleep(Duration::from_millis(tuning.election_timeout_max_ms + tuning.heartbeat_interval_ms)).await;
        if let Err(e) = self.ask_node(group, to, &addr, &ForwardRequest::Elect, tuning.request_timeout).await {
            // Nobody was asked to campaign: resume at once (waiting on would only invite an
            // election by whichever follower times out first).
            finish_transfer(&h);
            return ForwardResponse::Failed(GroupError::Unavailable {
                group,
                reason: format!("node {to} could not be asked to campaign: {e}"),
                retry_safe: true,
            });
        }
        // Polled (not `Raft::wait`, whose waiters tokio wakes in a random order: the
        // simulator must replay exactly).
        let until = tokio::time::Instant::now() + Duration::from_millis(2 * tuning.election_timeout_max_ms);
        let mut moved = None;
        while moved.is_none() && tokio::time::Instant::now() < until {
            tokio::time::sleep(TRANSFER_POLL).await;
            moved = h.raft.metrics().borrow().current_leader.filter(|l| *l != me);
        }
        finish_transfer(&h);
        match moved {
            Some(leader) => ForwardResponse::Leader(leader),
            None => ForwardResponse::Failed(GroupError::Unavailable {
                group,
                reason: format!("leadership of group {group} stayed on node {me}"),
                retry_safe: true,
            }),
        }
    }

    /// A voter's part of a leader transfer: campaign now.
    pub(super) async fn elect_local(self: &Arc<Self>, group: GroupId) -> ForwardResponse {
        if !self.hosts(group) {
            return ForwardResponse::Failed(GroupError::UnknownGroup(group));
        }
        match self.wake(group).await {
            Ok(h) => match h.raft.trigger().elect().await {
                Ok(()) => ForwardResponse::Done,
                Err(e) => {
                    ForwardResponse::Failed(GroupError::Unavailable { group, reason: e.to_string(), retry_safe: true })
                }
            },
            Err(e) => ForwardResponse::Failed(e),
        }
    }

    /// On the leader: its membership (the newest: a leader's log holds every change).
    pub(super) async fn members_local(self: &Arc<Self>, group: GroupId) -> ForwardResponse {
        if !self.hosts(group) {
            return ForwardResponse::Failed(GroupError::UnknownGroup(group));
        }
        let h = match self.wake(group).await {
            Ok(h) => h,
            Err(e) => return ForwardResponse::Failed(e),
        };
        // A replica this request just woke shows its leadership (a leader resumes on its
        // committed vote) only once its core ran: poll for it, as requests do. Answering at
        // once said "no leader" to every asker of a hibernated group, which fell asleep again
        // before the next one (a removed replica was never deleted: simulator, seed 693 with 5
        // nodes).
        let until = tokio::time::Instant::now() + Duration::from_millis(self.config.tuning.election_timeout_max_ms);
        while h.leader().is_none() && tokio::time::Instant::now() < until {
            tokio::time::sleep(super::host::LEADER_POLL).await;
        }
        if h.raft.metrics().borrow().state != ServerState::Leader {
            return ForwardResponse::NotLeader { leader: h.leader() };
        }
        // Only a confirmed leader whose membership is committed may answer: a replica is
        // deleted on this word (a deposed leader, or an uncommitted removal, must not say
        // "not a member" to a replica the real configuration still counts).
        if let Err(e) = h.raft.ensure_linearizable().await {
            return ForwardResponse::Failed(GroupError::Unavailable {
                group,
                reason: format!("leadership not confirmed: {e}"),
                retry_safe: true,
            });
        }
        let m = h.raft.metrics().borrow().clone();
        let index = m.membership_config.log_id().map_or(0, |l| l.index);
        let applied = m.last_applied.map_or(0, |l| l.index);
        if index > applied || !is_uniform(m.membership_config.membership()) {
            return ForwardResponse::Failed(GroupError::Unavailable {
                group,
                reason: "a membership change is not committed yet".into(),
                retry_safe: true,
            });
        }
        let nodes = m.membership_config.membership().nodes().map(|(id, _)| *id).collect();
        ForwardResponse::Members { index, nodes }
    }

    /// Local replicas whose catalog entry has a newer replica list without this node: a move
    /// took them elsewhere (candidates only: `drop_removed_replica` asks the leader).
    pub fn removed_replicas(&self) -> Vec<GroupId> {
        let me = self.config.node_id;
        let Ok(map) = self.catalog.shard_map() else { return Vec::new() };
        let now = tokio::time::Instant::now();
        let candidates: Vec<GroupId> = self
            .local
            .all()
            .into_iter()
            .filter(|s| s.id != keys::META_GROUP && !s.is_retired() && s.merging_into().is_none())
            .filter(|s| {
                // The catalog first (in memory): reading every dormant replica's membership
                // from disk every round costs CPU with thousands of shards.
                let Some(desc) = map.shards.get(&s.id).filter(|d| !d.replicas.contains(&me)) else { return false };
                // Named in its own membership: the catalog's list comes from a later change.
                // Not named, yet with a membership from a log: it applied its own removal (a
                // leader that moved its replica away; found by the simulator, seed 0 with 5
                // nodes). An empty replica opened for a join or move has no membership from a
                // log yet and is never a candidate. Either way only the leader's word
                // deletes anything (`drop_removed_replica`).
                let Some((mine, members)) = self.local_membership(s.id) else { return false };
                tracing::debug!(
                    group = s.id,
                    mine,
                    ?members,
                    replicas_at = desc.replicas_at,
                    "replica the catalog no longer lists"
                );
                if members.contains(&me) {
                    desc.replicas_at > mine
                } else if mine > 0 {
                    desc.replicas_at >= mine
                } else {
                    // Empty: opened for a move whose learner was never added (the leader
                    // changed; the driver then chose another target) it would stay forever
                    // (found by the simulator, seed 150 with 5 nodes). A candidate once it
                    // has been empty and unlisted for longer than a move needs to deliver
                    // its first snapshot; the leader's word still decides.
                    self.empty_and_unlisted_for(s.id, now) >= EMPTY_REPLICA_GRACE
                }
            })
            .map(|s| s.id)
            .collect();
        // Forget replicas no longer empty and unlisted (filled, listed, or gone).
        if let Ok(mut seen) = self.empty_unlisted_since.lock() {
            seen.retain(|g, _| {
                let listed = map.shards.get(g).is_none_or(|d| d.replicas.contains(&me));
                !listed && self.local_membership(*g).is_some_and(|(mine, _)| mine == 0)
            });
        }
        candidates
    }

    /// How long `group`'s replica here has been seen empty and unlisted by `removed_replicas`
    /// (zero the first time).
    fn empty_and_unlisted_for(&self, group: GroupId, now: tokio::time::Instant) -> Duration {
        let Ok(mut seen) = self.empty_unlisted_since.lock() else { return Duration::ZERO };
        now.saturating_duration_since(*seen.entry(group).or_insert(now))
    }

    /// This replica's membership: its log index and every node in it (running: the newest
    /// in its log; dormant: the applied one).
    fn local_membership(&self, group: GroupId) -> Option<(u64, BTreeSet<NodeId>)> {
        let stored = match self.group(group) {
            Some(h) => h.raft.metrics().borrow().membership_config.as_ref().clone(),
            None => {
                let bytes = self.engine().get(Cf::RaftMeta, &keys::group_meta_key(group, "membership")).ok()??;
                serde_json::from_slice::<StoredMembership>(&bytes).ok()?
            }
        };
        let index = stored.log_id().map_or(0, |l| l.index);
        Some((index, stored.membership().nodes().map(|(id, _)| *id).collect()))
    }

    /// Destroys this node's replica of `group` (raft state and the data of its range) if the
    /// group's leader confirms this node is no longer a member; else leaves it running.
    pub async fn drop_removed_replica(self: &Arc<Self>, group: GroupId) {
        let me = self.config.node_id;
        // Asked once before stopping anything: a learner catching up (a move back) is not
        // interrupted every round.
        let first = self.ask_leader_members(group).await;
        if !matches!(&first, Some((_, nodes)) if !nodes.contains(&me)) {
            tracing::debug!(group, leader_says = ?first, "a removed replica's leader did not confirm the removal");
            return;
        }
        let lock = self.lifecycle_lock(group);
        let _held = lock.lock().await;
        let seen_before = self.local_membership(group).map_or(0, |(index, _)| index);
        // Stopped first: from here on this replica acknowledges nothing a leader could count.
        let was_running = self.stop_locked(group).await;
        let seen = seen_before.max(self.local_membership(group).map_or(0, |(index, _)| index));
        let leader_says = self.ask_leader_members(group).await;
        // The leader's (committed) membership must be at least as new as any this replica
        // has seen, and must not name it.
        let gone = matches!(&leader_says, Some((index, nodes)) if *index >= seen && !nodes.contains(&me));
        if !gone {
            tracing::debug!(group, ?leader_says, seen, "replica still a member (or no leader answered); keeping it");
            if was_running {
                if let Err(e) = self.start_group_locked(group).await {
                    tracing::warn!(group, error = %e, "restarting a replica kept after a removal check failed");
                    self.keep_dormant(group);
                }
            }
            return;
        }
        let Some(state) = self.local.get(group) else { return };
        let mut batch = WriteBatch::new();
        let meta = group.to_be_bytes().to_vec();
        batch.delete_range(Cf::RaftMeta, meta.clone(), prefix_end(&meta));
        batch.delete_range(Cf::RaftLog, keys::log_key(group, 0), prefix_end(&meta));
        // The data too, unless another local replica owns part of the range (then it stays:
        // a leak, never a loss).
        let shared = !self.local.overlapping(&state.start, &state.end, group).is_empty();
        if !shared {
            batch.delete_range(Cf::Data, state.start.clone(), state.end.clone());
        }
        if let Err(e) = self.write_synced(batch).await {
            tracing::error!(group, error = %e, "deleting a removed replica failed");
            return;
        }
        self.forget_dormant(group);
        self.local.remove(group);
        tracing::info!(group, data_kept = shared, "replica removed from its group destroyed");
    }

    /// Asks the replicas the catalog lists for `group` who leads it and what its membership
    /// is; follows one leader hint per replica. `None` when no leader answered.
    async fn ask_leader_members(self: &Arc<Self>, group: GroupId) -> Option<(u64, Vec<NodeId>)> {
        let desc = self.catalog.shard_map().ok()?.shards.get(&group).cloned()?;
        let nodes = self.catalog.nodes().ok()?;
        let addr_of = |id: NodeId| nodes.iter().find(|n| n.id == id).map(|n| n.grpc_addr.clone());
        let timeout = self.config.tuning.request_timeout;
        let mut asked = BTreeSet::new();
        let mut queue: Vec<NodeId> = desc.replicas.clone();
        while let Some(target) = queue.pop() {
            if target == self.config.node_id || !asked.insert(target) || asked.len() > 8 {
                continue;
            }
            let Some(addr) = addr_of(target) else { continue };
            match self.ask_node(group, target, &addr, &ForwardRequest::Members, timeout).await {
                Ok(ForwardResponse::Members { index, nodes }) => return Some((index, nodes)),
                Ok(ForwardResponse::NotLeader { leader: Some((id, _)) }) => queue.push(id),
                other => tracing::debug!(group, target, answer = ?other, "no membership from this replica"),
            }
        }
        None
    }
}

/// Ends a transfer on the old leader: heartbeats on, proposals and reads flow again.
fn finish_transfer(h: &GroupHandle) {
    h.raft.runtime_config().heartbeat(true);
    h.transferring.store(false, Ordering::Release);
}
