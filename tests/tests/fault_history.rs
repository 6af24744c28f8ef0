//! Proves, under process-level faults, that strong reads, writes and compare-and-sets on a few
//! documents stay linearizable and that no acknowledged write is lost. Three `floe start`
//! processes on loopback; `CLIENTS` concurrent clients, one operation at a time each, on
//! `KEYS` documents; a nemesis that kills a node with SIGKILL and restarts it from its data
//! dir, or freezes it with SIGSTOP and continues it. One node at a time: a majority is always
//! up, so the cluster must keep serving, and the liveness floors below are fair. At the same
//! time an elastic nemesis splits the collection's shard at document boundaries, merges
//! adjacent shards and hands shard leadership between nodes (the operations the placement
//! driver runs by itself), so those too happen under kills and pauses. After the
//! load the cluster is healed and every key is read strongly; those final reads join the
//! history, so a lost acknowledged write makes the history non-linearizable.
//!
//! The history is recorded in the simulator's JSONL format (`floe_sim::history`) and checked
//! with its checker (`floe_sim::linearizability`), plus an explicit lost-write check. On
//! failure the cluster directory (`history.jsonl`, `faults.txt`, node logs and data) is kept
//! and its path printed; `floe-sim check --history <dir>/history.jsonl` re-checks it.
//!
//! Recording rules, which the verdict rests on:
//! - an invoke is recorded before the request is sent and its completion after the answer
//!   arrived, both under one lock, so line order is real-time order;
//! - a write or cas that failed is `fail` only when it certainly had no effect (see
//!   [`update_failure_type`]), otherwise `info` (unknown outcome);
//! - a failed read is `fail` (it constrains nothing either way);
//! - a cas is a strong read (recorded as its own operation) followed by a write conditioned
//!   on the version read, recorded as `cas [value read, new value]`, as the simulator does.
//!   Versions only grow and values are unique, so "version unchanged" is "value unchanged".
//!
//! Bounded: `LOAD_SECS_DEFAULT` seconds of load (`FLOE_FAULT_TEST_SECS` overrides; the long
//! run in README.md uses 600), the whole test by the load plus `TEST_OVERHEAD`.
//! `FLOE_FAULT_TEST_SEED` repeats the nemesis' and clients' random choices (not the timing);
//! `FLOE_FAULT_TEST_KEEP=1` keeps the directory after a pass too.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use floe_client::{Client, Collection, Document, Error, ReadConsistency, RetryPolicy};
use floe_sim::cli::render_report;
use floe_sim::history::{Event, EventType, Function, History};
use floe_sim::linearizability::{check_history, CheckConfig, CheckReport, Verdict};
use floe_tests::{client_for, ensure_collection, Cluster, READY_TIMEOUT};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const NODES: usize = 3;
const COLLECTION: &str = "faults";
/// Documents the clients contend on (`k0`..): few, so operations overlap a lot.
const KEYS: usize = 5;
const CLIENTS: usize = 6;
/// The final reads after the heal run as this process, after every client stopped.
const FINAL_READER_PROCESS: i64 = CLIENTS as i64;
const LOAD_SECS_DEFAULT: u64 = 45;
const LOAD_SECS_ENV: &str = "FLOE_FAULT_TEST_SECS";
const SEED_ENV: &str = "FLOE_FAULT_TEST_SEED";
const KEEP_ENV: &str = "FLOE_FAULT_TEST_KEEP";
/// Small snapshot thresholds, so a restarted node often catches up from a snapshot.
const NODE_ARGS: &[&str] = &["--snapshot-count", "500", "--snapshot-keep-logs", "100"];
/// Bound on everything but the load: start-up, the last fault, joining the clients, the heal,
/// the final reads and the check.
const TEST_OVERHEAD: Duration = Duration::from_secs(180);
/// Per-attempt bound of a workload request: short, so a client stuck on a paused node gives up
/// (and records the outcome) quickly.
const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const CLIENT_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Attempts per workload operation. floe-client retries reads on any transient error but
/// repeats a write only after an error proving the attempt had no effect, so whatever error
/// it finally returns classifies the whole write honestly.
const CLIENT_ATTEMPTS_MAX: u32 = 3;
const CLIENT_BACKOFF_BASE: Duration = Duration::from_millis(20);
const CLIENT_BACKOFF_MAX: Duration = Duration::from_millis(200);
/// Pause before each client operation, drawn uniformly from `0..=` this.
const THINK_TIME_MS_MAX: u64 = 10;
/// How long a fault lasts (node down or frozen).
const FAULT_DURATION_MS: RangeInclusive<u64> = 1_000..=3_000;
/// Quiet time between the faulted node being ready again and the next fault.
const FAULT_GAP_MS: RangeInclusive<u64> = 500..=2_000;
/// Bound on the leader lookup the nemesis makes to aim at the leader.
const LEADER_LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on the clients finishing their last operation once told to stop.
const CLIENT_JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on reading every key after the heal.
const FINAL_READ_TIMEOUT: Duration = Duration::from_secs(30);
const FINAL_READ_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Written values are `(process + 1) * VALUE_STRIDE + seq`: unique per (client, seq), and the
/// writer is readable from the value.
const VALUE_STRIDE: i64 = 1_000_000;
/// Non-vacuity floors: operations that completed `ok` (reads included), and writes plus cas.
const OPS_OK_MIN: usize = 100;
const UPDATES_OK_MIN: usize = 50;
/// Pause between two elastic operations.
const ELASTIC_GAP_MS: RangeInclusive<u64> = 300..=1_200;
/// Bound on one split, merge or leader transfer (a merge waits for both parts to freeze).
const ELASTIC_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How many problems of one kind a failure message lists.
const PROBLEMS_SHOWN_MAX: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strong_history_is_linearizable_under_kills_and_pauses() {
    let load = load_duration();
    match tokio::time::timeout(load + TEST_OVERHEAD, run(load)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => panic!("{error:?}"),
        Err(_) => panic!("test exceeded {} s", (load + TEST_OVERHEAD).as_secs()),
    }
}

