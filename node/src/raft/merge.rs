//! The node's side of a merge: starting the merged group once both parts retired here, and
//! destroying the parts' replicas.
//!
//! Owns: seeding the merged group's raft state from its two retired parts (`shard::
//! merged_state`: their union range, a log position above both, their voters) and starting
//! it; destroying a part's replica (its raft log and metadata, never the data, which the
//! merged group now owns).
//!
//! Invariants:
//! - the merged group is seeded only when both parts retired into it on this node and it has
//!   no raft state and was never started here; otherwise it comes from its leader (empty
//!   replica, then a snapshot);
//! - a part is destroyed only once the merged group exists here (so no key is left without a
//!   local owner that routing or the overlap checks could miss).

use super::host::{GroupError, RaftHost};
use super::state_machine;
use super::types::{GroupId, StoredMembership, Vote};
use crate::keys;
use crate::shard;
use crate::storage::engine::prefix_end;
use crate::storage::{Cf, WriteBatch};
use std::sync::Arc;

impl RaftHost {
    /// After a part of merge `into` retired here: start the merged group if both parts have,
    /// then destroy the parts' replicas.
    pub(super) async fn on_part_retired(self: &Arc<Self>, into: GroupId) -> Result<(), GroupError> {
        let parts = self.local.merge_parts(into);
        let retired: Vec<&shard::GroupState> = parts.iter().filter(|p| p.is_retired()).collect();
        let fatal = |reason: String| GroupError::Fatal { group: into, reason };
        if !self.local.is_open(into)
            && !state_machine::has_raft_state(self.engine(), into).map_err(|e| fatal(e.to_string()))?
        {
            let [a, b] = retired.as_slice() else { return Ok(()) };
            let Some((merged, base)) = shard::merged_state(a, b) else {
                return Err(fatal(format!("parts {} and {} do not make one range", a.id, b.id)));
            };
            // The parts had the same voters (checked when they froze); take the first's.
            let membership: StoredMembership = self
                .engine()
                .get(Cf::RaftMeta, &keys::group_meta_key(a.id, "membership"))
                .map_err(|e| fatal(e.to_string()))?
                .and_then(|v| serde_json::from_slice(&v).ok())
                .ok_or_else(|| fatal(format!("part {} has no membership", a.id)))?;
            let membership = StoredMembership::new(Some(base), membership.membership().clone());
            let vote = Vote::new(base.leader_id.term, base.leader_id.node_id);
            let field = |f: &str| keys::group_meta_key(into, f);
            let mut seed = WriteBatch::new();
            seed.put(Cf::RaftMeta, field("purged"), to_json(&base, into)?);
            seed.put(Cf::RaftMeta, field("applied"), to_json(&Some(base), into)?);
            seed.put(Cf::RaftMeta, field("membership"), to_json(&membership, into)?);
            seed.put(Cf::RaftMeta, field("vote"), to_json(&vote, into)?);
            seed.put(Cf::RaftMeta, field("desc"), to_json(&merged, into)?);
            self.write_synced(seed).await.map_err(|e| fatal(e.to_string()))?;
            self.local.set(merged);
            let led_a_part = retired.iter().any(|p| self.group(p.id).is_some_and(|h| h.is_leader()));
            let h = self.start_group(into).await?;
            if led_a_part {
                let _ = h.raft.trigger().elect().await;
            }
            tracing::info!(into, parts = ?[a.id, b.id], base = base.index, "merged group started");
        }
        if self.local.get(into).is_some() {
            for part in parts.iter().filter(|p| p.is_retired()) {
                self.destroy_group(part.id).await;
            }
        }
        Ok(())
    }

    /// Stops and forgets this node's replica of `group`: its raft log and metadata go, its
    /// data stays (the group that replaced it owns that range).
    pub(super) async fn destroy_group(self: &Arc<Self>, group: GroupId) {
        self.retire_from_registry(group).await;
        let mut batch = WriteBatch::new();
        let meta = group.to_be_bytes().to_vec();
        batch.delete_range(Cf::RaftMeta, meta.clone(), prefix_end(&meta));
        batch.delete_range(Cf::RaftLog, keys::log_key(group, 0), prefix_end(&meta));
        if let Err(e) = self.write_synced(batch).await {
            tracing::error!(group, error = %e, "deleting a merged part's raft state failed");
            return;
        }
        self.local.remove(group);
        tracing::info!(group, "merged part's replica destroyed");
    }

    /// Finishes merges whose parts retired here before a restart.
    pub(super) async fn resume_merges(self: &Arc<Self>) {
        let intos: std::collections::BTreeSet<GroupId> =
            self.local.all().iter().filter(|g| g.is_retired()).filter_map(|g| g.merging_into()).collect();
        for into in intos {
            if let Err(e) = self.on_part_retired(into).await {
                tracing::warn!(into, error = %e, "resuming a merge on start failed");
            }
        }
    }
}

fn to_json<T: serde::Serialize>(value: &T, group: GroupId) -> Result<Vec<u8>, GroupError> {
    serde_json::to_vec(value).map_err(|e| GroupError::Fatal { group, reason: e.to_string() })
}
