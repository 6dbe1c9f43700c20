//! The scaler inside the daemon: one task per autoscaled plugin measures
//! a bucket, refits off the async runtime when due, decides with the
//! shared [`Planner`], and sets the replicas. It reads load from a
//! [`LoadSource`] and scales through an [`Actuator`]: it knows neither
//! dispatch nor the supervisor. Which plugins it scales, and how, is the
//! daemon's to say ([`Scaler::configure`]).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::{AutoscaleConfig, Signal};
use super::decision::{Ahead, Decision, Policy};
use super::forecast::Method;
use super::planner::{FitJob, Fitted, Planner, PlannerConfig, glances_per_bucket};
use super::signal::{CapacityEstimate, CpuSignal, JobTotals, JobsSignal, StartTimes};
use crate::events::{AutoscaleDecision, Bus, Event, InstanceEvent, Stamped};

/// Lead time assumed until an instance start was measured.
const UNMEASURED_START: Duration = Duration::from_secs(2);

/// Where the scaler reads a plugin's load.
pub trait LoadSource: Send + Sync {
    /// Running totals of the plugin's jobs; `None` when it has none.
    fn jobs(&self, plugin: &str) -> Option<JobTotals>;
    /// CPU time so far of each live instance, as (index, pid, time);
    /// `None` once the plugin is gone.
    fn cpu(&self, plugin: &str) -> Option<Vec<(u32, u32, Duration)>>;
    /// Resolves once one of the plugin's jobs has had to wait since the
    /// last time this resolved (at once if one did meanwhile); never for a
    /// plugin without jobs.
    fn backlogged<'a>(&'a self, plugin: &'a str) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
}

/// How many replicas of a plugin the host can hold, and what bounds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    pub replicas: u32,
    /// "memory" or "CPU", with the figures, for the log.
    pub by: String,
}

/// How the scaler changes a plugin's replicas.
pub trait Actuator: Send + Sync {
    /// Instances wanted now; `None` once the plugin is gone.
    fn replicas(&self, plugin: &str) -> Option<u32>;
    /// The most replicas the host can hold for `plugin` now, if anything
    /// bounds it.
    fn room(&self, plugin: &str) -> Option<Room>;
    fn scale<'a>(
        &'a self,
        plugin: &'a str,
        replicas: u32,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
}

/// One autoscaled plugin, as the daemon configures it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub config: AutoscaleConfig,
    /// Load of the buckets before this run, oldest first (the history
    /// seed, loaded by the daemon); `NaN` for a gap.
    pub seed: Arc<[f64]>,
    /// Cores one replica may use (its CPU limit, else one), the capacity
    /// of `signal = "cpu"` when none is set.
    pub cores_per_replica: f64,
}

impl Plan {
    /// Whether `other` needs a fresh task (new settings start a new
    /// history). The seed is read at start only.
    fn same(&self, other: &Plan) -> bool {
        self.config == other.config && self.cores_per_replica == other.cores_per_replica
    }
}

/// What GetPlugin and the metrics show of a plugin's scaler.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub min: u32,
    pub max: u32,
    pub signal: Signal,
    pub desired: u32,
    pub load: f64,
    pub ahead: Option<Ahead>,
    /// `NaN` until measured or configured.
    pub capacity: f64,
    pub capacity_measured: bool,
    pub lead: Duration,
    pub model: Option<Method>,
    pub fallback: Option<String>,
    pub reason: String,
    pub decided_at: SystemTime,
    pub history: usize,
    /// What the host could not hold of the last decision, if anything.
    pub capped: Option<String>,
}

pub struct Scaler {
    statuses: Mutex<HashMap<String, Status>>,
    starts: Mutex<HashMap<String, StartTimes>>,
    plans: watch::Sender<BTreeMap<String, Plan>>,
    tasks: TaskTracker,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// What every plugin task uses.
#[derive(Clone)]
struct Reach {
    load: Arc<dyn LoadSource>,
    actuator: Arc<dyn Actuator>,
    bus: Bus,
}

impl Scaler {
    /// Scales every plugin of `plans` until `cancel`. Subscribe before the
    /// pools start (`events`), so their first start-up times count.
    pub fn start(
        plans: BTreeMap<String, Plan>,
        load: Arc<dyn LoadSource>,
        actuator: Arc<dyn Actuator>,
        bus: Bus,
        events: broadcast::Receiver<Arc<Stamped>>,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let scaler = Arc::new(Self {
            statuses: Mutex::new(HashMap::new()),
            starts: Mutex::new(HashMap::new()),
            plans: watch::Sender::new(plans),
            tasks: TaskTracker::new(),
        });
        let reach = Reach {
            load,
            actuator,
            bus,
        };
        scaler
            .tasks
            .spawn(manage(scaler.clone(), reach, events, cancel));
        scaler
    }

