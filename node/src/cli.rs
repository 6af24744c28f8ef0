//! The `floe` command line: `dev`, `start`, `doc`, `bench` and `ctl` (in `ctl.rs`). Every flag is also an `FLOE_*`
//! environment variable. Binary-only code: errors are `anyhow`.

use crate::docs::Limits;
use crate::placement::PlacementConfig;
use crate::raft::host::RaftTuning;
use crate::server::{self, NodeConfig, RunningNode};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use floe_proto::v1 as pb;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "floe", version, about = "Floe: a Raft-replicated, serverless JSON document store")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Commands,
    /// Log format.
    #[arg(long, global = true, env = "FLOE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info,floe_node=debug`).
    #[arg(long, global = true, env = "FLOE_LOG", default_value = "info,openraft=warn")]
    pub log: String,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Commands {
    /// Start a local cluster in this process on the embedded default (one node unless --nodes).
    Dev(DevArgs),
    /// Start one node of a real cluster.
    Start(StartArgs),
    /// Read and write documents from the shell.
    #[command(subcommand)]
    Doc(DocCommand),
    /// Measure a running cluster with YCSB-style workloads (see shared/BENCH.md).
    Bench(crate::bench::BenchArgs),
    /// Operate a running cluster: status, add and remove nodes.
    Ctl(crate::ctl::CtlArgs),
}

/// Thresholds of the elastic behaviour, shared by `dev` and `start`.
#[derive(Args, Debug, Clone)]
pub struct ElasticArgs {
    /// Split a shard whose request rate stays above this many requests/s (0: never by load).
    #[arg(long, env = "FLOE_SPLIT_QPS", default_value_t = PlacementConfig::default().split_qps)]
    pub split_qps: f64,
    /// Split a shard holding more than this many bytes of documents (0: never by size).
    #[arg(long, env = "FLOE_SPLIT_BYTES", default_value_t = PlacementConfig::default().split_bytes)]
    pub split_bytes: u64,
    /// Merge adjacent shards each below this many requests/s (0: never merge).
    #[arg(long, env = "FLOE_MERGE_QPS", default_value_t = PlacementConfig::default().merge_qps)]
    pub merge_qps: f64,
    /// ...when together they hold fewer than this many bytes.
    #[arg(long, env = "FLOE_MERGE_BYTES", default_value_t = PlacementConfig::default().merge_bytes)]
    pub merge_bytes: u64,
    /// A shard is neither split nor merged again for this long after its range changed.
    #[arg(long, env = "FLOE_SPLIT_COOLDOWN", default_value = "30s", value_parser = parse_duration)]
    pub split_cooldown: Duration,
    /// Replicas per shard that node joins and removals keep (the replication factor).
    #[arg(long, env = "FLOE_REPLICAS", default_value_t = PlacementConfig::default().replicas)]
    pub replicas: usize,
    /// Replicas (and, separately, shard leaders) per node may differ by this many between
    /// the fullest and the emptiest node before the placement driver moves one (0: never).
    #[arg(long, env = "FLOE_BALANCE_BAND", default_value_t = PlacementConfig::default().balance_band)]
    pub balance_band: usize,
    /// A node that has not reported to the meta leader for this long is dead: the placement
    /// driver re-creates its replicas on other nodes (when there is one without a replica);
    /// `off` never does (remove the node with `floe ctl node remove ID` instead).
    #[arg(long, env = "FLOE_DEAD_AFTER", default_value = "5m", value_parser = parse_optional_duration)]
    pub dead_after: OptionalDuration,
    /// An idle shard hibernates (no messages, no CPU) after this long without requests;
    /// `off` never hibernates.
    #[arg(long, env = "FLOE_HIBERNATE_AFTER", default_value = "30s", value_parser = parse_optional_duration)]
    pub hibernate_after: OptionalDuration,
}

/// A duration that may be `off` (clap treats a bare `Option` field as an optional flag).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionalDuration(pub Option<Duration>);

