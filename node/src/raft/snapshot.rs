//! A group's snapshot: what it holds, how it is encoded, and when it is read.
//!
//! Owns: `SnapshotImage` (a group's state, the data of its range and its stored request
//! answers), the image's byte encoding, and `SnapshotData`, openraft's snapshot data type
//! for every Floe group. A snapshot is either the bytes of an image (received from a
//! leader), or a `SnapshotView` of this replica's own state: an engine snapshot taken on the
//! state machine's task (O(1) on RocksDB) and read only when the snapshot is sent. openraft
//! 0.9 builds a snapshot at every start of a replica whose log was purged (every split
//! child, at every wake), and reads the current one at start and before each send, so
//! building and reading must not cost a copy of the range.
//!
//! Invariants:
//! - a view reads the engine as it was when the view was taken, so its image is the state
//!   as of the snapshot's last log id whatever is applied after;
//! - encoding then decoding gives the image back; truncated or malformed bytes decode to
//!   `None`, never to a partial image;
//! - the encoding is written in one pass in key order (no length is known in advance):
//!   `u32 header length | header JSON | data pairs | END | answer pairs`, each pair
//!   `u32 length | key | u32 length | value`, END a key length of `u32::MAX`.

use crate::shard::GroupState;
use crate::storage::engine::{prefix_end, EngineSnapshot, KvPairs};
use crate::storage::{Cf, EngineError};
use std::sync::Arc;

/// Key length that ends the data pairs (no key is 4 GiB long).
const END_OF_DATA: u32 = u32::MAX;

/// Pairs read from a view at a time while encoding it.
const SCAN_PAGE_PAIRS: usize = 1024;

/// A group's snapshot content: its state, its data range and its stored request answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotImage {
    pub state: Option<GroupState>,
    pub data: KvPairs,
    /// `raft_meta` pairs of the group's request answers (keys with the group's prefix).
    pub answers: KvPairs,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SnapshotHeader {
    state: Option<GroupState>,
}

fn put_header(out: &mut Vec<u8>, state: &Option<GroupState>) {
    let header = serde_json::to_vec(&SnapshotHeader { state: state.clone() }).unwrap_or_default();
    out.extend_from_slice(&(header.len() as u32).to_be_bytes());
    out.extend_from_slice(&header);
}

fn put_pair(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
}

/// Reads a `u32` length-prefixed item off the front of `bytes`.
fn take_item(bytes: &mut &[u8]) -> Option<Vec<u8>> {
    let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let item = bytes.get(4..4 + len)?.to_vec();
    *bytes = &bytes[4 + len..];
    Some(item)
}

/// Reads pairs until the end of `bytes`, or (with `until_end_of_data`) until the END mark.
fn take_pairs(bytes: &mut &[u8], until_end_of_data: bool) -> Option<KvPairs> {
    let mut out = Vec::new();
    loop {
        if until_end_of_data {
            if bytes.get(..4)? == END_OF_DATA.to_be_bytes() {
                *bytes = &bytes[4..];
                return Some(out);
            }
        } else if bytes.is_empty() {
            return Some(out);
        }
        let k = take_item(bytes)?;
        let v = take_item(bytes)?;
        out.push((k, v));
    }
}

fn take_header(bytes: &mut &[u8]) -> Option<Option<GroupState>> {
    let header_len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let header: SnapshotHeader = serde_json::from_slice(bytes.get(4..4 + header_len)?).ok()?;
    *bytes = &bytes[4 + header_len..];
    Some(header.state)
}

impl SnapshotImage {
    /// The encoding, as a test oracle: nodes encode a `SnapshotView` (the same format, read
    /// from the engine a page at a time).
    #[cfg(test)]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_header(&mut out, &self.state);
        for (k, v) in &self.data {
            put_pair(&mut out, k, v);
        }
        out.extend_from_slice(&END_OF_DATA.to_be_bytes());
        for (k, v) in &self.answers {
            put_pair(&mut out, k, v);
        }
        out
    }

    /// Only the group state of an encoded image (`None` when malformed), without decoding
    /// the data.
    pub fn decode_state(mut bytes: &[u8]) -> Option<Option<GroupState>> {
        take_header(&mut bytes)
    }

    /// `None` on truncated or malformed input.
    pub fn decode(mut bytes: &[u8]) -> Option<Self> {
        let state = take_header(&mut bytes)?;
        let data = take_pairs(&mut bytes, true)?;
        let answers = take_pairs(&mut bytes, false)?;
        Some(Self { state, data, answers })
    }
}

/// A replica's own state at one applied index, read when it is encoded.
#[derive(Clone)]
pub struct SnapshotView {
    pub state: Option<GroupState>,
    /// The data range (`None`: the group owns no data, e.g. it was retired).
    pub data_range: Option<(Vec<u8>, Vec<u8>)>,
    /// Prefix (in `raft_meta`) of the group's stored request answers.
    pub answers_prefix: Vec<u8>,
    pub engine: Arc<dyn EngineSnapshot>,
}

