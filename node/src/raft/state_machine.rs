//! A raft group's state machine on the node's shared engine.
//!
//! Owns: applying committed entries (documents and splits for shard groups, the catalog for
//! the meta group), the group's `applied`, `membership` and `desc` (its `GroupState`: range,
//! epoch, status) fields, its stored request answers (deduplication), and its snapshots.
//!
//! Invariants:
//! - each entry's effects and the new applied log id go into one atomic write batch, so a
//!   crash never leaves data and applied index disagreeing, and re-applying after restart is
//!   a no-op (apply is idempotent by construction: the applied id is read back on start);
//! - a group only ever writes data keys inside its range; a command for keys outside it is
//!   refused deterministically (`CommandResponse::WrongGroup`), after the request's stored
//!   answer was looked up (a retry of a write applied before a split gets its first answer);
//! - the group's range changes only by applying its own log (a split) or installing a
//!   snapshot, and every change bumps the epoch;
//! - a split seeds each child's raft state at the split entry's log id in the same batch
//!   (purged log, applied, membership, a vote in that term), so the child's entries and
//!   document versions continue above the parent's; a child that already has raft state on
//!   this node is left alone;
//! - apply reads nothing but the entry and stored state (no clock, no randomness).
//!
//! Snapshots (`snapshot.rs`) hold the group's state, its data range and its stored answers.
//! The state machine is the snapshot: a replica remembers only whether it has built or
//! installed one, and building it or reading the current one takes an engine snapshot at the
//! applied index (O(1)), read and encoded only when the snapshot is sent. Installing one
//! replaces the snapshot's range only: a replica that missed a split keeps the data beyond
//! it until the child that owns it installs its own snapshot.

use super::local_shards::{GroupEvent, LocalShards};
use super::snapshot::{SnapshotData, SnapshotImage, SnapshotView};
use super::types::{
    is_settled, Command, CommandResponse, Entry, GroupId, LogId, Snapshot, SnapshotMeta, SplitDone, StorageError,
    StoredMembership, TypeConfig, Vote,
};
use crate::catalog::{self, ShardMapCache};
use crate::docs::{self, DocBatch, StoredDoc};
use crate::keys;
use crate::shard::{self, GroupState, MergeRefused, ShardStatus, SplitAt, SplitRefused};
use crate::signal::Progress;
use crate::storage::engine::{prefix_end, KeyRange};
use crate::storage::{Cf, Engine, EngineError, WriteBatch};
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Log entries for which a request's answer is kept: a retried proposal arriving later than
/// this is applied again (a retry comes within the request timeout, seconds).
pub const DEDUP_WINDOW: u64 = 100_000;

/// Whether this replica built or installed a snapshot. The snapshot's data is the state
/// machine itself, viewed again when openraft reads the current snapshot, so nothing else
/// of it is kept.
type SnapshotTaken = Arc<AtomicBool>;

/// What a state machine shares with the rest of its node.
#[derive(Clone)]
pub struct SmContext {
    /// Every local group's applied state, and the host's event channel.
    pub local: Arc<LocalShards>,
    /// The meta group invalidates it when the shard map changes.
    pub catalog: Arc<ShardMapCache>,
}

/// State machine of one group.
pub struct GroupStateMachine {
    group: GroupId,
    engine: Engine,
    /// `None` for a replica created empty (joining, or a child on a node that missed the
    /// split): it owns nothing until a snapshot gives it a state.
    state: Option<GroupState>,
    applied: Option<LogId>,
    membership: StoredMembership,
    snapshot_taken: SnapshotTaken,
    /// Advanced after every apply to the last applied index (for waiting readers).
    applied_progress: Arc<Progress>,
    ctx: SmContext,
}

fn sm_read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_state_machine(&e).into()
}
fn sm_write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_state_machine(&e).into()
}
fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, StorageError> {
    serde_json::to_vec(v).map_err(sm_write_err)
}

/// What applying a command changes beyond its write batch, done once the batch is written.
#[derive(Default)]
struct Effects {
    /// The group's new state (a split).
    state: Option<GroupState>,
    /// Children a split seeded on this node.
    born: Vec<GroupState>,
    /// The meta group changed the shard map.
    shard_map_changed: bool,
}

/// The state a bootstrap group has before anything is applied (the meta group and the
/// first shard); any other group gets its state from a split or a snapshot.
pub fn bootstrap_state(group: GroupId) -> Option<GroupState> {
    (group == keys::META_GROUP || group == keys::FIRST_SHARD)
        .then(|| GroupState::initial(group, keys::initial_group_range(group)))
}

/// True when `group` has any raft state on this node.
pub fn has_raft_state(engine: &Engine, group: GroupId) -> Result<bool, EngineError> {
    for field in ["desc", "vote", "applied"] {
        if engine.get(Cf::RaftMeta, &keys::group_meta_key(group, field))?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Raft-meta field set on a replica that became retired by installing a snapshot. A retired
/// group's snapshot carries no data (its range is the merged group's, and on the sender the
/// merged group may already have written into it), so this node's data of the range is not
/// the part's final data: it must not seed the merged group (found by the process fault
/// test: a node restarted mid-merge seeded the merged shard from stale data and served a
/// stale strong read).
const RETIRED_BY_SNAPSHOT: &str = "retired_by_snapshot";

/// True when this node's replica of `group` became retired by a snapshot (see
/// `RETIRED_BY_SNAPSHOT`), not by applying its log.
pub fn retired_by_snapshot(engine: &Engine, group: GroupId) -> Result<bool, EngineError> {
    Ok(engine.get(Cf::RaftMeta, &keys::group_meta_key(group, RETIRED_BY_SNAPSHOT))?.is_some())
}

/// Reads a group's persisted state (`None`: never written).
pub fn read_state(engine: &Engine, group: GroupId) -> Result<Option<GroupState>, EngineError> {
    match engine.get(Cf::RaftMeta, &keys::group_meta_key(group, "desc"))? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v).map(Some).map_err(|e| EngineError::Corrupt(format!("desc: {e}"))),
    }
}

