//! Jobs to worker replicas: a bounded queue per plugin, a bulkhead
//! (in-flight limits per plugin and per replica), retries with backoff on
//! another replica, and a durable dead-letter queue.
//!
//! A job is acknowledged only once it is in the store; it leaves the store
//! when a replica answered it or it was dead-lettered. A crash in between
//! means one more delivery of the same id with a higher attempt number:
//! at-least-once, with duplicates a plugin can recognise.
//!
//! Dispatch sees instances through two narrow views: phase changes on the
//! event bus (a replica takes jobs while it is SERVING) and [`Replicas`]
//! to catch up after missed events. Which plugins take jobs, and how, is
//! given by the daemon ([`Dispatcher::configure`]), at start and on every
//! reload.

mod bulkhead;
pub mod config;
mod lane;
mod link;
mod queue;
pub mod retry;
pub mod store;
mod wake;

pub use config::DispatchConfig;
pub use store::Answer;
pub use store::{DeadLetter, StoreError, StoredJob};

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use demi_proto::plugin::v1 as pb;
use demi_proto::trace::TraceParent;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::events::{Bus, Event, InstanceEvent, JobEvent, Phase, Stamped};
use crate::layout::Layout;
use crate::supervisor::config::MAX_PLUGIN_NAME;
use bulkhead::Permit;
use lane::{Lane, NoSlot};
use retry::Verdict;
use store::{Accepted, Found, Store, now_ms};

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("no plugin named {0:?}")]
    NotFound(String),
    #[error("plugin {0:?} does not take jobs (jobs = false, or health = \"none\")")]
    NoJobs(String),
    #[error("the queue of {plugin:?} is full ({capacity} jobs waiting); try again later")]
    QueueFull { plugin: String, capacity: usize },
    #[error(
        "no replica of {plugin:?} has been live for {}; job {job} stays queued and is \
         delivered once one is",
        humantime::format_duration(*waited)
    )]
    NoReplicas {
        plugin: String,
        job: String,
        waited: Duration,
    },
    #[error("{field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the conductor is stopping")]
    Stopping,
}

/// The dispatcher's view of the instances: which serve now.
pub trait Replicas: Send + Sync {
    /// (index, pid) of every SERVING instance of `plugin`.
    fn serving(&self, plugin: &str) -> Vec<(u32, u32)>;
}

/// Every plugin with how it takes jobs; `None`: it takes none.
pub type Plugins = BTreeMap<String, Option<DispatchConfig>>;

/// A job as a submitter hands it in.
#[derive(Debug, Clone, Default)]
pub struct Submission {
    pub plugin: String,
    pub kind: String,
    pub payload: Vec<u8>,
    pub attributes: HashMap<String, String>,
    pub idempotency_key: Option<String>,
    pub deadline: Option<SystemTime>,
    /// The submitter's trace, if it sent one.
    pub trace: Option<TraceParent>,
    /// The plugin that submits it; `None` for an operator. Only it (and
    /// operators) may look the job up.
    pub submitter: Option<String>,
}

/// Proof of acceptance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub id: String,
    /// An earlier job with the same idempotency key was returned instead.
    pub duplicate: bool,
}

/// Running totals of one plugin's jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JobLoad {
    /// Submissions, accepted or refused because the queue was full.
    pub offered: u64,
    pub completed: u64,
    /// Time replicas spent on completed attempts.
    pub busy: Duration,
    pub queued: usize,
    pub slots_per_replica: usize,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    Completed { payload: Vec<u8>, attempts: u32 },
    DeadLettered { errors: Vec<String>, attempts: u32 },
}

/// Where a job is, as a look-up finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Unknown,
    /// Accepted, waiting for a replica or for its next attempt.
    Queued(StoredJob),
    /// On a replica now, in its `attempt`th delivery.
    InFlight {
        job: StoredJob,
        attempt: u32,
    },
    Completed(store::Answer),
    DeadLettered(DeadLetter),
    /// Finished longer ago than answers are kept.
    Expired,
}

impl JobState {
    /// The plugin that submitted the job (`None`: an operator, or the
    /// store no longer knows).
    pub fn submitter(&self) -> Option<&str> {
        match self {
            JobState::Queued(job) | JobState::InFlight { job, .. } => job.submitter.as_deref(),
            JobState::DeadLettered(letter) => letter.job.submitter.as_deref(),
            JobState::Completed(answer) => answer.submitter.as_deref(),
            JobState::Unknown | JobState::Expired => None,
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            JobState::Completed(_) | JobState::DeadLettered(_) | JobState::Expired
        )
    }
}

/// Longest a `WaitJob` waits before it answers the state as it is.
pub const MAX_JOB_WAIT: Duration = Duration::from_secs(300);

