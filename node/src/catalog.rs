//! The catalog the meta group replicates: cluster identity, nodes, collections, shard map.
//!
//! Owns: catalog types, catalog commands and their pure apply, and typed reads of the
//! catalog from a node's local meta replica. Values are JSON under the `0x00` key prefix
//! (see `keys.rs`).
//!
//! Invariants: apply is deterministic and idempotent per command (bootstrapping twice or
//! creating an existing collection changes nothing); a shard's stored epoch only grows (an
//! older report never overwrites a newer one); group ids are handed out once.

use crate::keys;
use crate::shard::RangeMap;
use crate::storage::{Cf, Engine, EngineError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: u64,
    pub grpc_addr: String,
    /// Empty until the node registered itself.
    pub http_addr: String,
}

/// A collection of one tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionInfo {
    pub tenant: String,
    pub name: String,
    /// Meta log index that created it.
    pub created_at_index: u64,
}

/// One shard: a key range served by one raft group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardDesc {
    pub id: u64,
    /// Inclusive start of the data key range.
    pub start: Vec<u8>,
    /// Exclusive end; empty means the end of the key space.
    pub end: Vec<u8>,
    /// Bumped on every change of the range (split, merge).
    pub epoch: u64,
    pub replicas: Vec<u64>,
    /// Log index (in the shard's group) of the membership `replicas` was read from; an
    /// older report never overwrites a newer one.
    #[serde(default)]
    pub replicas_at: u64,
    /// For a merged shard: the shards it replaced (removed from the map when it is reported).
    #[serde(default)]
    pub merged: Vec<u64>,
}

/// Where a merge is (the meta group decides it, once: commit and abort exclude each other).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MergeState {
    /// The parts are being frozen.
    Preparing,
    /// Point of no return: the parts retire and the merged shard starts.
    Committed,
    /// The parts are unfrozen.
    Aborted,
}

/// A merge of `left` and `right` into the new shard `into`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeIntent {
    pub into: u64,
    pub left: u64,
    pub right: u64,
    pub state: MergeState,
}

/// Cluster identity, fixed at bootstrap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    pub cluster_id: String,
    pub bootstrapped_at_index: u64,
}

/// Catalog changes, replicated through the meta group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CatalogCommand {
    /// First command of a new cluster; ignored once bootstrapped.
    Bootstrap {
        cluster_id: String,
        nodes: Vec<NodeInfo>,
        shards: Vec<ShardDesc>,
    },
    /// A node announces its addresses (on every start).
    RegisterNode(NodeInfo),
    CreateCollection {
        tenant: String,
        name: String,
    },
    DropCollection {
        tenant: String,
        name: String,
    },
    /// The replica set of a shard changed (membership change done in the shard's group):
    /// the voters of the membership at log index `at_index` of that group.
    SetReplicas {
        shard: u64,
        replicas: Vec<u64>,
        at_index: u64,
    },
    /// A node left the cluster: forgotten, and its id tombstoned so a stale process of it
    /// cannot register again.
    RemoveNode {
        id: u64,
    },
    /// Hands out `count` new group ids (for a split's children).
    AllocateGroupIds {
        count: u64,
    },
    /// Shards as their groups applied them (after a split, or a leader's periodic report):
    /// each replaces the stored one of its id when its epoch is newer (range) or its
    /// replica list is newer (`replicas_at`). A merged shard removes the shards it replaced
    /// and ends its merge's record.
    ReportShards {
        shards: Vec<ShardDesc>,
    },
    /// Records a merge about to freeze its parts; refused while either part is in another
    /// open merge.
    BeginMerge {
        into: u64,
        left: u64,
        right: u64,
    },
    /// Commits or aborts a preparing merge; a decided merge keeps its decision.
    DecideMerge {
        into: u64,
        commit: bool,
    },
    /// Drops the record of an aborted merge whose parts were unfrozen.
    ForgetMerge {
        into: u64,
    },
}

