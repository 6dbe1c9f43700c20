//! Plugins that originate work rather than answer it: a bot reading a
//! gateway, a bridge accepting device streams. They run their own loop
//! and hand what arrives to worker pools through the conductor.

use std::future::Future;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::client::{ClientError, Conductor};
use crate::credentials::{CredentialError, credential};
use crate::handshake::Handshake;
use crate::server::{DEFAULT_GRACE, MainLoop, run_inner};
use crate::{Job, Membership, Outcome, Plugin};

/// What the conductor gives a plugin's own loop: when to stop and how
/// long it may take, a health switch, its membership, its credentials and
/// the plugin API.
pub struct Context {
    name: String,
    state_dir: Option<std::path::PathBuf>,
    stop: CancellationToken,
    grace: Arc<Mutex<Option<Duration>>>,
    health: Health,
    members: watch::Receiver<Membership>,
    applied: watch::Sender<u64>,
}

impl Context {
    pub(crate) fn new(
        handshake: &Handshake,
        stop: CancellationToken,
        grace: Arc<Mutex<Option<Duration>>>,
        reporter: HealthReporter,
        (members, applied): (watch::Receiver<Membership>, watch::Sender<u64>),
    ) -> Self {
        Self {
            name: handshake.name.clone(),
            state_dir: handshake.state_dir.clone(),
            stop,
            grace,
            health: Health {
                reporter,
                name: handshake.name.clone(),
                conductor: Conductor::from_env().ok(),
            },
            members,
            applied,
        }
    }

    /// The plugin's name in the conductor's config.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Fires when the plugin must stop: `Shutdown` from the conductor,
    /// SIGTERM or SIGINT, or the conductor's death. Stop taking new work
    /// then, finish what is under way within [`Context::grace`], and
    /// return from the loop.
    pub fn stopping(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// How long the drain may take once [`Context::stopping`] fired: what
    /// the conductor named in `Shutdown`, else [`DEFAULT_GRACE`]. The
    /// process is killed after it.
    pub fn grace(&self) -> Duration {
        self.grace
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(DEFAULT_GRACE)
    }

    /// The switch the conductor's health checks read.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// This instance's place in its pool now.
    pub fn membership(&self) -> Membership {
        *self.members.borrow()
    }

    /// Membership as it changes (with `sharded = true` in the plugin's
    /// config, the conductor tells a running instance when the pool is
    /// scaled): `changed().await`, then read it, give up what is no
    /// longer this instance's share, and say so with
    /// [`Context::membership_applied`].
    pub fn membership_changes(&self) -> watch::Receiver<Membership> {
        self.members.clone()
    }

    /// Says this instance works on `membership` now: it has let go of
    /// what is no longer its share. The conductor waits for this (within
    /// the plugin's `startup_timeout`, else it restarts the instance)
    /// before it starts replicas that take over that share.
    pub fn membership_applied(&self, membership: Membership) {
        self.applied.send_if_modified(|g| {
            let newer = membership.generation > *g;
            if newer {
                *g = membership.generation;
            }
            newer
        });
    }

    /// The plugin's own folder for durable data (`DEMI_STATE_DIRECTORY`):
    /// private to the plugin, shared by its replicas, kept across
    /// restarts of the plugin and of the conductor. `None` when the
    /// conductor did not name one (an older conductor).
    pub fn state_directory(&self) -> Option<&std::path::Path> {
        self.state_dir.as_deref()
    }

    /// A credential by name; see [`credential`].
    pub fn credential(&self, name: &str) -> Result<Vec<u8>, CredentialError> {
        credential(name)
    }

    /// The plugin API: submit jobs, look them up, shared limits.
    pub fn conductor(&self) -> Result<Conductor, ClientError> {
        Conductor::from_env()
    }
}

/// Sets what the conductor's health checks of this instance read, and
/// tells the conductor why (`conductor status` shows the reason). An
/// instance NOT_SERVING for the plugin's `health.failure_threshold`
/// checks in a row is restarted by the conductor, so say NOT_SERVING
/// when a fresh process could help (a wedged connection), and keep
/// SERVING with work paused when it could not.
#[derive(Clone)]
pub struct Health {
    reporter: HealthReporter,
    name: String,
    conductor: Option<Conductor>,
}

impl Health {
    pub async fn serving(&self) {
        self.set(ServingStatus::Serving).await;
        self.report(true, "").await;
    }

