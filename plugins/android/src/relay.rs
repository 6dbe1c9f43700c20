//! From a device's message to a job for the worker pool, and from its
//! answer to a row in the device's outbox and a ring on its stream.
//!
//! A message is pending (on disk, with this replica as its owner) from
//! the moment the device is told `Accepted` until its answer is stored;
//! a replica that dies leaves its pending messages to the living, which
//! find the same job again by its idempotency key (`device:message id`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use demi_plugin_sdk::{Answer, ClientError, Conductor, JobStatus, Submit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::notify::{News, Notifier};
use crate::store::{Pending, Store};
use crate::streams::Streams;
use crate::wake::Waker;

/// The longest single wait on a job; waiting goes on past it until the
/// reply timeout.
const WAIT_STEP: Duration = Duration::from_secs(60);
const BACKOFF: Duration = Duration::from_millis(200);

pub struct Relay {
    pub conductor: Conductor,
    pub pool: String,
    pub kind: String,
    pub reply_timeout: Duration,
    pub store: Arc<Store>,
    pub streams: Arc<Streams>,
    pub notifier: Arc<Notifier>,
    /// Wakes devices that are away, when FCM is configured.
    pub waker: Option<Arc<Waker>>,
    /// (device, message id) being answered by this process.
    pub active: Mutex<HashSet<(String, String)>>,
    pub tasks: TaskTracker,
    pub stop: CancellationToken,
}

impl Relay {
    /// Answers a pending message in the background, unless this process
    /// is answering it already.
    pub fn answer_later(self: &Arc<Self>, message: Pending) {
        let key = (message.device.clone(), message.client_id.clone());
        if !self
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone())
        {
            return;
        }
        let relay = self.clone();
        self.tasks.spawn(async move {
            relay.answer(message).await;
            relay
                .active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        });
    }

    async fn answer(&self, message: Pending) {
        let since = UNIX_EPOCH + Duration::from_millis(message.since_ms.max(0) as u64);
        let left = (since + self.reply_timeout)
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let deadline = Instant::now() + left;
        let dead_lettered = |errors: Vec<String>| {
            (
                Vec::new(),
                format!("the message was not answered: {}", errors.join("; ")),
            )
        };
        let (body, failure) = match self.submit(&message, since, deadline).await {
            Err(Stopped) => return,
            Ok(Handed::Failed(failure)) => (Vec::new(), failure),
            Ok(Handed::Answered(answer)) => (answer, String::new()),
            Ok(Handed::DeadLettered(errors)) => dead_lettered(errors),
            // Handed over before (by this replica before a conductor
            // restart, or by one that died): its job is waited for.
            Ok(Handed::Before(job)) => match self.wait(&job, deadline).await {
                Err(Stopped) => return,
                Ok(Some(JobStatus::Completed { answer, .. })) => (answer, String::new()),
                Ok(Some(JobStatus::DeadLettered { errors })) => dead_lettered(errors),
                Ok(other) => {
                    tracing::warn!(job, device = message.device, state = ?other,
                        "no answer within the reply timeout");
                    (
                        Vec::new(),
                        format!(
                            "the message was not answered within {}",
                            humantime::format_duration(self.reply_timeout)
                        ),
                    )
                }
            },
        };
        match self
            .store
            .answer(&message.device, &message.client_id, &body, &failure)
        {
            Ok(Some(_)) => self.deliver(&message.device).await,
            Ok(None) => {}
            // Left pending, owned by this process: answered again by
            // whoever takes it over after this process is gone.
            Err(error) => {
                tracing::error!(%error, device = message.device, "cannot store an answer")
            }
        }
    }

    /// Rings the device's stream, here or on another replica, or wakes
    /// the device when it has none.
    pub async fn deliver(&self, device: &str) {
        if self.streams.wake(device) {
            return;
        }
        self.notifier
            .tell_others(&News::Answer(device.to_owned()))
            .await;
        if let Some(waker) = &self.waker {
            waker.maybe_wake(device).await;
        }
    }

    /// Hands the message over and waits for its answer in one call
    /// (retried while the pool's queue is full or the conductor is away).
    async fn submit(
        &self,
        message: &Pending,
        since: SystemTime,
        deadline: Instant,
    ) -> Result<Handed, Stopped> {
        let mut conductor = self.conductor.clone();
        let mut backoff = BACKOFF;
        loop {
            let submit = Submit::new(&self.pool, &self.kind, message.body.clone())
                .idempotency_key(format!("{}:{}", message.device, message.client_id))
                .attribute("android.device", message.device.clone())
                .attribute("android.message", message.client_id.clone())
                .deadline(since + self.reply_timeout);
            let error = tokio::select! {
                () = self.stop.cancelled() => return Err(Stopped),
                result = conductor.submit_and_wait(submit) => match result {
                    Ok(Answer::Completed(answer)) => return Ok(Handed::Answered(answer)),
                    Ok(Answer::DeadLettered(errors)) => return Ok(Handed::DeadLettered(errors)),
                    Ok(Answer::Duplicate(job)) => return Ok(Handed::Before(job)),
                    Err(error) => error,
                },
            };
            let retry = matches!(&error, ClientError::Rpc(s) if matches!(
                s.code(),
                tonic::Code::ResourceExhausted | tonic::Code::Unavailable | tonic::Code::Unknown
            ));
            if !retry || Instant::now() + backoff > deadline {
                tracing::error!(device = message.device, %error, "message not handed over");
                return Ok(Handed::Failed(format!(
                    "the message could not be handed over: {error}"
                )));
            }
            tokio::select! {
                () = self.stop.cancelled() => return Err(Stopped),
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// The job's end, or None when the deadline comes first.
    async fn wait(&self, job: &str, deadline: Instant) -> Result<Option<JobStatus>, Stopped> {
        let mut conductor = self.conductor.clone();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let state = tokio::select! {
                () = self.stop.cancelled() => return Err(Stopped),
                state = conductor.wait_job(job, left.min(WAIT_STEP)) => state,
            };
            match state {
                Ok(state) if state.is_finished() => return Ok(Some(state)),
                Ok(_) => continue,
                Err(error) => {
                    // The conductor restarting: the job is in its store.
                    tracing::debug!(job, %error, "waiting for the job again");
                    tokio::select! {
                        () = self.stop.cancelled() => return Err(Stopped),
                        () = tokio::time::sleep(BACKOFF) => {}
                    }
                }
            }
        }
    }
}

/// The bridge is stopping: the message stays pending for the next owner.
struct Stopped;

/// What handing a message over came to.
enum Handed {
    Answered(Vec<u8>),
    DeadLettered(Vec<String>),
    /// A job of the same key exists already: its id.
    Before(String),
    /// It could not be handed over; why, for the device.
    Failed(String),
}
