//! The Demi Conductor wire contract, generated from `proto/*.proto`.
//!
//! `plugin::v1` is what every plugin serves; the standard
//! `grpc.health.v1.Health` service comes from `tonic-health`.

pub mod plugin {
    pub mod v1 {
        tonic::include_proto!("demi.plugin.v1");
    }
}

/// The protocol version this build of the contract describes.
pub const PROTOCOL_VERSION: u32 = 1;