/// `$name` parsed as a number, `None` when unset; a value that does not parse is a mistake.
fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    match text.trim().parse::<u64>() {
        Ok(number) => Some(number),
        Err(error) => panic!("{name}={text:?} is not a non-negative integer: {error}"),
    }
}

fn load_duration() -> Duration {
    Duration::from_secs(env_u64(LOAD_SECS_ENV).unwrap_or(LOAD_SECS_DEFAULT).max(1))
}

fn seed() -> u64 {
    env_u64(SEED_ENV).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos() as u64)
            .unwrap_or(0)
    })
}

async fn run(load: Duration) -> anyhow::Result<()> {
    let seed = seed();
    eprintln!(
        "fault_history: seed {seed} ({SEED_ENV}={seed} repeats the random choices), {} s of load",
        load.as_secs()
    );
    let mut cluster = Cluster::start_with_args(NODES, NODE_ARGS).await.context("start cluster")?;
    let outcome = exercise(&mut cluster, seed, load).await;
    let keep = std::env::var(KEEP_ENV).is_ok_and(|value| !value.is_empty() && value != "0");
    match outcome {
        Ok(summary) => {
            eprintln!("{summary}");
            if keep {
                let dir = cluster.keep_dir();
                eprintln!("kept {}", dir.display());
            }
            Ok(())
        }
        Err(error) => {
            let tails = cluster.log_tails();
            let dir = cluster.keep_dir();
            Err(anyhow!(
                "{error:#}\n\nseed {seed}; kept {dir}: history.jsonl (re-check: floe-sim check --history \
                 {dir}/history.jsonl), faults.txt (fault timeline with history lines), node*.log\n{tails}",
                dir = dir.display()
            ))
        }
    }
}

