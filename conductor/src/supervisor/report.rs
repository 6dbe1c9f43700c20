//! What one step of the state machine means to the outside: the domain
//! events it gives rise to. Pure, so every transition's events are tested
//! without a runner; the runner publishes them.

use std::time::Instant;

use super::breaker::Breaker;
use super::instance::{Event, ExitReason, Instance, State, StopCause, Then};
use crate::events::{InstanceEvent, RestartCause};

/// The events of the step `before --event--> after`, each with the
/// process it is about.
pub fn describe(
    before: &State,
    event: &Event,
    after: &Instance,
    breaker_before: Breaker,
    now: Instant,
) -> Vec<(Option<u32>, InstanceEvent)> {
    let state = after.state();
    let mut out = Vec::new();
    match event {
        Event::Spawned { pid } => out.push((Some(*pid), InstanceEvent::Spawned)),
        Event::SpawnFailed { error } => out.push((
            None,
            InstanceEvent::SpawnFailed {
                error: error.clone(),
            },
        )),
        Event::Exited { reason, .. } => out.push((
            before.pid(),
            InstanceEvent::Exited {
                reason: reason.to_string(),
                ran: before
                    .since()
                    .map_or_else(Default::default, |s| now.saturating_duration_since(s)),
                // An exit the conductor asked for is routine; any other is news.
                requested: matches!(
                    before,
                    State::Stopping {
                        then: Then::Stop,
                        ..
                    }
                ),
            },
        )),
        Event::HealthFailed { why } => {
            // Counted before the step: a check that trips the breaker
            // leaves it open, with no count of its own.
            let failures = match before {
                State::Serving { .. } | State::Unhealthy { .. } => breaker_before.failures() + 1,
                _ => after.breaker().failures(),
            };
            out.push((
                before.pid(),
                InstanceEvent::HealthFailed {
                    why: why.clone(),
                    failures,
                },
            ));
        }
        _ => {}
    }
    let restarted = matches!(event, Event::SpawnFailed { .. } | Event::Exited { .. });
    let (from, to) = (before.phase(), state.phase());
    if from == to && !restarted {
        return out;
    }
    if from != to {
        out.push((
            state.pid().or(before.pid()),
            InstanceEvent::PhaseChanged { from, to },
        ));
    }
    match state {
        State::Serving { pid, since } if !matches!(before, State::Unhealthy { .. }) => {
            out.push((
                Some(*pid),
                InstanceEvent::Serving {
                    startup: now.saturating_duration_since(*since),
                    breaker: after.breaker().to_string(),
                },
            ));
        }
        State::Serving { pid, .. } => out.push((Some(*pid), InstanceEvent::Recovered)),
        State::Stopping { pid, then, .. } => {
            if breaker_before != Breaker::Open
                && after.breaker() == Breaker::Open
                && let Then::Restart(cause) = then
            {
                out.push((
                    Some(*pid),
                    InstanceEvent::BreakerTripped {
                        cause: cause.to_string(),
                    },
                ));
            }
            let then = match then {
                Then::Restart(cause) => format!("restart: {cause}"),
                Then::Stop => "stop".into(),
                Then::Fail(reason) => format!("fail: {reason}"),
            };
            out.push((Some(*pid), InstanceEvent::Stopping { then }));
        }
        State::Backoff { attempt, until } => out.push((
            None,
            InstanceEvent::RestartScheduled {
                delay: until.saturating_duration_since(now),
                attempt: *attempt,
            },
        )),
        State::Starting { .. }
            if matches!(
                before,
                State::Stopping {
                    then: Then::Restart(StopCause::Requested | StopCause::Memory),
                    ..
                }
            ) =>
        {
            let cause = match before {
                State::Stopping {
                    then: Then::Restart(StopCause::Memory),
                    ..
                } => RestartCause::Memory,
                _ => RestartCause::Requested,
            };
            out.push((None, InstanceEvent::Restarting { cause }));
        }
        // Leaving a live state straight for Starting is an immediate
        // restart; leaving Backoff is a delayed one. Both are restarts.
        State::Starting { .. } if restarted || matches!(before, State::Backoff { .. }) => {
            if restarted {
                out.push((
                    None,
                    InstanceEvent::RestartScheduled {
                        delay: std::time::Duration::ZERO,
                        attempt: after.consecutive_crashes(),
                    },
                ));
            }
            out.push((
                None,
                InstanceEvent::Restarting {
                    cause: RestartCause::Exit(exit_label(after)),
                },
            ));
        }
        State::Failed { reason } => out.push((
            None,
            InstanceEvent::Failed {
                reason: reason.to_string(),
            },
        )),
        State::Stopped => out.push((None, InstanceEvent::Stopped)),
        State::Starting { .. } | State::Unhealthy { .. } => {}
    }
    out
}