impl ElasticArgs {
    pub fn placement(&self) -> PlacementConfig {
        PlacementConfig {
            split_qps: self.split_qps,
            split_bytes: self.split_bytes,
            merge_qps: self.merge_qps,
            merge_bytes: self.merge_bytes,
            cooldown: self.split_cooldown,
            replicas: self.replicas,
            balance_band: self.balance_band,
            dead_after: self.dead_after.0,
            ..PlacementConfig::default()
        }
    }
}

/// Parses `250ms`, `5s`, `2m`, `1h` (a bare number is seconds), as `floe bench` does.
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    crate::bench::parse_duration(text).map_err(|e| format!("{e:#}"))
}

/// Like `parse_duration`, and `off` (or `0`) for never.
pub fn parse_optional_duration(text: &str) -> std::result::Result<OptionalDuration, String> {
    match text.trim() {
        "off" | "never" => Ok(OptionalDuration(None)),
        other => parse_duration(other).map(|d| OptionalDuration((!d.is_zero()).then_some(d))),
    }
}

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Number of nodes (node k of N listens on 7700+10k / 7701+10k).
    #[arg(long, env = "FLOE_NODES", default_value_t = 1)]
    pub nodes: u64,
    /// Data directory (one subdirectory per node).
    #[arg(long, env = "FLOE_DATA", default_value = "./floe-data")]
    pub data: PathBuf,
    /// gRPC port of the first node.
    #[arg(long, env = "FLOE_GRPC_PORT", default_value_t = 7700)]
    pub grpc_port: u16,
    /// HTTP port of the first node (default: gRPC port + 1).
    #[arg(long, env = "FLOE_HTTP_PORT")]
    pub http_port: Option<u16>,
    #[command(flatten)]
    pub elastic: ElasticArgs,
}

#[derive(Args, Debug)]
pub struct StartArgs {
    /// This node's id (>= 1, never reused for another machine).
    #[arg(long, env = "FLOE_NODE_ID")]
    pub node_id: u64,
    /// gRPC listen and advertise address (host:port).
    #[arg(long, env = "FLOE_GRPC_ADDR")]
    pub grpc_addr: String,
    /// HTTP gateway listen address (host:port).
    #[arg(long, env = "FLOE_HTTP_ADDR")]
    pub http_addr: String,
    /// Data directory of this node.
    #[arg(long, env = "FLOE_DATA_DIR")]
    pub data_dir: PathBuf,
    /// All initial members as `id=host:port,...` (gRPC addresses), the same on every node.
    #[arg(long, env = "FLOE_INITIAL_CLUSTER", required_unless_present = "join", conflicts_with = "join")]
    pub initial_cluster: Option<String>,
    /// Join a running cluster through its members' gRPC addresses instead (host:port, comma
    /// separated; any one that answers will do): the node is added as a learner, catches up,
    /// and becomes a voter. Keep the flag on restarts (it re-confirms the membership).
    #[arg(long, env = "FLOE_JOIN")]
    pub join: Option<String>,
    /// Cluster name; nodes refuse raft messages from another cluster.
    #[arg(long, env = "FLOE_CLUSTER_ID", default_value = "floe")]
    pub cluster_id: String,
    /// Applied entries between snapshots of a group (etcd's --snapshot-count).
    #[arg(long, env = "FLOE_SNAPSHOT_COUNT", default_value_t = RaftTuning::default().snapshot_logs_since_last)]
    pub snapshot_count: u64,
    /// Log entries kept behind a snapshot for lagging followers.
    #[arg(long, env = "FLOE_SNAPSHOT_KEEP_LOGS", default_value_t = RaftTuning::default().logs_kept_after_snapshot)]
    pub snapshot_keep_logs: u64,
    #[command(flatten)]
    pub elastic: ElasticArgs,
}

