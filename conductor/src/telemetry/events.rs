//! Named lifecycle events of instances: one fixed message each, variables in
//! fields, emitted from this one place so the log and the event stream
//! (`WatchEvents`, health aggregation) always agree.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use opentelemetry::KeyValue;
use tokio::sync::broadcast;

use super::metrics::Metrics;
use crate::supervisor::breaker::Breaker;
use crate::supervisor::instance::{
    Event, ExitReason, IllegalTransition, Instance, State, StopCause, Then,
};

/// What happened, as the admin API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Started,
    Serving,
    Unhealthy,
    BreakerTripped,
    Exited,
    Backoff,
    Failed,
    Stopped,
    Scaled,
    Reloaded,
    /// An autoscaler decision.
    Autoscale,
}

/// One lifecycle event.
#[derive(Debug, Clone, PartialEq)]
pub struct Lifecycle {
    pub at: SystemTime,
    pub plugin: Arc<str>,
    pub instance: u32,
    pub kind: Kind,
    pub pid: Option<u32>,
    pub detail: String,
}

/// Everyone who wants lifecycle events subscribes here. A slow subscriber
/// loses the oldest events (and is told so), never slows an instance.
#[derive(Debug, Clone)]
pub struct EventBus(broadcast::Sender<Lifecycle>);

/// Events kept for slow subscribers.
const BUS_CAPACITY: usize = 4096;

impl Default for EventBus {
    fn default() -> Self {
        Self(broadcast::channel(BUS_CAPACITY).0)
    }
}

impl EventBus {
    pub fn subscribe(&self) -> broadcast::Receiver<Lifecycle> {
        self.0.subscribe()
    }

    pub fn send(
        &self,
        plugin: &Arc<str>,
        instance: u32,
        kind: Kind,
        pid: Option<u32>,
        detail: String,
    ) {
        // No subscriber is fine: the log has it anyway.
        let _ = self.0.send(Lifecycle {
            at: SystemTime::now(),
            plugin: plugin.clone(),
            instance,
            kind,
            pid,
            detail,
        });
    }
}

/// Where lifecycle events go: the event bus and the metrics.
#[derive(Debug, Clone)]
pub struct Reporter {
    pub bus: EventBus,
    pub metrics: Arc<Metrics>,
}

/// Who an instance event is about.
pub struct Subject<'a> {
    pub reporter: &'a Reporter,
    pub plugin: &'a Arc<str>,
    pub instance: u32,
}

impl Subject<'_> {
    fn send(&self, kind: Kind, pid: Option<u32>, detail: String) {
        self.reporter
            .bus
            .send(self.plugin, self.instance, kind, pid, detail);
    }

    fn plugin_label(&self) -> [KeyValue; 1] {
        [KeyValue::new("plugin", self.plugin.to_string())]
    }

    fn restarted(&self, reason: &str) {
        let labels = [
            KeyValue::new("plugin", self.plugin.to_string()),
            KeyValue::new("reason", reason.to_owned()),
        ];
        self.reporter.metrics.restarts.add(1, &labels);
    }
}

/// How a periodic health check ended, as the metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOutcome {
    Serving,
    NotServing,
    Timeout,
    Error,
}

impl CheckOutcome {
    fn label(self) -> &'static str {
        match self {
            CheckOutcome::Serving => "serving",
            CheckOutcome::NotServing => "not_serving",
            CheckOutcome::Timeout => "timeout",
            CheckOutcome::Error => "error",
        }
    }
}

/// Counts one periodic health check (the state machine hears of it too).
pub fn health_check(subject: &Subject<'_>, outcome: CheckOutcome, took: std::time::Duration) {
    let metrics = &subject.reporter.metrics;
    let platform = KeyValue::new("platform", subject.plugin.to_string());
    metrics.health_checks.add(
        1,
        &[platform.clone(), KeyValue::new("status", outcome.label())],
    );
    metrics
        .health_check_duration
        .record(took.as_secs_f64(), &[platform]);
}

/// The restart reason label: bounded, so spawn errors are one class.
fn reason_label(instance: &Instance) -> String {
    match instance.last_exit() {
        Some(ExitReason::SpawnFailed(_)) => "spawn failed".into(),
        Some(reason) => reason.to_string(),
        None => "unknown".into(),
    }
}

