//! Proves invariant 1 (an acknowledged write is never lost while a majority survives) across
//! a kill -9 of the leader: three `floe start` processes, concurrent writers, SIGKILL of the
//! current leader mid-stream, restart from its data dir. Afterwards every acknowledged write
//! is read back with its acknowledged version and content by STRONG reads, writes with an
//! unknown outcome are either absent or hold exactly what was written, and the restarted node
//! converges to the same state (EVENTUAL reads sent to it alone).
//!
//! Needs the `floe` binary (see `floe_tests::floe_bin`). Bounded by `TEST_TIMEOUT`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use floe_client::{Client, Document, ReadConsistency};
use floe_tests::{client_for, ensure_collection, Cluster, READY_TIMEOUT};
use serde_json::{json, Value};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const NODES: usize = 3;
const COLLECTION: &str = "kill";
const DOCUMENTS_TOTAL: usize = 1000;
const WRITERS: usize = 4;
/// The leader is killed once this many writes were acknowledged.
const KILL_AFTER_ACKS: usize = 200;
/// How long the killed node stays down before it is restarted.
const DOWN_TIME: Duration = Duration::from_secs(2);
/// Pause after a failed write, so an outage does not burn through the ids at full speed.
const ERROR_PAUSE: Duration = Duration::from_millis(50);
/// Bound on waiting for the kill threshold and on finding the leader.
const PHASE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the restarted node catching up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// Liveness floor: losing one of three nodes must not stop the cluster from taking most
/// writes. Each write is attempted once, so this bounds the errors during the failover.
const ACKED_MIN: usize = DOCUMENTS_TOTAL / 2;

/// What the test knows about one document after the write phase.
#[derive(Debug, Clone)]
enum Expected {
    /// The write was acknowledged at this version.
    Acked { value: Value, version: u64 },
    /// The write failed with this error: the document may be absent or hold `value`.
    Unknown { value: Value, error: String },
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_leader_kill9() {
    match tokio::time::timeout(TEST_TIMEOUT, run()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => panic!("{error:?}"),
        Err(_) => panic!("test exceeded {} s", TEST_TIMEOUT.as_secs()),
    }
}

async fn run() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(NODES).await.context("start cluster")?;
    let client = client_for(&cluster.grpc_endpoints())?;
    ensure_collection(&client, COLLECTION).await?;

    // Write phase: WRITERS tasks, each writing its own ids once, while the leader is killed.
    let acked_count = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::with_capacity(WRITERS);
    for writer in 0..WRITERS {
        let client = client.clone();
        let acked_count = Arc::clone(&acked_count);
        writers.push(tokio::spawn(async move { write_documents(client, writer, acked_count).await }));
    }

    let kill_result = kill_and_restart_leader(&mut cluster, &client, &acked_count).await;
    let acked_at_restart = acked_count.load(Ordering::SeqCst);

    let mut expected: BTreeMap<String, Expected> = BTreeMap::new();
    for writer in writers {
        let records = writer.await.context("writer task panicked")?;
        expected.extend(records);
    }
    let killed_node = kill_result?;
    let acked_total = expected.values().filter(|e| matches!(e, Expected::Acked { .. })).count();
    let unknown_total = expected.len() - acked_total;
    eprintln!("killed node {killed_node}; {acked_total} acknowledged, {unknown_total} unknown outcome");
    if acked_total < ACKED_MIN {
        bail!(
            "only {acked_total} of {DOCUMENTS_TOTAL} writes acknowledged (floor {ACKED_MIN}); \
             first errors: {:?}\n{}",
            first_errors(&expected),
            cluster.log_tails()
        );
    }
    if acked_total <= acked_at_restart {
        bail!(
            "no write was acknowledged after the restart of node {killed_node} \
             ({acked_total} acknowledged in all); first errors: {:?}\n{}",
            first_errors(&expected),
            cluster.log_tails()
        );
    }

    // Strong reads through the whole cluster: nothing acknowledged is lost.
    let state = read_all_strong(&client, &expected).await?;
    let mut problems = Vec::new();
    for (id, expectation) in &expected {
        let actual = state.get(id).cloned().flatten();
        match (expectation, actual) {
            (Expected::Acked { value, version }, Some(document)) => {
                if document.version != *version || &document.value != value {
                    problems.push(format!(
                        "{id}: acknowledged v{version} {value}, read v{} {}",
                        document.version, document.value
                    ));
                }
            }
            (Expected::Acked { version, .. }, None) => {
                problems.push(format!("{id}: acknowledged v{version} but absent"));
            }
            (Expected::Unknown { value, .. }, Some(document)) if &document.value != value => {
                problems.push(format!("{id}: unknown outcome, holds {} instead of {value}", document.value));
            }
            (Expected::Unknown { .. }, _) => {}
        }
    }
    if !problems.is_empty() {
        bail!(
            "{} documents wrong after the leader kill (first 20): {:#?}",
            problems.len(),
            &problems[..problems.len().min(20)]
        );
    }

    // The restarted node serves the same data from its own state once caught up.
    let restarted = cluster.node_mut(killed_node)?;
    restarted.process.wait_ready(READY_TIMEOUT).await?;
    let restarted_client = client_for(&[restarted.process.grpc_endpoint()])?;
    wait_converged(&restarted_client, &state)
        .await
        .with_context(|| format!("restarted node {killed_node} did not catch up"))?;
    Ok(())
}

