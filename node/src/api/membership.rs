//! Cluster membership handlers on `NodeApi`: add a node, remove a node, move a shard's
//! replica or leadership.
//!
//! Owns: the order of a membership change across groups and the catalog. A node joins the
//! meta group first (so it learns the shard map), then the shard groups short of the
//! replication factor (`PlacementConfig::replicas`); others come to it by moves, which the
//! placement driver plans to balance replica counts. Each group adds a node as a learner,
//! waits for it to catch up (snapshot streaming when the log was purged) and promotes it
//! (raft joint consensus). The catalog's shard replica lists follow each group's voters.
//! Removal moves each of the node's replicas to the live node with the fewest (or drops it
//! when every node holds one), tombstones the id, and leaves the meta group last.
//!
//! Invariants:
//! - every step is idempotent, so a retried or interrupted change converges when re-run;
//! - a node id is never reused: a removed id, or an id registered at another address, is
//!   refused (RAFT-NOTES pitfall "wrong node equals data loss");
//! - a change never leaves a group without a voter.

use super::{ApiError, NodeApi};
use crate::catalog::{CatalogCommand, CatalogResponse, NodeInfo, ShardMap};
use crate::keys;
use crate::raft::host::MemberChange;
use crate::raft::types::{Command, CommandResponse, GroupId, NodeId};

impl NodeApi {
    /// Groups a membership change walks through: the meta group first, then every shard.
    fn member_groups(&self) -> Result<Vec<GroupId>, ApiError> {
        let mut groups = vec![keys::META_GROUP];
        groups.extend(self.catalog().shards()?.into_iter().map(|s| s.id));
        Ok(groups)
    }

    /// Adds node `id` at `grpc_addr` to every group as a voter. Returns each group's voters.
    /// `cluster_id` is the joining node's (empty: not checked); a node of another cluster
    /// would refuse every raft message, so it is refused here first. `fresh`: the joining
    /// node has no raft state (a fresh node whose id already votes is refused by the group
    /// leaders: a wiped disk must not vote with an empty log).
    pub async fn add_node(
        &self,
        id: NodeId,
        grpc_addr: &str,
        cluster_id: &str,
        fresh: bool,
    ) -> Result<Vec<(GroupId, Vec<NodeId>)>, ApiError> {
        if id == 0 {
            return Err(ApiError::invalid("invalid_argument", "node ids start at 1"));
        }
        let ours = &self.host().config.cluster_id;
        if !cluster_id.is_empty() && cluster_id != ours {
            return Err(ApiError::invalid(
                "cluster_mismatch",
                format!("this cluster is {ours:?} but node {id} was started with --cluster-id {cluster_id:?}"),
            ));
        }
        if grpc_addr.trim().is_empty() || !grpc_addr.contains(':') {
            return Err(ApiError::invalid("invalid_argument", format!("grpc_addr {grpc_addr:?} is not host:port")));
        }
        // Decide on the newest catalog (this replica may lag).
        self.host().linearizable_position(keys::META_GROUP).await?;
        let removed = || ApiError::AlreadyExists {
            message: format!("node id {id} was removed from this cluster; join with a new id"),
            current_version: 0,
        };
        if self.catalog().is_removed(id)? {
            return Err(removed());
        }
        match self.catalog().nodes()?.into_iter().find(|n| n.id == id) {
            Some(existing) if existing.grpc_addr != grpc_addr => {
                return Err(ApiError::AlreadyExists {
                    message: format!(
                        "node id {id} is already a member at {}; a node id names one machine",
                        existing.grpc_addr
                    ),
                    current_version: 0,
                });
            }
            Some(_) => {}
            None => {
                // Announce the address first: peers resolve it through the catalog too.
                let info = NodeInfo { id, grpc_addr: grpc_addr.to_string(), http_addr: String::new() };
                let cmd = Command::Catalog(CatalogCommand::RegisterNode(info));
                // Applied in log order: a removal that committed since the check above wins.
                if let (_, CommandResponse::Catalog(CatalogResponse::NodeRemoved)) =
                    self.host().propose(keys::META_GROUP, cmd).await?
                {
                    return Err(removed());
                }
            }
        }
        // The meta group, and the shards short of the replication factor (a cluster growing
        // from one node); the placement driver moves other shards' replicas here over time.
        let map = self.catalog().shard_map()?;
        let wanted = self.placement.replicas.max(1);
        let groups = self.member_groups()?.into_iter().filter(|g| {
            *g == keys::META_GROUP
                || map.shards.get(g).is_none_or(|d| d.replicas.contains(&id) || d.replicas.len() < wanted)
        });
        let mut out = Vec::new();
        for group in groups.collect::<Vec<_>>() {
            let change = MemberChange::AddVoter { id, addr: grpc_addr.to_string(), fresh };
            let (at_index, voters) = self.host().change_members(group, change).await?;
            self.record_replicas(group, &voters, at_index).await?;
            tracing::info!(node = id, group, ?voters, "node added to group");
            out.push((group, voters));
        }
        Ok(out)
    }