    pub async fn not_serving(&self, reason: &str) {
        tracing::warn!(reason, "reporting NOT_SERVING");
        self.set(ServingStatus::NotServing).await;
        self.report(false, reason).await;
    }

    /// Best effort: the health status is what counts; the reason only
    /// explains it.
    async fn report(&self, serving: bool, reason: &str) {
        if let Some(conductor) = &self.conductor
            && let Err(error) = conductor.clone().report_health(serving, reason).await
        {
            tracing::debug!(%error, "cannot tell the conductor why");
        }
    }

    async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        self.reporter
            .set_service_status(self.name.as_str(), status)
            .await;
    }
}

/// Why an origin plugin's loop ended. A plain message (`Err("…".into())`)
/// is a failure the conductor answers with a restart after backoff;
/// [`LoopError::config`] says a restart cannot help (a rejected
/// credential, a setting the platform refuses) and the conductor marks
/// the plugin Failed with the message instead of crash-looping it.
///
/// ```
/// use demi_plugin_sdk::LoopError;
///
/// let retry: LoopError = "gateway unreachable".into();
/// assert!(!retry.is_config());
/// let stop = LoopError::config("the bot token was rejected (close code 4004)");
/// assert!(stop.is_config());
/// assert_eq!(stop.to_string(), "the bot token was rejected (close code 4004)");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct LoopError {
    message: String,
    config: bool,
}

impl LoopError {
    /// A failure that a fresh process will not mend: the process exits
    /// with [`crate::EXIT_CONFIG`] and is not restarted.
    pub fn config(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            config: true,
        }
    }

    /// Whether this error stops the plugin for good.
    pub fn is_config(&self) -> bool {
        self.config
    }

    pub(crate) fn into_serve_error(self) -> crate::ServeError {
        if self.config {
            crate::ServeError::Refused(self.message)
        } else {
            crate::ServeError::Plugin(self.message)
        }
    }
}

impl From<String> for LoopError {
    fn from(message: String) -> Self {
        Self {
            message,
            config: false,
        }
    }
}

impl From<&str> for LoopError {
    fn from(message: &str) -> Self {
        message.to_owned().into()
    }
}

/// The plugin service of an origin plugin: it takes no jobs.
struct Origin;

impl Plugin for Origin {
    fn capabilities(&self) -> Vec<String> {
        Vec::new()
    }

    async fn handle(&self, _job: Job) -> Outcome {
        Outcome::Permanent("this plugin originates work and takes no jobs (jobs = false)".into())
    }
}

/// Runs a plugin that originates work: serves the conductor's side of the
/// contract (health, Describe, Shutdown, membership changes) and runs
/// `main` with a [`Context`] until it returns or the conductor stops the
/// plugin. Returns the exit code for `main`: 1 if `main` failed (the
/// conductor restarts the plugin with backoff), [`crate::EXIT_CONFIG`]
/// when it failed with [`LoopError::config`] or the process was not
/// started by a conductor. Configure it with `jobs = false`.
///
/// A plugin that reads the lines of a file and hands each to a worker
/// pool (`examples/lines.rs`, run end to end by the project's tests):
///
/// ```no_run
#[doc = include_str!("../examples/lines.rs")]
/// ```
pub fn run_origin<F, Fut, E>(main: F) -> ExitCode
where
    F: FnOnce(Context) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<LoopError> + 'static,
{
    run_loop(main, true)
}

/// [`run_origin`] for a plugin that needs time before it can do its work
/// (a bot connecting its shards): the instance is NOT_SERVING ("starting")
/// until `main` calls [`Health::serving`], so the conductor's startup
/// timeout covers the connecting, and a rolling restart moves on only
/// once the new instance is really there.
pub fn run_origin_when_ready<F, Fut, E>(main: F) -> ExitCode
where
    F: FnOnce(Context) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<LoopError> + 'static,
{
    run_loop(main, false)
}

fn run_loop<F, Fut, E>(main: F, serving_at_start: bool) -> ExitCode
where
    F: FnOnce(Context) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<LoopError> + 'static,
{
    let main: crate::server::Main =
        Box::new(move |context| Box::pin(async move { main(context).await.map_err(Into::into) }));
    run_inner(
        Origin,
        Some(MainLoop {
            main,
            serving_at_start,
        }),
    )
}
