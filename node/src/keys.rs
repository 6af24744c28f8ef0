//! Byte encodings of every key Floe stores (part of the stable on-disk format).
//!
//! Data column family (global keys, no group prefix, so split and merge only move range
//! boundaries):
//! - catalog: `0x00 | kind | ...` (owned by the meta group, range `[0x00, 0x01)`);
//! - documents: `0x01 | tenant | 0x00 | collection | 0x00 | id`, so one collection's documents
//!   are contiguous and ordered by id. Names and ids never contain 0x00 (control characters
//!   are refused at the API), which keeps the encoding unambiguous.
//!
//! Raft column families: `group_id (u64 BE) | ...`.

/// Group id of the meta group (catalog).
pub const META_GROUP: u64 = 0;
/// Group id of the first data shard, covering the whole document key space.
pub const FIRST_SHARD: u64 = 1;

/// Prefix byte of catalog keys.
pub const CATALOG_PREFIX: u8 = 0x00;
/// Prefix byte of document keys.
pub const DOC_PREFIX: u8 = 0x01;

const CATALOG_NODE: u8 = b'n';
const CATALOG_COLLECTION: u8 = b'c';
const CATALOG_SHARD: u8 = b's';
const CATALOG_CLUSTER: u8 = b'k';
const CATALOG_REMOVED_NODE: u8 = b'r';
const CATALOG_NEXT_GROUP: u8 = b'g';
const CATALOG_MERGE: u8 = b'x';
const CATALOG_MERGE_PART: u8 = b'y';
const CATALOG_MERGED_AWAY: u8 = b'z';

/// Field prefix (in `raft_meta`) of a group's stored request answers (write deduplication).
/// Kept per group, outside the data range: several groups share one data column family, and
/// a group's answers must travel in its snapshots whatever its range is.
pub const DEDUP_FIELD: &str = "dedup:";
/// Field prefix of a group's "which requests were applied at log index N" records.
pub const DEDUP_INDEX_FIELD: &str = "dedup#";

/// Key of group `group`'s stored answer to request `request_id`.
pub fn dedup_key(group: u64, request_id: &str) -> Vec<u8> {
    group_meta_key(group, &format!("{DEDUP_FIELD}{request_id}"))
}

/// Key recording which requests group `group` applied at log `index` (for eviction).
pub fn dedup_index_key(group: u64, index: u64) -> Vec<u8> {
    group_meta_key(group, &format!("{DEDUP_INDEX_FIELD}{index:020}"))
}

