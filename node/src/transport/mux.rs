//! Node-to-node messages over one long-lived gRPC stream per peer, batched across groups.
//!
//! Owns both halves of the `RaftTransport.Stream` RPC:
//! - the client half (`PeerLinks`): every group's raft messages and forwarded requests to a
//!   peer queue on that peer's `Link`; one writer sends whatever queued while the previous
//!   batch was being written as one `RaftBatch`; one reader hands each reply to the caller
//!   waiting on its id. With 1,000 groups heartbeating, this turns thousands of HTTP/2 streams
//!   (headers, a task and a buffer slot each) per second into a few hundred frames on one.
//! - the server half (`serve`): the frames of a batch are handled concurrently (a slow
//!   forwarded write does not hold up a heartbeat), and replies go back batched in the order
//!   their handlers finish.
//!
//! Invariants:
//! - a reply goes only to the caller whose id it carries; ids are never reused on a link;
//! - when a link breaks, every caller still waiting gets an error at once: `Unreachable` when
//!   its frame certainly never left this node (still queued, or the connection could not be
//!   made), `Network` otherwise (it may have been delivered, or be processed later); the next
//!   call opens a new link;
//! - a frame whose caller gave up before it was written is dropped, not sent.

use super::{Envelope, Inbound, RpcKind, TransportError};
use floe_proto::internal::raft_transport_client::RaftTransportClient;
use floe_proto::internal::{RaftBatch, RaftEnvelope, RaftFrame, RaftFrameReply, RaftKind, RaftReply, RaftReplyBatch};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// Most frames in one batch.
pub const BATCH_FRAMES_MAX: usize = 1024;
/// A batch stops growing once its payloads reach this many bytes (one frame may exceed it).
pub const BATCH_BYTES_MAX: usize = 4 << 20;
/// Largest batch or reply batch accepted from the wire.
pub const MESSAGE_BYTES_MAX: usize = 256 << 20;
/// How long a new link may take to open (TCP connect plus the HTTP/2 stream); a paused peer
/// accepts TCP connections but never answers.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(2);

type Reply = Result<Vec<u8>, TransportError>;

/// Counters of what went out on every link.
#[derive(Debug, Default)]
pub struct MuxStats {
    /// Batches written (one gRPC stream message each).
    pub batches: AtomicU64,
    /// Frames in them (one raft message or forwarded request each).
    pub frames: AtomicU64,
    /// The frames' payload bytes.
    pub bytes: AtomicU64,
    /// Links opened (a new stream after a start, a broken connection or a failed open).
    pub links_opened: AtomicU64,
}

type LinkMap = Mutex<HashMap<String, Arc<Link>>>;

/// The client half: one link per peer address, opened on first use and after a failure.
#[derive(Default)]
pub struct PeerLinks {
    links: Arc<LinkMap>,
    stats: Arc<MuxStats>,
}

/// One stream to one peer.
struct Link {
    queue: mpsc::UnboundedSender<RaftFrame>,
    /// Callers waiting for a reply, by frame id.
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    next_id: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain maps behind: still usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn kind_to_proto(kind: RpcKind) -> RaftKind {
    match kind {
        RpcKind::AppendEntries => RaftKind::AppendEntries,
        RpcKind::Vote => RaftKind::Vote,
        RpcKind::Forward => RaftKind::Forward,
    }
}

fn kind_from_proto(kind: RaftKind) -> RpcKind {
    match kind {
        RaftKind::AppendEntries => RpcKind::AppendEntries,
        RaftKind::Vote => RpcKind::Vote,
        RaftKind::Forward => RpcKind::Forward,
    }
}

pub(super) fn envelope_to_proto(e: &Envelope, payload: Vec<u8>) -> RaftEnvelope {
    RaftEnvelope {
        cluster_id: e.cluster_id.clone(),
        group_id: e.group_id,
        from_node: e.from_node,
        to_node: e.to_node,
        payload,
    }
}

pub(super) fn envelope_from_proto(e: &RaftEnvelope) -> Envelope {
    Envelope { cluster_id: e.cluster_id.clone(), group_id: e.group_id, from_node: e.from_node, to_node: e.to_node }
}

pub(super) fn reply_payload(reply: RaftReply) -> Reply {
    if reply.refused.is_empty() {
        Ok(reply.payload)
    } else {
        Err(TransportError::Refused(reply.refused))
    }
}

/// Removes a caller's pending entry when the caller stops waiting (reply, timeout or drop).
struct PendingGuard {
    link: Arc<Link>,
    id: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        lock(&self.link.pending).remove(&self.id);
    }
}

impl PeerLinks {
    pub fn stats(&self) -> &MuxStats {
        &self.stats
    }

