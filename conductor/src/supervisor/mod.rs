//! Keeping plugin instances alive: one pool per plugin, one state machine
//! and one runner task per instance, and the operations an operator asks
//! for (start, stop, rolling restart, scale, reload).

pub mod breaker;
pub mod config;
pub mod instance;
pub mod pool;
mod report;
pub mod restarts;
pub mod runner;

pub use config::{Health, HealthConfig, PoolConfig, RestartConfig};
pub use pool::{Pool, PoolContext};
pub use runner::InstanceStatus;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::{Config, ConfigErrors};
use crate::events::{Bus, Event, InstanceEvent, Phase};
use runner::Command;

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("no plugin named {0:?}")]
    NotFound(String),
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error("{plugin}-{index} did not come back: {reason}")]
    NotServing {
        plugin: String,
        index: u32,
        reason: String,
    },
    #[error("the configuration is invalid, nothing changed:\n{0}")]
    Config(ConfigErrors),
    #[error(
        "{plugin:?} is autoscaled between {min} and {max} replicas; change \
         [plugins.{plugin}.autoscale] and reload instead"
    )]
    Autoscaled { plugin: String, min: u32, max: u32 },
}

/// What a plugin looks like from outside.
#[derive(Debug, Clone)]
pub struct PluginView {
    pub name: String,
    pub replicas: u32,
    pub min_serving: u32,
    pub command: String,
    pub source: String,
    pub instances: Vec<(u32, InstanceStatus)>,
}

impl PluginView {
    pub fn serving(&self) -> u32 {
        self.instances
            .iter()
            .filter(|(_, s)| s.state == Phase::Serving)
            .count() as u32
    }

    pub fn healthy(&self) -> bool {
        self.serving() >= self.min_serving
    }
}

/// What a reload did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
    pub ignored: Vec<String>,
    /// Broken manifests, skipped.
    pub warnings: Vec<String>,
}

/// Every pool of the conductor.
pub struct Supervisor {
    context: PoolContext,
    pools: Mutex<BTreeMap<String, Pool>>,
    /// Serialises operations that change pools, and holds the config in force.
    operations: tokio::sync::Mutex<Config>,
    health: HealthReporter,
}

impl Supervisor {
    /// Starts every configured plugin and the task that keeps each
    /// plugin's health status on `health` current.
    pub async fn start(config: Config, context: PoolContext, health: HealthReporter) -> Arc<Self> {
        // Registered before any instance runs, so a Watch works from the start.
        for name in config.plugins.keys() {
            health
                .set_service_status(name.as_str(), ServingStatus::NotServing)
                .await;
        }
        let pools = config
            .plugins
            .iter()
            .map(|(name, pool)| {
                let source = config.source_of(name);
                (
                    name.clone(),
                    Pool::start(name, pool.clone(), source, &context),
                )
            })
            .collect();
        let supervisor = Arc::new(Self {
            context,
            pools: Mutex::new(pools),
            operations: tokio::sync::Mutex::new(config),
            health,
        });
        tokio::spawn(aggregate_health(Arc::downgrade(&supervisor)));
        supervisor
    }

