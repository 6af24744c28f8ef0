//! Elastic shards across real processes (issue 5, "done means"):
//! - a 3-process cluster started with a low `--split-qps` splits a hot collection under load
//!   by itself, and loses no acknowledged write;
//! - once the load stops, the idle shards hibernate on every node (`ClusterStatus` and
//!   `floe ctl shards` show it), and the next request wakes the shard it needs;
//! - a manual split (`floe ctl split`) at a document: both sides keep serving, and a write
//!   after the split gets a higher version than before it (versions stay monotonic); a
//!   manual merge (`floe ctl merge`) of two of the shards: the merged shard serves both
//!   ranges, versions keep growing, the parts are gone;
//! - waking a hibernated shard sends its followers a few messages, not its log again.
//!
//! Needs the `floe` binary (see `floe_tests::floe_bin`). Bounded by `TEST_TIMEOUT`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use floe_client::{Client, Document, ReadConsistency};
use floe_tests::{client_for, ensure_collection, floe_bin, Cluster};
use serde_json::{json, Value};

const TEST_TIMEOUT: Duration = Duration::from_secs(150);
const WRITERS: usize = 8;
const KEYS: usize = 240;

async fn bounded(body: impl std::future::Future<Output = anyhow::Result<()>>) {
    match tokio::time::timeout(TEST_TIMEOUT, body).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => panic!("{error:?}"),
        Err(_) => panic!("test exceeded {} s", TEST_TIMEOUT.as_secs()),
    }
}

/// Shards of the cluster as `node` answers: `(id, state)`.
async fn shards(client: &Client) -> anyhow::Result<Vec<(u64, String)>> {
    let status = client.cluster_status().await?;
    Ok(status.shards.iter().map(|s| (s.id, s.state.clone())).collect())
}

/// What each key's writer knows: the last acknowledged value, and values written after it
/// whose outcome is unknown.
#[derive(Default, Clone, Debug)]
struct KeyLog {
    acked: Option<u64>,
    unknown_after: Vec<u64>,
}

/// Writer `w` owns keys `i` with `i % WRITERS == w` and writes increasing values until
/// `stop` is raised or the deadline passes.
async fn writer(
    client: Client,
    collection: &'static str,
    w: usize,
    deadline: Instant,
    stop: Arc<AtomicBool>,
) -> BTreeMap<String, KeyLog> {
    let mut logs: BTreeMap<String, KeyLog> = BTreeMap::new();
    let mut value = 0u64;
    let mut i = w;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let id = format!("h{:04}", i % KEYS);
        i += WRITERS;
        value += 1;
        let log = logs.entry(id.clone()).or_default();
        match client.collection(collection).put(&id, &json!({ "v": value, "w": w })).await {
            Ok(_) => *log = KeyLog { acked: Some(value), unknown_after: Vec::new() },
            Err(e) if e.is_retryable() && !e.is_outcome_unknown() => {}
            Err(_) => log.unknown_after.push(value),
        }
    }
    logs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_collection_splits_then_idle_shards_hibernate_and_wake() {
    bounded(split_hibernate_wake()).await;
}