    /// Sends one message to the peer at `addr` and waits up to `timeout` for its reply.
    /// `channel` gives the connection to open a link on when there is none.
    pub async fn call(
        &self,
        addr: &str,
        channel: impl Fn() -> Result<Channel, TransportError>,
        envelope: &Envelope,
        kind: RpcKind,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Reply {
        let mut frame =
            RaftFrame { id: 0, kind: kind_to_proto(kind) as i32, envelope: Some(envelope_to_proto(envelope, payload)) };
        // A link found closed (it broke after the lookup) is replaced once.
        for _ in 0..2 {
            let link = self.link(addr, &channel)?;
            let (tx, rx) = oneshot::channel();
            let id = link.next_id.fetch_add(1, Ordering::Relaxed);
            frame.id = id;
            lock(&link.pending).insert(id, tx);
            let guard = PendingGuard { link: link.clone(), id };
            match link.queue.send(frame) {
                Ok(()) => {
                    return match tokio::time::timeout(timeout, rx).await {
                        Err(_) => Err(TransportError::Timeout(timeout)),
                        // The link dropped the sender without an answer: it is gone.
                        Ok(Err(_)) => Err(TransportError::Network(format!("link to {addr} closed"))),
                        Ok(Ok(reply)) => reply,
                    };
                }
                Err(mpsc::error::SendError(back)) => {
                    drop(guard);
                    frame = back;
                    let mut links = lock(&self.links);
                    if links.get(addr).is_some_and(|l| Arc::ptr_eq(l, &link)) {
                        links.remove(addr);
                    }
                }
            }
        }
        Err(TransportError::Unreachable(format!("no link to {addr} could be opened")))
    }

    /// The open link to `addr`, or a new one (its driver task connects in the background;
    /// frames queue meanwhile).
    fn link(
        &self,
        addr: &str,
        channel: &impl Fn() -> Result<Channel, TransportError>,
    ) -> Result<Arc<Link>, TransportError> {
        let mut links = lock(&self.links);
        if let Some(link) = links.get(addr) {
            return Ok(link.clone());
        }
        let channel = channel()?;
        let (queue, rx) = mpsc::unbounded_channel();
        let link = Arc::new(Link { queue, pending: Mutex::new(HashMap::new()), next_id: AtomicU64::new(1) });
        links.insert(addr.to_string(), link.clone());
        self.stats.links_opened.fetch_add(1, Ordering::Relaxed);
        let driver = Driver {
            link: link.clone(),
            addr: addr.to_string(),
            links: Arc::downgrade(&self.links),
            stats: self.stats.clone(),
        };
        tokio::spawn(driver.run(channel, rx));
        Ok(link)
    }
}

/// The task that owns one link's stream: writes batches, reads replies, and fails every
/// waiting caller when the stream ends.
struct Driver {
    link: Arc<Link>,
    addr: String,
    links: Weak<LinkMap>,
    stats: Arc<MuxStats>,
}

impl Driver {
    async fn run(self, channel: Channel, mut rx: mpsc::UnboundedReceiver<RaftFrame>) {
        let (batch_tx, batch_rx) = mpsc::channel::<RaftBatch>(2);
        let mut client = RaftTransportClient::new(channel)
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX);
        // True only when the connection itself could not be made: then no frame left this node.
        // Once connected, frames written before the stream's reply headers came (or before an
        // open timeout, e.g. a paused peer) may still be processed later.
        let mut never_connected = false;
        let reason = {
            let read = async {
                let response =
                    match tokio::time::timeout(OPEN_TIMEOUT, client.stream(ReceiverStream::new(batch_rx))).await {
                        Err(_) => return format!("stream to {} not opened within {OPEN_TIMEOUT:?}", self.addr),
                        Ok(Err(status)) => {
                            never_connected = super::grpc::is_connect_error(&status);
                            return format!("stream to {} not opened: {status}", self.addr);
                        }
                        Ok(Ok(r)) => r,
                    };
                self.read_replies(response.into_inner()).await
            };
            tokio::select! {
                reason = read => reason,
                reason = self.write_batches(&mut rx, batch_tx) => reason,
            }
        };
        self.close(rx, never_connected, &reason);
    }