type Waiters = HashMap<String, Vec<(u64, oneshot::Sender<Finished>)>>;

/// What a plugin is to dispatch.
#[derive(Clone)]
enum Route {
    Lane(Arc<Lane>),
    /// Known, but it takes no jobs.
    NoJobs,
}

pub struct Dispatcher {
    store: Store,
    replicas: Arc<dyn Replicas>,
    layout: Layout,
    bus: Bus,
    routes: Mutex<HashMap<String, Route>>,
    /// Whoever waits for a job's end, by job id: its submitter, look-ups.
    waiters: Mutex<Waiters>,
    /// Jobs on a replica now, with their attempt number.
    flights: Mutex<HashMap<String, u32>>,
    cancel: CancellationToken,
    /// Every delivery in flight; drained at shutdown.
    tasks: TaskTracker,
    /// Each lane's worker and the replica follower; they end on `cancel`.
    workers: TaskTracker,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a removed lane's queued jobs are dead-lettered.
const REMOVED: &str = "plugin removed";
const NO_LONGER_TAKES_JOBS: &str = "plugin no longer takes jobs";

impl Dispatcher {
    /// Starts dispatching to `plugins`, follows their replicas as they
    /// come and go, and re-queues every job an earlier run accepted and
    /// did not finish.
    pub async fn start(
        store: Store,
        plugins: Plugins,
        replicas: Arc<dyn Replicas>,
        layout: Layout,
        bus: Bus,
        cancel: CancellationToken,
    ) -> Result<Arc<Self>, DispatchError> {
        // Before the lanes read who serves: nothing in between is missed.
        let events = bus.subscribe();
        let dispatcher = Arc::new(Self {
            store,
            replicas,
            layout,
            bus,
            routes: Mutex::new(HashMap::new()),
            waiters: Mutex::new(HashMap::new()),
            flights: Mutex::new(HashMap::new()),
            cancel,
            tasks: TaskTracker::new(),
            workers: TaskTracker::new(),
        });
        dispatcher.configure(plugins).await;
        dispatcher
            .workers
            .spawn(follow_replicas(Arc::downgrade(&dispatcher), events));
        let pending = dispatcher.store.pending().await?;
        if !pending.is_empty() {
            tracing::info!(
                jobs = pending.len(),
                "re-queueing jobs accepted before the last stop"
            );
        }
        for job in pending {
            if let Err((job, refused)) = dispatcher.enqueue(job) {
                let errors = vec![format!("cannot deliver after a restart: {refused}")];
                dispatcher.bury(job, errors).await;
            }
        }
        Ok(dispatcher)
    }

    /// Makes `plugins` the plugins jobs go to: new ones get a lane, changed
    /// settings apply to new deliveries at once, and the queued jobs of a
    /// plugin that is gone (or no longer takes jobs) are dead-lettered,
    /// replayable once it is back. Returns when they are.
    pub async fn configure(self: &Arc<Self>, plugins: Plugins) {
        let mut closed = Vec::new();
        {
            let mut routes = lock(&self.routes);
            routes.retain(|name, route| {
                let keep = matches!(
                    (&*route, plugins.get(name)),
                    (Route::Lane(_), Some(Some(_))) | (Route::NoJobs, Some(_))
                );
                if !keep && let Route::Lane(lane) = route {
                    let why = if plugins.contains_key(name) {
                        NO_LONGER_TAKES_JOBS
                    } else {
                        REMOVED
                    };
                    closed.push((lane.clone(), why));
                }
                keep
            });
            for (name, config) in plugins {
                match (routes.get(&name), config) {
                    (Some(Route::Lane(lane)), Some(config)) => {
                        if *lane.config() != config {
                            tracing::info!(plugin = name, "dispatch settings changed");
                            lane.reconfigure(config);
                        }
                    }
                    (Some(Route::NoJobs), None) => {}
                    (_, Some(config)) => {
                        let lane = Lane::new(&name, config);
                        lane.sync(&self.replicas.serving(&name), &self.layout);
                        self.workers.spawn(work(self.clone(), lane.clone()));
                        routes.insert(name, Route::Lane(lane));
                    }
                    (_, None) => {
                        routes.insert(name, Route::NoJobs);
                    }
                }
            }
        }
        let mut burials = JoinSet::new();
        for (lane, why) in closed {
            let queued = lane.close();
            if !queued.is_empty() {
                tracing::warn!(
                    plugin = &*lane.plugin,
                    jobs = queued.len(),
                    why,
                    "dead-lettering the queued jobs of a plugin that takes no more"
                );
            }
            for job in queued {
                let dispatcher = self.clone();
                burials.spawn(async move { dispatcher.bury(job, vec![why.to_owned()]).await });
            }
        }
        while burials.join_next().await.is_some() {}
    }

