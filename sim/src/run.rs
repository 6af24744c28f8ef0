//! One simulated run from a seed: start a cluster of real nodes, drive a register workload
//! while injecting faults, heal, wait for convergence, check the history.
//!
//! Owns: the run's schedule (workload, faults, heal), the history it records and the final
//! checks. Everything random is drawn from generators derived from the seed, and the runtime
//! is tokio's current-thread scheduler with paused time, so a seed replays bit for bit.
//!
//! Checks: per-key linearizability of strong reads, writes and compare-and-sets; every
//! replica holds identical documents after heal; the cluster serves a strong read of every
//! key after heal (liveness).

use crate::cluster::{Endpoint, SimCluster};
use crate::history::{Event, EventType, Function, History};
use crate::linearizability::{check_history, CheckConfig, KeyOutcome, Verdict};
use crate::net::{NetProfile, SimNet};
use crate::staleness::{check_bounded_reads, AckedWrite, BoundedRead};
use crate::trace::{fnv1a, Trace};
use floe_node::api::{ApiError, NodeApi, ReadConsistency, WriteRequest};
use floe_node::docs::DocAction;
use floe_node::storage::{Cf, KvEngine};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Collection every simulated client writes to.
pub const COLLECTION: &str = "sim";
/// Collection of the bank workload: `ACCOUNTS` accounts moving money in atomic batches.
pub const BANK: &str = "bank";
pub const ACCOUNTS: usize = 4;
pub const BALANCE_START: i64 = 100;
/// Client-side bound on one operation; past it the outcome is unknown.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(8);
/// Bound on the heal phase (simulated).
pub const HEAL_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on setting up the collection and the bank before the workload (simulated).
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// The fault classes a run may inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// Kill a node (unsynced writes lost, possibly a torn prefix kept), restart it later.
    Crash,
    /// Cut every link of one node (often the leader) both ways.
    Partition,
    /// Cut one direction of one link.
    Cut,
    /// Message loss, duplication and delay spikes on every link.
    Net,
    /// A slow disk (every synced write delayed), or a failing disk (writes error until the
    /// node is restarted: fail-stop, no fsync retry).
    Disk,
    /// Stop polling every task of a node (SIGSTOP), then let it run on with a stale view.
    Pause,
    /// The cluster's own actions: shard splits at random documents (through any node), merges
    /// of adjacent shards, leader transfers to a random replica, replica moves to a node
    /// without one (clusters larger than the replication factor; the placement driver's own
    /// balancing moves join them), and hibernation of idle shards (a short `hibernate_after`
    /// for the run) with their wake-ups.
    Elastic,
}

impl FaultKind {
    pub const ALL: [FaultKind; 7] = [
        FaultKind::Crash,
        FaultKind::Partition,
        FaultKind::Cut,
        FaultKind::Net,
        FaultKind::Disk,
        FaultKind::Pause,
        FaultKind::Elastic,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Crash => "crash",
            FaultKind::Partition => "partition",
            FaultKind::Cut => "cut",
            FaultKind::Net => "net",
            FaultKind::Disk => "disk",
            FaultKind::Pause => "pause",
            FaultKind::Elastic => "elastic",
        }
    }

    /// Parses `all`, `none` or a comma list of names.
    pub fn parse_list(text: &str) -> Result<Vec<FaultKind>, String> {
        match text {
            "all" => return Ok(Self::ALL.to_vec()),
            "none" | "" => return Ok(Vec::new()),
            _ => {}
        }
        let mut out = Vec::new();
        for part in text.split(',').map(str::trim) {
            let kind = Self::ALL.into_iter().find(|k| k.name() == part).ok_or_else(|| {
                format!("unknown fault {part:?}; known: all, none, crash, partition, cut, net, disk, pause, elastic")
            })?;
            if !out.contains(&kind) {
                out.push(kind);
            }
        }
        Ok(out)
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub seed: u64,
    pub nodes: u64,
    pub ops: u64,
    pub clients: u64,
    pub keys: u64,
    pub faults: Vec<FaultKind>,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self { seed: 0, nodes: 3, ops: 300, clients: 4, keys: 4, faults: FaultKind::ALL.to_vec() }
    }
}

/// What a run did and found.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub seed: u64,
    pub ops_ok: u64,
    pub ops_failed: u64,
    pub ops_unknown: u64,
    pub faults: u64,
    pub sim_time: Duration,
    pub wall_time: Duration,
    pub trace_hash: u64,
    pub trace_events: u64,
    pub verdict: Verdict,
    /// Human-readable violations (empty when every check passed).
    pub violations: Vec<String>,
    pub history: Vec<Event>,
    /// The timeline for `replay --html`.
    pub marks: Vec<crate::trace::Mark>,
    /// History lines of the operations a checker blamed.
    pub bad_lines: Vec<usize>,
    /// EVENTUAL reads performed (checked: they return only values that were written).
    pub eventual_reads: u64,
    /// BOUNDED_STALENESS reads performed (checked against their bound).
    pub bounded_reads: u64,
    /// Bank transfers acknowledged and bank reads whose total was checked.
    pub bank_transfers_ok: u64,
    pub bank_reads_ok: u64,
    /// Shard splits and merges that applied, leader transfers that moved leadership, and
    /// times a shard fell asleep on every replica.
    pub splits: u64,
    pub merges: u64,
    pub transfers: u64,
    /// Replica moves the fault loop asked for that completed.
    pub moves: u64,
    pub hibernations: u64,
    /// From the nodes' metrics: reads served through another node's replica (the node asked
    /// had none), and what the placement driver did by itself (splits, merges, moves,
    /// re-replications of a dead node's replicas, leader transfers).
    pub counters: crate::cluster::NodeCounters,
}

#[derive(Default)]
struct Recorder {
    events: Vec<Event>,
    ok: u64,
    failed: u64,
    unknown: u64,
    /// EVENTUAL reads: (key, value read, history length when the read completed).
    eventual: Vec<(String, Value, usize)>,
    /// SESSION reads that went behind the session.
    session_violations: Vec<String>,
    /// Acknowledged writes and BOUNDED_STALENESS reads, for the staleness checker.
    acked_writes: Vec<AckedWrite>,
    bounded: Vec<BoundedRead>,
    /// Bank reads whose total was not the invariant total.
    bank_violations: Vec<String>,
    bank_transfers_ok: u64,
    bank_reads_ok: u64,
}

type Shared<T> = Arc<Mutex<T>>;

fn record(rec: &Shared<Recorder>, trace: &Trace, event: Event) {
    if let Ok(mut r) = rec.lock() {
        let what = match event.event_type {
            EventType::Invoke => "invoke",
            EventType::Ok => "ok",
            EventType::Fail => "fail",
            EventType::Info => "info",
        };
        let value = event.value.as_ref().map(|v| format!(" {v}")).unwrap_or_default();
        let text = format!("{what} {} {}{value}", event.f.name(), event.key.as_deref().unwrap_or(""));
        trace.mark(&format!("client {}", event.process), &text, Some(r.events.len() + 1));
        match event.event_type {
            EventType::Ok => r.ok += 1,
            EventType::Fail => r.failed += 1,
            EventType::Info => r.unknown += 1,
            EventType::Invoke => {}
        }
        r.events.push(event);
    }
}

