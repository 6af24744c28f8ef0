//! `floe bench`: YCSB-style load against a running cluster, following the conventions of
//! `shared/BENCH.md` (flags, keys, values, preload, report fields) so its figures compare
//! field by field with the same workloads run against other systems.
//!
//! Owns: the command-line arguments, their validation into [`BenchConfig`], and the run
//! order: ask every endpoint for its status → open the connections → preload → probe one
//! read at the chosen consistency → measured phase (CPU sampled at its start and end) →
//! table on stdout, JSON report to `--json`.
//!
//! Submodules, one job each: `keys` (pure key choice and values), `servers` (ClusterStatus of
//! each endpoint), `preload`, `clients` (the measured phase), `cpu` (/proc sampling),
//! `report` (histograms, table, JSON).
//!
//! Connections: connection i is one `floe_client::Client` whose only endpoint is endpoint
//! i mod (endpoints that answered); client j uses connection j mod conns. floe-client sends
//! writes and STRONG reads to the shard leader once a response named it (its leader cache),
//! so only EVENTUAL, SESSION and BOUNDED reads stay on the pinned endpoint; with one shard,
//! all writes and strong reads of every connection reach the leader.
//!
//! Workload `hot`: 50 % get / 50 % put over the first ⌈N/100⌉ keys (`k00000000` onward, at
//! least one key); `--distribution` applies inside that range. The preload still writes all
//! N keys, so a hot run sees the same data as the others.
//!
//! Binary-facing code: errors are `anyhow`. Nothing here panics on what the network returns.

pub mod clients;
pub mod cpu;
pub mod keys;
pub mod preload;
pub mod report;
pub mod servers;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use floe_client::{Client, Error as ClientError, ReadConsistency};
use serde::Serialize;

use crate::docs::Limits;
use keys::{Distribution, KEYS_MAX};
use report::Report;

/// The collection every key lives in (BENCH.md).
pub const COLLECTION: &str = "bench";
/// Most clients one run may start.
pub const CLIENTS_MAX: u64 = 10_000;
/// `--conns 0` means min(clients, this).
pub const CONNS_DEFAULT_MAX: u64 = 64;
/// Run length when neither `--duration` nor `--ops` is given.
pub const DURATION_DEFAULT: Duration = Duration::from_secs(30);
/// Share of the keys the `hot` workload touches, in percent.
pub const HOT_RANGE_PERCENT: u64 = 1;
/// Bytes of `{"v":""}`, the document around the letters.
const DOCUMENT_OVERHEAD_BYTES: usize = 8;

/// Which operations a run issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// 100 % put.
    W,
    /// 50 % get, 50 % put.
    A,
    /// 95 % get, 5 % put.
    B,
    /// 100 % get.
    C,
    /// 50 % get, 50 % put on the first 1 % of the keys.
    Hot,
}

impl Workload {
    /// Probability that an operation is a get.
    pub fn get_fraction(self) -> f64 {
        match self {
            Workload::W => 0.0,
            Workload::A | Workload::Hot => 0.5,
            Workload::B => 0.95,
            Workload::C => 1.0,
        }
    }

    pub fn has_gets(self) -> bool {
        self.get_fraction() > 0.0
    }

    pub fn name(self) -> &'static str {
        match self {
            Workload::W => "w",
            Workload::A => "a",
            Workload::B => "b",
            Workload::C => "c",
            Workload::Hot => "hot",
        }
    }
}

/// Read consistency of every get.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Linearizable (Floe `STRONG`).
    Strong,
    /// At most `--max-staleness-ms` behind (Floe `BOUNDED_STALENESS`).
    Bounded,
    /// Reads see the client's own writes (Floe `SESSION`; each client carries the token of
    /// its last put, starting from the preload's).
    Session,
    /// The contacted member's local state (Floe `EVENTUAL`).
    Eventual,
}

/// When to write the keys before measuring.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PreloadMode {
    /// Only for workloads with gets, and only when the keys are not there yet.
    Auto,
    /// Always write every key.
    Always,
    /// Never write; gets of missing keys count as `not_found`.
    Never,
}

