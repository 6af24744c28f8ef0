//! The catalog the meta group replicates: cluster identity, nodes, collections, shard map.
//!
//! Owns: catalog types, catalog commands and their pure apply, and typed reads of the
//! catalog from a node's local meta replica. Values are JSON under the `0x00` key prefix
//! (see `keys.rs`).
//!
//! Invariants: apply is deterministic and idempotent per command (bootstrapping twice or
//! creating an existing collection changes nothing); shard epochs only grow.

use crate::keys;
use crate::storage::{Cf, Engine, EngineError};
use serde::{Deserialize, Serialize};

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
}

/// Result of a catalog command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CatalogResponse {
    Bootstrapped { already: bool },
    NodeRegistered,
    Collection { info: CollectionInfo, created: bool },
    CollectionDropped { existed: bool },
    ReplicasSet { found: bool },
    NodeRemoved,
}

/// One catalog key's change: `Some(value)` to store, `None` to delete.
pub type CatalogChange = (Vec<u8>, Option<Vec<u8>>);

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs to JSON cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// Applies `cmd` at meta log `index` over the catalog that `read` returns.
pub fn apply<E>(
    read: impl Fn(&[u8]) -> Result<Option<Vec<u8>>, E>,
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

/// Typed reads of the catalog from this node's meta replica (local, possibly stale).
#[derive(Clone)]
pub struct CatalogReader {
    engine: Engine,
}

impl CatalogReader {
    pub fn new(engine: Engine) -> Self {
        Self { engine }
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
        let (changes, resp) = apply(|k| Ok::<_, Infallible>(map.get(k).cloned()), index, &cmd).unwrap();
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
            shards: vec![ShardDesc { id: 1, start: vec![1], end: vec![], epoch: 1, replicas: vec![1], replicas_at: 0 }],
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