    fn pools(&self) -> MutexGuard<'_, BTreeMap<String, Pool>> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn events(&self) -> &Bus {
        &self.context.bus
    }

    pub fn list(&self) -> Vec<PluginView> {
        self.pools().values().map(view).collect()
    }

    /// Every autoscaled plugin with its settings.
    pub fn autoscaled(&self) -> Vec<(String, crate::scaler::AutoscaleConfig)> {
        self.pools()
            .iter()
            .filter_map(|(name, pool)| Some((name.clone(), pool.config.autoscale.clone()?)))
            .collect()
    }

    /// Instances wanted for `name` now.
    pub fn replicas(&self, name: &str) -> Option<u32> {
        self.pools().get(name).map(|p| p.replicas)
    }

    pub fn get(&self, name: &str) -> Result<PluginView, SupervisorError> {
        self.pools()
            .get(name)
            .map(view)
            .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))
    }

    /// The config file's path and text as last loaded.
    pub async fn config(&self) -> (String, String) {
        let config = self.operations.lock().await;
        (config.file.display().to_string(), config.text.clone())
    }

    fn handles(&self, name: &str) -> Result<Vec<(u32, HandleRef)>, SupervisorError> {
        let pools = self.pools();
        let pool = pools
            .get(name)
            .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))?;
        Ok(pool
            .instances
            .iter()
            .map(|i| {
                (
                    i.index,
                    HandleRef {
                        commands: i.commands.clone(),
                        status: i.status.clone(),
                    },
                )
            })
            .collect())
    }

    /// Starts every stopped or failed instance of `name`.
    pub async fn start_plugin(&self, name: &str) -> Result<PluginView, SupervisorError> {
        let _op = self.operations.lock().await;
        for (_, handle) in self.handles(name)? {
            let _ = handle.commands.send(Command::Start).await;
        }
        self.get(name)
    }

    /// Stops every instance of `name` and waits until they are stopped.
    pub async fn stop_plugin(&self, name: &str) -> Result<PluginView, SupervisorError> {
        let _op = self.operations.lock().await;
        let handles = self.handles(name)?;
        let grace = self.pool_config(name)?.shutdown_grace;
        for (_, handle) in &handles {
            let _ = handle.commands.send(Command::Stop).await;
        }
        for (index, mut handle) in handles {
            let done = |s: &InstanceStatus| s.state.is_down();
            wait_status(name, index, &mut handle.status, grace * 2 + SLACK, done).await?;
        }
        self.get(name)
    }

    /// Restarts the instances of `name` one at a time, each only after the
    /// previous one is SERVING again.
    pub async fn restart_plugin(&self, name: &str) -> Result<PluginView, SupervisorError> {
        let _op = self.operations.lock().await;
        let config = self.pool_config(name)?;
        let patience = config.startup_timeout + config.shutdown_grace * 2 + SLACK;
        for (index, mut handle) in self.handles(name)? {
            let before = handle.status.borrow_and_update().pid;
            let _ = handle.commands.send(Command::Restart).await;
            let back = |s: &InstanceStatus| s.state == Phase::Serving && s.pid != before;
            wait_status(name, index, &mut handle.status, patience, back).await?;
        }
        self.get(name)
    }

    /// Sets the number of instances of `name`, for an operator: refused
    /// for an autoscaled plugin, whose scaler would undo it.
    pub async fn scale(&self, name: &str, replicas: u32) -> Result<PluginView, SupervisorError> {
        if let Some(a) = &self.pool_config(name)?.autoscale {
            return Err(SupervisorError::Autoscaled {
                plugin: name.to_owned(),
                min: a.min,
                max: a.max,
            });
        }
        self.set_replicas(name, replicas).await
    }

    /// Sets the number of instances of `name` as its autoscaler decided.
    pub async fn autoscale(
        &self,
        name: &str,
        replicas: u32,
    ) -> Result<PluginView, SupervisorError> {
        self.set_replicas(name, replicas).await
    }

    async fn set_replicas(&self, name: &str, replicas: u32) -> Result<PluginView, SupervisorError> {
        let _op = self.operations.lock().await;
        let config = self.pool_config(name)?;
        if replicas < config.health.config().min_serving {
            return Err(SupervisorError::InvalidArgument {
                field: "replicas",
                reason: format!(
                    "{replicas} is below the plugin's health.min_serving ({})",
                    config.health.config().min_serving
                ),
            });
        }
        if replicas > MAX_REPLICAS {
            return Err(SupervisorError::InvalidArgument {
                field: "replicas",
                reason: format!("{replicas} is more than the {MAX_REPLICAS} a plugin may have"),
            });
        }
        self.scale_locked(name, replicas).await?;
        self.get(name)
    }

    async fn scale_locked(&self, name: &str, replicas: u32) -> Result<(), SupervisorError> {
        let (before, retired) = {
            let mut pools = self.pools();
            let pool = pools
                .get_mut(name)
                .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))?;
            let before = pool.replicas;
            pool.grow_to(replicas, &self.context);
            (before, pool.shrink_to(replicas))
        };
        for handle in retired {
            handle.retire().await;
        }
        if before != replicas {
            self.events().emit(Event::Scaled {
                plugin: Arc::from(name),
                from: before,
                to: replicas,
            });
        }
        self.refresh_health(name).await;
        Ok(())
    }

    pub fn pool_config(&self, name: &str) -> Result<Arc<PoolConfig>, SupervisorError> {
        self.pools()
            .get(name)
            .map(|p| p.config.clone())
            .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))
    }

    /// Re-reads the config file and applies the difference: new plugins
    /// start, removed ones stop, changed ones are replaced one instance at
    /// a time, unchanged ones are not touched.
    pub async fn reload(&self) -> Result<ReloadSummary, SupervisorError> {
        let mut current = self.operations.lock().await;
        let next = crate::config::load(&current.file).map_err(SupervisorError::Config)?;
        let mut summary = ReloadSummary {
            warnings: next.warnings.iter().map(ToString::to_string).collect(),
            ..ReloadSummary::default()
        };
        for warning in &next.warnings {
            tracing::warn!(%warning, "plugin manifest skipped");
        }
        if next.conductor != current.conductor {
            summary
                .ignored
                .push("[conductor] (takes effect at the next start)".into());
        }
        for name in current.plugins.keys() {
            if !next.plugins.contains_key(name) {
                self.remove_plugin(name).await;
                summary.removed.push(name.clone());
            }
        }
        for (name, config) in &next.plugins {
            let source = next.source_of(name);
            match current.plugins.get(name) {
                None => {
                    self.health
                        .set_service_status(name.as_str(), ServingStatus::NotServing)
                        .await;
                    let pool = Pool::start(name, config.clone(), source, &self.context);
                    self.pools().insert(name.clone(), pool);
                    summary.added.push(name.clone());
                }
                Some(old) if old == config => summary.unchanged.push(name.clone()),
                Some(old) => {
                    // Counts alone change without touching an instance.
                    let only_counts = PoolConfig {
                        replicas: config.replicas,
                        autoscale: config.autoscale.clone(),
                        ..(**old).clone()
                    } == **config;
                    let running = self
                        .pools()
                        .get(name)
                        .map_or(config.replicas, |p| p.replicas);
                    if only_counts {
                        if let Some(pool) = self.pools().get_mut(name) {
                            pool.config = config.clone();
                            pool.source = source;
                        }
                    } else {
                        self.replace(name, config.clone(), source).await?;
                    }
                    // An autoscaled plugin keeps the count its scaler chose,
                    // within the new bounds.
                    let replicas = match &config.autoscale {
                        Some(a) => running.clamp(a.min, a.max),
                        None => config.replicas,
                    };
                    self.scale_locked(name, replicas).await?;
                    summary.changed.push(name.clone());
                }
            }
        }
        self.events().emit(Event::Reloaded {
            added: summary.added.clone(),
            removed: summary.removed.clone(),
            changed: summary.changed.clone(),
            unchanged: summary.unchanged.len(),
        });
        *current = next;
        Ok(summary)
    }

    async fn remove_plugin(&self, name: &str) {
        let pool = self.pools().remove(name);
        if let Some(mut pool) = pool {
            for handle in pool.shrink_to(0) {
                handle.retire().await;
            }
        }
        let cgroups = self.context.cgroups.clone();
        let plugin = name.to_owned();
        let _ = tokio::task::spawn_blocking(move || cgroups.remove_plugin(&plugin)).await;
        let mut health = self.health.clone();
        health.clear_service_status(name).await;
    }

    /// Swaps in `config` one instance at a time: each old instance stops,
    /// its successor starts and must be SERVING before the next one goes.
    async fn replace(
        &self,
        name: &str,
        config: Arc<PoolConfig>,
        source: std::path::PathBuf,
    ) -> Result<(), SupervisorError> {
        let count = {
            let mut pools = self.pools();
            let pool = pools
                .get_mut(name)
                .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))?;
            pool.config = config.clone();
            pool.source = source;
            pool.instances.len()
        };
        let patience = config.startup_timeout + config.shutdown_grace * 2 + SLACK;
        for position in 0..count {
            let old = {
                let mut pools = self.pools();
                let Some(pool) = pools.get_mut(name) else {
                    return Err(SupervisorError::NotFound(name.to_owned()));
                };
                pool.instances.remove(position)
            };
            let index = old.index;
            old.retire().await;
            let mut status = {
                let mut pools = self.pools();
                let Some(pool) = pools.get_mut(name) else {
                    return Err(SupervisorError::NotFound(name.to_owned()));
                };
                let handle = pool.launch(index, &self.context);
                let status = handle.status.clone();
                pool.instances.insert(position, handle);
                status
            };
            wait_status(name, index, &mut status, patience, |s| {
                s.state == Phase::Serving
            })
            .await?;
        }
        Ok(())
    }

    async fn refresh_health(&self, name: &str) {
        let healthy = self
            .pools()
            .get(name)
            .map(|p| p.serving() >= p.config.health.config().min_serving);
        if let Some(healthy) = healthy {
            let status = if healthy {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            self.health.set_service_status(name, status).await;
        }
    }

    /// Stops every instance (after the context's cancel token fired) and
    /// waits until all are gone.
    pub async fn wait(&self) {
        let all: Vec<_> = {
            let mut pools = self.pools();
            pools.values_mut().flat_map(|p| p.shrink_to(0)).collect()
        };
        for handle in all {
            handle.retire().await;
        }
    }
}