    /// Scales exactly `plans` from now on: new plugins get a task, changed
    /// settings a fresh one, removed plugins none.
    pub fn configure(&self, plans: BTreeMap<String, Plan>) {
        self.plans.send_replace(plans);
    }

    pub fn status(&self, plugin: &str) -> Option<Status> {
        lock(&self.statuses).get(plugin).cloned()
    }

    pub fn statuses(&self) -> Vec<(String, Status)> {
        lock(&self.statuses)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Returns once every scaler task has ended (after the cancel).
    pub async fn wait(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn lead(&self, plugin: &str, bucket: Duration) -> Duration {
        let start = lock(&self.starts)
            .get(plugin)
            .and_then(StartTimes::p90)
            .unwrap_or(UNMEASURED_START);
        start + bucket
    }
}

/// Keeps one task per autoscaled plugin in step with the plans, and
/// measures start-up times from lifecycle events.
async fn manage(
    scaler: Arc<Scaler>,
    reach: Reach,
    mut events: broadcast::Receiver<Arc<Stamped>>,
    cancel: CancellationToken,
) {
    let mut plans = scaler.plans.subscribe();
    let mut running: HashMap<String, (Plan, CancellationToken)> = HashMap::new();
    let wanted = plans.borrow_and_update().clone();
    reconcile(&scaler, &reach, &wanted, &mut running, &cancel);
    // Closed only when the conductor is going: no more start times then,
    // but plans may still change until the cancel.
    let mut events_open = true;
    loop {
        tokio::select! {
            event = events.recv(), if events_open => match event {
                Ok(stamped) => {
                    if let Event::Instance {
                        plugin,
                        what: InstanceEvent::Serving { startup, .. },
                        ..
                    } = &stamped.event
                    {
                        lock(&scaler.starts)
                            .entry(plugin.to_string())
                            .or_default()
                            .record(*startup);
                    }
                }
                // A few start times fewer: the percentile survives it.
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => events_open = false,
            },
            changed = plans.changed() => {
                if changed.is_err() {
                    break;
                }
                let wanted = plans.borrow_and_update().clone();
                reconcile(&scaler, &reach, &wanted, &mut running, &cancel);
            }
            () = cancel.cancelled() => break,
        }
    }
    stop(running);
}

fn stop(running: HashMap<String, (Plan, CancellationToken)>) {
    for (_, (_, token)) in running {
        token.cancel();
    }
}

/// Starts, restarts (new settings) and stops plugin tasks to match
/// `wanted`. New settings start a fresh history.
fn reconcile(
    scaler: &Arc<Scaler>,
    reach: &Reach,
    wanted: &BTreeMap<String, Plan>,
    running: &mut HashMap<String, (Plan, CancellationToken)>,
    cancel: &CancellationToken,
) {
    running.retain(|name, (plan, token)| {
        let keep = wanted.get(name).is_some_and(|w| w.same(plan));
        if !keep {
            token.cancel();
            lock(&scaler.statuses).remove(name);
        }
        keep
    });
    for (name, plan) in wanted {
        if running.contains_key(name) {
            continue;
        }
        let config = &plan.config;
        let token = cancel.child_token();
        tracing::info!(
            plugin = name,
            min = config.min,
            max = config.max,
            signal = config.signal.unit(),
            bucket = %humantime::format_duration(config.bucket),
            "autoscaler started"
        );
        scaler.tasks.spawn(scale_plugin(
            scaler.clone(),
            reach.clone(),
            name.clone(),
            plan.clone(),
            token.clone(),
        ));
        running.insert(name.clone(), (plan.clone(), token));
    }
}

/// What a fit came back with: the forecast, how long it took and how many
/// buckets it saw (the history may have grown while it ran).
struct FitDone {
    fitted: Fitted,
    took: Duration,
    points: usize,
}

/// Where a fit runs: a blocking thread, so a long fit never delays a
/// health check.
fn refit(job: FitJob) -> JoinHandle<FitDone> {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let points = job.points();
        let fitted = job.run();
        FitDone {
            fitted,
            took: started.elapsed(),
            points,
        }
    })
}

async fn scale_plugin(
    scaler: Arc<Scaler>,
    reach: Reach,
    name: String,
    plan: Plan,
    cancel: CancellationToken,
) {
    let config = &plan.config;
    let bucket = config.bucket;
    let refit_every =
        ((config.refit_every.as_secs_f64() / bucket.as_secs_f64()).round() as usize).max(1);
    let mut planner = Planner::new(PlannerConfig {
        policy: Policy::from(config),
        window: config.history_buckets(),
        periods: config.period_buckets(),
        refit_every,
        level: config.forecast_level,
    });
    if let Some(path) = &config.history_seed {
        tracing::info!(plugin = name, buckets = plan.seed.len(), seed = %path.display(), "autoscaler history seeded");
    }
    // The seed ends where this run's clock begins.
    for v in plan.seed.iter() {
        planner.observe(Duration::ZERO, *v);
    }
    let mut jobs = JobsSignal::default();
    let mut cpu = CpuSignal::default();
    let mut estimate = CapacityEstimate::default();
    let mut fit: Option<JoinHandle<FitDone>> = None;
    let mut last_reason = String::new();
    let origin = clock();
    let mut tick = tokio::time::interval(bucket);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Only jobs queue: while they do, the backlog and the load are looked
    // at ten times a bucket (at least every 15 s), so a burst or a ramp
    // starts replicas within a glance, not at the bucket's end. A glance
    // that finds the queue empty and the load within the pool stops the
    // glances until dispatch says a job had to wait: an idle lane wakes
    // the scaler only at the bucket's end.
    let watch_backlog = config.signal == Signal::Jobs;
    let mut quiet = false;
    let glance = bucket / glances_per_bucket(bucket);
    let mut backlog = tokio::time::interval(glance);
    backlog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let task = Task {
        scaler: &scaler,
        reach: &reach,
        name: &name,
        config,
    };
    loop {
        let fitted = async {
            match fit.as_mut() {
                Some(handle) => handle.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            // The glance overdue by then comes at once, or a glance's
            // length after the last one.
            () = reach.load.backlogged(&name), if watch_backlog && quiet => {
                quiet = false;
                continue;
            }
            _ = backlog.tick(), if watch_backlog && !quiet => {
                let totals = reach.load.jobs(&name).unwrap_or_default();
                let now = clock();
                let Some(current) = reach.actuator.replicas(&name) else {
                    break;
                };
                let capacity = config.capacity.or(estimate.get()).unwrap_or(f64::NAN);
                let rate = jobs.glance(now, &totals, glance).unwrap_or_else(|| planner.last());
                let lead = scaler.lead(&name, bucket);
                let decision = planner.glance(
                    now.duration_since(origin),
                    rate,
                    totals.queued as f64,
                    capacity,
                    current,
                    lead,
                );
                if totals.queued == 0 && decision.is_none() {
                    quiet = true;
                    continue;
                }
                // One that changes nothing waits for the bucket's report.
                if let Some(decision) = decision.filter(|d| d.desired != d.current) {
                    let measured = config.capacity.is_none();
                    task.act(&planner, decision, lead, measured, &mut last_reason).await;
                }
                continue;
            }
            fitted = fitted => {
                fit = None;
                match fitted {
                    Ok(FitDone { fitted, took, points }) => {
                        planner.install(fitted);
                        let took_ms = took.as_millis() as u64;
                        // As installed: buckets per fitted point, and the
                        // misses its interval was measured from (0: the model's).
                        if let Some(f) = planner.fitted().map(|f| &f.forecast) {
                            let (step, misses) = (f.step, f.measured_from);
                            match f.fallback_reason() {
                                Some(why) => tracing::info!(plugin = name, model = f.method.as_str(), took_ms, points, step, misses, fallback = why.as_str(), "autoscaler forecast fell back to a simpler model"),
                                None => tracing::debug!(plugin = name, model = f.method.as_str(), took_ms, points, step, misses, "autoscaler forecast refitted"),
                            }
                        }
                    }
                    Err(error) => tracing::error!(plugin = name, %error, "autoscaler fit panicked; keeping the previous forecast"),
                }
                continue;
            }
            () = cancel.cancelled() => break,
        }
        let now = clock();
        let measured = match config.signal {
            Signal::Jobs => {
                let totals = reach.load.jobs(&name).unwrap_or_default();
                jobs.bucket(now, totals)
            }
            Signal::Cpu => {
                let Some(usage) = reach.load.cpu(&name) else {
                    break;
                };
                cpu.bucket(now, &usage)
            }
        };
        // The first reading only sets the baseline.
        let Some(measured) = measured else { continue };
        planner.observe(now.duration_since(origin), measured.load);
        let lead = scaler.lead(&name, bucket);
        if fit.is_none()
            && let Some(job) = planner.refit_due(lead)
        {
            fit = Some(refit(job));
        }
        let (capacity, capacity_measured) = match config.capacity {
            Some(c) => (c, false),
            None => match config.signal {
                Signal::Jobs => (estimate.update(measured.capacity).unwrap_or(f64::NAN), true),
                Signal::Cpu => (plan.cores_per_replica, false),
            },
        };
        let Some(current) = reach.actuator.replicas(&name) else {
            break;
        };
        let decision = planner.decide(measured.queued, capacity, current, lead);
        task.act(
            &planner,
            decision,
            lead,
            capacity_measured,
            &mut last_reason,
        )
        .await;
    }
    if let Some(handle) = fit {
        // A fit cannot be interrupted; its thread finishes on its own.
        handle.abort();
    }
}

/// One plugin's scaler as its decisions need it.
struct Task<'a> {
    scaler: &'a Scaler,
    reach: &'a Reach,
    name: &'a str,
    config: &'a AutoscaleConfig,
}

impl Task<'_> {
    /// Holds `decision` to what the host has room for, reports it and
    /// scales the plugin.
    async fn act(
        &self,
        planner: &Planner,
        mut decision: Decision,
        lead: Duration,
        capacity_measured: bool,
        last_reason: &mut String,
    ) {
        let Task {
            scaler,
            reach,
            name,
            config,
        } = *self;
        let current = decision.current;
        // The plan is the load's; whether the host holds it is the host's.
        // Never below what runs: the cap only stops growth.
        let mut capped = None;
        if decision.desired > current
            && let Some(room) = reach.actuator.room(name)
            && decision.desired > room.replicas.max(current)
        {
            let wanted = decision.desired;
            decision.desired = room.replicas.max(current);
            capped = Some((wanted, room));
        }
        report(
            scaler,
            &reach.bus,
            name,
            config,
            planner,
            &decision,
            lead,
            capacity_measured,
            last_reason,
        );
        // Logged only once the status says so: whoever reads the log line
        // and then asks the API sees the same cap.
        if let Some(status) = lock(&scaler.statuses).get_mut(name) {
            status.capped = capped.as_ref().map(|(wanted, room)| {
                format!("{wanted} wanted, {} fit: {}", decision.desired, room.by)
            });
        }
        if let Some((wanted, room)) = &capped {
            tracing::warn!(
                plugin = name,
                wanted,
                held = decision.desired,
                by = room.by,
                "capped by host {}",
                if room.by.starts_with("memory") {
                    "memory"
                } else {
                    "CPU"
                }
            );
        }
        if decision.desired != current
            && let Err(error) = reach.actuator.scale(name, decision.desired).await
        {
            tracing::error!(plugin = name, %error, desired = decision.desired, "autoscaler could not scale");
        }
    }
}

