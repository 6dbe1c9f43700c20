//! One plugin's replicas: a runner task per instance, each with its own
//! cancel token so the pool can grow, shrink and replace instances.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use demi_proto::handshake as hs;
use nix::unistd::{Gid, Uid};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::PoolSpec;
use super::config::{Credentials, PoolConfig};
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
    /// Every instance's plugin API token.
    pub callers: Callers,
    /// Usage figures of instances no cgroup counts.
    pub machine: Arc<crate::machine::Machine>,
    /// Where plugins' state folders live (`state_dir/plugins`).
    pub state_root: PathBuf,
    /// The stand-in binary (see `process::standby`); `None` when it is
    /// not installed.
    pub standin: Option<PathBuf>,
}

/// The instance a plugin API call comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub plugin: Arc<str>,
    pub index: u32,
}

/// The plugin API tokens of the instances that exist now. A token is made
/// when an instance is launched, handed to each of its processes, and
/// revoked once the instance is retired: a call is tied to the instance,
/// whichever of its processes (or their children) makes it.
#[derive(Clone, Default)]
pub struct Callers(Arc<Mutex<HashMap<String, Caller>>>);

impl Callers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Caller>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Who holds `token`, if anyone.
    pub fn get(&self, token: &str) -> Option<Caller> {
        self.lock().get(token).cloned()
    }

    /// A new token for `caller`: 256 bits from the kernel's random source.
    fn issue(&self, caller: Caller) -> Result<String, String> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| format!("cannot make a plugin API token: {e}"))?;
        let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        self.lock().insert(token.clone(), caller);
        Ok(token)
    }

    fn revoke(&self, token: &str) {
        self.lock().remove(token);
    }
}

/// A pool's membership: how many replicas it has, and how many times that
/// changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Members {
    pub replicas: u32,
    pub generation: u64,
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
    /// Its plugin API token, revoked once it is gone.
    token: Option<String>,
    callers: Callers,
    /// Its private credentials folder, removed once it is gone.
    credentials: Option<PathBuf>,
}

impl InstanceHandle {
    /// Starts stopping the instance gracefully, without waiting.
    pub fn begin_stop(&self) {
        self.cancel.cancel();
    }

