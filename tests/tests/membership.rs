//! Membership changes under load lose nothing (issue 4): three `floe start` processes take
//! writes while a fourth node joins with `--join` (after the log was compacted, so it catches
//! up by snapshot) — into the meta group only, as the shard already has three replicas —, the
//! shard's replica moves from node 3 to node 4 and its leadership to node 4 (what `floe ctl
//! move` calls), node 3 deletes its copy, then node 1 is removed with the client's
//! `remove_node` (what `floe ctl node remove` calls; its replica moves back to node 3) and
//! its process stopped. Every acknowledged write is read
//! back strongly from the remaining nodes, the joined node serves them locally (also after a
//! restart, which re-confirms the join), a wiped node 4 is refused when it rejoins under its
//! old id, and the removed id is refused when it tries to come back.
//!
//! Needs the `floe` binary (see `floe_tests::floe_bin`). Bounded by `TEST_TIMEOUT`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use floe_client::{Client, Document, ReadConsistency};
use floe_tests::{client_for, ensure_collection, free_ports, Cluster, ClusterNode, FloeProcess, READY_TIMEOUT};
use serde_json::{json, Value};

const TEST_TIMEOUT: Duration = Duration::from_secs(180);
const COLLECTION: &str = "members";
/// Distinct documents acknowledged before the join starts (ids cycle over 400; more than the
/// snapshot interval, so the joiner needs a snapshot).
const WRITES_BEFORE_JOIN: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn join_and_remove_under_load_lose_nothing() {
    match tokio::time::timeout(TEST_TIMEOUT, run()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => panic!("{error:?}"),
        Err(_) => panic!("test exceeded {} s", TEST_TIMEOUT.as_secs()),
    }
}

