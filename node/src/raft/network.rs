//! openraft's network traits for one group, over the node's `Transport`.
//!
//! Owns: encoding openraft requests and replies (serde JSON) into transport payloads and
//! mapping transport failures to openraft's error kinds (`Unreachable` makes openraft back
//! off; a refusal by the peer is `Unreachable` too, e.g. the group is not running there yet),
//! and asking a follower whether it already holds entries before a new replication stream
//! sends them (`GroupNetwork::append_entries`).

use super::types::{GroupId, NodeId, Snapshot, TypeConfig, Vote};
use crate::transport::{Envelope, RpcKind, Transport, TransportError};
use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError, Unreachable,
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

/// A group's client to one peer: openraft makes one per replication stream (a leader's
/// term, or a woken leader's incarnation) and one per election.
pub struct GroupNetwork {
    factory: GroupNetworkFactory,
    target: NodeId,
    addr: String,
    /// Whether entries are probed before they are sent (`append_entries`): from the start
    /// of the stream until the follower first lacks what was probed.
    probing: bool,
}

impl RaftNetworkFactory<TypeConfig> for GroupNetworkFactory {
    type Network = GroupNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        GroupNetwork { factory: self.clone(), target, addr: node.addr.clone(), probing: true }
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
        if self.probing && !rpc.entries.is_empty() {
            // A new stream does not know where the follower's log ends, and openraft 0.9
            // finds out by sending entries from halfway through its log (a binary search
            // that sends what it probes): every wake of a hibernated leader, and every new
            // leader, re-sent its followers up to half a log they mostly held (measured: a
            // woken shard with large entries kept a core busy for 100 ms retrying more than
            // 4 MiB, and every other wake waited). Ask first whether the follower holds the
            // batch's last entry (a woken leader's followers do), then the last one an
            // earlier leader wrote (a new leader's followers lack only its own entries).
            // Holding an entry means holding every entry before it (Log Matching: same index
            // and term, same prefix), so the follower then accepts and commits exactly what
            // the full request would make it. Each answer moves openraft's search on; once
            // the follower lacks what was probed, it is behind, and entries go as built.
            let last = rpc.entries.last().map(|e| e.log_id);
            for held in probe_points(&rpc.entries) {
                let probe: AppendEntriesRequest<TypeConfig> = AppendEntriesRequest {
                    vote: rpc.vote,
                    prev_log_id: Some(held),
                    leader_commit: rpc.leader_commit,
                    entries: Vec::new(),
                };
                match self.rpc(RpcKind::AppendEntries, &probe, option.hard_ttl()).await? {
                    AppendEntriesResponse::Success => {
                        return Ok(if last == Some(held) {
                            AppendEntriesResponse::Success
                        } else {
                            AppendEntriesResponse::PartialSuccess(Some(held))
                        });
                    }
                    AppendEntriesResponse::HigherVote(vote) => return Ok(AppendEntriesResponse::HigherVote(vote)),
                    // The follower lacks it (and dropped whatever it had from that index on,
                    // which cannot match the leader's log either): try the next point, then
                    // send the entries as openraft built them.
                    AppendEntriesResponse::Conflict | AppendEntriesResponse::PartialSuccess(_) => {}
                }
            }
        }
        self.probing &= rpc.entries.is_empty();
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
        // A view of the leader's own state is read and encoded here, not when it was built:
        // a scan of the whole range, so on a multi-threaded runtime the worker hands its other
        // tasks (every group's heartbeats) to another thread meanwhile. The simulator's
        // single-threaded runtime encodes inline (deterministic, and its shards are small).
        let encode = move || snapshot.snapshot.into_bytes();
        let multi_threaded =
            tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread;
        let data = if multi_threaded { tokio::task::block_in_place(encode) } else { encode() }
            .map_err(|e| StreamingError::StorageError(openraft::StorageIOError::read_snapshot(None, &e).into()))?;
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

/// Where a new stream probes the follower before sending `entries` (`append_entries`): the
/// last entry, then the last entry a leader other than its writer wrote, if any.
fn probe_points(entries: &[super::types::Entry]) -> Vec<super::types::LogId> {
    let Some(last) = entries.last().map(|e| e.log_id) else { return Vec::new() };
    let earlier = entries.iter().rev().map(|e| e.log_id).find(|id| id.leader_id != last.leader_id);
    std::iter::once(last).chain(earlier).collect()
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::{Entry, LogId};
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(term: u64, node: NodeId, index: u64) -> Entry {
        Entry { log_id: LogId::new(CommittedLeaderId::new(term, node), index), payload: EntryPayload::Blank }
    }

    #[test]
    fn a_new_stream_probes_the_last_entry_then_the_last_one_an_earlier_leader_wrote() {
        assert!(probe_points(&[]).is_empty());
        // A woken leader: every entry its own.
        let woken = [entry(4, 1, 10), entry(4, 1, 11)];
        assert_eq!(probe_points(&woken), vec![woken[1].log_id]);
        // A new leader: its blank entry after the entries of earlier terms.
        let elected = [entry(3, 2, 10), entry(4, 1, 11), entry(4, 1, 12), entry(5, 3, 13)];
        assert_eq!(probe_points(&elected), vec![elected[3].log_id, elected[2].log_id]);
    }
}
