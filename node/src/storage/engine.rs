//! The storage engine interface every node writes through.
//!
//! Owns: the column-family names, the `WriteBatch` type, the `KvEngine` trait and its
//! point-in-time views (`EngineSnapshot`). RocksDB
//! implements it in production (`rocks.rs`); an in-memory engine that can lose unsynced writes
//! implements it for tests and the simulator (`mem.rs`). Both pass the same conformance tests.
//!
//! Invariants:
//! - a `WriteBatch` is atomic: after a crash either all of it is visible or none of it;
//! - a write with `sync = true` is durable when `write` returns, and so is every write that
//!   returned before it (one shared write-ahead log);
//! - an `EngineSnapshot` reads its ranges as they were when it was taken, whatever is
//!   written after;
//! - this module knows nothing of raft or documents and never depends on RocksDB.

use std::sync::Arc;

/// The column families of a node's single database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cf {
    /// Raft log entries: `group_id | index`.
    RaftLog,
    /// Raft and state-machine metadata: `group_id | field`.
    RaftMeta,
    /// Documents and the catalog under global keys (no group prefix; see `keys.rs`).
    Data,
}

impl Cf {
    /// Every column family, in a fixed order.
    pub const ALL: [Cf; 3] = [Cf::RaftLog, Cf::RaftMeta, Cf::Data];

    /// The on-disk name (part of the stable on-disk format).
    pub fn name(self) -> &'static str {
        match self {
            Cf::RaftLog => "raft_log",
            Cf::RaftMeta => "raft_meta",
            Cf::Data => "data",
        }
    }
}

/// One mutation inside a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOp {
    Put {
        cf: Cf,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        cf: Cf,
        key: Vec<u8>,
    },
    /// Deletes `[start, end)`.
    DeleteRange {
        cf: Cf,
        start: Vec<u8>,
        end: Vec<u8>,
    },
}

/// An atomic group of mutations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    pub ops: Vec<WriteOp>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn put(&mut self, cf: Cf, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Put { cf, key: key.into(), value: value.into() });
    }
    pub fn delete(&mut self, cf: Cf, key: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::Delete { cf, key: key.into() });
    }
    pub fn delete_range(&mut self, cf: Cf, start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) {
        self.ops.push(WriteOp::DeleteRange { cf, start: start.into(), end: end.into() });
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
    /// Appends all of `other`'s operations after this batch's own.
    pub fn extend(&mut self, other: WriteBatch) {
        self.ops.extend(other.ops);
    }
    /// Approximate payload size in bytes.
    pub fn size_bytes(&self) -> usize {
        self.ops
            .iter()
            .map(|op| match op {
                WriteOp::Put { key, value, .. } => key.len() + value.len(),
                WriteOp::Delete { key, .. } => key.len(),
                WriteOp::DeleteRange { start, end, .. } => start.len() + end.len(),
            })
            .sum()
    }
}

/// A storage failure. Any error from a synced write is fatal for the node (no fsync retry).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("storage I/O error: {0}")]
    Io(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// One key-value pair.
pub type KvPair = (Vec<u8>, Vec<u8>);
/// Key-value pairs in key order.
pub type KvPairs = Vec<KvPair>;

/// A key range of one column family: `start <= key < end` (`end` empty: no upper bound).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    pub cf: Cf,
    pub start: Vec<u8>,
    pub end: Vec<u8>,
}

/// A read-only view of an engine's ranges as of the moment it was taken.
pub trait EngineSnapshot: Send + Sync + 'static {
    /// Up to `limit` pairs with `start <= key < end` (`end` empty: no upper bound), in
    /// order. Only keys inside the ranges the view was taken of are certain to be seen.
    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], limit: usize) -> Result<KvPairs, EngineError>;
}

/// A node's database.
pub trait KvEngine: Send + Sync + 'static {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError>;
    /// Up to `limit` pairs with `start <= key < end` (`end` empty: no upper bound), in order.
    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], limit: usize) -> Result<KvPairs, EngineError>;
    /// Reads several keys from one consistent point in time (no write lands between them).
    fn multi_get(&self, cf: Cf, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, EngineError>;
    /// The last pair with `start <= key < end` (`end` empty: no upper bound).
    fn last(&self, cf: Cf, start: &[u8], end: &[u8]) -> Result<Option<KvPair>, EngineError>;
    /// Applies `batch` atomically; with `sync` it is durable on return.
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), EngineError>;
    /// A view of `ranges` as of now: writes after it are not seen through it. RocksDB's
    /// costs O(1) whatever the ranges; the in-memory engine copies them.
    fn snapshot(&self, ranges: &[KeyRange]) -> Result<Arc<dyn EngineSnapshot>, EngineError>;
    /// Approximate bytes stored under `[start, end)` of `cf`, for load reports.
    fn approximate_size(&self, cf: Cf, start: &[u8], end: &[u8]) -> u64;
    /// Stops the engine's background work before the process exits (the node stopped
    /// writing). Reads and writes still work; nothing is flushed or compacted after it.
    fn close(&self) {}
}

/// Shared handle to a node's engine.
pub type Engine = Arc<dyn KvEngine>;

/// The exclusive upper bound of all keys starting with `prefix` (empty when none exists).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// True when `key` is inside `[start, end)`, `end` empty meaning unbounded.
pub fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    key >= start && (end.is_empty() || key < end)
}

#[cfg(test)]
pub(crate) mod conformance {
    //! The conformance suite every `KvEngine` must pass (RocksDB and the in-memory engine).
    use super::*;