    /// Sends what queued as batches until the stream stops taking them.
    async fn write_batches(
        &self,
        rx: &mut mpsc::UnboundedReceiver<RaftFrame>,
        batch_tx: mpsc::Sender<RaftBatch>,
    ) -> String {
        while let Some(first) = rx.recv().await {
            let mut frames = Vec::new();
            let mut bytes = 0;
            let mut next = Some(first);
            while let Some(frame) = next.take() {
                if lock(&self.link.pending).contains_key(&frame.id) {
                    bytes += frame.envelope.as_ref().map_or(0, |e| e.payload.len());
                    frames.push(frame);
                }
                if frames.len() < BATCH_FRAMES_MAX && bytes < BATCH_BYTES_MAX {
                    next = rx.try_recv().ok();
                }
            }
            if frames.is_empty() {
                continue;
            }
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            self.stats.frames.fetch_add(frames.len() as u64, Ordering::Relaxed);
            self.stats.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            if batch_tx.send(RaftBatch { frames }).await.is_err() {
                return format!("stream to {} closed", self.addr);
            }
        }
        // Unreachable while the link holds its queue sender; kept total for clarity.
        format!("link to {} dropped", self.addr)
    }

    /// Hands replies to their callers until the stream ends; returns why it ended.
    async fn read_replies(&self, mut replies: Streaming<RaftReplyBatch>) -> String {
        loop {
            match replies.message().await {
                Ok(Some(batch)) => {
                    for FrameReplyParts { id, reply } in batch.replies.into_iter().map(FrameReplyParts::from) {
                        let waiter = lock(&self.link.pending).remove(&id);
                        if let Some(tx) = waiter {
                            let _ = tx.send(reply);
                        }
                    }
                }
                Ok(None) => return format!("peer {} ended the stream", self.addr),
                Err(status) => return format!("stream to {} broke: {status}", self.addr),
            }
        }
    }

    fn close(self, mut rx: mpsc::UnboundedReceiver<RaftFrame>, never_connected: bool, reason: &str) {
        if let Some(links) = self.links.upgrade() {
            let mut links = lock(&links);
            if links.get(&self.addr).is_some_and(|l| Arc::ptr_eq(l, &self.link)) {
                links.remove(&self.addr);
            }
        }
        rx.close();
        let mut pending = lock(&self.link.pending);
        while let Ok(frame) = rx.try_recv() {
            if let Some(tx) = pending.remove(&frame.id) {
                let _ = tx.send(Err(TransportError::Unreachable(reason.to_string())));
            }
        }
        for (_, tx) in pending.drain() {
            let err = if never_connected {
                TransportError::Unreachable(reason.to_string())
            } else {
                TransportError::Network(reason.to_string())
            };
            let _ = tx.send(Err(err));
        }
        tracing::debug!(peer = %self.addr, reason, "node link closed");
    }
}

struct FrameReplyParts {
    id: u64,
    reply: Reply,
}

impl From<RaftFrameReply> for FrameReplyParts {
    fn from(r: RaftFrameReply) -> Self {
        let reply = match r.reply {
            Some(reply) => reply_payload(reply),
            None => Err(TransportError::Network("reply frame without a reply".into())),
        };
        FrameReplyParts { id: r.id, reply }
    }
}

/// The server half: handles every frame of `incoming` on `inbound` and streams the replies.
pub fn serve(
    inbound: Arc<dyn Inbound>,
    mut incoming: Streaming<RaftBatch>,
) -> ReceiverStream<Result<RaftReplyBatch, Status>> {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<RaftFrameReply>();
    let (out_tx, out_rx) = mpsc::channel(2);
    tokio::spawn(async move {
        // Ends when the peer closes or breaks the stream; handlers still running finish and
        // their replies are dropped with the stream.
        while let Ok(Some(batch)) = incoming.message().await {
            for frame in batch.frames {
                let done = done_tx.clone();
                let inbound = inbound.clone();
                tokio::spawn(async move {
                    let reply = handle_frame(&*inbound, frame.kind, frame.envelope).await;
                    let _ = done.send(RaftFrameReply { id: frame.id, reply: Some(reply) });
                });
            }
        }
    });
    tokio::spawn(async move {
        while let Some(first) = done_rx.recv().await {
            let mut replies = vec![first];
            while replies.len() < BATCH_FRAMES_MAX {
                match done_rx.try_recv() {
                    Ok(r) => replies.push(r),
                    Err(_) => break,
                }
            }
            if out_tx.send(Ok(RaftReplyBatch { replies })).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(out_rx)
}

async fn handle_frame(inbound: &dyn Inbound, kind: i32, envelope: Option<RaftEnvelope>) -> RaftReply {
    let refused = |msg: String| RaftReply { payload: Vec::new(), refused: msg };
    let Some(env) = envelope else { return refused("frame without an envelope".into()) };
    let Ok(kind) = RaftKind::try_from(kind) else { return refused(format!("unknown frame kind {kind}")) };
    match inbound.handle(envelope_from_proto(&env), kind_from_proto(kind), env.payload).await {
        Ok(payload) => RaftReply { payload, refused: String::new() },
        Err(msg) => refused(msg),
    }
}
