//! Demi Conductor: a process-per-plugin supervisor that speaks gRPC.
//!
//! Every arrow points one way (README, Layout; `tests/architecture.rs`
//! holds the code to it). At the bottom, [`events`] (the domain's events
//! and their bus), [`layout`], [`backoff`], [`claim`], [`process`] and
//! [`rpc`] use nothing above them (but `process` uses `claim`). Each
//! component's settings live beside it and [`config`] only loads and
//! assembles them. [`supervisor`] (pool → instance state machine) uses
//! `process` and `rpc`; [`dispatch`] sees instances through phase events
//! and a narrow view; [`scaler`] decides purely and acts through a narrow
//! lever; [`telemetry`] consumes events and snapshots; [`api`] serves
//! operators; [`daemon`] builds and wires them all and applies reloads.

pub mod api;
pub mod backoff;
pub mod claim;
pub mod config;
pub mod conformance;
pub mod daemon;
pub mod dispatch;
pub mod events;
pub mod layout;
pub mod limits;
pub mod machine;
pub mod process;
pub mod rpc;
pub mod scaler;
pub mod supervisor;
pub mod telemetry;
