//! The preload phase: makes every key `k0 .. k{N-1}` of collection `bench` hold the run's
//! value before a workload with gets is measured (`shared/BENCH.md`, "preload").
//!
//! Owns: the decision (`--preload auto|always|never`), the check whether the keys already
//! exist (key 0 holds a value of this size and batch gets find all N), and the writes: 64
//! blind puts per atomic batch, batch b on connection b mod conns, at most
//! `BATCHES_IN_FLIGHT_MAX` batches in flight.
//!
//! Bounds: the whole phase, check included, runs under `--preload-timeout`; each batch is
//! tried at most `BATCH_ATTEMPTS_MAX` times. Re-sending a batch whose outcome is unknown is
//! safe because every op is a blind put of the same value.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use floe_client::{Client, Error as ClientError, ReadConsistency};
use futures::stream::{self, StreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde::de::IgnoredAny;
use serde_json::Value;

use super::keys::key_name;
use super::report::PreloadReport;
use super::{BenchConfig, BenchDoc, PreloadMode, COLLECTION};

/// Puts per atomic batch (BENCH.md).
pub const BATCH_PUTS: u64 = 64;
/// Preload batches in flight at once, over all connections.
const BATCHES_IN_FLIGHT_MAX: usize = 16;
/// Attempts per batch on retryable errors.
const BATCH_ATTEMPTS_MAX: u32 = 10;
/// Pause between attempts of one batch.
const BATCH_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Batch gets in flight while checking for existing keys.
const CHECKS_IN_FLIGHT_MAX: usize = 8;
/// Rough bound on the bytes of one batch-get answer while checking (ids per call shrink as
/// values grow).
const CHECK_RESPONSE_BYTES: usize = 8 << 20;
/// Ids per batch get (the server's default limit is 1000).
const CHECK_IDS_MAX: usize = 500;

/// What the preload did, and the session token of its last write (for `--consistency session`).
#[derive(Debug, Default)]
pub struct PreloadOutcome {
    pub report: PreloadReport,
    pub session_token: String,
}

/// Runs the preload phase per `config.preload`. Fails if it does not finish within
/// `config.preload_timeout_s`.
pub async fn run(config: &BenchConfig, conns: &[Client], value: &str) -> Result<PreloadOutcome> {
    let started = Instant::now();
    let skipped = |reason: &str| PreloadOutcome {
        report: PreloadReport { performed: false, reason: reason.to_owned(), ..Default::default() },
        session_token: String::new(),
    };
    match config.preload {
        PreloadMode::Never => return Ok(skipped("--preload never")),
        PreloadMode::Auto if !config.workload.has_gets() => return Ok(skipped("the workload has no gets")),
        PreloadMode::Auto | PreloadMode::Always => {}
    }
    let timeout = Duration::from_secs_f64(config.preload_timeout_s);
    let written = Arc::new(AtomicU64::new(0));
    let phase = async {
        if config.preload == PreloadMode::Auto && all_keys_exist(config, conns).await? {
            return Ok::<_, anyhow::Error>(skipped(&format!(
                "all {} keys exist and key 0 holds {} letters",
                config.keys, config.value_size
            )));
        }
        let reason =
            if config.preload == PreloadMode::Always { "--preload always" } else { "keys missing or of another size" };
        let (batches, session_token) = write_all(config, conns, value, &written).await?;
        Ok::<_, anyhow::Error>(PreloadOutcome {
            report: PreloadReport {
                performed: true,
                reason: reason.to_owned(),
                keys: config.keys,
                batches,
                ..Default::default()
            },
            session_token,
        })
    };
    let mut outcome = match tokio::time::timeout(timeout, phase).await {
        Ok(result) => result?,
        Err(_elapsed) => bail!(
            "preload did not finish within --preload-timeout {:.0} s ({} of {} keys written); \
             raise --preload-timeout, lower --keys, or check the cluster",
            config.preload_timeout_s,
            written.load(Ordering::Relaxed),
            config.keys
        ),
    };
    let elapsed_s = started.elapsed().as_secs_f64();
    outcome.report.elapsed_s = elapsed_s;
    if outcome.report.performed && elapsed_s > 0.0 {
        outcome.report.keys_per_s = config.keys as f64 / elapsed_s;
    }
    Ok(outcome)
}

/// True when key 0 holds a value of the configured size and every key exists.
async fn all_keys_exist(config: &BenchConfig, conns: &[Client]) -> Result<bool> {
    let first = conns.first().ok_or_else(|| anyhow!("no connections"))?;
    let collection = first.collection(COLLECTION);
    let key_0 = match collection.get_with::<Value>(&key_name(0), ReadConsistency::Strong).await {
        Ok(document) => document,
        Err(ClientError::NotFound { .. }) => return Ok(false), // collection_not_found
        Err(error) => return Err(error).context("checking whether the keys are already loaded"),
    };
    let size_matches = key_0
        .as_ref()
        .and_then(|document| document.value.get("v"))
        .and_then(Value::as_str)
        .is_some_and(|letters| letters.len() == config.value_size);
    if !size_matches {
        return Ok(false);
    }
    let ids_per_call = (CHECK_RESPONSE_BYTES / (config.value_size + 64)).clamp(1, CHECK_IDS_MAX) as u64;
    let calls = config.keys.div_ceil(ids_per_call);
    let mut checks = stream::iter(0..calls)
        .map(|call| {
            let collection = conns[(call % conns.len() as u64) as usize].collection(COLLECTION);
            let ids: Vec<String> =
                (call * ids_per_call..((call + 1) * ids_per_call).min(config.keys)).map(key_name).collect();
            async move {
                let documents = collection
                    .batch_get::<IgnoredAny, _, _>(ids, ReadConsistency::Strong)
                    .await
                    .context("checking whether the keys are already loaded")?;
                Ok::<bool, anyhow::Error>(documents.iter().all(Option::is_some))
            }
        })
        .buffer_unordered(CHECKS_IN_FLIGHT_MAX);
    while let Some(all_found) = checks.next().await {
        if !all_found? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Writes every key; returns the number of batches and the session token of the write with
/// the highest version.
async fn write_all(config: &BenchConfig, conns: &[Client], value: &str, written: &AtomicU64) -> Result<(u64, String)> {
    let batches = config.keys.div_ceil(BATCH_PUTS);
    let bar = ProgressBar::new(config.keys).with_style(
        ProgressStyle::with_template("preload [{elapsed_precise}] [{bar:30}] {pos}/{len} keys ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let document = BenchDoc { v: value };
    let mut writes = stream::iter(0..batches)
        .map(|batch_index| {
            let client = &conns[(batch_index % conns.len() as u64) as usize];
            let first = batch_index * BATCH_PUTS;
            let end = (first + BATCH_PUTS).min(config.keys);
            let batch =
                (first..end).fold(client.batch(), |batch, key| batch.put(COLLECTION, &key_name(key), &document));
            async move {
                let mut attempt = 1;
                loop {
                    match batch.clone().commit().await {
                        Ok(outcomes) => {
                            let last = outcomes.into_iter().max_by_key(|outcome| outcome.version);
                            return Ok::<_, anyhow::Error>((end - first, last));
                        }
                        Err(error) if error.is_retryable() && attempt < BATCH_ATTEMPTS_MAX => {
                            tracing::debug!(batch_index, attempt, %error, "preload batch failed, retrying");
                            attempt += 1;
                            tokio::time::sleep(BATCH_RETRY_PAUSE).await;
                        }
                        Err(error) => {
                            return Err(anyhow!(error)).with_context(|| {
                                format!(
                                    "preload batch of keys {}..{} failed after {attempt} attempt(s)",
                                    key_name(first),
                                    key_name(end - 1)
                                )
                            })
                        }
                    }
                }
            }
        })
        .buffer_unordered(BATCHES_IN_FLIGHT_MAX);
    let mut latest: Option<(u64, String)> = None;
    while let Some(result) = writes.next().await {
        let (keys, last) = match result {
            Ok(done) => done,
            Err(error) => {
                bar.abandon();
                return Err(error);
            }
        };
        written.fetch_add(keys, Ordering::Relaxed);
        bar.inc(keys);
        if let Some(outcome) = last {
            if latest.as_ref().is_none_or(|(version, _)| outcome.version > *version) {
                latest = Some((outcome.version, outcome.session_token));
            }
        }
    }
    bar.finish_and_clear();
    Ok((batches, latest.map(|(_, token)| token).unwrap_or_default()))
}