/// Result of a catalog command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CatalogResponse {
    Bootstrapped {
        already: bool,
    },
    NodeRegistered,
    Collection {
        info: CollectionInfo,
        created: bool,
    },
    CollectionDropped {
        existed: bool,
    },
    ReplicasSet {
        found: bool,
    },
    NodeRemoved,
    /// The first of the allocated ids (the rest follow it).
    GroupIds {
        first: u64,
    },
    /// How many stored shards changed.
    ShardsReported {
        changed: u64,
    },
    /// The merge's record after the command (`None`: no such merge).
    Merge(Option<MergeIntent>),
    /// A part of the merge is already in merge `busy`.
    MergeBusy {
        busy: u64,
    },
}

/// One catalog key's change: `Some(value)` to store, `None` to delete.
pub type CatalogChange = (Vec<u8>, Option<Vec<u8>>);

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs to JSON cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// Applies `cmd` at meta log `index` over the catalog that `read` returns (`stored_shards` lists
/// every stored shard; only a merged shard's report needs it).
pub fn apply<E>(
    read: impl Fn(&[u8]) -> Result<Option<Vec<u8>>, E>,
    stored_shards: impl Fn() -> Result<Vec<ShardDesc>, E>,
    index: u64,
    cmd: &CatalogCommand,
) -> Result<(Vec<CatalogChange>, CatalogResponse), E> {
    let mut changes = Vec::new();
    let resp = match cmd {
        CatalogCommand::Bootstrap { cluster_id, nodes, shards } => {
            if read(&keys::catalog_cluster_key())?.is_some() {
                CatalogResponse::Bootstrapped { already: true }
            } else {
                let info = ClusterInfo { cluster_id: cluster_id.clone(), bootstrapped_at_index: index };
                changes.push((keys::catalog_cluster_key(), Some(encode(&info))));
                for n in nodes {
                    // A node may have registered (with its HTTP address) before bootstrap
                    // applied; keep what it said about itself.
                    let key = keys::catalog_node_key(n.id);
                    if read(&key)?.is_none() {
                        changes.push((key, Some(encode(n))));
                    }
                }
                for s in shards {
                    changes.push((keys::catalog_shard_key(s.id), Some(encode(s))));
                }
                let next = shards.iter().map(|s| s.id + 1).max().unwrap_or(keys::FIRST_SHARD + 1);
                changes.push((keys::catalog_next_group_key(), Some(encode(&next))));
                CatalogResponse::Bootstrapped { already: false }
            }
        }
        CatalogCommand::RegisterNode(n) => {
            if read(&keys::catalog_removed_node_key(n.id))?.is_some() {
                CatalogResponse::NodeRemoved
            } else {
                changes.push((keys::catalog_node_key(n.id), Some(encode(n))));
                CatalogResponse::NodeRegistered
            }
        }
        CatalogCommand::SetReplicas { shard, replicas, at_index } => {
            let key = keys::catalog_shard_key(*shard);
            match read(&key)?.and_then(|v| serde_json::from_slice::<ShardDesc>(&v).ok()) {
                Some(mut desc) => {
                    // Two membership changes may report out of order: the newer one stays.
                    if *at_index >= desc.replicas_at {
                        desc.replicas = replicas.clone();
                        desc.replicas_at = *at_index;
                        changes.push((key, Some(encode(&desc))));
                    }
                    CatalogResponse::ReplicasSet { found: true }
                }
                None => CatalogResponse::ReplicasSet { found: false },
            }
        }
        CatalogCommand::AllocateGroupIds { count } => {
            let first: u64 = match read(&keys::catalog_next_group_key())? {
                Some(v) => serde_json::from_slice(&v).unwrap_or(keys::FIRST_SHARD + 1),
                None => keys::FIRST_SHARD + 1,
            };
            changes.push((keys::catalog_next_group_key(), Some(encode(&(first + count)))));
            CatalogResponse::GroupIds { first }
        }
        CatalogCommand::ReportShards { shards } => {
            let mut changed = 0;
            for desc in shards {
                if read(&keys::catalog_merged_away_key(desc.id))?.is_some() {
                    // A late report of a shard that was merged away since: it stays gone.
                    continue;
                }
                let key = keys::catalog_shard_key(desc.id);
                let stored = read(&key)?.and_then(|v| serde_json::from_slice::<ShardDesc>(&v).ok());
                let stored_epoch = stored.as_ref().map(|s| s.epoch);
                let merged = match stored {
                    None => Some(desc.clone()),
                    Some(mut s) => {
                        let mut dirty = false;
                        if desc.epoch > s.epoch {
                            (s.start, s.end, s.epoch) = (desc.start.clone(), desc.end.clone(), desc.epoch);
                            dirty = true;
                        }
                        if desc.replicas_at > s.replicas_at {
                            (s.replicas, s.replicas_at) = (desc.replicas.clone(), desc.replicas_at);
                            dirty = true;
                        }
                        dirty.then_some(s)
                    }
                };
                if let Some(m) = merged {
                    changes.push((key, Some(encode(&m))));
                    changed += 1;
                }
                for part in &desc.merged {
                    if read(&keys::catalog_merge_part_key(*part))?.is_some() {
                        changes.push((keys::catalog_merge_part_key(*part), None));
                    }
                    // Replicas of a merged-away shard anywhere are obsolete (nodes that were
                    // behind destroy theirs).
                    changes.push((keys::catalog_merged_away_key(*part), Some(encode(&desc.id))));
                }
                // A merged shard's report (current, not a late one) removes its parts, and
                // every older shard inside its range (one merged away before it was ever
                // reported).
                let current = stored_epoch.is_none_or(|e| e <= desc.epoch);
                if !desc.merged.is_empty() && current {
                    for part in &desc.merged {
                        if read(&keys::catalog_shard_key(*part))?.is_some() {
                            changes.push((keys::catalog_shard_key(*part), None));
                            changed += 1;
                        }
                    }
                    let within = |s: &ShardDesc| {
                        s.start >= desc.start && (desc.end.is_empty() || (!s.end.is_empty() && s.end <= desc.end))
                    };
                    for old in stored_shards()? {
                        if old.id != desc.id && !desc.merged.contains(&old.id) && old.epoch < desc.epoch && within(&old)
                        {
                            changes.push((keys::catalog_shard_key(old.id), None));
                            changes.push((keys::catalog_merged_away_key(old.id), Some(encode(&desc.id))));
                            changed += 1;
                        }
                    }
                }
                if !desc.merged.is_empty() && read(&keys::catalog_merge_key(desc.id))?.is_some() {
                    changes.push((keys::catalog_merge_key(desc.id), None));
                }
            }
            CatalogResponse::ShardsReported { changed }
        }
        CatalogCommand::BeginMerge { into, left, right } => {
            let key = keys::catalog_merge_key(*into);
            if let Some(existing) = read(&key)?.and_then(|v| serde_json::from_slice::<MergeIntent>(&v).ok()) {
                return Ok((changes, CatalogResponse::Merge(Some(existing))));
            }
            for part in [left, right] {
                if let Some(busy) = read(&keys::catalog_merge_part_key(*part))? {
                    let busy: u64 = serde_json::from_slice(&busy).unwrap_or_default();
                    return Ok((changes, CatalogResponse::MergeBusy { busy }));
                }
            }
            let intent = MergeIntent { into: *into, left: *left, right: *right, state: MergeState::Preparing };
            changes.push((key, Some(encode(&intent))));
            for part in [left, right] {
                changes.push((keys::catalog_merge_part_key(*part), Some(encode(into))));
            }
            CatalogResponse::Merge(Some(intent))
        }
        CatalogCommand::ForgetMerge { into } => {
            let key = keys::catalog_merge_key(*into);
            let intent = read(&key)?.and_then(|v| serde_json::from_slice::<MergeIntent>(&v).ok());
            if intent.as_ref().is_some_and(|i| i.state == MergeState::Aborted) {
                changes.push((key, None));
            }
            CatalogResponse::Merge(intent)
        }
        CatalogCommand::DecideMerge { into, commit } => {
            let key = keys::catalog_merge_key(*into);
            match read(&key)?.and_then(|v| serde_json::from_slice::<MergeIntent>(&v).ok()) {
                Some(mut intent) if intent.state == MergeState::Preparing => {
                    intent.state = if *commit { MergeState::Committed } else { MergeState::Aborted };
                    changes.push((key, Some(encode(&intent))));
                    if !*commit {
                        // The parts are free for another merge once they are unfrozen.
                        changes.push((keys::catalog_merge_part_key(intent.left), None));
                        changes.push((keys::catalog_merge_part_key(intent.right), None));
                    }
                    CatalogResponse::Merge(Some(intent))
                }
                other => CatalogResponse::Merge(other),
            }
        }
        CatalogCommand::RemoveNode { id } => {
            changes.push((keys::catalog_node_key(*id), None));
            changes.push((keys::catalog_removed_node_key(*id), Some(encode(id))));
            CatalogResponse::NodeRemoved
        }
        CatalogCommand::CreateCollection { tenant, name } => {
            let key = keys::catalog_collection_key(tenant, name);
            match read(&key)?.and_then(|v| serde_json::from_slice::<CollectionInfo>(&v).ok()) {
                Some(info) => CatalogResponse::Collection { info, created: false },
                None => {
                    let info = CollectionInfo { tenant: tenant.clone(), name: name.clone(), created_at_index: index };
                    changes.push((key, Some(encode(&info))));
                    CatalogResponse::Collection { info, created: true }
                }
            }
        }
        CatalogCommand::DropCollection { tenant, name } => {
            let key = keys::catalog_collection_key(tenant, name);
            let existed = read(&key)?.is_some();
            if existed {
                changes.push((key, None));
            }
            CatalogResponse::CollectionDropped { existed }
        }
    };
    Ok((changes, resp))
}