/// Load with faults, heal, final reads, files, checks. Returns a summary of a passing run.
async fn exercise(cluster: &mut Cluster, seed: u64, load: Duration) -> anyhow::Result<String> {
    let endpoints = cluster.grpc_endpoints();
    let setup_client = client_for(&endpoints)?;
    ensure_collection(&setup_client, COLLECTION).await?;

    let recorder = Arc::new(Recorder::default());
    let mut faults = FaultLog::default();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let load_start = Instant::now();
    let outcome = load_and_heal(cluster, &recorder, &mut faults, &mut errors, seed, load).await;
    let load_elapsed = load_start.elapsed();

    // Written whatever happened, so a failure can be re-checked and read by hand.
    let events = recorder.events();
    write_files(cluster.dir(), &events, &faults)?;
    let finals = outcome?;

    let check_start = Instant::now();
    let history = History::from_events(events.iter().cloned().enumerate().map(|(index, event)| (index + 1, event)))
        .context("the recorded history does not parse (a bug in this test's recorder)")?;
    let report = check_history(&history, &CheckConfig::default());
    let check_elapsed = check_start.elapsed();

    let counts = Counts::of(&events);
    let mut problems = Vec::new();
    match report.verdict() {
        Verdict::Linearizable => {}
        Verdict::NotLinearizable | Verdict::Unknown => problems.push(render(&history, &report)?),
    }
    let lost = lost_writes(&events, &finals);
    if !lost.is_empty() {
        problems.push(format!(
            "{} lost or impossible writes (first {PROBLEMS_SHOWN_MAX}):\n  {}",
            lost.len(),
            lost.iter().take(PROBLEMS_SHOWN_MAX).cloned().collect::<Vec<_>>().join("\n  ")
        ));
    }
    if counts.ok_total() < OPS_OK_MIN || counts.updates_ok() < UPDATES_OK_MIN {
        problems.push(format!(
            "too little was acknowledged to prove anything: {} ok operations (floor {OPS_OK_MIN}), \
             {} ok writes and cas (floor {UPDATES_OK_MIN})",
            counts.ok_total(),
            counts.updates_ok()
        ));
    }
    if faults.splits == 0 || faults.merges == 0 {
        problems.push(format!(
            "the elastic nemesis did not both split and merge ({} splits, {} merges): load too short?",
            faults.splits, faults.merges
        ));
    }
    if faults.kills == 0 || faults.pauses == 0 {
        problems.push(format!(
            "the nemesis did not inject both kinds of fault ({} kills, {} pauses): load too short?",
            faults.kills, faults.pauses
        ));
    }

    let mut summary = String::new();
    writeln!(
        summary,
        "fault_history: seed {seed}, {:.1} s of load, {} events, {} kills and {} pauses, {} splits, {} merges \
         and {} leader transfers",
        load_elapsed.as_secs_f64(),
        events.len(),
        faults.kills,
        faults.pauses,
        faults.splits,
        faults.merges,
        faults.transfers
    )?;
    writeln!(summary, "{counts}")?;
    writeln!(
        summary,
        "checker: {:?} over {} keys, {} steps, {} ms; final values {:?}",
        report.verdict(),
        report.keys.len(),
        report.steps(),
        check_elapsed.as_millis(),
        finals
    )?;
    writeln!(summary, "client errors by operation and code: {errors:?}")?;
    writeln!(summary, "faults:\n{}", faults.lines.join("\n"))?;
    if !problems.is_empty() {
        bail!("{}\n\n{summary}", problems.join("\n\n"));
    }
    Ok(summary)
}

/// Runs the clients and the nemesis for `load`, stops both, heals every node and reads every
/// key strongly. Returns the final value of each key.
async fn load_and_heal(
    cluster: &mut Cluster,
    recorder: &Arc<Recorder>,
    faults: &mut FaultLog,
    errors: &mut BTreeMap<String, usize>,
    seed: u64,
    load: Duration,
) -> anyhow::Result<BTreeMap<String, Value>> {
    let endpoints = cluster.grpc_endpoints();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::with_capacity(CLIENTS);
    for process in 0..CLIENTS as i64 {
        let client = workload_client(&endpoints)?;
        let recorder = Arc::clone(recorder);
        let stop = Arc::clone(&stop);
        let client_seed = seed.wrapping_add(1 + process as u64);
        clients.push(tokio::spawn(client_loop(process, client, client_seed, recorder, stop)));
    }

    let load_start = Instant::now();
    let elastic = tokio::spawn(elastic_nemesis(
        endpoints.clone(),
        seed.wrapping_sub(1),
        Arc::clone(recorder),
        Arc::clone(&stop),
        load_start,
    ));
    let mut rng = StdRng::seed_from_u64(seed);
    let nemesis_result = nemesis(cluster, recorder, load_start, load, &mut rng, faults).await;
    stop.store(true, Ordering::SeqCst);
    faults.note(recorder, load_start, "load over: clients told to stop".to_owned());
    let elastic = tokio::time::timeout(ELASTIC_REQUEST_TIMEOUT + CLIENT_JOIN_TIMEOUT, elastic)
        .await
        .map_err(|_| anyhow!("the elastic nemesis did not finish after stop"))?
        .context("elastic nemesis panicked")??;
    faults.splits = elastic.splits;
    faults.merges = elastic.merges;
    faults.transfers = elastic.transfers;
    faults.lines.extend(elastic.lines);
    for client in clients {
        let joined = tokio::time::timeout(CLIENT_JOIN_TIMEOUT, client)
            .await
            .map_err(|_| anyhow!("a client did not finish within {} s of stop", CLIENT_JOIN_TIMEOUT.as_secs()))?;
        for (operation_code, count) in joined.context("client task panicked")?? {
            *errors.entry(operation_code).or_default() += count;
        }
    }
    nemesis_result.context("nemesis")?;

    // Heal. The nemesis ends every fault before its next round, so all nodes should be up; a
    // node that is not running exited on its own, which is a finding, not something to hide.
    for node in &mut cluster.nodes {
        node.process.resume()?;
        if !node.process.is_running() {
            bail!("node{} exited on its own (not killed by the test)", node.node_id);
        }
        node.process.wait_ready(READY_TIMEOUT).await?;
    }
    faults.note(recorder, load_start, "healed: every node running and ready".to_owned());

    let final_client = client_for(&endpoints)?;
    final_reads(&final_client, recorder).await
}