/// The restart reason label: bounded, so spawn errors are one class.
fn exit_label(instance: &Instance) -> String {
    match instance.last_exit() {
        Some(ExitReason::SpawnFailed(_)) => "spawn failed".into(),
        Some(reason) => reason.to_string(),
        None => "unknown".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::events::Phase;
    use crate::supervisor::config::{Health, HealthConfig, PoolConfig, RestartConfig};

    fn instance() -> Instance {
        let config = PoolConfig {
            health: Health::Grpc(HealthConfig {
                failure_threshold: 1,
                ..HealthConfig::default()
            }),
            restart: RestartConfig {
                initial_delay: Duration::from_millis(100),
                jitter: 0.0,
                ..RestartConfig::default()
            },
            ..PoolConfig::new("echo")
        };
        Instance::new(Arc::new(config), Arc::from([1u32]))
    }

    /// Steps `instance` and describes the step.
    fn step(
        instance: &mut Instance,
        event: Event,
        now: Instant,
    ) -> Vec<(Option<u32>, InstanceEvent)> {
        let before = instance.state().clone();
        let breaker = instance.breaker();
        instance
            .step(event.clone(), now, 0.5)
            .unwrap_or_else(|e| panic!("{e}"));
        describe(&before, &event, instance, breaker, now)
    }

    #[test]
    fn a_life_reads_as_its_events() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut i = instance();
        step(&mut i, Event::StartRequested, t0);
        assert_eq!(
            step(&mut i, Event::Spawned { pid: 7 }, t0),
            [(Some(7), InstanceEvent::Spawned)]
        );
        let ready = step(
            &mut i,
            Event::Ready {
                protocol_version: 1,
            },
            t0 + ms(30),
        );
        assert_eq!(
            ready,
            [
                (
                    Some(7),
                    InstanceEvent::PhaseChanged {
                        from: Phase::Starting,
                        to: Phase::Serving
                    }
                ),
                (
                    Some(7),
                    InstanceEvent::Serving {
                        startup: ms(30),
                        breaker: "closed".into()
                    }
                )
            ]
        );
        // One failure trips a threshold of one: the breaker opens and the
        // instance is stopped for a restart.
        let tripped = step(
            &mut i,
            Event::HealthFailed { why: "slow".into() },
            t0 + ms(40),
        );
        let kinds: Vec<_> = tripped.iter().map(|(_, e)| e.clone()).collect();
        assert!(
            matches!(kinds[0], InstanceEvent::HealthFailed { failures: 1, .. }),
            "{kinds:?}"
        );
        assert!(
            matches!(kinds[2], InstanceEvent::BreakerTripped { .. }),
            "{kinds:?}"
        );
        assert!(
            matches!(kinds[3], InstanceEvent::Stopping { .. }),
            "{kinds:?}"
        );
        // The first crash restarts at once: scheduled with no delay, and
        // counted as a restart for the previous exit's reason.
        let exited = step(
            &mut i,
            Event::Exited {
                reason: ExitReason::Signal(9),
                said: None,
            },
            t0 + ms(50),
        );
        let restart: Vec<_> = exited.iter().map(|(_, e)| e.clone()).collect();
        assert!(
            restart.contains(&InstanceEvent::RestartScheduled {
                delay: Duration::ZERO,
                attempt: 1
            }),
            "{restart:?}"
        );
        assert!(restart.contains(&InstanceEvent::Restarting {
            cause: RestartCause::Exit("signal SIGKILL".into())
        }));
        // A second crash waits in Backoff; leaving it counts the restart.
        step(&mut i, Event::Spawned { pid: 8 }, t0 + ms(60));
        let crashed = step(
            &mut i,
            Event::Exited {
                reason: ExitReason::Code(3),
                said: None,
            },
            t0 + ms(70),
        );
        assert!(
            crashed
                .iter()
                .any(|(_, e)| matches!(e, InstanceEvent::RestartScheduled { attempt: 2, .. }))
        );
        assert!(
            !crashed
                .iter()
                .any(|(_, e)| matches!(e, InstanceEvent::Restarting { .. }))
        );
        let later = step(&mut i, Event::Deadline, t0 + ms(200));
        assert!(later.contains(&(
            None,
            InstanceEvent::Restarting {
                cause: RestartCause::Exit("exit code 3".into())
            }
        )));
    }
}
