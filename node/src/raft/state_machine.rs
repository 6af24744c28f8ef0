//! A raft group's state machine on the node's shared engine.
//!
//! Owns: applying committed entries (documents for shard groups, the catalog for the meta
//! group), the group's `applied` and `membership` fields, and its snapshots.
//!
//! Invariants:
//! - each entry's effects and the new applied log id go into one atomic write batch, so a
//!   crash never leaves data and applied index disagreeing, and re-applying after restart is
//!   a no-op (apply is idempotent by construction: the applied id is read back on start);
//! - a group only ever writes keys inside its data range; a command for keys outside it is
//!   refused deterministically (`CommandResponse::WrongGroup`);
//! - apply reads nothing but the entry and stored state (no clock, no randomness).
//!
//! Snapshots hold the group's data range in memory (`Cursor<Vec<u8>>`, streamed in chunks
//! over the network). A file-backed snapshot is the next step for large shards.

use super::types::{
    Command, CommandResponse, Entry, GroupId, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use crate::catalog;
use crate::docs::{self, DocBatch, StoredDoc};
use crate::keys;
use crate::signal::Progress;
use crate::storage::engine::in_range;
use crate::storage::{Cf, Engine, EngineError, WriteBatch};
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageIOError};
use std::io::Cursor;
use std::sync::{Arc, Mutex};

/// Log entries for which a request's answer is kept: a retried proposal arriving later than
/// this is applied again (a retry comes within the request timeout, seconds).
pub const DEDUP_WINDOW: u64 = 100_000;

/// Snapshot data kept for sending to followers: meta and encoded pairs.
type StoredSnapshot = Arc<Mutex<Option<(SnapshotMeta, Vec<u8>)>>>;

/// State machine of one group.
pub struct GroupStateMachine {
    group: GroupId,
    engine: Engine,
    range: (Vec<u8>, Vec<u8>),
    applied: Option<LogId>,
    membership: StoredMembership,
    current_snapshot: StoredSnapshot,
    /// Advanced after every apply to the last applied index (for waiting readers).
    applied_progress: Arc<Progress>,
}

fn sm_read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_state_machine(&e).into()
}
fn sm_write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_state_machine(&e).into()
}

/// Encodes key-value pairs as `u32 len | key | u32 len | value` repeated.
pub fn encode_pairs(pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&(v.len() as u32).to_be_bytes());
        out.extend_from_slice(v);
    }
    out
}

/// Decodes `encode_pairs` output; `None` on truncated or malformed input.
pub fn decode_pairs(mut bytes: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    let take = |bytes: &mut &[u8]| -> Option<Vec<u8>> {
        let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        let item = bytes.get(4..4 + len)?.to_vec();
        *bytes = &bytes[4 + len..];
        Some(item)
    };
    while !bytes.is_empty() {
        let k = take(&mut bytes)?;
        let v = take(&mut bytes)?;
        out.push((k, v));
    }
    Some(out)
}

