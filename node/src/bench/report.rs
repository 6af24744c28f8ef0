//! What a `floe bench` run measured and how it is shown: per-client [`Recorder`]s (one HDR
//! histogram per op type, error and not-found counts, a per-second timeline), their merge,
//! the JSON [`Report`] (field names of `shared/BENCH.md`) and the text table.
//!
//! Pure: no I/O except what the caller does with the strings; time arrives as durations.
//!
//! Conventions: latencies are recorded in µs (3 significant digits, saturating at one hour)
//! and reported in ms. `ops` counts calls that returned without error, including gets that
//! found no document (`not_found` is that subset); `errors` counts calls that failed and are
//! not in the histograms. When an op type has no successful call its latencies are all 0.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::cpu::CpuReport;
use super::BenchConfig;

/// Highest latency the histograms keep apart, in µs (larger values are counted as this).
const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Significant decimal digits of the histograms (BENCH.md).
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;
/// Distinct error messages kept for the report.
pub const ERROR_SAMPLES_MAX: usize = 5;

/// The two operation types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Get,
    Put,
}

fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; failing here is a programming error.
    Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGNIFICANT_DIGITS).expect("valid histogram bounds")
}

/// Counts and latencies of one op type.
#[derive(Clone, Debug)]
pub struct OpStats {
    latency_us: Histogram<u64>,
    errors: u64,
    not_found: u64,
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats { latency_us: histogram(), errors: 0, not_found: 0 }
    }
}

impl OpStats {
    fn merge(&mut self, other: &OpStats) -> Result<()> {
        self.latency_us.add(&other.latency_us).context("merging latency histograms")?;
        self.errors += other.errors;
        self.not_found += other.not_found;
        Ok(())
    }

    fn ops(&self) -> u64 {
        self.latency_us.len()
    }

    fn to_report(&self, elapsed_s: f64) -> OpReport {
        let ops = self.ops();
        let ms = |us: u64| us as f64 / 1000.0;
        let latency_ms = if ops == 0 {
            LatencyMs::default()
        } else {
            let h = &self.latency_us;
            LatencyMs {
                mean: h.mean() / 1000.0,
                p50: ms(h.value_at_quantile(0.50)),
                p90: ms(h.value_at_quantile(0.90)),
                p99: ms(h.value_at_quantile(0.99)),
                p999: ms(h.value_at_quantile(0.999)),
                max: ms(h.max()),
            }
        };
        let ops_per_s = if elapsed_s > 0.0 { ops as f64 / elapsed_s } else { 0.0 };
        OpReport { ops, errors: self.errors, not_found: self.not_found, ops_per_s, latency_ms }
    }
}

/// What one client (or, after merging, the whole run) measured.
#[derive(Clone, Debug, Default)]
pub struct Recorder {
    get: OpStats,
    put: OpStats,
    /// Successful ops completed in second i after t0.
    timeline: Vec<u64>,
    error_samples: Vec<String>,
}

impl Recorder {
    fn stats_mut(&mut self, kind: OpKind) -> &mut OpStats {
        match kind {
            OpKind::Get => &mut self.get,
            OpKind::Put => &mut self.put,
        }
    }

    /// A call that returned; `found` is false for a get that found no document.
    /// `completed_after_t0` places it in the timeline.
    pub fn record_ok(&mut self, kind: OpKind, latency: Duration, found: bool, completed_after_t0: Duration) {
        let stats = self.stats_mut(kind);
        let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
        stats.latency_us.saturating_record(latency_us);
        if !found {
            stats.not_found += 1;
        }
        let second = completed_after_t0.as_secs() as usize;
        if self.timeline.len() <= second {
            self.timeline.resize(second + 1, 0);
        }
        self.timeline[second] += 1;
    }

    /// A call that failed.
    pub fn record_error(&mut self, kind: OpKind, message: impl FnOnce() -> String) {
        self.stats_mut(kind).errors += 1;
        if self.error_samples.len() < ERROR_SAMPLES_MAX {
            let message = message();
            if !self.error_samples.contains(&message) {
                self.error_samples.push(message);
            }
        }
    }

    /// Adds another recorder's measurements to this one.
    pub fn merge(&mut self, other: &Recorder) -> Result<()> {
        self.get.merge(&other.get)?;
        self.put.merge(&other.put)?;
        if self.timeline.len() < other.timeline.len() {
            self.timeline.resize(other.timeline.len(), 0);
        }
        for (mine, theirs) in self.timeline.iter_mut().zip(&other.timeline) {
            *mine += theirs;
        }
        for message in &other.error_samples {
            if self.error_samples.len() < ERROR_SAMPLES_MAX && !self.error_samples.contains(message) {
                self.error_samples.push(message.clone());
            }
        }
        Ok(())
    }

    /// Successful and failed calls so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.get.ops() + self.put.ops(), self.get.errors + self.put.errors)
    }

    fn total(&self) -> Result<OpStats> {
        let mut total = self.get.clone();
        total.merge(&self.put)?;
        Ok(total)
    }
}