    /// Removes node `id` from every shard group, tombstones its id in the catalog, then
    /// removes it from the meta group (last: the node may be the meta leader that runs this,
    /// and steps down once its removal commits). Re-running after a partial removal finishes
    /// it. Returns each group's voters.
    pub async fn remove_node(&self, id: NodeId) -> Result<Vec<(GroupId, Vec<NodeId>)>, ApiError> {
        self.host().linearizable_position(keys::META_GROUP).await?;
        let known = self.catalog().nodes()?.iter().any(|n| n.id == id);
        let removed = self.catalog().is_removed(id)?;
        if !known && !removed {
            return Err(ApiError::NotFound { code: "node_not_found", message: format!("node {id} is not a member") });
        }
        let mut out = Vec::new();
        let shards: Vec<GroupId> = self.member_groups()?.into_iter().filter(|g| *g != keys::META_GROUP).collect();
        for group in shards {
            // Each replica moves to the live node with the fewest replicas that lacks one;
            // without such a node the shard keeps one replica fewer.
            let map = self.catalog().shard_map()?;
            let holds = map.shards.get(&group).is_some_and(|d| d.replicas.contains(&id));
            let target = if holds { self.move_target(&map, group, id)? } else { None };
            let voters = match target {
                Some(to) => self.move_replica(group, id, to).await?,
                None => {
                    let (at_index, voters) = self.host().change_members(group, MemberChange::Remove { id }).await?;
                    self.record_replicas(group, &voters, at_index).await?;
                    voters
                }
            };
            tracing::info!(node = id, group, ?voters, ?target, "node removed from group");
            out.push((group, voters));
        }
        if !removed {
            self.host().propose(keys::META_GROUP, Command::Catalog(CatalogCommand::RemoveNode { id })).await?;
        }
        let (_, voters) = self.host().change_members(keys::META_GROUP, MemberChange::Remove { id }).await?;
        tracing::info!(node = id, group = keys::META_GROUP, ?voters, "node removed from group");
        out.push((keys::META_GROUP, voters));
        Ok(out)
    }

    /// The live node (not `leaving`) with the fewest replicas that holds none of `shard`.
    fn move_target(&self, map: &ShardMap, shard: GroupId, leaving: NodeId) -> Result<Option<NodeId>, ApiError> {
        let Some(desc) = map.shards.get(&shard) else { return Ok(None) };
        let mut best: Option<(usize, NodeId)> = None;
        for node in self.catalog().nodes()? {
            if node.id == leaving || desc.replicas.contains(&node.id) || self.catalog().is_removed(node.id)? {
                continue;
            }
            let count = map.shards.values().filter(|d| d.replicas.contains(&node.id)).count();
            if best.is_none_or(|b| (count, node.id) < b) {
                best = Some((count, node.id));
            }
        }
        Ok(best.map(|(_, id)| id))
    }

