//! How many replicas a worker plugin runs: its load (signal) is bucketed,
//! forecast, and turned into a decision.
//!
//! The decision ([`decision`], [`planner`], [`forecast`]) is pure: no
//! clock, no runtime, no I/O. `conductor scale-sim` replays traces through
//! the very same code. [`live`] runs it in the daemon, reading load from a
//! [`LoadSource`] and changing replicas through an [`Actuator`], neither of
//! which it knows more of.

pub mod config;
pub mod decision;
pub mod forecast;
pub mod live;
pub mod planner;
pub mod seed;
pub mod signal;
pub mod trace;

pub use config::{AutoscaleConfig, Signal};
pub use live::{Actuator, LoadSource, Plan, Scaler};
