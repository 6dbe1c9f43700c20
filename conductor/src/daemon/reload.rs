//! Reload is the daemon's job: it reads the file again, plans it, diffs it
//! against the configuration in force and tells each component what
//! changed. No component reads the configuration itself.

use std::path::PathBuf;
use std::sync::Arc;

use crate::api::host::Access;
use crate::api::{Control, ReloadError};
use crate::config::{self, Config, Diff};
use crate::dispatch::Dispatcher;
use crate::events::{Bus, Event};
use crate::limits::Limits;
use crate::scaler::Scaler;
use crate::supervisor::Supervisor;

use super::plan;

pub struct Reloader {
    /// The configuration in force; held for the length of a reload, so
    /// reloads do not overlap.
    current: tokio::sync::Mutex<Config>,
    supervisor: Arc<Supervisor>,
    dispatcher: Arc<Dispatcher>,
    scaler: Arc<Scaler>,
    access: Arc<Access>,
    limits: Arc<Limits>,
    bus: Bus,
}

/// The components a reload tells what changed.
pub struct Reloaded {
    pub supervisor: Arc<Supervisor>,
    pub dispatcher: Arc<Dispatcher>,
    pub scaler: Arc<Scaler>,
    pub access: Arc<Access>,
    pub limits: Arc<Limits>,
    pub bus: Bus,
}

impl Reloader {
    pub fn new(config: Config, parts: Reloaded) -> Self {
        Self {
            current: tokio::sync::Mutex::new(config),
            supervisor: parts.supervisor,
            dispatcher: parts.dispatcher,
            scaler: parts.scaler,
            access: parts.access,
            limits: parts.limits,
            bus: parts.bus,
        }
    }
}

#[tonic::async_trait]
impl Control for Reloader {
    async fn config(&self) -> (PathBuf, String) {
        let current = self.current.lock().await;
        (current.file.clone(), current.text.clone())
    }

    async fn reload(&self) -> Result<Diff, ReloadError> {
        let mut current = self.current.lock().await;
        let next = config::load(&current.file).map_err(ReloadError::Invalid)?;
        let mut plan = plan::plan(&next).map_err(ReloadError::Invalid)?;
        for warning in &next.warnings {
            tracing::warn!(%warning, "plugin manifest skipped");
        }
        let diff = config::diff(&current, &next);
        // Rights first: a plugin loses what it lost before anything else.
        self.access.configure(plan.grants);
        self.limits.configure(plan.limits);
        // Dispatch next: a removed plugin takes no job past this point,
        // and its queue is dead-lettered before its replicas go.
        self.dispatcher.configure(plan.lanes).await;
        for name in &diff.removed {
            self.supervisor.remove(name).await;
        }
        for name in &diff.added {
            if let Some(spec) = plan.pools.remove(name) {
                self.supervisor.add(name, spec).await;
            }
        }
        for name in &diff.changed {
            if let Some(spec) = plan.pools.remove(name) {
                self.supervisor.update(name, spec).await?;
            }
        }
        // Last: a new plugin's scaler finds its pool running.
        self.scaler.configure(plan.scalers);
        self.bus.emit(Event::Reloaded {
            added: diff.added.clone(),
            removed: diff.removed.clone(),
            changed: diff.changed.clone(),
            unchanged: diff.unchanged.len(),
        });
        *current = next;
        Ok(diff)
    }
}