/// `floe bench` arguments (see `shared/BENCH.md` for their exact meaning).
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// gRPC endpoints, comma-separated. Connection i goes to endpoint i mod (number of endpoints).
    #[arg(long, env = "FLOE_BENCH_ENDPOINTS", value_delimiter = ',', default_value = "127.0.0.1:7700")]
    pub endpoints: Vec<String>,
    /// w: 100% put; a: 50/50 get/put; b: 95/5; c: 100% get; hot: 50/50 on the first 1% of keys.
    #[arg(long, env = "FLOE_BENCH_WORKLOAD", value_enum, default_value_t = Workload::A)]
    pub workload: Workload,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, env = "FLOE_BENCH_CLIENTS", default_value_t = 16)]
    pub clients: u64,
    /// gRPC connections; client j uses connection j mod conns. 0: min(clients, 64).
    #[arg(long, env = "FLOE_BENCH_CONNS", default_value_t = 0)]
    pub conns: u64,
    /// Measured time, e.g. 30s, 500ms, 2m (default 30s unless --ops is given).
    #[arg(long, env = "FLOE_BENCH_DURATION")]
    pub duration: Option<String>,
    /// Total operations over all clients; the run stops at whichever of --duration and --ops
    /// comes first.
    #[arg(long, env = "FLOE_BENCH_OPS")]
    pub ops: Option<u64>,
    /// Read consistency of gets.
    #[arg(long, env = "FLOE_BENCH_CONSISTENCY", value_enum, default_value_t = Consistency::Strong)]
    pub consistency: Consistency,
    /// Staleness bound of --consistency bounded.
    #[arg(long, env = "FLOE_BENCH_MAX_STALENESS_MS", default_value_t = 1000)]
    pub max_staleness_ms: u64,
    /// Letters per value; every put writes {"v":"<letters>"}.
    #[arg(long, env = "FLOE_BENCH_VALUE_SIZE", default_value_t = 256)]
    pub value_size: usize,
    /// Number of keys k00000000 .. k{N-1} (at most 10^8).
    #[arg(long, env = "FLOE_BENCH_KEYS", default_value_t = 10_000)]
    pub keys: u64,
    /// Key distribution.
    #[arg(long, env = "FLOE_BENCH_DISTRIBUTION", value_enum, default_value_t = Distribution::Uniform)]
    pub distribution: Distribution,
    /// Zipfian θ (strictly between 0 and 1).
    #[arg(long, env = "FLOE_BENCH_ZIPF_THETA", default_value_t = 0.99)]
    pub zipf_theta: f64,
    /// Seed of key choice and value letters.
    #[arg(long, env = "FLOE_BENCH_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Write every key first: auto (workloads with gets, when the keys are missing), always, never.
    #[arg(long, env = "FLOE_BENCH_PRELOAD", value_enum, default_value_t = PreloadMode::Auto)]
    pub preload: PreloadMode,
    /// The preload fails if it takes longer.
    #[arg(long, env = "FLOE_BENCH_PRELOAD_TIMEOUT", default_value = "120s")]
    pub preload_timeout: String,
    /// PIDs of the server processes whose CPU share to report, comma-separated.
    #[arg(long, env = "FLOE_BENCH_SERVER_PIDS", value_delimiter = ',')]
    pub server_pids: Vec<u32>,
    /// Write the JSON report to this file.
    #[arg(long, env = "FLOE_BENCH_JSON")]
    pub json: Option<PathBuf>,
    /// Before the measured phase, split the key range into this many shards at evenly spaced
    /// keys (keys that already start a shard are left alone); 0 or 1: leave the shards.
    #[arg(long, env = "FLOE_BENCH_PRESPLIT", default_value_t = 0)]
    pub presplit: u64,
}

/// Validated settings; serialized as the report's `config`.
#[derive(Clone, Debug, Serialize)]
pub struct BenchConfig {
    pub endpoints: Vec<String>,
    pub workload: Workload,
    pub clients: u64,
    /// Resolved (never 0).
    pub conns: u64,
    /// `None` when only `--ops` bounds the run.
    pub duration_s: Option<f64>,
    pub ops: Option<u64>,
    pub consistency: Consistency,
    /// Only with `--consistency bounded`.
    pub max_staleness_ms: Option<u64>,
    pub value_size: usize,
    pub keys: u64,
    pub distribution: Distribution,
    pub zipf_theta: f64,
    /// Keys the `hot` workload touches (`None` for other workloads).
    pub hot_keys: Option<u64>,
    pub seed: u64,
    pub preload: PreloadMode,
    pub preload_timeout_s: f64,
    pub server_pids: Vec<u32>,
    pub presplit: u64,
    pub collection: &'static str,
    /// Version of the `floe` binary that ran the benchmark.
    pub tool_version: &'static str,
}

