//! A raft group's log and vote on the node's shared engine.
//!
//! Owns: the `raft_log` keys `group | index` and the `raft_meta` fields `vote`, `committed`,
//! `purged` of one group. Many groups share one engine and one `GroupCommit` writer, so
//! concurrent appends of all groups share fsyncs.
//!
//! Invariants (openraft's contract, RAFT-NOTES section 6):
//! - `save_vote` returns only after the vote is synced;
//! - `append` reports `log_io_completed` only after the entries are synced;
//! - vote, append, truncate and purge go through the one writer, so they reach disk in the
//!   order openraft issued them;
//! - `compact_stopped` runs only on a stopped replica (hibernation) and keeps its last entry,
//!   so a woken leader finds where each follower's log ends from that one entry.

use super::types::{Entry, GroupId, LogId, StorageError, TypeConfig, Vote};
use crate::keys;
use crate::signal::Progress;
use crate::storage::engine::prefix_end;
use crate::storage::group_commit::GroupCommit;
use crate::storage::{Cf, Engine, EngineError, WriteBatch};
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader, StorageIOError};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::time::Duration;

/// Log storage of one group.
#[derive(Clone)]
pub struct LogStore {
    group: GroupId,
    engine: Engine,
    writer: GroupCommit,
    /// The group's applied index: a purge waits for it (see `purge`).
    applied: Arc<Progress>,
}

/// Most bytes of stored entries one replication message carries (always at least one entry;
/// TiKV's `raft-max-size-per-msg` is the same 1 MiB). Bounded where the entries are read,
/// so a stream catching up or probing a follower reads no more than it may send.
pub const APPEND_BYTES_MAX: usize = 1 << 20;
/// Entries read from the engine at a time while filling a replication message.
const READ_CHUNK: usize = 64;

/// How long a purge waits for the state machine to apply what it would purge.
pub const PURGE_WAIT_FOR_APPLY: Duration = Duration::from_secs(10);

fn read_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::read_logs(&e).into()
}
fn write_err(e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

impl LogStore {
    pub fn new(group: GroupId, engine: Engine, writer: GroupCommit, applied: Arc<Progress>) -> Self {
        Self { group, engine, writer, applied }
    }

    fn meta<T: for<'de> serde::Deserialize<'de>>(&self, field: &str) -> Result<Option<T>, StorageError> {
        match self.engine.get(Cf::RaftMeta, &keys::group_meta_key(self.group, field)).map_err(read_err)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v).map(Some).map_err(read_err),
        }
    }

    fn meta_value<T: serde::Serialize>(&self, field: &str, value: &T) -> Result<(Vec<u8>, Vec<u8>), StorageError> {
        Ok((keys::group_meta_key(self.group, field), serde_json::to_vec(value).map_err(write_err)?))
    }

    /// One past the last possible key of this group's log.
    fn end_key(&self) -> Vec<u8> {
        log_end_key(self.group)
    }
}

/// One past the last possible key of `group`'s log.
fn log_end_key(group: GroupId) -> Vec<u8> {
    prefix_end(&group.to_be_bytes())
}

/// The id of the last entry stored in `group`'s log (`None`: the log holds no entry).
fn last_stored_log_id(engine: &Engine, group: GroupId) -> Result<Option<LogId>, EngineError> {
    let Some((_, value)) = engine.last(Cf::RaftLog, &keys::log_key(group, 0), &log_end_key(group))? else {
        return Ok(None);
    };
    let entry: Entry = serde_json::from_slice(&value)
        .map_err(|e| EngineError::Corrupt(format!("group {group}'s last log entry: {e}")))?;
    Ok(Some(entry.log_id))
}

/// The write that purges `group`'s log through `upto`: the purge point and the entries.
fn purge_batch(group: GroupId, upto: &LogId) -> Result<WriteBatch, serde_json::Error> {
    let mut batch = WriteBatch::new();
    batch.put(Cf::RaftMeta, keys::group_meta_key(group, "purged"), serde_json::to_vec(upto)?);
    batch.delete_range(Cf::RaftLog, keys::log_key(group, 0), keys::log_key(group, upto.index.saturating_add(1)));
    Ok(batch)
}