    /// Moves `shard`'s replica from node `from` to node `to`: `to` joins (learner, caught up,
    /// voter), then `from` leaves; the catalog follows each step and `from` deletes its copy
    /// once the group's leader confirms it left (`raft::moves`). Idempotent: a re-run after
    /// an interruption finishes the move. Returns the shard's voters.
    pub async fn move_replica(&self, shard: GroupId, from: NodeId, to: NodeId) -> Result<Vec<NodeId>, ApiError> {
        if shard == keys::META_GROUP {
            return Err(ApiError::invalid(
                "invalid_argument",
                "group 0 is the meta group: its members follow node add and remove",
            ));
        }
        if from == to {
            return Err(ApiError::invalid("invalid_argument", format!("a move needs two nodes, got {from} twice")));
        }
        self.host().linearizable_position(keys::META_GROUP).await?;
        let map = self.catalog().shard_map()?;
        let Some(desc) = map.shards.get(&shard) else {
            return Err(ApiError::NotFound {
                code: "shard_not_found",
                message: format!("shard {shard} does not exist"),
            });
        };
        let node_missing = |id: NodeId| ApiError::NotFound {
            code: "node_not_found",
            message: format!("node {id} is not a member of the cluster"),
        };
        let Some(target) = self.catalog().nodes()?.into_iter().find(|n| n.id == to) else {
            return Err(node_missing(to));
        };
        if self.catalog().is_removed(to)? {
            return Err(node_missing(to));
        }
        let (has_from, has_to) = (desc.replicas.contains(&from), desc.replicas.contains(&to));
        if !has_from && has_to {
            return Ok(desc.replicas.clone()); // done already
        }
        if !has_from {
            return Err(ApiError::invalid(
                "invalid_argument",
                format!("node {from} holds no replica of shard {shard} (replicas {:?})", desc.replicas),
            ));
        }
        let add = MemberChange::AddVoter { id: to, addr: target.grpc_addr, fresh: false };
        let (at_index, voters) = self.host().change_members(shard, add).await?;
        self.record_replicas(shard, &voters, at_index).await?;
        let (at_index, voters) = self.host().change_members(shard, MemberChange::Remove { id: from }).await?;
        self.record_replicas(shard, &voters, at_index).await?;
        tracing::info!(shard, from, to, ?voters, "replica moved");
        Ok(voters)
    }

    /// Hands `shard`'s leadership to its voter `to`. Returns the leader afterwards.
    pub async fn transfer_leader(&self, shard: GroupId, to: NodeId) -> Result<NodeId, ApiError> {
        if shard == keys::META_GROUP {
            return Err(ApiError::invalid("invalid_argument", "group 0 is the meta group, not a shard"));
        }
        let map = self.catalog().shard_map()?;
        let Some(desc) = map.shards.get(&shard) else {
            return Err(ApiError::NotFound {
                code: "shard_not_found",
                message: format!("shard {shard} does not exist"),
            });
        };
        if !desc.replicas.contains(&to) {
            return Err(ApiError::invalid(
                "invalid_argument",
                format!("node {to} holds no replica of shard {shard} (replicas {:?})", desc.replicas),
            ));
        }
        let leader = self.host().transfer_leader(shard, to).await?;
        tracing::info!(shard, to, leader, "leader transfer finished");
        Ok(leader)
    }

    /// Writes a shard group's voters into the catalog's shard map (the meta group's own
    /// membership is not a shard).
    async fn record_replicas(&self, group: GroupId, voters: &[NodeId], at_index: u64) -> Result<(), ApiError> {
        if group == keys::META_GROUP {
            return Ok(());
        }
        let cmd = CatalogCommand::SetReplicas { shard: group, replicas: voters.to_vec(), at_index };
        self.host().propose(keys::META_GROUP, Command::Catalog(cmd)).await?;
        Ok(())
    }
}