fn event(process: i64, event_type: EventType, f: Function, key: &str, value: Option<Value>) -> Event {
    Event { process, event_type, f, key: Some(key.to_string()), value }
}

/// How an error ends an operation: certainly not applied (`fail`) or unknown (`info`).
fn failure_type(e: &ApiError) -> EventType {
    if e.retry_safe() {
        EventType::Fail
    } else {
        EventType::Info
    }
}

/// Runs one seed to completion on a fresh single-threaded runtime with paused time.
pub fn run_seed(config: &RunConfig) -> Result<RunReport, String> {
    floe_node::raft::runtime::seed_thread_rng(config.seed);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| e.to_string())?;
    let wall = Instant::now();
    let mut report = runtime.block_on(simulate(config.clone()))?;
    report.wall_time = wall.elapsed();
    Ok(report)
}

async fn simulate(config: RunConfig) -> Result<RunReport, String> {
    let started = tokio::time::Instant::now();
    let trace = Arc::new(Trace::new());
    let mut master = ChaCha8Rng::seed_from_u64(config.seed);
    let net = SimNet::new(ChaCha8Rng::seed_from_u64(master.gen()), NetProfile::calm(), trace.clone());
    // Elastic runs hibernate idle shards quickly, so shards sleep and wake during the run.
    let hibernate_after =
        config.faults.contains(&FaultKind::Elastic).then(|| Duration::from_millis(master.gen_range(200..3_000)));
    trace.mark("faults", &format!("hibernate_after {hibernate_after:?}"), None);
    let cluster = Arc::new(tokio::sync::Mutex::new(SimCluster::new(config.nodes, net.clone(), hibernate_after)));
    {
        let mut c = cluster.lock().await;
        for id in c.ids() {
            c.start(id).await?;
        }
    }
    let ids: Vec<u64> = cluster.lock().await.ids();
    create_collection(&cluster, &ids).await?;
    open_accounts(&cluster, &ids).await?;

    let rec: Shared<Recorder> = Arc::default();
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let elastic: Arc<ElasticCounts> = Arc::default();
    let faults = if !config.faults.is_empty() {
        let rng = ChaCha8Rng::seed_from_u64(master.gen());
        Some(tokio::spawn(fault_loop(
            cluster.clone(),
            net.clone(),
            trace.clone(),
            rng,
            done_rx,
            FaultMix { kinds: config.faults.clone(), keys: config.keys },
            elastic.clone(),
        )))
    } else {
        None
    };
    let (watch_stop_tx, watch_stop_rx) = tokio::sync::watch::channel(false);
    let hibernations: Arc<std::sync::atomic::AtomicU64> = Arc::default();
    let leaders = tokio::spawn(leader_watch(cluster.clone(), trace.clone(), watch_stop_rx, hibernations.clone()));
    let per_client = config.ops.div_ceil(config.clients.max(1));
    let mut clients = Vec::new();
    for c in 0..config.clients {
        let rng = ChaCha8Rng::seed_from_u64(master.gen());
        clients.push(tokio::spawn(client_loop(
            c,
            per_client,
            config.keys,
            rng,
            cluster.clone(),
            ids.clone(),
            rec.clone(),
            trace.clone(),
        )));
    }
    for c in clients {
        c.await.map_err(|e| format!("client task failed: {e}"))?;
    }
    let _ = done_tx.send(true);
    let fault_count = match faults {
        Some(f) => f.await.map_err(|e| format!("fault task failed: {e}"))?,
        None => 0,
    };

    // Heal: every link back, every node up, then the cluster must serve and converge.
    net.heal();
    net.set_profile(NetProfile::calm());
    trace.mark("faults", "heal all: every link up, every node started", None);
    {
        let mut c = cluster.lock().await;
        for id in ids.clone() {
            c.start(id).await?;
        }
    }
    let mut violations = Vec::new();
    final_reads(&config, &cluster, &ids, &rec, &trace, &mut violations).await;
    final_bank_read(&cluster, &ids, &rec, &trace, &mut violations).await;
    check_convergence(&cluster, &ids, &trace, &mut violations).await;

    let _ = watch_stop_tx.send(true);
    let _ = leaders.await;
    let (bank_transfers_ok, bank_reads_ok, bounded_reads) =
        rec.lock().map(|r| (r.bank_transfers_ok, r.bank_reads_ok, r.bounded.len() as u64)).unwrap_or((0, 0, 0));
    let (events, ok, failed, unknown, eventual) = {
        let r = rec.lock().map_err(|_| "recorder poisoned".to_string())?;
        violations.extend(r.session_violations.iter().cloned());
        violations.extend(check_bounded_reads(&r.acked_writes, &r.bounded));
        violations.extend(r.bank_violations.iter().cloned());
        (r.events.clone(), r.ok, r.failed, r.unknown, r.eventual.clone())
    };
    let mut bad_lines = Vec::new();
    check_eventual_reads(&events, &eventual, &mut violations);
    let history = History::from_events(events.iter().cloned().enumerate().map(|(i, e)| (i + 1, e)))
        .map_err(|e| format!("the simulator recorded an invalid history: {e}"))?;
    let check = check_history(&history, &CheckConfig::default());
    for k in &check.keys {
        if let KeyOutcome::NotLinearizable(ce) = &k.outcome {
            if let Some(op) = history.operations().get(ce.unplaceable) {
                bad_lines.push(op.invoke_line);
                bad_lines.extend(op.complete_line());
            }
            violations.push(format!(
                "key {:?} is not linearizable: {} operations placed, history line {} cannot be",
                k.key,
                ce.prefix.len(),
                history.operations().get(ce.unplaceable).map(|o| o.invoke_line).unwrap_or(0)
            ));
        }
    }
    let verdict = if violations.is_empty() { check.verdict() } else { Verdict::NotLinearizable };
    let counters = cluster.lock().await.counters();
    {
        let mut c = cluster.lock().await;
        for id in ids {
            c.crash(id, 0).await;
        }
    }
    Ok(RunReport {
        seed: config.seed,
        ops_ok: ok,
        ops_failed: failed,
        ops_unknown: unknown,
        faults: fault_count,
        sim_time: tokio::time::Instant::now().saturating_duration_since(started),
        wall_time: Duration::ZERO,
        trace_hash: trace.hash(),
        trace_events: trace.events(),
        verdict,
        violations,
        history: events,
        marks: trace.marks(),
        bad_lines,
        eventual_reads: eventual.len() as u64,
        bounded_reads,
        bank_transfers_ok,
        bank_reads_ok,
        splits: elastic.splits.load(std::sync::atomic::Ordering::Relaxed),
        merges: elastic.merges.load(std::sync::atomic::Ordering::Relaxed),
        transfers: elastic.transfers.load(std::sync::atomic::Ordering::Relaxed),
        moves: elastic.moves.load(std::sync::atomic::Ordering::Relaxed),
        hibernations: hibernations.load(std::sync::atomic::Ordering::Relaxed),
        counters,
    })
}