/// Extra patience on top of a plugin's own timeouts for status waits.
const SLACK: Duration = Duration::from_secs(5);

/// A sanity bound for `ScalePlugin`: every instance is a process.
const MAX_REPLICAS: u32 = 10_000;

struct HandleRef {
    commands: tokio::sync::mpsc::Sender<Command>,
    status: watch::Receiver<InstanceStatus>,
}

async fn wait_status(
    plugin: &str,
    index: u32,
    status: &mut watch::Receiver<InstanceStatus>,
    patience: Duration,
    done: impl Fn(&InstanceStatus) -> bool,
) -> Result<(), SupervisorError> {
    let not_serving = |reason: String| SupervisorError::NotServing {
        plugin: plugin.to_owned(),
        index,
        reason,
    };
    let outcome = tokio::time::timeout(
        patience,
        status.wait_for(|s| done(s) || s.state == Phase::Failed),
    )
    .await;
    match outcome {
        Ok(Ok(s)) if done(&s) => Ok(()),
        Ok(Ok(s)) => Err(not_serving(
            s.failure.clone().unwrap_or_else(|| "failed".into()),
        )),
        Ok(Err(_)) => Err(not_serving("the instance was removed".into())),
        Err(_) => Err(not_serving(format!("not SERVING within {patience:?}"))),
    }
}