fn workload_client(endpoints: &[String]) -> anyhow::Result<Client> {
    Ok(Client::builder()
        .endpoints(endpoints.iter().cloned())
        .connect_timeout(CLIENT_CONNECT_TIMEOUT)
        .request_timeout(CLIENT_REQUEST_TIMEOUT)
        .retry_policy(RetryPolicy {
            attempts_max: CLIENT_ATTEMPTS_MAX,
            backoff_base: CLIENT_BACKOFF_BASE,
            backoff_max: CLIENT_BACKOFF_MAX,
        })
        .build()?)
}

/// The history being recorded: events in real-time order (see the module doc).
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    fn record(&self, process: i64, event_type: EventType, f: Function, key: &str, value: Option<Value>) {
        self.lock().push(Event { process, event_type, f, key: Some(key.to_owned()), value });
    }

    /// The 1-based line the next event will get.
    fn next_line(&self) -> usize {
        self.lock().len() + 1
    }

    fn events(&self) -> Vec<Event> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Event>> {
        // A push cannot leave the vector inconsistent, so a poisoned lock is still usable.
        self.events.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// How a failed write or cas ends in the history. `fail` only when it certainly had no
/// effect: rejected by the server (a version mismatch or existing document is decided at
/// apply and changes nothing; bad requests never reach a log), refused as retry safe
/// (`floe-retry-safe: true`, or no connection could be made), or refused by the client before
/// sending. Everything else may have been applied: `info`.
fn update_failure_type(error: &Error) -> EventType {
    match error {
        Error::VersionMismatch { .. }
        | Error::AlreadyExists { .. }
        | Error::InvalidArgument { .. }
        | Error::NotFound { .. }
        | Error::PreconditionFailed { .. }
        | Error::Config(_)
        | Error::Unavailable { retry_safe: true, .. } => EventType::Fail,
        Error::Unavailable { retry_safe: false, .. }
        | Error::Timeout { .. }
        | Error::Transport(_)
        | Error::Internal(_)
        | Error::Serialization(_)
        | Error::Other { .. } => EventType::Info,
    }
}

fn key_name(index: usize) -> String {
    format!("k{index}")
}

/// The register value of a document: its `v` field, `null` when absent. A document without
/// `v` is returned whole, which no client wrote, so the checker rejects it.
fn register_value(document: Option<Document<Value>>) -> Value {
    match document {
        None => Value::Null,
        Some(document) => document.value.get("v").cloned().unwrap_or(document.value),
    }
}

/// One client: `CLIENTS` of these run at once, each one operation at a time, until `stop`.
/// Returns its error counts by `"<operation> <code>"`.
async fn client_loop(
    process: i64,
    client: Client,
    seed: u64,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let collection = client.collection(COLLECTION);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut sequence: i64 = 0;
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..=THINK_TIME_MS_MAX))).await;
        let key = key_name(rng.gen_range(0..KEYS));
        let roll: f64 = rng.gen();
        if roll < 0.40 {
            let value = next_value(process, &mut sequence)?;
            write(&collection, &recorder, process, &key, value, &mut errors).await;
        } else if roll < 0.75 {
            read(&collection, &recorder, process, &key, &mut errors).await;
        } else if let Some((current, version)) = read(&collection, &recorder, process, &key, &mut errors).await {
            let value = next_value(process, &mut sequence)?;
            cas(&collection, &recorder, process, &key, current, version, value, &mut errors).await;
        }
    }
    Ok(errors)
}

/// The next unique value of `process`: `(process + 1) * VALUE_STRIDE + sequence`.
fn next_value(process: i64, sequence: &mut i64) -> anyhow::Result<i64> {
    *sequence += 1;
    if *sequence >= VALUE_STRIDE {
        bail!("client {process} ran out of unique values");
    }
    Ok((process + 1) * VALUE_STRIDE + *sequence)
}

async fn write(
    collection: &Collection,
    recorder: &Recorder,
    process: i64,
    key: &str,
    value: i64,
    errors: &mut BTreeMap<String, usize>,
) {
    recorder.record(process, EventType::Invoke, Function::Write, key, Some(json!(value)));
    let event_type = match collection.put(key, &json!({ "v": value })).await {
        Ok(_) => EventType::Ok,
        Err(error) => {
            *errors.entry(format!("write {}", error.code())).or_default() += 1;
            update_failure_type(&error)
        }
    };
    recorder.record(process, event_type, Function::Write, key, Some(json!(value)));
}

