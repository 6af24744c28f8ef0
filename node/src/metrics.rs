//! Prometheus metrics: request counts and latencies per operation and outcome, raft state.
//!
//! Owns: counters updated on the request path (a mutex-protected map; contention is one
//! short critical section per request) and the text rendering for `/metrics`. Raft gauges
//! are read from the host at scrape time rather than pushed.

use crate::api::NodeApi;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

/// Latency histogram bucket upper bounds, in seconds.
pub const LATENCY_BUCKETS_S: [f64; 12] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; LATENCY_BUCKETS_S.len()],
    count: u64,
    sum_s: f64,
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(&'static str, &'static str), u64>,
    latency: BTreeMap<&'static str, Histogram>,
}

/// A node's request metrics.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one request of `op` that ended with `code` ("ok" or an error code).
    pub fn observe(&self, op: &'static str, code: &'static str, latency: Duration) {
        let Ok(mut inner) = self.inner.lock() else { return };
        *inner.requests.entry((op, code)).or_default() += 1;
        let h = inner.latency.entry(op).or_default();
        let s = latency.as_secs_f64();
        for (i, le) in LATENCY_BUCKETS_S.iter().enumerate() {
            if s <= *le {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum_s += s;
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self, api: &NodeApi) -> String {
        let mut out = String::new();
        let (requests, latency) = match self.inner.lock() {
            Ok(i) => (i.requests.clone(), i.latency.clone()),
            Err(_) => (BTreeMap::new(), BTreeMap::new()),
        };
        let _ = writeln!(out, "# HELP floe_requests_total Requests handled, by operation and outcome code.");
        let _ = writeln!(out, "# TYPE floe_requests_total counter");
        for ((op, code), n) in &requests {
            let _ = writeln!(out, "floe_requests_total{{op=\"{op}\",code=\"{code}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP floe_request_duration_seconds Request latency, by operation.");
        let _ = writeln!(out, "# TYPE floe_request_duration_seconds histogram");
        for (op, h) in &latency {
            for (i, le) in LATENCY_BUCKETS_S.iter().enumerate() {
                let _ =
                    writeln!(out, "floe_request_duration_seconds_bucket{{op=\"{op}\",le=\"{le}\"}} {}", h.counts[i]);
            }
            let _ = writeln!(out, "floe_request_duration_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(out, "floe_request_duration_seconds_sum{{op=\"{op}\"}} {}", h.sum_s);
            let _ = writeln!(out, "floe_request_duration_seconds_count{{op=\"{op}\"}} {}", h.count);
        }
        let host = api.host();
        let _ = writeln!(
            out,
            "# HELP floe_raft_state Raft role per group (0 follower, 1 candidate, 2 leader, 3 learner, 4 shutdown)."
        );
        let _ = writeln!(out, "# TYPE floe_raft_state gauge");
        let mut gauges: Vec<(u64, [(&str, u64); 5])> = Vec::new();
        for g in host.group_ids() {
            let Some(h) = host.group(g) else { continue };
            let m = h.raft.metrics().borrow().clone();
            let role = match m.state {
                openraft::ServerState::Follower => 0,
                openraft::ServerState::Candidate => 1,
                openraft::ServerState::Leader => 2,
                openraft::ServerState::Learner => 3,
                openraft::ServerState::Shutdown => 4,
            };
            gauges.push((
                g,
                [
                    ("floe_raft_state", role),
                    ("floe_raft_term", m.current_term),
                    ("floe_raft_last_log_index", m.last_log_index.unwrap_or(0)),
                    ("floe_raft_applied_index", m.last_applied.map(|l| l.index).unwrap_or(0)),
                    ("floe_raft_snapshot_index", m.snapshot.map(|l| l.index).unwrap_or(0)),
                ],
            ));
        }
        for i in 0..5 {
            if i > 0 {
                if let Some((_, values)) = gauges.first() {
                    let _ = writeln!(out, "# TYPE {} gauge", values[i].0);
                }
            }
            for (g, values) in &gauges {
                let _ = writeln!(out, "{}{{group=\"{g}\"}} {}", values[i].0, values[i].1);
            }
        }
        let stats = host.writer_stats();
        let _ = writeln!(out, "# HELP floe_log_syncs_total Synced log writes (fsyncs) and the batches they carried.");
        let _ = writeln!(out, "# TYPE floe_log_syncs_total counter");
        let _ = writeln!(out, "floe_log_syncs_total {}", stats.syncs.load(Ordering::Relaxed));
        let _ = writeln!(out, "# TYPE floe_log_synced_batches_total counter");
        let _ = writeln!(out, "floe_log_synced_batches_total {}", stats.batches.load(Ordering::Relaxed));
        out
    }
}
