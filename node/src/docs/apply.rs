//! Pure application of a `DocBatch` to stored state.
//!
//! Given a read callback for the state before the batch and the log index, it either returns
//! the write set and per-operation results, or the first failing operation. Writing the set
//! (with the applied index, in one batch) is the caller's job.

use super::{limits, BatchError, DocAction, DocBatch, DocError, DocWriteResult};
use crate::keys::doc_key;
use std::collections::BTreeSet;

/// A stored document: `version (u64 BE) | compact JSON text`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDoc {
    pub version: u64,
    pub json: String,
}

impl StoredDoc {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(8 + self.json.len());
        v.extend_from_slice(&self.version.to_be_bytes());
        v.extend_from_slice(self.json.as_bytes());
        v
    }

    /// Decodes a stored value; `None` when it is corrupt.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let version = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let json = std::str::from_utf8(bytes.get(8..)?).ok()?.to_string();
        Some(Self { version, json })
    }
}

/// One key's change: `Some(doc)` to store, `None` to delete.
pub type DocChange = (Vec<u8>, Option<StoredDoc>);

/// What a batch does: the changes to write and a result per operation.
pub type BatchOutcome = (Vec<DocChange>, Vec<DocWriteResult>);

/// Applies `batch` at log `index` over the state `read` returns. `Err` from `read` is a
/// storage failure and aborts the apply; `Ok(Err(..))` is a refused batch (nothing changes).
pub fn apply_batch<E>(
    read: impl Fn(&[u8]) -> Result<Option<StoredDoc>, E>,
    index: u64,
    batch: &DocBatch,
) -> Result<Result<BatchOutcome, BatchError>, E> {
    let mut changes = Vec::with_capacity(batch.ops.len());
    let mut results = Vec::with_capacity(batch.ops.len());
    let mut seen = BTreeSet::new();
    for (op_index, op) in batch.ops.iter().enumerate() {
        let fail =
            |error: DocError| BatchError { op_index, collection: op.collection.clone(), id: op.id.clone(), error };
        let key = doc_key(&batch.tenant, &op.collection, &op.id);
        if !seen.insert(key.clone()) {
            return Ok(Err(fail(DocError::InvalidBatch("the same document appears twice in one batch".into()))));
        }
        let current = read(&key)?;
        let outcome = apply_one(current.as_ref(), &op.action, &batch.limits);
        let new = match outcome {
            Ok(new) => new,
            Err(e) => return Ok(Err(fail(e))),
        };
        let patched = matches!(op.action, DocAction::MergePatch { .. } | DocAction::JsonPatch { .. });
        results.push(DocWriteResult {
            collection: op.collection.clone(),
            id: op.id.clone(),
            version: index,
            json: if patched { new.clone() } else { None },
        });
        changes.push((key, new.map(|json| StoredDoc { version: index, json })));
    }
    Ok(Ok((changes, results)))
}

fn check_expected(current: Option<&StoredDoc>, expected: Option<u64>) -> Result<(), DocError> {
    match expected {
        Some(v) if current.map(|c| c.version) != Some(v) => {
            Err(DocError::VersionMismatch { expected: v, actual: current.map(|c| c.version) })
        }
        _ => Ok(()),
    }
}

fn existing(current: Option<&StoredDoc>) -> Result<&StoredDoc, DocError> {
    current.ok_or(DocError::NotFound)
}

/// The new text of the document (`None`: deleted), or why the operation is refused.
fn apply_one(
    current: Option<&StoredDoc>,
    action: &DocAction,
    lim: &limits::Limits,
) -> Result<Option<String>, DocError> {
    match action {
        DocAction::Put { json, expected } => {
            check_expected(current, *expected)?;
            Ok(Some(json.clone()))
        }
        DocAction::Create { json } => match current {
            Some(c) => Err(DocError::AlreadyExists { version: c.version }),
            None => Ok(Some(json.clone())),
        },
        DocAction::Replace { json, expected } => {
            existing(current)?;
            check_expected(current, *expected)?;
            Ok(Some(json.clone()))
        }
        DocAction::MergePatch { patch, expected } => {
            let doc = existing(current)?;
            check_expected(current, *expected)?;
            let patch: serde_json::Value =
                serde_json::from_str(patch).map_err(|e| DocError::InvalidPatch(e.to_string()))?;
            let mut value = parse_stored(doc)?;
            json_patch::merge(&mut value, &patch);
            Ok(Some(limits::check_value(&value, lim)?))
        }
        DocAction::JsonPatch { patch, expected } => {
            let doc = existing(current)?;
            check_expected(current, *expected)?;
            let patch: json_patch::Patch = serde_json::from_str(patch)
                .map_err(|e| DocError::InvalidPatch(format!("not an RFC 6902 operation list: {e}")))?;
            if patch.0.len() > JSON_PATCH_OPS_MAX {
                return Err(DocError::InvalidPatch(format!(
                    "{} operations, the limit is {JSON_PATCH_OPS_MAX}",
                    patch.0.len()
                )));
            }
            let mut value = parse_stored(doc)?;
            for (i, op) in patch.0.iter().enumerate() {
                apply_json_patch_op(&mut value, op, i)?;
                // Checked after every operation: `copy` doubles a document per step, so the
                // result must never be allowed to grow far past the limit first.
                limits::check_bounds(&value, lim)?;
            }
            Ok(Some(limits::check_value(&value, lim)?))
        }
        DocAction::Delete { expected } => {
            existing(current)?;
            check_expected(current, *expected)?;
            Ok(None)
        }
    }
}