/// A strong read, recorded; returns the register value and the document version (0: absent).
async fn read(
    collection: &Collection,
    recorder: &Recorder,
    process: i64,
    key: &str,
    errors: &mut BTreeMap<String, usize>,
) -> Option<(Value, u64)> {
    recorder.record(process, EventType::Invoke, Function::Read, key, None);
    match collection.get_with::<Value>(key, ReadConsistency::Strong).await {
        Ok(document) => {
            let version = document.as_ref().map_or(0, |document| document.version);
            let value = register_value(document);
            recorder.record(process, EventType::Ok, Function::Read, key, Some(value.clone()));
            Some((value, version))
        }
        Err(error) => {
            *errors.entry(format!("read {}", error.code())).or_default() += 1;
            recorder.record(process, EventType::Fail, Function::Read, key, None);
            None
        }
    }
}

/// Compare-and-set from `current` (read at `version`) to `value`: a create when the document
/// was absent, else a put conditioned on the version, like the simulator's `do_cas`.
#[allow(clippy::too_many_arguments)]
async fn cas(
    collection: &Collection,
    recorder: &Recorder,
    process: i64,
    key: &str,
    current: Value,
    version: u64,
    value: i64,
    errors: &mut BTreeMap<String, usize>,
) {
    let argument = json!([current, value]);
    recorder.record(process, EventType::Invoke, Function::Cas, key, Some(argument.clone()));
    let document = json!({ "v": value });
    let result = if current.is_null() {
        collection.create(key, &document).await
    } else {
        collection.put_if_version(key, &document, version).await
    };
    let event_type = match result {
        Ok(_) => EventType::Ok,
        Err(error) => {
            *errors.entry(format!("cas {}", error.code())).or_default() += 1;
            update_failure_type(&error)
        }
    };
    recorder.record(process, event_type, Function::Cas, key, Some(argument));
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FaultKind {
    /// SIGKILL, down for a while, restart with the same data dir and flags.
    Kill,
    /// SIGSTOP, frozen for a while, SIGCONT.
    Pause,
}

/// What the nemesis did, with the history line each step happened before.
#[derive(Default)]
struct FaultLog {
    kills: usize,
    pauses: usize,
    splits: usize,
    merges: usize,
    transfers: usize,
    lines: Vec<String>,
}

impl FaultLog {
    fn note(&mut self, recorder: &Recorder, load_start: Instant, text: String) {
        let line = format!(
            "{:>8.3} s  before history line {:>6}  {text}",
            load_start.elapsed().as_secs_f64(),
            recorder.next_line()
        );
        self.lines.push(line);
    }
}

/// Until `load` has passed since `load_start`: wait a gap, fault one node (the first round
/// kills, the second pauses, later ones pick at random; half the time the data leader is the
/// target), end the fault, wait until the node is ready. Never more than one node at a time.
async fn nemesis(
    cluster: &mut Cluster,
    recorder: &Recorder,
    load_start: Instant,
    load: Duration,
    rng: &mut StdRng,
    faults: &mut FaultLog,
) -> anyhow::Result<()> {
    let admin = Client::builder()
        .endpoints(cluster.grpc_endpoints())
        .connect_timeout(CLIENT_CONNECT_TIMEOUT)
        .request_timeout(LEADER_LOOKUP_TIMEOUT)
        .retry_policy(RetryPolicy::none())
        .build()?;
    let mut round = 0usize;
    loop {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(FAULT_GAP_MS))).await;
        if load_start.elapsed() >= load {
            return Ok(());
        }
        let kind = match round {
            0 => FaultKind::Kill,
            1 => FaultKind::Pause,
            _ if rng.gen_bool(0.5) => FaultKind::Kill,
            _ => FaultKind::Pause,
        };
        let leader = if rng.gen_bool(0.5) { data_leader(&admin).await } else { None };
        let node_id = match leader {
            Some(leader) => leader,
            None => rng.gen_range(1..=NODES as u64),
        };
        let down = Duration::from_millis(rng.gen_range(FAULT_DURATION_MS));
        let role = if leader.is_some() { " (leader)" } else { "" };
        let node = cluster.node_mut(node_id)?;
        match kind {
            FaultKind::Kill => {
                faults.note(recorder, load_start, format!("kill -9 node{node_id}{role} for {} ms", down.as_millis()));
                node.process.kill9()?;
                faults.kills += 1;
                tokio::time::sleep(down).await;
                node.process.restart()?;
                faults.note(recorder, load_start, format!("restarted node{node_id}"));
            }
            FaultKind::Pause => {
                faults.note(recorder, load_start, format!("SIGSTOP node{node_id}{role} for {} ms", down.as_millis()));
                node.process.pause()?;
                faults.pauses += 1;
                tokio::time::sleep(down).await;
                node.process.resume()?;
                faults.note(recorder, load_start, format!("SIGCONT node{node_id}"));
            }
        }
        node.process.wait_ready(READY_TIMEOUT).await.with_context(|| format!("node{node_id} after {kind:?}"))?;
        faults.note(recorder, load_start, format!("node{node_id} ready"));
        round += 1;
    }
}