/// True when a catalog change touches the shard map.
pub fn is_shard_change(key: &[u8]) -> bool {
    key.starts_with(&keys::catalog_shards_prefix())
}

/// The shard map as this node's meta replica applied it: every shard by id, and which one
/// owns each key.
#[derive(Clone, Debug, Default)]
pub struct ShardMap {
    pub shards: BTreeMap<u64, ShardDesc>,
    pub ranges: RangeMap,
}

impl ShardMap {
    pub fn build(shards: Vec<ShardDesc>) -> Self {
        let ranges = RangeMap::build(shards.iter().map(|s| (s.id, s.start.as_slice(), s.end.as_slice(), s.epoch)));
        Self { shards: shards.into_iter().map(|s| (s.id, s)).collect(), ranges }
    }

    /// The shard owning `key`.
    pub fn lookup(&self, key: &[u8]) -> Option<&ShardDesc> {
        self.ranges.lookup(key).and_then(|(id, _)| self.shards.get(&id))
    }
}

/// The decoded shard map, rebuilt only after the meta group changed it (a lookup per request
/// must not decode every shard).
#[derive(Default)]
pub struct ShardMapCache {
    generation: AtomicU64,
    built: Mutex<Option<(u64, Arc<ShardMap>)>>,
}

impl ShardMapCache {
    /// Called by the meta group after it wrote a change to the shard map.
    pub fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// Typed reads of the catalog from this node's meta replica (local, possibly stale).
#[derive(Clone)]
pub struct CatalogReader {
    engine: Engine,
    cache: Arc<ShardMapCache>,
}

impl CatalogReader {
    pub fn new(engine: Engine, cache: Arc<ShardMapCache>) -> Self {
        Self { engine, cache }
    }