/// Purges every entry of a stopped replica's log but the last, when it applied them all
/// (hibernation stops a replica only then; the caller holds its lifecycle lock). Returns the
/// new purge point, or `None` when there was nothing to drop.
///
/// Why: a replica restarts without its peers' replication progress, and openraft 0.9 starts
/// looking for a follower's log end halfway through the leader's log, reading its way to the
/// end in `APPEND_BYTES_MAX` steps. A woken leader of a shard whose log held a few MB read
/// and decoded all of it for each follower, at every wake. With one entry left it reads one.
/// Nothing is lost: every replica holds and applied every entry when the group hibernates,
/// and a replica that ever needs older entries gets a snapshot, as after any purge.
pub fn compact_stopped(engine: &Engine, group: GroupId) -> Result<Option<LogId>, EngineError> {
    let corrupt = |what: &str, e: serde_json::Error| EngineError::Corrupt(format!("group {group} {what}: {e}"));
    let Some(last) = last_stored_log_id(engine, group)? else { return Ok(None) };
    let applied: Option<LogId> = match engine.get(Cf::RaftMeta, &keys::group_meta_key(group, "applied"))? {
        Some(v) => serde_json::from_slice(&v).map_err(|e| corrupt("applied", e))?,
        None => None,
    };
    if last.index == 0 || applied.is_none_or(|a| a.index < last.index) {
        return Ok(None);
    }
    let Some(before) = engine.get(Cf::RaftLog, &keys::log_key(group, last.index - 1))? else { return Ok(None) };
    let upto = serde_json::from_slice::<Entry>(&before).map_err(|e| corrupt("entry", e))?.log_id;
    // Not synced: a purge lost in a crash only leaves the longer log.
    engine.write(purge_batch(group, &upto).map_err(|e| corrupt("purge point", e))?, false)?;
    Ok(Some(upto))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => keys::log_key(self.group, i.saturating_add(1)),
            Bound::Excluded(i) => keys::log_key(self.group, *i),
            Bound::Unbounded => self.end_key(),
        };
        let pairs =
            self.engine.scan(Cf::RaftLog, &keys::log_key(self.group, start), &end, usize::MAX).map_err(read_err)?;
        pairs.into_iter().map(|(_, v)| serde_json::from_slice::<Entry>(&v).map_err(read_err)).collect()
    }

    /// For replication: the entries from `start` on, below `end`, until they reach
    /// `APPEND_BYTES_MAX` bytes as stored (openraft sends what this returns as one message).
    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        let end_key = keys::log_key(self.group, end);
        let mut entries = Vec::new();
        let mut bytes = 0;
        let mut next = start;
        while next < end && bytes < APPEND_BYTES_MAX {
            let chunk = self
                .engine
                .scan(Cf::RaftLog, &keys::log_key(self.group, next), &end_key, READ_CHUNK)
                .map_err(read_err)?;
            let whole = chunk.len() == READ_CHUNK;
            for (_, value) in chunk {
                if bytes >= APPEND_BYTES_MAX {
                    break;
                }
                bytes += value.len();
                let entry: Entry = serde_json::from_slice(&value).map_err(read_err)?;
                next = entry.log_id.index + 1;
                entries.push(entry);
            }
            if !whole {
                break;
            }
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.meta("purged")?;
        let last_log_id = last_stored_log_id(&self.engine, self.group).map_err(read_err)?.or(last_purged);
        Ok(LogState { last_purged_log_id: last_purged, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let (k, v) = self.meta_value("vote", vote)?;
        let mut b = WriteBatch::new();
        b.put(Cf::RaftMeta, k, v);
        self.writer.write_synced(b).await.map_err(|e| StorageError::from(StorageIOError::write_vote(&e)))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.meta("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not synced: losing it only makes a restart re-apply less; a later synced append
        // persists it anyway (one shared write-ahead log).
        let (k, v) = self.meta_value("committed", &committed)?;
        let mut b = WriteBatch::new();
        b.put(Cf::RaftMeta, k, v);
        self.engine.write(b, false).map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.meta::<Option<LogId>>("committed")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut b = WriteBatch::new();
        for entry in entries {
            let value = serde_json::to_vec(&entry).map_err(write_err)?;
            b.put(Cf::RaftLog, keys::log_key(self.group, entry.log_id.index), value);
        }
        match self.writer.write_synced(b).await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut b = WriteBatch::new();
        b.delete_range(Cf::RaftLog, keys::log_key(self.group, log_id.index), self.end_key());
        self.writer.write_synced(b).await.map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // openraft hands a snapshot install to the state machine task and may purge right
        // after, without waiting. Purging a log the state machine has not applied yet would,
        // after a crash in between, leave `applied < purged` and a replica that cannot start.
        // A purge is only an optimization, so if the apply does not come in time, skip it.
        if tokio::time::timeout(PURGE_WAIT_FOR_APPLY, self.applied.wait_at_least(log_id.index)).await.is_err() {
            tracing::warn!(group = self.group, upto = log_id.index, "log purge skipped: state machine behind");
            return Ok(());
        }
        let batch = purge_batch(self.group, &log_id).map_err(write_err)?;
        self.writer.write_synced(batch).await.map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::mem::MemEngine;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn put_entries(engine: &Engine, group: GroupId, indexes: std::ops::RangeInclusive<u64>) {
        let mut b = WriteBatch::new();
        for index in indexes {
            let entry = Entry { log_id: LogId::new(CommittedLeaderId::new(2, 1), index), payload: EntryPayload::Blank };
            b.put(Cf::RaftLog, keys::log_key(group, index), serde_json::to_vec(&entry).unwrap());
        }
        engine.write(b, true).unwrap();
    }

    fn set_applied(engine: &Engine, group: GroupId, index: u64) {
        let mut b = WriteBatch::new();
        let applied = Some(LogId::new(CommittedLeaderId::new(2, 1), index));
        b.put(Cf::RaftMeta, keys::group_meta_key(group, "applied"), serde_json::to_vec(&applied).unwrap());
        engine.write(b, true).unwrap();
    }

    /// A stopped replica that applied its whole log keeps only its last entry, and the log
    /// state openraft reads on restart says so; a replica behind on applying, another group
    /// and a one-entry log are left alone.
    #[tokio::test]
    async fn a_stopped_replica_keeps_only_its_last_entry() {
        let engine: Engine = Arc::new(MemEngine::new());
        put_entries(&engine, 7, 1..=50);
        put_entries(&engine, 8, 1..=5);
        set_applied(&engine, 7, 49);
        assert_eq!(compact_stopped(&engine, 7).unwrap(), None, "entry 50 is not applied");
        set_applied(&engine, 7, 50);
        assert_eq!(compact_stopped(&engine, 7).unwrap().map(|l| l.index), Some(49));
        assert_eq!(compact_stopped(&engine, 7).unwrap(), None, "one entry left");
        let mut store = LogStore::new(7, engine.clone(), GroupCommit::inline(engine.clone()), Arc::default());
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(49));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(50));
        assert_eq!(store.try_get_log_entries(0..100).await.unwrap().len(), 1);
        let other = engine.scan(Cf::RaftLog, &keys::log_key(8, 0), &keys::log_key(9, 0), 100).unwrap();
        assert_eq!(other.len(), 5, "another group's log is untouched");
    }
}