    /// Stops the instance gracefully and waits until its runner is done
    /// (process gone, cgroup removed).
    pub async fn retire(self) {
        self.cancel.cancel();
        if let Err(error) = self.task.await {
            tracing::error!(%error, index = self.index, "an instance runner panicked");
        }
        if let Some(token) = &self.token {
            self.callers.revoke(token);
        }
        if let Some(dir) = &self.credentials {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

pub struct Pool {
    pub name: Arc<str>,
    pub spec: PoolSpec,
    /// Instances wanted now (the spec, then scaling).
    pub replicas: u32,
    pub instances: Vec<InstanceHandle>,
    /// The membership each instance is started with and told of.
    pub members: watch::Sender<Members>,
    /// Its dependencies that do not have `min_serving` instances SERVING
    /// (see `depends.rs`).
    pub missing: Vec<String>,
    /// No instances run until the dependencies are ready: it is waiting
    /// to start, or was stopped with a dependency it `binds_to`.
    pub held: bool,
    /// One memory restart at a time across the pool's instances.
    memory_restarts: Arc<tokio::sync::Semaphore>,
}

impl Pool {
    /// Starts the spec's instances, unless the plugin depends on others:
    /// then it waits (held) until they are ready.
    pub fn start(name: &str, spec: PoolSpec, context: &PoolContext) -> Self {
        let members = Members {
            replicas: spec.replicas,
            generation: 1,
        };
        let missing = spec.config.depends_on.clone();
        let mut pool = Self {
            name: Arc::from(name),
            replicas: spec.replicas,
            held: !missing.is_empty(),
            missing,
            spec,
            instances: Vec::new(),
            members: watch::channel(members).0,
            memory_restarts: Arc::new(tokio::sync::Semaphore::new(1)),
        };
        if !pool.held {
            pool.grow_to(pool.replicas, context);
        }
        pool
    }

    /// Detaches every instance but keeps the count wanted, for a pool
    /// that is held; the caller retires them.
    pub fn hold(&mut self) -> Vec<InstanceHandle> {
        self.held = true;
        let mut all = std::mem::take(&mut self.instances);
        all.reverse();
        all
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

    /// A new membership of `replicas`, for instances started from now on
    /// and to tell running ones; returns it.
    pub fn set_members(&self, replicas: u32) -> Members {
        self.members.send_modify(|m| {
            if m.replicas != replicas {
                m.replicas = replicas;
                m.generation += 1;
            }
        });
        *self.members.borrow()
    }

    /// Starts instance `index` with the pool's current config.
    pub fn launch(&self, index: u32, context: &PoolContext) -> InstanceHandle {
        let name = &self.name;
        let config = &self.spec.config;
        let socket = context.layout.plugin_socket(name, index);
        let (cgroup, mut unlaunchable) = confine(name, index, config, context);
        let caller = Caller {
            plugin: name.clone(),
            index,
        };
        let token = context.callers.issue(caller);
        let privileges = config
            .privileges()
            .map_err(|(field, why)| format!("{field}: {why}"));
        let owner = privileges.as_ref().ok().and_then(|p| p.user);
        let credentials = match config.credentials.0.is_empty() {
            true => Ok(None),
            false => {
                let dir = context.layout.credentials_dir(name, index);
                install_credentials(&dir, &config.credentials, owner).map(|()| Some(dir))
            }
        };
        let state = context.state_root.join(&**name);
        let state_made = private_dir(&state, owner, "state folder");
        let sockets = private_dir(
            &context.layout.plugin_socket_dir(name),
            owner,
            "socket folder",
        );
        let unready = [
            privileges.as_ref().err(),
            token.as_ref().err(),
            credentials.as_ref().err(),
            state_made.as_ref().err(),
            sockets.as_ref().err(),
        ];
        if let Some(reason) = unready.into_iter().flatten().next() {
            unlaunchable.get_or_insert_with(|| reason.clone());
        }
        let (token, credentials) = (token.ok(), credentials.ok().flatten());
        let handshake = Handshake {
            socket: &socket,
            plugin_api: &context.layout.plugin_api_socket(),
            token: token.as_deref().unwrap_or_default(),
            credentials: credentials.as_deref(),
            state: &state,
        };
        let mut spawn = spawn_spec(name, index, config, &handshake);
        spawn.confine_to(cgroup.as_deref());
        spawn.privileges = privileges.unwrap_or_default();
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
            members: self.members.subscribe(),
            memory_restarts: self.memory_restarts.clone(),
            machine: context.machine.clone(),
            standin: context
                .standin
                .clone()
                .filter(|_| config.restart.standby && cgroup.is_some()),
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
            token,
            callers: context.callers.clone(),
            credentials,
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

/// Where an instance finds the conductor and its own things.
struct Handshake<'a> {
    socket: &'a Path,
    plugin_api: &'a Path,
    token: &'a str,
    credentials: Option<&'a Path>,
    state: &'a Path,
}

fn spawn_spec(name: &str, index: u32, config: &PoolConfig, handshake: &Handshake<'_>) -> SpawnSpec {
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
        (hs::SOCKET_KEY.into(), handshake.socket.into()),
        (hs::NAME_KEY.into(), name.into()),
        (hs::INSTANCE_KEY.into(), index.to_string().into()),
        // Set again at every spawn, from the pool's membership then.
        (hs::REPLICAS_KEY.into(), config.replicas.to_string().into()),
        (hs::CONDUCTOR_SOCKET_KEY.into(), handshake.plugin_api.into()),
        (hs::CONDUCTOR_TOKEN_KEY.into(), handshake.token.into()),
        (hs::STATE_DIRECTORY_KEY.into(), handshake.state.into()),
    ]);
    if let Some(dir) = handshake.credentials {
        env.push((hs::CREDENTIALS_DIRECTORY_KEY.into(), dir.into()));
    }
    SpawnSpec {
        program: config.command.clone(),
        args: config.args.clone(),
        env,
        working_dir: config.working_dir.clone().unwrap_or_else(|| ".".into()),
        cgroup_procs: Vec::new(),
        cgroup_dir: None,
        stdin_piped: false,
        // The runner lets the output go once a successor has started.
        hold_outputs: true,
        privileges: Default::default(),
    }
}

/// The plugin's own folder `dir` (its state, its socket): made if
/// missing, 0700 and the plugin's user's (`owner`; the conductor's when
/// `None`), and never emptied by the conductor. Its parents are made
/// passable but not listable (0711), so a plugin running as another user
/// reaches its own folder and nothing else.
fn private_dir(dir: &Path, owner: Option<(Uid, Gid)>, what: &str) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let failed = |e: std::io::Error| format!("cannot make the {what} {}: {e}", dir.display());
    if let Some((uid, gid)) = owner
        && let Some((at, mode)) = unpassable(dir, uid, gid)
    {
        return Err(format!(
            "user {uid} cannot reach its {what} {}: {} is mode {mode:o} and not its own \
             (make it 0711, or move the conductor's folders)",
            dir.display(),
            at.display()
        ));
    }
    passable_parent(dir).map_err(failed)?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Ok(()),
            _ => Err(e),
        })
        .map_err(failed)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(failed)?;
    give(dir, owner).map_err(failed)
}

