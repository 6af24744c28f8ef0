//! Raft groups on openraft 0.9: types, runtime, log and state-machine storage, network, host.
pub mod batcher;
pub mod freshness;
pub mod hibernate;
pub mod host;
pub mod inbound;
pub mod local_shards;
pub mod log_store;
pub mod merge;
pub mod moves;
pub mod network;
pub mod runtime;
pub mod snapshot;
pub mod state_machine;
pub mod types;