    /// The lane of `plugin`.
    fn route(&self, plugin: &str) -> Result<Arc<Lane>, DispatchError> {
        match lock(&self.routes).get(plugin) {
            Some(Route::Lane(lane)) => Ok(lane.clone()),
            Some(Route::NoJobs) => Err(DispatchError::NoJobs(plugin.to_owned())),
            None => Err(DispatchError::NotFound(plugin.to_owned())),
        }
    }

    /// Queues a job the conductor already holds (whatever the bound), or
    /// hands it back with the reason it has nowhere to go.
    #[allow(clippy::result_large_err)] // as `Queue::push`
    fn enqueue(&self, job: StoredJob) -> Result<(), (StoredJob, DispatchError)> {
        match self.route(&job.plugin) {
            Ok(lane) => lane
                .queue
                .push(job)
                .map_err(|job| (job, DispatchError::NotFound(lane.plugin.to_string()))),
            Err(error) => Err((job, error)),
        }
    }

    fn lanes_now(&self) -> Vec<Arc<Lane>> {
        lock(&self.routes)
            .values()
            .filter_map(|route| match route {
                Route::Lane(lane) => Some(lane.clone()),
                Route::NoJobs => None,
            })
            .collect()
    }

    /// What the autoscaler reads of `plugin`'s jobs.
    pub fn load(&self, plugin: &str) -> Option<JobLoad> {
        let lane = self.route(plugin).ok()?;
        Some(JobLoad {
            offered: lane.load.offered.load(Ordering::Relaxed),
            completed: lane.load.completed.load(Ordering::Relaxed),
            busy: Duration::from_micros(lane.load.busy_micros.load(Ordering::Relaxed)),
            queued: lane.queued(),
            slots_per_replica: lane.config().max_in_flight_per_replica,
        })
    }

    /// Resolves once one of `plugin`'s jobs has had to wait (behind
    /// another, or for a replica) since the last such wait was taken;
    /// `None` for a plugin without jobs.
    pub fn backlogged(&self, plugin: &str) -> Option<impl Future<Output = ()> + Send + 'static> {
        let lane = self.route(plugin).ok()?;
        Some(async move { lane.queue.waited().await })
    }

    /// Every lane as (plugin, queued, in flight), for metrics.
    pub fn lanes(&self) -> Vec<(String, usize, usize)> {
        self.lanes_now()
            .iter()
            .map(|l| (l.plugin.to_string(), l.queued(), l.in_flight()))
            .collect()
    }

    /// Accepts a job: answers once it is queued and stored, or at once
    /// with [`DispatchError::QueueFull`].
    pub async fn submit(
        self: &Arc<Self>,
        submission: Submission,
    ) -> Result<Receipt, DispatchError> {
        Ok(self.accept(submission, None).await?.0)
    }

    /// Accepts a job and waits until it completes or is dead-lettered.
    /// Without a deadline of its own it waits at most the plugin's
    /// `wait_without_replicas` while no replica is live, then answers
    /// [`DispatchError::NoReplicas`]; the job stays queued.
    pub async fn submit_and_wait(
        self: &Arc<Self>,
        submission: Submission,
    ) -> Result<(Receipt, Option<Finished>), DispatchError> {
        let bounded = submission.deadline.is_some();
        let (tx, rx) = oneshot::channel();
        let (receipt, lane) = self.accept(submission, Some(tx)).await?;
        if receipt.duplicate {
            return Ok((receipt, None));
        }
        let patience = lane.config().wait_without_replicas;
        let stranded = async {
            match bounded {
                // Its deadline ends the wait (as a dead letter).
                true => std::future::pending().await,
                false => lane.without_replicas_for(patience).await,
            }
        };
        let finished = tokio::select! {
            finished = rx => finished.map_err(|_| DispatchError::Stopping)?,
            () = stranded => {
                self.unwait(&receipt.id, SUBMITTER);
                return Err(DispatchError::NoReplicas {
                    plugin: lane.plugin.to_string(),
                    job: receipt.id,
                    waited: patience,
                });
            }
            () = self.cancel.cancelled() => return Err(DispatchError::Stopping),
        };
        Ok((receipt, Some(finished)))
    }

