//! API calls a node sends to another node because it cannot serve them itself:
//! - reads of a shard it has no replica of (a cluster larger than the replication factor, or
//!   a replica that moved away): the read, with its consistency level, goes to one of the
//!   shard's replicas, which serves it exactly as if the client had asked it directly;
//! - merges of shards it does not host (the meta leader's placement driver, or `floe ctl
//!   merge` through any node): the merge is coordinated on a node hosting both parts.
//!
//! Owns: the wire form of a forwarded call and its reply, the choice of node (last known
//! leader first, then the other replicas the catalog lists) and the mapping of the remote
//! error back to an `ApiError`.
//!
//! Invariants:
//! - a forwarded read is served by a replica's own read path (`NodeApi::batch_get_here`), so
//!   every consistency level keeps its guarantee: the serving replica proves its position
//!   exactly as for a local client (strong: read index; bounded: its freshness proof;
//!   session: the token);
//! - a node never forwards a call it was forwarded (no loops): without a replica it answers
//!   a retryable `unavailable`, and the sender tries the next replica;
//! - reads have no effect, so trying another replica after any failure is always safe; a
//!   merge is tried on one node only (its steps are refused if the parts changed).

use super::{ApiError, BatchGetItems, DocView, NodeApi, ReadConsistency, ResponseMeta};
use crate::raft::types::{GroupId, NodeId};
use crate::shard::GroupState;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Weak};

/// A call sent to another node.
#[derive(Debug, Serialize, Deserialize)]
enum ApiCall {
    Read(ReplicaReadRequest),
    Merge { left: GroupId, right: GroupId },
}

/// A read sent to a replica.
#[derive(Debug, Serialize, Deserialize)]
struct ReplicaReadRequest {
    tenant: String,
    collection: String,
    ids: Vec<String>,
    consistency: ReadConsistency,
}

/// A replica's answer to a forwarded read.
#[derive(Debug, Serialize, Deserialize)]
enum ReplicaReadReply {
    /// One entry per requested id, in order: `(version, json)` or absent.
    Served { docs: Vec<Option<(u64, String)>>, session_token: String, request_units: f64, served_by: NodeId },
    /// The replica's error, as its HTTP status, code and message.
    Failed { status: u16, code: String, message: String, retry_safe: bool },
}

/// The answer to a forwarded merge: the merged shard, or the error (as a read's `Failed`).
#[derive(Debug, Serialize, Deserialize)]
enum MergeReply {
    Merged(GroupState),
    Failed(ReplicaReadReply),
}

impl ReplicaReadReply {
    fn from_error(e: &ApiError) -> Self {
        let retry_safe = match e {
            ApiError::Unavailable { retry_safe, .. } => *retry_safe,
            _ => false,
        };
        ReplicaReadReply::Failed { status: e.http_status(), code: e.code().into(), message: e.to_string(), retry_safe }
    }

    /// The `ApiError` a replica's failure stands for on this node.
    fn into_error(status: u16, code: &str, message: String, retry_safe: bool) -> ApiError {
        match status {
            404 if code == "collection_not_found" => ApiError::NotFound { code: "collection_not_found", message },
            404 => ApiError::NotFound { code: "not_found", message },
            400 => ApiError::invalid("invalid_argument", message),
            503 => ApiError::Unavailable { message, retry_safe },
            504 => ApiError::Timeout { message },
            _ => ApiError::Internal { message: format!("replica answered {status} {code}: {message}") },
        }
    }
}

impl NodeApi {
    /// Lets other nodes send this node the calls they cannot serve (call once, after `new`).
    pub fn serve_api_calls(self: &Arc<Self>) {
        let api: Weak<NodeApi> = Arc::downgrade(self);
        self.host.serve_api_calls(Arc::new(move |request: String| {
            let api = api.clone();
            Box::pin(async move {
                let stopping = || ReplicaReadReply::Failed {
                    status: 503,
                    code: "unavailable".into(),
                    message: "node is stopping".into(),
                    retry_safe: true,
                };
                let Some(api) = api.upgrade() else { return serde_json::to_string(&stopping()).unwrap_or_default() };
                match serde_json::from_str::<ApiCall>(&request) {
                    Ok(ApiCall::Read(req)) => serde_json::to_string(&api.serve_replica_read(req).await),
                    Ok(ApiCall::Merge { left, right }) => {
                        let reply = match api.merge_here(left, right).await {
                            Ok(merged) => MergeReply::Merged(merged),
                            Err(e) => MergeReply::Failed(ReplicaReadReply::from_error(&e)),
                        };
                        serde_json::to_string(&reply)
                    }
                    Err(e) => serde_json::to_string(&ReplicaReadReply::from_error(&ApiError::invalid(
                        "invalid_argument",
                        format!("malformed forwarded call: {e}"),
                    ))),
                }
                .unwrap_or_default()
            })
        }));
    }

