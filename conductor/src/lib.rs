//! Demi Conductor: a process-per-plugin supervisor that speaks gRPC.
//!
//! Data flows one way: [`config`] → [`supervisor`] (pool → instance state
//! machine) → [`process`] (spawn, output) → [`rpc`]; [`telemetry`] reports
//! along the way and [`daemon`] ties it together.

pub mod api;
pub mod backoff;
pub mod config;
pub mod conformance;
pub mod daemon;
pub mod dispatch;
pub mod events;
pub mod layout;
pub mod process;
pub mod rpc;
pub mod scaler;
pub mod supervisor;
pub mod telemetry;
