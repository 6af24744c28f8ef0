//! Starting and stopping one Floe node: storage, raft groups, gRPC and HTTP servers, and the
//! cluster bootstrap.
//!
//! Bootstrap rule (etcd's `--initial-cluster` convention): every node starts with the same
//! member list; the node with the lowest id initializes the meta group and the first shard
//! group once, on an empty data dir. A restarted node finds its raft state on disk and
//! rejoins. Every node (re-)registers its addresses in the catalog on each start. A node
//! started with `--join` and no raft state refuses vote requests until the cluster confirms
//! the join (a wiped machine under a voter's old id is refused, and must not vote first).

use crate::api::grpc::GrpcApi;
use crate::api::NodeApi;
use crate::catalog::{CatalogCommand, NodeInfo, ShardDesc};
use crate::docs::Limits;
use crate::keys;
use crate::metrics::Metrics;
use crate::raft::host::{HostConfig, RaftHost, RaftTuning};
use crate::raft::types::{Command, NodeId};
use crate::storage::group_commit::GroupCommit;
use crate::storage::rocks::RocksEngine;
use crate::storage::Engine;
use crate::transport::grpc::{GrpcTransport, RaftTransportService};
use crate::transport::{Inbound, Transport};
use floe_proto::internal::raft_transport_server::RaftTransportServer;
use floe_proto::v1::admin_server::AdminServer;
use floe_proto::v1::documents_server::DocumentsServer;
use openraft::BasicNode;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Everything needed to start one node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: NodeId,
    /// gRPC listen address, also advertised to peers and clients.
    pub grpc_addr: String,
    pub http_addr: String,
    pub data_dir: PathBuf,
    /// Every initial member: node id → gRPC address (empty when joining).
    pub initial_cluster: BTreeMap<NodeId, String>,
    /// Join a running cluster through these members (gRPC host:port, comma separated)
    /// instead of bootstrapping.
    pub join: Option<String>,
    pub cluster_id: String,
    pub limits: Limits,
    pub tuning: RaftTuning,
    /// Thresholds of automatic splits and merges.
    pub placement: crate::placement::PlacementConfig,
}

impl NodeConfig {
    /// The first shard's replicas: the lowest `placement.replicas` ids of the initial
    /// cluster (every member of a cluster no larger than the replication factor). The meta
    /// group has every initial member; shards reach the others by moves (balance).
    pub fn first_shard_replicas(&self) -> BTreeMap<NodeId, String> {
        let count = self.placement.replicas.max(1);
        self.initial_cluster.iter().take(count).map(|(id, addr)| (*id, addr.clone())).collect()
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("raft: {0}")]
    Raft(String),
}

/// A started node. Dropping it does not stop it; call `shutdown`.
pub struct RunningNode {
    pub api: Arc<NodeApi>,
    pub host: Arc<RaftHost>,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    engine: Engine,
}

impl RunningNode {
    /// Stops serving, shuts the raft groups down, then stops the engine's background work.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        self.host.shutdown().await;
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        self.engine.close();
    }
}

fn check(config: &NodeConfig) -> Result<(), StartError> {
    if config.node_id == 0 {
        return Err(StartError::Config("node ids start at 1".into()));
    }
    if config.join.is_some() {
        return match config.initial_cluster.is_empty() {
            true => Ok(()),
            false => Err(StartError::Config("give either --initial-cluster or --join, not both".into())),
        };
    }
    match config.initial_cluster.get(&config.node_id) {
        None => Err(StartError::Config(format!("--initial-cluster does not list this node's id {}", config.node_id))),
        Some(addr) if addr != &config.grpc_addr => Err(StartError::Config(format!(
            "--initial-cluster lists node {} at {addr}, but --grpc-addr is {}",
            config.node_id, config.grpc_addr
        ))),
        Some(_) => Ok(()),
    }
}

