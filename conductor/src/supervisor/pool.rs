//! One plugin's replicas: a runner task per instance, each with its own
//! cancel token so the pool can grow, shrink and replace instances.

use std::ffi::OsString;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use demi_proto::handshake as hs;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::PoolSpec;
use super::config::PoolConfig;
use super::runner::{self, Command, InstanceSpec, InstanceStatus};
use crate::events::{Bus, Phase};
use crate::layout::Layout;
use crate::process::cgroup::{Cgroup, CgroupPolicy, Cgroups};
use crate::process::{SpawnSpec, Spawner};
use crate::rpc::ACCEPTED_PROTOCOLS;

/// What every pool shares.
#[derive(Clone)]
pub struct PoolContext {
    pub layout: Layout,
    pub spawner: Arc<Spawner>,
    pub cgroups: Arc<Cgroups>,
    pub cgroup_policy: CgroupPolicy,
    pub usage_interval: Duration,
    pub bus: Bus,
    /// Fires on conductor shutdown; every instance token is a child of it.
    pub cancel: CancellationToken,
}

/// A handle to one running instance.
pub struct InstanceHandle {
    pub index: u32,
    pub commands: mpsc::Sender<Command>,
    pub status: watch::Receiver<InstanceStatus>,
    /// For usage read on demand; `None` when the instance runs unconfined.
    pub cgroup: Option<Arc<dyn Cgroup>>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl InstanceHandle {
    /// Stops the instance gracefully and waits until its runner is done
    /// (process gone, cgroup removed).
    pub async fn retire(self) {
        self.cancel.cancel();
        if let Err(error) = self.task.await {
            tracing::error!(%error, index = self.index, "an instance runner panicked");
        }
    }
}

pub struct Pool {
    pub name: Arc<str>,
    pub spec: PoolSpec,
    /// Instances wanted now (the spec, then scaling).
    pub replicas: u32,
    pub instances: Vec<InstanceHandle>,
}

impl Pool {
    /// Starts the spec's instances.
    pub fn start(name: &str, spec: PoolSpec, context: &PoolContext) -> Self {
        let mut pool = Self {
            name: Arc::from(name),
            replicas: spec.replicas,
            spec,
            instances: Vec::new(),
        };
        pool.grow_to(pool.replicas, context);
        pool
    }

    /// Adds instances up to `replicas`.
    pub fn grow_to(&mut self, replicas: u32, context: &PoolContext) {
        while (self.instances.len() as u32) < replicas {
            let index = self.instances.len() as u32;
            self.instances.push(self.launch(index, context));
        }
        self.replicas = self.replicas.max(replicas);
    }

    /// Detaches instances beyond `replicas`, highest index first; the
    /// caller retires them.
    pub fn shrink_to(&mut self, replicas: u32) -> Vec<InstanceHandle> {
        self.replicas = replicas;
        let keep = (replicas as usize).min(self.instances.len());
        let mut removed = self.instances.split_off(keep);
        removed.reverse();
        removed
    }

    /// Starts instance `index` with the pool's current config.
    pub fn launch(&self, index: u32, context: &PoolContext) -> InstanceHandle {
        let name = &self.name;
        let config = &self.spec.config;
        let socket = context.layout.plugin_socket(name, index);
        let (cgroup, unlaunchable) = confine(name, index, config, context);
        let conductor_socket = context.layout.conductor_socket();
        let mut spawn = spawn_spec(name, index, config, &socket, &conductor_socket);
        spawn.cgroup_procs = cgroup.as_ref().map(|c| c.procs_files()).unwrap_or_default();
        let spec = InstanceSpec {
            plugin: name.clone(),
            index,
            config: config.clone(),
            spawn,
            socket,
            cgroup: cgroup.clone(),
            unlaunchable,
            usage_interval: context.usage_interval,
            bus: context.bus.clone(),
        };
        let (commands, command_rx) = mpsc::channel(8);
        let (status_tx, status) = watch::channel(InstanceStatus::new(cgroup.is_some()));
        let cancel = context.cancel.child_token();
        let task = tokio::spawn(runner::run(
            spec,
            context.spawner.clone(),
            command_rx,
            status_tx,
            cancel.clone(),
        ));
        InstanceHandle {
            index,
            commands,
            status,
            cgroup,
            cancel,
            task,
        }
    }

    /// Instances SERVING now.
    pub fn serving(&self) -> u32 {
        self.instances
            .iter()
            .filter(|i| i.status.borrow().state == Phase::Serving)
            .count() as u32
    }
}

fn spawn_spec(
    name: &str,
    index: u32,
    config: &PoolConfig,
    socket: &Path,
    conductor_socket: &Path,
) -> SpawnSpec {
    let versions = ACCEPTED_PROTOCOLS
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut env: Vec<(OsString, OsString)> = config
        .env
        .iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    env.extend([
        (hs::MAGIC_COOKIE_KEY.into(), hs::MAGIC_COOKIE_VALUE.into()),
        (hs::PROTOCOL_VERSIONS_KEY.into(), versions.into()),
        (hs::SOCKET_KEY.into(), socket.into()),
        (hs::NAME_KEY.into(), name.into()),
        (hs::INSTANCE_KEY.into(), index.to_string().into()),
        (hs::CONDUCTOR_SOCKET_KEY.into(), conductor_socket.into()),
    ]);
    SpawnSpec {
        program: config.command.clone(),
        args: config.args.clone(),
        env,
        working_dir: config.working_dir.clone().unwrap_or_else(|| ".".into()),
        cgroup_procs: Vec::new(),
        stdin_piped: false,
    }
}

/// The instance's cgroup, or why it may not start. Creation failure is
/// fatal only for a plugin that declares limits under the `required`
/// policy; otherwise the instance runs unconfined and says so. With the
/// `off` policy nothing is confined (the daemon said so once at start).
fn confine(
    plugin: &str,
    index: u32,
    config: &PoolConfig,
    context: &PoolContext,
) -> (Option<Arc<dyn Cgroup>>, Option<String>) {
    if context.cgroup_policy == CgroupPolicy::Off {
        return (None, None);
    }
    match context.cgroups.create(plugin, index, &config.limits) {
        Ok(cgroup) => (Some(cgroup), None),
        Err(error) if config.limits.is_empty() => {
            tracing::info!(plugin, instance = index, %error, "running without a cgroup (no limits declared)");
            (None, None)
        }
        Err(error) if context.cgroup_policy == CgroupPolicy::Optional => {
            tracing::warn!(
                plugin,
                instance = index,
                %error,
                "LIMITS NOT ENFORCED: running unconfined because cgroup_policy = \"optional\""
            );
            (None, None)
        }
        Err(error) => (
            None,
            Some(format!(
                "{error}; [plugins.{plugin}.limits] needs cgroups: run the conductor as root on a \
                 host with the memory, cpu and pids controllers (on cgroup v2 under systemd, in a \
                 delegated subtree: Delegate=yes), or set [conductor] cgroup_policy = \"optional\" \
                 to run it without limits"
            )),
        ),
    }
}
