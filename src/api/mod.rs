//! tollgate.v1 gRPC API: `Metering` (the provider's backend) and `Admin` (back office).
//! Handlers are thin: decode, call the ledger, encode. Errors become statuses in
//! `status` only; tokens are checked in `auth`.

pub mod admin;
pub mod auth;
pub mod metering;
pub mod status;

/// Generated protobuf and tonic code for `tollgate.v1`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("tollgate.v1");

    /// Encoded descriptors of the tollgate.v1 services, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tollgate_descriptor");
}

use std::collections::HashMap;

use crate::ledger::Metadata;

/// Protobuf maps arrive as HashMap; the ledger keeps metadata sorted.
pub(crate) fn metadata(map: HashMap<String, String>) -> Metadata {
    map.into_iter().collect()
}
