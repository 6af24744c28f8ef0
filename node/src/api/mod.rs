//! `NodeApi`: the request handlers as plain async functions, shared by gRPC, HTTP and the
//! simulator.
//!
//! Owns: input validation (nothing reaches raft unchecked), collection resolution, routing a
//! key to its shard, the read paths per consistency level, session tokens and request units.
//! tonic (`grpc.rs`) and axum (`http.rs`) only translate to and from these types.
//!
//! Routing: a key goes to the shard that the newest description owns it in, taken from this
//! node's copy of the catalog and from its own replicas' applied states (after a split a
//! replica knows before the catalog does). A stale route is never applied to the wrong shard:
//! a write is refused by apply (`WrongGroup`, certainly not applied) and re-routed; a read
//! re-checks, once its position is applied, that the shard still owns the key, else re-routes
//! (DESIGN invariant 7).
//!
//! Invariants:
//! - every write is validated before it is proposed, and re-checked by apply (patches);
//! - a STRONG read returns state at least as new as every write acknowledged before it
//!   started: the group leader confirms leadership (batched read index) and the serving
//!   replica waits until it applied that position;
//! - a BOUNDED_STALENESS read with bound S returns state containing every write committed
//!   more than S before it was served, proved with this node's own clock (`raft::freshness`);
//!   a replica that cannot prove it (leader unreachable) refuses with a retryable 503;
//! - a SESSION read returns state at or after its token's position;
//! - an EVENTUAL read returns this replica's applied state, no waiting.

pub mod elastic;
pub mod error;
mod forward;
pub mod grpc;
pub mod http;
pub mod membership;

pub use error::ApiError;

use crate::catalog::{CatalogCommand, CatalogReader, CatalogResponse, CollectionInfo, NodeInfo, ShardDesc};
use crate::docs::{self, limits, DocAction, DocBatch, DocOp, DocWriteResult, Limits, StoredDoc};
use crate::keys;
use crate::load::GroupLoad;
use crate::metrics::Metrics;
use crate::raft::host::{BoundedPath, RaftHost};
use crate::raft::types::{Command, CommandResponse, GroupId, NodeId};
use crate::storage::Cf;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How fresh a read must be.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum ReadConsistency {
    #[default]
    Strong,
    BoundedStaleness {
        max_staleness_ms: u64,
    },
    Session {
        token: String,
    },
    Eventual,
}

impl ReadConsistency {
    /// The level's name in metrics and messages.
    pub fn name(&self) -> &'static str {
        match self {
            ReadConsistency::Strong => "strong",
            ReadConsistency::BoundedStaleness { .. } => "bounded",
            ReadConsistency::Session { .. } => "session",
            ReadConsistency::Eventual => "eventual",
        }
    }
}

/// A stored document as returned to users.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DocView {
    pub collection: String,
    pub id: String,
    pub version: u64,
    pub json: String,
}

/// Batch get results in request order: each id with its document, `None` when absent.
pub type BatchGetItems = Vec<(String, Option<DocView>)>;

/// What every response carries besides its payload.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ResponseMeta {
    /// `group:index`, the position this response reflects (pass it on for session reads).
    pub session_token: String,
    pub request_units: f64,
    pub served_by: NodeId,
    /// The group leader as this node knows it.
    pub leader: Option<(NodeId, String)>,
    /// The shard that served the request as this node's replica applied it.
    pub shard: Option<crate::shard::GroupState>,
}

/// One write of a batch, as received (validated by `NodeApi`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteRequest {
    pub collection: String,
    pub id: String,
    pub action: DocAction,
}

/// Node and shard view for `ClusterStatus` and `/v1/cluster`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterStatus {
    pub answered_by: NodeId,
    pub meta_leader: Option<NodeId>,
    pub nodes: Vec<(NodeInfo, &'static str)>,
    pub shards: Vec<ShardStatus>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ShardStatus {
    pub desc: ShardDesc,
    pub leader: Option<NodeId>,
    pub state: &'static str,
    pub qps: f64,
    pub applied_index: u64,
}

/// Request units: 1 per KiB read, 5 per KiB written (at least one KiB per document).
pub fn read_units(bytes: usize) -> f64 {
    bytes.div_ceil(1024).max(1) as f64
}
pub fn write_units(bytes: usize) -> f64 {
    5.0 * bytes.div_ceil(1024).max(1) as f64
}

/// Records a read's latency per consistency level when dropped (errors included).
struct ReadTimer<'a> {
    metrics: &'a Metrics,
    consistency: &'static str,
    started: tokio::time::Instant,
}

impl<'a> ReadTimer<'a> {
    fn start(metrics: &'a Metrics, consistency: &ReadConsistency) -> Self {
        Self { metrics, consistency: consistency.name(), started: tokio::time::Instant::now() }
    }
}

impl Drop for ReadTimer<'_> {
    fn drop(&mut self) {
        self.metrics.observe_read_latency(self.consistency, self.started.elapsed());
    }
}