impl GroupStateMachine {
    /// Loads the group's applied state from `engine`.
    pub fn open(group: GroupId, engine: Engine, range: (Vec<u8>, Vec<u8>)) -> Result<Self, EngineError> {
        let read = |field: &str| engine.get(Cf::RaftMeta, &keys::group_meta_key(group, field));
        let applied: Option<LogId> = match read("applied")? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| EngineError::Corrupt(format!("applied: {e}")))?,
            None => None,
        };
        let membership: StoredMembership = match read("membership")? {
            Some(v) => serde_json::from_slice(&v).map_err(|e| EngineError::Corrupt(format!("membership: {e}")))?,
            None => StoredMembership::default(),
        };
        let applied_progress = Arc::new(Progress::new(applied.map(|l| l.index).unwrap_or(0)));
        Ok(Self { group, engine, range, applied, membership, current_snapshot: Arc::default(), applied_progress })
    }

    /// The last applied index, for readers waiting on a position.
    pub fn applied_progress(&self) -> Arc<Progress> {
        self.applied_progress.clone()
    }

    fn put_applied(&self, batch: &mut WriteBatch, log_id: &LogId) -> Result<(), StorageError> {
        batch.put(
            Cf::RaftMeta,
            keys::group_meta_key(self.group, "applied"),
            serde_json::to_vec(&Some(log_id)).map_err(sm_write_err)?,
        );
        Ok(())
    }

    fn apply_command(
        &self,
        index: u64,
        cmd: &Command,
        batch: &mut WriteBatch,
    ) -> Result<CommandResponse, StorageError> {
        let engine = &self.engine;
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
                if self.group == keys::META_GROUP {
                    return Ok(CommandResponse::WrongGroup("collection data lives in shard groups".into()));
                }
                let prefix = keys::collection_prefix(tenant, collection);
                let end = crate::storage::engine::prefix_end(&prefix);
                // Clamp to this shard's range so a group never deletes keys it does not own.
                let start = std::cmp::max(prefix, self.range.0.clone());
                let end = if self.range.1.is_empty() || (!end.is_empty() && end < self.range.1) {
                    end
                } else {
                    self.range.1.clone()
                };
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
                let (changes, resp) = catalog::apply(read, index, cmd).map_err(sm_read_err)?;
                for (k, v) in changes {
                    match v {
                        Some(v) => batch.put(Cf::Data, k, v),
                        None => batch.delete(Cf::Data, k),
                    }
                }
                Ok(CommandResponse::Catalog(resp))
            }
        }
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
        let keys: Vec<Vec<u8>> =
            doc_batch.ops.iter().map(|op| keys::doc_key(&doc_batch.tenant, &op.collection, &op.id)).collect();
        for (op, key) in doc_batch.ops.iter().zip(&keys) {
            if !in_range(key, &self.range.0, &self.range.1) {
                return Ok(CommandResponse::WrongGroup(format!(
                    "{}/{} is outside shard {}",
                    op.collection, op.id, self.group
                )));
            }
        }
        if let Some(id) = &doc_batch.request_id {
            if let Some(earlier) = written.answers.get(id) {
                return Ok(earlier.clone());
            }
            if let Some(stored) = engine.get(Cf::Data, &keys::dedup_key(id)).map_err(sm_read_err)? {
                // A retried proposal of a request that was applied already.
                return serde_json::from_slice(&stored).map_err(sm_read_err);
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
            batch.put(Cf::Data, keys::dedup_key(id), serde_json::to_vec(&resp).map_err(sm_write_err)?);
            written.answers.insert(id.to_string(), resp.clone());
            written.request_ids.push(id.to_string());
            // One record per entry listing its request ids (newline separated), for eviction.
            batch.put(Cf::Data, keys::dedup_index_key(index), written.request_ids.join("\n").into_bytes());
        }
        Ok(resp)
    }

    /// Forgets the request applied `DEDUP_WINDOW` entries ago (runs for every entry, so every
    /// record is evicted exactly once, deterministically on every replica).
    fn evict_dedup(&self, index: u64, batch: &mut WriteBatch) -> Result<(), StorageError> {
        if self.group == keys::META_GROUP || index <= DEDUP_WINDOW {
            return Ok(());
        }
        let old = keys::dedup_index_key(index - DEDUP_WINDOW);
        if let Some(ids) = self.engine.get(Cf::Data, &old).map_err(sm_read_err)? {
            for id in String::from_utf8_lossy(&ids).split('\n') {
                batch.delete(Cf::Data, keys::dedup_key(id));
            }
            batch.delete(Cf::Data, old);
        }
        Ok(())
    }

    fn capture(&self) -> Result<(SnapshotMeta, Vec<u8>), StorageError> {
        let pairs = self.engine.scan(Cf::Data, &self.range.0, &self.range.1, usize::MAX).map_err(sm_read_err)?;
        let snapshot_id = match self.applied {
            Some(l) => format!("g{}-t{}-i{}", self.group, l.leader_id.term, l.index),
            None => format!("g{}-empty", self.group),
        };
        let meta = SnapshotMeta { last_log_id: self.applied, last_membership: self.membership.clone(), snapshot_id };
        Ok((meta, encode_pairs(&pairs)))
    }
}

