//! Admin operations on [`Client`]: collections and cluster status.
//!
//! Owns: building `floe.v1.Admin` requests. Collection create/drop are writes (repeated only
//! after retry-safe errors); listing and cluster status are reads any node may answer.

use floe_proto::v1 as pb;

use crate::client::Client;
use crate::error::Result;
use crate::retry::OperationKind;
use crate::types::CollectionInfo;

/// Cluster status as the answering node sees it (the proto message, re-exported).
pub type ClusterStatus = pb::ClusterStatusResponse;
/// One node's view of the group replicas it hosts (the proto message, re-exported).
pub type ReplicaStatus = pb::ReplicaStatusResponse;

impl Client {
    /// Creates a collection. Returns `true` when it was created, `false` when it existed.
    pub async fn create_collection(&self, name: &str) -> Result<bool> {
        let request = pb::CreateCollectionRequest { tenant: self.tenant().to_owned(), name: name.to_owned() };
        let response = self
            .call(OperationKind::Write, "create_collection", |channel| {
                let request = self.request(request.clone());
                async move { Client::admin_client(channel).create_collection(request).await }
            })
            .await?;
        Ok(response.created)
    }

    /// Lists the tenant's collections.
    pub async fn list_collections(&self) -> Result<Vec<CollectionInfo>> {
        let request = pb::ListCollectionsRequest { tenant: self.tenant().to_owned() };
        let response = self
            .call(OperationKind::ReadStrong, "list_collections", |channel| {
                let request = self.request(request.clone());
                async move { Client::admin_client(channel).list_collections(request).await }
            })
            .await?;
        Ok(response.collections.into_iter().map(CollectionInfo::from).collect())
    }

    /// Drops a collection. Returns `true` when it was dropped, `false` when it did not exist.
    pub async fn drop_collection(&self, name: &str) -> Result<bool> {
        let request = pb::DropCollectionRequest { tenant: self.tenant().to_owned(), name: name.to_owned() };
        let response = self
            .call(OperationKind::Write, "drop_collection", |channel| {
                let request = self.request(request.clone());
                async move { Client::admin_client(channel).drop_collection(request).await }
            })
            .await?;
        Ok(response.dropped)
    }

    /// Nodes, shards, leaders and load, as seen by whichever endpoint answers (round robin).
    pub async fn cluster_status(&self) -> Result<ClusterStatus> {
        self.call(OperationKind::ReadAny, "cluster_status", |channel| {
            let request = self.request(pb::ClusterStatusRequest {});
            async move { Client::admin_client(channel).cluster_status(request).await }
        })
        .await
    }

    /// Adds node `node_id` (listening on `grpc_addr`) to every group of the cluster: as a
    /// learner first, promoted to voter once caught up. Idempotent. Returns each group's
    /// voters. Can take long when the node must receive a snapshot: give the client a long
    /// request timeout.
    /// `cluster_id` is the node's own `--cluster-id` (the cluster refuses a node of another
    /// cluster; empty skips the check); `fresh` says the node has no raft state at all (then
    /// an id that already votes is refused: a wiped disk must not vote with an empty log).
    /// `floe start --join` is the usual caller.
    pub async fn add_node(
        &self,
        node_id: u64,
        grpc_addr: &str,
        cluster_id: &str,
        fresh: bool,
    ) -> Result<Vec<(u64, Vec<u64>)>> {
        let request =
            pb::AddNodeRequest { node_id, grpc_addr: grpc_addr.to_owned(), cluster_id: cluster_id.to_owned(), fresh };
        let response = self
            .call(OperationKind::Write, "add_node", |channel| {
                let request = self.request(request.clone());
                async move { Client::admin_client(channel).add_node(request).await }
            })
            .await?;
        Ok(response.groups.into_iter().map(|g| (g.group, g.voters)).collect())
    }

    /// Removes node `node_id` from every group (joint consensus) and from the cluster's
    /// catalog; its id is never accepted again. Idempotent. Returns each group's voters.
    pub async fn remove_node(&self, node_id: u64) -> Result<Vec<(u64, Vec<u64>)>> {
        let request = pb::RemoveNodeRequest { node_id };
        let response = self
            .call(OperationKind::Write, "remove_node", |channel| {
                let request = self.request(request);
                async move { Client::admin_client(channel).remove_node(request).await }
            })
            .await?;
        Ok(response.groups.into_iter().map(|g| (g.group, g.voters)).collect())
    }

    /// Splits shards so that each of `ids` (documents of `collection`) starts a new shard.
    /// Returns every split shard followed by its children.
    pub async fn split_at(&self, collection: &str, ids: &[&str]) -> Result<Vec<pb::ShardStatus>> {
        let request = pb::SplitShardRequest {
            shard_id: 0,
            tenant: self.tenant().to_owned(),
            collection: collection.to_owned(),
            ids: ids.iter().map(|i| i.to_string()).collect(),
        };
        self.split_shard(request).await
    }

    /// Splits shard `shard_id` at the median of its recent requests, or its middle by size.
    pub async fn split_shard_in_half(&self, shard_id: u64) -> Result<Vec<pb::ShardStatus>> {
        self.split_shard(pb::SplitShardRequest { shard_id, ..Default::default() }).await
    }

    /// Merges adjacent shards `left` and `right` (on the same replicas) into a new shard.
    /// Returns the merged shard.
    pub async fn merge_shards(&self, left: u64, right: u64) -> Result<Option<pb::ShardStatus>> {
        let response = self
            .call(OperationKind::Write, "merge_shards", |channel| {
                let request = self.request(pb::MergeShardsRequest { left, right });
                async move { Client::admin_client(channel).merge_shards(request).await }
            })
            .await?;
        Ok(response.merged)
    }

    /// Moves shard `shard_id`'s replica from node `from` to node `to` (the target catches up
    /// first; a re-run after an interruption finishes the move). Returns the shard's voters.
    pub async fn move_replica(&self, shard_id: u64, from: u64, to: u64) -> Result<Vec<u64>> {
        let response = self
            .call(OperationKind::Write, "move_replica", |channel| {
                let request = self.request(pb::MoveReplicaRequest { shard_id, from_node: from, to_node: to });
                async move { Client::admin_client(channel).move_replica(request).await }
            })
            .await?;
        Ok(response.voters)
    }

    /// Hands shard `shard_id`'s leadership to its voter `to`. Returns the leader afterwards
    /// (`to`, or another voter that won the election first).
    pub async fn transfer_leader(&self, shard_id: u64, to: u64) -> Result<u64> {
        let response = self
            .call(OperationKind::Write, "transfer_leader", |channel| {
                let request = self.request(pb::TransferLeaderRequest { shard_id, to_node: to });
                async move { Client::admin_client(channel).transfer_leader(request).await }
            })
            .await?;
        Ok(response.leader)
    }

    async fn split_shard(&self, request: pb::SplitShardRequest) -> Result<Vec<pb::ShardStatus>> {
        // A repeated split is refused by its epoch check, so retrying is safe.
        let response = self
            .call(OperationKind::Write, "split_shard", |channel| {
                let request = self.request(request.clone());
                async move { Client::admin_client(channel).split_shard(request).await }
            })
            .await?;
        Ok(response.shards)
    }

    /// The group replicas of whichever endpoint answers (build a client with one endpoint to
    /// ask a given node).
    pub async fn replica_status(&self) -> Result<ReplicaStatus> {
        self.call(OperationKind::ReadAny, "replica_status", |channel| {
            let request = self.request(pb::ReplicaStatusRequest {});
            async move { Client::admin_client(channel).replica_status(request).await }
        })
        .await
    }
}