/// Key of one document.
pub fn doc_key(tenant: &str, collection: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + tenant.len() + collection.len() + id.len());
    k.push(DOC_PREFIX);
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(collection.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Prefix of every document key of one collection.
pub fn collection_prefix(tenant: &str, collection: &str) -> Vec<u8> {
    // Ends with the 0x00 separator after the collection name, so "users" never matches
    // "users2".
    doc_key(tenant, collection, "")
}

/// Splits a document key back into `(tenant, collection, id)`.
pub fn parse_doc_key(key: &[u8]) -> Option<(String, String, String)> {
    let rest = key.strip_prefix(&[DOC_PREFIX])?;
    let mut parts = rest.splitn(3, |b| *b == 0);
    let tenant = std::str::from_utf8(parts.next()?).ok()?;
    let collection = std::str::from_utf8(parts.next()?).ok()?;
    let id = std::str::from_utf8(parts.next()?).ok()?;
    Some((tenant.to_string(), collection.to_string(), id.to_string()))
}

pub fn catalog_node_key(node_id: u64) -> Vec<u8> {
    let mut k = vec![CATALOG_PREFIX, CATALOG_NODE];
    k.extend_from_slice(&node_id.to_be_bytes());
    k
}
/// Tombstone of a node removed from the cluster (its id is never reused).
pub fn catalog_removed_node_key(node_id: u64) -> Vec<u8> {
    let mut k = vec![CATALOG_PREFIX, CATALOG_REMOVED_NODE];
    k.extend_from_slice(&node_id.to_be_bytes());
    k
}
pub fn catalog_nodes_prefix() -> Vec<u8> {
    vec![CATALOG_PREFIX, CATALOG_NODE]
}
pub fn catalog_collection_key(tenant: &str, name: &str) -> Vec<u8> {
    let mut k = vec![CATALOG_PREFIX, CATALOG_COLLECTION];
    k.extend_from_slice(tenant.as_bytes());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}
pub fn catalog_collections_prefix(tenant: Option<&str>) -> Vec<u8> {
    let mut k = vec![CATALOG_PREFIX, CATALOG_COLLECTION];
    if let Some(t) = tenant {
        k.extend_from_slice(t.as_bytes());
        k.push(0);
    }
    k
}
pub fn catalog_shard_key(shard_id: u64) -> Vec<u8> {
    let mut k = vec![CATALOG_PREFIX, CATALOG_SHARD];
    k.extend_from_slice(&shard_id.to_be_bytes());
    k
}
pub fn catalog_shards_prefix() -> Vec<u8> {
    vec![CATALOG_PREFIX, CATALOG_SHARD]
}
pub fn catalog_cluster_key() -> Vec<u8> {
    vec![CATALOG_PREFIX, CATALOG_CLUSTER]
}
/// A merge in progress, by the merged group's id.
pub fn catalog_merge_key(into: u64) -> Vec<u8> {
    let mut k = vec![CATALOG_PREFIX, CATALOG_MERGE];
    k.extend_from_slice(&into.to_be_bytes());
    k
}
pub fn catalog_merges_prefix() -> Vec<u8> {
    vec![CATALOG_PREFIX, CATALOG_MERGE]
}
/// Which open merge shard `part` takes part in.
pub fn catalog_merge_part_key(part: u64) -> Vec<u8> {
    let mut k = vec![CATALOG_PREFIX, CATALOG_MERGE_PART];
    k.extend_from_slice(&part.to_be_bytes());
    k
}
/// Tombstone of a shard merged away (its replicas anywhere are obsolete).
pub fn catalog_merged_away_key(group: u64) -> Vec<u8> {
    let mut k = vec![CATALOG_PREFIX, CATALOG_MERGED_AWAY];
    k.extend_from_slice(&group.to_be_bytes());
    k
}
/// The next unused group id (shard ids are group ids, allocated by the meta group).
pub fn catalog_next_group_key() -> Vec<u8> {
    vec![CATALOG_PREFIX, CATALOG_NEXT_GROUP]
}

/// The data range `[start, end)` a group owns at bootstrap (`end` empty: unbounded).
pub fn initial_group_range(group_id: u64) -> (Vec<u8>, Vec<u8>) {
    if group_id == META_GROUP {
        (vec![CATALOG_PREFIX], vec![DOC_PREFIX])
    } else {
        (vec![DOC_PREFIX], Vec::new())
    }
}

/// Key of a raft log entry.
pub fn log_key(group_id: u64, index: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(16);
    k.extend_from_slice(&group_id.to_be_bytes());
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// Index encoded in a raft log key.
pub fn log_key_index(key: &[u8]) -> Option<u64> {
    let bytes: [u8; 8] = key.get(8..16)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// Key of a per-group metadata field (`vote`, `committed`, `purged`, `applied`, ...).
pub fn group_meta_key(group_id: u64, field: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + field.len());
    k.extend_from_slice(&group_id.to_be_bytes());
    k.extend_from_slice(field.as_bytes());
    k
}

/// Hex rendering of a key for humans and JSON (`/v1/cluster`).
pub fn to_hex(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_keys_round_trip_and_group_by_collection() {
        let k = doc_key("t", "users", "alice");
        assert_eq!(parse_doc_key(&k), Some(("t".into(), "users".into(), "alice".into())));
        let p = collection_prefix("t", "users");
        assert!(k.starts_with(&p));
        assert!(!doc_key("t", "users2", "a").starts_with(&p), "a longer collection name is another collection");
        assert!(doc_key("t", "a", "zzz") < doc_key("t", "b", ""));
    }

    #[test]
    fn catalog_keys_sort_before_documents() {
        let (s, e) = initial_group_range(META_GROUP);
        for k in [
            catalog_node_key(3),
            catalog_collection_key("t", "c"),
            catalog_shard_key(1),
            catalog_cluster_key(),
            catalog_next_group_key(),
            catalog_merge_key(9),
            catalog_merge_part_key(9),
            catalog_merged_away_key(9),
        ] {
            assert!(k >= s && k < e);
        }
        assert!(doc_key("", "", "") >= e);
    }

    #[test]
    fn log_keys_order_by_group_then_index() {
        assert!(log_key(1, u64::MAX) < log_key(2, 0));
        assert!(log_key(1, 9) < log_key(1, 10));
        assert_eq!(log_key_index(&log_key(7, 42)), Some(42));
    }
}