/// Most operations in one RFC 6902 patch (each is checked against the limits as it applies).
pub const JSON_PATCH_OPS_MAX: usize = 256;

/// Applies one JSON patch operation to a private copy. Uses the library's no-undo variant
/// (its undo path can panic on moves into a parent, json-patch 4.2 `unreachable!`) and turns
/// any panic into a refused patch, so hostile input can never take a replica down.
fn apply_json_patch_op(
    value: &mut serde_json::Value,
    op: &json_patch::PatchOperation,
    index: usize,
) -> Result<(), DocError> {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        json_patch::patch_unsafe(value, std::slice::from_ref(op))
    }));
    match outcome {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(match e.kind {
            json_patch::PatchErrorKind::TestFailed => DocError::PatchTestFailed(format!("operation {index}: {e}")),
            _ => DocError::InvalidPatch(format!("operation {index}: {e}")),
        }),
        Err(_) => Err(DocError::InvalidPatch(format!("operation {index} cannot be applied to this document"))),
    }
}

fn parse_stored(doc: &StoredDoc) -> Result<serde_json::Value, DocError> {
    // Stored text was validated on the way in; failure here means corruption, reported as a
    // refused patch rather than a panic so a bad value cannot crash the node.
    serde_json::from_str(&doc.json).map_err(|e| DocError::InvalidPatch(format!("stored document unreadable: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docs::{DocOp, Limits};
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::convert::Infallible;

    /// Runs batches against a BTreeMap store the way the state machine does.
    struct Store {
        map: BTreeMap<Vec<u8>, StoredDoc>,
        index: u64,
    }

    impl Store {
        fn new() -> Self {
            Self { map: BTreeMap::new(), index: 0 }
        }
        fn run(&mut self, ops: Vec<DocOp>) -> Result<Vec<DocWriteResult>, BatchError> {
            self.index += 1;
            let batch = DocBatch { tenant: "t".into(), ops, limits: Limits::default(), request_id: None };
            let map = &self.map;
            let out = apply_batch(|k| Ok::<_, Infallible>(map.get(k).cloned()), self.index, &batch).unwrap();
            let (changes, results) = out?;
            for (k, v) in changes {
                match v {
                    Some(d) => {
                        self.map.insert(k, d);
                    }
                    None => {
                        self.map.remove(&k);
                    }
                }
            }
            Ok(results)
        }
        fn get(&self, id: &str) -> Option<&StoredDoc> {
            self.map.get(&doc_key("t", "c", id))
        }
    }

    fn op(id: &str, action: DocAction) -> DocOp {
        DocOp { collection: "c".into(), id: id.into(), action }
    }

    #[test]
    fn create_replace_patch_delete() {
        let mut s = Store::new();
        let r = s.run(vec![op("a", DocAction::Create { json: r#"{"n":1}"#.into() })]).unwrap();
        assert_eq!(r[0].version, 1);
        let e = s.run(vec![op("a", DocAction::Create { json: "{}".into() })]).unwrap_err();
        assert_eq!(e.error, DocError::AlreadyExists { version: 1 });
        let e = s.run(vec![op("b", DocAction::Replace { json: "{}".into(), expected: None })]).unwrap_err();
        assert_eq!(e.error, DocError::NotFound);
        let e = s.run(vec![op("a", DocAction::Replace { json: "{}".into(), expected: Some(7) })]).unwrap_err();
        assert_eq!(e.error, DocError::VersionMismatch { expected: 7, actual: Some(1) });
        let r = s
            .run(vec![op("a", DocAction::MergePatch { patch: r#"{"n":null,"m":{"x":1}}"#.into(), expected: Some(1) })])
            .unwrap();
        assert_eq!(r[0].json.as_deref(), Some(r#"{"m":{"x":1}}"#));
        let r = s
            .run(vec![op(
                "a",
                DocAction::JsonPatch { patch: r#"[{"op":"add","path":"/m/y","value":2}]"#.into(), expected: None },
            )])
            .unwrap();
        assert_eq!(r[0].json.as_deref(), Some(r#"{"m":{"x":1,"y":2}}"#));
        let e = s
            .run(vec![op(
                "a",
                DocAction::JsonPatch { patch: r#"[{"op":"test","path":"/m/x","value":9}]"#.into(), expected: None },
            )])
            .unwrap_err();
        assert!(matches!(e.error, DocError::PatchTestFailed(_)));
        let e = s.run(vec![op("a", DocAction::MergePatch { patch: "[1]".into(), expected: None })]).unwrap_err();
        assert_eq!(e.error, DocError::NotAnObject, "a merge patch that is not an object replaces the document");
        let e =
            s.run(vec![op("a", DocAction::JsonPatch { patch: r#"{"op":"add"}"#.into(), expected: None })]).unwrap_err();
        assert!(matches!(e.error, DocError::InvalidPatch(_)));
        let v = s.get("a").unwrap().version;
        s.run(vec![op("a", DocAction::Delete { expected: Some(v) })]).unwrap();
        assert!(s.get("a").is_none());
        let e = s.run(vec![op("a", DocAction::Delete { expected: None })]).unwrap_err();
        assert_eq!(e.error, DocError::NotFound);
    }

    #[test]
    fn put_if_match_on_absent_document_is_a_mismatch() {
        let mut s = Store::new();
        let e = s.run(vec![op("a", DocAction::Put { json: "{}".into(), expected: Some(3) })]).unwrap_err();
        assert_eq!(e.error, DocError::VersionMismatch { expected: 3, actual: None });
        assert!(s.get("a").is_none());
    }

    /// Regression (review): a failing `test` after a move into the parent made json-patch's
    /// undo hit `unreachable!`, panicking every replica on apply; `copy` of the root doubled
    /// the document per operation.
    #[test]
    fn hostile_json_patches_are_refused_without_panicking() {
        let mut s = Store::new();
        s.run(vec![op("a", DocAction::Put { json: r#"{"a":{"b":1}}"#.into(), expected: None })]).unwrap();
        let before = s.get("a").cloned();
        let hostile = [
            r#"[{"op":"move","from":"/a/b","path":"/a"},{"op":"test","path":"/a","value":2}]"#.to_string(),
            r#"[{"op":"move","from":"/a","path":""},{"op":"test","path":"/x","value":2}]"#.to_string(),
            format!(
                "[{}]",
                (0..40).map(|i| format!(r#"{{"op":"copy","from":"","path":"/k{i}"}}"#)).collect::<Vec<_>>().join(",")
            ),
            format!("[{}]", vec![r#"{"op":"test","path":"/a/b","value":1}"#; 300].join(",")),
        ];
        for patch in hostile {
            let e = s.run(vec![op("a", DocAction::JsonPatch { patch: patch.clone(), expected: None })]).unwrap_err();
            assert!(
                matches!(e.error, DocError::PatchTestFailed(_) | DocError::InvalidPatch(_) | DocError::TooLarge { .. }),
                "{patch}: {e:?}"
            );
            assert_eq!(s.get("a").cloned(), before, "a refused patch changes nothing");
        }
    }

    #[test]
    fn patch_result_over_the_limit_is_refused_and_nothing_changes() {
        let mut s = Store::new();
        s.run(vec![op("a", DocAction::Put { json: r#"{"x":1}"#.into(), expected: None })]).unwrap();
        let lim = Limits { doc_bytes_max: 20, ..Limits::default() };
        s.index += 1;
        let batch = DocBatch {
            tenant: "t".into(),
            ops: vec![op("a", DocAction::MergePatch { patch: r#"{"y":"0123456789abcdef"}"#.into(), expected: None })],
            limits: lim,
            request_id: None,
        };
        let map = &s.map;
        let out = apply_batch(|k| Ok::<_, Infallible>(map.get(k).cloned()), s.index, &batch).unwrap();
        assert!(matches!(out.unwrap_err().error, DocError::TooLarge { .. }));
    }

    #[test]
    fn failing_operation_aborts_the_whole_batch() {
        let mut s = Store::new();
        s.run(vec![op("x", DocAction::Put { json: "{}".into(), expected: None })]).unwrap();
        let e = s
            .run(vec![
                op("a", DocAction::Put { json: r#"{"a":1}"#.into(), expected: None }),
                op("x", DocAction::Create { json: "{}".into() }),
            ])
            .unwrap_err();
        assert_eq!(e.op_index, 1);
        assert!(s.get("a").is_none(), "the first operation must not be applied");
        let e = s
            .run(vec![
                op("d", DocAction::Put { json: "{}".into(), expected: None }),
                op("d", DocAction::Put { json: "{}".into(), expected: None }),
            ])
            .unwrap_err();
        assert!(matches!(e.error, DocError::InvalidBatch(_)));
    }

    #[test]
    fn stored_doc_round_trips_and_rejects_garbage() {
        let d = StoredDoc { version: 42, json: r#"{"a":1}"#.into() };
        assert_eq!(StoredDoc::decode(&d.encode()), Some(d));
        assert_eq!(StoredDoc::decode(b"short"), None);
    }

    #[derive(Clone, Debug)]
    enum ModelOp {
        Put(u8, u8, Option<bool>),
        Create(u8, u8),
        Replace(u8, u8, Option<bool>),
        Delete(u8, Option<bool>),
    }

    fn model_op() -> impl Strategy<Value = ModelOp> {
        let cond = prop::option::of(any::<bool>());
        prop_oneof![
            (0u8..4, any::<u8>(), cond.clone()).prop_map(|(k, v, c)| ModelOp::Put(k, v, c)),
            (0u8..4, any::<u8>()).prop_map(|(k, v)| ModelOp::Create(k, v)),
            (0u8..4, any::<u8>(), cond.clone()).prop_map(|(k, v, c)| ModelOp::Replace(k, v, c)),
            (0u8..4, cond).prop_map(|(k, c)| ModelOp::Delete(k, c)),
        ]
    }

    proptest! {
        /// The document store behaves like a map of (version, value) where versions are the
        /// write's index: conditions, existence rules and strictly increasing versions.
        #[test]
        fn matches_btreemap_model(ops in prop::collection::vec(model_op(), 1..60)) {
            let mut s = Store::new();
            let mut model: BTreeMap<u8, (u64, u8)> = BTreeMap::new();
            let mut last_version: BTreeMap<u8, u64> = BTreeMap::new();
            for o in ops {
                // `Some(true)` conditions on the right version, `Some(false)` on a wrong one.
                let expected = |k: u8, c: Option<bool>, model: &BTreeMap<u8, (u64, u8)>| c.map(|right| {
                    let cur = model.get(&k).map(|e| e.0).unwrap_or(0);
                    if right { cur } else { cur + 1_000_000 }
                });
                let index = s.index + 1;
                let (key, action, want_ok, new): (u8, DocAction, bool, Option<Option<u8>>) = match o {
                    ModelOp::Put(k, v, c) => {
                        let e = expected(k, c, &model);
                        let ok = e.is_none() || (model.contains_key(&k) && e == model.get(&k).map(|x| x.0));
                        (k, DocAction::Put { json: format!("{{\"v\":{v}}}"), expected: e }, ok, Some(Some(v)))
                    }
                    ModelOp::Create(k, v) => (k, DocAction::Create { json: format!("{{\"v\":{v}}}") }, !model.contains_key(&k), Some(Some(v))),
                    ModelOp::Replace(k, v, c) => {
                        let e = expected(k, c, &model);
                        let ok = model.contains_key(&k) && (e.is_none() || e == model.get(&k).map(|x| x.0));
                        (k, DocAction::Replace { json: format!("{{\"v\":{v}}}"), expected: e }, ok, Some(Some(v)))
                    }
                    ModelOp::Delete(k, c) => {
                        let e = expected(k, c, &model);
                        let ok = model.contains_key(&k) && (e.is_none() || e == model.get(&k).map(|x| x.0));
                        (k, DocAction::Delete { expected: e }, ok, Some(None))
                    }
                };
                let got = s.run(vec![op(&key.to_string(), action)]);
                prop_assert_eq!(got.is_ok(), want_ok);
                if want_ok {
                    if let Some(prev) = last_version.get(&key) {
                        prop_assert!(index > *prev, "versions strictly increase");
                    }
                    last_version.insert(key, index);
                    match new.flatten() {
                        Some(v) => { model.insert(key, (index, v)); }
                        None => { model.remove(&key); }
                    }
                }
                for k in 0u8..4 {
                    let stored = s.get(&k.to_string()).map(|d| (d.version, d.json.clone()));
                    let want = model.get(&k).map(|(ver, v)| (*ver, format!("{{\"v\":{v}}}")));
                    prop_assert_eq!(stored, want);
                }
            }
        }
    }
}
