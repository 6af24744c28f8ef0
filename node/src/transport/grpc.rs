//! gRPC implementation of the transport: a tonic client per peer and the tonic service that
//! feeds peers' messages to this node's `Inbound`.
//!
//! One lazily connected HTTP/2 channel per peer address, shared by every group.

use super::{Envelope, Inbound, RpcKind, Transport, TransportError, SNAPSHOT_CHUNK_BYTES_MAX};
use floe_proto::internal::raft_transport_client::RaftTransportClient;
use floe_proto::internal::raft_transport_server::RaftTransport;
use floe_proto::internal::{RaftEnvelope, RaftReply, SnapshotChunk};
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

fn to_proto(e: &Envelope, payload: Vec<u8>) -> RaftEnvelope {
    RaftEnvelope {
        cluster_id: e.cluster_id.clone(),
        group_id: e.group_id,
        from_node: e.from_node,
        to_node: e.to_node,
        payload,
    }
}

fn from_proto(e: &RaftEnvelope) -> Envelope {
    Envelope { cluster_id: e.cluster_id.clone(), group_id: e.group_id, from_node: e.from_node, to_node: e.to_node }
}

/// Outgoing gRPC transport with a channel cache.
#[derive(Default, Clone)]
pub struct GrpcTransport {
    channels: Arc<Mutex<BTreeMap<String, Channel>>>,
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
            .connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }
}

/// True when `s` came from failing to connect (the request was certainly not sent).
fn is_connect_error(s: &Status) -> bool {
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

fn reply_payload(reply: RaftReply) -> Result<Vec<u8>, TransportError> {
    if reply.refused.is_empty() {
        Ok(reply.payload)
    } else {
        Err(TransportError::Refused(reply.refused))
    }
}

impl Transport for GrpcTransport {
    fn call(
        &self,
        addr: String,
        envelope: Envelope,
        kind: RpcKind,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        let channel = self.channel(&addr);
        Box::pin(async move {
            let mut client = RaftTransportClient::new(channel?).max_decoding_message_size(64 << 20);
            let mut req = Request::new(to_proto(&envelope, payload));
            req.set_timeout(timeout);
            let fut = async {
                match kind {
                    RpcKind::AppendEntries => client.append_entries(req).await,
                    RpcKind::Vote => client.vote(req).await,
                    RpcKind::Forward => client.forward(req).await,
                }
            };
            match tokio::time::timeout(timeout, fut).await {
                Err(_) => Err(TransportError::Timeout(timeout)),
                Ok(Err(s)) => Err(map_status(s, timeout)),
                Ok(Ok(resp)) => reply_payload(resp.into_inner()),
            }
        })
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
            let mut chunks = vec![SnapshotChunk {
                envelope: Some(to_proto(&envelope, header)),
                data: Vec::new(),
                done: data.is_empty(),
            }];
            let n = data.len().div_ceil(SNAPSHOT_CHUNK_BYTES_MAX);
            for (i, part) in data.chunks(SNAPSHOT_CHUNK_BYTES_MAX).enumerate() {
                chunks.push(SnapshotChunk { envelope: None, data: part.to_vec(), done: i + 1 == n });
            }
            let stream = tokio_stream::iter(chunks);
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

    async fn dispatch(&self, req: Request<RaftEnvelope>, kind: RpcKind) -> Result<Response<RaftReply>, Status> {
        let env = req.into_inner();
        let reply = match self.inbound.handle(from_proto(&env), kind, env.payload).await {
            Ok(payload) => RaftReply { payload, refused: String::new() },
            Err(refused) => RaftReply { payload: Vec::new(), refused },
        };
        Ok(Response::new(reply))
    }
}

/// Largest snapshot accepted over the wire.
pub const SNAPSHOT_BYTES_MAX: usize = 4 << 30;

#[tonic::async_trait]
impl RaftTransport for RaftTransportService {
    async fn append_entries(&self, req: Request<RaftEnvelope>) -> Result<Response<RaftReply>, Status> {
        self.dispatch(req, RpcKind::AppendEntries).await
    }

    async fn vote(&self, req: Request<RaftEnvelope>) -> Result<Response<RaftReply>, Status> {
        self.dispatch(req, RpcKind::Vote).await
    }

    async fn forward(&self, req: Request<RaftEnvelope>) -> Result<Response<RaftReply>, Status> {
        self.dispatch(req, RpcKind::Forward).await
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
        let reply = match self.inbound.handle_snapshot(from_proto(&env), env.payload, data).await {
            Ok(payload) => RaftReply { payload, refused: String::new() },
            Err(refused) => RaftReply { payload: Vec::new(), refused },
        };
        Ok(Response::new(reply))
    }
}