impl GroupStateMachine {
    /// Loads the group's applied state from `engine`.
    pub fn open(group: GroupId, engine: Engine, ctx: SmContext) -> Result<Self, EngineError> {
        let read = |field: &str| engine.get(Cf::RaftMeta, &keys::group_meta_key(group, field));
        let applied: Option<LogId> = match read("applied")? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| EngineError::Corrupt(format!("applied: {e}")))?,
            None => None,
        };
        let membership: StoredMembership = match read("membership")? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| EngineError::Corrupt(format!("membership: {e}")))?,
            None => StoredMembership::default(),
        };
        let state = match read_state(&engine, group)? {
            Some(s) => Some(s),
            None => bootstrap_state(group),
        };
        if let Some(s) = &state {
            ctx.local.set(s.clone());
        }
        let applied_progress = Arc::new(Progress::new(applied.map(|l| l.index).unwrap_or(0)));
        Ok(Self { group, engine, state, applied, membership, snapshot_taken: Arc::default(), applied_progress, ctx })
    }

    /// The last applied index, for readers waiting on a position.
    pub fn applied_progress(&self) -> Arc<Progress> {
        self.applied_progress.clone()
    }

    fn put_applied(&self, batch: &mut WriteBatch, log_id: &LogId) -> Result<(), StorageError> {
        batch.put(Cf::RaftMeta, keys::group_meta_key(self.group, "applied"), json(&Some(log_id))?);
        Ok(())
    }

    fn owns(&self, key: &[u8]) -> bool {
        self.state.as_ref().is_some_and(|s| s.contains(key))
    }

    fn apply_command(
        &self,
        log_id: &LogId,
        cmd: &Command,
        batch: &mut WriteBatch,
        effects: &mut Effects,
    ) -> Result<CommandResponse, StorageError> {
        let engine = &self.engine;
        let index = log_id.index;
        match cmd {
            Command::Docs(doc_batch) => self.apply_docs(index, doc_batch, batch, &mut EntryWrites::default()),
            Command::DocsMany(doc_batches) => {
                let mut written = EntryWrites::default();
                let mut responses = Vec::with_capacity(doc_batches.len());
                for doc_batch in doc_batches {
                    responses.push(self.apply_docs(index, doc_batch, batch, &mut written)?);
                }
                Ok(CommandResponse::Many(responses))
            }
            Command::DropCollectionData { tenant, collection } => {
                let Some(state) = self.state.as_ref().filter(|_| self.group != keys::META_GROUP) else {
                    return Ok(CommandResponse::WrongGroup("collection data lives in shard groups".into()));
                };
                match &state.status {
                    ShardStatus::Active => {}
                    ShardStatus::Frozen { into, .. } => {
                        return Ok(CommandResponse::Retry(format!("shard {} is being merged into {into}", self.group)))
                    }
                    ShardStatus::Retired { into, .. } => {
                        return Ok(CommandResponse::WrongGroup(format!("shard {} was merged into {into}", self.group)))
                    }
                }
                let prefix = keys::collection_prefix(tenant, collection);
                let end = prefix_end(&prefix);
                // Clamp to this shard's range so a group never deletes keys it does not own.
                let start = std::cmp::max(prefix, state.start.clone());
                let end =
                    if state.end.is_empty() || (!end.is_empty() && end < state.end) { end } else { state.end.clone() };
                if end.is_empty() || start < end {
                    batch.delete_range(Cf::Data, start, end);
                }
                Ok(CommandResponse::Dropped)
            }
            Command::Catalog(cmd) => {
                if self.group != keys::META_GROUP {
                    return Ok(CommandResponse::WrongGroup("catalog commands go to the meta group".into()));
                }
                let read = |k: &[u8]| engine.get(Cf::Data, k);
                let shards = || catalog::CatalogReader::new(engine.clone(), self.ctx.catalog.clone()).shards();
                let (changes, resp) = catalog::apply(read, shards, index, cmd).map_err(sm_read_err)?;
                for (k, v) in changes {
                    effects.shard_map_changed |= catalog::is_shard_change(&k);
                    match v {
                        Some(v) => batch.put(Cf::Data, k, v),
                        None => batch.delete(Cf::Data, k),
                    }
                }
                Ok(CommandResponse::Catalog(resp))
            }
            Command::Split { expected_epoch, at } => self.apply_split(log_id, *expected_epoch, at, batch, effects),
            Command::Freeze { .. } | Command::Unfreeze { .. } | Command::Retire { .. } => {
                self.apply_merge_step(log_id, cmd, batch, effects)
            }
        }
    }

    /// One step of a merge (see `shard`): freeze, unfreeze or retire this group.
    fn apply_merge_step(
        &self,
        log_id: &LogId,
        cmd: &Command,
        batch: &mut WriteBatch,
        effects: &mut Effects,
    ) -> Result<CommandResponse, StorageError> {
        let state = match &self.state {
            Some(s) if self.group != keys::META_GROUP => s,
            _ => return Ok(CommandResponse::WrongGroup("only shard groups merge".into())),
        };
        let membership = self.membership.membership();
        let planned = match cmd {
            Command::Freeze { into, partner, expected_epoch, start, end, voters } => {
                let mut actual: Vec<u64> = membership.voter_ids().collect();
                let mut expected = voters.clone();
                actual.sort_unstable();
                expected.sort_unstable();
                if !is_settled(membership) {
                    Err(MergeRefused::MembershipChanging(self.group))
                } else if actual != expected {
                    Err(MergeRefused::ReplicasDiffer { group: self.group, expected, actual })
                } else if (&state.start, &state.end) != (start, end) && state.merging_into() != Some(*into) {
                    Err(MergeRefused::EpochChanged {
                        group: self.group,
                        expected: *expected_epoch,
                        current: state.epoch,
                    })
                } else {
                    shard::plan_freeze(state, *into, *partner, *expected_epoch, membership)
                }
            }
            Command::Unfreeze { into } => Ok(shard::plan_unfreeze(state, *into)),
            Command::Retire { into } => shard::plan_retire(state, *into, *log_id),
            _ => return Ok(CommandResponse::WrongGroup("not a merge step".into())),
        };
        if let Ok(next) = &planned {
            if next != state {
                batch.put(Cf::RaftMeta, keys::group_meta_key(self.group, "desc"), json(next)?);
                effects.state = Some(next.clone());
            }
        }
        Ok(CommandResponse::Merge(planned))
    }

    /// Splits this group at `at` (see `shard::plan_split`) and seeds each child's raft state
    /// at the split entry's log id.
    fn apply_split(
        &self,
        log_id: &LogId,
        expected_epoch: u64,
        at: &[SplitAt],
        batch: &mut WriteBatch,
        effects: &mut Effects,
    ) -> Result<CommandResponse, StorageError> {
        let state = match &self.state {
            Some(s) if self.group != keys::META_GROUP => s,
            _ => return Ok(CommandResponse::WrongGroup("only shard groups split".into())),
        };
        let membership = self.membership.membership();
        if !is_settled(membership) {
            // A learner being caught up (a join) would stay a learner of the children.
            return Ok(CommandResponse::Split(Err(SplitRefused::MembershipChanging(self.group))));
        }
        let (parent, children) = match shard::plan_split(state, at, expected_epoch, log_id.index) {
            Ok(planned) => planned,
            Err(refused) => return Ok(CommandResponse::Split(Err(refused))),
        };
        batch.put(Cf::RaftMeta, keys::group_meta_key(self.group, "desc"), json(&parent)?);
        let membership = StoredMembership::new(Some(*log_id), self.membership.membership().clone());
        let vote = Vote::new(log_id.leader_id.term, log_id.leader_id.node_id);
        for child in &children {
            if self.ctx.local.is_open(child.id) || has_raft_state(&self.engine, child.id).map_err(sm_read_err)? {
                continue;
            }
            let field = |f: &str| keys::group_meta_key(child.id, f);
            batch.put(Cf::RaftMeta, field("purged"), json(log_id)?);
            batch.put(Cf::RaftMeta, field("applied"), json(&Some(log_id))?);
            batch.put(Cf::RaftMeta, field("membership"), json(&membership)?);
            batch.put(Cf::RaftMeta, field("vote"), json(&vote)?);
            batch.put(Cf::RaftMeta, field("desc"), json(child)?);
            effects.born.push(child.clone());
        }
        if crate::planted::is_planted("split-drops-entry") {
            self.planted_drop_last_write(&children, batch)?;
        }
        effects.state = Some(parent.clone());
        Ok(CommandResponse::Split(Ok(SplitDone { parent, children })))
    }

    /// Planted bug `split-drops-entry`: each child loses the newest document write of its
    /// range (the document with the highest version is deleted).
    fn planted_drop_last_write(&self, children: &[GroupState], batch: &mut WriteBatch) -> Result<(), StorageError> {
        for child in children {
            let pairs = self.engine.scan(Cf::Data, &child.start, &child.end, usize::MAX).map_err(sm_read_err)?;
            let newest = pairs.iter().filter_map(|(k, v)| StoredDoc::decode(v).map(|d| (d.version, k.clone()))).max();
            if let Some((_, key)) = newest {
                batch.delete(Cf::Data, key);
            }
        }
        Ok(())
    }

    /// Applies one atomic document batch of the entry at `index`. `written` holds what
    /// earlier batches of the same entry wrote (documents and request ids): reads do not see
    /// the entry's pending write batch, so a batch touching one of those documents is refused
    /// with `Retry` (the proposal batcher never builds such an entry; this keeps apply
    /// deterministic and versions strictly increasing even if one did).
    fn apply_docs(
        &self,
        index: u64,
        doc_batch: &DocBatch,
        batch: &mut WriteBatch,
        written: &mut EntryWrites,
    ) -> Result<CommandResponse, StorageError> {
        let engine = &self.engine;
        if self.group == keys::META_GROUP {
            return Ok(CommandResponse::WrongGroup("document writes go to a shard group".into()));
        }
        // The stored answer first: a retry of a request applied before a split must get its
        // answer, not a refusal that would send it to the child to be applied twice.
        if let Some(id) = &doc_batch.request_id {
            if let Some(earlier) = written.answers.get(id) {
                return Ok(earlier.clone());
            }
            if let Some(stored) = engine.get(Cf::RaftMeta, &keys::dedup_key(self.group, id)).map_err(sm_read_err)? {
                // A retried proposal of a request that was applied already.
                return serde_json::from_slice(&stored).map_err(sm_read_err);
            }
        }
        if let Some(ShardStatus::Frozen { into, .. }) = self.state.as_ref().map(|s| &s.status) {
            // Certainly not applied: the merge commits (and routes the write to the merged
            // group) or aborts (and this group takes it) soon.
            return Ok(CommandResponse::Retry(format!("shard {} is being merged into shard {into}", self.group)));
        }
        let keys: Vec<Vec<u8>> =
            doc_batch.ops.iter().map(|op| keys::doc_key(&doc_batch.tenant, &op.collection, &op.id)).collect();
        for (op, key) in doc_batch.ops.iter().zip(&keys) {
            if !self.owns(key) {
                return Ok(CommandResponse::WrongGroup(format!(
                    "{}/{} is outside shard {}",
                    op.collection, op.id, self.group
                )));
            }
        }
        if keys.iter().any(|k| written.docs.contains(k)) {
            return Ok(CommandResponse::Retry("a document of this batch was written earlier in the same entry".into()));
        }
        let read = |k: &[u8]| -> Result<Option<StoredDoc>, EngineError> {
            match engine.get(Cf::Data, k)? {
                None => Ok(None),
                Some(v) => StoredDoc::decode(&v)
                    .map(Some)
                    .ok_or_else(|| EngineError::Corrupt(format!("document at {}", keys::to_hex(k)))),
            }
        };
        let outcome = docs::apply_batch(read, index, doc_batch).map_err(sm_read_err)?;
        let resp = match outcome {
            Ok((changes, results)) => {
                for (k, v) in changes {
                    match v {
                        Some(doc) => batch.put(Cf::Data, k, doc.encode()),
                        None => batch.delete(Cf::Data, k),
                    }
                }
                written.docs.extend(keys);
                CommandResponse::Docs(Ok(results))
            }
            Err(e) => CommandResponse::Docs(Err(e)),
        };
        if let Some(id) = &doc_batch.request_id {
            batch.put(Cf::RaftMeta, keys::dedup_key(self.group, id), json(&resp)?);
            written.answers.insert(id.to_string(), resp.clone());
            written.request_ids.push(id.to_string());
            // One record per entry listing its request ids (newline separated), for eviction.
            batch.put(
                Cf::RaftMeta,
                keys::dedup_index_key(self.group, index),
                written.request_ids.join("\n").into_bytes(),
            );
        }
        Ok(resp)
    }

    /// Forgets the requests applied `DEDUP_WINDOW` entries ago (runs for every entry, so every
    /// record is evicted exactly once, deterministically on every replica).
    fn evict_dedup(&self, index: u64, batch: &mut WriteBatch) -> Result<(), StorageError> {
        if self.group == keys::META_GROUP || index <= DEDUP_WINDOW {
            return Ok(());
        }
        let old = keys::dedup_index_key(self.group, index - DEDUP_WINDOW);
        if let Some(ids) = self.engine.get(Cf::RaftMeta, &old).map_err(sm_read_err)? {
            for id in String::from_utf8_lossy(&ids).split('\n') {
                batch.delete(Cf::RaftMeta, keys::dedup_key(self.group, id));
            }
            batch.delete(Cf::RaftMeta, old);
        }
        Ok(())
    }

    /// Prefix (in `raft_meta`) of every stored-answer record of this group.
    fn answers_prefix(&self) -> Vec<u8> {
        keys::group_meta_key(self.group, "dedup")
    }

    /// A view of the group's state at its applied index: its metadata, and an engine
    /// snapshot of its range and answers read only when the snapshot is sent.
    fn view(&self) -> Result<(SnapshotMeta, SnapshotView), StorageError> {
        let data_range = match &self.state {
            // A retired group owns nothing (its range is the merged group's).
            Some(s) if !s.is_retired() => Some((s.start.clone(), s.end.clone())),
            _ => None,
        };
        let answers_prefix = self.answers_prefix();
        let mut ranges =
            vec![KeyRange { cf: Cf::RaftMeta, start: answers_prefix.clone(), end: prefix_end(&answers_prefix) }];
        if let Some((start, end)) = &data_range {
            ranges.push(KeyRange { cf: Cf::Data, start: start.clone(), end: end.clone() });
        }
        let engine = self.engine.snapshot(&ranges).map_err(sm_read_err)?;
        let snapshot_id = match self.applied {
            Some(l) => format!("g{}-t{}-i{}", self.group, l.leader_id.term, l.index),
            None => format!("g{}-empty", self.group),
        };
        let meta = SnapshotMeta { last_log_id: self.applied, last_membership: self.membership.clone(), snapshot_id };
        Ok((meta, SnapshotView { state: self.state.clone(), data_range, answers_prefix, engine }))
    }

    /// Publishes what an apply or install changed, once its batch is written.
    fn publish(&mut self, effects: Effects) {
        if let Some(state) = effects.state {
            self.ctx.local.set(state.clone());
            if let ShardStatus::Retired { into, .. } = state.status {
                self.ctx.local.raise(GroupEvent::Retired { group: self.group, into });
            }
            self.state = Some(state);
        }
        if !effects.born.is_empty() {
            for child in &effects.born {
                self.ctx.local.set(child.clone());
            }
            let children = effects.born.iter().map(|c| c.id).collect();
            self.ctx.local.raise(GroupEvent::ChildrenBorn { parent: self.group, children });
        }
        if effects.shard_map_changed {
            self.ctx.catalog.invalidate();
        }
    }
}