    async fn accept(
        self: &Arc<Self>,
        submission: Submission,
        waiter: Option<oneshot::Sender<Finished>>,
    ) -> Result<(Receipt, Arc<Lane>), DispatchError> {
        if submission.plugin.is_empty() {
            return Err(DispatchError::InvalidArgument {
                field: "plugin",
                reason: "must name the plugin that does the job".into(),
            });
        }
        check_attributes(&submission.attributes)?;
        check_size(&submission)?;
        for (field, value, most) in [
            ("plugin", &submission.plugin, MAX_PLUGIN_NAME),
            ("kind", &submission.kind, MAX_KIND),
        ] {
            if value.len() > most {
                return Err(DispatchError::InvalidArgument {
                    field,
                    reason: format!("{} bytes; at most {most}", value.len()),
                });
            }
        }
        if submission
            .idempotency_key
            .as_ref()
            .is_some_and(|k| k.len() > MAX_KEY)
        {
            return Err(DispatchError::InvalidArgument {
                field: "idempotency_key",
                reason: format!("at most {MAX_KEY} bytes"),
            });
        }
        let lane = self.route(&submission.plugin)?;
        lane.load.offered.fetch_add(1, Ordering::Relaxed);
        // Reserve the queue's place first: a full queue refuses before
        // anything is written, and memory stays bounded.
        let place = lane
            .queue
            .try_reserve()
            .ok_or_else(|| match lane.is_closed() {
                true => DispatchError::NotFound(submission.plugin.clone()),
                false => DispatchError::QueueFull {
                    plugin: submission.plugin.clone(),
                    capacity: lane.config().queue_capacity,
                },
            })?;
        let trace = submission
            .trace
            .map_or_else(|| TraceParent::new(random), |t| t.child(random));
        let job = StoredJob {
            id: job_id(),
            plugin: submission.plugin,
            kind: submission.kind,
            payload: submission.payload,
            attributes: submission.attributes,
            idempotency_key: submission.idempotency_key.filter(|k| !k.is_empty()),
            deadline_ms: submission
                .deadline
                .and_then(|d| d.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as i64),
            accepted_ms: now_ms(),
            attempts: 0,
            trace: Some(trace.to_string()),
            submitter: submission.submitter,
        };
        let receipt = match self.store.accept(job.clone()).await? {
            Accepted::Duplicate(id) => {
                drop(place);
                Receipt {
                    id,
                    duplicate: true,
                }
            }
            Accepted::New => {
                if let Some(waiter) = waiter {
                    lock(&self.waiters)
                        .entry(job.id.clone())
                        .or_default()
                        .push((SUBMITTER, waiter));
                }
                lane.publish(&self.bus, JobEvent::Submitted);
                let id = job.id.clone();
                // Removed while the job was being stored: it is accepted,
                // so it is dead-lettered like the rest of the queue.
                if let Err(job) = place.fill(job) {
                    self.bury(job, vec![REMOVED.to_owned()]).await;
                }
                Receipt {
                    id,
                    duplicate: false,
                }
            }
        };
        Ok((receipt, lane))
    }

    /// Where job `id` is now.
    pub async fn job(&self, id: &str) -> Result<JobState, DispatchError> {
        Ok(match self.store.find(id).await? {
            Found::Pending(job) => match lock(&self.flights).get(id) {
                Some(&attempt) => JobState::InFlight { job, attempt },
                None => JobState::Queued(job),
            },
            Found::Completed(answer) => JobState::Completed(answer),
            Found::Dead(letter) => JobState::DeadLettered(letter),
            Found::Expired => JobState::Expired,
            Found::Unknown => JobState::Unknown,
        })
    }

    /// [`Dispatcher::job`] once the job has finished, or once `patience`
    /// (at most [`MAX_JOB_WAIT`]) is up.
    pub async fn wait_job(&self, id: &str, patience: Duration) -> Result<JobState, DispatchError> {
        static NEXT_WAITER: AtomicU64 = AtomicU64::new(SUBMITTER + 1);
        let (tx, rx) = oneshot::channel();
        let token = NEXT_WAITER.fetch_add(1, Ordering::Relaxed);
        // Registered before the look-up: a job that ends in between still
        // wakes this wait, and the look-up after it sees the end.
        lock(&self.waiters)
            .entry(id.to_owned())
            .or_default()
            .push((token, tx));
        let state = self.job(id).await;
        if !matches!(&state, Ok(JobState::Queued(_) | JobState::InFlight { .. })) {
            self.unwait(id, token);
            return state;
        }
        let ended = tokio::select! {
            ended = tokio::time::timeout(patience.min(MAX_JOB_WAIT), rx) => ended,
            () = self.cancel.cancelled() => {
                self.unwait(id, token);
                return Err(DispatchError::Stopping);
            }
        };
        if ended.is_err() {
            self.unwait(id, token);
        }
        self.job(id).await
    }

    fn unwait(&self, id: &str, token: u64) {
        let mut waiters = lock(&self.waiters);
        if let Some(list) = waiters.get_mut(id) {
            list.retain(|(t, _)| *t != token);
            if list.is_empty() {
                waiters.remove(id);
            }
        }
    }

    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>, DispatchError> {
        Ok(self.store.dead_letters().await?)
    }

