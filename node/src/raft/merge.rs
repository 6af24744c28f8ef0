//! The node's side of a merge: starting the merged group once both parts retired here, and
//! destroying the parts' replicas.
//!
//! Owns: seeding the merged group's raft state from its two retired parts (`shard::
//! merged_state`: their union range, a log position above both, their voters) and starting
//! it; destroying a part's replica (its raft log and metadata, never the data, which the
//! merged group now owns).
//!
//! Invariants:
//! - the merged group is seeded only when both parts retired into it on this node by applying
//!   their logs (so this node's data of both ranges is final) and it has no raft state and was
//!   never started here (checked and written under its lifecycle lock); otherwise it comes
//!   from its leader (empty replica, then a snapshot). A part retired by a snapshot does not
//!   count: a retired group's snapshot carries no data;
//! - its membership is the one the parts were frozen with (recorded by the freeze), so every
//!   node seeds the same configuration at the same log position;
//! - a part's replica is destroyed only once the catalog tombstoned it (`obsolete_replicas`):
//!   the merged group then has a leader that reported it, and no replica of the part is
//!   needed to commit anything.

use super::host::{GroupError, RaftHost};
use super::state_machine;
use super::types::{GroupId, StoredMembership, Vote};
use crate::keys;
use crate::shard;
use crate::storage::engine::prefix_end;
use crate::storage::{Cf, WriteBatch};
use std::sync::Arc;

impl RaftHost {
    /// After a part of merge `into` retired here: start the merged group if both parts have.
    /// The parts keep running (they own nothing) until the catalog tombstones them: a part's
    /// other replicas may still need this one to commit its retirement.
    pub(super) async fn on_part_retired(self: &Arc<Self>, into: GroupId) -> Result<(), GroupError> {
        let fatal = |reason: String| GroupError::Fatal { group: into, reason };
        // Held across the check, the seed and the start: an empty replica of the merged
        // group created meanwhile (its leader's first message) must never get the seed
        // written under it.
        let lock = self.lifecycle_lock(into);
        let _creating = lock.lock().await;
        let seeded = self.local.is_open(into)
            || self.group(into).is_some()
            || state_machine::has_raft_state(self.engine(), into).map_err(|e| fatal(e.to_string()))?;
        if seeded {
            return Ok(());
        }
        let parts = self.local.merge_parts(into);
        let retired: Vec<&shard::GroupState> = parts.iter().filter(|p| p.is_retired()).collect();
        let [a, b] = retired.as_slice() else { return Ok(()) };
        for part in [a, b] {
            if state_machine::retired_by_snapshot(self.engine(), part.id).map_err(|e| fatal(e.to_string()))? {
                // Its data here is not its final data: the merged group comes from its leader
                // instead (an empty replica on the leader's first message, then a snapshot).
                tracing::info!(into, part = part.id, "not seeding the merged group: a part retired here by a snapshot");
                return Ok(());
            }
        }
        let Some((merged, base, members)) = shard::merged_state(a, b) else {
            return Err(fatal(format!("parts {} and {} do not make one range", a.id, b.id)));
        };
        let membership = StoredMembership::new(Some(base), members);
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
        let h = self.start_group_locked(into).await?;
        if led_a_part {
            let _ = h.raft.trigger().elect().await;
        }
        tracing::info!(into, parts = ?[a.id, b.id], base = base.index, "merged group started");
        Ok(())
    }

    /// Stops and forgets this node's replica of `group`: its raft log and metadata go, its
    /// data stays (the group that replaced it owns that range).
    pub(super) async fn destroy_group(self: &Arc<Self>, group: GroupId) {
        let state = self.local.get(group);
        self.retire_from_registry(group).await;
        let mut batch = WriteBatch::new();
        let meta = group.to_be_bytes().to_vec();
        batch.delete_range(Cf::RaftMeta, meta.clone(), prefix_end(&meta));
        batch.delete_range(Cf::RaftLog, keys::log_key(group, 0), prefix_end(&meta));
        // The range's data normally lives on in the merged shard here. A node whose replica
        // of the part moved away before the merge hosts no shard of the range: its copy
        // would stay behind forever (found by the simulator, seed 31 with 5 nodes).
        if let Some(s) = state.filter(|s| self.range_unused_here(group, &s.start, &s.end)) {
            batch.delete_range(Cf::Data, s.start, s.end);
        }
        if let Err(e) = self.write_synced(batch).await {
            tracing::error!(group, error = %e, "deleting a merged part's raft state failed");
            return;
        }
        self.forget_dormant(group);
        self.local.remove(group);
        tracing::info!(group, "merged part's replica destroyed");
    }

    /// True when no other replica here owns a key of `[start, end)` and the catalog lists
    /// this node for no shard overlapping it: the range's data here serves nothing.
    pub(super) fn range_unused_here(&self, group: GroupId, start: &[u8], end: &[u8]) -> bool {
        let me = self.config.node_id;
        let Ok(map) = self.catalog.shard_map() else { return false };
        let overlaps = |s: &[u8], e: &[u8]| (end.is_empty() || s < end) && (e.is_empty() || start < e);
        self.local.overlapping(start, end, group).is_empty()
            && !map.shards.values().any(|d| d.id != group && d.replicas.contains(&me) && overlaps(&d.start, &d.end))
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