    /// Coordinates the merge of `left` and `right` on a node hosting both (one of their
    /// replicas), for a node that does not. One node is asked: the last known leader of
    /// `left`, else its first other replica; it merges only if it hosts both.
    pub(super) async fn merge_through_replica(&self, left: GroupId, right: GroupId) -> Result<GroupState, ApiError> {
        let call = serde_json::to_string(&ApiCall::Merge { left, right })
            .map_err(|e| ApiError::Internal { message: e.to_string() })?;
        let Some((id, addr)) = self.host.replica_targets(left).into_iter().next() else {
            return Err(ApiError::Unavailable {
                message: format!("the catalog on node {} lists no replica of shard {left}", self.node_id),
                retry_safe: true,
            });
        };
        let reply = self.host.ask_api_call(left, id, &addr, call, self.request_timeout() * 2).await.map_err(|e| {
            ApiError::Unavailable { message: format!("merging through node {id}: {e}"), retry_safe: false }
        })?;
        match serde_json::from_str::<MergeReply>(&reply) {
            Ok(MergeReply::Merged(state)) => Ok(state),
            Ok(MergeReply::Failed(ReplicaReadReply::Failed { status, code, message, retry_safe })) => {
                Err(ReplicaReadReply::into_error(status, &code, message, retry_safe))
            }
            Ok(MergeReply::Failed(other)) => {
                Err(ApiError::Internal { message: format!("node {id} answered {other:?}") })
            }
            Err(e) => Err(ApiError::Internal { message: format!("node {id} sent a malformed merge reply: {e}") }),
        }
    }

    /// Serves a read another node forwarded: this node's own read path, no forwarding on.
    async fn serve_replica_read(&self, req: ReplicaReadRequest) -> ReplicaReadReply {
        match self.batch_get_here(&req.tenant, &req.collection, &req.ids, &req.consistency).await {
            Ok((items, meta)) => ReplicaReadReply::Served {
                docs: items.into_iter().map(|(_, d)| d.map(|d| (d.version, d.json))).collect(),
                session_token: meta.session_token,
                request_units: meta.request_units,
                served_by: meta.served_by,
            },
            Err(e) => ReplicaReadReply::from_error(&e),
        }
    }

    /// Reads `ids` (all owned by `group`, which has no replica here) through one of the
    /// group's replicas: the last known leader first, then every other one, until one serves
    /// or the request's time is up.
    pub(super) async fn read_through_replica(
        &self,
        group: GroupId,
        tenant: &str,
        collection: &str,
        ids: &[String],
        consistency: &ReadConsistency,
    ) -> Result<(BatchGetItems, ResponseMeta), ApiError> {
        let deadline = tokio::time::Instant::now() + self.request_timeout();
        let request = ApiCall::Read(ReplicaReadRequest {
            tenant: tenant.into(),
            collection: collection.into(),
            ids: ids.to_vec(),
            consistency: consistency.clone(),
        });
        let request = serde_json::to_string(&request).map_err(|e| ApiError::Internal { message: e.to_string() })?;
        let targets = self.host.replica_targets(group);
        let mut last_error = format!("the catalog on node {} lists no replica of shard {group}", self.node_id);
        for (id, addr) in targets {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let reply = match self.host.ask_api_call(group, id, &addr, request.clone(), left).await {
                Ok(reply) => reply,
                Err(e) => {
                    last_error = format!("node {id}: {e}");
                    continue;
                }
            };
            match serde_json::from_str::<ReplicaReadReply>(&reply) {
                Ok(ReplicaReadReply::Served { docs, session_token, request_units, served_by }) => {
                    self.metrics.observe_read_path(consistency.name(), "replica");
                    let items = ids
                        .iter()
                        .zip(docs)
                        .map(|(doc_id, d)| {
                            let view = d.map(|(version, json)| DocView {
                                collection: collection.into(),
                                id: doc_id.clone(),
                                version,
                                json,
                            });
                            (doc_id.clone(), view)
                        })
                        .collect();
                    let meta = ResponseMeta { session_token, request_units, served_by, leader: None, shard: None };
                    return Ok((items, meta));
                }
                // Another replica may be able to serve (this one lost its replica, cannot reach
                // its leader, or is behind its bound).
                Ok(ReplicaReadReply::Failed { status: 503, message, .. }) => {
                    last_error = format!("node {id}: {message}")
                }
                Ok(ReplicaReadReply::Failed { status, code, message, retry_safe }) => {
                    return Err(ReplicaReadReply::into_error(status, &code, message, retry_safe))
                }
                Err(e) => last_error = format!("node {id} sent a malformed reply: {e}"),
            }
        }
        self.metrics.observe_read_path(consistency.name(), "refused");
        Err(ApiError::Unavailable {
            message: format!(
                "shard {group} has no replica on node {} and none of its replicas served the read ({last_error}); retry",
                self.node_id
            ),
            retry_safe: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_errors_map_back_to_the_same_status() {
        for e in [
            ApiError::NotFound { code: "collection_not_found", message: "gone".into() },
            ApiError::NotFound { code: "not_found", message: "gone".into() },
            ApiError::invalid("invalid_argument", "bad token"),
            ApiError::Unavailable { message: "no leader".into(), retry_safe: true },
            ApiError::Timeout { message: "slow".into() },
        ] {
            let ReplicaReadReply::Failed { status, code, message, retry_safe } = ReplicaReadReply::from_error(&e)
            else {
                panic!("an error encodes as Failed")
            };
            let back = ReplicaReadReply::into_error(status, &code, message, retry_safe);
            assert_eq!(back, e);
        }
        let internal = ReplicaReadReply::into_error(500, "internal", "disk".into(), false);
        assert_eq!(internal.http_status(), 500);
        assert!(internal.to_string().contains("disk"), "{internal}");
    }

    #[test]
    fn requests_and_replies_round_trip() {
        let req = ReplicaReadRequest {
            tenant: "t".into(),
            collection: "c".into(),
            ids: vec!["a".into(), "b".into()],
            consistency: ReadConsistency::BoundedStaleness { max_staleness_ms: 250 },
        };
        let back: ReplicaReadRequest = serde_json::from_str(&serde_json::to_string(&req).unwrap()).unwrap();
        assert_eq!(back.ids, req.ids);
        assert_eq!(back.consistency, req.consistency);
    }
}