    /// Delivers dead letters again (`None`: all); returns their ids.
    pub async fn replay(
        self: &Arc<Self>,
        ids: Option<Vec<String>>,
    ) -> Result<Vec<String>, DispatchError> {
        let jobs = self.store.replay(ids).await?;
        let mut replayed = Vec::with_capacity(jobs.len());
        for job in jobs {
            replayed.push(job.id.clone());
            if let Err((job, refused)) = self.enqueue(job) {
                self.bury(job, vec![format!("replay: {refused}")]).await;
            }
        }
        Ok(replayed)
    }

    pub async fn purge(&self) -> Result<usize, DispatchError> {
        Ok(self.store.purge().await?)
    }

    /// Stops taking jobs from the queues and waits (bounded) for the
    /// deliveries in flight; what is left stays in the store for next time.
    pub async fn stop(&self, patience: Duration) {
        self.tasks.close();
        let _ = tokio::time::timeout(patience, self.tasks.wait()).await;
    }

    /// Returns once every worker has ended (after the cancel).
    pub async fn finished(&self) {
        self.workers.close();
        self.workers.wait().await;
    }

    /// Dead-letters a job no delivery of this run attempted: it waited
    /// from acceptance until now.
    async fn bury(&self, job: StoredJob, errors: Vec<String>) {
        let waited = waited_since(&job);
        self.bury_after(job, errors, waited).await;
    }

    /// Dead-letters a job that waited `waited` for its first attempt.
    async fn bury_after(&self, job: StoredJob, errors: Vec<String>, waited: Duration) {
        let attempts = job.attempts;
        let plugin: Arc<str> = Arc::from(job.plugin.as_str());
        let id = job.id.clone();
        let letter = DeadLetter {
            job,
            dead_ms: now_ms(),
            errors: errors.clone(),
        };
        if let Err(error) = self.store.dead_letter(letter).await {
            // Still in the jobs table: delivered again at the next start.
            tracing::error!(job = %id, %error, "cannot store a dead letter");
        }
        self.bus.emit(Event::Job {
            plugin,
            what: JobEvent::DeadLettered {
                job: id.clone(),
                attempts,
                errors: errors.clone(),
                waited,
            },
        });
        self.finish(&id, Finished::DeadLettered { errors, attempts });
    }

    fn finish(&self, id: &str, finished: Finished) {
        let Some(waiters) = lock(&self.waiters).remove(id) else {
            return;
        };
        for (_, waiter) in waiters {
            let _ = waiter.send(finished.clone());
        }
    }
}

fn random() -> u64 {
    fastrand::u64(..)
}

// A job's names are looked up, logged and stored: bounded, so neither an
// answer nor the store holds a megabyte of name.
const MAX_KIND: usize = 256;
const MAX_KEY: usize = 256;

/// Attributes travel with the job to every attempt and into the store:
/// bounded, and with keys a reader can tell apart.
const MAX_ATTRIBUTES: usize = 64;
const MAX_ATTRIBUTE_KEY: usize = 128;
const MAX_ATTRIBUTE_VALUE: usize = 4096;

fn check_attributes(attributes: &HashMap<String, String>) -> Result<(), DispatchError> {
    let invalid = |reason: String| DispatchError::InvalidArgument {
        field: "attributes",
        reason,
    };
    if attributes.len() > MAX_ATTRIBUTES {
        return Err(invalid(format!(
            "{} of them; at most {MAX_ATTRIBUTES}",
            attributes.len()
        )));
    }
    for (key, value) in attributes {
        if key.is_empty() || key.len() > MAX_ATTRIBUTE_KEY {
            return Err(invalid(format!(
                "a key is 1 to {MAX_ATTRIBUTE_KEY} bytes; {:?} is {}",
                key.chars().take(32).collect::<String>(),
                key.len()
            )));
        }
        if value.len() > MAX_ATTRIBUTE_VALUE {
            return Err(invalid(format!(
                "the value of {key:?} is {} bytes; at most {MAX_ATTRIBUTE_VALUE}",
                value.len()
            )));
        }
    }
    Ok(())
}

/// Each delivery reaches a plugin as one message: a bigger job would be
/// accepted, then fail at every replica, ending each replica's job stream
/// with the other jobs on it.
const MAX_JOB_MESSAGE: usize = demi_proto::MAX_MESSAGE;
/// What a delivery adds to a job's kind, payload and attributes, at most:
/// the job's id, attempt and deadline, the delivery's tag and traceparent,
/// and the keys and lengths of those fields.
const DELIVERY_FRAMING: usize = 256;
/// What each attribute adds to its key and value, at most: the map
/// entry's key and length, and those of its key and value.
const ATTRIBUTE_FRAMING: usize = 16;

/// Bytes a delivery of `submission` takes at most.
fn delivery_size(submission: &Submission) -> usize {
    let attributes: usize = submission
        .attributes
        .iter()
        .map(|(k, v)| k.len() + v.len() + ATTRIBUTE_FRAMING)
        .sum();
    submission.kind.len() + submission.payload.len() + attributes + DELIVERY_FRAMING
}

