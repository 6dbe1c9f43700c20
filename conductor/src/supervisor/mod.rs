//! Keeping plugin instances alive: one pool per plugin, one state machine
//! and one runner task per instance, and the operations an operator asks
//! for (start, stop, rolling restart, scale) or a reload brings (add,
//! remove, update a pool).

pub mod breaker;
pub mod config;
mod depends;
pub mod instance;
pub mod pool;
mod report;
pub mod restarts;
pub mod runner;

pub use config::{Health, HealthConfig, PoolConfig, RestartConfig};
pub use pool::{Caller, Callers, Members, Pool, PoolContext};
pub use runner::InstanceStatus;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;

use crate::events::{Bus, Event, Phase};
use config::ShareHandoff;
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
    #[error(
        "{plugin:?} is autoscaled between {min} and {max} replicas; change \
         [plugins.{plugin}.autoscale] and reload instead"
    )]
    Autoscaled { plugin: String, min: u32, max: u32 },
}

/// One plugin as the supervisor runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    pub config: Arc<PoolConfig>,
    /// Replicas to run at first.
    pub replicas: u32,
    /// The bounds its autoscaler keeps it in; `None`: an operator sets
    /// the count.
    pub autoscaled: Option<(u32, u32)>,
    /// The file that defined it.
    pub source: PathBuf,
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
    /// Why instances say they are not serving, by index (their current
    /// process's own words).
    pub notes: BTreeMap<u32, String>,
    /// Dependencies without `min_serving` instances SERVING.
    pub waiting_for: Vec<String>,
    /// No instance runs until `waiting_for` is empty.
    pub held: bool,
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

    /// Why the plugin is degraded, if it is: an instance Failed, or fewer
    /// than `min_serving` SERVING. A plugin held for its dependencies is
    /// not degraded itself (they are).
    pub fn degraded(&self) -> Option<String> {
        if self.held {
            return None;
        }
        let failed: Vec<String> = self
            .instances
            .iter()
            .filter(|(_, s)| s.state == Phase::Failed)
            .map(|(i, _)| i.to_string())
            .collect();
        if !failed.is_empty() {
            return Some(format!("failed: instance {}", failed.join(", ")));
        }
        let serving = self.serving();
        (serving < self.min_serving)
            .then(|| format!("{serving} of min {} SERVING", self.min_serving))
    }
}

/// Every pool of the conductor.
pub struct Supervisor {
    context: PoolContext,
    pools: Mutex<BTreeMap<String, Pool>>,
    /// Serialises operations that change pools.
    operations: tokio::sync::Mutex<()>,
    /// What instances reported about their health: (plugin, index) →
    /// (the process that said it, what it said).
    notes: Mutex<HashMap<(String, u32), (u32, String)>>,
    /// Starts and stops dependants as their dependencies come and go.
    follower: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Set once the conductor stops: dependants are no longer started.
    stopping: AtomicBool,
}

impl Supervisor {
    /// Starts every pool of `pools`; one that depends on others waits
    /// until they are ready.
    pub fn start(pools: BTreeMap<String, PoolSpec>, context: PoolContext) -> Arc<Self> {
        // Before any pool starts: no readiness is missed.
        let events = context.bus.subscribe();
        let cancel = context.cancel.clone();
        let pools = pools
            .into_iter()
            .map(|(name, spec)| {
                let pool = Pool::start(&name, spec, &context);
                (name, pool)
            })
            .collect();
        let supervisor = Arc::new(Self {
            context,
            pools: Mutex::new(pools),
            operations: tokio::sync::Mutex::new(()),
            notes: Mutex::new(HashMap::new()),
            follower: Mutex::new(None),
            stopping: AtomicBool::new(false),
        });
        let follower = tokio::spawn(follow(Arc::downgrade(&supervisor), events, cancel));
        *supervisor
            .follower
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(follower);
        supervisor
    }