/// Tries `attempt` on each node in turn, 200 ms apart, until it returns `Some` or `within`
/// has passed (a node that is down counts as a failed try). One loop for every "until the
/// cluster answers" step of a run.
async fn on_any_node<T, Fut>(
    cluster: &tokio::sync::Mutex<SimCluster>,
    ids: &[u64],
    within: Duration,
    mut attempt: impl FnMut(Endpoint) -> Fut,
) -> Option<T>
where
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    for node in ids.iter().cycle() {
        if let Some(ep) = endpoint_of(cluster, *node).await {
            if let Some(v) = attempt(ep).await {
                return Some(v);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

async fn endpoint_of(cluster: &tokio::sync::Mutex<SimCluster>, id: u64) -> Option<Endpoint> {
    cluster.lock().await.endpoint(id)
}

/// Runs a client call against `ep` as a task of that node (a paused node serves nothing):
/// `None` when it timed out or the node was killed before answering (outcome unknown).
async fn call<T, Fut>(ep: &Endpoint, f: impl FnOnce(Arc<NodeApi>) -> Fut) -> Option<T>
where
    T: Send + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let handle = ep.tasks.spawn(f(ep.api.clone()));
    tokio::select! {
        biased;
        _ = ep.dead.wait() => None,
        r = tokio::time::timeout(CLIENT_TIMEOUT, handle) => match r {
            Ok(Ok(v)) => Some(v),
            _ => None,
        },
    }
}

fn account_ids() -> Vec<String> {
    (0..ACCOUNTS).map(|i| format!("a{i}")).collect()
}

/// Opens the bank: every account at `BALANCE_START`, in one atomic batch.
async fn open_accounts(cluster: &tokio::sync::Mutex<SimCluster>, ids: &[u64]) -> Result<(), String> {
    let opened = on_any_node(cluster, ids, SETUP_TIMEOUT, |ep| async move {
        let writes = account_ids()
            .into_iter()
            .map(|a| WriteRequest {
                collection: BANK.into(),
                id: a,
                action: DocAction::Put { json: json!({ "b": BALANCE_START }).to_string(), expected: None },
            })
            .collect();
        ep.api.write("", writes).await.ok()
    })
    .await;
    opened.map(|_| ()).ok_or_else(|| format!("the cluster never accepted the bank accounts within {SETUP_TIMEOUT:?}"))
}

/// Balances and versions of every account from one batch read, or why it failed.
async fn read_accounts(ep: &Endpoint, consistency: ReadConsistency) -> Option<Vec<(i64, u64)>> {
    let ids = account_ids();
    match call(ep, move |api| async move { api.batch_get("", BANK, &ids, &consistency).await }).await {
        Some(Ok((docs, _))) => docs
            .into_iter()
            .map(|(_, d)| {
                let d = d?;
                let b = serde_json::from_str::<Value>(&d.json).ok()?.get("b")?.as_i64()?;
                Some((b, d.version))
            })
            .collect(),
        _ => None,
    }
}

/// One bank operation: a transfer between two accounts (an atomic batch conditioned on the
/// versions just read), or a strong or eventual read of all balances, whose total must be
/// the invariant total (a batch applies whole on every replica).
async fn bank_op(ep: &Endpoint, process: i64, rng: &mut ChaCha8Rng, rec: &Shared<Recorder>, trace: &Trace) {
    let total = BALANCE_START * ACCOUNTS as i64;
    let roll: f64 = rng.gen();
    let consistency = if roll < 0.3 { ReadConsistency::Eventual } else { ReadConsistency::Strong };
    let Some(accounts) = read_accounts(ep, consistency.clone()).await else { return };
    let sum: i64 = accounts.iter().map(|a| a.0).sum();
    if let Ok(mut r) = rec.lock() {
        r.bank_reads_ok += 1;
        if sum != total {
            r.bank_violations.push(format!(
                "bank: a {consistency:?} read by client {process} saw balances {accounts:?}, total {sum}, not {total}"
            ));
        }
    }
    if roll < 0.6 {
        return;
    }
    let from = rng.gen_range(0..ACCOUNTS);
    let to = (from + rng.gen_range(1..ACCOUNTS)) % ACCOUNTS;
    let amount = rng.gen_range(0..=accounts[from].0.max(0));
    let ids = account_ids();
    let writes = vec![
        WriteRequest {
            collection: BANK.into(),
            id: ids[from].clone(),
            action: DocAction::Put {
                json: json!({ "b": accounts[from].0 - amount }).to_string(),
                expected: Some(accounts[from].1),
            },
        },
        WriteRequest {
            collection: BANK.into(),
            id: ids[to].clone(),
            action: DocAction::Put {
                json: json!({ "b": accounts[to].0 + amount }).to_string(),
                expected: Some(accounts[to].1),
            },
        },
    ];
    let outcome = call(ep, move |api| async move { api.write("", writes).await }).await;
    let ok = matches!(outcome, Some(Ok(_)));
    trace.mark(&format!("client {process}"), &format!("transfer {amount} a{from}->a{to} ok={ok}"), None);
    if ok {
        if let Ok(mut r) = rec.lock() {
            r.bank_transfers_ok += 1;
        }
    }
}

/// After heal: a strong read of all accounts must succeed and keep the total.
async fn final_bank_read(
    cluster: &tokio::sync::Mutex<SimCluster>,
    ids: &[u64],
    rec: &Shared<Recorder>,
    trace: &Trace,
    violations: &mut Vec<String>,
) {
    let read =
        on_any_node(cluster, ids, HEAL_TIMEOUT, |ep| async move { read_accounts(&ep, ReadConsistency::Strong).await })
            .await;
    let Some(accounts) = read else {
        violations.push(format!(
            "liveness: no strong read of the bank accounts succeeded within {HEAL_TIMEOUT:?} after heal"
        ));
        return;
    };
    let sum: i64 = accounts.iter().map(|a| a.0).sum();
    let total = BALANCE_START * ACCOUNTS as i64;
    trace.mark("faults", &format!("final bank read: {accounts:?}"), None);
    if sum != total {
        violations.push(format!("bank: final balances {accounts:?} total {sum}, not {total}"));
    }
    if let Ok(mut r) = rec.lock() {
        r.bank_reads_ok += 1;
    }
}

async fn create_collection(cluster: &tokio::sync::Mutex<SimCluster>, ids: &[u64]) -> Result<(), String> {
    let created =
        on_any_node(
            cluster,
            ids,
            SETUP_TIMEOUT,
            |ep| async move { ep.api.create_collection("", COLLECTION).await.ok() },
        )
        .await;
    created.map(|_| ()).ok_or_else(|| format!("the cluster never accepted the collection within {SETUP_TIMEOUT:?}"))
}

#[allow(clippy::too_many_arguments)]
async fn client_loop(
    client: u64,
    ops: u64,
    keys: u64,
    mut rng: ChaCha8Rng,
    cluster: Arc<tokio::sync::Mutex<SimCluster>>,
    ids: Vec<u64>,
    rec: Shared<Recorder>,
    trace: Arc<Trace>,
) {
    let process = client as i64;
    let mut seq = 0u64;
    let mut done = 0u64;
    let mut session = SessionState::default();
    while done < ops {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..30))).await;
        let key = format!("k{}", rng.gen_range(0..keys));
        let node = ids[rng.gen_range(0..ids.len())];
        let Some(ep) = endpoint_of(&cluster, node).await else {
            continue; // node down: the client picks another one (nothing was sent)
        };
        let roll: f64 = rng.gen();
        done += 1;
        if roll < 0.45 {
            seq += 1;
            let value = (client << 32 | seq) as i64;
            if let Some((version, token)) = do_write(&ep, process, &key, value, &rec, &trace).await {
                session.observe(&key, version, &token);
            }
        } else if roll < 0.75 {
            if let Some((_, version, token)) = do_read(&ep, process, &key, &rec, &trace).await {
                session.observe(&key, version, &token);
            }
        } else if roll < 0.78 {
            do_eventual_read(&ep, process, &key, &rec, &trace).await;
        } else if roll < 0.82 {
            let bound = Duration::from_millis([5, 20, 100, 1_000][rng.gen_range(0..4)]);
            do_bounded_read(&ep, process, &key, bound, &rec, &trace).await;
        } else if roll < 0.86 {
            do_session_read(&ep, process, &key, &mut session, &rec, &trace).await;
        } else if roll < 0.9 {
            bank_op(&ep, process, &mut rng, &rec, &trace).await;
        } else {
            // Compare-and-set: read the current value, then write only over that version.
            let Some((current, version, token)) = do_read(&ep, process, &key, &rec, &trace).await else { continue };
            session.observe(&key, version, &token);
            seq += 1;
            let value = (client << 32 | seq) as i64;
            if let Some((version, token)) = do_cas(&ep, process, &key, current, version, value, &rec, &trace).await {
                session.observe(&key, version, &token);
            }
        }
    }
}

