//! From a checked configuration to what each component is told: the
//! supervisor's pools, dispatch's lanes and the scaler's plans, with their
//! history seeds read. What only this step can find wrong (a seed that
//! does not parse, a socket path too long) is a configuration error like
//! any other, placed where the field is written.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::api::config::Grants;
use crate::config::{Config, ConfigErrors};
use crate::dispatch;
use crate::layout::{Layout, MAX_SOCKET_PATH};
use crate::limits;
use crate::scaler;
use crate::supervisor::PoolSpec;

/// What each component runs.
#[derive(Debug, Clone)]
pub struct Plan {
    pub pools: BTreeMap<String, PoolSpec>,
    pub lanes: dispatch::Plugins,
    pub scalers: BTreeMap<String, scaler::Plan>,
    /// What each plugin may do through the plugin API.
    pub grants: BTreeMap<String, Grants>,
    pub limits: limits::Table,
}

/// A configuration with its plan: ready to run.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub config: Config,
    pub plan: Plan,
}

/// Plans `config`, or says every problem found on the way.
pub fn prepare(config: Config) -> Result<Prepared, ConfigErrors> {
    let plan = plan(&config)?;
    Ok(Prepared { config, plan })
}

pub fn plan(config: &Config) -> Result<Plan, ConfigErrors> {
    let layout = Layout::new(&config.conductor.runtime_dir);
    let mut errors = Vec::new();
    let mut plan = Plan {
        pools: BTreeMap::new(),
        lanes: BTreeMap::new(),
        scalers: BTreeMap::new(),
        grants: BTreeMap::new(),
        limits: BTreeMap::new(),
    };
    for (name, plugin) in &config.plugins {
        let most = plugin
            .autoscale
            .as_ref()
            .map_or(plugin.pool.replicas, |a| a.max.max(plugin.pool.replicas));
        if let Some(socket) = layout.socket_too_long(name, most) {
            errors.push(config.problem(
                None,
                "runtime_dir",
                format!(
                    "socket path {} is longer than the {MAX_SOCKET_PATH} bytes Unix sockets \
                     allow; choose a shorter runtime_dir",
                    socket.display()
                ),
            ));
        }
        plan.pools.insert(
            name.clone(),
            PoolSpec {
                config: plugin.pool.clone(),
                replicas: plugin.initial_replicas(),
                autoscaled: plugin.autoscale.as_ref().map(|a| (a.min, a.max)),
                source: plugin.source.clone(),
            },
        );
        plan.lanes.insert(
            name.clone(),
            plugin.takes_jobs().then(|| plugin.dispatch.clone()),
        );
        plan.grants.insert(name.clone(), plugin.grants.clone());
        plan.limits
            .insert(name.clone(), plugin.shared_limits.clone());
        let Some(autoscale) = &plugin.autoscale else {
            continue;
        };
        let seed = match &autoscale.history_seed {
            Some(path) => match scaler::seed::load(path, autoscale.bucket) {
                Ok(values) => values,
                Err(error) => {
                    errors.push(config.problem(
                        Some(name),
                        "autoscale.history_seed",
                        error.to_string(),
                    ));
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        plan.scalers.insert(
            name.clone(),
            scaler::Plan {
                config: autoscale.clone(),
                seed: Arc::from(seed),
                // A replica may use one core unless its limits say otherwise.
                cores_per_replica: plugin.pool.limits.cpu.unwrap_or(1.0),
            },
        );
    }
    if errors.is_empty() {
        Ok(plan)
    } else {
        errors.sort_by(|a, b| (&a.file, a.position).cmp(&(&b.file, b.position)));
        errors.dedup();
        Err(ConfigErrors(errors))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn what_only_planning_sees_is_a_config_error_in_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("plugin");
        std::fs::write(&plugin, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.path().join("seed.csv"), "t,v\n0,1\n10,2\n").unwrap();
        let file = dir.path().join("conductor.toml");
        let long = "a".repeat(100);
        let text = format!(
            "[conductor]\nruntime_dir = \"/tmp/{long}\"\n\n\
             [plugins.echo]\ncommand = \"./plugin\"\n\
             [plugins.echo.autoscale]\nbucket = \"1s\"\nhistory = \"1h\"\n\
             history_seed = \"seed.csv\"\n"
        );
        let config = crate::config::parse(&file, &text).unwrap();
        let errors = plan(&config).unwrap_err();
        let shown = errors.to_string();
        assert_eq!(errors.0.len(), 2, "{shown}");
        assert_eq!(errors.0[0].field, "conductor.runtime_dir");
        assert_eq!(errors.0[0].position.map(|p| p.0), Some(2), "{shown}");
        assert!(shown.contains("longer than the 107 bytes"), "{shown}");
        assert_eq!(errors.0[1].field, "plugins.echo.autoscale.history_seed");
        assert_eq!(errors.0[1].position.map(|p| p.0), Some(9), "{shown}");
        assert!(
            shown.contains("step is 10s but the autoscale bucket is 1s"),
            "{shown}"
        );
    }

    #[test]
    fn each_component_gets_its_part() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("conductor.toml");
        let text = "[plugins.plain]\ncommand = \"sh\"\nhealth = \"none\"\n\
                    [plugins.workers]\ncommand = \"sh\"\nreplicas = 9\n\
                    [plugins.workers.limits]\ncpu = 0.5\n\
                    [plugins.workers.dispatch]\nmax_attempts = 2\n\
                    [plugins.workers.autoscale]\nmin = 2\nmax = 4\n";
        let config = crate::config::parse(&file, text).unwrap();
        let plan = plan(&config).unwrap();
        assert_eq!(plan.lanes["plain"], None, "no gRPC, no jobs");
        assert_eq!(
            plan.lanes["workers"].as_ref().map(|d| d.max_attempts),
            Some(2)
        );
        let workers = &plan.pools["workers"];
        assert_eq!((workers.replicas, workers.autoscaled), (4, Some((2, 4))));
        assert_eq!(plan.scalers["workers"].cores_per_replica, 0.5);
        assert!(!plan.scalers.contains_key("plain"));
    }
}