    /// Starts the dependants whose dependencies are ready, stops those
    /// bound to one that is not, and says what changed.
    async fn settle(&self) {
        if self.stopping.load(Ordering::Acquire) {
            return;
        }
        let _op = self.operations.lock().await;
        let (settled, retired) = {
            let mut pools = self.pools();
            let settled = depends::settle(&mut pools);
            let mut retired = Vec::new();
            for name in &settled.start {
                if let Some(pool) = pools.get_mut(name) {
                    pool.held = false;
                    let replicas = pool.replicas;
                    pool.grow_to(replicas, &self.context);
                }
            }
            for name in &settled.hold {
                if let Some(pool) = pools.get_mut(name) {
                    retired.extend(pool.hold());
                }
            }
            (settled, retired)
        };
        for name in &settled.start {
            tracing::info!(plugin = name, "dependencies ready; starting");
        }
        for name in &settled.hold {
            tracing::info!(
                plugin = name,
                "a dependency it binds to is down; stopping it"
            );
        }
        for (plugin, dependency, ready) in settled.changed {
            self.events().emit(Event::Dependency {
                plugin: Arc::from(plugin.as_str()),
                dependency,
                ready,
            });
        }
        for handle in &retired {
            handle.begin_stop();
        }
        for handle in retired {
            handle.retire().await;
        }
    }

    fn pools(&self) -> MutexGuard<'_, BTreeMap<String, Pool>> {
        // A panic while holding this lock leaves plain data behind; keep going.
        self.pools.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn events(&self) -> &Bus {
        &self.context.bus
    }

    /// The instance that holds plugin API `token`, if one does.
    pub fn caller(&self, token: &str) -> Option<Caller> {
        self.context.callers.get(token)
    }

    /// `plugin`'s dependencies, each with whether it is ready.
    pub fn dependencies(&self, plugin: &str) -> Option<Vec<(String, bool)>> {
        let pools = self.pools();
        let pool = pools.get(plugin)?;
        Some(
            pool.spec
                .config
                .depends_on
                .iter()
                .map(|d| (d.clone(), !pool.missing.contains(d)))
                .collect(),
        )
    }

    /// `caller`'s pool's membership now.
    pub fn members(&self, caller: &Caller) -> Option<Members> {
        self.pools()
            .get(&*caller.plugin)
            .map(|pool| *pool.members.borrow())
    }

    /// Every plugin; usage is left out (see [`Self::list_with_usage`]).
    pub fn list(&self) -> Vec<PluginView> {
        self.views(false)
    }

    /// Every plugin, with each instance's usage read now.
    pub fn list_with_usage(&self) -> Vec<PluginView> {
        self.views(true)
    }

    fn views(&self, usage: bool) -> Vec<PluginView> {
        let taken: Vec<(PluginView, Option<Meters>)> = self
            .pools()
            .values()
            .map(|p| (view(p), usage.then(|| meters(p))))
            .collect();
        taken
            .into_iter()
            .map(|(v, m)| self.annotated(self.measured(v, m)))
            .collect()
    }

    /// Records why `caller` says it is not serving (or clears it), for its
    /// current process only: a new process starts with a clean slate.
    pub fn note_health(&self, caller: &Caller, serving: bool, reason: String) {
        let pid = self
            .pools()
            .get(&*caller.plugin)
            .and_then(|p| p.instances.iter().find(|i| i.index == caller.index))
            .and_then(|i| i.status.borrow().pid);
        let mut notes = self.notes.lock().unwrap_or_else(|p| p.into_inner());
        let key = (caller.plugin.to_string(), caller.index);
        match (serving, pid) {
            (false, Some(pid)) => {
                notes.insert(key, (pid, reason));
            }
            _ => {
                notes.remove(&key);
            }
        }
    }

    fn annotated(&self, mut view: PluginView) -> PluginView {
        let notes = self.notes.lock().unwrap_or_else(|p| p.into_inner());
        for (index, status) in &view.instances {
            if let Some((pid, note)) = notes.get(&(view.name.clone(), *index))
                && status.pid == Some(*pid)
            {
                view.notes.insert(*index, note.clone());
            }
        }
        view
    }

    /// The settings `name` runs with.
    pub fn config(&self, name: &str) -> Option<Arc<PoolConfig>> {
        self.pools().get(name).map(|p| p.spec.config.clone())
    }

    /// Instances wanted for `name` now.
    pub fn replicas(&self, name: &str) -> Option<u32> {
        self.pools().get(name).map(|p| p.replicas)
    }

    /// One plugin; usage is left out (see [`Self::get_with_usage`]).
    pub fn get(&self, name: &str) -> Result<PluginView, SupervisorError> {
        self.view_of(name, false)
    }

    /// One plugin, with each instance's usage read now.
    pub fn get_with_usage(&self, name: &str) -> Result<PluginView, SupervisorError> {
        self.view_of(name, true)
    }

