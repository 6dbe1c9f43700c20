//! Serving the Plugin and Health services on the conductor's socket.

use std::collections::HashMap;
use std::future::Future as _;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use demi_proto::plugin::v1 as pb;
use pb::plugin_server::PluginServer;
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use demi_proto::trace::{TRACEPARENT, TraceParent};

use crate::handshake::{EXIT_CONFIG, Handshake, HandshakeError};
use crate::origin::{Context, LoopError};
use crate::{Job, Membership, Plugin, parent};

/// How long in-flight jobs may run after SIGTERM when the conductor did not
/// name a grace through `Shutdown` first.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// How long closing idle connections may take after the drain.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Answers of a job stream waiting to be written: a conductor that stops
/// reading holds finished jobs here instead of in an ever-growing queue.
const ANSWER_BUFFER: usize = 256;

/// Why [`serve`] stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("cannot serve on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot install the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    /// The plugin's own main loop ([`crate::run_origin`]) failed.
    #[error("{0}")]
    Plugin(String),
    /// The plugin's own main loop refused to go on with what it was given
    /// (see [`crate::LoopError::config`]).
    #[error("{0}")]
    Refused(String),
}

impl ServeError {
    /// The process exit code that tells the conductor what happened:
    /// [`EXIT_CONFIG`] (never restarted) when the launch itself was wrong,
    /// 1 (restarted with backoff) otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ServeError::Handshake(_) | ServeError::Refused(_) => EXIT_CONFIG,
            _ => 1,
        }
    }
}

/// Serves `plugin` until the conductor shuts it down, then returns the exit
/// code for `main`. Prints a one-line reason to stderr on failure.
///
/// The handshake is checked before an async runtime is even built, so a
/// binary run by hand explains itself at once.
pub fn run<P: Plugin>(plugin: P) -> ExitCode {
    run_inner(plugin, None)
}