/// The decision as an event (logged by telemetry, at info when it changed
/// something) and the status GetPlugin and the metrics read.
#[allow(clippy::too_many_arguments)]
fn report(
    scaler: &Scaler,
    bus: &Bus,
    name: &str,
    config: &AutoscaleConfig,
    planner: &Planner,
    d: &Decision,
    lead: Duration,
    capacity_measured: bool,
    last_reason: &mut String,
) {
    let unit = config.signal.unit();
    let fitted = planner.fitted().map(|f| &f.forecast);
    let forecast = match d.ahead {
        Some(a) => format!(
            "forecast {:.2} [{:.2}, {:.2}] {unit} within {}",
            a.point,
            a.lower,
            a.upper,
            humantime::format_duration(round_ms(lead))
        ),
        None => "no forecast yet".to_owned(),
    };
    let detail = format!(
        "{}: {} -> {} (recommended {}); load {:.2} {unit}, {forecast}, capacity {:.2} {unit} per replica",
        d.reason, d.current, d.desired, d.recommended, d.needed_now, d.capacity
    );
    let reason = d.reason.to_string();
    // Every decision is published; it is news (logged at info) only when
    // it changes something, so a steady pool does not write a line per
    // bucket.
    let notable = d.desired != d.current || reason != *last_reason;
    last_reason.clone_from(&reason);
    bus.emit(Event::Autoscaled(Box::new(AutoscaleDecision {
        plugin: Arc::from(name),
        from: d.current,
        to: d.desired,
        recommended: d.recommended,
        reason: reason.clone(),
        load: d.needed_now,
        forecast: d.ahead.map(|a| (a.point, a.lower, a.upper)),
        capacity: d.capacity,
        lead,
        model: fitted.map(|f| f.method.as_str()),
        detail,
        notable,
    })));
    lock(&scaler.statuses).insert(
        name.to_owned(),
        Status {
            min: config.min,
            max: config.max,
            signal: config.signal,
            desired: d.desired,
            load: d.needed_now,
            ahead: d.ahead,
            capacity: d.capacity,
            capacity_measured,
            lead,
            model: fitted.map(|f| f.method),
            fallback: fitted.and_then(|f| f.fallback_reason()),
            reason,
            decided_at: SystemTime::now(),
            history: planner.history().len(),
            capped: None,
        },
    );
}

