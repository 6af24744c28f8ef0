//! The production `KvEngine`: one RocksDB per node with the column families of `Cf`.
//!
//! Owns: opening the database and translating `WriteBatch` to RocksDB's. Synced writes go
//! through the write-ahead log with `sync = true`; unsynced ones still go through the WAL
//! (never `disable_wal`), so a later synced write makes them durable too.
//!
//! Snapshots (`RocksSnapshot`) are RocksDB snapshots that hold their database open: the
//! binding's snapshot borrows the database, so each is kept in a self-referential cell
//! (`self_cell`) beside the `Arc` it borrows from.

use super::engine::{Cf, EngineError, EngineSnapshot, KeyRange, KvEngine, KvPair, KvPairs, WriteBatch, WriteOp};
use rocksdb::{
    ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions, SnapshotWithThreadMode, WriteOptions, DB,
};
use std::path::Path;
use std::sync::Arc;

/// RocksDB-backed engine.
pub struct RocksEngine {
    db: Arc<DB>,
}

fn io(e: rocksdb::Error) -> EngineError {
    EngineError::Io(e.into_string())
}

impl RocksEngine {
    /// Opens (creating if needed) the database under `path`.
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        // Keep the idle footprint small: a modest shared block cache and write buffers.
        opts.set_write_buffer_size(16 << 20);
        opts.set_max_write_buffer_number(3);
        let mut log_opts = Options::default();
        log_opts.set_write_buffer_size(32 << 20);
        log_opts.set_compression_type(rocksdb::DBCompressionType::None);
        let mut data_opts = Options::default();
        data_opts.set_write_buffer_size(16 << 20);
        data_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let cfs = vec![
            ColumnFamilyDescriptor::new(Cf::RaftLog.name(), log_opts),
            ColumnFamilyDescriptor::new(Cf::RaftMeta.name(), Options::default()),
            ColumnFamilyDescriptor::new(Cf::Data.name(), data_opts),
        ];
        let db = DB::open_cf_descriptors(&opts, path, cfs).map_err(io)?;
        Ok(Self { db: Arc::new(db) })
    }

    fn cf(&self, cf: Cf) -> Result<&rocksdb::ColumnFamily, EngineError> {
        cf_of(&self.db, cf)
    }
}

fn cf_of(db: &DB, cf: Cf) -> Result<&rocksdb::ColumnFamily, EngineError> {
    db.cf_handle(cf.name()).ok_or_else(|| EngineError::Corrupt(format!("column family {} missing", cf.name())))
}

fn forward_scan_options(end: &[u8]) -> ReadOptions {
    let mut ro = ReadOptions::default();
    if !end.is_empty() {
        ro.set_iterate_upper_bound(end.to_vec());
    }
    ro
}

/// A snapshot borrowing its database.
type BorrowedSnapshot<'db> = SnapshotWithThreadMode<'db, DB>;

self_cell::self_cell!(
    /// A RocksDB snapshot of the whole database that keeps the database open (the cell
    /// drops the snapshot before the `Arc` it borrows).
    struct RocksSnapshot {
        owner: Arc<DB>,
        #[covariant]
        dependent: BorrowedSnapshot,
    }
);

impl EngineSnapshot for RocksSnapshot {
    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], limit: usize) -> Result<KvPairs, EngineError> {
        let handle = cf_of(self.borrow_owner(), cf)?;
        let mode = IteratorMode::From(start, Direction::Forward);
        scan_with(self.borrow_dependent().iterator_cf_opt(handle, forward_scan_options(end), mode), end, limit)
    }
}

fn scan_with<'a, I>(iter: I, end: &[u8], limit: usize) -> Result<KvPairs, EngineError>
where
    I: Iterator<Item = Result<(Box<[u8]>, Box<[u8]>), rocksdb::Error>> + 'a,
{
    let mut out = Vec::new();
    for item in iter {
        if out.len() >= limit {
            break;
        }
        let (k, v) = item.map_err(io)?;
        if !end.is_empty() && &*k >= end {
            break;
        }
        out.push((k.into_vec(), v.into_vec()));
    }
    Ok(out)
}

