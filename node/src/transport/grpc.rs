//! gRPC implementation of the transport: the client side and the tonic service that feeds
//! peers' messages to this node's `Inbound`.
//!
//! One lazily connected HTTP/2 connection per peer address, shared by every group. Raft
//! messages and forwarded requests travel batched on one long-lived stream on it (`mux.rs`);
//! snapshots get a stream of their own each.

use super::mux::{self, envelope_from_proto, envelope_to_proto, reply_payload, PeerLinks};
use super::{Envelope, Inbound, RpcKind, Transport, TransportError, TransportStats, SNAPSHOT_CHUNK_BYTES_MAX};
use floe_proto::internal::raft_transport_client::RaftTransportClient;
use floe_proto::internal::raft_transport_server::RaftTransport;
use floe_proto::internal::{RaftBatch, RaftReply, RaftReplyBatch, SnapshotChunk};
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

/// Outgoing gRPC transport: a connection cache and the per-peer message links.
#[derive(Default, Clone)]
pub struct GrpcTransport {
    channels: Arc<Mutex<BTreeMap<String, Channel>>>,
    links: Arc<PeerLinks>,
}

impl GrpcTransport {
    pub fn new() -> Self {
        Self::default()
    }

    fn channel(&self, addr: &str) -> Result<Channel, TransportError> {
        let mut channels =
            self.channels.lock().map_err(|_| TransportError::Network("channel cache poisoned".into()))?;
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let uri = if addr.starts_with("http://") { addr.to_string() } else { format!("http://{addr}") };
        let channel = Endpoint::from_shared(uri)
            .map_err(|e| TransportError::Unreachable(format!("bad peer address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
            .connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// True when `s` came from failing to connect (the request was certainly not sent).
pub(super) fn is_connect_error(s: &Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = source {
        if e.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        source = e.source();
    }
    false
}

fn map_status(s: Status, timeout: Duration) -> TransportError {
    match s.code() {
        // tonic also reports UNAVAILABLE for a connection that broke mid-call; only a failed
        // connect proves the peer never saw the request.
        tonic::Code::Unavailable if is_connect_error(&s) => TransportError::Unreachable(s.message().to_string()),
        tonic::Code::Unavailable => TransportError::Network(s.message().to_string()),
        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => TransportError::Timeout(timeout),
        tonic::Code::FailedPrecondition => TransportError::Refused(s.message().to_string()),
        _ => TransportError::Network(format!("{}: {}", s.code(), s.message())),
    }
}

/// HTTP/2 flow-control windows: every group's appends share one stream, so the default 64 KiB
/// window would throttle catch-up traffic to one window per round trip.
pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;
pub const CONNECTION_WINDOW_BYTES: u32 = 16 << 20;

impl Transport for GrpcTransport {
    fn call(
        &self,
        addr: String,
        envelope: Envelope,
        kind: RpcKind,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        let this = self.clone();
        Box::pin(async move { this.links.call(&addr, || this.channel(&addr), &envelope, kind, payload, timeout).await })
    }

    fn stats(&self) -> TransportStats {
        let s = self.links.stats();
        TransportStats {
            batches_sent: s.batches.load(Ordering::Relaxed),
            frames_sent: s.frames.load(Ordering::Relaxed),
            bytes_sent: s.bytes.load(Ordering::Relaxed),
            links_opened: s.links_opened.load(Ordering::Relaxed),
        }
    }

    fn send_snapshot(
        &self,
        addr: String,
        envelope: Envelope,
        header: Vec<u8>,
        data: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        let channel = self.channel(&addr);
        Box::pin(async move {
            let mut client = RaftTransportClient::new(channel?).max_decoding_message_size(64 << 20);
            let first = SnapshotChunk {
                envelope: Some(envelope_to_proto(&envelope, header)),
                data: Vec::new(),
                done: data.is_empty(),
            };
            // Each chunk is copied out of `data` only when the stream sends it, so the image
            // is held once, not twice.
            let n = data.len().div_ceil(SNAPSHOT_CHUNK_BYTES_MAX);
            let rest = (0..n).map(move |i| {
                let part = &data[i * SNAPSHOT_CHUNK_BYTES_MAX..data.len().min((i + 1) * SNAPSHOT_CHUNK_BYTES_MAX)];
                SnapshotChunk { envelope: None, data: part.to_vec(), done: i + 1 == n }
            });
            let stream = tokio_stream::iter(std::iter::once(first).chain(rest));
            match tokio::time::timeout(timeout, client.install_snapshot(Request::new(stream))).await {
                Err(_) => Err(TransportError::Timeout(timeout)),
                Ok(Err(s)) => Err(map_status(s, timeout)),
                Ok(Ok(resp)) => reply_payload(resp.into_inner()),
            }
        })
    }
}

/// The tonic service peers call.
pub struct RaftTransportService {
    inbound: Arc<dyn Inbound>,
}

impl RaftTransportService {
    pub fn new(inbound: Arc<dyn Inbound>) -> Self {
        Self { inbound }
    }
}

/// Largest snapshot accepted over the wire.
pub const SNAPSHOT_BYTES_MAX: usize = 4 << 30;

#[tonic::async_trait]
impl RaftTransport for RaftTransportService {
    type StreamStream = ReceiverStream<Result<RaftReplyBatch, Status>>;

    async fn stream(&self, req: Request<Streaming<RaftBatch>>) -> Result<Response<Self::StreamStream>, Status> {
        Ok(Response::new(mux::serve(self.inbound.clone(), req.into_inner())))
    }

    async fn install_snapshot(&self, req: Request<Streaming<SnapshotChunk>>) -> Result<Response<RaftReply>, Status> {
        let mut stream = req.into_inner();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        let env = first.envelope.ok_or_else(|| Status::invalid_argument("first snapshot chunk has no envelope"))?;
        let mut data = first.data;
        let mut done = first.done;
        while !done {
            let Some(chunk) = stream.message().await? else {
                return Err(Status::invalid_argument("snapshot stream ended before the last chunk"));
            };
            if data.len() + chunk.data.len() > SNAPSHOT_BYTES_MAX {
                return Err(Status::resource_exhausted("snapshot larger than the limit"));
            }
            data.extend_from_slice(&chunk.data);
            done = chunk.done;
        }
        let reply = match self.inbound.handle_snapshot(envelope_from_proto(&env), env.payload, data).await {
            Ok(payload) => RaftReply { payload, refused: String::new() },
            Err(refused) => RaftReply { payload: Vec::new(), refused },
        };
        Ok(Response::new(reply))
    }
}

#[cfg(test)]
mod tests {
    //! Both halves of the batched stream over loopback, with a test `Inbound`.
    use super::*;
    use floe_proto::internal::raft_transport_server::RaftTransportServer;

    /// Answers `payload` reversed; a payload starting with `sleep:N` sleeps N ms first; one
    /// starting with `refuse` is refused.
    struct Echo;

    impl Inbound for Echo {
        fn handle(
            &self,
            env: Envelope,
            _kind: RpcKind,
            payload: Vec<u8>,
        ) -> BoxFuture<'static, Result<Vec<u8>, String>> {
            Box::pin(async move {
                let text = String::from_utf8_lossy(&payload).to_string();
                if text.starts_with("refuse") {
                    return Err(format!("refused group {}", env.group_id));
                }
                if let Some(ms) = text.strip_prefix("sleep:").and_then(|r| r.split(':').next()?.parse().ok()) {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                Ok(payload.iter().rev().copied().collect())
            })
        }

        fn handle_snapshot(&self, _: Envelope, _: Vec<u8>, _: Vec<u8>) -> BoxFuture<'static, Result<Vec<u8>, String>> {
            Box::pin(async { Err("no snapshots here".to_string()) })
        }
    }

    async fn start_server() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let service = RaftTransportServer::new(RaftTransportService::new(Arc::new(Echo)));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }

    fn envelope(group: u64) -> Envelope {
        Envelope { cluster_id: "c".into(), group_id: group, from_node: 1, to_node: 2 }
    }

    #[tokio::test]
    async fn concurrent_calls_share_one_batch_and_get_their_own_replies() {
        let addr = start_server().await;
        let transport = GrpcTransport::new();
        // Every call queues before the link's task first runs (one task polls them all), so
        // they leave as one batch; the slow ones answer after the fast ones.
        let payload_of = |i: u64| if i.is_multiple_of(50) { format!("sleep:30:{i}") } else { format!("m{i}") };
        let payload_bytes: usize = (0..500u64).map(|i| payload_of(i).len()).sum();
        let calls = (0..500u64).map(|i| {
            let payload = payload_of(i);
            let t = transport.clone();
            let addr = addr.clone();
            async move {
                let reply = t.call(
                    addr,
                    envelope(i),
                    RpcKind::AppendEntries,
                    payload.clone().into_bytes(),
                    Duration::from_secs(5),
                );
                (payload, reply.await)
            }
        });
        for (payload, reply) in futures::future::join_all(calls).await {
            let expected: Vec<u8> = payload.bytes().rev().collect();
            assert_eq!(reply, Ok(expected), "reply to {payload}");
        }
        let stats = transport.stats();
        assert_eq!(stats.frames_sent, 500);
        assert_eq!(stats.bytes_sent, payload_bytes as u64);
        assert_eq!(stats.batches_sent, 1, "{stats:?}");
        assert_eq!(stats.links_opened, 1);
    }

    #[tokio::test]
    async fn refusal_timeout_and_unreachable_are_told_apart() {
        let addr = start_server().await;
        let transport = GrpcTransport::new();
        let refused =
            transport.call(addr.clone(), envelope(7), RpcKind::Vote, b"refuse".to_vec(), Duration::from_secs(5));
        assert_eq!(refused.await, Err(TransportError::Refused("refused group 7".into())));
        let slow = transport.call(
            addr.clone(),
            envelope(1),
            RpcKind::Forward,
            b"sleep:500".to_vec(),
            Duration::from_millis(50),
        );
        assert_eq!(slow.await, Err(TransportError::Timeout(Duration::from_millis(50))));
        // The link survives a caller that gave up.
        let ok = transport.call(addr.clone(), envelope(1), RpcKind::Forward, b"ab".to_vec(), Duration::from_secs(5));
        assert_eq!(ok.await, Ok(b"ba".to_vec()));
        assert_eq!(transport.stats().links_opened, 1);

        // Nothing listens on a port just released: never delivered, so `Unreachable`.
        let free = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let dead = free.local_addr().expect("addr").to_string();
        drop(free);
        let lost = transport.call(dead, envelope(1), RpcKind::AppendEntries, b"x".to_vec(), Duration::from_secs(5));
        assert!(matches!(lost.await, Err(TransportError::Unreachable(_))));
    }
}