fn check_size(submission: &Submission) -> Result<(), DispatchError> {
    let size = delivery_size(submission);
    if size <= MAX_JOB_MESSAGE {
        return Ok(());
    }
    Err(DispatchError::InvalidArgument {
        field: "payload",
        reason: format!(
            "with kind and attributes, the job would reach a plugin as up to {size} bytes; \
             a gRPC server takes at most {MAX_JOB_MESSAGE} (4 MiB) in one message"
        ),
    })
}

/// The waiter token of a job's own submitter (look-ups take others).
const SUBMITTER: u64 = 0;

/// 32 hex digits, milliseconds since the epoch first (as in UUIDv7):
/// ids made close in time sort together, so the store's index on them
/// grows at one end instead of dirtying a random page per job.
fn job_id() -> String {
    let ms = now_ms().max(0) as u128 & ((1 << 48) - 1);
    let noise = (u128::from(random()) << 64 | u128::from(random())) & ((1 << 80) - 1);
    format!("{:032x}", ms << 80 | noise)
}

/// Takes jobs off a lane's queue as the bulkhead lets them through and a
/// replica has room. The job at the front waits there for the replica,
/// so a plugin with none keeps its jobs queued, where the bound, the
/// metrics and the autoscaler see them.
async fn work(dispatcher: Arc<Dispatcher>, lane: Arc<Lane>) {
    loop {
        let permit = tokio::select! {
            permit = lane.bulkhead.acquire() => permit,
            () = lane.closed() => return,
            () = dispatcher.cancel.cancelled() => return,
        };
        let taken = tokio::select! {
            taken = lane.queue.pop() => match taken {
                Some(taken) => taken,
                None => return,
            },
            () = dispatcher.cancel.cancelled() => return,
        };
        let deadline = taken.job().and_then(deadline_of);
        let slot = tokio::select! {
            slot = lane.slot(None, sleep_until(deadline)) => slot,
            // Stopping: the job stays in the store for the next start.
            () = dispatcher.cancel.cancelled() => return,
        };
        let Some(job) = taken.hand_over() else {
            continue;
        };
        match slot {
            Ok(slot) if !dispatcher.tasks.is_closed() => {
                let permit = permit.deliver();
                let delivery = deliver(dispatcher.clone(), lane.clone(), job, permit, slot);
                dispatcher.tasks.spawn(delivery);
            }
            Ok(_) => return,
            Err(NoSlot::GaveUp) => {
                let errors = vec![DEADLINE_WAITING.to_owned()];
                dispatcher.bury(job, errors).await;
            }
            Err(NoSlot::Closed) => {
                dispatcher.bury(job, vec![REMOVED.to_owned()]).await;
                return;
            }
        }
    }
}

const DEADLINE_WAITING: &str = "deadline passed while waiting for a replica";

