//! From a Discord message to a job for the worker pool, and from its
//! answer to a reply in the channel.
//!
//! Exactly once as a user sees it: the job's idempotency key is the
//! message id (a message seen twice — by two sessions during a handoff,
//! or replayed after a resume — is one job), and the reply's nonce comes
//! from the job id with `enforce_nonce`, so a reply posted twice is shown
//! once.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use demi_plugin_sdk::{ClientError, Conductor, JobStatus, Submit, TraceParent};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::owed::Owed;
use crate::rest::{Rest, RestError, nonce};

/// Discord's limit on a message's length, in characters.
const MAX_CONTENT: usize = 2000;
/// The longest single wait on a job; waiting goes on past it until the
/// reply timeout.
const WAIT_STEP: Duration = Duration::from_secs(60);
const SUBMIT_BACKOFF: Duration = Duration::from_millis(200);

/// A message the bot should answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Incoming {
    pub message_id: u64,
    pub channel_id: u64,
    pub guild_id: Option<u64>,
    pub author_id: u64,
    pub author_name: String,
    pub content: String,
    pub shard: u32,
}

/// What became of the messages handed over, for the logs and the tests.
#[derive(Debug, Default)]
pub struct Counts {
    pub submitted: AtomicU64,
    pub replied: AtomicU64,
    pub empty: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub failed: AtomicU64,
}

pub struct Relay {
    conductor: Conductor,
    rest: Arc<Rest>,
    pool: String,
    kind: String,
    reply_timeout: Duration,
    /// Messages being handled by this process: the second session of a
    /// handoff sees the same message, and one task is enough.
    active: Mutex<HashSet<u64>>,
    tasks: TaskTracker,
    /// Messages handed over and not yet answered, on disk.
    owed: Option<Owed>,
    pub counts: Counts,
    stop: tokio_util::sync::CancellationToken,
}

impl Relay {
    pub fn new(
        conductor: Conductor,
        rest: Arc<Rest>,
        config: &crate::config::BotConfig,
        owed: Option<Owed>,
        stop: tokio_util::sync::CancellationToken,
    ) -> Self {
        Self {
            conductor,
            rest,
            pool: config.reply_pool.clone(),
            kind: config.kind.clone(),
            reply_timeout: config.reply_timeout,
            active: Mutex::default(),
            tasks: TaskTracker::new(),
            owed,
            counts: Counts::default(),
            stop,
        }
    }

    /// Hands `message` over and answers it in the background.
    pub fn accept(self: &Arc<Self>, message: Incoming) {
        let fresh = self
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(message.message_id);
        if !fresh {
            return;
        }
        // Written down before anything else, so that a process killed from
        // here on leaves the reply owed rather than forgotten.
        if let Some(owed) = &self.owed
            && let Err(error) = owed.write(&message)
        {
            tracing::error!(%error, message = message.message_id, "cannot write an owed reply down");
        }
        let relay = self.clone();
        self.tasks.spawn(async move {
            let id = message.message_id;
            if relay.answer(message).await == Settled::Yes
                && let Some(owed) = &relay.owed
                && let Err(error) = owed.cross_out(id)
            {
                tracing::warn!(%error, message = id, "cannot cross an owed reply out");
            }
            relay
                .active
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        });
    }

    /// Answers what has been owed on `shards` for at least `older_than`:
    /// replies a replica killed or stopped before it could post them (this
    /// one's predecessor, the shards' last owner, a stand-in). What this
    /// process is answering already is left alone; another live process
    /// answering the same message posts with the same nonce.
    pub fn answer_owed(self: &Arc<Self>, shards: std::ops::Range<u32>, older_than: Duration) {
        let Some(owed) = &self.owed else { return };
        match owed.on_shards(shards.clone(), older_than, self.reply_timeout) {
            Ok((messages, expired)) => {
                if !messages.is_empty() || expired > 0 {
                    tracing::info!(
                        owed = messages.len(),
                        expired,
                        first = shards.start,
                        end = shards.end,
                        "answering replies owed on these shards"
                    );
                }
                for message in messages {
                    self.accept(message);
                }
            }
            Err(error) => tracing::error!(%error, "cannot read the owed replies"),
        }
    }

