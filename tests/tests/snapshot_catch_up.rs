//! Proves a follower that was down while the leader compacted its log catches up by
//! installing a snapshot streamed over the network, and then serves every write.
//!
//! Three `floe start` processes with a tiny snapshot interval (`--snapshot-count 50`,
//! `--snapshot-keep-logs 5`); node 3 is killed with SIGKILL, 300 documents are written, node 3
//! is restarted. The entries it missed are gone from every log, so only a snapshot can bring
//! it up to date: the test asserts its `floe_raft_snapshot_index` for the shard is non-zero and
//! that EVENTUAL reads on node 3 alone return every document.

use anyhow::{bail, Context};
use floe_client::ReadConsistency;
use floe_tests::{client_for, ensure_collection, http_client, Cluster};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const DOCUMENTS: u64 = 300;
const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(45);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_by_snapshot() {
    match tokio::time::timeout(TEST_TIMEOUT, run()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => panic!("{error:?}"),
        Err(_) => panic!("test exceeded {} s", TEST_TIMEOUT.as_secs()),
    }
}

/// The value of a gauge with `group="<group>"` in Prometheus text.
fn gauge(metrics: &str, name: &str, group: u64) -> Option<u64> {
    let prefix = format!("{name}{{group=\"{group}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

async fn run() -> anyhow::Result<()> {
    let mut cluster = Cluster::start_with_args(3, &["--snapshot-count", "50", "--snapshot-keep-logs", "5"]).await?;
    let client = client_for(&cluster.grpc_endpoints()[..2])?;
    ensure_collection(&client, "snap").await?;
    cluster.node_mut(3)?.process.kill9()?;

    let docs = client.collection("snap");
    for i in 0..DOCUMENTS {
        docs.put(&format!("d{i:04}"), &json!({ "i": i })).await.with_context(|| format!("write d{i:04}"))?;
    }

    let node3 = cluster.node_mut(3)?;
    node3.process.restart()?;
    node3.process.wait_ready(Duration::from_secs(30)).await?;
    let metrics_url = node3.process.http_url("/metrics");
    let only_node3 = client_for(&[node3.process.grpc_endpoint()])?;
    let docs3 = only_node3.collection("snap");
    let http = http_client();
    let deadline = Instant::now() + CATCH_UP_TIMEOUT;
    loop {
        let last = docs3.get_with::<Value>(&format!("d{:04}", DOCUMENTS - 1), ReadConsistency::Eventual).await;
        if matches!(last, Ok(Some(_))) {
            break;
        }
        if Instant::now() > deadline {
            bail!("node 3 did not catch up within {CATCH_UP_TIMEOUT:?}: last read {last:?}\n{}", cluster.log_tails());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..DOCUMENTS {
        let got = docs3.get_with::<Value>(&format!("d{i:04}"), ReadConsistency::Eventual).await?;
        match got {
            Some(doc) if doc.value == json!({ "i": i }) => {}
            other => bail!("node 3 serves d{i:04} as {other:?}"),
        }
    }
    let metrics = http.get(&metrics_url).send().await?.text().await?;
    let snapshot_index = gauge(&metrics, "floe_raft_snapshot_index", 1).unwrap_or(0);
    if snapshot_index == 0 {
        bail!("node 3 caught up without installing a snapshot of shard 1:\n{metrics}");
    }
    Ok(())
}