/// The runtime's clock (the wall's in the daemon), which a test can pause
/// and advance.
fn clock() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A jobs lane whose totals the test sets, counting the scaler's reads.
    #[derive(Default)]
    struct Lane {
        totals: Mutex<JobTotals>,
        waited: tokio::sync::Notify,
        reads: std::sync::atomic::AtomicU32,
    }

    impl LoadSource for Lane {
        fn jobs(&self, _: &str) -> Option<JobTotals> {
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(*lock(&self.totals))
        }
        fn cpu(&self, _: &str) -> Option<Vec<(u32, u32, Duration)>> {
            None
        }
        fn backlogged<'a>(&'a self, _: &'a str) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
            Box::pin(self.waited.notified())
        }
    }

    /// A pool that does what it is told and remembers when.
    struct Pool {
        replicas: Mutex<u32>,
        scaled: Mutex<Vec<(tokio::time::Instant, u32)>>,
    }

    impl Actuator for Pool {
        fn replicas(&self, _: &str) -> Option<u32> {
            Some(*lock(&self.replicas))
        }
        fn room(&self, _: &str) -> Option<Room> {
            None
        }
        fn scale<'a>(
            &'a self,
            _: &'a str,
            replicas: u32,
        ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
            *lock(&self.replicas) = replicas;
            lock(&self.scaled).push((tokio::time::Instant::now(), replicas));
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_answered_before_its_bucket_ends() {
        let config = AutoscaleConfig {
            min: 1,
            max: 20,
            capacity: Some(10.0),
            target_utilisation: 0.5,
            ..AutoscaleConfig::default()
        };
        let bucket = config.bucket;
        let plans = BTreeMap::from([(
            "workers".to_owned(),
            Plan {
                config,
                seed: Arc::from(Vec::new()),
                cores_per_replica: 1.0,
            },
        )]);
        let lane = Arc::new(Lane::default());
        let pool = Arc::new(Pool {
            replicas: Mutex::new(1),
            scaled: Mutex::new(Vec::new()),
        });
        let bus = Bus::new(Vec::new());
        let cancel = CancellationToken::new();
        let started = tokio::time::Instant::now();
        let scaler = Scaler::start(
            plans,
            lane.clone(),
            pool.clone(),
            bus.clone(),
            bus.subscribe(),
            cancel.clone(),
        );
        // A steady 4 jobs/s, which one replica carries at the target, for
        // a bucket and a bit.
        for _ in 0..12 {
            lock(&lane.totals).offered += 4;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(lock(&pool.scaled).is_empty(), "{:?}", lock(&pool.scaled));
        // Nothing queued: the first glance found it so and the scaler read
        // the load since only at the buckets' ends (0 s and 10 s).
        let reads = lane.reads.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(reads, 3, "reads of an idle lane in 12 s");
        // 300 jobs at once: half a minute's work for the replica there.
        {
            let mut totals = lock(&lane.totals);
            totals.offered += 300;
            totals.queued = 300;
        }
        lane.waited.notify_one();
        tokio::time::sleep(bucket).await;
        cancel.cancel();
        scaler.wait().await;
        let scaled = lock(&pool.scaled).clone();
        let (at, to) = *scaled.first().expect("the burst was scaled for");
        let after = at - started;
        assert!(to > 1, "{scaled:?}");
        // The bucket under way ends at 20 s; the burst came at 12 s.
        assert!(
            after < Duration::from_secs(13),
            "scaled {after:?} after the start, the burst came at 12 s"
        );
        // Later glances and the bucket's end carried on from there.
        let last = scaled.last().map(|(_, n)| *n);
        let status = scaler.status("workers").expect("status");
        assert_eq!(Some(status.desired), last, "{scaled:?}");
    }
}