/// Until `stop`: every `ELASTIC_GAP_MS`, through any node, split the collection's shard at a
/// document boundary, merge two adjacent shards, or hand a random shard's leadership to a
/// random node. Splits while there is one shard, merges from four; otherwise either. Refusals
/// (a merge racing a kill, a split at an existing boundary) are logged, not errors: the
/// verdict rests on the history.
async fn elastic_nemesis(
    endpoints: Vec<String>,
    seed: u64,
    recorder: Arc<Recorder>,
    stop: Arc<AtomicBool>,
    load_start: Instant,
) -> anyhow::Result<FaultLog> {
    let admin = Client::builder()
        .endpoints(endpoints)
        .connect_timeout(CLIENT_CONNECT_TIMEOUT)
        .request_timeout(ELASTIC_REQUEST_TIMEOUT)
        .retry_policy(RetryPolicy::none())
        .build()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut log = FaultLog::default();
    while !stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(ELASTIC_GAP_MS))).await;
        let Ok(status) = admin.cluster_status().await else { continue };
        let mut shards = status.shards;
        shards.sort_by(|a, b| a.start_hex.cmp(&b.start_hex));
        let text = if !shards.is_empty() && rng.gen_bool(0.25) {
            let shard = shards[rng.gen_range(0..shards.len())].id;
            let to = rng.gen_range(1..=NODES as u64);
            match admin.transfer_leader(shard, to).await {
                Ok(leader) => {
                    log.transfers += 1;
                    format!("transfer shard {shard} leadership to node{to}: leader node{leader}")
                }
                Err(e) => format!("transfer shard {shard} leadership to node{to}: {e}"),
            }
        } else if shards.len() <= 1 || (shards.len() < 4 && rng.gen_bool(0.5)) {
            let at = key_name(rng.gen_range(1..KEYS));
            match admin.split_at(COLLECTION, &[at.as_str()]).await {
                Ok(parts) => {
                    log.splits += 1;
                    format!("split at {at}: shards {:?}", parts.iter().map(|p| p.id).collect::<Vec<_>>())
                }
                Err(e) => format!("split at {at}: {e}"),
            }
        } else {
            let pairs: Vec<(u64, u64)> =
                shards.windows(2).filter(|w| w[0].end_hex == w[1].start_hex).map(|w| (w[0].id, w[1].id)).collect();
            let Some(&(left, right)) = pairs.get(rng.gen_range(0..pairs.len().max(1))) else { continue };
            match admin.merge_shards(left, right).await {
                Ok(merged) => {
                    log.merges += 1;
                    format!("merge {left}+{right}: into {:?}", merged.map(|m| m.id))
                }
                Err(e) => format!("merge {left}+{right}: {e}"),
            }
        };
        log.note(&recorder, load_start, format!("elastic: {text}"));
    }
    Ok(log)
}

/// The node leading the most shards per `ClusterStatus` (the data shard in this cluster),
/// else the meta leader; `None` when no node answers in time.
async fn data_leader(admin: &Client) -> Option<u64> {
    let status = admin.cluster_status().await.ok()?;
    let mut shards_led: BTreeMap<u64, usize> = BTreeMap::new();
    for shard in status.shards.iter().filter(|shard| shard.leader != 0) {
        *shards_led.entry(shard.leader).or_default() += 1;
    }
    shards_led
        .iter()
        .max_by_key(|(node, count)| (**count, std::cmp::Reverse(**node)))
        .map(|(node, _)| *node)
        .or((status.meta_leader != 0).then_some(status.meta_leader))
        .filter(|node| (1..=NODES as u64).contains(node))
}