/// When the job's deadline falls on the runtime's clock.
fn deadline_of(job: &StoredJob) -> Option<tokio::time::Instant> {
    job.deadline_ms.map(|ms| {
        let left = ms.saturating_sub(now_ms()).max(0) as u64;
        tokio::time::Instant::now() + Duration::from_millis(left)
    })
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Delivers one job, starting on `slot`, until it is answered,
/// dead-lettered, or the conductor stops (then it stays in the store).
async fn deliver(
    dispatcher: Arc<Dispatcher>,
    lane: Arc<Lane>,
    job: StoredJob,
    _permit: Permit,
    slot: lane::Slot,
) {
    let mut delivery = Delivery::new(dispatcher, lane, job);
    let mut next = Some(slot);
    let end = loop {
        let slot = match next.take() {
            Some(slot) => slot,
            None => match delivery.wait_for_slot().await {
                Ok(slot) => slot,
                Err(end) => break end,
            },
        };
        match delivery.attempt(slot).await {
            Ok(pause) => {
                if let Err(end) = delivery.pause(pause).await {
                    break end;
                }
            }
            Err(end) => break end,
        }
    };
    if let End::DeadLetter(why) = end {
        delivery.bury(why).await;
    }
}

/// How a delivery ends.
enum End {
    Answered,
    /// The conductor stops: the job stays in the store.
    Stopping,
    /// With the last error line, if the attempts do not say it all.
    DeadLetter(Option<String>),
}

/// One job on its way, and what its attempts have come to.
struct Delivery {
    dispatcher: Arc<Dispatcher>,
    lane: Arc<Lane>,
    job: StoredJob,
    trace: TraceParent,
    deadline: Option<tokio::time::Instant>,
    started: Instant,
    /// From acceptance to `started`: on the wall clock, as acceptance
    /// may have been by an earlier run of the conductor.
    waited: Duration,
    errors: Vec<String>,
    /// Where the last attempt failed: a retry goes elsewhere if it can.
    failed_on: Option<u32>,
}

impl Delivery {
    fn new(dispatcher: Arc<Dispatcher>, lane: Arc<Lane>, job: StoredJob) -> Self {
        let trace = job
            .trace
            .as_deref()
            .and_then(TraceParent::parse)
            .unwrap_or_else(|| TraceParent::new(random));
        let waited = waited_since(&job);
        Self {
            deadline: deadline_of(&job),
            dispatcher,
            lane,
            job,
            trace,
            started: Instant::now(),
            waited,
            errors: Vec::new(),
            failed_on: None,
        }
    }

    /// A slot for the next attempt.
    async fn wait_for_slot(&self) -> Result<lane::Slot, End> {
        let slot = tokio::select! {
            slot = self.lane.slot(self.failed_on, sleep_until(self.deadline)) => slot,
            () = self.dispatcher.cancel.cancelled() => return Err(End::Stopping),
        };
        slot.map_err(|missing| match missing {
            NoSlot::GaveUp => End::DeadLetter(Some(DEADLINE_WAITING.to_owned())),
            NoSlot::Closed => End::DeadLetter(Some(REMOVED.to_owned())),
        })
    }

    /// One attempt on `slot`; the pause before the next, if it failed and
    /// may be tried again.
    async fn attempt(&mut self, slot: lane::Slot) -> Result<Duration, End> {
        let now = tokio::time::Instant::now();
        // A slot free at the deadline still loses to it.
        if self.deadline.is_some_and(|at| at <= now) {
            return Err(End::DeadLetter(Some(DEADLINE_WAITING.to_owned())));
        }
        // Read at every attempt: a reload reaches jobs on their way.
        let config = self.lane.config();
        let job = &mut self.job;
        job.attempts += 1;
        self.dispatcher.store.attempt(&job.id, job.attempts);
        let timeout = match self.deadline {
            Some(at) => config
                .attempt_timeout
                .min(at.saturating_duration_since(now)),
            None => config.attempt_timeout,
        };
        let attempt_started = Instant::now();
        let call = slot.link.handle(request(job), self.trace.child(random));
        lock(&self.dispatcher.flights).insert(job.id.clone(), job.attempts);
        let answer = tokio::select! {
            answer = tokio::time::timeout(timeout, call) => answer.ok(),
            () = self.dispatcher.cancel.cancelled() => None,
        };
        lock(&self.dispatcher.flights).remove(&job.id);
        if answer.is_none() && self.dispatcher.cancel.is_cancelled() {
            return Err(End::Stopping);
        }
        let replica = slot.index;
        drop(slot);
        let (bus, lane) = (&self.dispatcher.bus, &self.lane);
        let attempt = |error: String| {
            format!(
                "attempt {} on {}-{replica}: {error}",
                job.attempts, job.plugin
            )
        };
        match retry::classify(answer, timeout) {
            Verdict::Done(payload) => {
                let busy = attempt_started.elapsed().as_micros() as u64;
                lane.load.busy_micros.fetch_add(busy, Ordering::Relaxed);
                lane.load.completed.fetch_add(1, Ordering::Relaxed);
                let attempts = job.attempts;
                self.dispatcher
                    .store
                    .complete(&job.id, payload.clone(), attempts);
                let waited = self.waited;
                let took = waited + self.started.elapsed();
                lane.publish(bus, JobEvent::Completed { took, waited });
                let answer = Finished::Completed { payload, attempts };
                self.dispatcher.finish(&job.id, answer);
                Err(End::Answered)
            }
            Verdict::Permanent(error) => {
                lane.publish(bus, JobEvent::AttemptFailed);
                self.errors.push(attempt(error));
                Err(End::DeadLetter(None))
            }
            Verdict::Retry(error) => {
                lane.publish(bus, JobEvent::AttemptFailed);
                self.errors.push(attempt(error));
                if job.attempts >= config.max_attempts {
                    let why = format!("gave up after {} attempts", job.attempts);
                    return Err(End::DeadLetter(Some(why)));
                }
                lane.publish(bus, JobEvent::Retried);
                self.failed_on = Some(replica);
                Ok(retry::delay(&config, job.attempts, fastrand::f64()))
            }
        }
    }

    /// Waits `pause` before a retry.
    async fn pause(&self, pause: Duration) -> Result<(), End> {
        tokio::select! {
            () = tokio::time::sleep(pause) => Ok(()),
            // Removed meanwhile: the next wait for a slot says so.
            () = self.lane.closed() => Ok(()),
            () = self.dispatcher.cancel.cancelled() => Err(End::Stopping),
        }
    }

    async fn bury(mut self, why: Option<String>) {
        self.errors.extend(why);
        self.dispatcher
            .bury_after(self.job, self.errors, self.waited)
            .await;
    }
}

/// From the job's acceptance until now, on the wall clock: acceptance may
/// have been by an earlier run of the conductor.
fn waited_since(job: &StoredJob) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(job.accepted_ms).max(0) as u64)
}

