//! `[conductor]`: settings of the daemon itself.

use std::path::PathBuf;

use serde::Deserialize;

use crate::telemetry::LogFormat;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Sockets and the lock file live here (relative to the config file).
    /// Created with mode 0700.
    #[serde(default = "default_runtime_dir")]
    pub runtime_dir: PathBuf,
    /// `human` or `json`; `--log-format` overrides it.
    #[serde(default)]
    pub log_format: LogFormat,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            runtime_dir: default_runtime_dir(),
            log_format: LogFormat::default(),
        }
    }
}

fn default_runtime_dir() -> PathBuf {
    PathBuf::from("/run/demi-conductor")
}
