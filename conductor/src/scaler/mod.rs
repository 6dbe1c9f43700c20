//! How many replicas a worker plugin runs: its load (signal) is bucketed,
//! forecast, and turned into a decision.

pub mod config;
pub mod decision;
pub mod forecast;
pub mod planner;

pub use config::{AutoscaleConfig, Signal};
pub mod sim;
