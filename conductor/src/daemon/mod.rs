//! The conductor daemon: builds every component from the configuration,
//! wires them to each other through the narrow views each one asks for,
//! applies reloads, and stops them all on SIGTERM or SIGINT.
//!
//! The one place that knows every component: the others know the event
//! bus and the views they are handed, not each other.

pub mod config;
mod plan;
mod reload;
mod runtime_dir;
mod wiring;

pub use config::DaemonConfig;
pub use plan::{Plan, Prepared, prepare};
pub use runtime_dir::{RuntimeDir, RuntimeDirError};

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::api::host::{Access, HostParts};
use crate::api::{self, ApiError, Control as _};
use crate::claim::{self, ClaimError};
use crate::config::Config;
use crate::dispatch::config::JobsConfig;
use crate::dispatch::store::{Retention, Store};
use crate::dispatch::{DispatchError, Dispatcher, StoreError};
use crate::events::Bus;
use crate::layout::Layout;
use crate::limits::Limits;
use crate::machine::Machine;
use crate::process::Spawner;
use crate::process::cgroup::{CgroupPolicy, Cgroups, Setup};
use crate::scaler::Scaler;
use crate::supervisor::{Callers, PoolContext, Supervisor};
use crate::telemetry::Recorder;
use crate::telemetry::metrics::{self, Metrics, MetricsError};
use reload::{Reloaded, Reloader};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    RuntimeDir(#[from] RuntimeDirError),
    #[error("cannot start the spawner threads: {0}")]
    Spawner(std::io::Error),
    #[error("cannot install the {0} handler: {1}")]
    Signal(&'static str, std::io::Error),
    #[error("cgroup set-up panicked: {0}")]
    CgroupSetup(tokio::task::JoinError),
    #[error("opening the job store panicked: {0}")]
    StoreOpen(tokio::task::JoinError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    MetricsSetup(#[from] MetricsError),
    /// Another conductor holds what this one would share with it.
    #[error(
        "{what} {path} is in use by another conductor{}; {why}: give this one another conductor.{key}",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    InUse {
        what: &'static str,
        path: String,
        holder: Option<u32>,
        why: &'static str,
        key: &'static str,
    },
    #[error(transparent)]
    Claim(ClaimError),
    #[error("cannot prepare state folder {path}: {source}")]
    StateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Dispatch(#[from] DispatchError),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Stops every instance, dependants first, then what they depend on, and
/// waits until none is left.
async fn stop_instances(supervisor: &Supervisor, instances: &CancellationToken) {
    supervisor.stop_all().await;
    instances.cancel();
    supervisor.wait().await;
}

/// How long deliveries in flight may take to finish at shutdown.
const DISPATCH_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

fn state_dir_error(
    state_dir: &std::path::Path,
) -> impl Fn(std::io::Error) -> DaemonError + Copy + '_ {
    move |source| DaemonError::StateDir {
        path: state_dir.to_owned(),
        source,
    }
}

/// Makes `state_dir` passable but not listable (0711), for plugins
/// running as other users to reach their own state folders below it, and
/// takes it for this conductor until the claim drops.
fn prepare_state_dir(state_dir: &std::path::Path) -> Result<claim::Claim, DaemonError> {
    use std::os::unix::fs::PermissionsExt as _;
    let io = state_dir_error(state_dir);
    std::fs::create_dir_all(state_dir).map_err(io)?;
    std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o711)).map_err(io)?;
    claim::claim(state_dir).map_err(|error| {
        in_use(
            error,
            "state folder",
            "its job store would deliver every job twice",
            "state_dir",
        )
    })
}

/// Says which setting to change when another conductor holds what the
/// claim was for.
fn in_use(
    error: ClaimError,
    what: &'static str,
    why: &'static str,
    key: &'static str,
) -> DaemonError {
    match error {
        ClaimError::Held { path, holder } => DaemonError::InUse {
            what,
            path: path.display().to_string(),
            holder,
            why,
            key,
        },
        error => DaemonError::Claim(error),
    }
}

/// Opens the job store in the folder [`prepare_state_dir`] made; its
/// files are the conductor's user's alone.
fn open_store(state_dir: &std::path::Path, jobs: &JobsConfig) -> Result<Store, DaemonError> {
    use std::os::unix::fs::PermissionsExt as _;
    let io = state_dir_error(state_dir);
    let retention = Retention {
        age: jobs.keep_answers,
        bytes: jobs.keep_answers_bytes.as_u64(),
    };
    let path = state_dir.join("jobs.db");
    let store = Store::open(&path, retention)?;
    // Made under an earlier conductor's wider umask, perhaps.
    for suffix in ["", "-wal", "-shm"] {
        let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
        if file.exists() {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
    }
    Ok(store)
}

/// How long open API connections may take to close at shutdown.
const API_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Detects the host's cgroups once, says what it found, and removes what
/// an earlier run left under the root. With `cgroup_policy = "off"` it
/// touches nothing and says once that nothing is confined.
async fn open_cgroups(config: &Config, spawner: &Spawner) -> Result<Cgroups, DaemonError> {
    if config.conductor.cgroup_policy == CgroupPolicy::Off {
        let unenforced: Vec<&str> = config
            .plugins
            .iter()
            .filter(|(_, p)| !p.pool.limits.is_empty())
            .map(|(name, _)| name.as_str())
            .collect();
        tracing::info!(
            ?unenforced,
            "cgroup_policy = \"off\": every instance runs unconfined, no limit is enforced"
        );
        return Ok(Cgroups::off());
    }
    let root = config.conductor.cgroup_root.clone();
    let cgroups = tokio::task::spawn_blocking(move || {
        let mut cgroups = Cgroups::open(&root);
        // Before the clean-up: another conductor's instances are no
        // leftovers.
        cgroups.claim().map_err(|error| {
            in_use(
                error,
                "cgroup root",
                "its instances would be killed as leftovers of an earlier run",
                "cgroup_root",
            )
        })?;
        let leftovers = cgroups.clean_leftovers();
        Ok::<_, DaemonError>((cgroups, leftovers))
    })
    .await
    .map_err(DaemonError::CgroupSetup)??;
    let (cgroups, leftovers) = cgroups;
    let born = births(&cgroups, spawner);
    match cgroups.unavailable() {
        Some(why) => tracing::warn!(setup = %cgroups.setup(), why, "cgroups unavailable"),
        None => tracing::info!(
            setup = %cgroups.setup(),
            root = cgroups.root(),
            leftovers,
            favordynmods = cgroups.favordynmods(),
            born_in_cgroup = born.is_ok(),
            "cgroups ready"
        ),
    }
    if cgroups.setup() == Setup::Unified
        && let Err(why) = &born
    {
        tracing::info!(
            %why,
            "children cannot be born in their cgroup; they join it after the fork"
        );
    }
    if cgroups.unavailable().is_none() && !cgroups.favordynmods() && born.is_err() {
        tracing::info!(
            "cgroup hierarchy mounted without favordynmods: each start waits for an RCU grace \
             period when joining its cgroup (about 6 ms); remount with -o favordynmods \
             (kernel 6.0+) to avoid it"
        );
    }
    Ok(cgroups)
}

/// Whether instances' children are born in their cgroup (v2, clone3
/// with `CLONE_INTO_CGROUP`) instead of migrating into it, or why not.
fn births(cgroups: &Cgroups, spawner: &Spawner) -> Result<(), String> {
    if cgroups.unavailable().is_some() || cgroups.setup() != Setup::Unified {
        return Err("not a cgroup v2 host".into());
    }
    spawner.births_in_cgroup().map_err(str::to_owned)
}

/// Runs until SIGTERM or SIGINT, then stops every instance gracefully and
/// returns once none is left.
pub async fn run(prepared: Prepared) -> Result<(), DaemonError> {
    let Prepared { config, plan } = prepared;
    // Everything the conductor writes (the job store, sockets, locks,
    // credentials, logs it creates) is its user's alone unless it says
    // otherwise. Plugins inherit it.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let runtime_dir = RuntimeDir::prepare(&Layout::new(&config.conductor.runtime_dir))?;
    // Before anything else is touched; plugins running as other users
    // pass through it to their own state folders.
    let _state_dir = prepare_state_dir(&config.conductor.state_dir)?;
    let mut signals = Signals::install()?;
    let daemon = Daemon::start(config, plan, runtime_dir.layout().clone()).await?;
    let signal = signals.until_stop(&daemon.reloader).await;
    tracing::info!(signal, "stopping every instance");
    daemon.stop().await;
    tracing::info!("conductor stopped");
    Ok(())
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, DaemonError> {
        let install = |kind, name| signal(kind).map_err(|e| DaemonError::Signal(name, e));
        Ok(Self {
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
            hup: install(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// Reloads on every SIGHUP; returns the signal that asks to stop.
    async fn until_stop(&mut self, reloader: &Reloader) -> &'static str {
        loop {
            tokio::select! {
                _ = self.term.recv() => return "SIGTERM",
                _ = self.int.recv() => return "SIGINT",
                _ = self.hup.recv() => match reloader.reload().await {
                    Ok(diff) => tracing::info!(?diff, "reloaded on SIGHUP"),
                    Err(error) => tracing::error!(%error, "SIGHUP reload refused"),
                },
            }
        }
    }
}

/// Every running part, with what stops each, in the order it stops.
struct Daemon {
    spawner: Arc<Spawner>,
    cgroups: Arc<Cgroups>,
    metrics: Arc<Metrics>,
    store: Store,
    supervisor: Arc<Supervisor>,
    dispatcher: Arc<Dispatcher>,
    scaler: Arc<Scaler>,
    reloader: Arc<Reloader>,
    health: tonic_health::server::HealthReporter,
    /// Fires on shutdown; every instance token is a child of it.
    instances: CancellationToken,
    dispatching: CancellationToken,
    scaling: CancellationToken,
    /// The API, the metrics endpoint and health aggregation.
    serving: CancellationToken,
    api: tokio::task::JoinSet<()>,
    aggregation: tokio::task::JoinHandle<()>,
    metrics_endpoint: Option<tokio::task::JoinHandle<()>>,
}

impl Daemon {
    /// Builds every component from `plan` and wires each to the narrow
    /// views it asks for (`wiring.rs`).
    async fn start(config: Config, plan: Plan, layout: Layout) -> Result<Self, DaemonError> {
        let spawner = Arc::new(
            Spawner::start(tokio::runtime::Handle::current()).map_err(DaemonError::Spawner)?,
        );
        let cgroups = Arc::new(open_cgroups(&config, &spawner).await?);
        let metrics = Metrics::new()?;
        // Every event is logged and counted where it happens.
        let bus = Bus::new(vec![Arc::new(Recorder::new(metrics.clone()))]);
        let instances = CancellationToken::new();
        let machine = Arc::new(Machine::new());
        let standin = std::env::current_exe()
            .map_err(|e| format!("the conductor's own path: {e}"))
            .and_then(|exe| crate::process::standby::beside(&exe));
        let standin = match standin {
            Ok(path) => Some(path),
            Err(why) => {
                tracing::warn!(
                    %why,
                    "no stand-in binary; restarts will fork and join the cgroup on their path"
                );
                None
            }
        };
        let context = PoolContext {
            standin,
            layout: layout.clone(),
            spawner: spawner.clone(),
            cgroups: cgroups.clone(),
            cgroup_policy: config.conductor.cgroup_policy,
            usage_interval: config.conductor.usage_interval,
            bus: bus.clone(),
            cancel: instances.clone(),
            callers: Callers::default(),
            machine: machine.clone(),
            state_root: config.conductor.state_dir.join("plugins"),
        };
        for warning in &config.warnings {
            tracing::warn!(%warning, "plugin manifest skipped");
        }
        tracing::info!(
            config = %config.file.display(),
            plugins = config.plugins.len(),
            instances = plan.pools.values().map(|p| p.replicas).sum::<u32>(),
            runtime_dir = %layout.root().display(),
            "conductor starting"
        );
        // Before the pools start: the scaler measures their first starts,
        // and health aggregation misses no change.
        let scaler_events = bus.subscribe();
        let health_events = bus.subscribe();
        // Listening before any plugin starts: an early caller waits.
        let plugin_api = api::bind_plugin_api(&layout.plugin_api_socket())?;
        // The store opens beside the pools' first starts, not before them:
        // a first start writes its schema with a few fsyncs that no plugin
        // needs to wait for.
        let opening = {
            let (state_dir, jobs) = (
                config.conductor.state_dir.clone(),
                config.conductor.jobs.clone(),
            );
            tokio::task::spawn_blocking(move || open_store(&state_dir, &jobs))
        };
        let supervisor = Supervisor::start(plan.pools, context);
        let store = match opening
            .await
            .map_err(DaemonError::StoreOpen)
            .and_then(|r| r)
        {
            Ok(store) => store,
            Err(error) => {
                // Nothing of this start stays behind the error.
                stop_instances(&supervisor, &instances).await;
                return Err(error);
            }
        };
        let dispatching = CancellationToken::new();
        let dispatcher = Dispatcher::start(
            store.clone(),
            plan.lanes,
            Arc::new(wiring::Serving(supervisor.clone())),
            layout.clone(),
            bus.clone(),
            dispatching.clone(),
        )
        .await?;
        let scaling = CancellationToken::new();
        let scaler = Scaler::start(
            plan.scalers,
            Arc::new(wiring::Load {
                dispatcher: dispatcher.clone(),
                supervisor: supervisor.clone(),
            }),
            Arc::new(wiring::Pools {
                supervisor: supervisor.clone(),
                machine: machine.clone(),
            }),
            bus.clone(),
            scaler_events,
            scaling.clone(),
        );
        metrics.observe(Arc::new(wiring::Scrape::new(
            &supervisor,
            &dispatcher,
            &scaler,
            machine.clone(),
        )));
        let api_config = config.conductor.api.clone();
        let metrics_config = config.conductor.metrics.clone();
        let access = Arc::new(Access::new(plan.grants));
        let limits = Arc::new(Limits::new(plan.limits));
        let reloader = Arc::new(Reloader::new(
            config,
            Reloaded {
                supervisor: supervisor.clone(),
                dispatcher: dispatcher.clone(),
                scaler: scaler.clone(),
                access: access.clone(),
                limits: limits.clone(),
                bus: bus.clone(),
            },
        ));
        let serving = CancellationToken::new();
        let (health, health_service) = tonic_health::server::health_reporter();
        let aggregation = tokio::spawn(api::health::aggregate(
            supervisor.clone(),
            health_events,
            health.clone(),
            serving.clone(),
        ));
        let metrics_endpoint = match metrics_config.enabled {
            true => {
                let listen = metrics_config.listen;
                let (addr, task) = metrics::serve(metrics.clone(), listen, serving.clone())
                    .await
                    .map_err(|source| DaemonError::Metrics {
                        addr: listen,
                        source,
                    })?;
                tracing::info!(%addr, "metrics listening on http://{addr}/metrics");
                Some(task)
            }
            false => None,
        };
        let parts = api::Parts {
            supervisor: supervisor.clone(),
            dispatcher: dispatcher.clone(),
            scaler: scaler.clone(),
            control: reloader.clone(),
            machine,
        };
        let mut api = api::serve(
            parts,
            health_service,
            &layout.conductor_socket(),
            &api_config,
            serving.clone(),
        )
        .await?;
        let host = HostParts {
            supervisor: supervisor.clone(),
            dispatcher: dispatcher.clone(),
            limits,
            access,
            bus,
            shutdown: serving.clone(),
        };
        let plugin_api = api::serve_plugin_api(host, plugin_api, serving.clone())?;
        api.spawn(async move {
            let _ = plugin_api.await;
        });
        Ok(Self {
            spawner,
            cgroups,
            metrics,
            store,
            supervisor,
            dispatcher,
            scaler,
            reloader,
            health,
            instances,
            dispatching,
            scaling,
            serving,
            api,
            aggregation,
            metrics_endpoint,
        })
    }

    /// Stops everything, each part after what depends on it, and returns
    /// once no child is left.
    async fn stop(mut self) {
        // No scaling decisions while everything stops.
        self.scaling.cancel();
        self.scaler.wait().await;
        self.health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        // Jobs in flight get a moment to finish; the rest stay in the store
        // and are delivered again at the next start.
        self.dispatcher.stop(DISPATCH_DRAIN).await;
        self.dispatching.cancel();
        self.dispatcher.finished().await;
        if let Err(error) = self.store.flush().await {
            tracing::error!(%error, "cannot flush the job store");
        }
        stop_instances(&self.supervisor, &self.instances).await;
        // The API outlives the instances, so watchers see them stop.
        self.serving.cancel();
        let _ = self.aggregation.await;
        let drained = tokio::time::timeout(API_DRAIN, async {
            while self.api.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            self.api.abort_all();
        }
        if let Some(task) = self.metrics_endpoint {
            let _ = tokio::time::timeout(API_DRAIN, task).await;
        }
        self.metrics.shutdown();
        // Only now may the spawner threads end: their exit fires the death
        // signal of every child they forked.
        drop(self.spawner);
        let cgroups = self.cgroups;
        let _ = tokio::task::spawn_blocking(move || cgroups.remove_root()).await;
    }
}
