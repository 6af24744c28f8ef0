//! gRPC `floe.v1` services: thin translations between protobuf and `NodeApi`.
//!
//! Errors leave through `ApiError::to_status` only, so codes and metadata stay uniform.

use super::{ApiError, DocView, NodeApi, ReadConsistency, ResponseMeta, WriteRequest};
use crate::docs::{DocAction, DocWriteResult};
use crate::keys;
use floe_proto::v1 as pb;
use floe_proto::v1::admin_server::Admin;
use floe_proto::v1::documents_server::Documents;
use std::sync::Arc;
use std::time::Instant;
use tonic::{Request, Response, Status};

/// Implements `Documents` and `Admin` over a `NodeApi`.
#[derive(Clone)]
pub struct GrpcApi {
    api: Arc<NodeApi>,
}

impl GrpcApi {
    pub fn new(api: Arc<NodeApi>) -> Self {
        Self { api }
    }

    fn finish<T>(&self, op: &'static str, started: Instant, r: Result<T, ApiError>) -> Result<Response<T>, Status> {
        let code = match &r {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        self.api.metrics.observe(op, code, started.elapsed());
        if let Err(ApiError::Internal { message }) = &r {
            tracing::error!(node = self.api.node_id, op, error = %message, "request failed with an internal error");
        }
        r.map(Response::new).map_err(|e| e.to_status())
    }
}

fn expected(v: u64) -> Option<u64> {
    (v != 0).then_some(v)
}

/// Translates the protobuf read options.
pub fn consistency(read: Option<&pb::ReadOptions>) -> Result<ReadConsistency, ApiError> {
    let Some(r) = read else { return Ok(ReadConsistency::Strong) };
    match pb::Consistency::try_from(r.consistency) {
        Ok(pb::Consistency::Unspecified) | Ok(pb::Consistency::Strong) => Ok(ReadConsistency::Strong),
        Ok(pb::Consistency::Eventual) => Ok(ReadConsistency::Eventual),
        Ok(pb::Consistency::BoundedStaleness) if r.max_staleness_ms == 0 => Err(ApiError::invalid(
            "invalid_argument",
            "BOUNDED_STALENESS needs max_staleness_ms > 0 (use STRONG for no staleness)",
        )),
        Ok(pb::Consistency::BoundedStaleness) => {
            Ok(ReadConsistency::BoundedStaleness { max_staleness_ms: r.max_staleness_ms })
        }
        Ok(pb::Consistency::Session) => Ok(ReadConsistency::Session { token: r.session_token.clone() }),
        Err(_) => Err(ApiError::invalid("invalid_argument", format!("unknown consistency {}", r.consistency))),
    }
}

fn meta(m: ResponseMeta) -> Option<pb::ResponseMeta> {
    let (leader_node, leader_grpc_addr) = m.leader.unwrap_or((0, String::new()));
    let shard = m.shard.unwrap_or_else(|| crate::shard::GroupState::initial(0, (Vec::new(), Vec::new())));
    Some(pb::ResponseMeta {
        session_token: m.session_token,
        request_units: m.request_units,
        served_by_node: m.served_by,
        leader_node,
        leader_grpc_addr,
        shard_id: shard.id,
        shard_epoch: if shard.id == 0 { 0 } else { shard.epoch },
        shard_start: shard.start,
        shard_end: shard.end,
    })
}

fn document(d: DocView) -> pb::Document {
    pb::Document { collection: d.collection, id: d.id, version: d.version, json: d.json }
}

fn write_response(r: DocWriteResult, m: &ResponseMeta) -> pb::WriteResponse {
    pb::WriteResponse {
        collection: r.collection,
        id: r.id,
        version: r.version,
        meta: meta(m.clone()),
        json: r.json.unwrap_or_default(),
    }
}

impl GrpcApi {
    async fn single_write(&self, tenant: &str, w: WriteRequest) -> Result<pb::WriteResponse, ApiError> {
        let (mut results, m) = self.api.write(tenant, vec![w]).await?;
        let r = results.pop().ok_or_else(|| ApiError::Internal { message: "write returned no result".into() })?;
        Ok(write_response(r, &m))
    }
}

#[tonic::async_trait]
impl Documents for GrpcApi {
    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let out = async {
            let c = consistency(r.read.as_ref())?;
            let (d, m) = self.api.get(&r.tenant, &r.collection, &r.id, &c).await?;
            Ok(pb::GetResponse { document: Some(document(d)), meta: meta(m) })
        }
        .await;
        self.finish("get", started, out)
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let w = WriteRequest {
            collection: r.collection,
            id: r.id,
            action: DocAction::Put { json: r.json, expected: expected(r.expected_version) },
        };
        let out = self.single_write(&r.tenant, w).await;
        self.finish("put", started, out)
    }