impl SnapshotView {
    /// The image's encoding, read from the view a page at a time.
    pub fn encode(&self) -> Result<Vec<u8>, EngineError> {
        let mut out = Vec::new();
        put_header(&mut out, &self.state);
        if let Some((start, end)) = &self.data_range {
            self.encode_range(&mut out, Cf::Data, start, end)?;
        }
        out.extend_from_slice(&END_OF_DATA.to_be_bytes());
        self.encode_range(&mut out, Cf::RaftMeta, &self.answers_prefix, &prefix_end(&self.answers_prefix))?;
        Ok(out)
    }

    fn encode_range(&self, out: &mut Vec<u8>, cf: Cf, start: &[u8], end: &[u8]) -> Result<(), EngineError> {
        let mut from = start.to_vec();
        loop {
            let page = self.engine.scan(cf, &from, end, SCAN_PAGE_PAIRS)?;
            for (k, v) in &page {
                put_pair(out, k, v);
            }
            match page.last() {
                Some((last, _)) if page.len() == SCAN_PAGE_PAIRS => {
                    // The smallest key after `last`.
                    from = last.clone();
                    from.push(0);
                }
                _ => return Ok(()),
            }
        }
    }
}

/// openraft's snapshot data for Floe groups (see the module comment).
#[derive(Clone)]
pub enum SnapshotData {
    /// An encoded image (received from a leader, or an empty buffer to receive into).
    Encoded(Vec<u8>),
    /// This replica's own state, encoded when the snapshot is sent.
    View(SnapshotView),
}

impl SnapshotData {
    /// The encoded image (a view is read now).
    pub fn into_bytes(self) -> Result<Vec<u8>, EngineError> {
        match self {
            SnapshotData::Encoded(bytes) => Ok(bytes),
            SnapshotData::View(view) => view.encode(),
        }
    }
}

impl std::fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotData::Encoded(bytes) => write!(f, "Encoded({} bytes)", bytes.len()),
            SnapshotData::View(view) => write!(f, "View(range {:?})", view.data_range),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::engine::{KeyRange, KvEngine};
    use crate::storage::mem::MemEngine;
    use crate::storage::WriteBatch;

    fn image() -> SnapshotImage {
        SnapshotImage {
            state: Some(GroupState::initial(3, (vec![1], vec![]))),
            data: vec![(b"a".to_vec(), b"1".to_vec()), (vec![], vec![0; 300])],
            answers: vec![(b"k".to_vec(), vec![7; 40])],
        }
    }

    #[test]
    fn image_round_trips_and_rejects_truncation() {
        let bytes = image().encode();
        assert_eq!(SnapshotImage::decode(&bytes), Some(image()));
        assert_eq!(SnapshotImage::decode_state(&bytes), Some(image().state));
        for cut in [1, 5, 45, bytes.len() - 1] {
            assert_eq!(SnapshotImage::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut no_end = image();
        no_end.answers.clear();
        let bytes = no_end.encode();
        assert_eq!(SnapshotImage::decode(&bytes[..bytes.len() - 4]), None, "the END mark is required");
    }

    /// A view encodes its range and answers as of when it was taken, over several scan
    /// pages, and the same as the image those pairs make.
    #[test]
    fn a_view_encodes_its_past_over_several_pages() {
        let engine = MemEngine::new();
        let key = |i: usize| format!("d{i:05}").into_bytes();
        let mut batch = WriteBatch::new();
        for i in 0..(2 * SCAN_PAGE_PAIRS + 10) {
            batch.put(Cf::Data, key(i), vec![i as u8; 3]);
        }
        batch.put(Cf::Data, b"e-outside".to_vec(), b"x".to_vec());
        batch.put(Cf::RaftMeta, b"ans/1".to_vec(), b"r".to_vec());
        engine.write(batch, true).unwrap();
        let (start, end) = (b"d".to_vec(), b"e".to_vec());
        let ranges = [
            KeyRange { cf: Cf::Data, start: start.clone(), end: end.clone() },
            KeyRange { cf: Cf::RaftMeta, start: b"ans/".to_vec(), end: prefix_end(b"ans/") },
        ];
        let expected = SnapshotImage {
            state: None,
            data: engine.scan(Cf::Data, &start, &end, usize::MAX).unwrap(),
            answers: vec![(b"ans/1".to_vec(), b"r".to_vec())],
        };
        let view = SnapshotView {
            state: None,
            data_range: Some((start, end)),
            answers_prefix: b"ans/".to_vec(),
            engine: engine.snapshot(&ranges).unwrap(),
        };
        let mut later = WriteBatch::new();
        later.put(Cf::Data, key(5), b"changed".to_vec());
        later.delete(Cf::RaftMeta, b"ans/1".to_vec());
        engine.write(later, true).unwrap();
        let bytes = SnapshotData::View(view).into_bytes().unwrap();
        assert_eq!(bytes, expected.encode());
        assert_eq!(SnapshotImage::decode(&bytes), Some(expected));
    }
}