/// Latencies in milliseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct LatencyMs {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// One op type (or the total) in the report.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct OpReport {
    pub ops: u64,
    pub errors: u64,
    pub not_found: u64,
    pub ops_per_s: f64,
    pub latency_ms: LatencyMs,
}

/// `ops.get` and `ops.put`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct OpsReport {
    pub get: OpReport,
    pub put: OpReport,
}

/// One endpoint as its `Admin.ClusterStatus` answer describes it. Floe does not expose the
/// server version, the raft term or the database size yet: those are always `null`.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ServerInfo {
    pub endpoint: String,
    pub answered: bool,
    pub version: Option<String>,
    pub member_id: Option<u64>,
    /// True when this member leads a data shard (today there is one).
    pub leader: Option<bool>,
    /// True when this member leads the meta group.
    pub meta_leader: Option<bool>,
    pub raft_term: Option<u64>,
    pub db_size_bytes: Option<u64>,
    /// Highest applied index of the data shards on this member.
    pub applied_index: Option<u64>,
    pub shards: Vec<ShardInfo>,
    /// Why the endpoint did not answer.
    pub error: Option<String>,
}

/// A data shard as one member sees it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ShardInfo {
    pub id: u64,
    /// Leader member id, `None` when unknown.
    pub leader: Option<u64>,
    pub applied_index: u64,
}

/// The preload phase.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PreloadReport {
    /// Whether keys were written.
    pub performed: bool,
    /// Why it ran or was skipped.
    pub reason: String,
    pub keys: u64,
    /// Atomic batches written (at most 64 puts each).
    pub batches: u64,
    /// Time spent, including the check whether the keys already exist.
    pub elapsed_s: f64,
    pub keys_per_s: f64,
}

/// The JSON report (`--json`).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub config: BenchConfig,
    pub servers: Vec<ServerInfo>,
    pub preload: PreloadReport,
    /// From t0 until the last client finished.
    pub elapsed_s: f64,
    pub total: OpReport,
    pub ops: OpsReport,
    /// Successful ops completed in each second after t0; the last entry may cover a partial
    /// second (and in-flight calls finishing after the deadline).
    pub timeline_ops_per_s: Vec<u64>,
    /// `None` where `/proc` is unreadable.
    pub cpu: Option<CpuReport>,
    /// The cluster's shard count sampled once a second during the measured phase (shows
    /// splits happening under load).
    pub timeline_shards: Vec<u64>,
    /// Up to `ERROR_SAMPLES_MAX` distinct error messages.
    pub error_samples: Vec<String>,
}

impl Report {
    /// Assembles the report from the merged recorder.
    pub fn new(
        config: BenchConfig,
        servers: Vec<ServerInfo>,
        preload: PreloadReport,
        recorder: &Recorder,
        elapsed: Duration,
        cpu: Option<CpuReport>,
    ) -> Result<Report> {
        let elapsed_s = elapsed.as_secs_f64();
        Ok(Report {
            config,
            servers,
            preload,
            elapsed_s,
            total: recorder.total()?.to_report(elapsed_s),
            ops: OpsReport { get: recorder.get.to_report(elapsed_s), put: recorder.put.to_report(elapsed_s) },
            timeline_ops_per_s: recorder.timeline.clone(),
            cpu,
            timeline_shards: Vec::new(),
            error_samples: recorder.error_samples.clone(),
        })
    }