    async fn create(&self, req: Request<pb::CreateRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let w = WriteRequest { collection: r.collection, id: r.id, action: DocAction::Create { json: r.json } };
        let out = self.single_write(&r.tenant, w).await;
        self.finish("create", started, out)
    }

    async fn replace(&self, req: Request<pb::ReplaceRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let w = WriteRequest {
            collection: r.collection,
            id: r.id,
            action: DocAction::Replace { json: r.json, expected: expected(r.expected_version) },
        };
        let out = self.single_write(&r.tenant, w).await;
        self.finish("replace", started, out)
    }

    async fn patch(&self, req: Request<pb::PatchRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let exp = expected(r.expected_version);
        let action = match pb::PatchFormat::try_from(r.format) {
            Ok(pb::PatchFormat::JsonPatch) => DocAction::JsonPatch { patch: r.patch_json, expected: exp },
            _ => DocAction::MergePatch { patch: r.patch_json, expected: exp },
        };
        let out = self.single_write(&r.tenant, WriteRequest { collection: r.collection, id: r.id, action }).await;
        self.finish("patch", started, out)
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let w = WriteRequest {
            collection: r.collection,
            id: r.id,
            action: DocAction::Delete { expected: expected(r.expected_version) },
        };
        let out = self.single_write(&r.tenant, w).await;
        self.finish("delete", started, out)
    }

    async fn batch_get(&self, req: Request<pb::BatchGetRequest>) -> Result<Response<pb::BatchGetResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let out = async {
            let c = consistency(r.read.as_ref())?;
            let (docs, m) = self.api.batch_get(&r.tenant, &r.collection, &r.ids, &c).await?;
            let items = docs
                .into_iter()
                .map(|(id, d)| pb::BatchGetItem { id, found: d.is_some(), document: d.map(document) })
                .collect();
            Ok(pb::BatchGetResponse { items, meta: meta(m) })
        }
        .await;
        self.finish("batch_get", started, out)
    }

    async fn batch(&self, req: Request<pb::BatchRequest>) -> Result<Response<pb::BatchResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let out = async {
            let mut writes = Vec::with_capacity(r.ops.len());
            for (i, op) in r.ops.into_iter().enumerate() {
                let exp = expected(op.expected_version);
                let action = match pb::BatchOpKind::try_from(op.kind) {
                    Ok(pb::BatchOpKind::BatchPut) => DocAction::Put { json: op.json, expected: exp },
                    Ok(pb::BatchOpKind::BatchCreate) => DocAction::Create { json: op.json },
                    Ok(pb::BatchOpKind::BatchReplace) => DocAction::Replace { json: op.json, expected: exp },
                    Ok(pb::BatchOpKind::BatchPatchMerge) => DocAction::MergePatch { patch: op.json, expected: exp },
                    Ok(pb::BatchOpKind::BatchPatchJson) => DocAction::JsonPatch { patch: op.json, expected: exp },
                    Ok(pb::BatchOpKind::BatchDelete) => DocAction::Delete { expected: exp },
                    _ => {
                        return Err(ApiError::invalid(
                            "invalid_batch",
                            format!("operation {i}: unknown kind {}", op.kind),
                        ))
                    }
                };
                writes.push(WriteRequest { collection: op.collection, id: op.id, action });
            }
            let (results, m) = self.api.write(&r.tenant, writes).await?;
            let results = results.into_iter().map(|x| write_response(x, &m)).collect();
            Ok(pb::BatchResponse { results, meta: meta(m) })
        }
        .await;
        self.finish("batch", started, out)
    }
}

fn collection_info(c: crate::catalog::CollectionInfo) -> pb::CollectionInfo {
    pb::CollectionInfo { tenant: c.tenant, name: c.name, created_at_index: c.created_at_index }
}

