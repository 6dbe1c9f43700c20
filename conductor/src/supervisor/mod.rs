//! Keeping plugin instances alive: one pool per plugin, one state machine
//! and one runner task per instance.

pub mod backoff;
pub mod breaker;
pub mod config;
pub mod instance;
pub mod pool;
pub mod runner;

pub use config::{HealthConfig, PoolConfig, RestartConfig};
pub use pool::{Pool, PoolContext};

use std::collections::BTreeMap;

use tokio::task::JoinSet;

use crate::config::Config;

/// Every pool of the conductor and the tasks that run their instances.
pub struct Supervisor {
    pub pools: BTreeMap<String, Pool>,
    tasks: JoinSet<()>,
}

impl Supervisor {
    /// Starts every configured plugin.
    pub fn start(config: &Config, context: &PoolContext) -> Self {
        let mut tasks = JoinSet::new();
        let pools = config
            .plugins
            .iter()
            .map(|(name, pool)| {
                (
                    name.clone(),
                    Pool::start(name, pool.clone(), context, &mut tasks),
                )
            })
            .collect();
        Self { pools, tasks }
    }

    /// Waits until every instance has stopped (after the context's cancel
    /// token fired). A runner that panicked is logged, never propagated:
    /// one plugin's trouble must not take the conductor down.
    pub async fn wait(mut self) {
        while let Some(result) = self.tasks.join_next().await {
            if let Err(error) = result {
                tracing::error!(%error, "an instance runner panicked");
            }
        }
    }
}