/// Reads every key strongly after the heal, recording each attempt as process
/// `FINAL_READER_PROCESS`. Retries until `FINAL_READ_TIMEOUT`: the healed cluster must serve.
async fn final_reads(client: &Client, recorder: &Recorder) -> anyhow::Result<BTreeMap<String, Value>> {
    let collection = client.collection(COLLECTION);
    let deadline = Instant::now() + FINAL_READ_TIMEOUT;
    let mut errors = BTreeMap::new();
    let mut finals = BTreeMap::new();
    for index in 0..KEYS {
        let key = key_name(index);
        loop {
            if let Some((value, _)) = read(&collection, recorder, FINAL_READER_PROCESS, &key, &mut errors).await {
                finals.insert(key, value);
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "the healed cluster did not serve a strong read of {key} within {} s (errors: {errors:?})",
                    FINAL_READ_TIMEOUT.as_secs()
                );
            }
            tokio::time::sleep(FINAL_READ_RETRY_PAUSE).await;
        }
    }
    Ok(finals)
}

fn write_files(dir: &Path, events: &[Event], faults: &FaultLog) -> anyhow::Result<()> {
    let mut history = String::with_capacity(events.len() * 80);
    for event in events {
        history.push_str(&event.to_json_line());
        history.push('\n');
    }
    let history_path = dir.join("history.jsonl");
    std::fs::write(&history_path, history).with_context(|| format!("write {}", history_path.display()))?;
    let faults_path = dir.join("faults.txt");
    let mut timeline = faults.lines.join("\n");
    timeline.push('\n');
    std::fs::write(&faults_path, timeline).with_context(|| format!("write {}", faults_path.display()))?;
    Ok(())
}

fn render(history: &History, report: &CheckReport) -> anyhow::Result<String> {
    let mut text = Vec::new();
    render_report(history, report, &mut text)?;
    Ok(format!("linearizability checker: {}", String::from_utf8_lossy(&text)))
}

/// An invoke paired with its completion (`None`: never completed, i.e. unknown).
struct Paired<'a> {
    invoke: &'a Event,
    invoke_line: usize,
    completion: Option<(EventType, usize)>,
}

impl Paired<'_> {
    /// The value a write or cas puts in the register; `None` for reads.
    fn written(&self) -> Option<&Value> {
        match (self.invoke.f, &self.invoke.value) {
            (Function::Write, Some(value)) => Some(value),
            (Function::Cas, Some(Value::Array(pair))) => pair.get(1),
            _ => None,
        }
    }

    fn is_acked(&self) -> bool {
        matches!(self.completion, Some((EventType::Ok, _)))
    }

    fn describe(&self) -> String {
        let value = self.invoke.value.as_ref().map(Value::to_string).unwrap_or_default();
        let end = match self.completion {
            Some((event_type, line)) => format!("{event_type:?} line {line}"),
            None => "never completed".to_owned(),
        };
        format!(
            "process {} {} {value} (invoke line {}, {end})",
            self.invoke.process,
            self.invoke.f.name(),
            self.invoke_line
        )
    }
}

fn pair(events: &[Event]) -> Vec<Paired<'_>> {
    let mut paired: Vec<Paired<'_>> = Vec::new();
    let mut outstanding: BTreeMap<i64, usize> = BTreeMap::new();
    for (index, event) in events.iter().enumerate() {
        let line = index + 1;
        if event.event_type == EventType::Invoke {
            outstanding.insert(event.process, paired.len());
            paired.push(Paired { invoke: event, invoke_line: line, completion: None });
        } else if let Some(position) = outstanding.remove(&event.process) {
            paired[position].completion = Some((event.event_type, line));
        }
    }
    paired
}

/// The explicit lost-write check, independent of the checker. Per key: an acknowledged write
/// means the key is not absent at the end; the final value was put there by a write or cas
/// that did not `fail`; and when that one was acknowledged, no write or cas acknowledged
/// after it was invoked later than it completed (that one must have overwritten it, since
/// values are unique, so it would be lost).
fn lost_writes(events: &[Event], finals: &BTreeMap<String, Value>) -> Vec<String> {
    let paired = pair(events);
    let mut problems = Vec::new();
    for (key, last) in finals {
        let updates: Vec<&Paired<'_>> =
            paired.iter().filter(|op| op.invoke.key.as_deref() == Some(key) && op.written().is_some()).collect();
        if last.is_null() {
            if let Some(first) = updates.iter().find(|op| op.is_acked()) {
                problems.push(format!("{key}: absent at the end, but {} was acknowledged", first.describe()));
            }
            continue;
        }
        let Some(writer) = updates.iter().find(|op| op.written() == Some(last)) else {
            problems.push(format!("{key}: final value {last} was never written"));
            continue;
        };
        match writer.completion {
            Some((EventType::Fail, _)) => {
                problems.push(format!("{key}: final value {last} comes from {}, recorded as failed", writer.describe()))
            }
            Some((EventType::Ok, writer_done)) => {
                for later in updates.iter().filter(|op| op.is_acked() && op.invoke_line > writer_done) {
                    problems.push(format!(
                        "{key}: {} is lost: the final value {last} comes from {}, which completed before it",
                        later.describe(),
                        writer.describe()
                    ));
                }
            }
            _ => {}
        }
    }
    problems
}