/// [`run`], with an origin plugin's own loop when there is one.
pub(crate) fn run_inner<P: Plugin>(plugin: P, main: Option<MainLoop>) -> ExitCode {
    let result = Handshake::from_env()
        .map_err(ServeError::from)
        .and_then(|handshake| {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(ServeError::Runtime)?
                .block_on(serve_inner(plugin, handshake, main))
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let program = std::env::args()
                .next()
                .and_then(|p| Some(std::path::Path::new(&p).file_name()?.to_str()?.to_owned()))
                .unwrap_or_else(|| "plugin".into());
            eprintln!("{program}: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// Reads the handshake from the environment and serves `plugin`, for
/// plugins that own their runtime. See [`run`].
pub async fn serve<P: Plugin>(plugin: P) -> Result<(), ServeError> {
    serve_with(plugin, Handshake::from_env()?).await
}

/// Serves `plugin` on the socket named by `handshake` until `Shutdown`,
/// SIGTERM, SIGINT or the death of the parent process.
pub async fn serve_with<P: Plugin>(plugin: P, handshake: Handshake) -> Result<(), ServeError> {
    serve_inner(plugin, handshake, None).await
}

/// An origin plugin's own loop, started once the plugin serves.
/// An origin plugin's own loop, and whether the instance is SERVING
/// before the loop says so.
pub(crate) struct MainLoop {
    pub main: Main,
    pub serving_at_start: bool,
}

pub(crate) type Main = Box<
    dyn FnOnce(Context) -> Pin<Box<dyn std::future::Future<Output = Result<(), LoopError>> + Send>>
        + Send,
>;

/// Serves `plugin`; with `main`, also runs it as the plugin's own loop
/// (see [`crate::run_origin`]): the drain waits for it within the grace,
/// and its end ends the plugin.
pub(crate) async fn serve_inner<P: Plugin>(
    plugin: P,
    handshake: Handshake,
    main: Option<MainLoop>,
) -> Result<(), ServeError> {
    let listener = bind(&handshake.socket)?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(|source| ServeError::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|source| ServeError::Signal {
        signal: "SIGINT",
        source,
    })?;

    let (health, health_service) = tonic_health::server::health_reporter();
    if main.as_ref().is_none_or(|m| m.serving_at_start) {
        health
            .set_service_status(handshake.name.as_str(), ServingStatus::Serving)
            .await;
    } else {
        mark_not_serving(&health, &handshake.name).await;
    }

    // `stop` begins the drain (new jobs refused, health NOT_SERVING);
    // `close` ends the server once in-flight jobs are done.
    let stop = CancellationToken::new();
    let close = CancellationToken::new();
    let in_flight = TaskTracker::new();
    let grace = Arc::new(Mutex::new(None));
    let (membership, members) = watch::channel(Membership {
        index: handshake.instance,
        replicas: handshake.replicas,
        generation: 0,
    });
    // Only a plugin with its own loop can act on a new membership; for
    // the rest, UNIMPLEMENTED tells the conductor to restart them with it.
    let (applied, applied_rx) = watch::channel(0u64);
    let membership = main.is_some().then_some(Members {
        current: membership,
        applied: applied_rx,
    });
    let service = PluginService {
        work: Work {
            plugin: Arc::new(plugin),
            stop: stop.clone(),
            close: close.clone(),
            in_flight: in_flight.clone(),
        },
        name: handshake.name.clone(),
        protocol_version: handshake.protocol_version,
        grace: grace.clone(),
        health: health.clone(),
        membership,
    };
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(PluginServer::new(service))
        .serve_with_incoming_shutdown(
            UnixListenerStream::new(listener),
            close.clone().cancelled_owned(),
        );
    tokio::pin!(server);

    let (ended_tx, mut ended) = tokio::sync::oneshot::channel();
    if let Some(MainLoop { main, .. }) = main {
        let context = Context::new(
            &handshake,
            stop.clone(),
            grace.clone(),
            health.clone(),
            (members, applied),
        );
        in_flight.spawn(async move {
            let _ = ended_tx.send(main(context).await);
        });
    }
    let mut failed = None;
    let parent_gone = tokio::select! {
        result = &mut server => {
            remove_socket(&handshake.socket);
            return result.map_err(ServeError::from);
        }
        _ = stop.cancelled() => false,
        _ = sigterm.recv() => false,
        _ = sigint.recv() => false,
        _ = parent::exited() => true,
        Ok(result) = &mut ended => {
            failed = result.err();
            false
        }
    };
    mark_not_serving(&health, &handshake.name).await;
    stop.cancel();
    in_flight.close();
    // Nobody is left to read results once the conductor is gone, so
    // in-flight work is abandoned rather than drained.
    if !parent_gone {
        let grace = lock(&grace).unwrap_or(DEFAULT_GRACE);
        let drained = tokio::time::timeout(grace, in_flight.wait()).await;
        if drained.is_err() {
            tracing::warn!(?grace, "in-flight jobs outlived the grace; leaving anyway");
        }
    }
    close.cancel();
    // Connections are idle now; closing them takes one round trip.
    let result = tokio::time::timeout(CLOSE_TIMEOUT, &mut server).await;
    remove_socket(&handshake.socket);
    if let Ok(Err(message)) = ended.try_recv() {
        failed.get_or_insert(message);
    }
    if let Some(error) = failed {
        return Err(error.into_serve_error());
    }
    match result {
        Ok(served) => served.map_err(ServeError::from),
        Err(_) => Ok(()),
    }
}

fn bind(path: &std::path::Path) -> Result<UnixListener, ServeError> {
    // A socket file left by a crashed predecessor makes bind fail with
    // EADDRINUSE; only a socket is removed, never a regular file.
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| ServeError::Bind {
        path: path.to_owned(),
        source,
    })
}

fn remove_socket(path: &std::path::Path) {
    let _ = std::fs::remove_file(path);
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Both locks guard a value written whole (the grace, a map of tokens)
    // with no await or panic mid-update: a poisoned one is still sound.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn mark_not_serving(health: &HealthReporter, name: &str) {
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(name, ServingStatus::NotServing)
        .await;
}

/// What both job entry points share: the plugin and the drain's state.
struct Work<P> {
    plugin: Arc<P>,
    /// Cancelled when the drain begins: new jobs are refused.
    stop: CancellationToken,
    /// Cancelled when the drain is over: job streams end.
    close: CancellationToken,
    in_flight: TaskTracker,
}

impl<P> Clone for Work<P> {
    fn clone(&self) -> Self {
        Self {
            plugin: self.plugin.clone(),
            stop: self.stop.clone(),
            close: self.close.clone(),
            in_flight: self.in_flight.clone(),
        }
    }
}

const SHUTTING_DOWN: &str = "plugin is shutting down";

/// What an answer adds to its result's job id, payload and error, at
/// most: the tag, the outcome, and the keys and lengths of every field.
const ANSWER_FRAMING: usize = 64;

/// A result as sent, or, when a conductor could not read it, a permanent
/// failure saying so: an answer past the limit would end the job stream
/// it travels on, failing every job on it, and would not fit the next
/// time either.
fn fitting(result: pb::JobResult) -> pb::JobResult {
    let content = result.payload.len() + result.error.len();
    if result.job_id.len() + content + ANSWER_FRAMING <= demi_proto::MAX_MESSAGE {
        return result;
    }
    tracing::warn!(
        job = %result.job_id,
        bytes = content,
        "answer too big for the conductor: the job fails instead"
    );
    let reason = format!(
        "the answer takes {content} bytes; a conductor reads at most {} (4 MiB) in one message: \
         pass large data by reference",
        demi_proto::MAX_MESSAGE
    );
    crate::Outcome::Permanent(reason).into_result(result.job_id)
}

impl<P: Plugin> Work<P> {
    /// Runs one job inside a span that carries the job and its trace, so
    /// the plugin's own events inside `handle` say which job they are for.
    async fn run(&self, job: pb::Job, trace: Option<TraceParent>) -> pb::JobResult {
        let mut job = Job::from(job);
        job.trace = trace;
        let id = job.id.clone();
        let span = tracing::info_span!(
            "handle",
            job = %id,
            attempt = job.attempt,
            trace_id = trace.map(|t| t.trace_id_hex()).unwrap_or_default()
        );
        let outcome = tracing::Instrument::instrument(self.plugin.handle(job), span).await;
        fitting(outcome.into_result(id))
    }

    /// Reads one job stream: each job runs as its own task (tracked, so the
    /// drain waits for it) and answers on `answers` when done.
    async fn relay(
        self,
        mut deliveries: Streaming<pb::Delivery>,
        answers: mpsc::Sender<pb::Answer>,
    ) {
        use pb::delivery::Body;
        // A token per running job, so a `cancel` can stop it.
        let running: Arc<Mutex<HashMap<u64, CancellationToken>>> = Arc::default();
        loop {
            let delivery = tokio::select! {
                delivery = deliveries.message() => match delivery {
                    Ok(Some(delivery)) => delivery,
                    // The conductor closed the stream or the connection
                    // broke: nobody is left waiting for these answers.
                    Ok(None) | Err(_) => break,
                },
                () = self.close.cancelled() => break,
            };
            let tag = delivery.tag;
            match delivery.body {
                Some(Body::Job(job)) if self.stop.is_cancelled() => {
                    let result =
                        crate::Outcome::Retryable(SHUTTING_DOWN.into()).into_result(job.id);
                    let _ = answers
                        .send(pb::Answer {
                            tag,
                            result: Some(result),
                        })
                        .await;
                }
                Some(Body::Job(job)) => {
                    let cancel = CancellationToken::new();
                    lock(&running).insert(tag, cancel.clone());
                    let trace = TraceParent::parse(&delivery.traceparent);
                    let (work, answers, running) = (self.clone(), answers.clone(), running.clone());
                    self.in_flight.spawn(async move {
                        let result = tokio::select! {
                            result = work.run(job, trace) => Some(result),
                            () = cancel.cancelled() => None,
                        };
                        lock(&running).remove(&tag);
                        if let Some(result) = result {
                            let _ = answers
                                .send(pb::Answer {
                                    tag,
                                    result: Some(result),
                                })
                                .await;
                        }
                    });
                }
                Some(Body::Cancel(_)) => {
                    if let Some(cancel) = lock(&running).remove(&tag) {
                        cancel.cancel();
                    }
                }
                None => {}
            }
        }
        for (_, cancel) in lock(&running).drain() {
            cancel.cancel();
        }
    }
}

struct PluginService<P> {
    work: Work<P>,
    name: String,
    protocol_version: u32,
    grace: Arc<Mutex<Option<Duration>>>,
    health: HealthReporter,
    /// Where membership changes go, for a plugin that acts on them.
    membership: Option<Members>,
}

/// A membership change goes out on `current`; the plugin says on
/// `applied` (the generation) when it has acted on it.
struct Members {
    current: watch::Sender<Membership>,
    applied: watch::Receiver<u64>,
}

type AnswerStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::Answer, Status>> + Send>>;

/// A job stream's answers, ending when they run out or at `closed`.
struct Answers {
    pending: mpsc::Receiver<pb::Answer>,
    closed: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl tokio_stream::Stream for Answers {
    type Item = Result<pb::Answer, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.closed.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(None);
        }
        self.pending.poll_recv(cx).map(|answer| answer.map(Ok))
    }
}

#[tonic::async_trait]
impl<P: Plugin> pb::plugin_server::Plugin for PluginService<P> {
    async fn describe(
        &self,
        _request: Request<pb::DescribeRequest>,
    ) -> Result<Response<pb::DescribeResponse>, Status> {
        Ok(Response::new(pb::DescribeResponse {
            name: self.name.clone(),
            version: self.work.plugin.version(),
            protocol_version: self.protocol_version,
            capabilities: self.work.plugin.capabilities(),
        }))
    }

    async fn handle(&self, request: Request<pb::Job>) -> Result<Response<pb::JobResult>, Status> {
        if self.work.stop.is_cancelled() {
            // UNAVAILABLE tells the conductor to deliver the job elsewhere.
            return Err(Status::unavailable(SHUTTING_DOWN));
        }
        // Counts as in flight until the result is built, so a drain waits for it.
        let _in_flight = self.work.in_flight.token();
        let trace = request
            .metadata()
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceParent::parse);
        let result = self.work.run(request.into_inner(), trace).await;
        Ok(Response::new(result))
    }

    type HandleStreamStream = AnswerStream;

    async fn handle_stream(
        &self,
        request: Request<Streaming<pb::Delivery>>,
    ) -> Result<Response<AnswerStream>, Status> {
        if self.work.stop.is_cancelled() {
            return Err(Status::unavailable(SHUTTING_DOWN));
        }
        let (answers, pending) = mpsc::channel(ANSWER_BUFFER);
        // The relay ends with the stream or at `close`; its jobs are tracked
        // by `in_flight`, which the drain waits for.
        tokio::spawn(self.work.clone().relay(request.into_inner(), answers));
        // After the drain, the stream ends even if an abandoned job still
        // holds a sender, so the server can close.
        let answers = Answers {
            pending,
            closed: Box::pin(self.work.close.clone().cancelled_owned()),
        };
        Ok(Response::new(Box::pin(answers)))
    }

    async fn shutdown(
        &self,
        request: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        let grace = request
            .into_inner()
            .grace
            .and_then(|g| Duration::try_from(g).ok())
            .unwrap_or(DEFAULT_GRACE);
        *lock(&self.grace) = Some(grace);
        mark_not_serving(&self.health, &self.name).await;
        self.work.stop.cancel();
        Ok(Response::new(pb::ShutdownResponse {}))
    }

    async fn membership_changed(
        &self,
        request: Request<pb::Membership>,
    ) -> Result<Response<pb::MembershipChangedResponse>, Status> {
        let Some(membership) = &self.membership else {
            return Err(Status::unimplemented(
                "membership changes restart this plugin",
            ));
        };
        let new = Membership::from_wire(request.get_ref());
        // A late notice never undoes a newer one.
        membership.current.send_if_modified(|current| {
            let newer = new.generation > current.generation;
            if newer {
                *current = new;
            }
            newer
        });
        // Answered once the plugin has handed over what is no longer its
        // share: only then does the conductor start the replicas that take
        // it. (The conductor's deadline bounds the wait.)
        let mut applied = membership.applied.clone();
        if applied.wait_for(|g| *g >= new.generation).await.is_err() {
            return Err(Status::unavailable("the plugin is stopping"));
        }
        Ok(Response::new(pb::MembershipChangedResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    /// Bytes the answer carrying `result` takes, with the largest tag.
    fn sent(result: &pb::JobResult) -> usize {
        pb::Answer {
            tag: u64::MAX,
            result: Some(result.clone()),
        }
        .encoded_len()
    }

    #[test]
    fn an_answer_a_conductor_cannot_read_fails_its_job_instead() {
        let ok = |payload: usize, error: usize| pb::JobResult {
            job_id: "0".repeat(32),
            outcome: pb::job_result::Outcome::Ok as i32,
            payload: vec![b'x'; payload],
            error: "e".repeat(error),
        };
        let room = demi_proto::MAX_MESSAGE - 32 - ANSWER_FRAMING;
        // The largest that passes is sent as it is, and a conductor reads
        // it, with little room to spare.
        let largest = ok(room, 0);
        assert_eq!(fitting(largest.clone()), largest);
        let size = sent(&largest);
        assert!(size <= demi_proto::MAX_MESSAGE, "{size}");
        assert!(demi_proto::MAX_MESSAGE - size < ANSWER_FRAMING, "{size}");
        assert_eq!(fitting(ok(room / 2, room / 2)), ok(room / 2, room / 2));
        // One byte more, in the payload or the error: the job fails, for
        // good, saying why.
        for too_big in [ok(room + 1, 0), ok(0, room + 1)] {
            let failed = fitting(too_big);
            assert_eq!(
                (failed.job_id.as_str(), failed.outcome, failed.payload.len()),
                (
                    "0".repeat(32).as_str(),
                    pb::job_result::Outcome::Permanent as i32,
                    0
                )
            );
            assert!(
                failed.error.contains(&(room + 1).to_string()) && failed.error.contains("4 MiB"),
                "{}",
                failed.error
            );
        }
    }
}
