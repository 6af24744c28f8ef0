//! The measured phase: `--clients` closed-loop clients, each with one request in flight,
//! client j on connection j mod conns, plus the progress bar.
//!
//! Owns: the client loop (pick op, pick key, call, record), the shared stop conditions and
//! the merge of the per-client recorders.
//!
//! Bounds: a client issues nothing after t0 + `--duration`, and all clients together issue
//! at most `--ops` calls; each call is abandoned after `CALL_TIMEOUT_MAX` (and counted as an
//! error), so the phase ends by t0 + duration + `CALL_TIMEOUT_MAX` at the latest.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Result};
use floe_client::{Client, Collection, ReadConsistency};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use serde::de::IgnoredAny;
use tokio::time::Instant;

use super::cpu::{self, CpuReport, CpuSample};
use super::keys::{self, KeyChooser};
use super::report::{OpKind, Recorder};
use super::{BenchConfig, BenchDoc, Consistency, COLLECTION};

/// Longest a single call may take before the client gives up on it.
pub const CALL_TIMEOUT_MAX: Duration = Duration::from_secs(30);
/// How often the progress bar is redrawn.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// What the measured phase produced.
pub struct Phase {
    pub recorder: Recorder,
    /// From t0 until the last client finished.
    pub elapsed: Duration,
    /// CPU shares from t0 until the last client finished (`None` without `/proc`).
    pub cpu: Option<CpuReport>,
}

/// Settings and counters every client shares.
struct Shared {
    chooser: KeyChooser,
    get_fraction: f64,
    consistency: Consistency,
    max_staleness: Duration,
    seed: u64,
    value: String,
    session_token: String,
    t0: Instant,
    deadline: Option<Instant>,
    ops_max: Option<u64>,
    issued: AtomicU64,
    done_ok: AtomicU64,
    done_errors: AtomicU64,
    /// Set once every client has finished; stops the progress bar.
    finished: AtomicBool,
}

/// Runs the clients to completion. `session_token` seeds `--consistency session` reads. CPU
/// is sampled right before t0 and right after the last client finished.
pub async fn run(config: &BenchConfig, conns: &[Client], value: &str, session_token: String) -> Result<Phase> {
    if conns.is_empty() {
        return Err(anyhow!("no connections"));
    }
    let (range_start, range_len) = config.key_range();
    // Built before t0: the zipfian constant costs up to a second for 10^8 keys.
    let chooser = KeyChooser::new(range_start, range_len, config.distribution, config.zipf_theta)?;
    let cpu_start = CpuSample::take(&config.server_pids);
    let t0 = Instant::now();
    let shared = Arc::new(Shared {
        chooser,
        get_fraction: config.workload.get_fraction(),
        consistency: config.consistency,
        max_staleness: Duration::from_millis(config.max_staleness_ms.unwrap_or(0)),
        seed: config.seed,
        value: value.to_owned(),
        session_token,
        t0,
        deadline: config.duration_s.map(|seconds| t0 + Duration::from_secs_f64(seconds)),
        ops_max: config.ops,
        issued: AtomicU64::new(0),
        done_ok: AtomicU64::new(0),
        done_errors: AtomicU64::new(0),
        finished: AtomicBool::new(false),
    });
    let handles: Vec<_> = (0..config.clients)
        .map(|j| {
            let collection = conns[(j % conns.len() as u64) as usize].collection(COLLECTION);
            tokio::spawn(client_loop(shared.clone(), j, collection))
        })
        .collect();
    let progress = tokio::spawn(show_progress(shared.clone(), config.duration_s, config.ops));
    let mut merged = Recorder::default();
    let mut panics = Vec::new();
    for handle in handles {
        match handle.await {
            Ok(recorder) => merged.merge(&recorder)?,
            Err(error) => panics.push(error.to_string()),
        }
    }
    let elapsed = t0.elapsed();
    let cpu_end = CpuSample::take(&config.server_pids);
    shared.finished.store(true, Ordering::Relaxed);
    // The bar is cleared within one tick, before the caller prints the table.
    let _ = progress.await;
    if !panics.is_empty() {
        return Err(anyhow!("{} client task(s) failed: {}", panics.len(), panics.join("; ")));
    }
    let cpu = cpu_start.zip(cpu_end).map(|(start, end)| cpu::shares(&start, &end));
    Ok(Phase { recorder: merged, elapsed, cpu })
}