/// The node's request handlers.
pub struct NodeApi {
    pub node_id: NodeId,
    pub limits: Limits,
    host: Arc<RaftHost>,
    catalog: CatalogReader,
    pub metrics: Arc<Metrics>,
    /// Thresholds of the placement driver (used when this node leads the meta group).
    pub placement: crate::placement::PlacementConfig,
    load: Mutex<BTreeMap<GroupId, GroupLoad>>,
    /// Request ids: `node-nonce-counter`, unique across restarts (the nonce is random).
    request_nonce: u64,
    /// Set once the node finished starting (bootstrap, or its join).
    started: std::sync::atomic::AtomicBool,
    request_counter: std::sync::atomic::AtomicU64,
}

fn tenant_or_default(t: &str) -> &str {
    if t.is_empty() {
        docs::DEFAULT_TENANT
    } else {
        t
    }
}

impl NodeApi {
    pub fn new(
        node_id: NodeId,
        limits: Limits,
        placement: crate::placement::PlacementConfig,
        host: Arc<RaftHost>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let catalog = host.catalog.clone();
        let request_nonce = rand::RngCore::next_u64(&mut crate::raft::runtime::FloeRng);
        Self {
            node_id,
            limits,
            host,
            catalog,
            metrics,
            placement,
            load: Mutex::new(BTreeMap::new()),
            request_nonce,
            started: std::sync::atomic::AtomicBool::new(false),
            request_counter: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn host(&self) -> &Arc<RaftHost> {
        &self.host
    }

    pub fn catalog(&self) -> &CatalogReader {
        &self.catalog
    }

    fn record_load(&self, group: GroupId, key: &[u8]) {
        if let Ok(mut l) = self.load.lock() {
            l.entry(group).or_default().record(tokio::time::Instant::now(), key);
        }
    }

    /// Request rates and sampled keys of every group this node served recently.
    pub fn load_snapshot(&self) -> Vec<(GroupId, f64, Vec<Vec<u8>>)> {
        let now = tokio::time::Instant::now();
        let Ok(mut l) = self.load.lock() else { return Vec::new() };
        l.retain(|_, g| g.rate_per_s(now) > 0.0);
        l.iter_mut().map(|(g, load)| (*g, load.rate_per_s(now), load.sampled_keys())).collect()
    }

    /// The shard owning `key`: the newest (highest epoch) of what this node's catalog copy
    /// and its own replicas say.
    pub fn route(&self, key: &[u8]) -> Result<GroupId, ApiError> {
        let catalog = self.catalog.shard_map()?.ranges.lookup(key);
        let local = self.host.local.range_map().lookup(key).filter(|(g, _)| *g != keys::META_GROUP);
        let newest = match (catalog, local) {
            (Some(c), Some(l)) => Some(if l.1 > c.1 { l } else { c }),
            (c, l) => c.or(l),
        };
        newest.map(|(g, _)| g).ok_or_else(|| ApiError::Unavailable {
            message: "the shard map is not known on this node yet (cluster still starting)".into(),
            retry_safe: true,
        })
    }

    /// True when this node's replica of `group` owns `key` at what it has applied.
    fn replica_owns(&self, group: GroupId, key: &[u8]) -> bool {
        self.host.local.get(group).is_some_and(|s| s.contains(key))
    }

    /// Before re-routing after the shard map changed under a request: a short, growing pause
    /// (the catalog and local replicas catch up), or the final retryable error.
    async fn before_reroute(&self, attempt: u32, what: &str) -> Result<(), ApiError> {
        if attempt + 1 >= ROUTE_ATTEMPTS_MAX {
            return Err(ApiError::Unavailable {
                message: format!("{what}: the shard map kept changing during the request; retry"),
                retry_safe: true,
            });
        }
        tokio::time::sleep(Duration::from_millis(5u64 << attempt.min(6))).await;
        Ok(())
    }

    /// This replica's applied index of `group` (0 when the group is not hosted here).
    fn applied_index(&self, group: GroupId) -> u64 {
        self.host.applied_index(group)
    }

    /// The session position a read reflects. The replica may have applied past the read's
    /// position before it read, so the data can be newer than the position: the token must
    /// cover what was returned (found by the simulator, seed 1046: a session read went behind
    /// a version its client had already read).
    fn seen_position(&self, group: GroupId, position: u64, newest_version_read: u64) -> u64 {
        position.max(newest_version_read).max(self.applied_index(group))
    }

    fn meta_for(&self, group: GroupId, index: u64, units: f64) -> ResponseMeta {
        let leader = self.host.group(group).and_then(|g| g.leader());
        ResponseMeta {
            session_token: format!("{group}:{index}"),
            request_units: units,
            served_by: self.node_id,
            leader,
            shard: self.host.local.get(group),
        }
    }

    fn check_tenant_collection(&self, tenant: &str, collection: &str) -> Result<(), ApiError> {
        limits::check_name("tenant", tenant, &self.limits)?;
        limits::check_name("collection", collection, &self.limits)?;
        Ok(())
    }

    /// Resolves a collection for a read; unknown ones are an error (checked against the
    /// meta leader for strong reads, so a just-created collection is found).
    async fn require_collection(&self, tenant: &str, collection: &str, strong: bool) -> Result<(), ApiError> {
        if self.catalog.collection(tenant, collection)?.is_some() {
            return Ok(());
        }
        if strong {
            self.host.linearizable_position(keys::META_GROUP).await?;
            if self.catalog.collection(tenant, collection)?.is_some() {
                return Ok(());
            }
        }
        Err(ApiError::NotFound {
            code: "collection_not_found",
            message: format!("collection {collection:?} of tenant {tenant:?} does not exist"),
        })
    }

    /// Ensures a collection exists for a write, creating it on first use.
    async fn ensure_collection(&self, tenant: &str, collection: &str) -> Result<(), ApiError> {
        if self.catalog.collection(tenant, collection)?.is_some() {
            return Ok(());
        }
        self.create_collection(tenant, collection).await.map(|_| ())
    }

    /// Reads the position a read must reflect, per consistency level, and counts how it was
    /// found (`floe_read_paths_total`).
    async fn read_position(&self, group: GroupId, consistency: &ReadConsistency) -> Result<u64, ApiError> {
        let leads = self.host.group(group).is_some_and(|g| g.is_leader());
        // Every level, eventual too: this node's data holds nothing of a shard it has no
        // replica of (a "not found" would be a lie). The public read paths sent such a read
        // to a replica (`forward`); this is a route that changed under the request.
        if !self.host.hosts(group) {
            return Err(ApiError::Unavailable {
                message: format!(
                    "shard {group} has no replica on node {}; send the request to one of its replicas",
                    self.node_id
                ),
                retry_safe: true,
            });
        }
        let through_leader = if leads { "read_index" } else { "forwarded" };
        let (position, path) = match consistency {
            ReadConsistency::Strong if crate::planted::is_planted("stale-strong-read") => {
                (self.applied_index(group), "local")
            }
            ReadConsistency::Strong => (self.host.linearizable_position(group).await?, through_leader),
            ReadConsistency::Eventual => (self.applied_index(group), "local"),
            ReadConsistency::Session { token } => {
                let (position, waited) = self.session_position(group, token).await?;
                (position, waited.unwrap_or(through_leader))
            }
            ReadConsistency::BoundedStaleness { .. } if crate::planted::is_planted("stale-bounded-read") => {
                (self.applied_index(group), "local")
            }
            ReadConsistency::BoundedStaleness { max_staleness_ms } => {
                let bound = Duration::from_millis(*max_staleness_ms);
                match self.host.bounded_position(group, bound).await {
                    Ok((position, BoundedPath::Local)) => (position, "local"),
                    Ok((position, BoundedPath::WaitedApply)) => (position, "waited"),
                    Ok((position, BoundedPath::Refreshed)) => (position, through_leader),
                    Err(e) => {
                        self.metrics.observe_read_path(consistency.name(), "refused");
                        return Err(ApiError::Unavailable {
                            message: format!(
                                "this replica cannot prove its state is within {max_staleness_ms} ms of the \
                                 leader's ({e}); retry, or read from another node"
                            ),
                            retry_safe: true,
                        });
                    }
                }
            }
        };
        self.metrics.observe_read_path(consistency.name(), path);
        Ok(position)
    }

    /// A SESSION read: this replica serves once it applied the token's position (waiting up
    /// to `SESSION_WAIT`); otherwise, or for a token of another group, it falls back to a
    /// linearizable position, which is always at least as new as any token. Returns the
    /// position and, when served here, `"local"` or `"waited"` (`None`: through the leader).
    async fn session_position(&self, group: GroupId, token: &str) -> Result<(u64, Option<&'static str>), ApiError> {
        if token.is_empty() {
            return Ok((self.applied_index(group), Some("local")));
        }
        let positions = parse_session_token(token)?;
        if crate::planted::is_planted("lost-session") {
            return Ok((self.applied_index(group), Some("local")));
        }
        // A token of the shard this one was split from (or merged from) covers it up to the
        // split (the merge): this replica's state started there.
        let covered =
            self.host.local.get(group).is_some_and(|s| {
                s.covers().any(|(parent, at)| positions.iter().any(|(g, i)| *g == parent && *i <= at))
            });
        if covered && !positions.iter().any(|(g, _)| *g == group) {
            return Ok((self.applied_index(group), Some("local")));
        }
        // A token without this group (e.g. the key's range moved to another group since the
        // client saw it) falls back to a linearizable position: always at least as new.
        let Some(&(_, index)) = positions.iter().find(|(g, _)| *g == group) else {
            return Ok((self.host.linearizable_position(group).await?, None));
        };
        match self.host.wake(group).await.ok() {
            Some(g) if g.applied_index() >= index => Ok((g.applied_index(), Some("local"))),
            Some(g) if g.wait_applied(index, SESSION_WAIT).await => Ok((g.applied_index(), Some("waited"))),
            _ => Ok((self.host.linearizable_position(group).await?, None)),
        }
    }

    fn read_doc(&self, tenant: &str, collection: &str, id: &str) -> Result<Option<DocView>, ApiError> {
        let key = keys::doc_key(tenant, collection, id);
        self.host.engine().get(Cf::Data, &key)?.map(|v| doc_view(collection, id, &v)).transpose()
    }

    /// Reads one document.
    #[tracing::instrument(level = "debug", skip_all, fields(node = self.node_id, collection = %collection, shard = tracing::field::Empty))]
    pub async fn get(
        &self,
        tenant: &str,
        collection: &str,
        id: &str,
        consistency: &ReadConsistency,
    ) -> Result<(DocView, ResponseMeta), ApiError> {
        let _timer = ReadTimer::start(&self.metrics, consistency);
        let tenant = tenant_or_default(tenant);
        self.check_tenant_collection(tenant, collection)?;
        limits::check_id(id, &self.limits)?;
        // Only EVENTUAL trusts the local catalog for "no such collection"; the others confirm
        // with the meta leader (a lagging replica may not know a new collection yet).
        let strong = *consistency != ReadConsistency::Eventual;
        self.require_collection(tenant, collection, strong).await?;
        let key = keys::doc_key(tenant, collection, id);
        let first = self.route(&key)?;
        if !self.host.hosts(first) {
            let ids = [id.to_string()];
            let (mut items, meta) = self.read_through_replica(first, tenant, collection, &ids, consistency).await?;
            return match items.pop().and_then(|(_, d)| d) {
                Some(doc) => Ok((doc, meta)),
                None => Err(ApiError::NotFound {
                    code: "not_found",
                    message: format!("document {collection}/{id} not found"),
                }),
            };
        }
        let mut attempt = 0;
        let (group, position) = loop {
            let group = self.route(&key)?;
            self.record_load(group, &key);
            let position = self.read_position(group, consistency).await?;
            // Once the position is applied, the shard must still own the key: a split or
            // merge applied meanwhile hands it to another shard.
            if self.replica_owns(group, &key) {
                break (group, position);
            }
            self.before_reroute(attempt, &format!("reading {collection}/{id}")).await?;
            attempt += 1;
        };
        tracing::Span::current().record("shard", group);
        match self.read_doc(tenant, collection, id)? {
            Some(doc) => {
                let units = read_units(doc.json.len());
                let seen = self.seen_position(group, position, doc.version);
                Ok((doc, self.meta_for(group, seen, units)))
            }
            None => {
                Err(ApiError::NotFound { code: "not_found", message: format!("document {collection}/{id} not found") })
            }
        }
    }

    /// Reads many documents of one collection; absent ones are `None`, in request order.
    #[tracing::instrument(level = "debug", skip_all, fields(node = self.node_id, collection = %collection))]
    pub async fn batch_get(
        &self,
        tenant: &str,
        collection: &str,
        ids: &[String],
        consistency: &ReadConsistency,
    ) -> Result<(BatchGetItems, ResponseMeta), ApiError> {
        let _timer = ReadTimer::start(&self.metrics, consistency);
        let tenant = tenant_or_default(tenant);
        let keys = self.batch_get_keys(tenant, collection, ids, consistency).await?;
        let owners = keys.iter().map(|k| self.route(k)).collect::<Result<Vec<_>, _>>()?;
        if owners.iter().any(|g| !self.host.hosts(*g)) {
            return self.batch_get_scattered(tenant, collection, ids, &owners, consistency).await;
        }
        self.read_here(collection, ids, keys, consistency).await
    }

    /// `batch_get` served from this node's replicas only (a read another node forwarded
    /// here): a shard without a replica here is a retryable error.
    async fn batch_get_here(
        &self,
        tenant: &str,
        collection: &str,
        ids: &[String],
        consistency: &ReadConsistency,
    ) -> Result<(BatchGetItems, ResponseMeta), ApiError> {
        let _timer = ReadTimer::start(&self.metrics, consistency);
        let keys = self.batch_get_keys(tenant, collection, ids, consistency).await?;
        self.read_here(collection, ids, keys, consistency).await
    }

    /// Checks a batch get's names, ids and collection; the ids' document keys.
    async fn batch_get_keys(
        &self,
        tenant: &str,
        collection: &str,
        ids: &[String],
        consistency: &ReadConsistency,
    ) -> Result<Vec<Vec<u8>>, ApiError> {
        self.check_tenant_collection(tenant, collection)?;
        if ids.len() > self.limits.batch_ops_max {
            return Err(ApiError::invalid(
                "invalid_batch",
                format!("{} ids requested, the limit is {}", ids.len(), self.limits.batch_ops_max),
            ));
        }
        for id in ids {
            limits::check_id(id, &self.limits)?;
        }
        let strong = *consistency != ReadConsistency::Eventual;
        self.require_collection(tenant, collection, strong).await?;
        Ok(ids.iter().map(|id| keys::doc_key(tenant, collection, id)).collect())
    }

    /// A batch get some of whose shards have no replica here: each such shard's ids go to
    /// one of its replicas, the rest are read here; results in request order, the session
    /// token naming every shard read.
    async fn batch_get_scattered(
        &self,
        tenant: &str,
        collection: &str,
        ids: &[String],
        owners: &[GroupId],
        consistency: &ReadConsistency,
    ) -> Result<(BatchGetItems, ResponseMeta), ApiError> {
        let mut local_ids = Vec::new();
        let mut remote: BTreeMap<GroupId, Vec<String>> = BTreeMap::new();
        for (id, g) in ids.iter().zip(owners) {
            if self.host.hosts(*g) {
                local_ids.push(id.clone());
            } else {
                remote.entry(*g).or_default().push(id.clone());
            }
        }
        let mut found: BTreeMap<String, Option<DocView>> = BTreeMap::new();
        let mut tokens = Vec::new();
        let mut units = 0.0;
        let mut served_by = self.node_id;
        if !local_ids.is_empty() {
            let local_keys = local_ids.iter().map(|id| keys::doc_key(tenant, collection, id)).collect();
            let (items, meta) = self.read_here(collection, &local_ids, local_keys, consistency).await?;
            found.extend(items);
            tokens.push(meta.session_token);
            units += meta.request_units;
        }
        for (group, group_ids) in &remote {
            let (items, meta) = self.read_through_replica(*group, tenant, collection, group_ids, consistency).await?;
            found.extend(items);
            tokens.push(meta.session_token);
            units += meta.request_units;
            if local_ids.is_empty() && remote.len() == 1 {
                served_by = meta.served_by;
            }
        }
        let items = ids.iter().map(|id| (id.clone(), found.get(id).cloned().flatten())).collect();
        // One position per group (a token naming a group twice is malformed): the parts
        // read disjoint groups, unless a replica moved here during the request.
        let mut groups = std::collections::BTreeSet::new();
        tokens.retain(|t| t.split_once(':').is_some_and(|(g, _)| groups.insert(g.to_string())));
        let meta = ResponseMeta {
            session_token: tokens.join(","),
            request_units: units,
            served_by,
            leader: None,
            shard: None,
        };
        Ok((items, meta))
    }

    /// Reads `keys` (of `ids`) from this node's replicas at `consistency`.
    async fn read_here(
        &self,
        collection: &str,
        ids: &[String],
        keys: Vec<Vec<u8>>,
        consistency: &ReadConsistency,
    ) -> Result<(BatchGetItems, ResponseMeta), ApiError> {
        // Scatter: group keys by shard and take one read position per shard; then re-check
        // that every shard still owns its keys (else re-route them all).
        let mut attempt = 0;
        let positions = loop {
            let mut positions: BTreeMap<GroupId, u64> = BTreeMap::new();
            let mut owners = Vec::with_capacity(keys.len());
            for key in &keys {
                let g = self.route(key)?;
                owners.push(g);
                if let std::collections::btree_map::Entry::Vacant(slot) = positions.entry(g) {
                    self.record_load(g, key);
                    slot.insert(self.read_position(g, consistency).await?);
                }
            }
            if keys.iter().zip(&owners).all(|(k, g)| self.replica_owns(*g, k)) {
                break positions;
            }
            self.before_reroute(attempt, "batch get").await?;
            attempt += 1;
        };
        // Gather with one consistent read of every key: a batch applied meanwhile is seen
        // whole or not at all (a shard applies each entry atomically).
        let values = self.host.engine().multi_get(Cf::Data, &keys)?;
        let mut out = Vec::with_capacity(ids.len());
        let mut bytes = 0;
        for (id, value) in ids.iter().zip(values) {
            let d = value.map(|v| doc_view(collection, id, &v)).transpose()?;
            bytes += d.as_ref().map(|d| d.json.len()).unwrap_or(0);
            out.push((id.clone(), d));
        }
        let (group, position) = positions.iter().next().map(|(g, p)| (*g, *p)).unwrap_or((keys::FIRST_SHARD, 0));
        let newest = out.iter().filter_map(|(_, d)| d.as_ref().map(|d| d.version)).max().unwrap_or(0);
        let seen = self.seen_position(group, position, newest);
        Ok((out, self.meta_for(group, seen, read_units(bytes))))
    }

    /// Validates one write and returns it with canonical JSON text.
    fn validate_write(&self, tenant: &str, w: WriteRequest) -> Result<DocOp, ApiError> {
        self.check_tenant_collection(tenant, &w.collection)?;
        limits::check_id(&w.id, &self.limits)?;
        let canonical = |json: &str| -> Result<String, ApiError> { Ok(limits::parse_document(json, &self.limits)?.1) };
        let action = match w.action {
            DocAction::Put { json, expected } => DocAction::Put { json: canonical(&json)?, expected },
            DocAction::Create { json } => DocAction::Create { json: canonical(&json)? },
            DocAction::Replace { json, expected } => DocAction::Replace { json: canonical(&json)?, expected },
            DocAction::MergePatch { patch, expected } => {
                let v = limits::parse_patch(&patch, &self.limits)?;
                DocAction::MergePatch { patch: v.to_string(), expected }
            }
            DocAction::JsonPatch { patch, expected } => {
                let v = limits::parse_patch(&patch, &self.limits)?;
                if serde_json::from_value::<json_patch::Patch>(v.clone()).is_err() {
                    return Err(ApiError::invalid(
                        "invalid_patch",
                        "a JSON patch must be an array of RFC 6902 operations ({\"op\", \"path\", ...})",
                    ));
                }
                DocAction::JsonPatch { patch: v.to_string(), expected }
            }
            DocAction::Delete { expected } => DocAction::Delete { expected },
        };
        Ok(DocOp { collection: w.collection, id: w.id, action })
    }

    /// Applies writes atomically (all in one shard). Returns one result per write.
    #[tracing::instrument(level = "debug", skip_all, fields(node = self.node_id, collection = tracing::field::Empty, shard = tracing::field::Empty, ops = writes.len()))]
    pub async fn write(
        &self,
        tenant: &str,
        writes: Vec<WriteRequest>,
    ) -> Result<(Vec<DocWriteResult>, ResponseMeta), ApiError> {
        let tenant = tenant_or_default(tenant).to_string();
        if writes.is_empty() {
            return Err(ApiError::invalid("invalid_batch", "a batch needs at least one operation"));
        }
        if writes.len() > self.limits.batch_ops_max {
            return Err(ApiError::invalid(
                "invalid_batch",
                format!("{} operations, the limit is {}", writes.len(), self.limits.batch_ops_max),
            ));
        }
        let mut ops = Vec::with_capacity(writes.len());
        let mut bytes = 0usize;
        let many = writes.len() > 1;
        for (i, w) in writes.into_iter().enumerate() {
            let op = self.validate_write(&tenant, w).map_err(|e| if many { prefix_batch_error(e, i) } else { e })?;
            bytes += match &op.action {
                DocAction::Put { json, .. } | DocAction::Create { json } | DocAction::Replace { json, .. } => {
                    json.len()
                }
                DocAction::MergePatch { patch, .. } | DocAction::JsonPatch { patch, .. } => patch.len(),
                DocAction::Delete { .. } => 0,
            };
            ops.push(op);
        }
        if let Some(first) = ops.first() {
            tracing::Span::current().record("collection", first.collection.as_str());
        }
        let collections: std::collections::BTreeSet<&str> = ops.iter().map(|o| o.collection.as_str()).collect();
        for c in collections {
            self.ensure_collection(&tenant, c).await?;
        }
        let keys: Vec<Vec<u8>> = ops.iter().map(|op| keys::doc_key(&tenant, &op.collection, &op.id)).collect();
        let n = self.request_counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // One id for every attempt: a refusal by apply (`WrongGroup`) is definite, and the id
        // is deduplicated per shard.
        let request_id = Some(format!("{:x}-{:x}-{n:x}", self.node_id, self.request_nonce));
        let batch = DocBatch { tenant, ops, limits: self.limits, request_id };
        let mut attempt = 0;
        loop {
            let mut group = None;
            for key in &keys {
                let g = self.route(key)?;
                if group.is_some_and(|prev| prev != g) {
                    return Err(ApiError::invalid(
                        "cross_shard_batch",
                        "an atomic batch must stay within one shard, and these documents are in different shards",
                    ));
                }
                group = Some(g);
            }
            let group = group.unwrap_or(keys::FIRST_SHARD);
            tracing::Span::current().record("shard", group);
            if let Some(key) = keys.first() {
                self.record_load(group, key);
            }
            if crate::planted::is_planted("ack-before-commit") {
                return Ok(self.ack_before_commit(group, batch, bytes));
            }
            let (index, resp) = self.host.propose_docs(group, batch.clone()).await?;
            return match resp {
                CommandResponse::Docs(Ok(results)) => {
                    let units = write_units(bytes);
                    Ok((results, self.meta_for(group, index, units)))
                }
                CommandResponse::Docs(Err(e)) => {
                    let api = ApiError::from(e.error.clone());
                    Err(if many { prefix_batch_error(api, e.op_index) } else { api })
                }
                CommandResponse::WrongGroup(m) => {
                    // The shard no longer owns a key (a split applied before this entry):
                    // certainly not applied. Let this node's replica reach that entry, so its
                    // own state routes the retry.
                    if let Some(h) = self.host.group(group) {
                        h.wait_applied(index, Duration::from_millis(200)).await;
                    }
                    self.before_reroute(attempt, &format!("writing ({m})")).await?;
                    attempt += 1;
                    continue;
                }
                CommandResponse::Retry(m) => {
                    // Certainly not applied (a shard being merged, or a batch of one log entry
                    // overlapping another): try again shortly, re-routed.
                    self.before_reroute(attempt, &format!("writing ({m})")).await?;
                    attempt += 1;
                    continue;
                }
                other => Err(ApiError::Internal { message: format!("unexpected apply result {other:?}") }),
            };
        }
    }

    /// Planted bug `ack-before-commit`: hands the batch to raft and acknowledges at once.
    fn ack_before_commit(&self, group: GroupId, batch: DocBatch, bytes: usize) -> (Vec<DocWriteResult>, ResponseMeta) {
        let results = batch
            .ops
            .iter()
            .map(|o| DocWriteResult { collection: o.collection.clone(), id: o.id.clone(), version: 0, json: None })
            .collect();
        let host = self.host.clone();
        crate::raft::runtime::spawn(async move {
            let _ = host.propose(group, Command::Docs(batch)).await;
        });
        (results, self.meta_for(group, 0, write_units(bytes)))
    }

    async fn propose_catalog(&self, cmd: CatalogCommand) -> Result<CatalogResponse, ApiError> {
        match self.host.propose(keys::META_GROUP, Command::Catalog(cmd)).await? {
            (_, CommandResponse::Catalog(r)) => Ok(r),
            (_, other) => Err(ApiError::Internal { message: format!("unexpected catalog result {other:?}") }),
        }
    }

    pub async fn create_collection(&self, tenant: &str, name: &str) -> Result<(CollectionInfo, bool), ApiError> {
        let tenant = tenant_or_default(tenant);
        self.check_tenant_collection(tenant, name)?;
        match self
            .propose_catalog(CatalogCommand::CreateCollection { tenant: tenant.into(), name: name.into() })
            .await?
        {
            CatalogResponse::Collection { info, created } => Ok((info, created)),
            other => Err(ApiError::Internal { message: format!("unexpected catalog result {other:?}") }),
        }
    }

    pub async fn list_collections(&self, tenant: &str) -> Result<Vec<CollectionInfo>, ApiError> {
        let tenant = tenant_or_default(tenant);
        limits::check_name("tenant", tenant, &self.limits)?;
        self.host.linearizable_position(keys::META_GROUP).await?;
        Ok(self.catalog.collections(Some(tenant))?)
    }

    /// Drops a collection and deletes its documents on every shard.
    pub async fn drop_collection(&self, tenant: &str, name: &str) -> Result<bool, ApiError> {
        let tenant = tenant_or_default(tenant);
        self.check_tenant_collection(tenant, name)?;
        let existed = match self
            .propose_catalog(CatalogCommand::DropCollection { tenant: tenant.into(), name: name.into() })
            .await?
        {
            CatalogResponse::CollectionDropped { existed } => existed,
            other => return Err(ApiError::Internal { message: format!("unexpected catalog result {other:?}") }),
        };
        // Walk the collection's key range shard by shard, as the shards own it now; a shard
        // being merged (retry) or split or merged away meanwhile (wrong group) is walked again.
        let prefix = keys::collection_prefix(tenant, name);
        let end = crate::storage::engine::prefix_end(&prefix);
        let mut cursor = prefix;
        let mut attempt = 0;
        loop {
            let group = self.route(&cursor)?;
            let cmd = Command::DropCollectionData { tenant: tenant.into(), collection: name.into() };
            match self.host.propose(group, cmd).await? {
                (_, CommandResponse::Dropped) => {
                    let shard_end = match self.host.local.get(group) {
                        Some(s) => s.end,
                        None => self.catalog.shard_map()?.shards.get(&group).map(|s| s.end.clone()).unwrap_or_default(),
                    };
                    if shard_end.is_empty() || shard_end >= end {
                        return Ok(existed);
                    }
                    cursor = shard_end;
                }
                (index, CommandResponse::Retry(m) | CommandResponse::WrongGroup(m)) => {
                    if let Some(h) = self.host.group(group) {
                        h.wait_applied(index, Duration::from_millis(200)).await;
                    }
                    self.before_reroute(attempt, &format!("dropping {name} ({m})")).await?;
                    attempt += 1;
                }
                (_, other) => return Err(ApiError::Internal { message: format!("unexpected drop result {other:?}") }),
            }
        }
    }

    /// `cluster_status` after catching up with the meta group (so a split or merge that
    /// returned shows); with no meta quorum, this node's own copy.
    pub async fn cluster_status_fresh(&self) -> Result<ClusterStatus, ApiError> {
        if let Err(e) = self.host.linearizable_position(keys::META_GROUP).await {
            tracing::debug!(error = %e, "cluster status from this node's catalog copy");
        }
        self.cluster_status()
    }

    /// Nodes and shards as this node sees them.
    pub fn cluster_status(&self) -> Result<ClusterStatus, ApiError> {
        let nodes = self
            .catalog
            .nodes()?
            .into_iter()
            .map(|n| {
                let state = if n.id == self.node_id { "up" } else { "member" };
                (n, state)
            })
            .collect();
        let now = tokio::time::Instant::now();
        let cluster_load = self.host.cluster_load();
        let shards = self
            .catalog
            .shard_map()?
            .shards
            .values()
            .cloned()
            .map(|desc| {
                let g = self.host.group(desc.id);
                let local_qps = self
                    .load
                    .lock()
                    .ok()
                    .and_then(|mut l| l.get_mut(&desc.id).map(|m| m.rate_per_s(now)))
                    .unwrap_or(0.0);
                ShardStatus {
                    leader: g.as_ref().and_then(|g| g.leader()).map(|l| l.0).or_else(|| self.host.last_leader(desc.id)),
                    applied_index: self.host.applied_index(desc.id),
                    state: if self.host.is_dormant(desc.id) { "hibernating" } else { "active" },
                    qps: cluster_load.get(&desc.id).map(|l| l.qps).unwrap_or(local_qps),
                    desc,
                }
            })
            .collect();
        let meta_leader = self.host.group(keys::META_GROUP).and_then(|g| g.leader()).map(|l| l.0);
        Ok(ClusterStatus { answered_by: self.node_id, meta_leader, nodes, shards })
    }

    /// True once this node can serve: it finished starting (a joining node: its join), its
    /// meta replica knows the shard map, the meta group has a leader, and every shard group
    /// running here has one (hibernated groups wake on the first request).
    pub fn is_ready(&self) -> bool {
        let Ok(map) = self.catalog.shard_map() else { return false };
        self.started.load(std::sync::atomic::Ordering::Acquire)
            && !map.shards.is_empty()
            && map.shards.keys().all(|id| self.host.group(*id).is_none_or(|g| g.leader().is_some()))
            && self.host.group(keys::META_GROUP).is_some_and(|g| g.leader().is_some())
    }

    /// Marks the node started (readiness waits for it: a joining node is not ready before it
    /// is a voter everywhere).
    pub fn mark_started(&self) {
        self.started.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Bound on how long a request handler may run in total.
    pub fn request_timeout(&self) -> Duration {
        self.host.config.tuning.request_timeout
    }
}

/// Decodes a stored document value into what users see.
fn doc_view(collection: &str, id: &str, stored: &[u8]) -> Result<DocView, ApiError> {
    let d = StoredDoc::decode(stored)
        .ok_or_else(|| ApiError::Internal { message: format!("stored document {collection}/{id} is corrupt") })?;
    Ok(DocView { collection: collection.into(), id: id.into(), version: d.version, json: d.json })
}

/// Bound on re-routing one request after the shard map changed under it.
pub const ROUTE_ATTEMPTS_MAX: u32 = 8;

/// How long a replica waits to catch up to a session token before forwarding.
pub const SESSION_WAIT: Duration = Duration::from_millis(500);

/// Parses a session token `group:index` (as returned in every response).
/// Parses a session token: `group:index`, or several comma separated (what a client that
/// talked to many groups sends; each group at most once).
pub fn parse_session_token(token: &str) -> Result<Vec<(GroupId, u64)>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "invalid_argument",
            format!("malformed session token {token:?}: expected group:index[,group:index...]"),
        )
    };
    let mut out: Vec<(GroupId, u64)> = Vec::new();
    for part in token.split(',') {
        let (g, i) = part.trim().split_once(':').ok_or_else(bad)?;
        let (g, i): (GroupId, u64) = (g.parse().map_err(|_| bad())?, i.parse().map_err(|_| bad())?);
        if out.iter().any(|(seen, _)| *seen == g) || out.len() >= SESSION_TOKEN_GROUPS_MAX {
            return Err(bad());
        }
        out.push((g, i));
    }
    Ok(out)
}

