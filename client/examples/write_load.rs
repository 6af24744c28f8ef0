//! A quick closed-loop load generator (until `floe bench` exists): N clients, each keeping
//! one request in flight, for a fixed time; prints ops/s and latency percentiles.
//!
//! `cargo run -p floe-client --example write_load -- ENDPOINTS CLIENTS SECONDS [put|get|get-eventual] [VALUE_BYTES]`
//! e.g. `... -- 127.0.0.1:7700,127.0.0.1:7710,127.0.0.1:7720 64 10 put 256`.
//! Client j connects to endpoint j mod (number of endpoints); keys k00000000..k00009999.

use floe_client::{Client, ReadConsistency};
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let endpoints: Vec<String> = args.get(1).map(|s| s.split(',').map(String::from).collect()).unwrap_or_default();
    anyhow::ensure!(
        !endpoints.is_empty(),
        "usage: write_load ENDPOINTS CLIENTS SECONDS [put|get|get-eventual] [VALUE_BYTES]"
    );
    let clients: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let seconds: u64 = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(10);
    let op = args.get(4).cloned().unwrap_or_else(|| "put".into());
    let value_bytes: usize = args.get(5).map(|s| s.parse()).transpose()?.unwrap_or(256);
    let keys = 10_000u64;
    let value = serde_json::json!({ "v": "x".repeat(value_bytes) });

    let setup = Client::connect(endpoints.clone()).await?;
    let _ = setup.create_collection("bench").await;
    if op != "put" {
        let coll = setup.collection("bench");
        for k in 0..keys.min(2_000) {
            coll.put(&format!("k{k:08}"), &value).await?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for j in 0..clients {
        let endpoint = endpoints[j % endpoints.len()].clone();
        let op = op.clone();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let client = Client::connect([endpoint]).await?;
            let coll = client.collection("bench");
            let mut lat_us = Vec::new();
            let mut errors = 0u64;
            let mut i = j as u64;
            while Instant::now() < deadline {
                i = i.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let key = format!("k{:08}", (i >> 33) % if op == "put" { keys } else { keys.min(2_000) });
                let t = Instant::now();
                let ok = match op.as_str() {
                    "put" => coll.put(&key, &value).await.is_ok(),
                    "get" => coll.get_with::<serde_json::Value>(&key, ReadConsistency::Strong).await.is_ok(),
                    _ => coll.get_with::<serde_json::Value>(&key, ReadConsistency::Eventual).await.is_ok(),
                };
                if ok {
                    lat_us.push(t.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                }
            }
            anyhow::Ok((lat_us, errors))
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await??;
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64().max(seconds as f64);
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0) as f64
            / 1000.0
    };
    println!(
        "op={op} clients={clients} ops={} errors={errors} ops/s={:.0} p50={:.2}ms p90={:.2}ms p99={:.2}ms p99.9={:.2}ms",
        all.len(),
        all.len() as f64 / elapsed,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999)
    );
    Ok(())
}