#[derive(Subcommand, Debug)]
pub enum DocCommand {
    /// Print a document.
    Get {
        #[command(flatten)]
        target: DocTarget,
        /// strong or eventual.
        #[arg(long, default_value = "strong")]
        consistency: String,
    },
    /// Upsert a document (JSON object).
    Put {
        #[command(flatten)]
        target: DocTarget,
        json: String,
        /// Only replace this stored version.
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Apply an RFC 7396 merge patch (or an RFC 6902 JSON patch with --json-patch).
    Patch {
        #[command(flatten)]
        target: DocTarget,
        patch: String,
        #[arg(long)]
        json_patch: bool,
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Delete a document.
    Delete {
        #[command(flatten)]
        target: DocTarget,
        #[arg(long)]
        if_version: Option<u64>,
    },
}

#[derive(Args, Debug)]
pub struct DocTarget {
    /// gRPC endpoint of any node.
    #[arg(long, env = "FLOE_ENDPOINT", default_value = "127.0.0.1:7700")]
    pub endpoint: String,
    #[arg(long, env = "FLOE_TENANT", default_value = "")]
    pub tenant: String,
    pub collection: String,
    pub id: String,
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_initial_cluster(s: &str) -> Result<BTreeMap<u64, String>> {
    let mut out = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| anyhow!("{part:?} is not id=host:port"))?;
        let id: u64 = id.trim().parse().with_context(|| format!("node id in {part:?}"))?;
        if out.insert(id, addr.trim().to_string()).is_some() {
            bail!("node id {id} listed twice in --initial-cluster");
        }
    }
    if out.is_empty() {
        bail!("--initial-cluster is empty");
    }
    Ok(out)
}

/// Config of node `k` (1-based) of a `floe dev` cluster of `n` nodes.
pub fn dev_node_config(args: &DevArgs, k: u64) -> NodeConfig {
    let offset = 10 * (k - 1) as u16;
    let grpc = |i: u64| format!("127.0.0.1:{}", args.grpc_port + 10 * (i - 1) as u16);
    let http_base = args.http_port.unwrap_or(args.grpc_port + 1);
    NodeConfig {
        node_id: k,
        grpc_addr: grpc(k),
        http_addr: format!("127.0.0.1:{}", http_base + offset),
        data_dir: args.data.join(format!("node-{k}")),
        initial_cluster: (1..=args.nodes).map(|i| (i, grpc(i))).collect(),
        join: None,
        cluster_id: "floe-dev".into(),
        limits: Limits::default(),
        tuning: RaftTuning { hibernate_after: args.elastic.hibernate_after.0, ..RaftTuning::default() },
        placement: args.elastic.placement(),
    }
}

pub async fn run_dev(args: DevArgs) -> Result<()> {
    if args.nodes == 0 || args.nodes > 9 {
        bail!("--nodes must be between 1 and 9");
    }
    let mut nodes: Vec<RunningNode> = Vec::new();
    for k in 1..=args.nodes {
        let cfg = dev_node_config(&args, k);
        let node = server::start(cfg).await.with_context(|| format!("starting dev node {k}"))?;
        println!("floe dev: node {k} gRPC http://{}  HTTP http://{}", node.grpc_addr, node.http_addr);
        nodes.push(node);
    }
    println!("floe dev: data in {}; try:", args.data.display());
    if let Some(n) = nodes.first() {
        println!("  curl -X PUT http://{}/v1/collections/demo/docs/hello -d '{{\"msg\":\"hi\"}}'", n.http_addr);
        println!("  curl http://{}/v1/collections/demo/docs/hello", n.http_addr);
    }
    wait_for_signal().await;
    for n in nodes {
        n.shutdown().await;
    }
    Ok(())
}

pub async fn run_start(args: StartArgs) -> Result<()> {
    let cfg = NodeConfig {
        node_id: args.node_id,
        grpc_addr: args.grpc_addr,
        http_addr: args.http_addr,
        data_dir: args.data_dir,
        initial_cluster: match &args.initial_cluster {
            Some(list) => parse_initial_cluster(list)?,
            None => BTreeMap::new(),
        },
        join: args.join.clone(),
        cluster_id: args.cluster_id,
        limits: Limits::default(),
        tuning: RaftTuning {
            snapshot_logs_since_last: args.snapshot_count.max(1),
            logs_kept_after_snapshot: args.snapshot_keep_logs,
            hibernate_after: args.elastic.hibernate_after.0,
            ..RaftTuning::default()
        },
        placement: args.elastic.placement(),
    };
    let node = server::start(cfg).await?;
    println!("floe node {} gRPC {} HTTP {}", args.node_id, node.grpc_addr, node.http_addr);
    wait_for_signal().await;
    node.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    let code = s.metadata().get("floe-error-code").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    anyhow!("{} ({}): {}", code, s.code(), s.message())
}

pub async fn run_bench(args: crate::bench::BenchArgs) -> Result<()> {
    crate::bench::run(args).await
}

pub async fn run_doc(cmd: DocCommand) -> Result<()> {
    let target = match &cmd {
        DocCommand::Get { target, .. }
        | DocCommand::Put { target, .. }
        | DocCommand::Patch { target, .. }
        | DocCommand::Delete { target, .. } => target,
    };
    let uri = if target.endpoint.starts_with("http") {
        target.endpoint.clone()
    } else {
        format!("http://{}", target.endpoint)
    };
    let mut client = pb::documents_client::DocumentsClient::connect(uri.clone())
        .await
        .with_context(|| format!("connecting to {uri}"))?;
    let (tenant, collection, id) = (target.tenant.clone(), target.collection.clone(), target.id.clone());
    match cmd {
        DocCommand::Get { consistency, .. } => {
            let c = match consistency.as_str() {
                "strong" => pb::Consistency::Strong,
                "eventual" => pb::Consistency::Eventual,
                other => bail!("unknown consistency {other:?} (strong or eventual)"),
            };
            let read = Some(pb::ReadOptions { consistency: c as i32, ..Default::default() });
            let r =
                client.get(pb::GetRequest { tenant, collection, id, read }).await.map_err(status_error)?.into_inner();
            let d = r.document.ok_or_else(|| anyhow!("server returned no document"))?;
            println!("{}", d.json);
            eprintln!("version {}", d.version);
        }
        DocCommand::Put { json, if_version, .. } => {
            let r = client
                .put(pb::PutRequest { tenant, collection, id, json, expected_version: if_version.unwrap_or(0) })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("version {}", r.version);
        }
        DocCommand::Patch { patch, json_patch, if_version, .. } => {
            let format = if json_patch { pb::PatchFormat::JsonPatch } else { pb::PatchFormat::MergePatch };
            let r = client
                .patch(pb::PatchRequest {
                    tenant,
                    collection,
                    id,
                    format: format as i32,
                    patch_json: patch,
                    expected_version: if_version.unwrap_or(0),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", r.json);
            eprintln!("version {}", r.version);
        }
        DocCommand::Delete { if_version, .. } => {
            let r = client
                .delete(pb::DeleteRequest { tenant, collection, id, expected_version: if_version.unwrap_or(0) })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("deleted at version {}", r.version);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_cluster_parsing() {
        let m = parse_initial_cluster("1=127.0.0.1:7700, 2=127.0.0.1:7710").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[&2], "127.0.0.1:7710");
        assert!(parse_initial_cluster("1=a,1=b").is_err());
        assert!(parse_initial_cluster("x=a").is_err());
        assert!(parse_initial_cluster("").is_err());
    }

    #[test]
    fn dev_ports_follow_the_design() {
        let args = Cli::parse_from(["floe", "dev", "--nodes", "3", "--data", "d"]);
        let Commands::Dev(args) = args.command else { panic!("not dev") };
        let c2 = dev_node_config(&args, 2);
        assert_eq!(c2.grpc_addr, "127.0.0.1:7710");
        assert_eq!(c2.http_addr, "127.0.0.1:7711");
        assert_eq!(c2.initial_cluster.len(), 3);
    }

    #[test]
    fn durations_parse_or_name_the_problem() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(parse_optional_duration("off"), Ok(OptionalDuration(None)));
        assert_eq!(parse_optional_duration("0s"), Ok(OptionalDuration(None)));
        assert_eq!(parse_optional_duration("1s"), Ok(OptionalDuration(Some(Duration::from_secs(1)))));
    }
}