/// Bound on the groups one session token may name.
pub const SESSION_TOKEN_GROUPS_MAX: usize = 4_096;

fn prefix_batch_error(e: ApiError, index: usize) -> ApiError {
    let p = |m: String| format!("operation {index}: {m}");
    match e {
        ApiError::InvalidArgument { code, message } => ApiError::InvalidArgument { code, message: p(message) },
        ApiError::TooLarge { message } => ApiError::TooLarge { message: p(message) },
        ApiError::NotFound { code, message } => ApiError::NotFound { code, message: p(message) },
        ApiError::AlreadyExists { message, current_version } => {
            ApiError::AlreadyExists { message: p(message), current_version }
        }
        ApiError::VersionMismatch { message, current_version } => {
            ApiError::VersionMismatch { message: p(message), current_version }
        }
        ApiError::PreconditionFailed { code, message } => ApiError::PreconditionFailed { code, message: p(message) },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_tokens_parse_or_name_the_problem() {
        assert_eq!(parse_session_token("1:42").unwrap(), vec![(1, 42)]);
        assert_eq!(parse_session_token("1:42,7:3").unwrap(), vec![(1, 42), (7, 3)]);
        for bad in ["", "1", "x:1", "1:y", "1:2:3", "1:2,1:3", "1:2,"] {
            let e = parse_session_token(bad).unwrap_err();
            assert_eq!(e.http_status(), 400, "{bad:?}");
            assert!(e.to_string().contains("session token"), "{e}");
        }
    }

    #[test]
    fn request_units_round_up_per_kib() {
        assert_eq!(read_units(0), 1.0);
        assert_eq!(read_units(1025), 2.0);
        assert_eq!(write_units(10), 5.0);
    }
}
