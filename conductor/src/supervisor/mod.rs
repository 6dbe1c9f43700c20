//! Keeping plugin instances alive: one pool per plugin, one state machine
//! and one runner task per instance.

pub mod backoff;
pub mod breaker;
pub mod config;
pub mod instance;

pub use config::{HealthConfig, PoolConfig, RestartConfig};