async fn split_hibernate_wake() -> anyhow::Result<()> {
    let args = ["--split-qps", "30", "--split-cooldown", "2s", "--hibernate-after", "3s", "--merge-qps", "0"];
    let cluster = Cluster::start_with_args(3, &args).await.context("start cluster")?;
    let endpoints = cluster.grpc_endpoints();
    let client = client_for(&endpoints)?;
    ensure_collection(&client, "hot").await?;
    let before = shards(&client).await?.len();

    // Load until the cluster has split the hot collection (bounded).
    let load_started = Instant::now();
    let stop = load_started + Duration::from_secs(25);
    let halt = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(writer(client_for(&endpoints).expect("client"), "hot", w, stop, halt.clone())))
        .collect();
    let mut split_after = None;
    while Instant::now() < stop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if shards(&client).await.map(|s| s.len()).unwrap_or(0) > before {
            split_after.get_or_insert(load_started.elapsed());
            // Keep loading a little after the first split: more may follow.
            if load_started.elapsed() > split_after.unwrap_or_default() + Duration::from_secs(3) {
                break;
            }
        }
    }
    halt.store(true, Ordering::Relaxed);
    let mut logs: BTreeMap<String, KeyLog> = BTreeMap::new();
    for t in tasks {
        logs.extend(t.await.context("writer task")?);
    }
    let Some(split_after) = split_after else {
        bail!("no split within 25 s of hot load at --split-qps 30:\n{}", cluster.log_tails());
    };
    let after = shards(&client).await?.len();
    eprintln!("split {} s after load onset; shards {before} -> {after}", split_after.as_secs_f64());

    // Nothing acknowledged was lost: a strong read returns the last acknowledged value or a
    // value whose write outcome was unknown.
    let hot = client.collection("hot");
    let mut checked = 0;
    for (id, log) in &logs {
        let Some(acked) = log.acked else { continue };
        let doc: Option<Document<Value>> = hot.get_with(id, ReadConsistency::Strong).await.context("read back")?;
        let v = doc.as_ref().and_then(|d| d.value.get("v")).and_then(Value::as_u64);
        if v != Some(acked) && !v.is_some_and(|v| log.unknown_after.contains(&v)) {
            bail!("{id}: acknowledged {acked} but read {v:?} (unknown outcomes {:?})", log.unknown_after);
        }
        checked += 1;
    }
    assert!(checked > 50, "only {checked} keys had acknowledged writes");

    // Idle: every shard hibernates on the node we ask.
    let deadline = Instant::now() + Duration::from_secs(30);
    let pinned = client_for(&endpoints[..1])?;
    loop {
        let s = shards(&pinned).await?;
        if s.iter().all(|(_, state)| state == "hibernating") {
            break;
        }
        if Instant::now() > deadline {
            bail!("shards still active 30 s after the load stopped: {s:?}\n{}", cluster.log_tails());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ctl = std::process::Command::new(floe_bin()?)
        .args(["ctl", "--endpoints", &endpoints[0], "shards"])
        .output()
        .context("floe ctl shards")?;
    let table = String::from_utf8_lossy(&ctl.stdout);
    assert!(ctl.status.success() && table.contains("hibernating") && table.contains("default/hot/"), "{table}");

    // The next request wakes the shard it needs, and only that one.
    let id = logs.keys().next().cloned().unwrap_or_else(|| "h0000".into());
    let woke = Instant::now();
    let doc: Option<Document<Value>> = pinned.collection("hot").get_with(&id, ReadConsistency::Strong).await?;
    let wake_ms = woke.elapsed().as_millis();
    assert!(doc.is_some(), "{id} is readable after wake-up");
    eprintln!("wake + strong read of a hibernated shard: {wake_ms} ms");
    assert!(wake_ms < 2_000, "waking took {wake_ms} ms");
    let s = shards(&pinned).await?;
    assert!(s.iter().any(|(_, st)| st == "active"), "the woken shard is active: {s:?}");
    assert!(s.iter().any(|(_, st)| st == "hibernating"), "the others sleep on: {s:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manual_split_keeps_serving_and_versions_grow() {
    bounded(manual_split()).await;
}

async fn manual_split() -> anyhow::Result<()> {
    let cluster = Cluster::start_with_args(3, &["--split-qps", "0", "--merge-qps", "0"]).await.context("start")?;
    let endpoints = cluster.grpc_endpoints();
    let client = client_for(&endpoints)?;
    ensure_collection(&client, "users").await?;
    let users = client.collection("users");
    let mut versions = BTreeMap::new();
    for id in ["alice", "bob", "mallory", "zed"] {
        versions.insert(id, users.put(id, &json!({ "name": id })).await?.version);
    }
    let ctl = std::process::Command::new(floe_bin()?)
        .args(["ctl", "--endpoints", &endpoints.join(","), "split", "--collection", "users", "--ids", "bob,n"])
        .output()
        .context("floe ctl split")?;
    let out = String::from_utf8_lossy(&ctl.stdout);
    assert!(ctl.status.success(), "{out}{}", String::from_utf8_lossy(&ctl.stderr));
    assert!(out.contains("default/users/bob") && out.contains("default/users/n"), "{out}");
    assert_eq!(shards(&client).await?.len(), 3, "one shard split into three");
    // A split at a key that already starts a shard is refused with a clear message.
    let again = client.split_at("users", &["bob"]).await;
    assert!(again.is_err(), "{again:?}");

    for (id, before) in &versions {
        let doc: Option<Document<Value>> = users.get_with(id, ReadConsistency::Strong).await?;
        assert_eq!(doc.map(|d| d.version), Some(*before), "{id} kept its version across the split");
        let after = users.put(id, &json!({ "name": id, "again": true })).await?.version;
        assert!(after > *before, "{id}: version {after} after the split, {before} before");
        // Every node serves it (each hosts every shard replica).
        for e in &endpoints {
            let pinned = client_for(std::slice::from_ref(e))?;
            let doc: Option<Document<Value>> = pinned.collection("users").get_with(id, ReadConsistency::Strong).await?;
            assert_eq!(doc.map(|d| d.version), Some(after), "{id} on {e}");
        }
    }
    // An atomic batch across the new shard boundary is refused, naming the problem.
    let batch = client.batch().put("users", "alice", &json!({})).put("users", "zed", &json!({})).commit().await;
    let message = format!("{batch:?}");
    assert!(message.contains("cross_shard_batch") || message.contains("one shard"), "{message}");

    // Merge the last two shards back into one.
    let status = client.cluster_status().await?;
    let mut by_start: Vec<_> = status.shards.iter().map(|s| (s.start_hex.clone(), s.id)).collect();
    by_start.sort();
    let (left, right) = (by_start[1].1, by_start[2].1);
    let mut before = BTreeMap::new();
    for id in ["bob", "mallory", "zed"] {
        let doc: Option<Document<Value>> = users.get_with(id, ReadConsistency::Strong).await?;
        before.insert(id, doc.map(|d| d.version).unwrap_or_default());
    }
    let ctl = std::process::Command::new(floe_bin()?)
        .args(["ctl", "--endpoints", &endpoints.join(","), "merge", &left.to_string(), &right.to_string()])
        .output()
        .context("floe ctl merge")?;
    let out = String::from_utf8_lossy(&ctl.stdout);
    assert!(ctl.status.success(), "{out}{}", String::from_utf8_lossy(&ctl.stderr));
    assert!(out.contains(&format!("merged {left} and {right} into shard")), "{out}");
    let shards_now = shards(&client).await?;
    assert_eq!(shards_now.len(), 2, "three shards became two: {shards_now:?}");
    assert!(!shards_now.iter().any(|(id, _)| *id == left || *id == right), "the parts are gone: {shards_now:?}");
    for (id, v) in &before {
        let doc: Option<Document<Value>> = users.get_with(id, ReadConsistency::Strong).await?;
        assert_eq!(doc.map(|d| d.version), Some(*v), "{id} kept its version across the merge");
        let after = users.put(id, &json!({ "merged": true })).await?.version;
        assert!(after > *v, "{id}: version {after} after the merge, {v} before");
    }
    // Both former parts' documents now commit together.
    client.batch().put("users", "bob", &json!({})).put("users", "zed", &json!({})).commit().await?;
    Ok(())
}

/// A cluster of `nodes` started with `args`, with documents `a`..`f` in collection `users`,
/// split so each is the first document of its own shard.
async fn six_shards(nodes: usize, args: &[&str]) -> anyhow::Result<(Cluster, Client, [&'static str; 6])> {
    let cluster = Cluster::start_with_args(nodes, args).await.context("start cluster")?;
    let client = client_for(&cluster.grpc_endpoints())?;
    ensure_collection(&client, "users").await?;
    let users = client.collection("users");
    let ids = ["a", "b", "c", "d", "e", "f"];
    for id in ids {
        users.put(id, &json!({ "id": id })).await?;
    }
    client.split_at("users", &ids[1..]).await.context("split into six shards")?;
    Ok((cluster, client, ids))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_nodes_hibernated_shards_elect_a_new_leader_before_any_request() {
    bounded(peer_failure_wakes()).await;
}

/// Six shards hibernate; the node that led most of them is killed. Without any request to
/// those shards, the surviving nodes wake them (the meta leader announces the failure) and
/// elect new leaders; the shards the failed node did not lead sleep on; then every document
/// reads back strongly through a survivor.
async fn peer_failure_wakes() -> anyhow::Result<()> {
    let args = ["--split-qps", "0", "--merge-qps", "0", "--balance-band", "0", "--hibernate-after", "2s"];
    let (mut cluster, client, ids) = six_shards(3, &args).await?;
    let endpoints = cluster.grpc_endpoints();

    // Every shard hibernates; pick the node that led most of them.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = client.cluster_status().await?;
        if status.shards.iter().all(|s| s.state == "hibernating") {
            break status;
        }
        if Instant::now() > deadline {
            bail!("shards still active 30 s after the writes: {:?}\n{}", status.shards, cluster.log_tails());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut led: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for s in &status.shards {
        led.entry(s.leader).or_default().push(s.id);
    }
    let (victim, victim_led) =
        led.iter().max_by_key(|(_, shards)| shards.len()).map(|(n, s)| (*n, s.clone())).context("no shard")?;
    if victim == 0 {
        bail!("hibernated shards show no leader: {:?}", status.shards);
    }
    let survivor = (1..=3).find(|n| *n != victim).context("no survivor")?;
    let survivor_endpoint = &endpoints[survivor as usize - 1];
    let pinned = client_for(std::slice::from_ref(survivor_endpoint))?;
    cluster.node_mut(victim)?.process.kill9()?;
    let killed = Instant::now();

    // No request touches the shards: only the failure announcement can wake them.
    let deadline = killed + Duration::from_secs(40);
    loop {
        let status = pinned.cluster_status().await;
        let woken = status.as_ref().is_ok_and(|st| {
            victim_led.iter().all(|id| {
                st.shards.iter().any(|s| s.id == *id && s.state == "active" && s.leader != 0 && s.leader != victim)
            })
        });
        if woken {
            let st = status?;
            let asleep: Vec<u64> = st
                .shards
                .iter()
                .filter(|s| !victim_led.contains(&s.id) && s.state != "hibernating")
                .map(|s| s.id)
                .collect();
            assert!(asleep.is_empty(), "shards node {victim} did not lead woke too: {asleep:?}");
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "shards {victim_led:?} led by killed node {victim} had no new leader 40 s later: {status:?}\n{}",
                cluster.log_tails()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "node {victim} killed; the {} shards it led had new leaders {} ms later, before any request",
        victim_led.len(),
        killed.elapsed().as_millis()
    );
    let metrics = floe_tests::http_client()
        .get(cluster.node_mut(survivor)?.process.http_url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let wakes: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("floe_peer_down_wakes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(wakes >= 1, "floe_peer_down_wakes_total on node {survivor} is {wakes}");

    for id in ids {
        let started = Instant::now();
        let doc: Option<Document<Value>> = pinned.collection("users").get_with(id, ReadConsistency::Strong).await?;
        assert_eq!(doc.map(|d| d.value["id"].clone()), Some(json!(id)), "{id} reads back");
        let ms = started.elapsed().as_millis();
        assert!(ms < 2_000, "a strong read of {id} took {ms} ms after the shards woke");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_nodes_replicas_are_re_created_on_the_other_nodes() {
    bounded(dead_node_re_replication()).await;
}

/// Four nodes, six shards on nodes 1-3 (a replication factor of 3), all hibernating. Node 3 is
/// killed and stays down past `--dead-after`: the placement driver re-creates each of its
/// replicas on node 4 (the only live node without one), waking the shards node 3 only
/// followed too. Every document then reads back strongly and takes a write with node 3 still
/// down, and still does with node 1 down as well (nodes 2 and 4 are a quorum of every shard).
async fn dead_node_re_replication() -> anyhow::Result<()> {
    let args = [
        "--split-qps",
        "0",
        "--merge-qps",
        "0",
        "--balance-band",
        "0",
        "--hibernate-after",
        "2s",
        "--dead-after",
        "6s",
    ];
    let (mut cluster, client, ids) = six_shards(4, &args).await?;
    let endpoints = cluster.grpc_endpoints();
    let on = |replicas: &[u64]| {
        let mut r = replicas.to_vec();
        r.sort_unstable();
        r
    };
    // The children's replica lists reach the catalog with their leaders' reports.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status = client.cluster_status().await?;
        if status.shards.len() == ids.len() && status.shards.iter().all(|s| on(&s.replicas) == vec![1, 2, 3]) {
            break status;
        }
        if Instant::now() > deadline {
            bail!("the six shards are not listed on nodes 1-3: {:?}", status.shards);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let shard_ids: Vec<u64> = status.shards.iter().map(|s| s.id).collect();
    // Let the shards fall asleep: the ones node 3 only followed then have nobody awake to
    // notice it is gone.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let victim = 3;
    cluster.node_mut(victim)?.process.kill9()?;
    let killed = Instant::now();
    let survivors: Vec<String> = [1u64, 2, 4].iter().map(|n| endpoints[*n as usize - 1].clone()).collect();
    let pinned = client_for(&survivors)?;
    let deadline = killed + Duration::from_secs(90);
    loop {
        let status = pinned.cluster_status().await;
        let moved = status.as_ref().is_ok_and(|st| {
            st.shards.len() == shard_ids.len() && st.shards.iter().all(|s| on(&s.replicas) == vec![1, 2, 4])
        });
        if moved {
            break;
        }
        if Instant::now() > deadline {
            bail!("node {victim}'s replicas not re-created 90 s after it died: {status:?}\n{}", cluster.log_tails());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "node {victim} killed; all {} shards had replicas on nodes 1, 2, 4 {} ms later (dead after 6 s)",
        shard_ids.len(),
        killed.elapsed().as_millis()
    );
    // Whichever node led the meta group ran the moves.
    let mut re_replicated = 0u64;
    for node in [1u64, 2, 4] {
        let url = cluster.node_mut(node)?.process.http_url("/metrics");
        let metrics = floe_tests::http_client().get(url).send().await?.text().await?;
        let ok = "floe_placement_operations_total{kind=\"move\",reason=\"re-replicate\",outcome=\"ok\"} ";
        re_replicated += metrics.lines().filter_map(|l| l.strip_prefix(ok)?.trim().parse::<u64>().ok()).sum::<u64>();
    }
    assert!(re_replicated >= shard_ids.len() as u64, "re-replication moves counted: {re_replicated}");

    // Node 3 still down: each shard has its three replicas on the live nodes.
    for id in ids {
        let doc: Option<Document<Value>> = pinned.collection("users").get_with(id, ReadConsistency::Strong).await?;
        assert_eq!(doc.map(|d| d.value["id"].clone()), Some(json!(id)), "{id} reads back");
        pinned.collection("users").put(id, &json!({ "id": id, "after": true })).await?;
    }
    // Only nodes 1, 2 and 4 hold a shard now: stopping node 1 too leaves two of three.
    cluster.node_mut(1)?.process.kill9()?;
    let two = client_for(&[endpoints[1].clone(), endpoints[3].clone()])?;
    for id in ids {
        let doc: Option<Document<Value>> = two.collection("users").get_with(id, ReadConsistency::Strong).await?;
        assert_eq!(doc.map(|d| d.value["after"].clone()), Some(json!(true)), "{id} reads its last write");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn waking_a_hibernated_shard_does_not_resend_its_log() {
    bounded(wake_without_resend()).await;
}

/// Payload bytes the cluster's nodes have sent each other so far.
async fn bytes_sent(cluster: &mut Cluster) -> anyhow::Result<u64> {
    let mut total = 0;
    for node in 1..=3u64 {
        let url = cluster.node_mut(node)?.process.http_url("/metrics");
        let metrics = floe_tests::http_client().get(url).send().await?.text().await?;
        total += metrics
            .lines()
            .find_map(|l| l.strip_prefix("floe_raft_bytes_sent_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .context("no floe_raft_bytes_sent_total")?;
    }
    Ok(total)
}

/// One shard takes ~2 MiB of writes (its log keeps them: no snapshot yet) and hibernates.
/// Waking it with a read costs a few messages, not its log again: a woken leader does not
/// know how far its followers' logs reach, and openraft 0.9 finds out by sending entries
/// from halfway through its log (~1 MiB to each follower here) unless the follower is asked
/// first whether it holds them (`raft::network`).
async fn wake_without_resend() -> anyhow::Result<()> {
    let args = ["--split-qps", "0", "--merge-qps", "0", "--balance-band", "0", "--hibernate-after", "2s"];
    let mut cluster = Cluster::start_with_args(3, &args).await.context("start cluster")?;
    let endpoints = cluster.grpc_endpoints();
    let client = client_for(&endpoints)?;
    ensure_collection(&client, "big").await?;
    let big = client.collection("big");
    let filler = "x".repeat(16 << 10);
    const DOCS: usize = 128;
    for i in 0..DOCS {
        big.put(&format!("d{i:03}"), &json!({ "i": i, "filler": filler })).await?;
    }
    let log_bytes = (DOCS * filler.len()) as u64;

    let deadline = Instant::now() + Duration::from_secs(30);
    while !client.cluster_status().await?.shards.iter().all(|s| s.state == "hibernating") {
        if Instant::now() > deadline {
            bail!("shards still active 30 s after the writes\n{}", cluster.log_tails());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let before = bytes_sent(&mut cluster).await?;
    let doc: Option<Document<Value>> = big.get_with("d007", ReadConsistency::Strong).await?;
    assert_eq!(doc.map(|d| d.value["i"].clone()), Some(json!(7)));
    big.put("d007", &json!({ "i": 7, "woken": true })).await?;
    // Replication to both followers settles well within this.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = bytes_sent(&mut cluster).await? - before;
    eprintln!("wake, read and one write of a shard with a {log_bytes} B log: {sent} B sent between nodes");
    assert!(sent < log_bytes / 8, "waking sent {sent} B (the log holds {log_bytes} B)");
    Ok(())
}