/// Parses `30s`, `500ms`, `2m`, `1h`, `1.5s` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().with_context(|| format!("{text:?} is not a duration (e.g. 30s, 500ms, 2m)"))?;
    let seconds = match unit.trim() {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        other => bail!("unknown duration unit {other:?} in {text:?} (use ms, s, m or h)"),
    };
    Duration::try_from_secs_f64(seconds).with_context(|| format!("{text:?} is not a valid duration"))
}

impl BenchConfig {
    /// Checks every flag; the messages name the flag at fault.
    pub fn from_args(args: BenchArgs) -> Result<BenchConfig> {
        let endpoints: Vec<String> =
            args.endpoints.iter().map(|e| e.trim().to_owned()).filter(|e| !e.is_empty()).collect();
        if endpoints.is_empty() {
            bail!("--endpoints is empty");
        }
        for endpoint in &endpoints {
            floe_client::normalize_endpoint(endpoint).with_context(|| format!("--endpoints {endpoint:?}"))?;
        }
        if args.clients == 0 || args.clients > CLIENTS_MAX {
            bail!("--clients must be between 1 and {CLIENTS_MAX}");
        }
        let conns = if args.conns == 0 { args.clients.min(CONNS_DEFAULT_MAX) } else { args.conns };
        if conns > args.clients {
            bail!("--conns {conns} exceeds --clients {}: the extra connections would stay idle", args.clients);
        }
        if args.keys == 0 || args.keys > KEYS_MAX {
            bail!("--keys must be between 1 and {KEYS_MAX}");
        }
        let value_size_max = Limits::default().doc_bytes_max - DOCUMENT_OVERHEAD_BYTES;
        if args.value_size > value_size_max {
            bail!("--value-size {} exceeds the server's document limit ({value_size_max} letters)", args.value_size);
        }
        if args.distribution == Distribution::Zipfian && !(args.zipf_theta > 0.0 && args.zipf_theta < 1.0) {
            bail!("--zipf-theta must be strictly between 0 and 1, got {}", args.zipf_theta);
        }
        if args.ops == Some(0) {
            bail!("--ops must be at least 1");
        }
        let duration = match (&args.duration, args.ops) {
            (Some(text), _) => Some(parse_duration(text).context("--duration")?),
            (None, Some(_)) => None,
            (None, None) => Some(DURATION_DEFAULT),
        };
        if duration.is_some_and(|d| d.is_zero()) {
            bail!("--duration must be greater than zero");
        }
        let preload_timeout = parse_duration(&args.preload_timeout).context("--preload-timeout")?;
        if preload_timeout.is_zero() {
            bail!("--preload-timeout must be greater than zero");
        }
        if args.consistency == Consistency::Bounded && args.max_staleness_ms == 0 {
            bail!("--max-staleness-ms must be greater than zero");
        }
        let hot_keys = (args.workload == Workload::Hot).then(|| (args.keys * HOT_RANGE_PERCENT).div_ceil(100).max(1));
        Ok(BenchConfig {
            endpoints,
            workload: args.workload,
            clients: args.clients,
            conns,
            duration_s: duration.map(|d| d.as_secs_f64()),
            ops: args.ops,
            consistency: args.consistency,
            max_staleness_ms: (args.consistency == Consistency::Bounded).then_some(args.max_staleness_ms),
            value_size: args.value_size,
            keys: args.keys,
            distribution: args.distribution,
            zipf_theta: args.zipf_theta,
            hot_keys,
            seed: args.seed,
            preload: args.preload,
            preload_timeout_s: preload_timeout.as_secs_f64(),
            server_pids: args.server_pids,
            presplit: if args.presplit > args.keys {
                bail!("--presplit {} exceeds --keys {}", args.presplit, args.keys)
            } else {
                args.presplit
            },
            collection: COLLECTION,
            tool_version: env!("CARGO_PKG_VERSION"),
        })
    }

    /// The keys the measured phase picks from: (first index, count).
    pub fn key_range(&self) -> (u64, u64) {
        (0, self.hot_keys.unwrap_or(self.keys))
    }

