//! The scaler inside the daemon: one task per autoscaled plugin measures
//! a bucket, refits off the async runtime when due, decides with the
//! shared [`Planner`], and asks the supervisor for the replicas.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::{AutoscaleConfig, Signal};
use super::decision::{Ahead, Decision, Policy};
use super::forecast::Method;
use super::planner::{Fitted, Planner, PlannerConfig};
use super::signal::{CapacityEstimate, CpuSignal, JobsSignal, StartTimes};
use crate::dispatch::Dispatcher;
use crate::events::{AutoscaleDecision, Event, InstanceEvent, Stamped};
use crate::supervisor::Supervisor;

/// Lead time assumed until an instance start was measured.
const UNMEASURED_START: Duration = Duration::from_secs(2);

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
}

pub struct Scaler {
    supervisor: Arc<Supervisor>,
    dispatcher: Arc<Dispatcher>,
    statuses: Mutex<HashMap<String, Status>>,
    starts: Mutex<HashMap<String, StartTimes>>,
    tasks: TaskTracker,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Scaler {
    /// Follows `events` (subscribed before the pools started, so their
    /// first start-up times count) and scales every autoscaled plugin
    /// until `cancel`.
    pub fn start(
        supervisor: Arc<Supervisor>,
        dispatcher: Arc<Dispatcher>,
        events: broadcast::Receiver<Arc<Stamped>>,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let scaler = Arc::new(Self {
            supervisor,
            dispatcher,
            statuses: Mutex::new(HashMap::new()),
            starts: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
        });
        scaler.tasks.spawn(manage(scaler.clone(), events, cancel));
        scaler
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

/// Keeps one task per autoscaled plugin in step with the config, and
/// measures start-up times from lifecycle events.
async fn manage(
    scaler: Arc<Scaler>,
    mut events: broadcast::Receiver<Arc<Stamped>>,
    cancel: CancellationToken,
) {
    let mut running: HashMap<String, (AutoscaleConfig, CancellationToken)> = HashMap::new();
    reconcile(&scaler, &mut running, &cancel);
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            () = cancel.cancelled() => break,
        };
        match event {
            Ok(stamped) => match &stamped.event {
                Event::Instance {
                    plugin,
                    what: InstanceEvent::Serving { startup, .. },
                    ..
                } => {
                    lock(&scaler.starts)
                        .entry(plugin.to_string())
                        .or_default()
                        .record(*startup);
                }
                Event::Reloaded { .. } => reconcile(&scaler, &mut running, &cancel),
                _ => {}
            },
            Err(broadcast::error::RecvError::Lagged(_)) => {
                reconcile(&scaler, &mut running, &cancel);
            }
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
    for (_, (_, token)) in running {
        token.cancel();
    }
}

/// Starts, restarts (new settings) and stops plugin tasks to match the
/// supervisor's plugins. New settings start a fresh history.
fn reconcile(
    scaler: &Arc<Scaler>,
    running: &mut HashMap<String, (AutoscaleConfig, CancellationToken)>,
    cancel: &CancellationToken,
) {
    let wanted: HashMap<String, AutoscaleConfig> =
        scaler.supervisor.autoscaled().into_iter().collect();
    running.retain(|name, (config, token)| {
        let keep = wanted.get(name) == Some(config);
        if !keep {
            token.cancel();
            lock(&scaler.statuses).remove(name);
        }
        keep
    });
    for (name, config) in wanted {
        if running.contains_key(&name) {
            continue;
        }
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
            name.clone(),
            config.clone(),
            token.clone(),
        ));
        running.insert(name, (config, token));
    }
}

/// Where a fit runs: a blocking thread, so a long fit never delays a
/// health check.
fn refit(job: super::planner::FitJob) -> JoinHandle<Fitted> {
    tokio::task::spawn_blocking(move || job.run())
}

async fn scale_plugin(
    scaler: Arc<Scaler>,
    name: String,
    config: AutoscaleConfig,
    cancel: CancellationToken,
) {
    let bucket = config.bucket;
    let refit_every =
        ((config.refit_every.as_secs_f64() / bucket.as_secs_f64()).round() as usize).max(1);
    let mut planner = Planner::new(PlannerConfig {
        policy: Policy::from(&config),
        window: config.history_buckets(),
        periods: config.period_buckets(),
        refit_every,
        level: config.forecast_level,
    });
    if let Some(path) = &config.history_seed {
        match super::seed::load(path, bucket) {
            Ok(values) => {
                tracing::info!(plugin = name, buckets = values.len(), seed = %path.display(), "autoscaler history seeded");
                // The seed ends where this run's clock begins.
                for v in values {
                    planner.observe(Duration::ZERO, v);
                }
            }
            Err(error) => {
                tracing::warn!(plugin = name, %error, "autoscaler history seed not loaded; starting empty")
            }
        }
    }
    let mut jobs = JobsSignal::default();
    let mut cpu = CpuSignal::default();
    let mut estimate = CapacityEstimate::default();
    let mut fit: Option<JoinHandle<Fitted>> = None;
    let mut last_reason = String::new();
    let origin = Instant::now();
    let mut tick = tokio::time::interval(bucket);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let fitted = async {
            match fit.as_mut() {
                Some(handle) => handle.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            fitted = fitted => {
                fit = None;
                match fitted {
                    Ok(fitted) => {
                        let f = &fitted.forecast;
                        match &f.fallback {
                            Some(why) => tracing::info!(plugin = name, model = f.method.as_str(), took_ms = f.took.as_millis() as u64, points = planner.history().len(), fallback = why.as_str(), "autoscaler forecast fell back to a simpler model"),
                            None => tracing::debug!(plugin = name, model = f.method.as_str(), took_ms = f.took.as_millis() as u64, points = planner.history().len(), "autoscaler forecast refitted"),
                        }
                        planner.install(fitted);
                    }
                    Err(error) => tracing::error!(plugin = name, %error, "autoscaler fit panicked; keeping the previous forecast"),
                }
                continue;
            }
            () = cancel.cancelled() => break,
        }
        let now = Instant::now();
        let measured = match config.signal {
            Signal::Jobs => {
                let totals = scaler.dispatcher.load(&name).unwrap_or_default();
                jobs.bucket(now, totals)
            }
            Signal::Cpu => {
                let Ok(view) = scaler.supervisor.get(&name) else {
                    break;
                };
                let usage: Vec<(u32, u32, Duration)> = view
                    .instances
                    .iter()
                    .filter_map(|(i, s)| Some((*i, s.pid?, s.usage.as_ref()?.cpu)))
                    .collect();
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
                // A replica may use one core unless its limits say otherwise.
                Signal::Cpu => (cpu_capacity(&scaler, &name), false),
            },
        };
        let Some(current) = scaler.supervisor.replicas(&name) else {
            break;
        };
        let decision = planner.decide(measured.queued, capacity, current, lead);
        report(
            &scaler,
            &name,
            &config,
            &planner,
            &decision,
            lead,
            capacity_measured,
            &mut last_reason,
        );
        if decision.desired != current
            && let Err(error) = scaler.supervisor.autoscale(&name, decision.desired).await
        {
            tracing::error!(plugin = name, %error, desired = decision.desired, "autoscaler could not scale");
        }
    }
    if let Some(handle) = fit {
        // A fit cannot be interrupted; its thread finishes on its own.
        handle.abort();
    }
}

fn cpu_capacity(scaler: &Scaler, name: &str) -> f64 {
    scaler
        .supervisor
        .pool_config(name)
        .ok()
        .and_then(|c| c.limits.cpu)
        .unwrap_or(1.0)
}

/// The decision as an event, a log line (when something changed) and the
/// status GetPlugin and the metrics read.
#[allow(clippy::too_many_arguments)]
fn report(
    scaler: &Scaler,
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
    scaler
        .supervisor
        .events()
        .emit(Event::Autoscaled(Box::new(AutoscaleDecision {
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
            fallback: fitted.and_then(|f| f.fallback.clone()),
            reason,
            decided_at: SystemTime::now(),
            history: planner.history().len(),
        },
    );
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}