    fn view_of(&self, name: &str, usage: bool) -> Result<PluginView, SupervisorError> {
        let (view, meters) = self
            .pools()
            .get(name)
            .map(|p| (view(p), usage.then(|| meters(p))))
            .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))?;
        Ok(self.annotated(self.measured(view, meters)))
    }

    /// `view` with its instances' usage read now, outside the pools lock:
    /// a few cgroup files per instance, which at a thousand instances
    /// would otherwise hold every pool operation for the length of a
    /// scrape. Without `meters`, the view as it is.
    fn measured(&self, mut view: PluginView, meters: Option<Meters>) -> PluginView {
        for ((_, status), cgroup) in view.instances.iter_mut().zip(meters.into_iter().flatten()) {
            status.usage = runner::read_usage(cgroup.as_deref(), status.pid, &self.context.machine);
        }
        view
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
        let grace = self.spec(name)?.config.shutdown_grace;
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
        let config = self.spec(name)?.config;
        let patience = config.startup_timeout + config.shutdown_grace * 2 + SLACK;
        let covered = config.sharded && config.share_handoff == ShareHandoff::Overlap;
        for (index, handle) in self.handles(name)? {
            if covered {
                self.roll_covered(name, index, handle, patience).await?;
            } else {
                roll(name, index, handle, patience).await?;
            }
        }
        self.get(name)
    }

    /// Restarts instance `index` of an overlapping sharded plugin while a
    /// stand-in holds its share: an extra instance launched beside the
    /// pool at the next free index (its own share is empty), told
    /// `index`'s membership, and retired once the restarted instance is
    /// SERVING again. A bot's shards are never without a session.
    async fn roll_covered(
        &self,
        name: &str,
        index: u32,
        handle: HandleRef,
        patience: Duration,
    ) -> Result<(), SupervisorError> {
        let (stand_in, members, startup) = {
            let pools = self.pools();
            let pool = pools
                .get(name)
                .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))?;
            let at = pool.instances.len() as u32;
            let members = *pool.members.borrow();
            let startup = pool.spec.config.startup_timeout;
            (pool.launch(at, &self.context), members, startup)
        };
        let at = stand_in.index;
        let covered = async {
            let mut status = stand_in.status.clone();
            let serving = |s: &InstanceStatus| s.state == Phase::Serving;
            wait_status(name, at, &mut status, patience, serving).await?;
            // A generation of its own: newer than anything it was told.
            let membership = demi_proto::plugin::v1::Membership {
                index,
                replicas: members.replicas,
                generation: members.generation + 1,
            };
            let socket = self.context.layout.plugin_socket(name, at);
            let told = async {
                let connection = crate::rpc::PluginConnection::connect(&socket).await?;
                connection.membership_changed(membership, startup).await
            };
            told.await.map_err(|status| SupervisorError::NotServing {
                plugin: name.to_owned(),
                index: at,
                reason: format!(
                    "the stand-in did not take the share over: {}",
                    status.message()
                ),
            })?;
            tracing::info!(
                plugin = name,
                instance = index,
                stand_in = at,
                "share held by a stand-in"
            );
            roll(name, index, handle, patience).await
        };
        let result = covered.await;
        stand_in.retire().await;
        result
    }

    /// Sets the number of instances of `name`, for an operator: refused
    /// for an autoscaled plugin, whose scaler would undo it.
    pub async fn scale(&self, name: &str, replicas: u32) -> Result<PluginView, SupervisorError> {
        if let Some((min, max)) = self.spec(name)?.autoscaled {
            return Err(SupervisorError::Autoscaled {
                plugin: name.to_owned(),
                min,
                max,
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
        let config = self.spec(name)?.config;
        let min_serving = config.health.config().min_serving;
        if replicas < min_serving {
            return Err(SupervisorError::InvalidArgument {
                field: "replicas",
                reason: format!(
                    "{replicas} is below the plugin's health.min_serving ({min_serving})"
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

    /// Brings `name` to `replicas` instances. Growing a sharded plugin,
    /// the running instances learn the new membership (and give up
    /// shares) before new ones start. Shrinking an exclusive one, the
    /// extra instances stop before the rest learn it; an overlapping one,
    /// the rest take the shares up before the extra instances stop.
    async fn scale_locked(&self, name: &str, replicas: u32) -> Result<(), SupervisorError> {
        let (before, sharded, handoff) = {
            let mut pools = self.pools();
            let pool = pools
                .get_mut(name)
                .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))?;
            // Held: the count is for when its dependencies are ready.
            if pool.held {
                pool.replicas = replicas;
                pool.set_members(replicas);
                return Ok(());
            }
            let config = &pool.spec.config;
            (pool.replicas, config.sharded, config.share_handoff)
        };
        let overlap = handoff == ShareHandoff::Overlap;
        if sharded && (replicas > before || (overlap && replicas < before)) {
            self.tell_members(name, replicas).await?;
        }
        let retired = {
            let mut pools = self.pools();
            let pool = pools
                .get_mut(name)
                .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))?;
            pool.set_members(replicas);
            pool.grow_to(replicas, &self.context);
            pool.shrink_to(replicas)
        };
        for handle in retired {
            handle.retire().await;
        }
        if sharded && !overlap && replicas < before {
            self.tell_members(name, replicas).await?;
        }
        if before != replicas {
            self.events().emit(Event::Scaled {
                plugin: Arc::from(name),
                from: before,
                to: replicas,
            });
        }
        Ok(())
    }

    /// Makes `replicas` the membership of `name` and tells each running
    /// instance below it; an instance that cannot be told (it lacks
    /// `MembershipChanged`, or did not answer) is restarted with it, one
    /// at a time, each SERVING again before the next.
    async fn tell_members(&self, name: &str, replicas: u32) -> Result<(), SupervisorError> {
        let (members, config) = {
            let pools = self.pools();
            let pool = pools
                .get(name)
                .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))?;
            (pool.set_members(replicas), pool.spec.config.clone())
        };
        let told = self
            .handles(name)?
            .into_iter()
            .filter(|(index, handle)| *index < replicas && handle.status.borrow().pid.is_some());
        let mut restart = Vec::new();
        for (index, handle) in told {
            let membership = demi_proto::plugin::v1::Membership {
                index,
                replicas: members.replicas,
                generation: members.generation,
            };
            let socket = self.context.layout.plugin_socket(name, index);
            let told = async {
                let connection = crate::rpc::PluginConnection::connect(&socket).await?;
                connection
                    .membership_changed(membership, config.startup_timeout)
                    .await
            };
            match told.await {
                Ok(()) => tracing::info!(
                    plugin = name,
                    instance = index,
                    replicas = members.replicas,
                    generation = members.generation,
                    "told its new membership"
                ),
                Err(status) => {
                    tracing::info!(
                        plugin = name,
                        instance = index,
                        replicas = members.replicas,
                        reason = %status.message(),
                        "cannot tell the new membership; restarting the instance with it"
                    );
                    restart.push((index, handle));
                }
            }
        }
        let patience = config.startup_timeout + config.shutdown_grace * 2 + SLACK;
        for (index, handle) in restart {
            roll(name, index, handle, patience).await?;
        }
        Ok(())
    }

    fn spec(&self, name: &str) -> Result<PoolSpec, SupervisorError> {
        self.pools()
            .get(name)
            .map(|p| p.spec.clone())
            .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))
    }

    /// Starts a new plugin's pool (once its dependencies are ready).
    pub async fn add(&self, name: &str, spec: PoolSpec) {
        {
            let _op = self.operations.lock().await;
            let pool = Pool::start(name, spec, &self.context);
            self.pools().insert(name.to_owned(), pool);
        }
        self.settle().await;
    }

    /// Stops every instance of `name` and forgets the plugin.
    pub async fn remove(&self, name: &str) {
        let _op = self.operations.lock().await;
        let pool = self.pools().remove(name);
        if let Some(mut pool) = pool {
            for handle in pool.shrink_to(0) {
                handle.retire().await;
            }
        }
        let cgroups = self.context.cgroups.clone();
        let plugin = name.to_owned();
        let _ = tokio::task::spawn_blocking(move || cgroups.remove_plugin(&plugin)).await;
    }

    /// Brings `name` to `spec`: nothing when only its source moved, a new
    /// count when only counts changed, else its instances are replaced one
    /// at a time. An autoscaled plugin keeps the count its scaler chose,
    /// within the new bounds.
    pub async fn update(&self, name: &str, spec: PoolSpec) -> Result<(), SupervisorError> {
        let _op = self.operations.lock().await;
        let (old, running) = {
            let pools = self.pools();
            let pool = pools
                .get(name)
                .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))?;
            (pool.spec.clone(), pool.replicas)
        };
        // Counts and order alone change without touching an instance.
        let same_run = PoolConfig {
            replicas: spec.config.replicas,
            depends_on: spec.config.depends_on.clone(),
            binds_to: spec.config.binds_to,
            ..(*old.config).clone()
        } == *spec.config;
        if same_run {
            if let Some(pool) = self.pools().get_mut(name) {
                pool.spec = spec.clone();
            }
        } else {
            self.replace(name, spec.clone()).await?;
        }
        let replicas = match spec.autoscaled {
            Some((min, max)) => running.clamp(min, max),
            None => spec.replicas,
        };
        self.scale_locked(name, replicas).await
    }

    /// Swaps in `spec` one instance at a time: each old instance stops,
    /// its successor starts and must be SERVING before the next one goes.
    async fn replace(&self, name: &str, spec: PoolSpec) -> Result<(), SupervisorError> {
        let config = spec.config.clone();
        let count = {
            let mut pools = self.pools();
            let pool = pools
                .get_mut(name)
                .ok_or_else(|| SupervisorError::NotFound(name.to_owned()))?;
            pool.spec = spec;
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

    /// Stops every pool in the reverse of start order: each plugin, all
    /// its instances at once, before the plugins it depends on.
    /// Not serialised with operations: shutdown does not wait for a
    /// rolling restart to finish; whatever one starts meanwhile ends with
    /// the context's cancel.
    pub async fn stop_all(&self) {
        self.stopping.store(true, Ordering::Release);
        let layers = depends::stop_order(&self.pools());
        for layer in layers {
            let handles: Vec<_> = {
                let mut pools = self.pools();
                let mut handles = Vec::new();
                for name in &layer {
                    if let Some(pool) = pools.get_mut(name) {
                        handles.extend(pool.hold());
                    }
                }
                handles
            };
            for handle in &handles {
                handle.begin_stop();
            }
            for handle in handles {
                handle.retire().await;
            }
        }
    }

    /// Stops every instance (after the context's cancel token fired) and
    /// waits until all are gone.
    pub async fn wait(&self) {
        self.stopping.store(true, Ordering::Release);
        let follower = self
            .follower
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(follower) = follower {
            let _ = follower.await;
        }
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

/// Restarts one instance and waits until its new process is SERVING.
async fn roll(
    name: &str,
    index: u32,
    mut handle: HandleRef,
    patience: Duration,
) -> Result<(), SupervisorError> {
    let before = handle.status.borrow_and_update().pid;
    let _ = handle.commands.send(Command::Restart).await;
    let back = |s: &InstanceStatus| s.state == Phase::Serving && s.pid != before;
    wait_status(name, index, &mut handle.status, patience, back).await
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

/// Each instance's cgroup, in the order of its view's instances.
type Meters = Vec<Option<Arc<dyn crate::process::cgroup::Cgroup>>>;

fn meters(pool: &Pool) -> Meters {
    pool.instances.iter().map(|i| i.cgroup.clone()).collect()
}

fn view(pool: &Pool) -> PluginView {
    PluginView {
        name: pool.name.to_string(),
        replicas: pool.replicas,
        min_serving: pool.spec.config.health.config().min_serving,
        command: pool.spec.config.command.display().to_string(),
        source: pool.spec.source.display().to_string(),
        instances: pool
            .instances
            .iter()
            .map(|i| (i.index, i.status.borrow().clone()))
            .collect(),
        notes: BTreeMap::new(),
        waiting_for: pool.missing.clone(),
        held: pool.held,
    }
}

/// Settles dependencies whenever an instance's phase or a pool's size
/// changed, until the conductor stops.
async fn follow(
    supervisor: std::sync::Weak<Supervisor>,
    mut events: tokio::sync::broadcast::Receiver<Arc<crate::events::Stamped>>,
    cancel: tokio_util::sync::CancellationToken,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            () = cancel.cancelled() => return,
        };
        let relevant = match &event {
            Ok(stamped) => matches!(
                &stamped.event,
                Event::Instance {
                    what: crate::events::InstanceEvent::PhaseChanged { .. },
                    ..
                } | Event::Scaled { .. }
                    | Event::Reloaded { .. }
            ),
            Err(RecvError::Lagged(_)) => true,
            Err(RecvError::Closed) => return,
        };
        if !relevant {
            continue;
        }
        let Some(supervisor) = supervisor.upgrade() else {
            return;
        };
        tokio::select! {
            () = supervisor.settle() => {}
            () = cancel.cancelled() => return,
        }
    }
}