    /// The consistency as it is sent (`bounded(1000ms)` for bounded).
    pub fn consistency_label(&self) -> String {
        match (self.consistency, self.max_staleness_ms) {
            (Consistency::Bounded, Some(ms)) => format!("bounded({ms}ms)"),
            (Consistency::Strong, _) => "strong".into(),
            (Consistency::Bounded, None) => "bounded".into(),
            (Consistency::Session, _) => "session".into(),
            (Consistency::Eventual, _) => "eventual".into(),
        }
    }

    /// `uniform` or `zipfian(0.99)`, plus the hot range if any.
    pub fn distribution_label(&self) -> String {
        let distribution = match self.distribution {
            Distribution::Uniform => "uniform".to_string(),
            Distribution::Zipfian => format!("zipfian({})", self.zipf_theta),
        };
        match self.hot_keys {
            Some(hot) => format!("{distribution} over the first {hot}"),
            None => distribution,
        }
    }

    fn read_consistency(&self, session_token: &str) -> ReadConsistency {
        match self.consistency {
            Consistency::Strong => ReadConsistency::Strong,
            Consistency::Eventual => ReadConsistency::Eventual,
            Consistency::Session => ReadConsistency::Session(session_token.to_owned()),
            Consistency::Bounded => {
                ReadConsistency::BoundedStaleness(Duration::from_millis(self.max_staleness_ms.unwrap_or(0)))
            }
        }
    }

    /// A valid config for tests.
    #[cfg(test)]
    pub fn example() -> BenchConfig {
        use clap::Parser;
        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: BenchArgs,
        }
        let wrapper = Wrapper::parse_from(["bench", "--duration", "2s", "--keys", "1000"]);
        BenchConfig::from_args(wrapper.args).expect("example config is valid")
    }
}

/// The document every put writes: `{"v":"<letters>"}`.
#[derive(Serialize)]
pub struct BenchDoc<'a> {
    pub v: &'a str,
}

