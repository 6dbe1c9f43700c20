//! One plugin's settings, assembled from the parts each component owns:
//! the supervisor's [`PoolConfig`], whether it takes jobs, dispatch's
//! [`DispatchConfig`], the scaler's [`AutoscaleConfig`], and what the
//! plugin API lets it do ([`Grants`], shared limits).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use crate::api::config::Grants;
use crate::dispatch::config::DispatchConfig;
use crate::limits::config::LimitConfig;
use crate::scaler::config::{AutoscaleConfig, Signal};
use crate::supervisor::config::PoolConfig;

/// `[plugins.NAME]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    /// What to run and how to keep it alive.
    pub pool: Arc<PoolConfig>,
    /// Whether the plugin takes jobs (`Handle` calls) from the conductor.
    pub jobs: bool,
    pub dispatch: DispatchConfig,
    /// Replicas follow the load between min and max; `replicas` is then
    /// only the count to start with.
    pub autoscale: Option<AutoscaleConfig>,
    /// What the plugin may do through the plugin API.
    pub grants: Grants,
    /// Limits its replicas share, by name.
    pub shared_limits: BTreeMap<String, LimitConfig>,
    /// The file that defined the plugin: the config or its manifest.
    pub source: PathBuf,
}

/// Keys of `[plugins.NAME]` that are not the supervisor's.
pub(super) const NOT_POOL: [&str; 6] = [
    "jobs",
    "dispatch",
    "autoscale",
    "submits_to",
    "submit_rate",
    "shared_limits",
];

/// The parts of a plugin table that are not the supervisor's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Extras {
    #[serde(default = "yes")]
    pub jobs: bool,
    #[serde(default)]
    pub dispatch: DispatchConfig,
    pub autoscale: Option<AutoscaleConfig>,
    #[serde(default)]
    pub submits_to: Vec<String>,
    #[serde(default = "default_submit_rate")]
    pub submit_rate: u32,
    #[serde(default)]
    pub shared_limits: BTreeMap<String, LimitConfig>,
}

fn yes() -> bool {
    true
}

fn default_submit_rate() -> u32 {
    crate::api::config::DEFAULT_SUBMIT_RATE
}

impl PluginConfig {
    pub(super) fn assemble(pool: PoolConfig, extras: Extras, source: PathBuf) -> Self {
        Self {
            pool: Arc::new(pool),
            jobs: extras.jobs,
            dispatch: extras.dispatch,
            autoscale: extras.autoscale,
            grants: Grants {
                submits_to: extras.submits_to,
                submit_rate: extras.submit_rate,
            },
            shared_limits: extras.shared_limits,
            source,
        }
    }

    /// Jobs can reach it: it takes them and speaks gRPC.
    pub fn takes_jobs(&self) -> bool {
        self.jobs && !self.pool.health.is_none()
    }

    /// Problems of each part and between them, as (field below the
    /// plugin, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = self.pool.problems();
        out.extend(self.dispatch.problems());
        if self.grants.submit_rate == 0 {
            out.push((
                "submit_rate",
                "must be at least 1 (a plugin that must not submit has no submits_to)".into(),
            ));
        }
        for (name, limit) in &self.shared_limits {
            if let Some(reason) = limit.problem() {
                out.push(("shared_limits", format!("{name}: {reason}")));
            }
        }
        if let Some(autoscale) = &self.autoscale {
            out.extend(autoscale.problems(self.pool.health.config().min_serving));
            if self.pool.health.is_none() {
                out.push((
                    "autoscale",
                    "a plugin with health = \"none\" takes no jobs and reports no readiness; \
                     it cannot be autoscaled"
                        .into(),
                ));
            } else if autoscale.signal == Signal::Jobs && !self.jobs {
                out.push((
                    "autoscale.signal",
                    "\"jobs\" needs a plugin that takes jobs (jobs = true); use \"cpu\"".into(),
                ));
            }
        }
        out
    }

    /// Replicas to run at start: within the autoscaler's bounds.
    pub fn initial_replicas(&self) -> u32 {
        match &self.autoscale {
            Some(a) => self.pool.replicas.clamp(a.min, a.max),
            None => self.pool.replicas,
        }
    }
}
