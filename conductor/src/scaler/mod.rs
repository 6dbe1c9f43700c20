//! How many replicas a worker plugin runs: its load (signal) is bucketed,
//! forecast, and turned into a decision.

pub mod config;
pub mod decision;
pub mod forecast;
pub mod live;
pub mod planner;
pub mod seed;
pub mod signal;

pub use config::{AutoscaleConfig, Signal};
pub use live::Scaler;
pub mod sim;
