//! Group commit: one writer for every raft group's synced writes on a node.
//!
//! Owns: the queue of synced batches (log appends, votes, purges). In production a dedicated
//! OS thread drains everything queued, writes it as one synced batch (one fsync for many
//! groups and many concurrent appends), then wakes every waiter. The inline mode writes each
//! batch directly on the caller and is used by the single-threaded simulator.
//!
//! Invariants: batches are written in submission order; a waiter is woken only after the
//! fsync covering its batch returned; a failed fsync fails every batch in it (never retried:
//! after an fsync error the page cache state is unknown).

use super::engine::{Engine, EngineError, WriteBatch};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

/// Upper bound on batches merged into one fsync (bounds latency of the first waiter).
pub const MAX_BATCHES_PER_SYNC: usize = 1024;

struct Job {
    batch: WriteBatch,
    done: oneshot::Sender<Result<(), String>>,
}

/// Counters for `/metrics`.
#[derive(Default, Debug)]
pub struct GroupCommitStats {
    pub syncs: AtomicU64,
    pub batches: AtomicU64,
}

enum Mode {
    Thread(WriterThread),
    /// Writes on the caller; each synced write first waits the injected latency (µs), so the
    /// simulator can model a slow disk in simulated time.
    Inline(Engine, Arc<AtomicU64>),
}

/// The writer thread and its queue.
struct WriterThread {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WriterThread {
    /// The last handle went: the thread writes what is queued, exits and drops its engine
    /// handle before this returns. A detached writer thread could close the engine while the
    /// process exits, and RocksDB aborted ("pthread lock: Invalid argument", about once in
    /// 75 shutdowns of `floe start` here).
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Handle to a node's synced-write path. Cheap to clone.
#[derive(Clone)]
pub struct GroupCommit {
    mode: Arc<Mode>,
    pub stats: Arc<GroupCommitStats>,
}

impl GroupCommit {
    /// Starts the writer thread for `engine`. The thread exits when every handle is dropped,
    /// and dropping the last handle waits for it.
    pub fn spawn_thread(engine: Engine) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let stats = Arc::new(GroupCommitStats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new().name("floe-log-writer".into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut jobs = vec![first];
                while jobs.len() < MAX_BATCHES_PER_SYNC {
                    match rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                let mut merged = WriteBatch::new();
                let mut waiters = Vec::with_capacity(jobs.len());
                for j in jobs {
                    merged.extend(j.batch);
                    waiters.push(j.done);
                }
                thread_stats.syncs.fetch_add(1, Ordering::Relaxed);
                thread_stats.batches.fetch_add(waiters.len() as u64, Ordering::Relaxed);
                let result = engine.write(merged, true).map_err(|e| e.to_string());
                for w in waiters {
                    let _ = w.send(result.clone());
                }
            }
        })?;
        let writer = WriterThread { jobs: Some(tx), thread: Some(thread) };
        Ok(Self { mode: Arc::new(Mode::Thread(writer)), stats })
    }

    /// Writes synchronously on the caller; for the single-threaded simulator and unit tests.
    pub fn inline(engine: Engine) -> Self {
        Self { mode: Arc::new(Mode::Inline(engine, Arc::default())), stats: Arc::default() }
    }

    /// The injected latency of each synced write in inline mode (µs); `None` for the thread.
    pub fn inline_latency_us(&self) -> Option<Arc<AtomicU64>> {
        match &*self.mode {
            Mode::Inline(_, latency) => Some(latency.clone()),
            Mode::Thread(_) => None,
        }
    }

    /// Writes `batch` durably; returns once it is on disk.
    pub async fn write_synced(&self, batch: WriteBatch) -> Result<(), EngineError> {
        match &*self.mode {
            Mode::Inline(engine, latency) => {
                let us = latency.load(Ordering::Relaxed);
                if us > 0 {
                    tokio::time::sleep(std::time::Duration::from_micros(us)).await;
                }
                self.stats.syncs.fetch_add(1, Ordering::Relaxed);
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                engine.write(batch, true)
            }
            Mode::Thread(writer) => {
                let (done, wait) = oneshot::channel();
                let stopped = || EngineError::Io("log writer stopped".into());
                writer.jobs.as_ref().ok_or_else(stopped)?.send(Job { batch, done }).map_err(|_| stopped())?;
                match wait.await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(EngineError::Io(e)),
                    Err(_) => Err(EngineError::Io("log writer stopped".into())),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::engine::{Cf, KvEngine};
    use crate::storage::mem::MemEngine;

    #[tokio::test]
    async fn concurrent_writes_share_syncs_and_are_durable() {
        let mem = Arc::new(MemEngine::new());
        let gc = GroupCommit::spawn_thread(mem.clone()).unwrap();
        let mut handles = Vec::new();
        for i in 0u32..200 {
            let gc = gc.clone();
            handles.push(tokio::spawn(async move {
                let mut b = WriteBatch::new();
                b.put(Cf::RaftLog, i.to_be_bytes().to_vec(), b"x".to_vec());
                gc.write_synced(b).await
            }));
        }
        for h in handles {
            h.await.unwrap().unwrap();
        }
        mem.crash(0);
        assert_eq!(mem.scan(Cf::RaftLog, b"", b"", 1000).unwrap().len(), 200);
        let syncs = gc.stats.syncs.load(Ordering::Relaxed);
        assert!((1..=200).contains(&syncs));
    }

    /// Dropping the last handle returns only after the writer thread let go of the engine
    /// (the process may exit next, and RocksDB must not be closing then).
    #[tokio::test]
    async fn the_last_handle_waits_for_the_writer_thread() {
        let mem = Arc::new(MemEngine::new());
        let gc = GroupCommit::spawn_thread(mem.clone()).unwrap();
        let other = gc.clone();
        gc.write_synced(WriteBatch::new()).await.unwrap();
        drop(gc);
        assert_eq!(Arc::strong_count(&mem), 2, "another handle keeps the writer running");
        other.write_synced(WriteBatch::new()).await.unwrap();
        drop(other);
        assert_eq!(Arc::strong_count(&mem), 1, "the writer thread dropped its engine handle");
    }
}
