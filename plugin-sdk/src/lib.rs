//! Write a [Demi Conductor](https://github.com/demi-conductor) plugin in a few lines of Rust.
//!
//! A plugin is a process the conductor launches, supervises and sends jobs
//! to over gRPC on a Unix socket. This crate does the whole handshake for
//! you: it checks that the conductor launched the process, binds the socket
//! the conductor named, serves the `demi.plugin.v1.Plugin` and
//! `grpc.health.v1.Health` services, reports SERVING, drains gracefully on
//! `Shutdown` or SIGTERM, and exits by itself when the conductor dies.
//! Jobs arrive through your one `handle` whether the conductor sends them
//! as `Handle` calls or on a `HandleStream` (the cheaper way it uses by
//! default); a job the conductor stops waiting for is cancelled by
//! dropping its future.
//!
//! Implement [`Plugin`] and hand it to [`run`]:
//!
//! ```no_run
//! use demi_plugin_sdk::{Job, Outcome, Plugin};
//!
//! struct Upper;
//!
//! impl Plugin for Upper {
//!     async fn handle(&self, job: Job) -> Outcome {
//!         match String::from_utf8(job.payload) {
//!             Ok(text) => Outcome::Ok(text.to_uppercase().into_bytes()),
//!             Err(_) => Outcome::Permanent("payload is not UTF-8".into()),
//!         }
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     demi_plugin_sdk::run(Upper)
//! }
//! ```
//!
//! A plugin can hand work to other plugins through the conductor that
//! launched it, with [`Conductor::from_env`] and [`Submit`], look its jobs
//! up, read its pool's [`Membership`] and wait on limits its replicas
//! share ([`Conductor::acquire`]); its secrets come as files
//! ([`credential`]).
//!
//! A plugin that originates work (a bot on a gateway, a bridge for
//! devices) takes no jobs: it runs its own loop with [`run_origin`],
//! which hands it a [`Context`] that says when to stop.
//!
//! Run by hand, such a binary prints one line saying it must be started by
//! the conductor and exits with [`EXIT_CONFIG`] (78), which the conductor
//! never restarts. The protocol itself is described in `proto/README.md`
//! for authors in other languages.

mod client;
mod credentials;
mod handshake;
mod job;
mod membership;
mod origin;
mod parent;
mod server;

pub use client::{Answer, ClientError, Conductor, DependencyWatch, Grant, JobStatus, Submit};
pub use credentials::{CredentialError, credential};
pub use handshake::{
    CONDUCTOR_SOCKET_KEY, CONDUCTOR_TOKEN_KEY, CREDENTIALS_DIRECTORY_KEY, EXIT_CONFIG, Handshake,
    HandshakeError, INSTANCE_KEY, MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE, NAME_KEY,
    PROTOCOL_VERSIONS_KEY, REPLICAS_KEY, SOCKET_KEY,
};
pub use job::{Job, Outcome, TraceParent};
pub use membership::Membership;
pub use origin::{Context, Health, LoopError, run_origin, run_origin_when_ready};
pub use server::{DEFAULT_GRACE, ServeError, run, serve, serve_with};

use std::future::Future;

/// What a plugin does. Only [`Plugin::handle`] is required.
///
/// The conductor calls `handle` concurrently from many connections, so the
/// implementation must be `Sync`; keep per-job state in the future.
///
/// ```
/// use demi_plugin_sdk::{Job, Outcome, Plugin};
///
/// struct Echo;
///
/// impl Plugin for Echo {
///     fn version(&self) -> String {
///         "1.2.0".into()
///     }
///     async fn handle(&self, job: Job) -> Outcome {
///         Outcome::Ok(job.payload)
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let job = Job { payload: b"hi".to_vec(), ..Job::default() };
/// assert_eq!(Echo.handle(job).await, Outcome::Ok(b"hi".to_vec()));
/// assert_eq!(Echo.version(), "1.2.0");
/// # });
/// ```
pub trait Plugin: Send + Sync + 'static {
    /// The plugin's own version, reported by `Describe`.
    fn version(&self) -> String {
        "0.0.0".into()
    }

    /// What the plugin can do, reported by `Describe`. `"jobs"` tells the
    /// conductor it may route jobs here.
    fn capabilities(&self) -> Vec<String> {
        vec!["jobs".into()]
    }

    /// Does one job. Return [`Outcome::Retryable`] for passing failures
    /// (the conductor retries, perhaps on another replica) and
    /// [`Outcome::Permanent`] when retrying cannot help.
    fn handle(&self, job: Job) -> impl Future<Output = Outcome> + Send;
}