/// Runs `floe bench` to the end: prints the table, writes `--json`. Fails when no endpoint
/// answers, the preload times out, the server rejects the read consistency, or no operation
/// succeeded.
pub async fn run(args: BenchArgs) -> Result<()> {
    let json_path = args.json.clone();
    let config = BenchConfig::from_args(args)?;

    let servers = servers::probe(&config.endpoints).await;
    let answering: Vec<&str> =
        servers.iter().filter(|server| server.answered).map(|server| server.endpoint.as_str()).collect();
    if answering.is_empty() {
        let reasons: Vec<String> = servers
            .iter()
            .map(|server| format!("{}: {}", server.endpoint, server.error.as_deref().unwrap_or("no answer")))
            .collect();
        bail!("no endpoint answered ClusterStatus ({})", reasons.join("; "));
    }
    for server in servers.iter().filter(|server| !server.answered) {
        eprintln!(
            "warning: {} did not answer ({}); its connections go to the endpoints that did",
            server.endpoint,
            server.error.as_deref().unwrap_or("no answer")
        );
    }
    let conns = (0..config.conns)
        .map(|i| {
            let endpoint = answering[(i % answering.len() as u64) as usize];
            Client::builder().endpoint(endpoint).build().with_context(|| format!("connection {i} to {endpoint}"))
        })
        .collect::<Result<Vec<Client>>>()?;

    let value = keys::value_letters(config.seed, config.value_size);
    let preload = preload::run(&config, &conns, &value).await?;
    if config.workload.has_gets() {
        probe_read(&config, &conns[0], &preload.session_token).await?;
    }

    if config.presplit > 1 {
        presplit(&config, answering[0]).await?;
    }
    // Shards over time: a split under load shows up here (hot workload, low --split-qps).
    let (stop_poll, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let poller = tokio::spawn(poll_shards(conns[0].clone(), stop_rx));
    let phase = clients::run(&config, &conns, &value, preload.session_token.clone()).await?;
    let _ = stop_poll.send(());
    let timeline_shards = poller.await.unwrap_or_default();

    let mut report = Report::new(config, servers, preload.report, &phase.recorder, phase.elapsed, phase.cpu)?;
    report.timeline_shards = timeline_shards;
    print!("{}", report.table());
    if let Some(path) = &json_path {
        std::fs::write(path, report.to_json()? + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("report: {}", path.display());
    }
    let (ok, errors) = phase.recorder.counts();
    if ok == 0 {
        bail!("no operation succeeded ({errors} errors)");
    }
    Ok(())
}

/// Splits the key range into `config.presplit` shards at evenly spaced keys.
async fn presplit(config: &BenchConfig, endpoint: &str) -> Result<()> {
    let ids: Vec<String> = (1..config.presplit).map(|i| keys::key_name(i * config.keys / config.presplit)).collect();
    let admin = Client::builder()
        .endpoint(endpoint)
        .request_timeout(Duration::from_secs(300))
        .build()
        .context("presplit client")?;
    let started = std::time::Instant::now();
    // Split at the keys not already starting a shard, one request of at most 1,000 keys each.
    let status = admin.cluster_status().await.context("presplit: ClusterStatus")?;
    let starts: std::collections::BTreeSet<String> = status.shards.iter().map(|s| s.start_hex.clone()).collect();
    let todo: Vec<&str> = ids
        .iter()
        .filter(|id| !starts.contains(&crate::keys::to_hex(&floe_client::doc_key("", COLLECTION, id))))
        .map(String::as_str)
        .collect();
    for chunk in todo.chunks(1_000) {
        admin.split_at(COLLECTION, chunk).await.context("presplit")?;
    }
    eprintln!("presplit: {} new shards in {:.1} s", todo.len(), started.elapsed().as_secs_f64());
    Ok(())
}

/// The cluster's shard count once a second until `stop` fires.
async fn poll_shards(client: Client, mut stop: tokio::sync::oneshot::Receiver<()>) -> Vec<u64> {
    let mut counts = Vec::new();
    loop {
        let shards = client.cluster_status().await.map(|s| s.shards.len() as u64).unwrap_or(0);
        counts.push(shards);
        tokio::select! {
            _ = &mut stop => return counts,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// One get of key 0 at the configured consistency, so a level the server does not offer (or
/// a missing collection) fails the run up front instead of as N errors.
async fn probe_read(config: &BenchConfig, conn: &Client, session_token: &str) -> Result<()> {
    let collection = conn.collection(COLLECTION);
    match collection.get_with::<serde::de::IgnoredAny>(&keys::key_name(0), config.read_consistency(session_token)).await
    {
        Ok(_) => Ok(()),
        Err(ClientError::InvalidArgument { code, message }) => {
            bail!("the server rejects --consistency {} ({code}): {message}", config.consistency_label())
        }
        Err(error @ ClientError::NotFound { .. }) => {
            bail!("collection {COLLECTION:?} is missing ({error}); run with --preload auto or always")
        }
        Err(error) => Err(error).context("the first read failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn config(extra: &[&str]) -> Result<BenchConfig> {
        let argv = std::iter::once("bench").chain(extra.iter().copied());
        BenchConfig::from_args(Wrapper::try_parse_from(argv)?.args)
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn defaults_follow_bench_md() {
        let c = config(&[]).unwrap();
        assert_eq!(c.conns, 16, "--conns 0 means min(clients, 64)");
        assert_eq!(c.duration_s, Some(30.0));
        assert_eq!(c.preload_timeout_s, 120.0);
        assert_eq!(c.zipf_theta, 0.99);
        assert_eq!(c.max_staleness_ms, None);
        let c = config(&["--clients", "200", "--ops", "10", "--consistency", "bounded"]).unwrap();
        assert_eq!(c.conns, 64);
        assert_eq!(c.duration_s, None, "--ops alone bounds the run");
        assert_eq!(c.max_staleness_ms, Some(1000));
    }

    #[test]
    fn invalid_flags_are_rejected() {
        for bad in [
            &["--clients", "0"][..],
            &["--keys", "0"],
            &["--keys", "100000001"],
            &["--conns", "20", "--clients", "4"],
            &["--distribution", "zipfian", "--zipf-theta", "1"],
            &["--ops", "0"],
            &["--duration", "0s"],
            &["--value-size", "2000000"],
            &["--endpoints", "https://x:1"],
            &["--workload", "d"],
        ] {
            assert!(config(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn hot_range_is_one_percent() {
        let c = config(&["--workload", "hot", "--keys", "1000"]).unwrap();
        assert_eq!(c.key_range(), (0, 10));
        assert_eq!(config(&["--workload", "hot", "--keys", "50"]).unwrap().key_range(), (0, 1));
        assert_eq!(config(&["--workload", "a", "--keys", "50"]).unwrap().key_range(), (0, 50));
    }
}
