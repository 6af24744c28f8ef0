//! The inbound side of the node-to-node transport: raft messages, snapshots and requests
//! forwarded to this node's group replicas.
//!
//! Owns: addressing checks, waking a dormant replica for its traffic, creating an empty
//! replica where the catalog says one belongs here, and refusing a snapshot that would
//! overwrite keys another local replica still owns.
//!
//! Invariants:
//! - a message addressed to another node or cluster is refused, never applied;
//! - an empty replica is created only for a group the catalog places on this node whose range
//!   no local replica overlaps, or when the group's leader asks before adding this node;
//! - a snapshot is installed only when no other local replica owns any key of its range
//!   (a replica that has not applied the split or merge yet would later write into it).

use super::host::{ForwardRequest, ForwardResponse, GroupError, GroupHandle, RaftHost};
use super::network::SnapshotHeader;
use super::snapshot::{SnapshotData, SnapshotImage};
use super::types::{GroupId, NodeId, TypeConfig};
use crate::keys;
use crate::transport::{Envelope, Inbound, RpcKind};
use futures::future::BoxFuture;
use openraft::ServerState;
use serde::Serialize;
use std::sync::Arc;

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(v).map_err(|e| e.to_string())
}

impl RaftHost {
    fn check_addressing(&self, env: &Envelope) -> Result<(), String> {
        if env.cluster_id != self.config.cluster_id {
            return Err(format!("message for cluster {:?}, this is {:?}", env.cluster_id, self.config.cluster_id));
        }
        if env.to_node != self.config.node_id {
            return Err(format!("message for node {}, this is node {}", env.to_node, self.config.node_id));
        }
        Ok(())
    }

    /// The replica that raft traffic for `group` goes to: running, woken, or created empty
    /// when the catalog places the group on this node and no local replica overlaps it.
    async fn replica_for_raft(self: &Arc<Self>, group: GroupId) -> Result<Arc<GroupHandle>, String> {
        match self.wake_for_raft(group).await {
            Ok(h) => return Ok(h),
            Err(GroupError::UnknownGroup(_)) => {}
            Err(e) => return Err(e.to_string()),
        }
        let not_here = || format!("group {group} has no replica on node {}", self.config.node_id);
        let map = self.catalog.shard_map().map_err(|e| e.to_string())?;
        let Some(desc) = map.shards.get(&group) else { return Err(not_here()) };
        if !desc.replicas.contains(&self.config.node_id) {
            return Err(not_here());
        }
        if let Some(other) = self.local.overlapping(&desc.start, &desc.end, group).first() {
            // A replica here still owns part of the range (it has not applied the split or
            // merge that handed it over): wait for it.
            return Err(format!(
                "group {group} cannot start on node {} yet: local group {} still owns part of its range",
                self.config.node_id, other.id
            ));
        }
        tracing::info!(group, "creating an empty replica for its leader (the catalog places it here)");
        self.start_group(group).await.map_err(|e| e.to_string())
    }

    /// Creates an empty replica of `group` unless one exists (the group's leader asks before
    /// it adds this node).
    async fn open_replica(self: &Arc<Self>, group: GroupId) -> ForwardResponse {
        if self.hosts(group) {
            return ForwardResponse::Done;
        }
        match self.start_group(group).await {
            Ok(_) => ForwardResponse::Done,
            Err(e) => ForwardResponse::Failed(e),
        }
    }

    /// A follower's side of hibernation: stop when this replica is exactly where the leader
    /// is (same term and leader, every entry up to `last_log_index` applied).
    async fn hibernate_follower(
        self: &Arc<Self>,
        group: GroupId,
        leader: NodeId,
        term: u64,
        last_log_index: u64,
    ) -> ForwardResponse {
        if group == keys::META_GROUP {
            return ForwardResponse::Hibernated(false);
        }
        if self.group(group).is_none() {
            return ForwardResponse::Hibernated(self.is_dormant(group));
        }
        let at_rest = |h: &GroupHandle| {
            let m = h.raft.metrics().borrow().clone();
            m.state == ServerState::Follower
                && m.current_term == term
                && m.current_leader == Some(leader)
                && m.last_log_index == Some(last_log_index)
                && m.last_applied.map(|l| l.index) == Some(last_log_index)
        };
        ForwardResponse::Hibernated(self.hibernate_group(group, at_rest).await)
    }
}

