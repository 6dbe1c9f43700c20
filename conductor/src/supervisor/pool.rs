//! One plugin's replicas: starts a runner per instance and keeps the
//! handles an operator needs to query or command them.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use demi_proto::handshake as hs;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::config::PoolConfig;
use super::runner::{self, Command, InstanceSpec, InstanceStatus};
use crate::config::Config;
use crate::process::cgroup::{Cgroup, CgroupPolicy, Cgroups};
use crate::process::{SpawnSpec, Spawner};
use crate::rpc::ACCEPTED_PROTOCOLS;

/// What every pool shares.
#[derive(Clone)]
pub struct PoolContext {
    pub runtime_dir: PathBuf,
    pub conductor_socket: PathBuf,
    pub spawner: Arc<Spawner>,
    pub cgroups: Arc<Cgroups>,
    pub cgroup_policy: CgroupPolicy,
    pub usage_interval: Duration,
    pub cancel: CancellationToken,
}

/// A handle to one running instance.
pub struct InstanceHandle {
    pub commands: mpsc::Sender<Command>,
    pub status: watch::Receiver<InstanceStatus>,
    /// For usage read on demand; `None` when the instance runs unconfined.
    pub cgroup: Option<Arc<dyn Cgroup>>,
}

pub struct Pool {
    pub name: Arc<str>,
    pub config: Arc<PoolConfig>,
    pub instances: Vec<InstanceHandle>,
}

impl Pool {
    /// Starts `config.replicas` instances; their runners join `tasks`.
    pub fn start(
        name: &str,
        config: Arc<PoolConfig>,
        context: &PoolContext,
        tasks: &mut JoinSet<()>,
    ) -> Self {
        let name: Arc<str> = Arc::from(name);
        let instances = (0..config.replicas)
            .map(|index| {
                let socket = Config::socket_path(&context.runtime_dir, &name, index);
                let (cgroup, unlaunchable) = confine(&name, index, &config, context);
                let mut spawn =
                    spawn_spec(&name, index, &config, &socket, &context.conductor_socket);
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
                };
                let (commands, command_rx) = mpsc::channel(8);
                let (status_tx, status) = watch::channel(InstanceStatus {
                    state: "stopped",
                    pid: None,
                    breaker: Default::default(),
                    restarts: 0,
                    last_exit: None,
                    confined: cgroup.is_some(),
                    usage: None,
                    history: Vec::new(),
                });
                tasks.spawn(runner::run(
                    spec,
                    context.spawner.clone(),
                    command_rx,
                    status_tx,
                    context.cancel.clone(),
                ));
                InstanceHandle {
                    commands,
                    status,
                    cgroup,
                }
            })
            .collect();
        Self {
            name,
            config,
            instances,
        }
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
    }
}

/// The instance's cgroup, or why it may not start. Creation failure is
/// fatal only for a plugin that declares limits under the `required`
/// policy; otherwise the instance runs unconfined and says so.
fn confine(
    plugin: &str,
    index: u32,
    config: &PoolConfig,
    context: &PoolContext,
) -> (Option<Arc<dyn Cgroup>>, Option<String>) {
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