/// The job as a replica receives it.
fn request(job: &StoredJob) -> pb::Job {
    pb::Job {
        id: job.id.clone(),
        kind: job.kind.clone(),
        payload: job.payload.clone(),
        attributes: job.attributes.clone(),
        attempt: job.attempts,
        deadline: job.deadline_ms.map(|ms| prost_types::Timestamp {
            seconds: ms.div_euclid(1000),
            nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
        }),
    }
}

/// Keeps each lane's replicas in step with the instances: a replica takes
/// jobs while it is SERVING, from the moment it gets there until it
/// leaves (unhealthy, tripped, stopping or gone).
async fn follow_replicas(
    dispatcher: Weak<Dispatcher>,
    mut events: broadcast::Receiver<Arc<Stamped>>,
) {
    let Some(cancel) = dispatcher.upgrade().map(|d| d.cancel.clone()) else {
        return;
    };
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            () = cancel.cancelled() => return,
        };
        let stamped = match event {
            Ok(stamped) => stamped,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "dispatch missed lifecycle events; resynchronising");
                let Some(dispatcher) = dispatcher.upgrade() else {
                    return;
                };
                for lane in dispatcher.lanes_now() {
                    lane.sync(
                        &dispatcher.replicas.serving(&lane.plugin),
                        &dispatcher.layout,
                    );
                }
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let Event::Instance {
            plugin,
            instance,
            pid,
            what: InstanceEvent::PhaseChanged { from, to },
        } = &stamped.event
        else {
            continue;
        };
        let Some(dispatcher) = dispatcher.upgrade() else {
            return;
        };
        let Ok(lane) = dispatcher.route(plugin) else {
            continue;
        };
        if *to == Phase::Serving
            && let Some(pid) = pid
        {
            lane.add(
                *instance,
                *pid,
                &dispatcher.layout.plugin_socket(plugin, *instance),
            );
        } else if *from == Phase::Serving {
            lane.remove(*instance, *pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    /// The bound holds for the largest framing a delivery can have: every
    /// attribute at its longest, the largest tag, attempt and deadline.
    #[test]
    fn a_delivery_is_never_larger_than_its_bound() {
        let attributes: HashMap<String, String> = (0..MAX_ATTRIBUTES)
            .map(|i| {
                let key = format!("{i:0>width$}", width = MAX_ATTRIBUTE_KEY);
                (key, "v".repeat(MAX_ATTRIBUTE_VALUE))
            })
            .collect();
        let submission = Submission {
            plugin: "p".into(),
            kind: "k".repeat(MAX_KIND),
            payload: vec![7; 1 << 20],
            attributes,
            idempotency_key: None,
            deadline: None,
            trace: None,
            submitter: None,
        };
        let job = StoredJob {
            id: job_id(),
            plugin: submission.plugin.clone(),
            kind: submission.kind.clone(),
            payload: submission.payload.clone(),
            attributes: submission.attributes.clone(),
            idempotency_key: None,
            deadline_ms: Some(i64::MAX / 2),
            accepted_ms: now_ms(),
            attempts: u32::MAX,
            trace: None,
            submitter: None,
        };
        let delivery = pb::Delivery {
            tag: u64::MAX,
            body: Some(pb::delivery::Body::Job(request(&job))),
            traceparent: TraceParent::new(random).to_string(),
        };
        let bound = delivery_size(&submission);
        assert!(
            delivery.encoded_len() <= bound,
            "{} > {bound}",
            delivery.encoded_len()
        );
        // Not so loose that it refuses much a plugin would take.
        assert!(bound - delivery.encoded_len() < 2048, "{bound}");
    }

    #[test]
    fn a_job_past_four_mib_on_the_wire_is_refused_naming_the_limit() {
        let submission = |payload: usize| Submission {
            plugin: "p".into(),
            kind: "resize".into(),
            payload: vec![0; payload],
            attributes: HashMap::from([("size".into(), "large".into())]),
            idempotency_key: None,
            deadline: None,
            trace: None,
            submitter: None,
        };
        let fits = MAX_JOB_MESSAGE - DELIVERY_FRAMING - ATTRIBUTE_FRAMING - 15;
        assert!(check_size(&submission(fits)).is_ok());
        let error = check_size(&submission(fits + 1)).unwrap_err().to_string();
        assert!(
            error.contains("payload") && error.contains("4194305 bytes") && error.contains("4 MiB"),
            "{error}"
        );
    }
}
