//! A cluster of real Floe nodes (`floe_node::server::build_core`) on in-memory engines and
//! the simulated network, with crash and restart.
//!
//! Owns: each node's `MemEngine` (what survives a crash) and its current incarnation (raft
//! host, API, registration task). A crash stops every raft group of the node, detaches it
//! from the network and drops every write that was not synced; a restart builds a new
//! incarnation from what the engine kept, exactly as a restarted process would. A crash
//! aborts every task the incarnation spawned (a hard kill, `TaskOwner::abort_all`).

use crate::net::{addr_of, SimNet, SimTransport};
use floe_node::api::NodeApi;
use floe_node::docs::Limits;
use floe_node::raft::host::{RaftHost, RaftTuning};
use floe_node::raft::runtime::TaskOwner;
use floe_node::server::{self, NodeConfig};
use floe_node::signal::Flag;
use floe_node::storage::group_commit::GroupCommit;
use floe_node::storage::mem::MemEngine;
use floe_node::storage::Engine;
use floe_node::transport::Inbound;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

/// One running incarnation of a node.
pub struct Incarnation {
    /// Every task of this incarnation (openraft's, the read loops, registration, inbound
    /// message handlers): aborted together on a crash.
    pub tasks: TaskOwner,
    pub host: Arc<RaftHost>,
    pub api: Arc<NodeApi>,
    stop: watch::Sender<bool>,
    /// Set when the incarnation is killed: a client call still in flight on it never gets
    /// an answer (a killed process sends none), so callers race their call against this.
    dead: Arc<Flag>,
}

/// A client's handle on one node incarnation.
#[derive(Clone)]
pub struct Endpoint {
    pub api: Arc<NodeApi>,
    pub dead: Arc<Flag>,
    /// Client calls run as tasks of the node, so a paused node serves nothing.
    pub tasks: TaskOwner,
}

/// One simulated node.
pub struct SimNode {
    pub id: u64,
    pub engine: Arc<MemEngine>,
    /// Latency injected into every synced write of this node (µs), shared across restarts.
    pub disk_latency_us: Arc<std::sync::atomic::AtomicU64>,
    pub running: Option<Incarnation>,
    config: NodeConfig,
    /// What this node's earlier incarnations counted.
    past: NodeCounters,
}

/// Counters read from a node's metrics, summed over its incarnations (a crash loses a
/// process's counters; the simulator keeps them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeCounters {
    /// Reads sent to another node's replica (the node asked had none).
    pub reads_via_replica: u64,
    /// The placement driver's operations that succeeded (on whichever node led the meta
    /// group): splits, merges, replica moves (every reason), the moves among them that
    /// re-created a dead node's replica, and leader transfers.
    pub driver_splits: u64,
    pub driver_merges: u64,
    pub driver_moves: u64,
    pub driver_re_replications: u64,
    pub driver_transfers: u64,
}

impl NodeCounters {
    fn of(api: &NodeApi) -> Self {
        let m = &api.metrics;
        Self {
            reads_via_replica: m.read_path_total("replica"),
            driver_splits: m.placement_ok("split", None),
            driver_merges: m.placement_ok("merge", None),
            driver_moves: m.placement_ok("move", None),
            driver_re_replications: m.placement_ok("move", Some("re-replicate")),
            driver_transfers: m.placement_ok("transfer", None),
        }
    }

    fn add(&mut self, other: &Self) {
        self.reads_via_replica += other.reads_via_replica;
        self.driver_splits += other.driver_splits;
        self.driver_merges += other.driver_merges;
        self.driver_moves += other.driver_moves;
        self.driver_re_replications += other.driver_re_replications;
        self.driver_transfers += other.driver_transfers;
    }
}

/// The simulated cluster.
pub struct SimCluster {
    pub nodes: BTreeMap<u64, SimNode>,
    pub net: Arc<SimNet>,
}

fn node_config(id: u64, count: u64, hibernate_after: Option<std::time::Duration>) -> NodeConfig {
    NodeConfig {
        node_id: id,
        grpc_addr: addr_of(id),
        http_addr: format!("{}-http", addr_of(id)),
        data_dir: std::path::PathBuf::new(),
        initial_cluster: (1..=count).map(|i| (i, addr_of(i))).collect(),
        join: None,
        cluster_id: "sim".into(),
        limits: Limits::default(),
        tuning: RaftTuning {
            snapshot_logs_since_last: 200,
            logs_kept_after_snapshot: 50,
            hibernate_after,
            ..RaftTuning::default()
        },
        placement: floe_node::placement::PlacementConfig {
            // A node silent this long (a crash or an isolation of a few seconds) is dead: with
            // more nodes than replicas, the driver re-creates its replicas elsewhere.
            dead_after: Some(floe_node::liveness::DOWN_AFTER),
            ..floe_node::placement::PlacementConfig::default()
        },
    }
}