/// What earlier batches of the log entry being applied wrote.
#[derive(Default)]
struct EntryWrites {
    docs: std::collections::BTreeSet<Vec<u8>>,
    answers: std::collections::BTreeMap<String, CommandResponse>,
    request_ids: Vec<String>,
}

/// Builds a snapshot from data captured when the builder was made.
pub struct GroupSnapshotBuilder {
    captured: Option<(SnapshotMeta, Vec<u8>)>,
    store: StoredSnapshot,
}

impl RaftSnapshotBuilder<TypeConfig> for GroupSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let (meta, data) =
            self.captured.take().ok_or_else(|| sm_read_err(std::io::Error::other("snapshot builder used twice")))?;
        if let Ok(mut slot) = self.store.lock() {
            // A build captured earlier may finish after a newer snapshot was installed; keep
            // the newest (openraft's own record only moves forward too).
            if slot.as_ref().is_none_or(|(stored, _)| stored.last_log_id <= meta.last_log_id) {
                *slot = Some((meta.clone(), data.clone()));
            }
        }
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
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
            let resp = match &entry.payload {
                EntryPayload::Blank => CommandResponse::None,
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(log_id), m.clone());
                    batch.put(
                        Cf::RaftMeta,
                        keys::group_meta_key(self.group, "membership"),
                        serde_json::to_vec(&self.membership).map_err(sm_write_err)?,
                    );
                    CommandResponse::None
                }
                EntryPayload::Normal(cmd) => self.apply_command(log_id.index, cmd, &mut batch)?,
            };
            self.evict_dedup(log_id.index, &mut batch)?;
            self.put_applied(&mut batch, &log_id)?;
            self.engine.write(batch, false).map_err(sm_write_err)?;
            self.applied = Some(log_id);
            responses.push(resp);
        }
        if let Some(a) = self.applied {
            self.applied_progress.advance(a.index);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Captured here, on the state machine task, so the view is consistent with `applied`.
        let captured = match self.capture() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(group = self.group, error = %e, "capturing snapshot data failed");
                None
            }
        };
        GroupSnapshotBuilder { captured, store: self.current_snapshot.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let pairs = decode_pairs(&data)
            .ok_or_else(|| sm_read_err(std::io::Error::other(format!("snapshot {} is malformed", meta.snapshot_id))))?;
        let mut batch = WriteBatch::new();
        batch.delete_range(Cf::Data, self.range.0.clone(), self.range.1.clone());
        for (k, v) in pairs {
            if !in_range(&k, &self.range.0, &self.range.1) {
                return Err(sm_read_err(std::io::Error::other(format!(
                    "snapshot {} holds key {} outside group {}",
                    meta.snapshot_id,
                    keys::to_hex(&k),
                    self.group
                ))));
            }
            batch.put(Cf::Data, k, v);
        }
        batch.put(
            Cf::RaftMeta,
            keys::group_meta_key(self.group, "applied"),
            serde_json::to_vec(&meta.last_log_id).map_err(sm_write_err)?,
        );
        batch.put(
            Cf::RaftMeta,
            keys::group_meta_key(self.group, "membership"),
            serde_json::to_vec(&meta.last_membership).map_err(sm_write_err)?,
        );
        self.engine.write(batch, true).map_err(sm_write_err)?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        if let Ok(mut slot) = self.current_snapshot.lock() {
            *slot = Some((meta.clone(), data));
        }
        if let Some(a) = self.applied {
            self.applied_progress.advance(a.index);
        }
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let slot =
            self.current_snapshot.lock().map_err(|_| sm_read_err(std::io::Error::other("snapshot lock poisoned")))?;
        Ok(slot
            .as_ref()
            .map(|(meta, data)| Snapshot { meta: meta.clone(), snapshot: Box::new(Cursor::new(data.clone())) }))
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
        let mut sm =
            GroupStateMachine::open(keys::FIRST_SHARD, engine.clone(), keys::initial_group_range(keys::FIRST_SHARD))
                .unwrap();
        let create = Command::Docs(DocBatch {
            tenant: "t".into(),
            ops: vec![DocOp {
                collection: "c".into(),
                id: "d".into(),
                action: DocAction::Put { json: r#"{"l":[]}"#.into(), expected: None },
            }],
            limits: Limits::default(),
            request_id: Some("r0".into()),
        });
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

    fn docs_of(cmd: Command) -> DocBatch {
        match cmd {
            Command::Docs(b) => b,
            other => panic!("not a document batch: {other:?}"),
        }
    }

    /// A batched entry applies each batch on its own: disjoint batches share the entry's
    /// version, a batch overlapping an earlier one of the entry is refused (retry), a request
    /// repeated in the entry gets the first answer, and dedup records of every batch are
    /// evicted together.
    #[tokio::test]
    async fn batched_entry_applies_each_batch_on_its_own() {
        let engine: Engine = std::sync::Arc::new(MemEngine::new());
        let range = keys::initial_group_range(keys::FIRST_SHARD);
        let mut sm = GroupStateMachine::open(keys::FIRST_SHARD, engine.clone(), range).unwrap();
        let put = |id: &str, rid: &str| {
            docs_of(Command::Docs(DocBatch {
                tenant: "t".into(),
                ops: vec![DocOp {
                    collection: "c".into(),
                    id: id.into(),
                    action: DocAction::Put { json: r#"{"l":[]}"#.into(), expected: None },
                }],
                limits: Limits::default(),
                request_id: Some(rid.into()),
            }))
        };
        let many = Command::DocsMany(vec![put("a", "r1"), put("b", "r2"), put("a", "r3"), put("c", "r1")]);
        let out = sm.apply(vec![entry(7, many)]).await.unwrap();
        let CommandResponse::Many(answers) = &out[0] else { panic!("unexpected {out:?}") };
        assert!(matches!(&answers[0], CommandResponse::Docs(Ok(r)) if r[0].version == 7));
        assert!(matches!(&answers[1], CommandResponse::Docs(Ok(r)) if r[0].version == 7 && r[0].id == "b"));
        assert!(matches!(&answers[2], CommandResponse::Retry(_)), "{:?}", answers[2]);
        assert_eq!(answers[3], answers[0], "a repeated request id gets the first answer");
        assert!(engine.get(Cf::Data, &keys::doc_key("t", "c", "c")).unwrap().is_none());
        let ids = engine.get(Cf::Data, &keys::dedup_index_key(7)).unwrap().unwrap();
        // The refused batch left no answer behind: proposing it again applies it.
        assert_eq!(String::from_utf8(ids).unwrap(), "r1\nr2");
        assert!(engine.get(Cf::Data, &keys::dedup_key("r3")).unwrap().is_none());
        // Eviction DEDUP_WINDOW entries later forgets both.
        let mut batch = WriteBatch::new();
        sm.evict_dedup(7 + DEDUP_WINDOW, &mut batch).unwrap();
        engine.write(batch, false).unwrap();
        for rid in ["r1", "r2"] {
            assert!(engine.get(Cf::Data, &keys::dedup_key(rid)).unwrap().is_none(), "{rid} evicted");
        }
    }

    #[test]
    fn pairs_round_trip_and_reject_truncation() {
        let pairs = vec![(b"a".to_vec(), b"1".to_vec()), (vec![], vec![0; 300])];
        let enc = encode_pairs(&pairs);
        assert_eq!(decode_pairs(&enc), Some(pairs));
        assert_eq!(decode_pairs(&enc[..enc.len() - 1]), None);
    }
}
