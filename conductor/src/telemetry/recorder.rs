//! Every domain event as a log line and its metrics, in one place: one
//! fixed message per event, variables in fields, so the log, the counters
//! and `WatchEvents` always agree. It runs inline where the event was
//! published, inside the publisher's span.

use std::sync::Arc;

use opentelemetry::KeyValue;

use super::metrics::Metrics;
use crate::events::{
    AutoscaleDecision, CheckOutcome, Event, InstanceEvent, JobEvent, PluginApiEvent, RestartCause,
    Sink,
};

/// The sink that logs and counts.
pub struct Recorder {
    metrics: Arc<Metrics>,
}

impl Recorder {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl Sink for Recorder {
    fn record(&self, event: &Event) {
        match event {
            Event::Instance {
                plugin, pid, what, ..
            } => self.instance(plugin, *pid, what),
            Event::Job { plugin, what } => self.job(plugin, what),
            Event::Scaled { plugin, from, to } => {
                tracing::info!(plugin = &**plugin, from, to, "plugin scaled");
            }
            Event::Reloaded {
                added,
                removed,
                changed,
                unchanged,
            } => tracing::info!(
                ?added,
                ?removed,
                ?changed,
                unchanged,
                "configuration reloaded"
            ),
            Event::Autoscaled(decision) => autoscaled(decision),
            Event::PluginApi {
                plugin,
                instance,
                what,
            } => self.plugin_api(plugin, *instance, what),
            Event::Dependency {
                plugin,
                dependency,
                ready: false,
            } => tracing::warn!(plugin = &**plugin, dependency, "dependency lost"),
            Event::Dependency {
                plugin,
                dependency,
                ready: true,
            } => tracing::info!(plugin = &**plugin, dependency, "dependency back"),
        }
    }
}

fn plugin_label(plugin: &Arc<str>) -> KeyValue {
    KeyValue::new("plugin", plugin.clone())
}

impl Recorder {
    fn plugin_api(&self, plugin: &Arc<str>, instance: u32, what: &PluginApiEvent) {
        let metrics = &self.metrics;
        match what {
            PluginApiEvent::Denied { method, reason } => {
                tracing::warn!(
                    plugin = &**plugin,
                    instance,
                    method,
                    reason,
                    "plugin API call denied"
                );
                metrics.plugin_api_denied.add(
                    1,
                    &[
                        plugin_label(plugin),
                        KeyValue::new("method", method.clone()),
                    ],
                );
            }
            PluginApiEvent::Granted { limit, waited } => {
                let labels = [plugin_label(plugin), KeyValue::new("limit", limit.clone())];
                metrics.limit_grants.add(1, &labels);
                metrics.limit_wait.record(waited.as_secs_f64(), &labels);
            }
            PluginApiEvent::Refused { limit } => {
                tracing::debug!(
                    plugin = &**plugin,
                    instance,
                    limit,
                    "no turn before the deadline"
                );
                let labels = [plugin_label(plugin), KeyValue::new("limit", limit.clone())];
                metrics.limit_refusals.add(1, &labels);
            }
        }
    }