/// Writes `DOCUMENTS_TOTAL / WRITERS` documents, each id once, and records the outcome.
async fn write_documents(client: Client, writer: usize, acked_count: Arc<AtomicUsize>) -> Vec<(String, Expected)> {
    let collection = client.collection(COLLECTION);
    let per_writer = DOCUMENTS_TOTAL / WRITERS;
    let mut records = Vec::with_capacity(per_writer);
    for sequence in 0..per_writer {
        let id = format!("w{writer}-{sequence:04}");
        let value = json!({"writer": writer, "sequence": sequence, "pad": "x".repeat(64)});
        match collection.put(&id, &value).await {
            Ok(outcome) => {
                acked_count.fetch_add(1, Ordering::SeqCst);
                let version = outcome.version;
                records.push((id, Expected::Acked { value, version }));
            }
            Err(error) => {
                records.push((id, Expected::Unknown { value, error: error.to_string() }));
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    records
}

/// Waits for `KILL_AFTER_ACKS` acknowledgements, kills the leader with SIGKILL, waits
/// `DOWN_TIME`, restarts it with the same flags, and returns its node id.
async fn kill_and_restart_leader(
    cluster: &mut Cluster,
    client: &Client,
    acked_count: &AtomicUsize,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    while acked_count.load(Ordering::SeqCst) < KILL_AFTER_ACKS {
        if Instant::now() >= deadline {
            bail!(
                "only {} writes acknowledged within {} s, before any fault\n{}",
                acked_count.load(Ordering::SeqCst),
                PHASE_TIMEOUT.as_secs(),
                cluster.log_tails()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leader = find_leader(client).await?;
    eprintln!("killing leader node {leader} after {} acknowledged writes", acked_count.load(Ordering::SeqCst));
    let node = cluster.node_mut(leader)?;
    node.process.kill9()?;
    tokio::time::sleep(DOWN_TIME).await;
    node.process.restart()?;
    eprintln!("restarted node {leader} at {} acknowledged writes", acked_count.load(Ordering::SeqCst));
    Ok(leader)
}

/// The node leading the most shards (the data shard in a fresh cluster), else the meta
/// leader, per `ClusterStatus`. Polls until one is known.
async fn find_leader(client: &Client) -> anyhow::Result<u64> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    loop {
        match client.cluster_status().await {
            Ok(status) => {
                let mut shards_led: BTreeMap<u64, usize> = BTreeMap::new();
                for shard in status.shards.iter().filter(|shard| shard.leader != 0) {
                    *shards_led.entry(shard.leader).or_default() += 1;
                }
                let leader = shards_led
                    .iter()
                    .max_by_key(|(node, count)| (**count, std::cmp::Reverse(**node)))
                    .map(|(node, _)| *node)
                    .or((status.meta_leader != 0).then_some(status.meta_leader));
                if let Some(leader) = leader {
                    return Ok(leader);
                }
            }
            Err(error) => eprintln!("cluster_status failed: {error}"),
        }
        if Instant::now() >= deadline {
            bail!("no leader reported within {} s", PHASE_TIMEOUT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads every id with STRONG consistency through the whole cluster (a few tasks at once).
async fn read_all_strong(
    client: &Client,
    expected: &BTreeMap<String, Expected>,
) -> anyhow::Result<BTreeMap<String, Option<Document<Value>>>> {
    const READERS: usize = 4;
    let ids: Vec<String> = expected.keys().cloned().collect();
    let chunk_len = ids.len().div_ceil(READERS).max(1);
    let mut readers = Vec::new();
    for chunk in ids.chunks(chunk_len) {
        let collection = client.collection(COLLECTION);
        let chunk = chunk.to_vec();
        readers.push(tokio::spawn(async move {
            let mut read = Vec::with_capacity(chunk.len());
            for id in chunk {
                let document = collection
                    .get_with::<Value>(&id, ReadConsistency::Strong)
                    .await
                    .map_err(|error| anyhow!("strong read of {id}: {error}"))?;
                read.push((id, document));
            }
            anyhow::Ok(read)
        }));
    }
    let mut state = BTreeMap::new();
    for reader in readers {
        state.extend(reader.await.context("reader task panicked")??);
    }
    Ok(state)
}

/// Polls the node behind `client` with EVENTUAL reads until it holds exactly `state`.
async fn wait_converged(client: &Client, state: &BTreeMap<String, Option<Document<Value>>>) -> anyhow::Result<()> {
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    let collection = client.collection(COLLECTION);
    let mut pending: Vec<&String> = state.keys().collect();
    let mut mismatch_last = String::new();
    while !pending.is_empty() {
        let mut still_pending = Vec::new();
        for id in pending {
            let expected = state.get(id).cloned().flatten();
            let matches = match collection.get_with::<Value>(id, ReadConsistency::Eventual).await {
                Ok(actual) => {
                    let same = match (&expected, &actual) {
                        (Some(want), Some(have)) => want.version == have.version && want.value == have.value,
                        (None, None) => true,
                        _ => false,
                    };
                    if !same {
                        mismatch_last = format!("{id}: want {expected:?}, have {actual:?}");
                    }
                    same
                }
                Err(error) => {
                    mismatch_last = format!("{id}: {error}");
                    false
                }
            };
            if !matches {
                still_pending.push(id);
            }
        }
        pending = still_pending;
        if pending.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "{} documents still differ after {} s; last: {mismatch_last}",
                pending.len(),
                CATCH_UP_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

fn first_errors(expected: &BTreeMap<String, Expected>) -> Vec<String> {
    expected
        .iter()
        .filter_map(|(id, e)| match e {
            Expected::Unknown { error, .. } => Some(format!("{id}: {error}")),
            Expected::Acked { .. } => None,
        })
        .take(5)
        .collect()
}