    pub fn run_all(engine: &dyn KvEngine) {
        put_get_delete(engine);
        scan_bounds_and_limit(engine);
        delete_range(engine);
        batches_are_atomic_and_ordered(engine);
        snapshot_reads_the_past(engine);
    }

    fn put_get_delete(e: &dyn KvEngine) {
        let mut b = WriteBatch::new();
        b.put(Cf::Data, b"a".to_vec(), b"1".to_vec());
        b.put(Cf::RaftMeta, b"a".to_vec(), b"meta".to_vec());
        e.write(b, true).unwrap();
        assert_eq!(e.get(Cf::Data, b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(e.get(Cf::RaftMeta, b"a").unwrap(), Some(b"meta".to_vec()));
        assert_eq!(e.get(Cf::RaftLog, b"a").unwrap(), None, "column families are separate");
        let mut b = WriteBatch::new();
        b.delete(Cf::Data, b"a".to_vec());
        e.write(b, false).unwrap();
        assert_eq!(e.get(Cf::Data, b"a").unwrap(), None);
    }

    fn scan_bounds_and_limit(e: &dyn KvEngine) {
        let mut b = WriteBatch::new();
        for k in ["s1", "s2", "s3", "s4"] {
            b.put(Cf::Data, k.as_bytes().to_vec(), k.as_bytes().to_vec());
        }
        e.write(b, false).unwrap();
        let all = e.scan(Cf::Data, b"s", &prefix_end(b"s"), 100).unwrap();
        assert_eq!(all.len(), 4);
        assert_eq!(all[0].0, b"s1");
        let mid = e.scan(Cf::Data, b"s2", b"s4", 100).unwrap();
        assert_eq!(mid.iter().map(|p| p.0.clone()).collect::<Vec<_>>(), vec![b"s2".to_vec(), b"s3".to_vec()]);
        let limited = e.scan(Cf::Data, b"s", b"", 2).unwrap();
        assert_eq!(limited.len(), 2);
        assert_eq!(e.last(Cf::Data, b"s", b"s4").unwrap().map(|p| p.0), Some(b"s3".to_vec()));
        assert_eq!(e.last(Cf::Data, b"s", &prefix_end(b"s")).unwrap().map(|p| p.0), Some(b"s4".to_vec()));
        assert_eq!(e.last(Cf::Data, b"t", b"u").unwrap(), None);
        let got = e.multi_get(Cf::Data, &[b"s2".to_vec(), b"nope".to_vec(), b"s1".to_vec()]).unwrap();
        assert_eq!(got, vec![Some(b"s2".to_vec()), None, Some(b"s1".to_vec())]);
    }

    fn delete_range(e: &dyn KvEngine) {
        let mut b = WriteBatch::new();
        for i in 0u8..10 {
            b.put(Cf::RaftLog, vec![b'r', i], vec![i]);
        }
        e.write(b, true).unwrap();
        let mut b = WriteBatch::new();
        b.delete_range(Cf::RaftLog, vec![b'r', 2], vec![b'r', 5]);
        e.write(b, true).unwrap();
        let left = e.scan(Cf::RaftLog, b"r", &prefix_end(b"r"), 100).unwrap();
        let idx: Vec<u8> = left.iter().map(|p| p.0[1]).collect();
        assert_eq!(idx, vec![0, 1, 5, 6, 7, 8, 9]);
    }

    fn batches_are_atomic_and_ordered(e: &dyn KvEngine) {
        // Within a batch, later ops win over earlier ones on the same key.
        let mut b = WriteBatch::new();
        b.put(Cf::Data, b"o".to_vec(), b"1".to_vec());
        b.delete(Cf::Data, b"o".to_vec());
        b.put(Cf::Data, b"o".to_vec(), b"2".to_vec());
        e.write(b, false).unwrap();
        assert_eq!(e.get(Cf::Data, b"o").unwrap(), Some(b"2".to_vec()));
    }

    fn snapshot_reads_the_past(e: &dyn KvEngine) {
        let put = |k: &[u8], v: &[u8]| {
            let mut b = WriteBatch::new();
            b.put(Cf::Data, k.to_vec(), v.to_vec());
            e.write(b, false).unwrap();
        };
        put(b"v1", b"old");
        put(b"v2", b"old");
        let range = KeyRange { cf: Cf::Data, start: b"v".to_vec(), end: prefix_end(b"v") };
        let view = e.snapshot(std::slice::from_ref(&range)).unwrap();
        put(b"v1", b"new");
        put(b"v3", b"new");
        let mut b = WriteBatch::new();
        b.delete(Cf::Data, b"v2".to_vec());
        e.write(b, true).unwrap();
        let seen = view.scan(Cf::Data, b"v", &prefix_end(b"v"), 100).unwrap();
        assert_eq!(seen, vec![(b"v1".to_vec(), b"old".to_vec()), (b"v2".to_vec(), b"old".to_vec())]);
        assert_eq!(view.scan(Cf::Data, b"v2", b"", 1).unwrap().len(), 1, "bounds and limit apply");
        let now = e.scan(Cf::Data, b"v", &prefix_end(b"v"), 100).unwrap();
        assert_eq!(now, vec![(b"v1".to_vec(), b"new".to_vec()), (b"v3".to_vec(), b"new".to_vec())]);
    }

    #[test]
    fn prefix_end_handles_ff() {
        assert_eq!(prefix_end(b"a"), b"b".to_vec());
        assert_eq!(prefix_end(&[1, 0xff]), vec![2]);
        assert_eq!(prefix_end(&[0xff, 0xff]), Vec::<u8>::new());
    }
}