async fn client_loop(shared: Arc<Shared>, client_index: u64, collection: Collection) -> Recorder {
    let mut rng = keys::client_rng(shared.seed, client_index);
    let mut session_token = shared.session_token.clone();
    let mut recorder = Recorder::default();
    let document = BenchDoc { v: &shared.value };
    loop {
        if shared.deadline.is_some_and(|deadline| Instant::now() >= deadline) {
            break;
        }
        if let Some(ops_max) = shared.ops_max {
            if shared.issued.fetch_add(1, Ordering::Relaxed) >= ops_max {
                break;
            }
        }
        let kind = if rng.gen::<f64>() < shared.get_fraction { OpKind::Get } else { OpKind::Put };
        let key = keys::key_name(shared.chooser.next_index(&mut rng));
        let started = Instant::now();
        let call = async {
            match kind {
                OpKind::Get => {
                    let consistency = match shared.consistency {
                        Consistency::Strong => ReadConsistency::Strong,
                        Consistency::Eventual => ReadConsistency::Eventual,
                        Consistency::Bounded => ReadConsistency::BoundedStaleness(shared.max_staleness),
                        Consistency::Session => ReadConsistency::Session(session_token.clone()),
                    };
                    collection.get_with::<IgnoredAny>(&key, consistency).await.map(|document| document.is_some())
                }
                OpKind::Put => collection.put(&key, &document).await.map(|outcome| {
                    if shared.consistency == Consistency::Session && !outcome.session_token.is_empty() {
                        session_token = outcome.session_token;
                    }
                    true
                }),
            }
        };
        let result = tokio::time::timeout(CALL_TIMEOUT_MAX, call).await;
        let finished = Instant::now();
        match result {
            Ok(Ok(found)) => {
                recorder.record_ok(kind, finished - started, found, finished - shared.t0);
                shared.done_ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(error)) => {
                recorder.record_error(kind, || error.to_string());
                shared.done_errors.fetch_add(1, Ordering::Relaxed);
            }
            Err(_elapsed) => {
                recorder.record_error(kind, || format!("no answer within {} s", CALL_TIMEOUT_MAX.as_secs()));
                shared.done_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    recorder
}

/// Redraws the bar until the clients finished: by time when `--duration` bounds the run, else by ops.
async fn show_progress(shared: Arc<Shared>, duration_s: Option<f64>, ops_max: Option<u64>) {
    let (length, by_time) = match (duration_s, ops_max) {
        (Some(seconds), _) => ((seconds * 1000.0) as u64, true),
        (None, Some(ops)) => (ops, false),
        (None, None) => (0, false),
    };
    let template = if by_time {
        "bench   [{elapsed_precise}] [{bar:30}] {msg}"
    } else {
        "bench   [{elapsed_precise}] [{bar:30}] {pos}/{len} ops {msg}"
    };
    let bar = ProgressBar::new(length)
        .with_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    let mut ticker = tokio::time::interval(PROGRESS_INTERVAL);
    let (mut ok_before, mut at_before) = (0u64, Instant::now());
    loop {
        ticker.tick().await;
        if shared.finished.load(Ordering::Relaxed) {
            bar.finish_and_clear();
            return;
        }
        let now = Instant::now();
        let ok = shared.done_ok.load(Ordering::Relaxed);
        let errors = shared.done_errors.load(Ordering::Relaxed);
        let window_s = (now - at_before).as_secs_f64();
        let rate = if window_s > 0.0 { (ok - ok_before) as f64 / window_s } else { 0.0 };
        (ok_before, at_before) = (ok, now);
        let position = if by_time { (now - shared.t0).as_millis() as u64 } else { ok + errors };
        bar.set_position(position.min(length));
        bar.set_message(format!("{ok} ok, {errors} errors, {rate:.0} ops/s"));
    }
}
