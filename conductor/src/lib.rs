//! Demi Conductor: a process-per-plugin supervisor that speaks gRPC.

pub mod supervisor;