    /// Pretty-printed JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).context("serializing the report")
    }

    /// The human table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let c = &self.config;
        let _ = writeln!(
            out,
            "workload {} | {} clients over {} conns to {} endpoint(s) | {} keys {} | value {} B | consistency {}",
            c.workload.name(),
            c.clients,
            c.conns,
            c.endpoints.len(),
            c.keys,
            c.distribution_label(),
            c.value_size,
            c.consistency_label(),
        );
        let preload = if self.preload.performed {
            format!("{} keys in {:.2} s", self.preload.keys, self.preload.elapsed_s)
        } else {
            "skipped".to_string()
        };
        let _ = writeln!(out, "preload: {preload} ({}) | measured: {:.2} s", self.preload.reason, self.elapsed_s);
        if let (Some(first), Some(last)) = (self.timeline_shards.first(), self.timeline_shards.last()) {
            let changes: Vec<String> = self
                .timeline_shards
                .windows(2)
                .enumerate()
                .filter(|(_, w)| w[0] != w[1])
                .map(|(t, w)| format!("{} at {} s", w[1], t + 1))
                .collect();
            let changes = if changes.is_empty() { String::new() } else { format!(" ({})", changes.join(", ")) };
            let _ = writeln!(out, "shards: {first} -> {last}{changes}");
        }
        let _ = writeln!(
            out,
            "{:<6} {:>10} {:>7} {:>9} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "op", "ops", "errors", "not_found", "ops/s", "mean", "p50", "p90", "p99", "p99.9", "max ms"
        );
        let rows = [("get", &self.ops.get), ("put", &self.ops.put), ("total", &self.total)];
        for (name, op) in rows {
            if name != "total" && op.ops == 0 && op.errors == 0 {
                continue;
            }
            let l = &op.latency_ms;
            let _ = writeln!(
                out,
                "{:<6} {:>10} {:>7} {:>9} {:>10.1} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
                name, op.ops, op.errors, op.not_found, op.ops_per_s, l.mean, l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
        match &self.cpu {
            Some(cpu) => {
                let tool = cpu.tool_pct.map_or("?".to_string(), |p| format!("{p:.1} %"));
                let servers = if cpu.servers.is_empty() {
                    "not measured (no --server-pids)".to_string()
                } else {
                    format!("{:.1} %", cpu.servers_pct)
                };
                let _ = writeln!(
                    out,
                    "cpu (% of {} cores): machine busy {:.1} %, bench {tool}, servers {servers}, other {:.1} %",
                    cpu.cpus, cpu.machine_busy_pct, cpu.other_pct
                );
            }
            None => {
                let _ = writeln!(out, "cpu: not available (no /proc)");
            }
        }
        for message in &self.error_samples {
            let _ = writeln!(out, "error: {message}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn sample_report() -> Report {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        for i in 0..100u64 {
            a.record_ok(OpKind::Get, Duration::from_micros(1000 + i), i % 10 != 0, Duration::from_millis(10 * i));
            b.record_ok(OpKind::Put, Duration::from_micros(2000 + i), true, Duration::from_millis(15 * i));
        }
        b.record_error(OpKind::Put, || "timeout".into());
        b.record_error(OpKind::Put, || "timeout".into());
        a.merge(&b).unwrap();
        let config = BenchConfig::example();
        Report::new(config, vec![ServerInfo::default()], PreloadReport::default(), &a, Duration::from_secs(2), None)
            .unwrap()
    }

    /// The JSON carries exactly the field names BENCH.md fixes, so reports compare field by
    /// field with the other tools'.
    #[test]
    fn json_has_the_bench_md_shape() {
        let report = sample_report();
        let json: Value = serde_json::from_str(&report.to_json().unwrap()).unwrap();
        for field in ["config", "servers", "preload", "elapsed_s", "total", "ops", "timeline_ops_per_s", "cpu"] {
            assert!(json.get(field).is_some(), "missing {field}");
        }
        for op in ["get", "put"] {
            let op = &json["ops"][op];
            for field in ["ops", "errors", "not_found", "ops_per_s", "latency_ms"] {
                assert!(op.get(field).is_some(), "missing ops.*.{field}");
            }
            for field in ["mean", "p50", "p90", "p99", "p999", "max"] {
                assert!(op["latency_ms"][field].is_f64(), "missing latency_ms.{field}");
            }
        }
        for field in [
            "endpoints",
            "workload",
            "clients",
            "conns",
            "keys",
            "value_size",
            "distribution",
            "zipf_theta",
            "consistency",
            "seed",
            "preload",
            "preload_timeout_s",
            "server_pids",
        ] {
            assert!(json["config"].get(field).is_some(), "missing config.{field}");
        }
        assert_eq!(json["ops"]["get"]["ops"], 100);
        assert_eq!(json["ops"]["get"]["not_found"], 10);
        assert_eq!(json["ops"]["put"]["errors"], 2);
        assert_eq!(json["total"]["ops"], 200);
        assert_eq!(json["total"]["ops_per_s"], 100.0);
        assert_eq!(json["error_samples"], serde_json::json!(["timeout"]));
        assert!(json["cpu"].is_null());
    }

    #[test]
    fn latencies_are_milliseconds_and_timeline_is_per_second() {
        let report = sample_report();
        let get = &report.ops.get.latency_ms;
        assert!((get.p50 - 1.05).abs() < 0.01, "{get:?}");
        assert!((get.max - 1.099).abs() < 0.002, "{get:?}");
        assert!(get.p50 <= get.p90 && get.p90 <= get.p99 && get.p99 <= get.p999 && get.p999 <= get.max);
        // Gets complete at 0..990 ms, puts at 0..1485 ms.
        assert_eq!(report.timeline_ops_per_s, vec![100 + 67, 33]);
        assert_eq!(report.timeline_ops_per_s.iter().sum::<u64>(), report.total.ops);
        let table = report.table();
        assert!(table.contains("get") && table.contains("put") && table.contains("total"), "{table}");
    }

    #[test]
    fn empty_op_type_reports_zeros() {
        let report = Report::new(
            BenchConfig::example(),
            Vec::new(),
            PreloadReport::default(),
            &Recorder::default(),
            Duration::from_secs(1),
            None,
        )
        .unwrap();
        assert_eq!(report.ops.put.ops, 0);
        assert_eq!(report.ops.put.latency_ms, LatencyMs::default());
        assert!(!report.table().contains("\nput "));
    }
}