#[tonic::async_trait]
impl Admin for GrpcApi {
    async fn create_collection(
        &self,
        req: Request<pb::CreateCollectionRequest>,
    ) -> Result<Response<pb::CreateCollectionResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let out = self
            .api
            .create_collection(&r.tenant, &r.name)
            .await
            .map(|(c, created)| pb::CreateCollectionResponse { collection: Some(collection_info(c)), created });
        self.finish("create_collection", started, out)
    }

    async fn list_collections(
        &self,
        req: Request<pb::ListCollectionsRequest>,
    ) -> Result<Response<pb::ListCollectionsResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let out = self
            .api
            .list_collections(&r.tenant)
            .await
            .map(|cs| pb::ListCollectionsResponse { collections: cs.into_iter().map(collection_info).collect() });
        self.finish("list_collections", started, out)
    }

    async fn drop_collection(
        &self,
        req: Request<pb::DropCollectionRequest>,
    ) -> Result<Response<pb::DropCollectionResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let out =
            self.api.drop_collection(&r.tenant, &r.name).await.map(|dropped| pb::DropCollectionResponse { dropped });
        self.finish("drop_collection", started, out)
    }

    async fn cluster_status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let started = Instant::now();
        let out = self.api.cluster_status_fresh().await.map(|s| pb::ClusterStatusResponse {
            nodes: s
                .nodes
                .into_iter()
                .map(|(n, state)| pb::NodeStatus {
                    id: n.id,
                    grpc_addr: n.grpc_addr,
                    http_addr: n.http_addr,
                    state: state.into(),
                })
                .collect(),
            shards: s
                .shards
                .into_iter()
                .map(|sh| pb::ShardStatus {
                    id: sh.desc.id,
                    start_hex: keys::to_hex(&sh.desc.start),
                    end_hex: keys::to_hex(&sh.desc.end),
                    epoch: sh.desc.epoch,
                    leader: sh.leader.unwrap_or(0),
                    replicas: sh.desc.replicas,
                    state: sh.state.into(),
                    qps: sh.qps,
                    applied_index: sh.applied_index,
                })
                .collect(),
            answered_by: s.answered_by,
            meta_leader: s.meta_leader.unwrap_or(0),
        });
        self.finish("cluster_status", started, out)
    }

    async fn add_node(&self, req: Request<pb::AddNodeRequest>) -> Result<Response<pb::AddNodeResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let out = self
            .api
            .add_node(r.node_id, &r.grpc_addr, &r.cluster_id, r.fresh)
            .await
            .map(|groups| pb::AddNodeResponse { groups: group_members(groups) });
        self.finish("add_node", started, out)
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeResponse>, Status> {
        let started = Instant::now();
        let out = self
            .api
            .remove_node(req.into_inner().node_id)
            .await
            .map(|groups| pb::RemoveNodeResponse { groups: group_members(groups) });
        self.finish("remove_node", started, out)
    }

    async fn replica_status(
        &self,
        _req: Request<pb::ReplicaStatusRequest>,
    ) -> Result<Response<pb::ReplicaStatusResponse>, Status> {
        let started = Instant::now();
        let replicas = self
            .api
            .host()
            .replica_status()
            .into_iter()
            .map(|r| pb::ReplicaStatus {
                group: r.group,
                role: r.role.into(),
                term: r.term,
                leader: r.leader.unwrap_or(0),
                last_log_index: r.last_log_index,
                applied_index: r.applied_index,
                voters: r.voters,
                learners: r.learners,
                matched: r.matched.into_iter().collect(),
            })
            .collect();
        let out = Ok(pb::ReplicaStatusResponse { node_id: self.api.node_id, replicas });
        self.finish("replica_status", started, out)
    }

    async fn merge_shards(
        &self,
        req: Request<pb::MergeShardsRequest>,
    ) -> Result<Response<pb::MergeShardsResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let out = self
            .api
            .merge_shards(r.left, r.right)
            .await
            .map(|g| pb::MergeShardsResponse { merged: Some(shard_status(&g)) });
        self.finish("merge_shards", started, out)
    }

    async fn move_replica(
        &self,
        req: Request<pb::MoveReplicaRequest>,
    ) -> Result<Response<pb::MoveReplicaResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let out = self
            .api
            .move_replica(r.shard_id, r.from_node, r.to_node)
            .await
            .map(|voters| pb::MoveReplicaResponse { voters });
        self.finish("move_replica", started, out)
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let out =
            self.api.transfer_leader(r.shard_id, r.to_node).await.map(|leader| pb::TransferLeaderResponse { leader });
        self.finish("transfer_leader", started, out)
    }

    async fn split_shard(
        &self,
        req: Request<pb::SplitShardRequest>,
    ) -> Result<Response<pb::SplitShardResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let out = self.api.split(r.shard_id, &r.tenant, &r.collection, &r.ids).await.map(|done| {
            let shards =
                done.iter().flat_map(|d| std::iter::once(&d.parent).chain(&d.children)).map(shard_status).collect();
            pb::SplitShardResponse { shards }
        });
        self.finish("split_shard", started, out)
    }
}

/// A shard as a split or merge applied it.
fn shard_status(g: &crate::shard::GroupState) -> pb::ShardStatus {
    pb::ShardStatus {
        id: g.id,
        start_hex: crate::keys::to_hex(&g.start),
        end_hex: crate::keys::to_hex(&g.end),
        epoch: g.epoch,
        state: "active".into(),
        ..Default::default()
    }
}

fn group_members(groups: Vec<(u64, Vec<u64>)>) -> Vec<pb::GroupMembers> {
    groups.into_iter().map(|(group, voters)| pb::GroupMembers { group, voters }).collect()
}
