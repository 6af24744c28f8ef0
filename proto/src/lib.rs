//! Generated gRPC code for Floe: the public `floe.v1` API and the internal raft transport.
//!
//! The `.proto` files under `floe/v1/` are the stable contract; this crate only compiles them.

/// Public API: `Documents` and `Admin` services.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("floe.v1");
}

/// Internal node-to-node transport (raft messages, snapshots, forwarded requests).
pub mod internal {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("floe.internal.v1");
}

/// Encoded `FileDescriptorSet` of all Floe protos, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("floe_descriptor");