async fn do_write(
    ep: &Endpoint,
    process: i64,
    key: &str,
    value: i64,
    rec: &Shared<Recorder>,
    trace: &Trace,
) -> Option<(u64, String)> {
    record(rec, trace, event(process, EventType::Invoke, Function::Write, key, Some(json!(value))));
    let w = WriteRequest {
        collection: COLLECTION.into(),
        id: key.into(),
        action: DocAction::Put { json: json!({ "v": value }).to_string(), expected: None },
    };
    let (t, acked) = send_write(ep, w, rec, key).await;
    record(rec, trace, event(process, t, Function::Write, key, Some(json!(value))));
    acked
}

/// Sends one register write (put or compare-and-set) and classifies its outcome: `ok` with
/// the acknowledged version and session token (remembered for the staleness checker), `fail`
/// when it certainly did not apply (a failed precondition, a retry-safe error), else `info`.
async fn send_write(
    ep: &Endpoint,
    w: WriteRequest,
    rec: &Shared<Recorder>,
    key: &str,
) -> (EventType, Option<(u64, String)>) {
    match call(ep, move |api| async move { api.write("", vec![w]).await }).await {
        Some(Ok((results, meta))) => {
            let acked = results.first().map(|r| (r.version, meta.session_token.clone()));
            note_ack(rec, key, acked.as_ref().map(|a| a.0));
            (EventType::Ok, acked)
        }
        Some(Err(ApiError::VersionMismatch { .. })) | Some(Err(ApiError::AlreadyExists { .. })) => {
            (EventType::Fail, None)
        }
        Some(Err(e)) => (failure_type(&e), None),
        None => (EventType::Info, None),
    }
}

/// A strong read; returns the value and version it saw (`None` value: absent) when it succeeded.
async fn do_read(
    ep: &Endpoint,
    process: i64,
    key: &str,
    rec: &Shared<Recorder>,
    trace: &Trace,
) -> Option<(Value, u64, String)> {
    record(rec, trace, event(process, EventType::Invoke, Function::Read, key, None));
    let (t, seen) = match call(ep, {
        let key = key.to_string();
        move |api| async move { api.get("", COLLECTION, &key, &ReadConsistency::Strong).await }
    })
    .await
    {
        Some(Ok((doc, meta))) => {
            let v =
                serde_json::from_str::<Value>(&doc.json).ok().and_then(|d| d.get("v").cloned()).unwrap_or(Value::Null);
            (EventType::Ok, Some((v, doc.version, meta.session_token)))
        }
        Some(Err(ApiError::NotFound { code: "not_found", .. })) => {
            (EventType::Ok, Some((Value::Null, 0, String::new())))
        }
        Some(Err(_)) | None => (EventType::Fail, None),
    };
    let value = if t == EventType::Ok { seen.as_ref().map(|s| s.0.clone()) } else { None };
    record(rec, trace, event(process, t, Function::Read, key, value));
    seen
}

/// What one client's session has seen: the newest token and, per key, the newest version it
/// wrote or read. A SESSION read must never return an older version (read-your-writes,
/// monotonic reads).
#[derive(Default)]
struct SessionState {
    token: String,
    token_index: u64,
    seen: std::collections::BTreeMap<String, u64>,
}

impl SessionState {
    fn observe(&mut self, key: &str, version: u64, token: &str) {
        let seen = self.seen.entry(key.to_string()).or_default();
        *seen = (*seen).max(version);
        if let Some(index) = token.split_once(':').and_then(|(_, i)| i.parse::<u64>().ok()) {
            if index >= self.token_index {
                self.token_index = index;
                self.token = token.to_string();
            }
        }
    }
}

/// A SESSION read with the client's newest token; a version older than what this client
/// already wrote or read of the key is a violation (DESIGN invariant 4).
async fn do_session_read(
    ep: &Endpoint,
    process: i64,
    key: &str,
    session: &mut SessionState,
    rec: &Shared<Recorder>,
    trace: &Trace,
) {
    let consistency = ReadConsistency::Session { token: session.token.clone() };
    let k = key.to_string();
    let outcome = call(ep, move |api| async move { api.get("", COLLECTION, &k, &consistency).await }).await;
    let (version, token) = match outcome {
        Some(Ok((doc, meta))) => (doc.version, meta.session_token),
        Some(Err(ApiError::NotFound { code: "not_found", .. })) => (0, String::new()),
        _ => return,
    };
    let floor = session.seen.get(key).copied().unwrap_or(0);
    trace.mark(&format!("client {process}"), &format!("session read {key} -> version {version} (floor {floor})"), None);
    if version < floor {
        if let Ok(mut r) = rec.lock() {
            r.session_violations.push(format!(
                "session read of {key} by client {process} returned version {version}, older than version {floor} it already saw (token {})",
                session.token
            ));
        }
    }
    session.observe(key, version, &token);
}

/// Remembers an acknowledged write of `key` for the staleness checker.
fn note_ack(rec: &Shared<Recorder>, key: &str, version: Option<u64>) {
    if let (Some(version), Ok(mut r)) = (version, rec.lock()) {
        r.acked_writes.push(AckedWrite { key: key.to_string(), version, acked_at: tokio::time::Instant::now() });
    }
}