impl SimCluster {
    /// Creates `count` nodes (not started); idle shards hibernate after `hibernate_after`.
    pub fn new(count: u64, net: Arc<SimNet>, hibernate_after: Option<std::time::Duration>) -> Self {
        let nodes = (1..=count)
            .map(|id| {
                (
                    id,
                    SimNode {
                        id,
                        engine: Arc::new(MemEngine::new()),
                        disk_latency_us: Arc::default(),
                        running: None,
                        config: node_config(id, count, hibernate_after),
                        past: NodeCounters::default(),
                    },
                )
            })
            .collect();
        Self { nodes, net }
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// Starts (or restarts) node `id` from its engine's durable state.
    pub async fn start(&mut self, id: u64) -> Result<(), String> {
        let net = self.net.clone();
        let node = self.nodes.get_mut(&id).ok_or_else(|| format!("no node {id}"))?;
        if node.running.is_some() {
            return Ok(());
        }
        let engine: Engine = node.engine.clone();
        let writer = GroupCommit::inline(engine.clone());
        if let Some(latency) = writer.inline_latency_us() {
            latency.store(
                node.disk_latency_us.load(std::sync::atomic::Ordering::Relaxed),
                std::sync::atomic::Ordering::Relaxed,
            );
            node.disk_latency_us = latency;
        }
        let transport = Arc::new(SimTransport { net: net.clone() });
        let tasks = TaskOwner::for_node(id);
        let (host, api) = tasks
            .scope(server::build_core(&node.config, engine, writer, transport))
            .await
            .map_err(|e| e.to_string())?;
        let inbound: Arc<dyn Inbound> = Arc::new(host.clone());
        net.attach(id, inbound, tasks.clone());
        tasks.scope(server::bootstrap(&node.config, &host)).await.map_err(|e| e.to_string())?;
        api.mark_started();
        let (stop, stop_rx) = watch::channel(false);
        tasks.spawn(server::register(node.config.clone(), node.config.http_addr.clone(), host.clone(), stop_rx));
        let dead = Arc::new(Flag::new());
        node.running = Some(Incarnation { tasks, host, api, stop, dead });
        Ok(())
    }

    /// Crashes node `id`: unreachable at once, raft groups stopped, unsynced writes lost
    /// (the first `keep_unsynced` unsynced batches survive, as a torn write-ahead log would).
    pub async fn crash(&mut self, id: u64, keep_unsynced: usize) {
        self.net.detach(id);
        let Some(node) = self.nodes.get_mut(&id) else { return };
        if let Some(inc) = node.running.take() {
            node.past.add(&NodeCounters::of(&inc.api));
            // A hard kill: no task of the incarnation runs another step, nothing is flushed.
            inc.dead.raise();
            let _ = inc.stop.send(true);
            inc.tasks.abort_all();
        }
        node.engine.crash(keep_unsynced);
        // A restarted process gets a healthy disk back.
        node.engine.set_fail_writes(None);
    }

    /// Pauses (`true`) or resumes node `id`'s incarnation, if running.
    pub fn set_paused(&self, id: u64, paused: bool) {
        if let Some(inc) = self.nodes.get(&id).and_then(|n| n.running.as_ref()) {
            if paused {
                inc.tasks.pause();
            } else {
                inc.tasks.resume();
            }
        }
    }

    /// The current incarnation of node `id`, for a client call.
    pub fn endpoint(&self, id: u64) -> Option<Endpoint> {
        self.nodes.get(&id)?.running.as_ref().map(|i| Endpoint {
            api: i.api.clone(),
            dead: i.dead.clone(),
            tasks: i.tasks.clone(),
        })
    }

    /// Every node's counters over every incarnation so far.
    pub fn counters(&self) -> NodeCounters {
        let mut total = NodeCounters::default();
        for node in self.nodes.values() {
            total.add(&node.past);
            if let Some(inc) = &node.running {
                total.add(&NodeCounters::of(&inc.api));
            }
        }
        total
    }

    pub fn is_up(&self, id: u64) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.running.is_some())
    }
}