    fn instance(&self, plugin: &Arc<str>, pid: Option<u32>, what: &InstanceEvent) {
        let metrics = &self.metrics;
        match what {
            InstanceEvent::Spawned => tracing::info!(pid, "instance spawned"),
            InstanceEvent::SpawnFailed { error } => {
                tracing::error!(error, "instance spawn failed");
            }
            InstanceEvent::Exited {
                reason,
                ran,
                requested,
            } => {
                let ran_ms = ran.as_millis() as u64;
                if *requested {
                    tracing::info!(pid, reason, ran_ms, "instance exited");
                } else {
                    tracing::warn!(pid, reason, ran_ms, "instance exited");
                }
            }
            InstanceEvent::HealthChecked { outcome, took } => {
                tracing::trace!(
                    pid,
                    outcome = check_label(*outcome),
                    took_us = took.as_micros() as u64,
                    "health checked"
                );
                // The seed's series names: `platform`, not `plugin`.
                let platform = KeyValue::new("platform", plugin.clone());
                metrics.health_checks.add(
                    1,
                    &[
                        platform.clone(),
                        KeyValue::new("status", check_label(*outcome)),
                    ],
                );
                metrics
                    .health_check_duration
                    .record(took.as_secs_f64(), &[platform]);
            }
            InstanceEvent::HealthFailed { why, failures } => {
                tracing::warn!(pid, why, failures, "health check failed");
            }
            InstanceEvent::PhaseChanged { from, to } => {
                tracing::debug!(from = from.as_str(), to = to.as_str(), "state changed");
            }
            InstanceEvent::Serving { startup, breaker } => {
                let startup_ms = startup.as_millis() as u64;
                tracing::info!(pid, startup_ms, breaker, "instance serving");
                metrics
                    .start_duration
                    .record(startup.as_secs_f64(), &[plugin_label(plugin)]);
            }
            InstanceEvent::Recovered => tracing::info!(pid, "instance healthy again"),
            InstanceEvent::BreakerTripped { cause } => {
                tracing::warn!(pid, cause, "breaker tripped");
                metrics.breaker_trips.add(1, &[plugin_label(plugin)]);
            }
            InstanceEvent::Stopping { then } => tracing::info!(pid, then, "stopping instance"),
            InstanceEvent::RestartScheduled { delay, attempt } => {
                let delay_ms = delay.as_millis() as u64;
                tracing::info!(delay_ms, attempt, "restart scheduled");
            }
            InstanceEvent::Restarting { cause } => {
                match cause {
                    RestartCause::Requested => tracing::info!("instance restarting on request"),
                    RestartCause::Memory => {
                        tracing::warn!("instance restarting: memory above its ceiling");
                    }
                    RestartCause::Exit(_) => {}
                }
                let reason = cause.label();
                metrics.restarts.add(
                    1,
                    &[
                        plugin_label(plugin),
                        KeyValue::new("reason", reason.to_owned()),
                    ],
                );
            }
            InstanceEvent::Failed { reason } => tracing::error!(reason, "instance failed"),
            InstanceEvent::Stopped => tracing::info!("instance stopped"),
            InstanceEvent::IllegalTransition { from, event } => tracing::error!(
                plugin = &**plugin,
                from = from.as_str(),
                event,
                "illegal transition refused"
            ),
        }
    }

    fn job(&self, plugin: &Arc<str>, what: &JobEvent) {
        let metrics = &self.metrics;
        let label = [plugin_label(plugin)];
        match what {
            JobEvent::Submitted => metrics.jobs_submitted.add(1, &label),
            JobEvent::Completed { took, waited } => {
                metrics.jobs_completed.add(1, &label);
                metrics.job_duration.record(took.as_secs_f64(), &label);
                metrics.job_queue_wait.record(waited.as_secs_f64(), &label);
            }
            JobEvent::AttemptFailed => metrics.jobs_failed.add(1, &label),
            JobEvent::Retried => metrics.jobs_retried.add(1, &label),
            JobEvent::DeadLettered {
                job,
                attempts,
                errors,
                waited,
            } => {
                tracing::warn!(
                    job,
                    plugin = &**plugin,
                    attempts,
                    ?errors,
                    "job dead-lettered"
                );
                metrics.jobs_dead_lettered.add(1, &label);
                metrics.job_queue_wait.record(waited.as_secs_f64(), &label);
            }
        }
    }
}

fn check_label(outcome: CheckOutcome) -> &'static str {
    match outcome {
        CheckOutcome::Serving => "serving",
        CheckOutcome::NotServing => "not_serving",
        CheckOutcome::Timeout => "timeout",
        CheckOutcome::Error => "error",
    }
}

fn autoscaled(d: &AutoscaleDecision) {
    macro_rules! decision {
        ($level:ident) => {
            tracing::$level!(
                plugin = &*d.plugin,
                from = d.from,
                to = d.to,
                recommended = d.recommended,
                reason = d.reason,
                load = d.load,
                forecast = d.forecast.map(|f| f.0),
                forecast_lower = d.forecast.map(|f| f.1),
                forecast_upper = d.forecast.map(|f| f.2),
                capacity = d.capacity,
                lead_ms = d.lead.as_millis() as u64,
                model = d.model,
                "autoscaler decision"
            )
        };
    }
    if d.notable {
        decision!(info);
    } else {
        decision!(debug);
    }
}