/// A BOUNDED_STALENESS read: it must reflect every write acknowledged more than `bound`
/// before it started (checked at the end by `staleness::check_bounded_reads`).
async fn do_bounded_read(
    ep: &Endpoint,
    process: i64,
    key: &str,
    bound: Duration,
    rec: &Shared<Recorder>,
    trace: &Trace,
) {
    let invoked_at = tokio::time::Instant::now();
    let consistency = ReadConsistency::BoundedStaleness { max_staleness_ms: bound.as_millis() as u64 };
    let k = key.to_string();
    let outcome = call(ep, move |api| async move { api.get("", COLLECTION, &k, &consistency).await }).await;
    let version = match outcome {
        Some(Ok((doc, _))) => doc.version,
        Some(Err(ApiError::NotFound { code: "not_found", .. })) => 0,
        _ => return,
    };
    trace.mark(
        &format!("client {process}"),
        &format!("bounded read {key} (≤ {} ms) -> version {version}", bound.as_millis()),
        None,
    );
    if let Ok(mut r) = rec.lock() {
        r.bounded.push(BoundedRead { process, key: key.to_string(), bound, invoked_at, version });
    }
}

/// An EVENTUAL read: any replica's local state. Not part of the linearizable history; checked
/// to return only values some client wrote (or absence).
async fn do_eventual_read(ep: &Endpoint, process: i64, key: &str, rec: &Shared<Recorder>, trace: &Trace) {
    let k = key.to_string();
    let outcome =
        call(ep, move |api| async move { api.get("", COLLECTION, &k, &ReadConsistency::Eventual).await }).await;
    let value = match outcome {
        Some(Ok((doc, _))) => serde_json::from_str::<Value>(&doc.json).ok().and_then(|d| d.get("v").cloned()),
        Some(Err(ApiError::NotFound { .. })) => Some(Value::Null),
        _ => None,
    };
    if let (Some(v), Ok(mut r)) = (value, rec.lock()) {
        let at = r.events.len();
        trace.mark(&format!("client {process}"), &format!("eventual read {key} -> {v}"), None);
        r.eventual.push((key.to_string(), v, at));
    }
}

/// Every non-null EVENTUAL read returns a value whose write was invoked before the read
/// completed (DESIGN invariant 5: only committed values, here: never a value from nowhere).
fn check_eventual_reads(events: &[Event], eventual: &[(String, Value, usize)], violations: &mut Vec<String>) {
    let mut invoked: std::collections::BTreeMap<(String, String), usize> = std::collections::BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        if e.event_type != EventType::Invoke {
            continue;
        }
        let written = match (e.f, &e.value) {
            (Function::Write, Some(v)) => Some(v.clone()),
            (Function::Cas, Some(Value::Array(pair))) => pair.get(1).cloned(),
            _ => None,
        };
        if let (Some(v), Some(k)) = (written, &e.key) {
            invoked.entry((k.clone(), v.to_string())).or_insert(i);
        }
    }
    for (key, value, at) in eventual {
        if value.is_null() {
            continue;
        }
        match invoked.get(&(key.clone(), value.to_string())) {
            Some(i) if i < at => {}
            _ => {
                violations.push(format!("eventual read of {key} returned {value}, which no write had been invoked for"))
            }
        }
    }
}

