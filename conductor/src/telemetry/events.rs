//! Named lifecycle events of instances: one fixed message each, variables in
//! fields, emitted from this one place so logs (and later metrics) agree.

use std::time::Instant;

use crate::supervisor::breaker::Breaker;
use crate::supervisor::instance::{Event, IllegalTransition, Instance, State, Then};

/// Reports what one step of the state machine did.
pub fn transition(before: &State, event: &Event, after: &Instance, breaker_before: Breaker) {
    let now = Instant::now();
    let state = after.state();
    match event {
        Event::Spawned { pid } => tracing::info!(pid, "instance spawned"),
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
        }
        Event::HealthFailed { why } => tracing::warn!(
            pid = before.pid(),
            why,
            failures = match state {
                State::Unhealthy { failures, .. } => *failures,
                _ => after.breaker().failures(),
            },
            "health check failed"
        ),
        _ => {}
    }
    let restarted = matches!(event, Event::SpawnFailed { .. } | Event::Exited { .. });
    if before.name() == state.name() && !restarted {
        return;
    }
    tracing::debug!(from = before.name(), to = state.name(), "state changed");
    match state {
        State::Serving { pid, since } if !matches!(before, State::Unhealthy { .. }) => {
            let startup_ms = now.saturating_duration_since(*since).as_millis() as u64;
            tracing::info!(pid, startup_ms, breaker = %after.breaker(), "instance serving");
        }
        State::Serving { pid, .. } => tracing::info!(pid, "instance healthy again"),
        State::Stopping { pid, then, .. } => {
            if breaker_before != Breaker::Open
                && after.breaker() == Breaker::Open
                && let Then::Restart(cause) = then
            {
                tracing::warn!(pid, cause = %cause, "breaker tripped");
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
        }
        State::Failed { reason } => tracing::error!(reason = %reason, "instance failed"),
        State::Stopped => tracing::info!("instance stopped"),
        // Leaving a live state straight for Starting is an immediate restart.
        State::Starting { .. } if restarted => {
            tracing::info!(
                delay_ms = 0u64,
                attempt = after.consecutive_crashes(),
                "restart scheduled"
            );
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
