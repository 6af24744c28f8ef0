//! [`Batch`]: a builder of atomic multi-document writes, possibly across collections.
//!
//! Owns: collecting `BatchOp`s and sending them as one `Documents.Batch` call. The server
//! applies all ops or none (they must fall into one shard). A serialization failure while
//! adding an op is remembered and returned by [`Batch::commit`], so the builder stays chainable.

use floe_proto::v1 as pb;
use serde::Serialize;
use serde_json::Value;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::retry::OperationKind;
use crate::types::{encode_json, expected_version_to_proto, WriteOutcome};

/// An atomic batch under construction. Obtain with [`Client::batch`].
#[derive(Debug, Clone)]
#[must_use = "a batch does nothing until commit() is awaited"]
pub struct Batch {
    client: Client,
    ops: Vec<pb::BatchOp>,
    /// The first error met while adding ops; reported by `commit`.
    error_first: Option<Error>,
}

impl Batch {
    pub(crate) fn new(client: Client) -> Self {
        Batch { client, ops: Vec::new(), error_first: None }
    }

    /// Number of ops added so far.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// True when no op was added.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Upserts a document.
    pub fn put<T: Serialize + ?Sized>(self, collection: &str, id: &str, value: &T) -> Self {
        let json = encode_json(value);
        self.push(pb::BatchOpKind::BatchPut, collection, id, json, None)
    }

    /// Creates a document; the whole batch fails if it exists.
    pub fn create<T: Serialize + ?Sized>(self, collection: &str, id: &str, value: &T) -> Self {
        let json = encode_json(value);
        self.push(pb::BatchOpKind::BatchCreate, collection, id, json, None)
    }

    /// Replaces an existing document, optionally only at version `expected`.
    pub fn replace<T: Serialize + ?Sized>(self, collection: &str, id: &str, value: &T, expected: Option<u64>) -> Self {
        let json = encode_json(value);
        self.push(pb::BatchOpKind::BatchReplace, collection, id, json, expected)
    }

    /// Applies an RFC 7396 merge patch.
    pub fn merge_patch(self, collection: &str, id: &str, patch: &Value, expected: Option<u64>) -> Self {
        let json = encode_json(patch);
        self.push(pb::BatchOpKind::BatchPatchMerge, collection, id, json, expected)
    }

    /// Applies an RFC 6902 JSON patch.
    pub fn json_patch(self, collection: &str, id: &str, patch: &Value, expected: Option<u64>) -> Self {
        let json = encode_json(patch);
        self.push(pb::BatchOpKind::BatchPatchJson, collection, id, json, expected)
    }

    /// Deletes a document, optionally only at version `expected`.
    pub fn delete(self, collection: &str, id: &str, expected: Option<u64>) -> Self {
        self.push(pb::BatchOpKind::BatchDelete, collection, id, Ok(String::new()), expected)
    }

    fn push(
        mut self,
        kind: pb::BatchOpKind,
        collection: &str,
        id: &str,
        json: Result<String>,
        expected: Option<u64>,
    ) -> Self {
        if self.error_first.is_some() {
            return self;
        }
        let op = json.and_then(|json| {
            Ok(pb::BatchOp {
                kind: kind as i32,
                collection: collection.to_owned(),
                id: id.to_owned(),
                json,
                expected_version: expected_version_to_proto(expected)?,
            })
        });
        match op {
            Ok(op) => self.ops.push(op),
            Err(error) => self.error_first = Some(error),
        }
        self
    }

    /// Sends the batch. On success there is one outcome per op, in op order.
    pub async fn commit(self) -> Result<Vec<WriteOutcome>> {
        if let Some(error) = self.error_first {
            return Err(error);
        }
        if self.ops.is_empty() {
            return Ok(Vec::new());
        }
        let ops_count = self.ops.len();
        let first = self.ops.first().map(|op| self.client.doc_key(&op.collection, &op.id));
        let request = pb::BatchRequest { tenant: self.client.tenant().to_owned(), ops: self.ops };
        let client = &self.client;
        let response = client
            .call_for(OperationKind::Write, "batch", first.as_deref(), |channel| {
                let request = client.request(request.clone());
                async move { Client::documents_client(channel).batch(request).await }
            })
            .await?;
        if response.results.len() != ops_count {
            return Err(Error::Internal(format!(
                "batch: sent {ops_count} ops, server answered {} results",
                response.results.len()
            )));
        }
        let session_token = response.meta.as_ref().map(|meta| meta.session_token.clone()).unwrap_or_default();
        response.results.into_iter().map(|result| WriteOutcome::from_proto(result, &session_token)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> Client {
        Client::builder().endpoint("127.0.0.1:1").build().expect("config")
    }

    #[test]
    fn builds_ops_in_order() {
        let batch = client()
            .batch()
            .put("a", "1", &serde_json::json!({"x": 1}))
            .create("b", "2", &serde_json::json!({}))
            .merge_patch("a", "1", &serde_json::json!({"y": 2}), Some(3))
            .delete("b", "3", None);
        assert_eq!(batch.len(), 4);
        let kinds: Vec<i32> = batch.ops.iter().map(|op| op.kind).collect();
        assert_eq!(
            kinds,
            vec![
                pb::BatchOpKind::BatchPut as i32,
                pb::BatchOpKind::BatchCreate as i32,
                pb::BatchOpKind::BatchPatchMerge as i32,
                pb::BatchOpKind::BatchDelete as i32,
            ]
        );
        assert_eq!(batch.ops[2].expected_version, 3);
        assert_eq!(batch.ops[0].json, r#"{"x":1}"#);
    }

    #[tokio::test]
    async fn invalid_op_fails_commit_without_network() {
        let outcome = client()
            .batch()
            .put("a", "1", &serde_json::json!({}))
            .replace("a", "1", &serde_json::json!({}), Some(0))
            .commit()
            .await;
        assert!(matches!(outcome, Err(Error::Config(_))));
    }
}
