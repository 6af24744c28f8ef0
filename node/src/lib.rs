//! floe-node: the Floe server. See ARCHITECTURE.md at the repository root for the codemap.
//!
//! Layers, bottom up: `storage` (engine interface, RocksDB, group commit) → `raft` (openraft
//! groups on that storage) → `docs` and `catalog` (pure apply logic) → `api` (`NodeApi` and its
//! gRPC and HTTP wrappers) → `server` (wiring) and the `floe` binary (CLI).

pub mod api;
pub mod bench;
pub mod catalog;
pub mod cli;
pub mod ctl;
pub mod docs;
pub mod keys;
pub mod liveness;
pub mod load;
pub mod metrics;
pub mod placement;
pub mod planted;
pub mod raft;
pub mod server;
pub mod shard;
pub mod signal;
pub mod storage;
pub mod transport;
