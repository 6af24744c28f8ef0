//! The node-to-node transport interface: raft messages, snapshots and forwarded requests.
//!
//! Owns: the `Transport` trait (what a node needs to reach a peer) and `Inbound` (what a node
//! offers its peers). gRPC implements both in production (`grpc.rs`); the simulator wires
//! `Transport` calls straight into the target node's `Inbound` through its simulated network.
//!
//! Invariant: every message names cluster, group, sender and receiver, and the receiver
//! refuses one meant for another node or cluster (a misrouted raft message can lose data).

pub mod grpc;
pub mod mux;

use crate::raft::types::{GroupId, NodeId};
use futures::future::BoxFuture;
use std::time::Duration;

/// Which inbound handler a message is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RpcKind {
    AppendEntries,
    Vote,
    Forward,
}

/// Addressing of one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub cluster_id: String,
    pub group_id: GroupId,
    pub from_node: NodeId,
    pub to_node: NodeId,
}

/// Why a call did not produce a reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The peer could not be reached; the request was not delivered.
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// The peer received the message and refused it (wrong node, unknown group, ...).
    #[error("peer refused the message: {0}")]
    Refused(String),
    /// No reply in time; the request may or may not have been processed.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The connection failed mid-call; the request may or may not have been processed.
    #[error("network error: {0}")]
    Network(String),
}

/// Outgoing side: how a node reaches peers.
pub trait Transport: Send + Sync + 'static {
    /// One request-reply call to `addr` (the peer's gRPC address).
    fn call(
        &self,
        addr: String,
        envelope: Envelope,
        kind: RpcKind,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>>;

    /// Streams a snapshot: `header` first, then `data` in chunks.
    fn send_snapshot(
        &self,
        addr: String,
        envelope: Envelope,
        header: Vec<u8>,
        data: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>>;

    /// Counters of what this transport has sent.
    fn stats(&self) -> TransportStats {
        TransportStats::default()
    }
}

/// What a transport has sent so far (zero where it does not batch).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Batches written to peers (one stream message each).
    pub batches_sent: u64,
    /// Messages in them.
    pub frames_sent: u64,
    /// The messages' payload bytes (snapshot transfers, which have their own streams, not
    /// counted).
    pub bytes_sent: u64,
    /// Peer links opened (after start, a broken connection or a failed open).
    pub links_opened: u64,
}

/// Incoming side: what a node does with peers' messages. Errors are refusals of the envelope.
pub trait Inbound: Send + Sync + 'static {
    fn handle(
        &self,
        envelope: Envelope,
        kind: RpcKind,
        payload: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, String>>;
    fn handle_snapshot(
        &self,
        envelope: Envelope,
        header: Vec<u8>,
        data: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, String>>;
}

/// Largest snapshot chunk sent in one message.
pub const SNAPSHOT_CHUNK_BYTES_MAX: usize = 1 << 20;
