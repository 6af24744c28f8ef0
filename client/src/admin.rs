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
}