/// Starts a node: opens storage, starts its groups and servers, bootstraps if it is first.
pub async fn start(config: NodeConfig) -> Result<RunningNode, StartError> {
    check(&config)?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| StartError::Storage(format!("{}: {e}", config.data_dir.display())))?;
    let engine: Engine =
        Arc::new(RocksEngine::open(&config.data_dir.join("db")).map_err(|e| StartError::Storage(e.to_string()))?);
    let writer = GroupCommit::spawn_thread(engine.clone()).map_err(|e| StartError::Storage(e.to_string()))?;
    let transport = Arc::new(GrpcTransport::new());
    // Read before any raft traffic can reach the node (its leaders may write to it as soon
    // as it serves).
    let fresh = !crate::raft::state_machine::has_raft_state(&engine, keys::META_GROUP)
        .map_err(|e| StartError::Storage(e.to_string()))?;
    let (host, api) = build_core(&config, engine.clone(), writer, transport).await?;
    if config.join.is_some() && fresh {
        host.hold_votes();
    }

    let grpc_listener = bind(&config.grpc_addr).await?;
    let http_listener = bind(&config.http_addr).await?;
    let grpc_addr =
        grpc_listener.local_addr().map_err(|e| StartError::Bind { addr: config.grpc_addr.clone(), source: e })?;
    let http_addr =
        http_listener.local_addr().map_err(|e| StartError::Bind { addr: config.http_addr.clone(), source: e })?;
    let (stop, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(serve_grpc(grpc_listener, api.clone(), host.clone(), stop_rx.clone())));
    tasks.push(tokio::spawn(serve_http(http_listener, api.clone(), stop_rx.clone())));
    bootstrap(&config, &host).await?;
    if let Some(member) = &config.join {
        join(&config, member, fresh).await?;
        host.release_votes();
    }
    api.mark_started();
    let http = if config.http_addr.ends_with(":0") { http_addr.to_string() } else { config.http_addr.clone() };
    tasks.push(tokio::spawn(register(config.clone(), http, host.clone(), stop_rx)));
    Ok(RunningNode { api, host, grpc_addr, http_addr, stop, tasks, engine })
}

/// Builds a node's raft host (meta group and first shard started) and its `NodeApi` over the
/// given engine, log writer and transport, without any server. This is the seam the
/// simulator uses: it passes an in-memory engine, an inline writer and a simulated network,
/// and calls `NodeApi` and the host's `Inbound` directly.
pub async fn build_core(
    config: &NodeConfig,
    engine: Engine,
    writer: GroupCommit,
    transport: Arc<dyn Transport>,
) -> Result<(Arc<RaftHost>, Arc<NodeApi>), StartError> {
    let host_config =
        HostConfig { node_id: config.node_id, cluster_id: config.cluster_id.clone(), tuning: config.tuning.clone() };
    let host = RaftHost::new(host_config, engine, writer, transport).map_err(|e| StartError::Raft(e.to_string()))?;
    // A node that has never run anything and is one of the initial members starts the first
    // shard empty (the bootstrapping node initializes it); every other group on disk stays
    // dormant until a request or its leader wakes it.
    let fresh = host.dormant_ids().is_empty();
    host.forget_leadership_after_restart().await.map_err(|e| StartError::Storage(e.to_string()))?;
    host.start_group(keys::META_GROUP).await.map_err(|e| StartError::Raft(e.to_string()))?;
    host.announce_restart();
    if fresh && config.join.is_none() && config.first_shard_replicas().contains_key(&config.node_id) {
        host.start_group(keys::FIRST_SHARD).await.map_err(|e| StartError::Raft(e.to_string()))?;
    }
    let api = Arc::new(NodeApi::new(
        config.node_id,
        config.limits,
        config.placement.clone(),
        host.clone(),
        Arc::new(Metrics::new()),
    ));
    api.serve_api_calls();
    crate::api::elastic::spawn_loops(&api);
    Ok((host, api))
}

/// On the lowest-id initial member only: initializes the meta group and the first shard with
/// every initial member, unless they were initialized before (a restart).
pub async fn bootstrap(config: &NodeConfig, host: &Arc<RaftHost>) -> Result<(), StartError> {
    if Some(config.node_id) != config.initial_cluster.keys().next().copied() {
        return Ok(());
    }
    let as_members = |nodes: &BTreeMap<NodeId, String>| -> BTreeMap<NodeId, BasicNode> {
        nodes.iter().map(|(id, addr)| (*id, BasicNode { addr: addr.clone() })).collect()
    };
    let groups = [
        (keys::META_GROUP, as_members(&config.initial_cluster)),
        (keys::FIRST_SHARD, as_members(&config.first_shard_replicas())),
    ];
    // The first shard may be gone since (merged away): only groups hosted here.
    for (g, members) in groups.into_iter().filter(|(g, _)| host.hosts(*g)) {
        let ids: Vec<NodeId> = members.keys().copied().collect();
        let fresh = host.initialize(g, members).await.map_err(|e| StartError::Raft(e.to_string()))?;
        if fresh {
            tracing::info!(group = g, members = ?ids, "initialized raft group");
        }
    }
    Ok(())
}

