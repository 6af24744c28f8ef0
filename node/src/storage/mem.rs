//! An in-memory `KvEngine` that models durability, for unit tests and the simulator.
//!
//! Owns: a `durable` image (what survived the last sync) and the batches written since
//! (`pending`). `crash()` drops the pending batches, or keeps a prefix of them, exactly as a
//! power cut would with RocksDB's write-ahead log: batches stay atomic, order is kept.
//!
//! Invariant: `visible == durable + pending applied in order`; a synced write moves every
//! pending batch (and itself) into `durable`.

use super::engine::{
    in_range, Cf, EngineError, EngineSnapshot, KeyRange, KvEngine, KvPair, KvPairs, WriteBatch, WriteOp,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

type Tables = BTreeMap<Cf, BTreeMap<Vec<u8>, Vec<u8>>>;

#[derive(Default)]
struct Inner {
    durable: Tables,
    pending: Vec<WriteBatch>,
    visible: Tables,
    /// When set, every write fails with this message (a failing disk).
    fail_writes: Option<String>,
}

/// In-memory engine with crash semantics.
#[derive(Default)]
pub struct MemEngine {
    inner: Mutex<Inner>,
}

fn apply(tables: &mut Tables, batch: &WriteBatch) {
    for op in &batch.ops {
        match op {
            WriteOp::Put { cf, key, value } => {
                tables.entry(*cf).or_default().insert(key.clone(), value.clone());
            }
            WriteOp::Delete { cf, key } => {
                tables.entry(*cf).or_default().remove(key);
            }
            WriteOp::DeleteRange { cf, start, end } => {
                let t = tables.entry(*cf).or_default();
                let doomed: Vec<Vec<u8>> =
                    t.range(start.clone()..).map(|(k, _)| k.clone()).take_while(|k| in_range(k, start, end)).collect();
                for k in doomed {
                    t.remove(&k);
                }
            }
        }
    }
}

/// The pairs of `cf` in `[start, end)` (`end` empty: to the end), in key order, borrowed.
fn range_of<'a>(
    tables: &'a Tables,
    cf: Cf,
    start: &'a [u8],
    end: &'a [u8],
) -> impl Iterator<Item = (&'a Vec<u8>, &'a Vec<u8>)> {
    let empty = !end.is_empty() && start >= end;
    tables
        .get(&cf)
        .filter(|_| !empty)
        .into_iter()
        .flat_map(move |t| t.range::<[u8], _>((std::ops::Bound::Included(start), std::ops::Bound::Unbounded)))
        .take_while(move |(k, _)| in_range(k, start, end))
}

/// `apply` of a batch no longer needed: its keys and values move into the tables.
fn apply_owned(tables: &mut Tables, batch: WriteBatch) {
    for op in batch.ops {
        match op {
            WriteOp::Put { cf, key, value } => {
                tables.entry(cf).or_default().insert(key, value);
            }
            other => apply(tables, &WriteBatch { ops: vec![other] }),
        }
    }
}

fn scan_tables(tables: &Tables, cf: Cf, start: &[u8], end: &[u8], limit: usize) -> KvPairs {
    range_of(tables, cf, start, end).take(limit).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// A copy of the ranges a snapshot was taken of.
struct MemSnapshot {
    tables: Tables,
}

impl EngineSnapshot for MemSnapshot {
    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], limit: usize) -> Result<KvPairs, EngineError> {
        Ok(scan_tables(&self.tables, cf, start, end, limit))
    }
}

impl MemEngine {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock means a test thread panicked mid-write; the data is still a valid
        // map, so keep going rather than cascade the panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Simulates a power cut: keeps the durable image plus the first `keep_pending` unsynced
    /// batches (0 drops them all).
    pub fn crash(&self, keep_pending: usize) {
        let mut inner = self.lock();
        let keep: Vec<WriteBatch> = inner.pending.iter().take(keep_pending).cloned().collect();
        let mut image = inner.durable.clone();
        for b in &keep {
            apply(&mut image, b);
        }
        inner.durable = image.clone();
        inner.visible = image;
        inner.pending.clear();
    }

    /// Number of batches written since the last sync.
    pub fn pending_batches(&self) -> usize {
        self.lock().pending.len()
    }

