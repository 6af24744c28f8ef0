//! The [`Client`] handle and the one request loop every call goes through.
//!
//! Owns: the lazily created gRPC channels (one per node address, including leader addresses
//! outside the configured endpoint list), the shared [`Router`], and [`Client::call`], which
//! picks a node, runs one attempt under the per-attempt timeout, learns the leader from
//! successful responses, and decides (via `retry::should_retry`) whether to back off and try
//! again.
//!
//! Invariants: at most `attempts_max` attempts per call; a write is repeated only after a
//! retry-safe error; after a retryable failure the node that failed is dropped as leader and
//! the next attempt goes elsewhere. No lock is held across an await.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use floe_proto::v1 as pb;
use floe_proto::v1::admin_client::AdminClient;
use floe_proto::v1::documents_client::DocumentsClient;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use crate::batch::Batch;
use crate::collection::Collection;
use crate::config::{ClientBuilder, ClientConfig, RESPONSE_BYTES_MAX};
use crate::error::{Error, Result};
use crate::retry::{should_retry, OperationKind};
use crate::routing::{Router, Target};
use crate::session::SessionTokens;
use crate::types::ReadConsistency;

/// A Floe client. Cheap to clone; clones share channels and the leader cache.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    router: Mutex<Router>,
    /// The newest position of every response, for `ReadYourWrites` reads.
    session: Mutex<SessionTokens>,
    /// Keyed by normalized address; grows by at most one entry per distinct node address.
    channels: Mutex<HashMap<String, Channel>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Client")
            .field("endpoints", &self.inner.config.endpoints)
            .field("tenant", &self.inner.config.tenant)
            .field("leader", &self.leader())
            .finish()
    }
}

