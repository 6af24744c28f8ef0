//! [`Collection`]: typed and untyped document operations on one collection.
//!
//! Owns: building `floe.v1` document requests (tenant, expected versions, patch formats,
//! read options) and turning responses into [`Document`] / [`WriteOutcome`]. Routing, timeouts
//! and retries are the client's (`Client::call`); this module only says whether an operation
//! is a write, a strong read or a read any replica may serve.

use floe_proto::v1 as pb;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::retry::OperationKind;
use crate::types::{encode_json, expected_version_to_proto, Document, ReadConsistency, WriteOutcome};

/// A cheap handle on one collection of the client's tenant.
#[derive(Debug, Clone)]
pub struct Collection {
    client: Client,
    name: String,
}

impl Collection {
    pub(crate) fn new(client: Client, name: String) -> Self {
        Collection { client, name }
    }

    /// The collection's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads a document with the client's default consistency; `None` when absent.
    pub async fn get<T: DeserializeOwned>(&self, id: &str) -> Result<Option<Document<T>>> {
        let consistency = self.client.read_consistency_default().clone();
        self.get_with(id, consistency).await
    }

    /// Reads a document with the given consistency; `None` when absent.
    pub async fn get_with<T: DeserializeOwned>(
        &self,
        id: &str,
        consistency: ReadConsistency,
    ) -> Result<Option<Document<T>>> {
        let key = self.client.doc_key(&self.name, id);
        let request = pb::GetRequest {
            tenant: self.client.tenant().to_owned(),
            collection: self.name.clone(),
            id: id.to_owned(),
            read: Some(consistency.to_proto(&self.client.session_token_for(&key))),
        };
        let response = self
            .client
            .call_for(read_kind(&consistency), "get", Some(&key), |channel| {
                let request = self.client.request(request.clone());
                async move { Client::documents_client(channel).get(request).await }
            })
            .await;
        match response {
            Ok(response) => response.document.map(Document::from_proto).transpose(),
            // The server may report an absent document as NOT_FOUND rather than an empty
            // response; both mean "absent". A missing collection stays an error.
            Err(Error::NotFound { code, .. }) if code == "not_found" => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Reads several documents of this collection in one round trip. The result has one entry
    /// per requested id, in request order.
    pub async fn batch_get<T, I, S>(&self, ids: I, consistency: ReadConsistency) -> Result<Vec<Option<Document<T>>>>
    where
        T: DeserializeOwned,
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let ids: Vec<String> = ids.into_iter().map(Into::into).collect();
        let request = pb::BatchGetRequest {
            tenant: self.client.tenant().to_owned(),
            collection: self.name.clone(),
            ids: ids.clone(),
            read: Some(consistency.to_proto(&self.client.session_token())),
        };
        let first = ids.first().map(|id| self.client.doc_key(&self.name, id));
        let response = self
            .client
            .call_for(read_kind(&consistency), "batch_get", first.as_deref(), |channel| {
                let request = self.client.request(request.clone());
                async move { Client::documents_client(channel).batch_get(request).await }
            })
            .await?;
        if response.items.len() != ids.len() {
            return Err(Error::Internal(format!(
                "batch_get: asked for {} ids, server answered {} items",
                ids.len(),
                response.items.len()
            )));
        }
        let mut documents = Vec::with_capacity(ids.len());
        for (id, item) in ids.iter().zip(response.items) {
            if &item.id != id {
                return Err(Error::Internal(format!(
                    "batch_get: expected item for id {id:?}, server answered {:?}",
                    item.id
                )));
            }
            match (item.found, item.document) {
                (true, Some(document)) => documents.push(Some(Document::from_proto(document)?)),
                (true, None) => {
                    return Err(Error::Internal(format!("batch_get: item {id:?} marked found without a document")))
                }
                (false, _) => documents.push(None),
            }
        }
        Ok(documents)
    }

    /// Upserts a document.
    pub async fn put<T: Serialize + ?Sized>(&self, id: &str, value: &T) -> Result<WriteOutcome> {
        self.put_request(id, encode_json(value)?, 0).await
    }

    /// Writes a document only if its stored version is `version` (fails with
    /// [`Error::VersionMismatch`] otherwise).
    pub async fn put_if_version<T: Serialize + ?Sized>(
        &self,
        id: &str,
        value: &T,
        version: u64,
    ) -> Result<WriteOutcome> {
        let expected_version = expected_version_to_proto(Some(version))?;
        self.put_request(id, encode_json(value)?, expected_version).await
    }

    /// Creates a document; fails with [`Error::AlreadyExists`] if it exists.
    pub async fn create<T: Serialize + ?Sized>(&self, id: &str, value: &T) -> Result<WriteOutcome> {
        let request = pb::CreateRequest {
            tenant: self.client.tenant().to_owned(),
            collection: self.name.clone(),
            id: id.to_owned(),
            json: encode_json(value)?,
        };
        self.write("create", id, |client, channel| {
            let request = client.request(request.clone());
            async move { Client::documents_client(channel).create(request).await }
        })
        .await
    }

    /// Replaces an existing document, optionally only at version `expected`.
    pub async fn replace<T: Serialize + ?Sized>(
        &self,
        id: &str,
        value: &T,
        expected: Option<u64>,
    ) -> Result<WriteOutcome> {
        let request = pb::ReplaceRequest {
            tenant: self.client.tenant().to_owned(),
            collection: self.name.clone(),
            id: id.to_owned(),
            json: encode_json(value)?,
            expected_version: expected_version_to_proto(expected)?,
        };
        self.write("replace", id, |client, channel| {
            let request = client.request(request.clone());
            async move { Client::documents_client(channel).replace(request).await }
        })
        .await
    }

    /// Applies an RFC 7396 merge patch; the outcome's `json` is the patched document.
    pub async fn merge_patch(&self, id: &str, patch: &Value, expected: Option<u64>) -> Result<WriteOutcome> {
        self.patch(id, pb::PatchFormat::MergePatch, patch, expected).await
    }

    /// Applies an RFC 6902 JSON patch; the outcome's `json` is the patched document. A failing
    /// `test` op gives [`Error::PreconditionFailed`].
    pub async fn json_patch(&self, id: &str, patch: &Value, expected: Option<u64>) -> Result<WriteOutcome> {
        self.patch(id, pb::PatchFormat::JsonPatch, patch, expected).await
    }

    /// Deletes a document, optionally only at version `expected`.
    pub async fn delete(&self, id: &str, expected: Option<u64>) -> Result<WriteOutcome> {
        let request = pb::DeleteRequest {
            tenant: self.client.tenant().to_owned(),
            collection: self.name.clone(),
            id: id.to_owned(),
            expected_version: expected_version_to_proto(expected)?,
        };
        self.write("delete", id, |client, channel| {
            let request = client.request(request.clone());
            async move { Client::documents_client(channel).delete(request).await }
        })
        .await
    }

    async fn put_request(&self, id: &str, json: String, expected_version: u64) -> Result<WriteOutcome> {
        let request = pb::PutRequest {
            tenant: self.client.tenant().to_owned(),
            collection: self.name.clone(),
            id: id.to_owned(),
            json,
            expected_version,
        };
        self.write("put", id, |client, channel| {
            let request = client.request(request.clone());
            async move { Client::documents_client(channel).put(request).await }
        })
        .await
    }

    async fn patch(
        &self,
        id: &str,
        format: pb::PatchFormat,
        patch: &Value,
        expected: Option<u64>,
    ) -> Result<WriteOutcome> {
        let request = pb::PatchRequest {
            tenant: self.client.tenant().to_owned(),
            collection: self.name.clone(),
            id: id.to_owned(),
            format: format as i32,
            patch_json: encode_json(patch)?,
            expected_version: expected_version_to_proto(expected)?,
        };
        self.write("patch", id, |client, channel| {
            let request = client.request(request.clone());
            async move { Client::documents_client(channel).patch(request).await }
        })
        .await
    }

    async fn write<Attempt, AttemptFuture>(
        &self,
        operation: &'static str,
        id: &str,
        mut attempt: Attempt,
    ) -> Result<WriteOutcome>
    where
        Attempt: FnMut(&Client, tonic::transport::Channel) -> AttemptFuture,
        AttemptFuture:
            std::future::Future<Output = std::result::Result<tonic::Response<pb::WriteResponse>, tonic::Status>>,
    {
        let client = &self.client;
        let key = client.doc_key(&self.name, id);
        let response =
            client.call_for(OperationKind::Write, operation, Some(&key), |channel| attempt(client, channel)).await?;
        WriteOutcome::from_proto(response, "")
    }
}

/// Strong reads go to the leader; every other level may be served by any replica.
pub(crate) fn read_kind(consistency: &ReadConsistency) -> OperationKind {
    if consistency.needs_leader() {
        OperationKind::ReadStrong
    } else {
        OperationKind::ReadAny
    }
}