    /// Waits (up to `within`) for the replies under way.
    pub async fn drain(&self, within: Duration) {
        self.tasks.close();
        if tokio::time::timeout(within, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.tasks.len(),
                "replies still under way at shutdown; their jobs stay in the conductor"
            );
        }
    }

    async fn answer(&self, message: Incoming) -> Settled {
        let deadline = Instant::now() + self.reply_timeout;
        let job = match self.submit(&message, deadline).await {
            Ok(job) => job,
            Err(settled) => return settled,
        };
        let status = self.wait(&job, deadline).await;
        let answer = match status {
            Some(JobStatus::Completed { answer, .. }) => answer,
            Some(JobStatus::DeadLettered { errors }) => {
                let n = self.counts.dead_lettered.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::warn!(
                    job,
                    message = message.message_id,
                    ?errors,
                    dead_lettered = n,
                    "no reply: the job was dead-lettered"
                );
                return Settled::Yes;
            }
            None if self.stop.is_cancelled() => return Settled::No,
            other => {
                self.counts.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(job, message = message.message_id, state = ?other,
                    "no reply: the job did not finish in time");
                return Settled::Yes;
            }
        };
        let content = String::from_utf8_lossy(&answer);
        let content = content.trim();
        if content.is_empty() {
            self.counts.empty.fetch_add(1, Ordering::Relaxed);
            return Settled::Yes;
        }
        let content: String = content.chars().take(MAX_CONTENT).collect();
        match self
            .rest
            .reply(
                message.channel_id,
                message.message_id,
                &content,
                &nonce(&job),
            )
            .await
        {
            Ok(()) => {
                self.counts.replied.fetch_add(1, Ordering::Relaxed);
                Settled::Yes
            }
            Err(RestError::Stopped) => Settled::No,
            Err(error) => {
                self.counts.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(job, message = message.message_id, %error, "reply not posted");
                Settled::Yes
            }
        }
    }

    /// The job's id once the conductor has it; retried while the pool's
    /// queue is full or the conductor is away.
    async fn submit(&self, message: &Incoming, deadline: Instant) -> Result<String, Settled> {
        #[derive(serde::Serialize)]
        struct Payload<'a> {
            #[serde(flatten)]
            message: &'a Incoming,
            traceparent: String,
        }
        let trace = TraceParent::new(|| fastrand::u64(..));
        let payload = Payload {
            message,
            traceparent: trace.to_string(),
        };
        let payload = match serde_json::to_vec(&payload) {
            Ok(p) => p,
            Err(error) => {
                tracing::error!(%error, "cannot encode a message");
                return Err(Settled::Yes);
            }
        };
        let mut conductor = self.conductor.clone();
        let mut backoff = SUBMIT_BACKOFF;
        loop {
            let submit = Submit::new(&self.pool, &self.kind, payload.clone())
                .idempotency_key(message.message_id.to_string())
                .attribute("discord.channel", message.channel_id.to_string())
                .attribute("discord.shard", message.shard.to_string())
                .deadline(SystemTime::now() + self.reply_timeout)
                .trace(Some(trace));
            let error = tokio::select! {
                () = self.stop.cancelled() => return Err(Settled::No),
                result = conductor.submit(submit) => match result {
                    Ok(job) => {
                        self.counts.submitted.fetch_add(1, Ordering::Relaxed);
                        return Ok(job);
                    }
                    Err(error) => error,
                },
            };
            let retry = matches!(&error, ClientError::Rpc(s) if matches!(
                s.code(),
                tonic::Code::ResourceExhausted | tonic::Code::Unavailable | tonic::Code::Unknown
            ));
            if !retry || Instant::now() + backoff > deadline {
                self.counts.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(message = message.message_id, %error, "message not handed over");
                return Err(Settled::Yes);
            }
            tokio::select! {
                () = self.stop.cancelled() => return Err(Settled::No),
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// The job's end, or where it is when the deadline or a stop comes.
    async fn wait(&self, job: &str, deadline: Instant) -> Option<JobStatus> {
        let mut conductor = self.conductor.clone();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let step = left.min(WAIT_STEP);
            let state = tokio::select! {
                () = self.stop.cancelled() => return None,
                state = conductor.wait_job(job, step) => state,
            };
            match state {
                Ok(state) if state.is_finished() => return Some(state),
                Ok(_) => continue,
                Err(error) => {
                    // The conductor restarting: the job is in its store.
                    tracing::debug!(job, %error, "waiting for the job again");
                    tokio::select! {
                        () = self.stop.cancelled() => return None,
                        () = tokio::time::sleep(SUBMIT_BACKOFF) => {}
                    }
                }
            }
        }
    }
}

/// Whether a message is done with (answered, or never to be): only then
/// is it crossed out of the owed ledger. A stop leaves it owed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Yes,
    No,
}