impl Client {
    /// A builder with defaults (tenant `default`, read-your-writes reads, 5 attempts).
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Builds a client with default settings and checks that at least one endpoint accepts a
    /// connection.
    pub async fn connect<I, S>(endpoints: I) -> Result<Client>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Client::builder().endpoints(endpoints).connect().await
    }

    pub(crate) fn from_config(config: ClientConfig) -> Client {
        let router = Router::new(config.endpoints.clone());
        Client {
            inner: Arc::new(Inner {
                config,
                router: Mutex::new(router),
                session: Mutex::new(SessionTokens::default()),
                channels: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The validated configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The tenant requests are made for.
    pub fn tenant(&self) -> &str {
        &self.inner.config.tenant
    }

    /// The leader address currently cached, if any (`http://host:port`).
    pub fn leader(&self) -> Option<String> {
        self.router().leader().map(str::to_owned)
    }

    /// A cheap handle on one collection.
    pub fn collection(&self, name: impl Into<String>) -> Collection {
        Collection::new(self.clone(), name.into())
    }

    /// Starts an atomic batch of writes (all ops must fall into one shard).
    pub fn batch(&self) -> Batch {
        Batch::new(self.clone())
    }

    /// Connects eagerly to the endpoints in order until one accepts; the error of the last
    /// endpoint is returned when none does.
    pub(crate) async fn connect_any(&self) -> Result<()> {
        let mut error_last = Error::Config("no endpoints".into());
        for address in &self.inner.config.endpoints {
            let endpoint = self.endpoint(address)?;
            match endpoint.connect().await {
                Ok(channel) => {
                    self.channels_lock().insert(address.clone(), channel);
                    return Ok(());
                }
                Err(error) => {
                    error_last = Error::Unavailable {
                        code: "unavailable".into(),
                        message: format!("could not connect to {address}: {error}"),
                        retry_safe: true,
                    };
                }
            }
        }
        Err(error_last)
    }

    /// This client's session token: the newest position it saw in every shard group
    /// (what `ReadYourWrites` reads send). Hand it to another client for `Session` reads
    /// that must see this client's writes.
    pub fn session_token(&self) -> String {
        self.session_lock().token()
    }

    /// The session token for a read of `key` (only its shard's position when the routing
    /// cache knows the shard).
    pub(crate) fn session_token_for(&self, key: &[u8]) -> String {
        let group = self.router().shard_for(key).map(|(id, _)| id);
        self.session_lock().token_for(group)
    }

    /// The encoded key of document `id` in `collection` of this client's tenant (the server's
    /// on-disk key order, which shard ranges are expressed in).
    pub(crate) fn doc_key(&self, collection: &str, id: &str) -> Vec<u8> {
        doc_key(self.tenant(), collection, id)
    }

    /// Merges a token obtained elsewhere (e.g. from another client) into this client's session.
    pub fn observe_session_token(&self, token: &str) {
        self.session_lock().observe(token);
    }

    fn session_lock(&self) -> MutexGuard<'_, SessionTokens> {
        // Merging is a map update that cannot be left half done.
        self.inner.session.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn read_consistency_default(&self) -> &ReadConsistency {
        &self.inner.config.read_consistency_default
    }

    /// Wraps a message in a request carrying the per-attempt deadline (`grpc-timeout`), so the
    /// server can give up too.
    pub(crate) fn request<M>(&self, message: M) -> tonic::Request<M> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.inner.config.request_timeout);
        request
    }

    pub(crate) fn documents_client(channel: Channel) -> DocumentsClient<Channel> {
        DocumentsClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX)
    }

    pub(crate) fn admin_client(channel: Channel) -> AdminClient<Channel> {
        AdminClient::new(channel).max_decoding_message_size(RESPONSE_BYTES_MAX)
    }

    /// Runs `attempt` against the node the router picks for `kind`, retrying per the policy.
    ///
    /// `operation` names the call in errors and logs.
    pub(crate) async fn call<Response, Attempt, AttemptFuture>(
        &self,
        kind: OperationKind,
        operation: &'static str,
        attempt: Attempt,
    ) -> Result<Response>
    where
        Response: LeaderHint,
        Attempt: FnMut(Channel) -> AttemptFuture,
        AttemptFuture: Future<Output = std::result::Result<tonic::Response<Response>, Status>>,
    {
        self.call_for(kind, operation, None, attempt).await
    }

    /// `call` for a request about one document key (encoded, see `doc_key`): leader-bound
    /// attempts go to the cached leader of the key's shard.
    pub(crate) async fn call_for<Response, Attempt, AttemptFuture>(
        &self,
        kind: OperationKind,
        operation: &'static str,
        key: Option<&[u8]>,
        mut attempt: Attempt,
    ) -> Result<Response>
    where
        Response: LeaderHint,
        Attempt: FnMut(Channel) -> AttemptFuture,
        AttemptFuture: Future<Output = std::result::Result<tonic::Response<Response>, Status>>,
    {
        let config = &self.inner.config;
        let target = match kind {
            OperationKind::Write | OperationKind::ReadStrong => Target::Leader,
            OperationKind::ReadAny => Target::Any,
        };
        let mut attempts_done: u32 = 0;
        loop {
            let address = self.router().pick_for(target, key);
            let result = match self.channel(&address) {
                Ok(channel) => match tokio::time::timeout(config.request_timeout, attempt(channel)).await {
                    Ok(Ok(response)) => Ok(response.into_inner()),
                    Ok(Err(status)) => Err(Error::from_status(&status)),
                    Err(_elapsed) => Err(Error::Timeout {
                        message: format!(
                            "{operation} to {address}: no answer within {} ms",
                            config.request_timeout.as_millis()
                        ),
                    }),
                },
                Err(error) => Err(error),
            };
            attempts_done += 1;
            match result {
                Ok(response) => {
                    if let Some(leader) = response.leader_grpc_addr() {
                        self.router().observe_leader(leader);
                    }
                    if let Some(m) = response.meta() {
                        self.router().observe_shard(
                            m.shard_id,
                            m.shard_epoch,
                            &m.shard_start,
                            &m.shard_end,
                            &m.leader_grpc_addr,
                        );
                    }
                    if let Some(token) = response.session_token() {
                        self.session_lock().observe(token);
                    }
                    return Ok(response);
                }
                Err(error) => {
                    if error.is_retryable() {
                        self.router().report_failure(&address);
                    }
                    if attempts_done >= config.retry.attempts_max || !should_retry(kind, &error) {
                        return Err(error);
                    }
                    let sleep = config.retry.backoff(attempts_done - 1, rand::random::<f64>());
                    tracing::debug!(
                        operation,
                        %address,
                        attempt = attempts_done,
                        sleep_ms = sleep.as_millis() as u64,
                        %error,
                        "retrying"
                    );
                    tokio::time::sleep(sleep).await;
                }
            }
        }
    }

    fn endpoint(&self, address: &str) -> Result<Endpoint> {
        let endpoint = Endpoint::from_shared(address.to_owned())
            .map_err(|error| Error::Config(format!("endpoint {address}: {error}")))?;
        Ok(endpoint
            .connect_timeout(self.inner.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(std::time::Duration::from_secs(10))
            .keep_alive_timeout(std::time::Duration::from_secs(5)))
    }

    /// The channel for `address`, created lazily (no I/O until the first request).
    fn channel(&self, address: &str) -> Result<Channel> {
        if let Some(channel) = self.channels_lock().get(address) {
            return Ok(channel.clone());
        }
        let channel = self.endpoint(address)?.connect_lazy();
        Ok(self.channels_lock().entry(address.to_owned()).or_insert(channel).clone())
    }

    fn router(&self) -> MutexGuard<'_, Router> {
        // A panic while holding the lock cannot leave the router inconsistent (every method
        // is a few field assignments), so a poisoned lock is still usable.
        self.inner.router.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn channels_lock(&self) -> MutexGuard<'_, HashMap<String, Channel>> {
        self.inner.channels.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Responses that may name the current leader and carry a session token.
/// The server's document key: `0x01 | tenant | 0x00 | collection | 0x00 | id` (the stable
/// on-disk format, `floe_node::keys::doc_key`; an empty tenant is the server's default).
pub fn doc_key(tenant: &str, collection: &str, id: &str) -> Vec<u8> {
    let tenant = if tenant.is_empty() { crate::config::TENANT_DEFAULT } else { tenant };
    let mut k = Vec::with_capacity(3 + tenant.len() + collection.len() + id.len());
    k.push(0x01);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(collection.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

pub(crate) trait LeaderHint {
    /// The response's metadata, when it has one.
    fn meta(&self) -> Option<&pb::ResponseMeta> {
        None
    }
    fn leader_grpc_addr(&self) -> Option<&str> {
        None
    }
    fn session_token(&self) -> Option<&str> {
        None
    }
}

fn meta_leader(meta: &Option<pb::ResponseMeta>) -> Option<&str> {
    meta.as_ref().map(|meta| meta.leader_grpc_addr.as_str()).filter(|address| !address.is_empty())
}

fn meta_session(meta: &Option<pb::ResponseMeta>) -> Option<&str> {
    meta.as_ref().map(|meta| meta.session_token.as_str()).filter(|token| !token.is_empty())
}

impl LeaderHint for pb::GetResponse {
    fn meta(&self) -> Option<&pb::ResponseMeta> {
        self.meta.as_ref()
    }
    fn leader_grpc_addr(&self) -> Option<&str> {
        meta_leader(&self.meta)
    }
    fn session_token(&self) -> Option<&str> {
        meta_session(&self.meta)
    }
}
impl LeaderHint for pb::WriteResponse {
    fn meta(&self) -> Option<&pb::ResponseMeta> {
        self.meta.as_ref()
    }
    fn leader_grpc_addr(&self) -> Option<&str> {
        meta_leader(&self.meta)
    }
    fn session_token(&self) -> Option<&str> {
        meta_session(&self.meta)
    }
}
impl LeaderHint for pb::BatchGetResponse {
    fn meta(&self) -> Option<&pb::ResponseMeta> {
        self.meta.as_ref()
    }
    fn leader_grpc_addr(&self) -> Option<&str> {
        meta_leader(&self.meta)
    }
    fn session_token(&self) -> Option<&str> {
        meta_session(&self.meta)
    }
}
impl LeaderHint for pb::BatchResponse {
    fn meta(&self) -> Option<&pb::ResponseMeta> {
        self.meta.as_ref()
    }
    fn leader_grpc_addr(&self) -> Option<&str> {
        meta_leader(&self.meta)
    }
    fn session_token(&self) -> Option<&str> {
        meta_session(&self.meta)
    }
}
impl LeaderHint for pb::CreateCollectionResponse {}
impl LeaderHint for pb::ListCollectionsResponse {}
impl LeaderHint for pb::DropCollectionResponse {}
impl LeaderHint for pb::ClusterStatusResponse {}
impl LeaderHint for pb::AddNodeResponse {}
impl LeaderHint for pb::RemoveNodeResponse {}
impl LeaderHint for pb::ReplicaStatusResponse {}
impl LeaderHint for pb::SplitShardResponse {}
impl LeaderHint for pb::MergeShardsResponse {}
impl LeaderHint for pb::MoveReplicaResponse {}
impl LeaderHint for pb::TransferLeaderResponse {}

impl ClientBuilder {
    /// Builds the client and checks that at least one endpoint accepts a connection.
    pub async fn connect(self) -> Result<Client> {
        let client = self.build()?;
        client.connect_any().await?;
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        port
    }

    #[tokio::test]
    async fn connect_fails_cleanly_when_nothing_listens() {
        let error = Client::connect([format!("127.0.0.1:{}", closed_port())]).await.expect_err("nothing listens");
        assert!(error.is_retry_safe(), "{error:?}");
    }

    /// A write against dead endpoints ends, after the bounded attempts, with a retry-safe
    /// error (connect failures prove the request was never sent).
    #[tokio::test]
    async fn write_to_dead_endpoints_retries_bounded() {
        let client = Client::builder()
            .endpoints([format!("127.0.0.1:{}", closed_port()), format!("127.0.0.1:{}", closed_port())])
            .retry(3, Duration::from_millis(1), Duration::from_millis(5))
            .build()
            .expect("config");
        let error = client.collection("c").put("d", &serde_json::json!({"a": 1})).await.expect_err("nothing listens");
        assert!(error.is_retry_safe(), "{error:?}");
    }
}