    /// Makes every later write fail (`Some`) or succeed again (`None`).
    pub fn set_fail_writes(&self, reason: Option<String>) {
        self.lock().fail_writes = reason;
    }
}

impl KvEngine for MemEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        Ok(self.lock().visible.get(&cf).and_then(|t| t.get(key)).cloned())
    }

    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], limit: usize) -> Result<KvPairs, EngineError> {
        Ok(scan_tables(&self.lock().visible, cf, start, end, limit))
    }

    fn multi_get(&self, cf: Cf, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
        let inner = self.lock();
        let table = inner.visible.get(&cf);
        Ok(keys.iter().map(|k| table.and_then(|t| t.get(k)).cloned()).collect())
    }

    fn last(&self, cf: Cf, start: &[u8], end: &[u8]) -> Result<Option<KvPair>, EngineError> {
        let inner = self.lock();
        let Some(t) = inner.visible.get(&cf) else { return Ok(None) };
        if !end.is_empty() && start >= end {
            return Ok(None);
        }
        let found = if end.is_empty() {
            t.range(start.to_vec()..).next_back()
        } else {
            t.range(start.to_vec()..end.to_vec()).next_back()
        };
        Ok(found.map(|(k, v)| (k.clone(), v.clone())))
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), EngineError> {
        let mut inner = self.lock();
        if let Some(reason) = &inner.fail_writes {
            return Err(EngineError::Io(reason.clone()));
        }
        apply(&mut inner.visible, &batch);
        if sync {
            let pending = std::mem::take(&mut inner.pending);
            for b in pending {
                apply_owned(&mut inner.durable, b);
            }
            apply_owned(&mut inner.durable, batch);
        } else {
            inner.pending.push(batch);
        }
        Ok(())
    }

    /// Copies `ranges` (the simulator's shards are small).
    fn snapshot(&self, ranges: &[KeyRange]) -> Result<Arc<dyn EngineSnapshot>, EngineError> {
        let inner = self.lock();
        let mut tables = Tables::new();
        for r in ranges {
            let copy = range_of(&inner.visible, r.cf, &r.start, &r.end).map(|(k, v)| (k.clone(), v.clone()));
            tables.entry(r.cf).or_default().extend(copy);
        }
        Ok(Arc::new(MemSnapshot { tables }))
    }

    fn approximate_size(&self, cf: Cf, start: &[u8], end: &[u8]) -> u64 {
        range_of(&self.lock().visible, cf, start, end).map(|(k, v)| (k.len() + v.len()) as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_conformance() {
        super::super::engine::conformance::run_all(&MemEngine::new());
    }

    #[test]
    fn crash_drops_unsynced_and_keeps_synced() {
        let e = MemEngine::new();
        let mut b = WriteBatch::new();
        b.put(Cf::Data, b"a".to_vec(), b"1".to_vec());
        e.write(b, false).unwrap();
        let mut b = WriteBatch::new();
        b.put(Cf::Data, b"b".to_vec(), b"2".to_vec());
        e.write(b, true).unwrap(); // syncs "a" too: one shared log
        let mut b = WriteBatch::new();
        b.put(Cf::Data, b"c".to_vec(), b"3".to_vec());
        e.write(b, false).unwrap();
        e.crash(0);
        assert_eq!(e.get(Cf::Data, b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(e.get(Cf::Data, b"b").unwrap(), Some(b"2".to_vec()));
        assert_eq!(e.get(Cf::Data, b"c").unwrap(), None);
    }

    #[test]
    fn crash_can_keep_a_prefix_of_pending_batches() {
        let e = MemEngine::new();
        for (k, v) in [("x", "1"), ("y", "2")] {
            let mut b = WriteBatch::new();
            b.put(Cf::Data, k.as_bytes().to_vec(), v.as_bytes().to_vec());
            e.write(b, false).unwrap();
        }
        e.crash(1);
        assert!(e.get(Cf::Data, b"x").unwrap().is_some());
        assert!(e.get(Cf::Data, b"y").unwrap().is_none());
    }

    #[test]
    fn failing_disk_rejects_writes() {
        let e = MemEngine::new();
        e.set_fail_writes(Some("EIO".into()));
        assert!(e.write(WriteBatch::new(), true).is_err());
    }
}
