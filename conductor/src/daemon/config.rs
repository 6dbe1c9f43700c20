//! `[conductor]`: settings of the daemon itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::api::config::ApiConfig;
use crate::dispatch::config::JobsConfig;
use crate::process::cgroup::config::CgroupPolicy;
use crate::telemetry::config::{LogFormat, MetricsConfig};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Sockets and the lock file live here (relative to the config file).
    /// Created with mode 0700.
    #[serde(default = "default_runtime_dir")]
    pub runtime_dir: PathBuf,
    /// Durable state (the job store) lives here (relative to the config
    /// file). Created with mode 0700.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// `human` or `json`; `--log-format` overrides it.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Where instance cgroups go, below each hierarchy's root:
    /// `ROOT/PLUGIN/INDEX`. One conductor per root.
    #[serde(default = "default_cgroup_root")]
    pub cgroup_root: String,
    /// `required`: a plugin that declares limits does not start without
    /// cgroups. `optional`: it starts unconfined, with a warning.
    #[serde(default)]
    pub cgroup_policy: CgroupPolicy,
    /// How often an instance with `restart.on_memory_above` has its memory
    /// read. Other usage is read when someone looks (scrape, status,
    /// autoscaler), not on a timer.
    #[serde(default = "default_usage_interval", with = "humantime_serde")]
    pub usage_interval: Duration,
    /// Folders whose sub-folders holding a `plugin.toml` are plugins
    /// (relative to the config file); scanned at start and on reload.
    #[serde(default)]
    pub plugin_dirs: Vec<PathBuf>,
    /// `[conductor.metrics]`: the Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[conductor.api]`: TCP listener and its token.
    #[serde(default)]
    pub api: ApiConfig,
    /// `[conductor.jobs]`: how long finished jobs can be looked up.
    #[serde(default)]
    pub jobs: JobsConfig,
}

impl DaemonConfig {
    /// Problems serde cannot see, as (field, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let root = Path::new(&self.cgroup_root);
        let plain = !self.cgroup_root.is_empty()
            && root
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain {
            out.push((
                "cgroup_root",
                format!(
                    "{:?} must be a relative path without '..', e.g. \"demi-conductor\"",
                    self.cgroup_root
                ),
            ));
        }
        if self.usage_interval.is_zero() {
            out.push(("usage_interval", "must be longer than 0s".into()));
        }
        out.extend(self.api.problems());
        out
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            runtime_dir: default_runtime_dir(),
            state_dir: default_state_dir(),
            log_format: LogFormat::default(),
            cgroup_root: default_cgroup_root(),
            cgroup_policy: CgroupPolicy::default(),
            usage_interval: default_usage_interval(),
            plugin_dirs: Vec::new(),
            metrics: MetricsConfig::default(),
            api: ApiConfig::default(),
            jobs: JobsConfig::default(),
        }
    }
}

fn default_cgroup_root() -> String {
    "demi-conductor".into()
}

fn default_usage_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/demi-conductor")
}

fn default_runtime_dir() -> PathBuf {
    PathBuf::from("/run/demi-conductor")
}
