//! Storage: the engine interface, its RocksDB and in-memory implementations, group commit.
pub mod engine;
pub mod group_commit;
pub mod mem;
pub mod rocks;

pub use engine::{Cf, Engine, EngineError, KvEngine, WriteBatch};