impl KvEngine for RocksEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        self.db.get_cf(self.cf(cf)?, key).map_err(io)
    }

    fn scan(&self, cf: Cf, start: &[u8], end: &[u8], limit: usize) -> Result<KvPairs, EngineError> {
        let iter = self.db.iterator_cf_opt(
            self.cf(cf)?,
            forward_scan_options(end),
            IteratorMode::From(start, Direction::Forward),
        );
        scan_with(iter, end, limit)
    }

    /// The whole database as of now, whatever `ranges` are (a RocksDB snapshot is a sequence
    /// number: O(1), and it pins older versions only while it lives).
    fn snapshot(&self, _ranges: &[KeyRange]) -> Result<Arc<dyn EngineSnapshot>, EngineError> {
        Ok(Arc::new(RocksSnapshot::new(self.db.clone(), |db| db.snapshot())))
    }

    fn multi_get(&self, cf: Cf, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
        // One implicit snapshot for the whole call: RocksDB's MultiGet reads every key at the
        // same sequence number.
        let handle = self.cf(cf)?;
        self.db
            .batched_multi_get_cf(handle, keys, false)
            .into_iter()
            .map(|r| r.map(|v| v.map(|p| p.to_vec())).map_err(io))
            .collect()
    }

    fn last(&self, cf: Cf, start: &[u8], end: &[u8]) -> Result<Option<KvPair>, EngineError> {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(start.to_vec());
        let mode = if end.is_empty() { IteratorMode::End } else { IteratorMode::From(end, Direction::Reverse) };
        if !end.is_empty() {
            ro.set_iterate_upper_bound(end.to_vec());
        }
        for item in self.db.iterator_cf_opt(self.cf(cf)?, ro, mode) {
            let (k, v) = item.map_err(io)?;
            if !end.is_empty() && &*k >= end {
                continue;
            }
            if &*k < start {
                return Ok(None);
            }
            return Ok(Some((k.into_vec(), v.into_vec())));
        }
        Ok(None)
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), EngineError> {
        let mut wb = rocksdb::WriteBatch::default();
        for op in batch.ops {
            match op {
                WriteOp::Put { cf, key, value } => wb.put_cf(self.cf(cf)?, key, value),
                WriteOp::Delete { cf, key } => wb.delete_cf(self.cf(cf)?, key),
                WriteOp::DeleteRange { cf, start, end } => {
                    if end.is_empty() {
                        // RocksDB needs a finite end; no key of ours starts with 0xff x 16.
                        wb.delete_range_cf(self.cf(cf)?, start, vec![0xffu8; 16])
                    } else {
                        wb.delete_range_cf(self.cf(cf)?, start, end)
                    }
                }
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db.write_opt(wb, &wo).map_err(io)
    }

    fn approximate_size(&self, cf: Cf, start: &[u8], end: &[u8]) -> u64 {
        let Ok(handle) = self.cf(cf) else { return 0 };
        let end = if end.is_empty() { vec![0xffu8; 16] } else { end.to_vec() };
        let range = rocksdb::Range::new(start, &end);
        self.db.get_approximate_sizes_cf(handle, &[range]).first().copied().unwrap_or(0)
    }

    /// Waits for running flushes and compactions and starts no more, so none runs while the
    /// process exits and RocksDB's static objects are destroyed. Synced writes are in the
    /// WAL already.
    fn close(&self) {
        self.db.cancel_all_background_work(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let engine = RocksEngine::open(dir.path()).unwrap();
        super::super::engine::conformance::run_all(&engine);
    }

    /// A snapshot keeps the database open after the engine is dropped, and reads its past.
    #[test]
    fn a_snapshot_outlives_its_engine() {
        let dir = tempfile::tempdir().unwrap();
        let engine = RocksEngine::open(dir.path()).unwrap();
        let mut b = WriteBatch::new();
        b.put(Cf::Data, b"k".to_vec(), b"v".to_vec());
        engine.write(b, true).unwrap();
        let view = engine.snapshot(&[]).unwrap();
        let mut b = WriteBatch::new();
        b.delete(Cf::Data, b"k".to_vec());
        engine.write(b, true).unwrap();
        drop(engine);
        assert_eq!(view.scan(Cf::Data, b"", b"", 10).unwrap(), vec![(b"k".to_vec(), b"v".to_vec())]);
    }

    #[test]
    fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let engine = RocksEngine::open(dir.path()).unwrap();
            let mut b = WriteBatch::new();
            b.put(Cf::RaftLog, b"k".to_vec(), b"v".to_vec());
            engine.write(b, true).unwrap();
        }
        let engine = RocksEngine::open(dir.path()).unwrap();
        assert_eq!(engine.get(Cf::RaftLog, b"k").unwrap(), Some(b"v".to_vec()));
    }
}
