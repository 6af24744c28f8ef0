//! Plain data types of the client API and their conversions from and to `floe.v1` messages.
//!
//! Owns: [`ReadConsistency`], [`Document`], [`WriteOutcome`], [`CollectionInfo`], and the JSON
//! (de)serialization of document bodies (the wire carries documents as JSON text).
//!
//! Pure; no I/O.

use std::time::Duration;

use floe_proto::v1 as pb;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// How fresh a read must be. The client sends what is asked; the server may answer
/// `invalid_argument` for levels it does not implement yet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReadConsistency {
    /// Linearizable: served by the shard leader after confirming leadership.
    Strong,
    /// Any replica's local state.
    Eventual,
    /// Any replica whose state is provably no older than the bound.
    BoundedStaleness(Duration),
    /// Any replica that has applied at least the state named by this session token (a token
    /// from a response, possibly handed over from another client).
    Session(String),
    /// Read-your-writes with this client's own session: `Session` with the newest token of
    /// every response this client received (writes and reads). The client's default, like
    /// Cosmos DB's session consistency.
    #[default]
    ReadYourWrites,
}

impl ReadConsistency {
    /// True when the read must go to the leader.
    pub fn needs_leader(&self) -> bool {
        matches!(self, ReadConsistency::Strong)
    }

    /// The wire form; `session` is the client's own token, sent for `ReadYourWrites`.
    pub(crate) fn to_proto(&self, session: &str) -> pb::ReadOptions {
        match self {
            ReadConsistency::ReadYourWrites => pb::ReadOptions {
                consistency: pb::Consistency::Session as i32,
                session_token: session.to_owned(),
                ..Default::default()
            },
            ReadConsistency::Strong => {
                pb::ReadOptions { consistency: pb::Consistency::Strong as i32, ..Default::default() }
            }
            ReadConsistency::Eventual => {
                pb::ReadOptions { consistency: pb::Consistency::Eventual as i32, ..Default::default() }
            }
            ReadConsistency::BoundedStaleness(staleness_max) => pb::ReadOptions {
                consistency: pb::Consistency::BoundedStaleness as i32,
                max_staleness_ms: u64::try_from(staleness_max.as_millis()).unwrap_or(u64::MAX),
                ..Default::default()
            },
            ReadConsistency::Session(token) => pb::ReadOptions {
                consistency: pb::Consistency::Session as i32,
                session_token: token.clone(),
                ..Default::default()
            },
        }
    }
}

/// A stored document. Use `T = serde_json::Value` for untyped access.
#[derive(Debug, Clone, PartialEq)]
pub struct Document<T = Value> {
    pub id: String,
    /// Strictly increases with every write to the document.
    pub version: u64,
    pub value: T,
}

impl<T: DeserializeOwned> Document<T> {
    pub(crate) fn from_proto(document: pb::Document) -> Result<Self> {
        let value = decode_json(&document.json)?;
        Ok(Document { id: document.id, version: document.version, value })
    }
}

/// The result of one acknowledged write.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteOutcome {
    pub collection: String,
    pub id: String,
    /// The document's version after the write (for deletes: the version of the deletion).
    pub version: u64,
    /// Pass to [`ReadConsistency::Session`] to read your own write from any replica.
    pub session_token: String,
    /// The document after the write, for patches; `None` for other writes.
    pub json: Option<Value>,
}

impl WriteOutcome {
    pub(crate) fn from_proto(response: pb::WriteResponse, session_token_batch: &str) -> Result<Self> {
        let json = if response.json.is_empty() { None } else { Some(decode_json::<Value>(&response.json)?) };
        let session_token = match &response.meta {
            Some(meta) if !meta.session_token.is_empty() => meta.session_token.clone(),
            _ => session_token_batch.to_owned(),
        };
        Ok(WriteOutcome {
            collection: response.collection,
            id: response.id,
            version: response.version,
            session_token,
            json,
        })
    }