/// What earlier batches of the log entry being applied wrote.
#[derive(Default)]
struct EntryWrites {
    docs: std::collections::BTreeSet<Vec<u8>>,
    answers: std::collections::BTreeMap<String, CommandResponse>,
    request_ids: Vec<String>,
}

/// Builds a snapshot from the view taken when the builder was made.
pub struct GroupSnapshotBuilder {
    captured: Option<(SnapshotMeta, SnapshotView)>,
    taken: SnapshotTaken,
}

impl RaftSnapshotBuilder<TypeConfig> for GroupSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let (meta, view) =
            self.captured.take().ok_or_else(|| sm_read_err(std::io::Error::other("snapshot builder used twice")))?;
        self.taken.store(true, Ordering::Release);
        Ok(Snapshot { meta, snapshot: Box::new(SnapshotData::View(view)) })
    }
}

impl RaftStateMachine<TypeConfig> for GroupStateMachine {
    type SnapshotBuilder = GroupSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut responses = Vec::new();
        for entry in entries {
            let log_id = entry.log_id;
            if self.applied.is_some_and(|a| a.index >= log_id.index) {
                // Already applied (restart re-apply); the stored state includes it.
                responses.push(CommandResponse::None);
                continue;
            }
            let mut batch = WriteBatch::new();
            let mut effects = Effects::default();
            let resp = match &entry.payload {
                EntryPayload::Blank => CommandResponse::None,
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(log_id), m.clone());
                    batch.put(Cf::RaftMeta, keys::group_meta_key(self.group, "membership"), json(&self.membership)?);
                    CommandResponse::None
                }
                EntryPayload::Normal(cmd) => self.apply_command(&log_id, cmd, &mut batch, &mut effects)?,
            };
            self.evict_dedup(log_id.index, &mut batch)?;
            self.put_applied(&mut batch, &log_id)?;
            self.engine.write(batch, false).map_err(sm_write_err)?;
            self.applied = Some(log_id);
            self.publish(effects);
            responses.push(resp);
        }
        if let Some(a) = self.applied {
            self.applied_progress.advance(a.index);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Taken here, on the state machine task, so the view is consistent with `applied`.
        let captured = match self.view() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(group = self.group, error = %e, "capturing snapshot data failed");
                None
            }
        };
        GroupSnapshotBuilder { captured, taken: self.snapshot_taken.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        Ok(Box::new(SnapshotData::Encoded(Vec::new())))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Box<SnapshotData>) -> Result<(), StorageError> {
        let data = snapshot.into_bytes().map_err(sm_read_err)?;
        let malformed =
            |what: String| sm_read_err(std::io::Error::other(format!("snapshot {}: {what}", meta.snapshot_id)));
        let image = SnapshotImage::decode(&data).ok_or_else(|| malformed("malformed".into()))?;
        drop(data); // the image holds it all now
        let state = image.state.clone().or_else(|| self.state.clone());
        let mut batch = WriteBatch::new();
        let marker = keys::group_meta_key(self.group, RETIRED_BY_SNAPSHOT);
        if state.as_ref().is_some_and(|s| s.is_retired()) {
            batch.put(Cf::RaftMeta, marker, b"1".to_vec());
        } else {
            batch.delete(Cf::RaftMeta, marker);
        }
        if let Some(s) = &state {
            // Only the snapshot's own range: data beyond it (a split this replica missed)
            // belongs to another group. A retired group's range is the merged group's.
            if !s.is_retired() {
                batch.delete_range(Cf::Data, s.start.clone(), s.end.clone());
            }
            batch.put(Cf::RaftMeta, keys::group_meta_key(self.group, "desc"), json(s)?);
        }
        for (k, v) in image.data {
            if !state.as_ref().is_some_and(|s| s.contains(&k)) {
                return Err(malformed(format!("holds key {} outside group {}", keys::to_hex(&k), self.group)));
            }
            batch.put(Cf::Data, k, v);
        }
        let prefix = self.answers_prefix();
        batch.delete_range(Cf::RaftMeta, prefix.clone(), prefix_end(&prefix));
        for (k, v) in image.answers {
            if !k.starts_with(&prefix) {
                return Err(malformed(format!("holds a record {} of another group", keys::to_hex(&k))));
            }
            batch.put(Cf::RaftMeta, k, v);
        }
        batch.put(Cf::RaftMeta, keys::group_meta_key(self.group, "applied"), json(&meta.last_log_id)?);
        batch.put(Cf::RaftMeta, keys::group_meta_key(self.group, "membership"), json(&meta.last_membership)?);
        self.engine.write(batch, true).map_err(sm_write_err)?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.snapshot_taken.store(true, Ordering::Release);
        let effects = Effects { state, born: Vec::new(), shard_map_changed: self.group == keys::META_GROUP };
        self.publish(effects);
        if let Some(a) = self.applied {
            self.applied_progress.advance(a.index);
        }
        Ok(())
    }

    /// The state as of now (at or above the newest snapshot built or installed, on the state
    /// machine's task: consistent with `applied`), or `None` before any snapshot.
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        if !self.snapshot_taken.load(Ordering::Acquire) {
            return Ok(None);
        }
        let (meta, view) = self.view()?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(SnapshotData::View(view)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docs::{DocAction, DocBatch, DocOp, Limits};
    use crate::storage::mem::MemEngine;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64, cmd: Command) -> Entry {
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(cmd) }
    }

    fn context() -> (SmContext, tokio::sync::mpsc::UnboundedReceiver<GroupEvent>) {
        let (local, events) = LocalShards::new();
        (SmContext { local, catalog: Arc::default() }, events)
    }

    fn first_shard(engine: &Engine) -> GroupStateMachine {
        GroupStateMachine::open(keys::FIRST_SHARD, engine.clone(), context().0).unwrap()
    }

    /// The membership entry a group starts with (a split needs a uniform membership).
    fn members(index: u64) -> Entry {
        let m = openraft::Membership::new(
            vec![std::collections::BTreeSet::from([1u64])],
            std::collections::BTreeMap::from([(1u64, openraft::BasicNode { addr: "a:1".into() })]),
        );
        Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Membership(m) }
    }

    /// A put of `{"l":[]}` as document `id` of collection `c`.
    fn put_batch(id: &str, request_id: &str) -> DocBatch {
        DocBatch {
            tenant: "t".into(),
            ops: vec![DocOp {
                collection: "c".into(),
                id: id.into(),
                action: DocAction::Put { json: r#"{"l":[]}"#.into(), expected: None },
            }],
            limits: Limits::default(),
            request_id: Some(request_id.into()),
        }
    }

    fn append(id: &str, request_id: &str) -> Command {
        Command::Docs(DocBatch {
            tenant: "t".into(),
            ops: vec![DocOp {
                collection: "c".into(),
                id: id.into(),
                action: DocAction::JsonPatch {
                    patch: r#"[{"op":"add","path":"/l/-","value":1}]"#.into(),
                    expected: None,
                },
            }],
            limits: Limits::default(),
            request_id: Some(request_id.into()),
        })
    }

    /// A proposal retried after an ambiguous failure (same request id, later index) must not
    /// apply twice: the stored answer comes back and the document is unchanged.
    #[tokio::test]
    async fn retried_request_applies_once() {
        let engine: Engine = std::sync::Arc::new(MemEngine::new());
        let mut sm = first_shard(&engine);
        let create = Command::Docs(put_batch("d", "r0"));
        sm.apply(vec![entry(1, create), entry(2, append("d", "r1"))]).await.unwrap();
        let first = sm.apply(vec![entry(3, append("d", "r1"))]).await.unwrap();
        let stored = StoredDoc::decode(&engine.get(Cf::Data, &keys::doc_key("t", "c", "d")).unwrap().unwrap()).unwrap();
        assert_eq!(stored.json, r#"{"l":[1]}"#, "the retry did not append again");
        assert_eq!(stored.version, 2);
        match &first[0] {
            CommandResponse::Docs(Ok(r)) => assert_eq!(r[0].version, 2, "the retry gets the first answer"),
            other => panic!("unexpected {other:?}"),
        }
        sm.apply(vec![entry(4, append("d", "r2"))]).await.unwrap();
        let stored = StoredDoc::decode(&engine.get(Cf::Data, &keys::doc_key("t", "c", "d")).unwrap().unwrap()).unwrap();
        assert_eq!(stored.json, r#"{"l":[1,1]}"#, "a new request applies");
    }

    /// A snapshot's data is not kept once built: the current snapshot is the state as of the
    /// read (a write applied after the build is in it), and there is none before a build. A
    /// built snapshot read after a later write still holds only its own index's state.
    #[tokio::test]
    async fn the_current_snapshot_is_the_state_when_read() {
        let engine: Engine = std::sync::Arc::new(MemEngine::new());
        let mut sm = first_shard(&engine);
        let put = |id: &str, index: u64| entry(index, Command::Docs(put_batch(id, &format!("r{index}"))));
        sm.apply(vec![put("a", 1)]).await.unwrap();
        assert!(sm.get_current_snapshot().await.unwrap().is_none(), "no snapshot before a build");
        let built = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(built.meta.last_log_id.map(|l| l.index), Some(1));
        sm.apply(vec![put("b", 2)]).await.unwrap();
        let image = SnapshotImage::decode(&built.snapshot.into_bytes().unwrap()).expect("an image");
        assert_eq!(image.data.len(), 1, "a snapshot read after a later write holds its own index's state");
        let current = sm.get_current_snapshot().await.unwrap().expect("a snapshot after a build");
        assert_eq!(current.meta.last_log_id.map(|l| l.index), Some(2));
        let image = SnapshotImage::decode(&current.snapshot.into_bytes().unwrap()).expect("an image");
        let ids: Vec<Vec<u8>> = image.data.into_iter().map(|(k, _)| k).collect();
        assert_eq!(ids, vec![keys::doc_key("t", "c", "a"), keys::doc_key("t", "c", "b")]);
    }

    /// A batched entry applies each batch on its own: disjoint batches share the entry's
    /// version, a batch overlapping an earlier one of the entry is refused (retry), a request
    /// repeated in the entry gets the first answer, and dedup records of every batch are
    /// evicted together.
    #[tokio::test]
    async fn batched_entry_applies_each_batch_on_its_own() {
        let engine: Engine = std::sync::Arc::new(MemEngine::new());
        let mut sm = first_shard(&engine);
        let many = Command::DocsMany(vec![
            put_batch("a", "r1"),
            put_batch("b", "r2"),
            put_batch("a", "r3"),
            put_batch("c", "r1"),
        ]);
        let out = sm.apply(vec![entry(7, many)]).await.unwrap();
        let CommandResponse::Many(answers) = &out[0] else { panic!("unexpected {out:?}") };
        assert!(matches!(&answers[0], CommandResponse::Docs(Ok(r)) if r[0].version == 7));
        assert!(matches!(&answers[1], CommandResponse::Docs(Ok(r)) if r[0].version == 7 && r[0].id == "b"));
        assert!(matches!(&answers[2], CommandResponse::Retry(_)), "{:?}", answers[2]);
        assert_eq!(answers[3], answers[0], "a repeated request id gets the first answer");
        assert!(engine.get(Cf::Data, &keys::doc_key("t", "c", "c")).unwrap().is_none());
        let ids = engine.get(Cf::RaftMeta, &keys::dedup_index_key(keys::FIRST_SHARD, 7)).unwrap().unwrap();
        // The refused batch left no answer behind: proposing it again applies it.
        assert_eq!(String::from_utf8(ids).unwrap(), "r1\nr2");
        assert!(engine.get(Cf::RaftMeta, &keys::dedup_key(keys::FIRST_SHARD, "r3")).unwrap().is_none());
        // Eviction DEDUP_WINDOW entries later forgets both.
        let mut batch = WriteBatch::new();
        sm.evict_dedup(7 + DEDUP_WINDOW, &mut batch).unwrap();
        engine.write(batch, false).unwrap();
        for rid in ["r1", "r2"] {
            assert!(
                engine.get(Cf::RaftMeta, &keys::dedup_key(keys::FIRST_SHARD, rid)).unwrap().is_none(),
                "{rid} evicted"
            );
        }
    }

    fn put_doc(id: &str, rid: &str) -> Command {
        Command::Docs(DocBatch {
            tenant: "t".into(),
            ops: vec![DocOp {
                collection: "c".into(),
                id: id.into(),
                action: DocAction::Put { json: "{}".into(), expected: None },
            }],
            limits: Limits::default(),
            request_id: Some(rid.into()),
        })
    }

    /// A split shrinks the parent, seeds the child at the split entry (so its log, and every
    /// version it writes, continues above the parent's), refuses writes outside the new
    /// range, still answers a retry of a request applied before the split, and refuses a
    /// repeated split by its epoch.
    #[tokio::test]
    async fn split_seeds_the_child_and_moves_ownership() {
        let engine: Engine = Arc::new(MemEngine::new());
        let (ctx, mut events) = context();
        let mut sm = GroupStateMachine::open(keys::FIRST_SHARD, engine.clone(), ctx.clone()).unwrap();
        sm.apply(vec![members(0), entry(1, put_doc("x", "r1"))]).await.unwrap();
        let split_key = keys::doc_key("t", "c", "m");
        let split = Command::Split { expected_epoch: 1, at: vec![SplitAt { key: split_key.clone(), child: 9 }] };
        let out = sm.apply(vec![entry(2, split.clone())]).await.unwrap();
        let CommandResponse::Split(Ok(done)) = &out[0] else { panic!("unexpected {out:?}") };
        assert_eq!((done.parent.end.clone(), done.parent.epoch), (split_key.clone(), 2));
        assert_eq!(done.children[0].born_from, Some((keys::FIRST_SHARD, 2)));
        assert_eq!(
            events.try_recv().unwrap(),
            GroupEvent::ChildrenBorn { parent: keys::FIRST_SHARD, children: vec![9] }
        );
        assert_eq!(ctx.local.get(9).map(|c| c.start), Some(split_key.clone()));
        assert_eq!(ctx.local.range_map().lookup(&keys::doc_key("t", "c", "x")), Some((9, 2)));
        let purged: LogId =
            serde_json::from_slice(&engine.get(Cf::RaftMeta, &keys::group_meta_key(9, "purged")).unwrap().unwrap())
                .unwrap();
        assert_eq!(purged.index, 2);
        // The parent no longer takes writes for x, but a retry of r1 gets its first answer.
        let out = sm.apply(vec![entry(3, put_doc("x", "r2")), entry(4, put_doc("x", "r1"))]).await.unwrap();
        assert!(matches!(&out[0], CommandResponse::WrongGroup(_)), "{:?}", out[0]);
        assert!(matches!(&out[1], CommandResponse::Docs(Ok(r)) if r[0].version == 1), "{:?}", out[1]);
        let again = sm.apply(vec![entry(5, split)]).await.unwrap();
        assert!(matches!(&again[0], CommandResponse::Split(Err(SplitRefused::EpochChanged { .. }))), "{again:?}");
        // The child opens with the seeded state.
        let child = GroupStateMachine::open(9, engine.clone(), ctx).unwrap();
        assert_eq!(child.applied.map(|l| l.index), Some(2));
        assert!(child.owns(&keys::doc_key("t", "c", "x")));
    }

    /// A snapshot carries the group's state and answers; installing it on a replica that
    /// missed a split replaces only the snapshot's range.
    #[tokio::test]
    async fn snapshot_install_replaces_only_its_own_range() {
        let leader: Engine = Arc::new(MemEngine::new());
        let mut sm = first_shard(&leader);
        let split_key = keys::doc_key("t", "c", "m");
        sm.apply(vec![members(0), entry(1, put_doc("a", "r1")), entry(2, put_doc("x", "r2"))]).await.unwrap();
        let split = Command::Split { expected_epoch: 1, at: vec![SplitAt { key: split_key.clone(), child: 9 }] };
        sm.apply(vec![entry(3, split), entry(4, put_doc("b", "r3"))]).await.unwrap();
        let snapshot = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();

        // A lagging replica that only saw the first two writes.
        let lagging: Engine = Arc::new(MemEngine::new());
        let mut behind = first_shard(&lagging);
        behind.apply(vec![members(0), entry(1, put_doc("a", "r1")), entry(2, put_doc("x", "r2"))]).await.unwrap();
        behind.install_snapshot(&snapshot.meta, snapshot.snapshot).await.unwrap();
        assert_eq!(behind.state.as_ref().map(|s| s.end.clone()), Some(split_key));
        assert!(lagging.get(Cf::Data, &keys::doc_key("t", "c", "b")).unwrap().is_some());
        assert!(
            lagging.get(Cf::Data, &keys::doc_key("t", "c", "x")).unwrap().is_some(),
            "data beyond the snapshot's range is left for the group that owns it"
        );
        assert!(lagging.get(Cf::RaftMeta, &keys::dedup_key(keys::FIRST_SHARD, "r3")).unwrap().is_some());
    }

    /// A frozen group refuses writes (retry: certainly not applied) but still answers a
    /// retry of an earlier request; a merge step is refused for other voters; a retired group
    /// owns nothing.
    #[tokio::test]
    async fn merge_steps_freeze_then_retire_the_group() {
        let engine: Engine = Arc::new(MemEngine::new());
        let (ctx, mut events) = context();
        let mut sm = GroupStateMachine::open(keys::FIRST_SHARD, engine.clone(), ctx).unwrap();
        sm.apply(vec![members(0), entry(1, put_doc("x", "r1"))]).await.unwrap();
        let (start, end) = keys::initial_group_range(keys::FIRST_SHARD);
        let freeze = |voters: Vec<u64>| Command::Freeze {
            into: 9,
            partner: 5,
            expected_epoch: 1,
            start: start.clone(),
            end: end.clone(),
            voters,
        };
        let out = sm.apply(vec![entry(2, freeze(vec![1, 2]))]).await.unwrap();
        assert!(matches!(&out[0], CommandResponse::Merge(Err(MergeRefused::ReplicasDiffer { .. }))), "{out:?}");
        let out = sm
            .apply(vec![entry(3, freeze(vec![1])), entry(4, put_doc("y", "r2")), entry(5, put_doc("x", "r1"))])
            .await
            .unwrap();
        assert!(matches!(&out[0], CommandResponse::Merge(Ok(_))), "{out:?}");
        assert!(matches!(&out[1], CommandResponse::Retry(_)), "{:?}", out[1]);
        assert!(matches!(&out[2], CommandResponse::Docs(Ok(r)) if r[0].version == 1), "{:?}", out[2]);
        let out = sm.apply(vec![entry(6, Command::Retire { into: 9 }), entry(7, put_doc("y", "r3"))]).await.unwrap();
        assert!(matches!(&out[0], CommandResponse::Merge(Ok(g)) if g.is_retired()), "{out:?}");
        assert!(matches!(&out[1], CommandResponse::WrongGroup(_)), "{:?}", out[1]);
        assert_eq!(events.try_recv().unwrap(), GroupEvent::Retired { group: keys::FIRST_SHARD, into: 9 });
        let stored = read_state(&engine, keys::FIRST_SHARD).unwrap().unwrap();
        assert!(matches!(stored.status, ShardStatus::Retired { into: 9, at, .. } if at.index == 6));
    }

    /// Regression (process fault test, 5-minute run): a node restarted mid-merge installed a
    /// snapshot of an already retired part, which carries no data, then seeded the merged
    /// shard from the stale data it held and served a stale strong read. Such a replica is
    /// marked, and the merge refuses to seed from it (`merge.rs`).
    #[tokio::test]
    async fn a_part_retired_by_snapshot_is_marked_and_its_stale_data_untouched() {
        let leader: Engine = Arc::new(MemEngine::new());
        let (ctx, _events) = context();
        let mut sm = GroupStateMachine::open(keys::FIRST_SHARD, leader.clone(), ctx).unwrap();
        let (start, end) = keys::initial_group_range(keys::FIRST_SHARD);
        let freeze = Command::Freeze { into: 9, partner: 5, expected_epoch: 1, start, end, voters: vec![1] };
        sm.apply(vec![
            members(0),
            entry(1, put_doc("x", "r1")),
            entry(2, freeze),
            entry(3, Command::Retire { into: 9 }),
        ])
        .await
        .unwrap();
        assert!(!retired_by_snapshot(&leader, keys::FIRST_SHARD).unwrap(), "retired by applying its log");
        let snapshot = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();

        // A replica holding an old copy of x (from before a restart) installs it.
        let lagging: Engine = Arc::new(MemEngine::new());
        let mut stale = WriteBatch::new();
        stale.put(Cf::Data, keys::doc_key("t", "c", "x"), b"old".to_vec());
        lagging.write(stale, true).unwrap();
        let mut behind = first_shard(&lagging);
        behind.install_snapshot(&snapshot.meta, snapshot.snapshot).await.unwrap();
        assert!(behind.state.as_ref().is_some_and(|s| s.is_retired()));
        assert!(retired_by_snapshot(&lagging, keys::FIRST_SHARD).unwrap());
        assert_eq!(lagging.get(Cf::Data, &keys::doc_key("t", "c", "x")).unwrap(), Some(b"old".to_vec()));
    }
}
