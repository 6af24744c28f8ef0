//! openraft's network traits for one group, over the node's `Transport`.
//!
//! Owns: encoding openraft requests and replies (serde JSON) into transport payloads and
//! mapping transport failures to openraft's error kinds (`Unreachable` makes openraft back
//! off; a refusal by the peer is `Unreachable` too, e.g. the group is not running there yet).

use super::types::{GroupId, NodeId, Snapshot, TypeConfig, Vote};
use crate::transport::{Envelope, RpcKind, Transport, TransportError};
use openraft::error::{
    Fatal, NetworkError, PayloadTooLarge, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::BasicNode;
use serde::{de::DeserializeOwned, Serialize};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Snapshot header sent before the data.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct SnapshotHeader {
    pub vote: Vote,
    pub meta: super::types::SnapshotMeta,
}

/// Creates per-peer clients for one group.
#[derive(Clone)]
pub struct GroupNetworkFactory {
    pub group: GroupId,
    pub node_id: NodeId,
    pub cluster_id: String,
    pub transport: Arc<dyn Transport>,
}

/// A group's client to one peer.
pub struct GroupNetwork {
    factory: GroupNetworkFactory,
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for GroupNetworkFactory {
    type Network = GroupNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        GroupNetwork { factory: self.clone(), target, addr: node.addr.clone() }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct CodecError(String);

impl GroupNetwork {
    fn envelope(&self) -> Envelope {
        Envelope {
            cluster_id: self.factory.cluster_id.clone(),
            group_id: self.factory.group,
            from_node: self.factory.node_id,
            to_node: self.target,
        }
    }

    async fn rpc<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        kind: RpcKind,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let payload =
            serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&CodecError(e.to_string()))))?;
        let reply = self
            .factory
            .transport
            .call(self.addr.clone(), self.envelope(), kind, payload, timeout)
            .await
            .map_err(to_rpc_error)?;
        let decoded: Result<Resp, RaftError<NodeId>> = serde_json::from_slice(&reply)
            .map_err(|e| RPCError::Network(NetworkError::new(&CodecError(e.to_string()))))?;
        decoded.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

fn to_rpc_error(e: TransportError) -> RPCError<NodeId, BasicNode, RaftError<NodeId>> {
    match e {
        TransportError::Unreachable(_) | TransportError::Refused(_) => RPCError::Unreachable(Unreachable::new(&e)),
        TransportError::Timeout(_) | TransportError::Network(_) => RPCError::Network(NetworkError::new(&e)),
    }
}

impl RaftNetwork<TypeConfig> for GroupNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let entries = rpc.entries.len() as u64;
        if entries > 1 {
            // openraft 0.9 bounds one AppendEntries by the heartbeat interval; ask it to send
            // fewer entries when they would not fit the byte budget (it honours the hint).
            let bytes: usize = rpc.entries.iter().map(|e| serde_json::to_vec(e).map(|v| v.len()).unwrap_or(0)).sum();
            if bytes > APPEND_BYTES_MAX {
                let fit = (entries * APPEND_BYTES_MAX as u64 / bytes as u64).clamp(1, entries - 1);
                return Err(RPCError::PayloadTooLarge(PayloadTooLarge::new_entries_hint(fit)));
            }
        }
        self.rpc(RpcKind::AppendEntries, &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.rpc(RpcKind::Vote, &rpc, option.hard_ttl()).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let header = SnapshotHeader { vote, meta: snapshot.meta.clone() };
        let header = serde_json::to_vec(&header)
            .map_err(|e| StreamingError::Network(NetworkError::new(&CodecError(e.to_string()))))?;
        let data = snapshot.snapshot.into_inner();
        // Bounded by its size and by openraft's cancel signal, not by the per-RPC TTL. Not a
        // fixed generous bound: while a snapshot is in flight openraft sends that follower
        // nothing else, so a transfer lost to a partition or a crash must fail soon enough to
        // be retried (a fixed 120 s left a simulated follower without its replica for good).
        let timeout = snapshot_timeout(data.len());
        let send = self.factory.transport.send_snapshot(self.addr.clone(), self.envelope(), header, data, timeout);
        let reply = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            r = send => r,
        };
        let reply = reply.map_err(|e| match e {
            TransportError::Unreachable(_) | TransportError::Refused(_) => {
                StreamingError::Unreachable(Unreachable::new(&e))
            }
            TransportError::Timeout(_) | TransportError::Network(_) => StreamingError::Network(NetworkError::new(&e)),
        })?;
        let decoded: Result<SnapshotResponse<NodeId>, Fatal<NodeId>> = serde_json::from_slice(&reply)
            .map_err(|e| StreamingError::Network(NetworkError::new(&CodecError(e.to_string()))))?;
        decoded.map_err(|e| StreamingError::RemoteError(RemoteError::new(self.target, e)))
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(UNREACHABLE_BACKOFF))
    }
}

/// Byte budget of the entries in one AppendEntries (more entries are split).
pub const APPEND_BYTES_MAX: usize = 4 << 20;
/// Bound on one snapshot transfer: `SNAPSHOT_TIMEOUT_BASE` plus one second per
/// `SNAPSHOT_SLOWEST_BYTES_PER_S` bytes, at most `SNAPSHOT_TIMEOUT_MAX`.
pub fn snapshot_timeout(bytes: usize) -> Duration {
    let transfer = Duration::from_secs((bytes / SNAPSHOT_SLOWEST_BYTES_PER_S) as u64);
    (SNAPSHOT_TIMEOUT_BASE + transfer).min(SNAPSHOT_TIMEOUT_MAX)
}
pub const SNAPSHOT_TIMEOUT_BASE: Duration = Duration::from_secs(10);
/// The slowest transfer rate a snapshot is allowed (4 MiB/s).
pub const SNAPSHOT_SLOWEST_BYTES_PER_S: usize = 4 << 20;
pub const SNAPSHOT_TIMEOUT_MAX: Duration = Duration::from_secs(600);
/// Pause before retrying an unreachable peer.
pub const UNREACHABLE_BACKOFF: Duration = Duration::from_millis(200);
