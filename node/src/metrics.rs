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

impl Histogram {
    fn observe(&mut self, latency: Duration) {
        let s = latency.as_secs_f64();
        for (i, le) in LATENCY_BUCKETS_S.iter().enumerate() {
            if s <= *le {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum_s += s;
    }

    /// Writes the `_bucket`, `_sum` and `_count` lines of `name` with label `label="value"`.
    fn render(&self, out: &mut String, name: &str, label: &str, value: &str) {
        for (i, le) in LATENCY_BUCKETS_S.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{label}=\"{value}\",le=\"{le}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{{label}=\"{value}\",le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{label}=\"{value}\"}} {}", self.sum_s);
        let _ = writeln!(out, "{name}_count{{{label}=\"{value}\"}} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(&'static str, &'static str), u64>,
    latency: BTreeMap<&'static str, Histogram>,
    /// Reads by (consistency, path): local, waited, read_index, forwarded, refused.
    read_paths: BTreeMap<(&'static str, &'static str), u64>,
    /// Read latency by consistency level.
    read_latency: BTreeMap<&'static str, Histogram>,
    /// The placement driver's operations by (kind, reason, outcome).
    placement: BTreeMap<(&'static str, &'static str, &'static str), u64>,
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
        inner.latency.entry(op).or_default().observe(latency);
    }

    /// Counts one read of `consistency` that found its position by `path`.
    pub fn observe_read_path(&self, consistency: &'static str, path: &'static str) {
        let Ok(mut inner) = self.inner.lock() else { return };
        *inner.read_paths.entry((consistency, path)).or_default() += 1;
    }

    /// Reads that found their position by `path`, over every consistency level.
    pub fn read_path_total(&self, path: &str) -> u64 {
        let Ok(inner) = self.inner.lock() else { return 0 };
        inner.read_paths.iter().filter(|((_, p), _)| *p == path).map(|(_, n)| *n).sum()
    }

    /// Counts one placement-driver operation of `kind` for `reason` that ended with `outcome`
    /// (`ok`, `failed`, `timed_out`).
    pub fn observe_placement(&self, kind: &'static str, reason: &'static str, outcome: &'static str) {
        let Ok(mut inner) = self.inner.lock() else { return };
        *inner.placement.entry((kind, reason, outcome)).or_default() += 1;
    }

    /// Placement-driver operations of `kind` (and `reason`, if given) that succeeded.
    pub fn placement_ok(&self, kind: &str, reason: Option<&str>) -> u64 {
        let Ok(inner) = self.inner.lock() else { return 0 };
        let wanted = |(k, r, o): &(&str, &str, &str)| *k == kind && reason.is_none_or(|w| w == *r) && *o == "ok";
        inner.placement.iter().filter(|(key, _)| wanted(key)).map(|(_, n)| *n).sum()
    }

    /// Records one read's latency (handler time, errors included) by consistency level.
    pub fn observe_read_latency(&self, consistency: &'static str, latency: Duration) {
        let Ok(mut inner) = self.inner.lock() else { return };
        inner.read_latency.entry(consistency).or_default().observe(latency);
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self, api: &NodeApi) -> String {
        let mut out = String::new();
        let (requests, latency, read_paths, read_latency, placement) = match self.inner.lock() {
            Ok(i) => (
                i.requests.clone(),
                i.latency.clone(),
                i.read_paths.clone(),
                i.read_latency.clone(),
                i.placement.clone(),
            ),
            Err(_) => Default::default(),
        };
        let _ = writeln!(out, "# HELP floe_requests_total Requests handled, by operation and outcome code.");
        let _ = writeln!(out, "# TYPE floe_requests_total counter");
        for ((op, code), n) in &requests {
            let _ = writeln!(out, "floe_requests_total{{op=\"{op}\",code=\"{code}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP floe_request_duration_seconds Request latency, by operation.");
        let _ = writeln!(out, "# TYPE floe_request_duration_seconds histogram");
        for (op, h) in &latency {
            h.render(&mut out, "floe_request_duration_seconds", "op", op);
        }
        let _ = writeln!(
            out,
            "# HELP floe_read_paths_total Reads by consistency level and how their position was found \
             (local: this replica's state; waited: waited for this replica to apply; read_index: this \
             node leads and confirmed it; forwarded: asked the leader on another node; refused)."
        );
        let _ = writeln!(out, "# TYPE floe_read_paths_total counter");
        for ((consistency, path), n) in &read_paths {
            let _ = writeln!(out, "floe_read_paths_total{{consistency=\"{consistency}\",path=\"{path}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP floe_read_duration_seconds Read latency in the node, by consistency level.");
        let _ = writeln!(out, "# TYPE floe_read_duration_seconds histogram");
        for (consistency, h) in &read_latency {
            h.render(&mut out, "floe_read_duration_seconds", "consistency", consistency);
        }
        let _ = writeln!(
            out,
            "# HELP floe_placement_operations_total Operations the placement driver ran on this node (as \
             meta leader), by kind (split, merge, move, transfer), reason and outcome (ok, failed, timed_out)."
        );
        let _ = writeln!(out, "# TYPE floe_placement_operations_total counter");
        for ((kind, reason, outcome), n) in &placement {
            let _ = writeln!(
                out,
                "floe_placement_operations_total{{kind=\"{kind}\",reason=\"{reason}\",outcome=\"{outcome}\"}} {n}"
            );
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
        let _ = writeln!(out, "# HELP floe_groups Group replicas on this node: running, or hibernating (dormant).");
        let _ = writeln!(out, "# TYPE floe_groups gauge");
        let _ = writeln!(out, "floe_groups{{state=\"active\"}} {}", host.group_ids().len());
        let _ = writeln!(out, "floe_groups{{state=\"hibernating\"}} {}", host.dormant_ids().len());
        let _ = writeln!(out, "# HELP floe_raft_messages_received_total Node-to-node messages this node received (raft, snapshots, forwarded requests).");
        let _ = writeln!(out, "# TYPE floe_raft_messages_received_total counter");
        let _ = writeln!(out, "floe_raft_messages_received_total {}", host.messages_received());
        let sent = host.transport_stats();
        let _ = writeln!(out, "# HELP floe_raft_messages_sent_total Node-to-node messages this node sent, and the batches that carried them (one stream message per batch per peer).");
        let _ = writeln!(out, "# TYPE floe_raft_messages_sent_total counter");
        let _ = writeln!(out, "floe_raft_messages_sent_total {}", sent.frames_sent);
        let _ = writeln!(out, "# HELP floe_raft_bytes_sent_total Payload bytes of the node-to-node messages this node sent (snapshot transfers not counted).");
        let _ = writeln!(out, "# TYPE floe_raft_bytes_sent_total counter");
        let _ = writeln!(out, "floe_raft_bytes_sent_total {}", sent.bytes_sent);
        let _ = writeln!(out, "# TYPE floe_raft_batches_sent_total counter");
        let _ = writeln!(out, "floe_raft_batches_sent_total {}", sent.batches_sent);
        let _ = writeln!(out, "# HELP floe_peer_links_opened_total Streams opened to peer nodes (after a start, a broken connection or a failed open).");
        let _ = writeln!(out, "# TYPE floe_peer_links_opened_total counter");
        let _ = writeln!(out, "floe_peer_links_opened_total {}", sent.links_opened);
        let _ = writeln!(out, "# HELP floe_group_wakes_total Dormant group replicas started again (hibernation wake-ups and first use after a restart).");
        let _ = writeln!(out, "# TYPE floe_group_wakes_total counter");
        let _ = writeln!(out, "floe_group_wakes_total {}", host.wakes());
        let _ = writeln!(
            out,
            "# HELP floe_peer_down_wakes_total Dormant group replicas woken because the node that led them went down."
        );
        let _ = writeln!(out, "# TYPE floe_peer_down_wakes_total counter");
        let _ = writeln!(out, "floe_peer_down_wakes_total {}", host.peer_down_wakes());
        let (starts, start_secs) = host.start_times();
        let _ = writeln!(
            out,
            "# HELP floe_group_start_seconds Time to start a group replica (open its state, start its raft core)."
        );
        let _ = writeln!(out, "# TYPE floe_group_start_seconds summary");
        let _ = writeln!(out, "floe_group_start_seconds_sum {start_secs}");
        let _ = writeln!(out, "floe_group_start_seconds_count {starts}");
        let stats = host.writer_stats();
        let _ = writeln!(out, "# HELP floe_log_syncs_total Synced log writes (fsyncs) and the batches they carried.");
        let _ = writeln!(out, "# TYPE floe_log_syncs_total counter");
        let _ = writeln!(out, "floe_log_syncs_total {}", stats.syncs.load(Ordering::Relaxed));
        let _ = writeln!(out, "# TYPE floe_log_synced_batches_total counter");
        let _ = writeln!(out, "floe_log_synced_batches_total {}", stats.batches.load(Ordering::Relaxed));
        out
    }
}