    /// The document after the write, typed; `None` when the server returned no body.
    pub fn document<T: DeserializeOwned>(&self) -> Result<Option<Document<T>>> {
        match &self.json {
            None => Ok(None),
            Some(json) => Ok(Some(Document {
                id: self.id.clone(),
                version: self.version,
                value: serde_json::from_value(json.clone())?,
            })),
        }
    }
}

/// A collection as listed by the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionInfo {
    pub tenant: String,
    pub name: String,
    /// Meta log index at which the collection was created.
    pub created_at_index: u64,
}

impl From<pb::CollectionInfo> for CollectionInfo {
    fn from(info: pb::CollectionInfo) -> Self {
        CollectionInfo { tenant: info.tenant, name: info.name, created_at_index: info.created_at_index }
    }
}

/// Serializes a value to the JSON text the wire carries.
pub(crate) fn encode_json<T: Serialize + ?Sized>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|error| Error::Serialization(error.to_string()))
}

/// Parses JSON text from the wire into `T`.
pub(crate) fn decode_json<T: DeserializeOwned>(json: &str) -> Result<T> {
    serde_json::from_str(json).map_err(|error| Error::Serialization(error.to_string()))
}

/// Converts an optional expected version to the wire's "0 means no condition" encoding.
/// `Some(0)` is rejected: it would silently turn into an unconditional write.
pub(crate) fn expected_version_to_proto(expected: Option<u64>) -> Result<u64> {
    match expected {
        None => Ok(0),
        Some(0) => Err(Error::Config(
            "expected version 0 is not a valid version (use None for no condition, or create)".into(),
        )),
        Some(version) => Ok(version),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consistency_to_proto() {
        let read = ReadConsistency::BoundedStaleness(Duration::from_millis(1500)).to_proto("");
        assert_eq!(read.consistency, pb::Consistency::BoundedStaleness as i32);
        assert_eq!(read.max_staleness_ms, 1500);
        let read = ReadConsistency::Session("tok".into()).to_proto("mine");
        assert_eq!(read.consistency, pb::Consistency::Session as i32);
        assert_eq!(read.session_token, "tok");
        let read = ReadConsistency::default().to_proto("1:5");
        assert_eq!(read.consistency, pb::Consistency::Session as i32);
        assert_eq!(read.session_token, "1:5");
        assert_eq!(ReadConsistency::Strong.to_proto("1:5").session_token, "");
        assert!(ReadConsistency::Strong.needs_leader());
        assert!(!ReadConsistency::Eventual.needs_leader());
        assert!(!ReadConsistency::ReadYourWrites.needs_leader());
    }

    #[test]
    fn expected_version_zero_is_rejected() {
        assert_eq!(expected_version_to_proto(None).unwrap(), 0);
        assert_eq!(expected_version_to_proto(Some(4)).unwrap(), 4);
        assert!(expected_version_to_proto(Some(0)).is_err());
    }

    #[test]
    fn write_outcome_from_proto() {
        let response = pb::WriteResponse {
            collection: "c".into(),
            id: "d".into(),
            version: 9,
            meta: Some(pb::ResponseMeta { session_token: "s1".into(), ..Default::default() }),
            json: r#"{"a":1}"#.into(),
        };
        let outcome = WriteOutcome::from_proto(response, "batch").unwrap();
        assert_eq!(outcome.session_token, "s1");
        assert_eq!(outcome.json, Some(serde_json::json!({"a": 1})));
        let document = outcome.document::<Value>().unwrap().unwrap();
        assert_eq!(document.version, 9);

        let bare = pb::WriteResponse { collection: "c".into(), id: "d".into(), version: 2, ..Default::default() };
        let outcome = WriteOutcome::from_proto(bare, "batch").unwrap();
        assert_eq!(outcome.session_token, "batch");
        assert_eq!(outcome.json, None);
    }

    #[test]
    fn document_decode_error_is_serialization() {
        let document = pb::Document { collection: "c".into(), id: "d".into(), version: 1, json: "{oops".into() };
        assert!(matches!(Document::<Value>::from_proto(document), Err(Error::Serialization(_))));
    }
}