impl Inbound for Arc<RaftHost> {
    fn handle(&self, env: Envelope, kind: RpcKind, payload: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>, String>> {
        let host = self.clone();
        host.messages_received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::pin(async move {
            host.check_addressing(&env)?;
            let group = env.group_id;
            match kind {
                RpcKind::AppendEntries => {
                    let h = host.replica_for_raft(group).await?;
                    let req = serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
                    encode(&h.raft.append_entries(req).await)
                }
                RpcKind::Vote => {
                    if host.votes_held() {
                        return Err(format!(
                            "node {} has no data and is joining: it votes once the cluster confirms the join",
                            host.config.node_id
                        ));
                    }
                    let req: openraft::raft::VoteRequest<NodeId> =
                        serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
                    if req.vote.leader_id().voted_for() == Some(env.from_node) {
                        // Arriving before the candidate's `WakeForCampaign`, it must not start
                        // the replica with the lease that would refuse it.
                        host.release_lease_of(group, env.from_node).await;
                    }
                    let h = host.replica_for_raft(group).await?;
                    encode(&h.raft.vote(req).await)
                }
                RpcKind::Forward => {
                    let req: ForwardRequest = serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
                    let resp = match req {
                        ForwardRequest::Propose(cmd) => host.propose_local(group, cmd).await,
                        ForwardRequest::ReadIndex => host.read_index_local(group).await,
                        ForwardRequest::ChangeMembers(change) => host.change_members_detached(group, change).await,
                        ForwardRequest::Hibernate { term, last_log_index } => {
                            host.hibernate_follower(group, env.from_node, term, last_log_index).await
                        }
                        ForwardRequest::OpenReplica => host.open_replica(group).await,
                        ForwardRequest::ReportLoad { groups, leading } => {
                            host.record_load_report(env.from_node, groups, leading);
                            ForwardResponse::Done
                        }
                        ForwardRequest::TransferLeader { to } => host.transfer_leader_detached(group, to).await,
                        ForwardRequest::Elect => host.elect_local(group).await,
                        ForwardRequest::Wake => match host.wake_for_raft(group).await {
                            Ok(_) => ForwardResponse::Done,
                            Err(e) => ForwardResponse::Failed(e),
                        },
                        ForwardRequest::LeaderRestarted { groups } => {
                            let released = host.release_leases_of(groups, env.from_node).await;
                            tracing::debug!(from = env.from_node, released, "a restarted leader's groups released");
                            ForwardResponse::Done
                        }
                        ForwardRequest::WakeForCampaign => {
                            host.release_lease_of(group, env.from_node).await;
                            match host.wake_for_raft(group).await {
                                Ok(_) => ForwardResponse::Done,
                                Err(e) => ForwardResponse::Failed(e),
                            }
                        }
                        ForwardRequest::Members => host.members_local(group).await,
                        ForwardRequest::ApiCall(request) => host.api_call_local(group, request).await,
                        ForwardRequest::PeerDown { node } => {
                            host.wake_groups_led_by(node);
                            ForwardResponse::Done
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
        host.messages_received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::pin(async move {
            host.check_addressing(&env)?;
            let group = env.group_id;
            let header: SnapshotHeader = serde_json::from_slice(&header).map_err(|e| e.to_string())?;
            let state = SnapshotImage::decode_state(&data).ok_or("malformed snapshot image")?;
            if let Some(s) = &state {
                if let Some(other) = host.local.overlapping(&s.start, &s.end, group).first() {
                    return Err(format!(
                        "snapshot of group {group} refused on node {}: local group {} (epoch {}) still owns part \
                         of its range (epoch {}); retry once it has caught up",
                        host.config.node_id, other.id, other.epoch, s.epoch
                    ));
                }
            }
            let h = host.replica_for_raft(group).await?;
            let snapshot =
                openraft::Snapshot::<TypeConfig> { meta: header.meta, snapshot: Box::new(SnapshotData::Encoded(data)) };
            encode(&h.raft.install_full_snapshot(header.vote, snapshot).await)
        })
    }
}