/// Reads `via-node-4` through node 4's HTTP gateway (node 4 has no replica of the shard) at
/// every consistency level, one document and in a batch: each must return the write. Strong
/// and session reads must see it at once; bounded and eventual ones within a few seconds
/// (the serving replica may not have applied it yet).
async fn read_through_node_without_replica(http: &reqwest::Client, http_addr: &str, token: &str) -> anyhow::Result<()> {
    let doc_url = format!("http://{http_addr}/v1/collections/{COLLECTION}/docs/via-node-4");
    let levels = [("strong", "consistency=strong", true), ("session", "consistency=session", true)];
    let eventually =
        [("bounded", "consistency=bounded&max_staleness_ms=1000", false), ("eventual", "consistency=eventual", false)];
    for (name, query, at_once) in levels.into_iter().chain(eventually) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let get = http.get(format!("{doc_url}?{query}")).header("floe-session", token).send().await?;
            let status = get.status();
            let body = get.text().await?;
            let seen = status.is_success() && body.replace(' ', "").contains(r#""n":4"#);
            if seen {
                break;
            }
            if at_once || std::time::Instant::now() > deadline {
                bail!("a {name} read through node 4 (no replica) answered {status}: {body}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let batch = http
            .post(format!("http://{http_addr}/v1/collections/{COLLECTION}/batch_get"))
            .header("floe-session", token)
            .json(&if name == "bounded" {
                json!({ "ids": ["via-node-4", "absent-doc"], "consistency": name, "max_staleness_ms": 60_000 })
            } else {
                json!({ "ids": ["via-node-4", "absent-doc"], "consistency": name })
            })
            .send()
            .await?;
        let status = batch.status();
        let body: Value = batch.json().await.unwrap_or(Value::Null);
        let docs = body["documents"].as_array().cloned().unwrap_or_default();
        if !status.is_success() || docs.len() != 2 {
            bail!("a {name} batch get through node 4 answered {status}: {body}");
        }
    }
    Ok(())
}

/// Acknowledged writes: id → (version, value).
type Acked = Arc<Mutex<BTreeMap<String, (u64, i64)>>>;

async fn writer(client: Client, acked: Acked, stop: Arc<AtomicBool>) -> usize {
    let mut errors = 0;
    let mut n: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let id = format!("d{}", n % 400);
        match client.collection(COLLECTION).put(&id, &json!({ "n": n })).await {
            Ok(outcome) => {
                if let Ok(mut a) = acked.lock() {
                    a.insert(id, (outcome.version, n));
                }
            }
            Err(_) => {
                // Unknown outcome: the document holds the last acknowledged write or, if this
                // one applied, a newer version; the final check allows both.
                errors += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    errors
}

fn acked_count(acked: &Acked) -> usize {
    acked.lock().map(|a| a.len()).unwrap_or(0)
}

async fn run() -> anyhow::Result<()> {
    let mut cluster = Cluster::start_with_args(3, &["--snapshot-count", "100", "--snapshot-keep-logs", "10"])
        .await
        .context("start cluster")?;
    let endpoints = cluster.grpc_endpoints();
    let client = client_for(&endpoints)?;
    ensure_collection(&client, COLLECTION).await?;

    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(writer(client_for(&endpoints[1..]).expect("client"), acked.clone(), stop.clone())))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked_count(&acked) < WRITES_BEFORE_JOIN {
        if tokio::time::Instant::now() > deadline {
            bail!("only {} writes acknowledged in 60 s", acked_count(&acked));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Node 4 joins (through any of nodes 1-3) while the writers go on.
    let ports = free_ports(2)?;
    let (grpc, http_addr) = (format!("127.0.0.1:{}", ports[0]), format!("127.0.0.1:{}", ports[1]));
    let join_args = |id: u64, dir: &std::path::Path| -> Vec<String> {
        vec![
            "start".into(),
            "--node-id".into(),
            id.to_string(),
            "--grpc-addr".into(),
            grpc.clone(),
            "--http-addr".into(),
            http_addr.clone(),
            "--data-dir".into(),
            dir.join(format!("node{id}")).display().to_string(),
            "--join".into(),
            cluster.nodes.iter().map(|n| n.process.grpc_addr.clone()).collect::<Vec<_>>().join(","),
        ]
    };
    let args = join_args(4, cluster.dir());
    let process = FloeProcess::spawn("node4", args, cluster.dir(), grpc.clone(), http_addr.clone())?;
    cluster.nodes.push(ClusterNode { node_id: 4, process });
    cluster.node_mut(4)?.process.wait_ready(READY_TIMEOUT).await.context("joined node ready")?;
    let node4 = Client::builder().endpoint(format!("http://{grpc}")).build()?;
    let replicas = node4.replica_status().await.context("node 4 replica status")?;
    // The shard already has three replicas: node 4 joins the meta group only; shards come
    // to it by moves.
    let groups: Vec<u64> = replicas.replicas.iter().map(|r| r.group).collect();
    if groups != [0] || !replicas.replicas[0].voters.contains(&4) {
        bail!("node 4 should vote in the meta group only after joining: {:?}", replicas.replicas);
    }

    // Node 4 holds no replica of the shard: a write through its HTTP gateway is forwarded to
    // the shard's leader, and reads at every level are served by one of the replicas.
    let http = floe_tests::http_client();
    let url = format!("http://{http_addr}/v1/collections/{COLLECTION}/docs/via-node-4");
    let put = http.put(&url).body(r#"{"n":4}"#).header("content-type", "application/json").send().await?;
    if !put.status().is_success() {
        bail!("a write through node 4 (no replica) answered {}: {}", put.status(), put.text().await?);
    }
    let token = put.headers().get("floe-session").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    read_through_node_without_replica(&http, &http_addr, &token).await?;
    // A restarted member re-confirms its join (idempotent) and serves again.
    cluster.node_mut(4)?.process.restart()?;
    cluster.node_mut(4)?.process.wait_ready(READY_TIMEOUT).await.context("node 4 after restart")?;

    // Move the shard's replica from node 3 to node 4 under load, then its leadership to
    // node 4; node 3 deletes its copy once the shard's leader confirms it left.
    // Moves wait for a learner to catch up, transfers for a lease and an election.
    let admin = Client::builder()
        .endpoints(endpoints[1..2].iter().cloned())
        .request_timeout(Duration::from_secs(120))
        .build()?;
    let status = admin.cluster_status().await.context("cluster status")?;
    let shard = status.shards.first().context("no shard listed")?.id;
    let voters = admin.move_replica(shard, 3, 4).await.context("move shard 3 -> 4")?;
    if !voters.contains(&4) || voters.contains(&3) {
        bail!("after moving shard {shard} from node 3 to node 4 its voters are {voters:?}");
    }
    let leader = admin.transfer_leader(shard, 4).await.context("transfer leadership to node 4")?;
    eprintln!("shard {shard} moved 3 -> 4; leader after transfer: node {leader}");
    let node3 = client_for(&endpoints[2..3])?;
    let gone = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match node3.replica_status().await {
                Ok(r) if r.replicas.iter().all(|g| g.group != shard) => return,
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
    .await;
    if gone.is_err() {
        bail!("node 3 still hosts shard {shard} 30 s after it moved away\n{}", cluster.log_tails());
    }

    // Remove node 1 (through node 2), then stop its process: its replica moves to node 3,
    // the only live node without one.

    let groups = admin.remove_node(1).await.context("remove node 1")?;
    for (group, voters) in &groups {
        if voters.contains(&1) {
            bail!("node 1 still votes in group {group}: {voters:?}");
        }
    }
    cluster.node_mut(1)?.process.kill9()?;
    let before_stop = acked_count(&acked);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = 0;
    for w in writers {
        errors += w.await.context("writer task")?;
    }
    let acked: BTreeMap<String, (u64, i64)> = acked.lock().map(|a| a.clone()).unwrap_or_default();
    eprintln!("acked ids {} (before stop {before_stop}), write errors {errors}", acked.len());

    // Every acknowledged write, strongly from the remaining members...
    let remaining = vec![endpoints[1].clone(), endpoints[2].clone(), format!("http://{grpc}")];
    let reader = client_for(&remaining)?;
    for (id, (version, n)) in &acked {
        let doc: Document<Value> = reader
            .collection(COLLECTION)
            .get_with(id, ReadConsistency::Strong)
            .await?
            .with_context(|| format!("{id} (acknowledged v{version}) missing"))?;
        if doc.version < *version || (doc.version == *version && doc.value["n"] != json!(n)) {
            bail!("{id}: acknowledged v{version} n={n}, read v{} {}", doc.version, doc.value);
        }
    }
    // ...and locally on the joined node (session: it waits for its own apply).
    let local = Client::builder().endpoint(format!("http://{grpc}")).build()?;
    local.observe_session_token(&reader.session_token());
    for (id, (version, _)) in &acked {
        let doc: Option<Document<Value>> = local.collection(COLLECTION).get(id).await?;
        match doc {
            Some(d) if d.version >= *version => {}
            other => bail!("node 4 serves {id} as {:?}, acknowledged v{version}", other.map(|d| d.version)),
        }
    }
    // A wiped machine cannot rejoin under its old id: it would vote with an empty log.
    cluster.node_mut(4)?.process.kill9()?;
    std::fs::remove_dir_all(cluster.dir().join("node4")).context("wipe node 4")?;
    cluster.node_mut(4)?.process.restart()?;
    let refused = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if !cluster.node_mut(4).map(|n| n.process.is_running()).unwrap_or(false) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let log = cluster.node_mut(4)?.process.log_tail(4096);
    if refused.is_err() || !log.contains("no data") {
        bail!("a wiped node 4 should be refused at join and exit\n{log}");
    }
    // The removed id cannot come back.
    match reader.add_node(1, &cluster.nodes[0].process.grpc_addr, "", false).await {
        Err(floe_client::Error::AlreadyExists { message, .. }) if message.contains("removed") => {}
        other => bail!("re-adding removed node 1 should be refused, got {other:?}"),
    }
    Ok(())
}