    /// The shard map (cached until the meta group changes it).
    pub fn shard_map(&self) -> Result<Arc<ShardMap>, EngineError> {
        // Read the generation before the data: a change racing the scan leaves a stale
        // generation behind, so the next call rebuilds.
        let generation = self.cache.generation.load(Ordering::Acquire);
        if let Ok(built) = self.cache.built.lock() {
            if let Some((g, map)) = built.as_ref() {
                if *g == generation {
                    return Ok(map.clone());
                }
            }
        }
        let map = Arc::new(ShardMap::build(self.shards()?));
        if let Ok(mut built) = self.cache.built.lock() {
            *built = Some((generation, map.clone()));
        }
        Ok(map)
    }

    fn list<T: for<'de> Deserialize<'de>>(&self, prefix: &[u8]) -> Result<Vec<T>, EngineError> {
        let end = crate::storage::engine::prefix_end(prefix);
        self.engine
            .scan(Cf::Data, prefix, &end, usize::MAX)?
            .into_iter()
            .map(|(k, v)| {
                serde_json::from_slice(&v)
                    .map_err(|e| EngineError::Corrupt(format!("catalog value at {}: {e}", keys::to_hex(&k))))
            })
            .collect()
    }

    pub fn cluster(&self) -> Result<Option<ClusterInfo>, EngineError> {
        match self.engine.get(Cf::Data, &keys::catalog_cluster_key())? {
            None => Ok(None),
            Some(v) => {
                serde_json::from_slice(&v).map(Some).map_err(|e| EngineError::Corrupt(format!("cluster info: {e}")))
            }
        }
    }