/// Reports what one step of the state machine did.
pub fn transition(
    subject: &Subject<'_>,
    before: &State,
    event: &Event,
    after: &Instance,
    breaker_before: Breaker,
) {
    let now = Instant::now();
    let state = after.state();
    match event {
        Event::Spawned { pid } => {
            tracing::info!(pid, "instance spawned");
            subject.send(Kind::Started, Some(*pid), String::new());
        }
        Event::SpawnFailed { error } => tracing::error!(error, "instance spawn failed"),
        Event::Exited { reason } => {
            let ran_ms = since(before, now);
            let pid = before.pid();
            // An exit the conductor asked for is routine; any other is news.
            if matches!(
                before,
                State::Stopping {
                    then: Then::Stop,
                    ..
                }
            ) {
                tracing::info!(pid, reason = %reason, ran_ms, "instance exited");
            } else {
                tracing::warn!(pid, reason = %reason, ran_ms, "instance exited");
            }
            subject.send(Kind::Exited, pid, reason.to_string());
        }
        Event::HealthFailed { why } => {
            let failures = match state {
                State::Unhealthy { failures, .. } => *failures,
                _ => after.breaker().failures(),
            };
            tracing::warn!(pid = before.pid(), why, failures, "health check failed");
            subject.send(Kind::Unhealthy, before.pid(), why.clone());
        }
        _ => {}
    }
    let restarted = matches!(event, Event::SpawnFailed { .. } | Event::Exited { .. });
    if before.name() == state.name() && !restarted {
        return;
    }
    tracing::debug!(from = before.name(), to = state.name(), "state changed");
    match state {
        State::Serving { pid, since } if !matches!(before, State::Unhealthy { .. }) => {
            let startup = now.saturating_duration_since(*since);
            let startup_ms = startup.as_millis() as u64;
            tracing::info!(pid, startup_ms, breaker = %after.breaker(), "instance serving");
            subject
                .reporter
                .metrics
                .start_duration
                .record(startup.as_secs_f64(), &subject.plugin_label());
            subject.send(
                Kind::Serving,
                Some(*pid),
                format!("ready in {startup_ms} ms"),
            );
        }
        State::Serving { pid, .. } => {
            tracing::info!(pid, "instance healthy again");
            subject.send(Kind::Serving, Some(*pid), "healthy again".into());
        }
        State::Stopping { pid, then, .. } => {
            if breaker_before != Breaker::Open
                && after.breaker() == Breaker::Open
                && let Then::Restart(cause) = then
            {
                tracing::warn!(pid, cause = %cause, "breaker tripped");
                subject
                    .reporter
                    .metrics
                    .breaker_trips
                    .add(1, &subject.plugin_label());
                subject.send(Kind::BreakerTripped, Some(*pid), cause.to_string());
            }
            let then = match then {
                Then::Restart(cause) => format!("restart: {cause}"),
                Then::Stop => "stop".into(),
                Then::Fail(reason) => format!("fail: {reason}"),
            };
            tracing::info!(pid, then, "stopping instance");
        }
        State::Backoff { attempt, until } => {
            let delay_ms = until.saturating_duration_since(now).as_millis() as u64;
            tracing::info!(delay_ms, attempt, "restart scheduled");
            subject.send(
                Kind::Backoff,
                None,
                format!("restart in {delay_ms} ms (attempt {attempt})"),
            );
        }
        State::Starting { .. }
            if matches!(
                before,
                State::Stopping {
                    then: Then::Restart(StopCause::Requested),
                    ..
                }
            ) =>
        {
            tracing::info!("instance restarting on request");
            subject.restarted("requested");
        }
        // Leaving a live state straight for Starting is an immediate restart.
        State::Starting { .. } if restarted => {
            let attempt = after.consecutive_crashes();
            tracing::info!(delay_ms = 0u64, attempt, "restart scheduled");
            subject.restarted(&reason_label(after));
            subject.send(
                Kind::Backoff,
                None,
                format!("restart in 0 ms (attempt {attempt})"),
            );
        }
        State::Failed { reason } => {
            tracing::error!(reason = %reason, "instance failed");
            subject.send(Kind::Failed, None, reason.to_string());
        }
        State::Stopped => {
            tracing::info!("instance stopped");
            subject.send(Kind::Stopped, None, String::new());
        }
        State::Starting { .. } | State::Unhealthy { .. } => {}
    }
}

pub fn illegal_transition(plugin: &str, illegal: &IllegalTransition) {
    tracing::error!(plugin, from = illegal.from, event = ?illegal.event, "illegal transition refused");
}

fn since(state: &State, now: Instant) -> u64 {
    state.since().map_or(0, |since| {
        now.saturating_duration_since(since).as_millis() as u64
    })
}