/// Samples each group's leader every 100 ms (simulated) and marks changes on the timeline.
async fn leader_watch(
    cluster: Arc<tokio::sync::Mutex<SimCluster>>,
    trace: Arc<Trace>,
    stop: tokio::sync::watch::Receiver<bool>,
    hibernations: Arc<std::sync::atomic::AtomicU64>,
) {
    // Per group: the leader, or "asleep" when every running replica hibernates.
    let mut last: std::collections::BTreeMap<u64, String> = std::collections::BTreeMap::new();
    while !*stop.borrow() {
        let seen: Vec<(u64, String)> = {
            let c = cluster.lock().await;
            hosted_groups(&c)
                .iter()
                .map(|g| {
                    let hosts: Vec<&floe_node::raft::host::RaftHost> =
                        c.nodes.values().filter_map(|n| Some(n.running.as_ref()?.host.as_ref())).collect();
                    if hosts.iter().all(|h| h.is_dormant(*g)) {
                        return (*g, "asleep".to_string());
                    }
                    // The leader of the highest term any running replica knows of.
                    let best = hosts
                        .iter()
                        .filter_map(|h| h.group(*g))
                        .map(|h| {
                            let m = h.raft.metrics().borrow().clone();
                            (m.current_term, m.current_leader)
                        })
                        .max();
                    (*g, best.and_then(|b| b.1).map(|l| format!("n{l}")).unwrap_or_else(|| "none".into()))
                })
                .collect()
        };
        for (g, state) in seen {
            if last.get(&g) != Some(&state) {
                if state == "asleep" {
                    hibernations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                trace.mark("leaders", &format!("group {g}: {state}"), None);
                last.insert(g, state);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn do_cas(
    ep: &Endpoint,
    process: i64,
    key: &str,
    current: Value,
    version: u64,
    value: i64,
    rec: &Shared<Recorder>,
    trace: &Trace,
) -> Option<(u64, String)> {
    let arg = json!([current.clone(), value]);
    record(rec, trace, event(process, EventType::Invoke, Function::Cas, key, Some(arg.clone())));
    let json = json!({ "v": value }).to_string();
    let action =
        if current.is_null() { DocAction::Create { json } } else { DocAction::Put { json, expected: Some(version) } };
    let w = WriteRequest { collection: COLLECTION.into(), id: key.into(), action };
    let (t, acked) = send_write(ep, w, rec, key).await;
    record(rec, trace, event(process, t, Function::Cas, key, Some(arg)));
    acked
}

/// Every group that any running node hosts (running or hibernated), in id order.
fn hosted_groups(c: &SimCluster) -> std::collections::BTreeSet<u64> {
    c.nodes
        .values()
        .filter_map(|n| n.running.as_ref())
        .flat_map(|inc| inc.host.group_ids().into_iter().chain(inc.host.dormant_ids()))
        .collect()
}

/// A split point for the elastic fault: one of the register documents (mostly) or a bank
/// account.
fn split_key(rng: &mut ChaCha8Rng, keys: u64) -> Vec<u8> {
    let tenant = floe_node::docs::DEFAULT_TENANT;
    if rng.gen_bool(0.8) {
        floe_node::keys::doc_key(tenant, COLLECTION, &format!("k{}", rng.gen_range(0..keys.max(1))))
    } else {
        floe_node::keys::doc_key(tenant, BANK, &format!("a{}", rng.gen_range(0..ACCOUNTS)))
    }
}

/// What the fault loop draws from: the fault classes (a class listed twice is drawn twice
/// as often) and the number of register documents (split points come from them).
struct FaultMix {
    kinds: Vec<FaultKind>,
    keys: u64,
}

/// The elastic actions the fault loop carried out.
#[derive(Default)]
struct ElasticCounts {
    splits: std::sync::atomic::AtomicU64,
    merges: std::sync::atomic::AtomicU64,
    transfers: std::sync::atomic::AtomicU64,
    moves: std::sync::atomic::AtomicU64,
}

/// Injects one fault at a time until the workload is done; returns how many it injected.
async fn fault_loop(
    cluster: Arc<tokio::sync::Mutex<SimCluster>>,
    net: Arc<SimNet>,
    trace: Arc<Trace>,
    mut rng: ChaCha8Rng,
    done: tokio::sync::watch::Receiver<bool>,
    mix: FaultMix,
    elastic: Arc<ElasticCounts>,
) -> u64 {
    let FaultMix { kinds, keys } = mix;
    let ids = cluster.lock().await.ids();
    let mut count = 0;
    while !*done.borrow() {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..2_000))).await;
        if *done.borrow() {
            break;
        }
        let victim = ids[rng.gen_range(0..ids.len())];
        let length = Duration::from_millis(rng.gen_range(500..4_000));
        count += 1;
        let kind = kinds[rng.gen_range(0..kinds.len())];
        // Bias partitions toward a shard leader, where they hurt most.
        let victim = if kind == FaultKind::Partition && rng.gen_bool(0.5) {
            let c = cluster.lock().await;
            let shards: Vec<u64> =
                hosted_groups(&c).into_iter().filter(|g| *g != floe_node::keys::META_GROUP).collect();
            let shard =
                shards.get(rng.gen_range(0..shards.len().max(1))).copied().unwrap_or(floe_node::keys::FIRST_SHARD);
            c.nodes
                .values()
                .filter_map(|n| n.running.as_ref()?.host.group(shard)?.leader())
                .map(|l| l.0)
                .next()
                .unwrap_or(victim)
        } else {
            victim
        };
        match kind {
            FaultKind::Crash => {
                let pending = cluster.lock().await.nodes.get(&victim).map(|n| n.engine.pending_batches()).unwrap_or(0);
                let keep = if pending == 0 { 0 } else { rng.gen_range(0..=pending) };
                trace.mark(
                    "faults",
                    &format!("crash n{victim} keep={keep}/{pending} for={}ms", length.as_millis()),
                    None,
                );
                cluster.lock().await.crash(victim, keep).await;
                tokio::time::sleep(length).await;
                let restarted = cluster.lock().await.start(victim).await;
                trace.mark("faults", &format!("restart n{victim} ok={}", restarted.is_ok()), None);
            }
            FaultKind::Partition => {
                trace.mark("faults", &format!("isolate n{victim} for={}ms", length.as_millis()), None);
                net.isolate(victim, &ids);
                tokio::time::sleep(length).await;
                net.heal();
            }
            FaultKind::Cut => {
                let other = ids[rng.gen_range(0..ids.len())];
                trace.mark("faults", &format!("cut n{victim}->n{other} for={}ms", length.as_millis()), None);
                net.cut_one_way(victim, other);
                tokio::time::sleep(length).await;
                net.heal();
            }
            FaultKind::Net => {
                let profile = NetProfile {
                    loss: rng.gen_range(0.01..0.2),
                    duplicate: rng.gen_range(0.0..0.2),
                    delay_min_us: 100,
                    delay_max_us: rng.gen_range(1_000..50_000),
                };
                trace.mark("faults", &format!("net {profile:?} for={}ms", length.as_millis()), None);
                net.set_profile(profile);
                tokio::time::sleep(length).await;
                net.set_profile(NetProfile::calm());
            }
            // Only in clusters with nodes to spare (no draw otherwise, so 3-node seeds replay
            // as before).
            FaultKind::Elastic if ids.len() > REPLICAS && rng.gen_bool(0.3) => {
                let outcome = match endpoint_of(&cluster, victim).await {
                    Some(ep) => move_random_replica(&ep, &ids, &mut rng, &elastic).await,
                    None => "node down".to_string(),
                };
                trace.mark("faults", &format!("move via n{victim}: {outcome}"), None);
                tokio::time::sleep(length / 4).await;
            }
            FaultKind::Elastic if rng.gen_bool(0.25) => {
                // Hand a random shard's leadership to a random replica of it.
                let outcome = match endpoint_of(&cluster, victim).await {
                    Some(ep) => {
                        let shards = shard_replicas(&ep);
                        match shards.get(rng.gen_range(0..shards.len().max(1))).cloned() {
                            Some((shard, replicas)) if !replicas.is_empty() => {
                                let to = replicas[rng.gen_range(0..replicas.len())];
                                match call(&ep, move |api| async move { api.transfer_leader(shard, to).await }).await {
                                    Some(Ok(leader)) => {
                                        elastic.transfers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                        format!("shard {shard} -> n{to}: leader n{leader}")
                                    }
                                    Some(Err(e)) => format!("shard {shard} -> n{to}: refused: {e}"),
                                    None => format!("shard {shard} -> n{to}: no answer"),
                                }
                            }
                            _ => "no shard".to_string(),
                        }
                    }
                    None => "node down".to_string(),
                };
                trace.mark("faults", &format!("transfer leader via n{victim}: {outcome}"), None);
                tokio::time::sleep(length / 4).await;
            }
            FaultKind::Elastic if rng.gen_bool(0.35) => {
                // Merge two adjacent shards, as the victim's catalog knows them.
                let outcome = match endpoint_of(&cluster, victim).await {
                    Some(ep) => {
                        let pairs: Vec<(u64, u64)> = ep
                            .api
                            .catalog()
                            .shard_map()
                            .map(|m| {
                                let mut shards: Vec<_> = m.shards.values().cloned().collect();
                                shards.sort_by(|a, b| a.start.cmp(&b.start));
                                shards
                                    .windows(2)
                                    .filter(|w| w[0].end == w[1].start)
                                    .map(|w| (w[0].id, w[1].id))
                                    .collect()
                            })
                            .unwrap_or_default();
                        match pairs.get(rng.gen_range(0..pairs.len().max(1))).copied() {
                            None => "no adjacent shards".to_string(),
                            Some((l, r)) => {
                                let done = call(&ep, move |api| async move { api.merge_shards(l, r).await }).await;
                                match done {
                                    Some(Ok(m)) => {
                                        elastic.merges.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                        format!("{l}+{r}: ok, merged into {}", m.id)
                                    }
                                    Some(Err(e)) => format!("{l}+{r}: refused: {e}"),
                                    None => format!("{l}+{r}: no answer"),
                                }
                            }
                        }
                    }
                    None => "node down".to_string(),
                };
                trace.mark("faults", &format!("merge via n{victim}: {outcome}"), None);
                tokio::time::sleep(length / 4).await;
            }
            FaultKind::Elastic => {
                let key = split_key(&mut rng, keys);
                let shown =
                    floe_node::keys::parse_doc_key(&key).map(|(_, c, i)| format!("{c}/{i}")).unwrap_or_default();
                let outcome = match endpoint_of(&cluster, victim).await {
                    Some(ep) => match call(&ep, move |api| async move { api.split_at(vec![key]).await }).await {
                        Some(Ok(done)) => {
                            elastic.splits.fetch_add(done.len() as u64, std::sync::atomic::Ordering::Relaxed);
                            let children: Vec<u64> =
                                done.iter().flat_map(|d| d.children.iter().map(|c| c.id)).collect();
                            format!("ok, children {children:?}")
                        }
                        Some(Err(e)) => format!("refused: {e}"),
                        None => "no answer".to_string(),
                    },
                    None => "node down".to_string(),
                };
                trace.mark("faults", &format!("split at {shown} via n{victim}: {outcome}"), None);
                tokio::time::sleep(length / 4).await;
            }
            FaultKind::Pause => {
                trace.mark("faults", &format!("pause n{victim} for={}ms", length.as_millis()), None);
                cluster.lock().await.set_paused(victim, true);
                tokio::time::sleep(length).await;
                cluster.lock().await.set_paused(victim, false);
                trace.mark("faults", &format!("resume n{victim}"), None);
            }
            FaultKind::Disk if rng.gen_bool(0.5) => {
                let us = rng.gen_range(1_000..50_000);
                trace.mark(
                    "faults",
                    &format!("slow disk n{victim} {us}us per sync for={}ms", length.as_millis()),
                    None,
                );
                let latency = cluster.lock().await.nodes.get(&victim).map(|n| n.disk_latency_us.clone());
                if let Some(l) = &latency {
                    l.store(us, std::sync::atomic::Ordering::Relaxed);
                }
                tokio::time::sleep(length).await;
                let latency = cluster.lock().await.nodes.get(&victim).map(|n| n.disk_latency_us.clone());
                if let Some(l) = latency {
                    l.store(0, std::sync::atomic::Ordering::Relaxed);
                }
            }
            FaultKind::Disk => {
                trace.mark(
                    "faults",
                    &format!("failing disk n{victim} for={}ms, then restart", length.as_millis()),
                    None,
                );
                let engine = cluster.lock().await.nodes.get(&victim).map(|n| n.engine.clone());
                if let Some(e) = engine {
                    e.set_fail_writes(Some("EIO (simulated)".into()));
                }
                tokio::time::sleep(length).await;
                // Fail-stop: the operator restarts the node; nothing unsynced survives.
                let mut c = cluster.lock().await;
                c.crash(victim, 0).await;
                let restarted = c.start(victim).await;
                trace.mark("faults", &format!("restart n{victim} ok={}", restarted.is_ok()), None);
            }
        }
        trace.mark("faults", "healed", None);
    }
    count
}

/// Every shard and its replicas, as `ep`'s catalog copy lists them.
fn shard_replicas(ep: &Endpoint) -> Vec<(u64, Vec<u64>)> {
    let map = ep.api.catalog().shard_map();
    map.map(|m| m.shards.values().map(|d| (d.id, d.replicas.clone())).collect()).unwrap_or_default()
}

/// Replicas per shard in the simulated cluster (the placement default).
const REPLICAS: usize = 3;

/// Moves a random shard's replica (as `ep`'s catalog lists it) from one of its nodes to a
/// node without one, through `ep`; what happened, for the timeline.
async fn move_random_replica(ep: &Endpoint, ids: &[u64], rng: &mut ChaCha8Rng, elastic: &ElasticCounts) -> String {
    let shards = shard_replicas(ep);
    let Some((shard, replicas)) = shards.get(rng.gen_range(0..shards.len().max(1))).cloned() else {
        return "no shard".to_string();
    };
    let spare: Vec<u64> = ids.iter().copied().filter(|id| !replicas.contains(id)).collect();
    if replicas.is_empty() || spare.is_empty() {
        return format!("shard {shard}: no node to move to (replicas {replicas:?})");
    }
    let from = replicas[rng.gen_range(0..replicas.len())];
    let to = spare[rng.gen_range(0..spare.len())];
    match call(ep, move |api| async move { api.move_replica(shard, from, to).await }).await {
        Some(Ok(voters)) => {
            elastic.moves.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("shard {shard} n{from} -> n{to}: voters {voters:?}")
        }
        Some(Err(e)) => format!("shard {shard} n{from} -> n{to}: refused: {e}"),
        None => format!("shard {shard} n{from} -> n{to}: no answer"),
    }
}

/// After heal: a strong read of every key must succeed (recorded in the history).
async fn final_reads(
    config: &RunConfig,
    cluster: &tokio::sync::Mutex<SimCluster>,
    ids: &[u64],
    rec: &Shared<Recorder>,
    trace: &Trace,
    violations: &mut Vec<String>,
) {
    let process = 1_000_000;
    for k in 0..config.keys {
        let key = format!("k{k}");
        let key = key.as_str();
        let read =
            on_any_node(cluster, ids, HEAL_TIMEOUT, |ep| async move { do_read(&ep, process, key, rec, trace).await })
                .await;
        if read.is_none() {
            violations.push(format!("liveness: no strong read of {key} succeeded within {HEAL_TIMEOUT:?} after heal"));
        }
    }
}

/// One local replica after heal: `(group, applied index, epoch, start, end)`.
type ReplicaView = (u64, u64, u64, Vec<u8>, Vec<u8>);

/// One catalog entry: `(group, epoch, start, end, replicas)`.
type CatalogShard = (u64, u64, Vec<u8>, Vec<u8>, Vec<u64>);

/// One node's state after heal, for the convergence check.
#[derive(Debug, PartialEq, Eq)]
struct NodeView {
    /// Every local replica: `(group, applied index, epoch, start, end)`.
    replicas: Vec<ReplicaView>,
    /// The node's catalog copy.
    catalog: Vec<CatalogShard>,
    /// Merges the node's catalog still has a record of (none once every merge finished).
    merges: usize,
    /// Local replicas frozen or retired for a merge (none once every merge finished).
    merging: usize,
    /// Digest of the documents in each local shard replica's range, by group.
    documents: BTreeMap<u64, u64>,
    /// Documents outside every local shard replica's range (left behind by a move or merge).
    stray: usize,
}

impl NodeView {
    /// Reads node `host`'s view from its replicas, catalog copy and engine.
    fn of(host: &floe_node::raft::host::RaftHost, engine: &floe_node::storage::mem::MemEngine) -> Option<Self> {
        let local = host.local.all();
        let replicas: Vec<ReplicaView> =
            local.iter().map(|s| (s.id, host.applied_index(s.id), s.epoch, s.start.clone(), s.end.clone())).collect();
        let catalog = host
            .catalog
            .shard_map()
            .ok()?
            .shards
            .values()
            .map(|s| (s.id, s.epoch, s.start.clone(), s.end.clone(), s.replicas.clone()))
            .collect();
        let merges = host.catalog.merges().ok()?.len();
        let merging = local.iter().filter(|s| s.merging_into().is_some()).count();
        let pairs = engine.scan(Cf::Data, &[floe_node::keys::DOC_PREFIX], &[], usize::MAX).ok()?;
        let shards: Vec<&ReplicaView> = replicas.iter().filter(|r| r.0 != floe_node::keys::META_GROUP).collect();
        let mut documents: BTreeMap<u64, u64> = shards.iter().map(|r| (r.0, 0)).collect();
        let mut stray = 0;
        for (k, v) in &pairs {
            let owner = shards.iter().find(|r| r.3.as_slice() <= k.as_slice() && (r.4.is_empty() || k < &r.4));
            match owner.and_then(|r| documents.get_mut(&r.0)) {
                Some(h) => *h = fnv1a(fnv1a(*h, k), v),
                None => stray += 1,
            }
        }
        Some(NodeView { replicas, catalog, merges, merging, documents, stray })
    }
}

/// True when the nodes agree: every catalog copy is the same; no merge is left unfinished;
/// each node hosts exactly the shards the catalog lists it for, at the catalog's epoch and
/// range, and nothing else; every replica of a group (the meta group's on every node)
/// applied the same index and holds the same documents.
fn converged(views: &[(u64, NodeView)]) -> bool {
    let Some((_, first)) = views.first() else { return true };
    if views.iter().any(|(_, v)| v.catalog != first.catalog || v.merges > 0 || v.merging > 0 || v.stray > 0) {
        return false;
    }
    let hosts_as_listed = views.iter().all(|(id, v)| {
        let hosted: Vec<(u64, u64, &[u8], &[u8])> = v
            .replicas
            .iter()
            .filter(|r| r.0 != floe_node::keys::META_GROUP)
            .map(|r| (r.0, r.2, r.3.as_slice(), r.4.as_slice()))
            .collect();
        let listed: Vec<(u64, u64, &[u8], &[u8])> = first
            .catalog
            .iter()
            .filter(|c| c.4.contains(id))
            .map(|c| (c.0, c.1, c.2.as_slice(), c.3.as_slice()))
            .collect();
        hosted == listed
    });
    // Every replica of a group: the same applied index and documents as the first one seen.
    let mut groups: BTreeMap<u64, (u64, Option<u64>)> = BTreeMap::new();
    let replicas_agree = views.iter().all(|(_, v)| {
        v.replicas.iter().all(|r| {
            let state = (r.1, v.documents.get(&r.0).copied());
            *groups.entry(r.0).or_insert(state) == state
        })
    });
    hosts_as_listed && replicas_agree
}

/// After heal: the nodes converge (`converged`) within `HEAL_TIMEOUT`.
async fn check_convergence(
    cluster: &tokio::sync::Mutex<SimCluster>,
    ids: &[u64],
    trace: &Trace,
    violations: &mut Vec<String>,
) {
    let deadline = tokio::time::Instant::now() + HEAL_TIMEOUT;
    loop {
        let views: Vec<(u64, NodeView)> = {
            let c = cluster.lock().await;
            ids.iter()
                .filter_map(|id| {
                    let node = c.nodes.get(id)?;
                    Some((*id, NodeView::of(&node.running.as_ref()?.host, &node.engine)?))
                })
                .collect()
        };
        if views.len() == ids.len() && converged(&views) {
            trace.record(&format!("converged {views:?}"));
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let replicas = replica_details(cluster, ids).await;
            violations.push(format!(
                "replicas did not converge within {HEAL_TIMEOUT:?}: {views:?}\n  raft replicas:\n{replicas}"
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every node's view of every group its catalog lists (and the meta group): hosted, dormant,
/// and the running replica's raft state, leader, applied index, snapshot and (on a leader)
/// each follower's matching index. For diagnosing a run that did not converge.
async fn replica_details(cluster: &tokio::sync::Mutex<SimCluster>, ids: &[u64]) -> String {
    let c = cluster.lock().await;
    let mut out = String::new();
    for id in ids {
        let Some(host) = c.nodes.get(id).and_then(|n| n.running.as_ref()).map(|r| &r.host) else {
            out.push_str(&format!("    n{id}: not running\n"));
            continue;
        };
        let mut groups: Vec<u64> =
            host.catalog.shard_map().map(|m| m.shards.keys().copied().collect()).unwrap_or_default();
        groups.insert(0, floe_node::keys::META_GROUP);
        for g in groups {
            let raft = host.group(g).map(|h| {
                let m = h.raft.metrics().borrow().clone();
                let matching: Option<Vec<(u64, Option<u64>)>> =
                    m.replication.map(|r| r.iter().map(|(n, l)| (*n, l.map(|l| l.index))).collect());
                format!(
                    "{:?} leader={:?} applied={:?} snapshot={:?} matching={matching:?}",
                    m.state,
                    m.current_leader,
                    m.last_applied.map(|l| l.index),
                    m.snapshot.map(|l| l.index)
                )
            });
            out.push_str(&format!(
                "    n{id} g{g}: hosts={} dormant={} raft={}\n",
                host.hosts(g),
                host.is_dormant(g),
                raft.unwrap_or_else(|| "not running".into())
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(process: i64, t: EventType, f: Function, key: &str, value: Option<Value>) -> Event {
        event(process, t, f, key, value)
    }

    #[test]
    fn eventual_reads_of_written_values_pass_and_phantoms_fail() {
        let events = vec![
            ev(0, EventType::Invoke, Function::Write, "k", Some(json!(1))),
            ev(0, EventType::Info, Function::Write, "k", Some(json!(1))),
            ev(1, EventType::Invoke, Function::Cas, "k", Some(json!([1, 2]))),
        ];
        let mut v = Vec::new();
        check_eventual_reads(
            &events,
            &[("k".into(), json!(1), 2), ("k".into(), json!(2), 3), ("k".into(), Value::Null, 0)],
            &mut v,
        );
        assert!(v.is_empty(), "{v:?}");
        check_eventual_reads(&events, &[("k".into(), json!(7), 3)], &mut v);
        assert_eq!(v.len(), 1, "a value nobody wrote is a violation");
        let mut v = Vec::new();
        check_eventual_reads(&events, &[("k".into(), json!(2), 1)], &mut v);
        assert_eq!(v.len(), 1, "a value read before its write was invoked is a violation");
    }

    /// Three nodes, one shard on nodes 1 and 2 only (a cluster larger than a shard's
    /// replica set), everything agreeing; then each way of disagreeing.
    #[test]
    fn convergence_follows_each_shards_replica_set() {
        let catalog = vec![(5, 2, b"a".to_vec(), b"m".to_vec(), vec![1, 2])];
        let view = |replicas: Vec<ReplicaView>, documents: Vec<(u64, u64)>| NodeView {
            replicas,
            catalog: catalog.clone(),
            merges: 0,
            merging: 0,
            documents: documents.into_iter().collect(),
            stray: 0,
        };
        let meta = (0, 40, 1, Vec::new(), Vec::new());
        let shard = (5, 17, 2, b"a".to_vec(), b"m".to_vec());
        let good = || {
            vec![
                (1, view(vec![meta.clone(), shard.clone()], vec![(5, 99)])),
                (2, view(vec![meta.clone(), shard.clone()], vec![(5, 99)])),
                (3, view(vec![meta.clone()], vec![])),
            ]
        };
        assert!(converged(&good()));
        let mut lagging = good();
        lagging[1].1.replicas[1].1 = 16;
        assert!(!converged(&lagging), "a replica behind");
        let mut diverged = good();
        diverged[1].1.documents.insert(5, 98);
        assert!(!converged(&diverged), "different documents");
        let mut extra = good();
        extra[2].1.replicas.push(shard.clone());
        extra[2].1.documents.insert(5, 99);
        assert!(!converged(&extra), "a replica the catalog does not list");
        let mut missing = good();
        missing[0].1.replicas.pop();
        assert!(!converged(&missing), "a listed replica absent");
        let mut stray = good();
        stray[2].1.stray = 1;
        assert!(!converged(&stray), "documents left outside every local shard");
        let mut old_epoch = good();
        old_epoch[0].1.replicas[1].2 = 1;
        old_epoch[1].1.replicas[1].2 = 1;
        assert!(!converged(&old_epoch), "replicas at another epoch than the catalog's");
        let mut catalogs = good();
        catalogs[2].1.catalog[0].4 = vec![1, 3];
        assert!(!converged(&catalogs), "catalog copies differ");
    }
}