async fn bind(addr: &str) -> Result<tokio::net::TcpListener, StartError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|e| StartError::Bind { addr: addr.into(), source: e })
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn serve_grpc(
    listener: tokio::net::TcpListener,
    api: Arc<NodeApi>,
    host: Arc<RaftHost>,
    stop: watch::Receiver<bool>,
) {
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<DocumentsServer<GrpcApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(floe_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1();
    let grpc_api = GrpcApi::new(api.clone());
    let inbound: Arc<dyn Inbound> = Arc::new(host);
    let mut builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(crate::transport::grpc::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(crate::transport::grpc::CONNECTION_WINDOW_BYTES);
    let router = builder
        .add_service(health_service)
        .add_service(DocumentsServer::new(grpc_api.clone()).max_decoding_message_size(64 << 20))
        .add_service(AdminServer::new(grpc_api))
        .add_service(
            RaftTransportServer::new(RaftTransportService::new(inbound))
                .max_decoding_message_size(crate::transport::mux::MESSAGE_BYTES_MAX)
                .max_encoding_message_size(crate::transport::mux::MESSAGE_BYTES_MAX),
        );
    let router = match reflection {
        Ok(r) => router.add_service(r),
        Err(e) => {
            tracing::warn!(error = %e, "gRPC reflection unavailable");
            router
        }
    };
    // Accepted sockets need TCP_NODELAY set here: the builder's `tcp_nodelay` only applies
    // when tonic binds the listener itself. Without it, Nagle plus delayed ACKs add ~40 ms to
    // responses written in more than one segment.
    let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), |conn| {
        conn.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
    if let Err(e) = router.serve_with_incoming_shutdown(incoming, stopped(stop)).await {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

async fn serve_http(listener: tokio::net::TcpListener, api: Arc<NodeApi>, stop: watch::Receiver<bool>) {
    use axum::serve::ListenerExt;
    let app = crate::api::http::router(api);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stopped(stop)).await {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

/// Joins a running cluster through `member` (on every start with `--join`: a member that
/// restarts re-confirms, one interrupted halfway finishes). Retries while the cluster is
/// unavailable; a refusal (id taken, removed or wiped, bad address, other cluster) fails the
/// start.
pub async fn join(config: &NodeConfig, member: &str, fresh: bool) -> Result<(), StartError> {
    // Always asked (the change is idempotent): a node restarted halfway through its join
    // finishes it. A node that started without raft state says so (`fresh`).
    let members: Vec<String> = member.split(',').map(str::trim).filter(|m| !m.is_empty()).map(String::from).collect();
    let client = floe_client::Client::builder()
        .endpoints(members)
        .request_timeout(crate::raft::host::MEMBERSHIP_TIMEOUT + Duration::from_secs(10))
        .build()
        .map_err(|e| StartError::Config(format!("--join {member}: {e}")))?;
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    loop {
        match client.add_node(config.node_id, &config.grpc_addr, &config.cluster_id, fresh).await {
            Ok(groups) => {
                tracing::info!(node = config.node_id, ?groups, "joined the cluster");
                return Ok(());
            }
            Err(e) if e.is_retryable() && tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "joining through {member}: not yet, retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(StartError::Raft(format!("joining through {member}: {e}"))),
        }
    }
}

/// Bound on joining a cluster (retries while it is unavailable included).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Writes the bootstrap catalog (first node only) and this node's addresses, retrying until
/// the meta group accepts them or the node stops.
pub async fn register(config: NodeConfig, http: String, host: Arc<RaftHost>, stop: watch::Receiver<bool>) {
    let first = Some(config.node_id) == config.initial_cluster.keys().next().copied();
    let mut cmds = Vec::new();
    if first {
        let nodes = config
            .initial_cluster
            .iter()
            .map(|(id, addr)| NodeInfo { id: *id, grpc_addr: addr.clone(), http_addr: String::new() })
            .collect();
        let (start, end) = keys::initial_group_range(keys::FIRST_SHARD);
        let shard = ShardDesc {
            id: keys::FIRST_SHARD,
            start,
            end,
            epoch: 1,
            replicas: config.first_shard_replicas().keys().copied().collect(),
            replicas_at: 0,
            merged: Vec::new(),
        };
        cmds.push(CatalogCommand::Bootstrap { cluster_id: config.cluster_id.clone(), nodes, shards: vec![shard] });
    }
    cmds.push(CatalogCommand::RegisterNode(NodeInfo {
        id: config.node_id,
        grpc_addr: config.grpc_addr.clone(),
        http_addr: http,
    }));
    for cmd in cmds {
        let mut delay = Duration::from_millis(50);
        loop {
            if *stop.borrow() {
                return;
            }
            match host.propose(keys::META_GROUP, Command::Catalog(cmd.clone())).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "catalog registration not accepted yet, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
    tracing::info!(node = config.node_id, "registered in the catalog");
}