    /// True when shard `group` was merged away (a replica of it anywhere is obsolete).
    pub fn is_merged_away(&self, group: u64) -> Result<bool, EngineError> {
        Ok(self.engine.get(Cf::Data, &keys::catalog_merged_away_key(group))?.is_some())
    }

    /// Merges the meta group has a record of (open, or decided and not yet finished).
    pub fn merges(&self) -> Result<Vec<MergeIntent>, EngineError> {
        self.list(&keys::catalog_merges_prefix())
    }

    pub fn nodes(&self) -> Result<Vec<NodeInfo>, EngineError> {
        self.list(&keys::catalog_nodes_prefix())
    }

    pub fn shards(&self) -> Result<Vec<ShardDesc>, EngineError> {
        self.list(&keys::catalog_shards_prefix())
    }

    /// True when `node_id` was removed from the cluster (its id is never reused).
    pub fn is_removed(&self, node_id: u64) -> Result<bool, EngineError> {
        Ok(self.engine.get(Cf::Data, &keys::catalog_removed_node_key(node_id))?.is_some())
    }

    pub fn collections(&self, tenant: Option<&str>) -> Result<Vec<CollectionInfo>, EngineError> {
        self.list(&keys::catalog_collections_prefix(tenant))
    }

    pub fn collection(&self, tenant: &str, name: &str) -> Result<Option<CollectionInfo>, EngineError> {
        match self.engine.get(Cf::Data, &keys::catalog_collection_key(tenant, name))? {
            None => Ok(None),
            Some(v) => {
                serde_json::from_slice(&v).map(Some).map_err(|e| EngineError::Corrupt(format!("collection info: {e}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::convert::Infallible;

    fn run(map: &mut BTreeMap<Vec<u8>, Vec<u8>>, index: u64, cmd: CatalogCommand) -> CatalogResponse {
        let shards = || {
            Ok::<_, Infallible>(
                map.iter()
                    .filter(|(k, _)| is_shard_change(k))
                    .map(|(_, v)| serde_json::from_slice(v).unwrap())
                    .collect(),
            )
        };
        let (changes, resp) = apply(|k| Ok::<_, Infallible>(map.get(k).cloned()), shards, index, &cmd).unwrap();
        for (k, v) in changes {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        resp
    }

    #[test]
    fn bootstrap_once_and_collections_idempotent() {
        let mut m = BTreeMap::new();
        let boot = CatalogCommand::Bootstrap {
            cluster_id: "c1".into(),
            nodes: vec![NodeInfo { id: 1, grpc_addr: "a".into(), http_addr: String::new() }],
            shards: vec![ShardDesc {
                id: 1,
                start: vec![1],
                end: vec![],
                epoch: 1,
                replicas: vec![1],
                replicas_at: 0,
                merged: vec![],
            }],
        };
        assert_eq!(run(&mut m, 1, boot.clone()), CatalogResponse::Bootstrapped { already: false });
        let before = m.clone();
        assert_eq!(run(&mut m, 2, boot), CatalogResponse::Bootstrapped { already: true });
        assert_eq!(before, m);
        let create = CatalogCommand::CreateCollection { tenant: "t".into(), name: "c".into() };
        assert!(matches!(run(&mut m, 3, create.clone()), CatalogResponse::Collection { created: true, .. }));
        match run(&mut m, 4, create) {
            CatalogResponse::Collection { created, info } => {
                assert!(!created);
                assert_eq!(info.created_at_index, 3);
            }
            other => panic!("unexpected {other:?}"),
        }
        let drop = CatalogCommand::DropCollection { tenant: "t".into(), name: "c".into() };
        assert_eq!(run(&mut m, 5, drop.clone()), CatalogResponse::CollectionDropped { existed: true });
        assert_eq!(run(&mut m, 6, drop), CatalogResponse::CollectionDropped { existed: false });
    }

    fn desc(id: u64, start: &[u8], end: &[u8], epoch: u64) -> ShardDesc {
        ShardDesc {
            id,
            start: start.to_vec(),
            end: end.to_vec(),
            epoch,
            replicas: vec![1],
            replicas_at: 0,
            merged: vec![],
        }
    }

    #[test]
    fn a_merge_is_decided_once_and_its_report_replaces_the_parts() {
        let mut m = BTreeMap::new();
        let boot =
            CatalogCommand::Bootstrap { cluster_id: "c".into(), nodes: vec![], shards: vec![desc(1, &[1], b"m", 2)] };
        run(&mut m, 1, boot);
        run(&mut m, 2, CatalogCommand::ReportShards { shards: vec![desc(2, b"m", &[], 2)] });
        let begin = CatalogCommand::BeginMerge { into: 3, left: 1, right: 2 };
        assert!(matches!(
            run(&mut m, 3, begin.clone()),
            CatalogResponse::Merge(Some(MergeIntent { state: MergeState::Preparing, .. }))
        ));
        // Another merge of one of the parts is refused while this one is open.
        let other = CatalogCommand::BeginMerge { into: 4, left: 2, right: 5 };
        assert_eq!(run(&mut m, 4, other), CatalogResponse::MergeBusy { busy: 3 });
        let commit = CatalogCommand::DecideMerge { into: 3, commit: true };
        assert!(matches!(
            run(&mut m, 5, commit),
            CatalogResponse::Merge(Some(MergeIntent { state: MergeState::Committed, .. }))
        ));
        // A later abort does not undo the decision.
        let abort = CatalogCommand::DecideMerge { into: 3, commit: false };
        assert!(matches!(
            run(&mut m, 6, abort),
            CatalogResponse::Merge(Some(MergeIntent { state: MergeState::Committed, .. }))
        ));
        // A shard merged away before it was ever reported after a split (stale at epoch 1).
        run(&mut m, 6, CatalogCommand::ReportShards { shards: vec![desc(8, b"x", &[], 1)] });
        let merged = ShardDesc { merged: vec![1, 2], ..desc(3, &[1], &[], 3) };
        assert_eq!(
            run(&mut m, 7, CatalogCommand::ReportShards { shards: vec![merged] }),
            CatalogResponse::ShardsReported { changed: 4 }
        );
        let shards: Vec<u64> = m
            .iter()
            .filter(|(k, _)| is_shard_change(k))
            .map(|(_, v)| serde_json::from_slice::<ShardDesc>(v).unwrap().id)
            .collect();
        assert_eq!(shards, vec![3]);
        assert!(!m.keys().any(|k| k.starts_with(&keys::catalog_merges_prefix())), "the merge record is finished");
        assert!(!m.contains_key(&keys::catalog_merge_part_key(2)), "the parts are free");
        for gone in [1, 2, 8] {
            assert!(m.contains_key(&keys::catalog_merged_away_key(gone)), "shard {gone} is tombstoned");
        }
        // A late report of a part (its leader's periodic report, sent before it retired)
        // does not bring it back.
        let late = CatalogCommand::ReportShards { shards: vec![desc(1, &[1], b"m", 2)] };
        assert_eq!(run(&mut m, 8, late), CatalogResponse::ShardsReported { changed: 0 });
    }

    #[test]
    fn an_aborted_merge_frees_its_parts() {
        let mut m = BTreeMap::new();
        run(&mut m, 1, CatalogCommand::BeginMerge { into: 3, left: 1, right: 2 });
        run(&mut m, 2, CatalogCommand::DecideMerge { into: 3, commit: false });
        let again = CatalogCommand::BeginMerge { into: 4, left: 1, right: 2 };
        assert!(matches!(run(&mut m, 3, again), CatalogResponse::Merge(Some(MergeIntent { into: 4, .. }))));
    }

    #[test]
    fn group_ids_are_handed_out_once_and_reports_keep_the_newest() {
        let mut m = BTreeMap::new();
        let boot =
            CatalogCommand::Bootstrap { cluster_id: "c1".into(), nodes: vec![], shards: vec![desc(1, &[1], &[], 1)] };
        run(&mut m, 1, boot);
        assert_eq!(
            run(&mut m, 2, CatalogCommand::AllocateGroupIds { count: 3 }),
            CatalogResponse::GroupIds { first: 2 }
        );
        assert_eq!(
            run(&mut m, 3, CatalogCommand::AllocateGroupIds { count: 1 }),
            CatalogResponse::GroupIds { first: 5 }
        );
        // A split: parent [1, m) and child [m, +inf) at epoch 2.
        let split = CatalogCommand::ReportShards { shards: vec![desc(1, &[1], b"m", 2), desc(2, b"m", &[], 2)] };
        assert_eq!(run(&mut m, 4, split), CatalogResponse::ShardsReported { changed: 2 });
        // A late report of the parent's old range changes nothing.
        let stale = CatalogCommand::ReportShards { shards: vec![desc(1, &[1], &[], 1)] };
        assert_eq!(run(&mut m, 5, stale), CatalogResponse::ShardsReported { changed: 0 });
        let shards: Vec<ShardDesc> =
            m.iter().filter(|(k, _)| is_shard_change(k)).map(|(_, v)| serde_json::from_slice(v).unwrap()).collect();
        let map = ShardMap::build(shards);
        assert_eq!(map.lookup(b"q").map(|s| s.id), Some(2));
        assert_eq!(map.lookup(b"c").map(|s| s.id), Some(1));
    }

    #[test]
    fn replicas_change_and_removed_nodes_stay_removed() {
        let mut m = BTreeMap::new();
        let node = |id| NodeInfo { id, grpc_addr: format!("n{id}"), http_addr: String::new() };
        let boot = CatalogCommand::Bootstrap {
            cluster_id: "c1".into(),
            nodes: vec![node(1), node(2)],
            shards: vec![ShardDesc {
                id: 1,
                start: vec![1],
                end: vec![],
                epoch: 1,
                replicas: vec![1, 2],
                replicas_at: 0,
                merged: vec![],
            }],
        };
        run(&mut m, 1, boot);
        let set = CatalogCommand::SetReplicas { shard: 1, replicas: vec![1, 2, 3], at_index: 40 };
        assert_eq!(run(&mut m, 2, set), CatalogResponse::ReplicasSet { found: true });
        // An older report (a concurrent change that finished first) does not overwrite it.
        let stale = CatalogCommand::SetReplicas { shard: 1, replicas: vec![1, 2], at_index: 35 };
        assert_eq!(run(&mut m, 3, stale), CatalogResponse::ReplicasSet { found: true });
        let shard: ShardDesc = serde_json::from_slice(&m[&keys::catalog_shard_key(1)]).unwrap();
        assert_eq!((shard.replicas, shard.epoch, shard.replicas_at), (vec![1, 2, 3], 1, 40));
        let missing = CatalogCommand::SetReplicas { shard: 9, replicas: vec![1], at_index: 1 };
        assert_eq!(run(&mut m, 3, missing), CatalogResponse::ReplicasSet { found: false });
        assert_eq!(run(&mut m, 4, CatalogCommand::RemoveNode { id: 2 }), CatalogResponse::NodeRemoved);
        assert!(!m.contains_key(&keys::catalog_node_key(2)));
        // A stale process of node 2 re-registering changes nothing.
        assert_eq!(run(&mut m, 5, CatalogCommand::RegisterNode(node(2))), CatalogResponse::NodeRemoved);
        assert!(!m.contains_key(&keys::catalog_node_key(2)));
    }
}
