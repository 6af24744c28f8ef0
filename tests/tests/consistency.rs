//! Read consistency levels across real processes (issue 4, "done means"):
//! - a SESSION read through a different node than the write sees the write (explicit token,
//!   and a second client that adopted the writer's session);
//! - a BOUNDED_STALENESS read on a follower that was cut off (SIGSTOP) for longer than the
//!   bound, while the others kept writing, is refused or fresh, never stale.
//!
//! Needs the `floe` binary (see `floe_tests::floe_bin`). Bounded by `TEST_TIMEOUT`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use floe_client::{Client, Document, ReadConsistency, RetryPolicy};
use floe_tests::{client_for, ensure_collection, Cluster};
use serde_json::{json, Value};

const TEST_TIMEOUT: Duration = Duration::from_secs(120);
const COLLECTION: &str = "consistency";

/// A client that only ever talks to `endpoint` (reads are served there, never elsewhere).
fn pinned(endpoint: &str) -> anyhow::Result<Client> {
    Ok(Client::builder()
        .endpoint(endpoint.to_string())
        .connect_timeout(Duration::from_secs(1))
        .request_timeout(Duration::from_secs(5))
        .retry_policy(RetryPolicy {
            attempts_max: 1,
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(10),
        })
        .build()?)
}

async fn bounded(body: impl std::future::Future<Output = anyhow::Result<()>>) {
    match tokio::time::timeout(TEST_TIMEOUT, body).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => panic!("{error:?}"),
        Err(_) => panic!("test exceeded {} s", TEST_TIMEOUT.as_secs()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_reads_through_another_node_see_the_write() {
    bounded(session_reads()).await;
}

async fn session_reads() -> anyhow::Result<()> {
    let cluster = Cluster::start(3).await.context("start cluster")?;
    let endpoints = cluster.grpc_endpoints();
    ensure_collection(&client_for(&endpoints)?, COLLECTION).await?;
    let per_node: Vec<Client> = endpoints.iter().map(|e| pinned(e)).collect::<anyhow::Result<_>>()?;
    for i in 0..90usize {
        let writer = &client_for(&endpoints[i % 3..=i % 3])?;
        let reader = &per_node[(i + 1) % 3];
        let id = format!("s{}", i % 7);
        let outcome = writer.collection(COLLECTION).put(&id, &json!({ "i": i })).await.context("put")?;
        // Explicit token from the write, read on another node.
        let read: Option<Document<Value>> = reader
            .collection(COLLECTION)
            .get_with(&id, ReadConsistency::Session(outcome.session_token.clone()))
            .await
            .with_context(|| format!("session read of {id} on node {}", (i + 1) % 3 + 1))?;
        let read = read.with_context(|| format!("{id} absent after its acknowledged write"))?;
        if read.version < outcome.version || read.value["i"] != json!(i) {
            bail!(
                "session read on another node went behind the write: wrote {id} v{} (i={i}), read v{} {}",
                outcome.version,
                read.version,
                read.value
            );
        }
        // A third client adopting the writer's session sees it with its default reads.
        let adopter = pinned(&endpoints[(i + 2) % 3])?;
        adopter.observe_session_token(&writer.session_token());
        let seen: Option<Document<Value>> = adopter.collection(COLLECTION).get(&id).await.context("default read")?;
        let seen = seen.with_context(|| format!("{id} absent for the adopting client"))?;
        if seen.version < outcome.version {
            bail!("read-your-writes client behind the adopted session: v{} < v{}", seen.version, outcome.version);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bounded_reads_on_a_cut_off_follower_are_never_stale() {
    bounded(bounded_reads()).await;
}

async fn bounded_reads() -> anyhow::Result<()> {
    const BOUND: Duration = Duration::from_millis(300);
    let mut cluster = Cluster::start(3).await.context("start cluster")?;
    let endpoints = cluster.grpc_endpoints();
    let client = client_for(&endpoints)?;
    ensure_collection(&client, COLLECTION).await?;
    client.collection(COLLECTION).put("b", &json!({ "n": 0 })).await.context("first put")?;
    let (mut refused, mut fresh, mut stale_eventual) = (0, 0, 0);
    for round in 0..3 {
        let status = client.cluster_status().await.context("status")?;
        let leader = status.shards.first().map(|s| s.leader).filter(|l| *l != 0).context("no shard leader")?;
        let follower = (1..=3u64).find(|n| *n != leader).context("no follower")?;
        let others: Vec<String> =
            cluster.nodes.iter().filter(|n| n.node_id != follower).map(|n| n.process.grpc_endpoint()).collect();
        let follower_endpoint = cluster.node_mut(follower)?.process.grpc_endpoint();
        // A bounded read before the cut gives the follower a fresh proof it must not reuse later.
        let reader = pinned(&follower_endpoint)?;
        reader.collection(COLLECTION).get_with::<Value>("b", ReadConsistency::BoundedStaleness(BOUND)).await?;

        cluster.node_mut(follower)?.process.pause()?;
        let writer = client_for(&others)?;
        let mut last = 0;
        for n in 1..=10 {
            let outcome = writer.collection(COLLECTION).put("b", &json!({ "round": round, "n": n })).await?;
            last = outcome.version;
        }
        let last_ack = Instant::now();
        tokio::time::sleep(BOUND + Duration::from_millis(150)).await;
        cluster.node_mut(follower)?.process.resume()?;
        let started = Instant::now();
        let eventual = pinned(&follower_endpoint)?;
        let (bounded_docs, eventual_docs) = (reader.collection(COLLECTION), eventual.collection(COLLECTION));
        let (bounded_read, eventual_read) = tokio::join!(
            bounded_docs.get_with::<Value>("b", ReadConsistency::BoundedStaleness(BOUND)),
            eventual_docs.get_with::<Value>("b", ReadConsistency::Eventual),
        );
        assert!(started.duration_since(last_ack) > BOUND, "the test must read after the bound passed");
        match bounded_read {
            Ok(Some(doc)) if doc.version >= last => fresh += 1,
            Ok(other) => bail!(
                "round {round}: bounded read on follower {follower} returned {:?}, but v{last} was acknowledged {} ms earlier (bound {} ms)",
                other.map(|d| d.version),
                started.duration_since(last_ack).as_millis(),
                BOUND.as_millis()
            ),
            Err(error) if error.is_retryable() => refused += 1,
            Err(error) => bail!("round {round}: bounded read failed with a non-retryable error: {error}"),
        }
        if let Ok(Some(doc)) = eventual_read {
            if doc.version < last {
                stale_eventual += 1;
            }
        }
    }
    eprintln!("bounded reads: {fresh} fresh, {refused} refused; eventual reads behind: {stale_eventual} of 3");
    Ok(())
}