fn view(pool: &Pool) -> PluginView {
    PluginView {
        name: pool.name.to_string(),
        replicas: pool.replicas,
        min_serving: pool.config.health.config().min_serving,
        command: pool.config.command.display().to_string(),
        source: pool.source.display().to_string(),
        instances: pool
            .instances
            .iter()
            .map(|i| (i.index, i.status.borrow().clone()))
            .collect(),
    }
}

/// Keeps each plugin's status on the conductor's Health service in step
/// with its instances, driven by lifecycle events (no polling).
async fn aggregate_health(supervisor: std::sync::Weak<Supervisor>) {
    let Some(events) = supervisor.upgrade().map(|s| s.events().subscribe()) else {
        return;
    };
    let mut events = events;
    loop {
        let changed: Vec<String> = match events.recv().await {
            Ok(stamped) => match &stamped.event {
                Event::Instance {
                    plugin,
                    what: InstanceEvent::PhaseChanged { .. },
                    ..
                } => vec![plugin.to_string()],
                _ => continue,
            },
            // Missed some: recompute everything.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                match supervisor.upgrade() {
                    Some(s) => s.pools().keys().cloned().collect(),
                    None => return,
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let Some(supervisor) = supervisor.upgrade() else {
            return;
        };
        for name in changed {
            supervisor.refresh_health(&name).await;
        }
    }
}