/// Completions by function and type.
#[derive(Default)]
struct Counts {
    /// `[read, write, cas]` x `[ok, fail, info]`.
    table: [[usize; 3]; 3],
    /// Invokes never completed.
    unfinished: usize,
}

impl Counts {
    fn of(events: &[Event]) -> Counts {
        let mut counts = Counts::default();
        for op in pair(events) {
            let row = match op.invoke.f {
                Function::Read => 0,
                Function::Write => 1,
                Function::Cas => 2,
            };
            match op.completion {
                Some((EventType::Ok, _)) => counts.table[row][0] += 1,
                Some((EventType::Fail, _)) => counts.table[row][1] += 1,
                Some((EventType::Info, _)) => counts.table[row][2] += 1,
                Some((EventType::Invoke, _)) | None => counts.unfinished += 1,
            }
        }
        counts
    }

    fn ok_total(&self) -> usize {
        self.table.iter().map(|row| row[0]).sum()
    }

    fn updates_ok(&self) -> usize {
        self.table[1][0] + self.table[2][0]
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, row) in ["read", "write", "cas"].iter().zip(self.table) {
            write!(formatter, "{name}: {} ok, {} fail, {} info; ", row[0], row[1], row[2])?;
        }
        write!(formatter, "{} unfinished", self.unfinished)
    }
}

#[cfg(test)]
mod tests {
    //! The lost-write check on hand-made histories.

    use super::*;

    fn event(process: i64, event_type: EventType, f: Function, value: Value) -> Event {
        Event { process, event_type, f, key: Some("k0".to_owned()), value: Some(value) }
    }

    fn finals(value: Value) -> BTreeMap<String, Value> {
        BTreeMap::from([("k0".to_owned(), value)])
    }

    #[test]
    fn overwritten_acknowledged_write_is_lost() {
        let events = [
            event(0, EventType::Invoke, Function::Write, json!(1)),
            event(0, EventType::Ok, Function::Write, json!(1)),
            event(1, EventType::Invoke, Function::Cas, json!([1, 2])),
            event(1, EventType::Ok, Function::Cas, json!([1, 2])),
        ];
        assert!(lost_writes(&events, &finals(json!(2))).is_empty());
        let lost = lost_writes(&events, &finals(json!(1)));
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(lost[0].contains("process 1 cas"), "{lost:?}");
        assert_eq!(lost_writes(&events, &finals(Value::Null)).len(), 1);
        assert_eq!(lost_writes(&events, &finals(json!(7))).len(), 1);
    }

    #[test]
    fn concurrent_or_unknown_writers_may_win() {
        let events = [
            event(0, EventType::Invoke, Function::Write, json!(1)),
            event(1, EventType::Invoke, Function::Write, json!(2)),
            event(0, EventType::Ok, Function::Write, json!(1)),
            event(1, EventType::Ok, Function::Write, json!(2)),
            event(2, EventType::Invoke, Function::Write, json!(3)),
            event(2, EventType::Info, Function::Write, json!(3)),
        ];
        assert!(lost_writes(&events, &finals(json!(1))).is_empty());
        assert!(lost_writes(&events, &finals(json!(2))).is_empty());
        assert!(lost_writes(&events, &finals(json!(3))).is_empty());
    }

    #[test]
    fn failed_writer_cannot_be_final() {
        let events = [
            event(0, EventType::Invoke, Function::Write, json!(1)),
            event(0, EventType::Fail, Function::Write, json!(1)),
        ];
        assert_eq!(lost_writes(&events, &finals(json!(1))).len(), 1);
        assert!(lost_writes(&events, &finals(Value::Null)).is_empty());
    }

    #[test]
    fn retry_safe_errors_fail_and_ambiguous_ones_are_info() {
        let refused = Error::Unavailable { code: "not_leader".into(), message: String::new(), retry_safe: true };
        let maybe = Error::Unavailable { code: "unavailable".into(), message: String::new(), retry_safe: false };
        assert_eq!(update_failure_type(&refused), EventType::Fail);
        assert_eq!(update_failure_type(&maybe), EventType::Info);
        assert_eq!(update_failure_type(&Error::Timeout { message: String::new() }), EventType::Info);
        assert_eq!(update_failure_type(&Error::Transport(String::new())), EventType::Info);
        assert_eq!(
            update_failure_type(&Error::VersionMismatch { current: Some(3), message: String::new() }),
            EventType::Fail
        );
    }
}