/// Makes the folders above `dir`, the nearest passable but not listable
/// (0711).
fn passable_parent(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(parent)?;
    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711))
}

/// The first existing folder above `dir` that `uid`/`gid` may not pass
/// (no search permission for it), with its mode.
fn unpassable(dir: &Path, uid: Uid, gid: Gid) -> Option<(PathBuf, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    dir.ancestors().skip(1).find_map(|at| {
        let meta = std::fs::metadata(at).ok()?;
        let mode = meta.mode() & 0o7777;
        let search = if meta.uid() == uid.as_raw() {
            mode & 0o100
        } else if meta.gid() == gid.as_raw() {
            mode & 0o010
        } else {
            mode & 0o001
        };
        (search == 0).then(|| (at.to_owned(), mode))
    })
}

/// Hands `path` to the plugin's user, when it runs as another one.
fn give(path: &Path, owner: Option<(Uid, Gid)>) -> std::io::Result<()> {
    match owner {
        Some((uid, gid)) => nix::unistd::chown(path, Some(uid), Some(gid)).map_err(Into::into),
        None => Ok(()),
    }
}

/// Writes `credentials` into a fresh private folder `dir`: the folder
/// 0700 and each file 0400, the plugin's user's alone. What an earlier
/// instance left there goes first.
fn install_credentials(
    dir: &Path,
    credentials: &Credentials,
    owner: Option<(Uid, Gid)>,
) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let failed = |e: std::io::Error| format!("cannot write credentials to {}: {e}", dir.display());
    let _ = std::fs::remove_dir_all(dir);
    passable_parent(dir).map_err(failed)?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(failed)?;
    give(dir, owner).map_err(failed)?;
    for (name, credential) in &credentials.0 {
        let path = dir.join(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(&path)
            .map_err(failed)?;
        file.write_all(credential.secret.expose()).map_err(failed)?;
        give(&path, owner).map_err(failed)?;
    }
    Ok(())
}

/// Sets `key` in a spawn's environment, replacing what was there.
pub fn set_env(env: &mut Vec<(OsString, OsString)>, key: &str, value: String) {
    match env.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value.into(),
        None => env.push((key.into(), value.into())),
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
