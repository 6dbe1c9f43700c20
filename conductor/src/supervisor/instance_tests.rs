use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::events::Phase;
use crate::supervisor::config::{Health, HealthConfig, RestartConfig};

fn config() -> PoolConfig {
    PoolConfig {
        command: "echo".into(),
        args: vec![],
        env: Default::default(),
        working_dir: None,
        replicas: 1,
        startup_timeout: Duration::from_secs(10),
        shutdown_grace: Duration::from_secs(5),
        health: Health::Grpc(HealthConfig {
            failure_threshold: 3,
            success_threshold: 1,
            ..HealthConfig::default()
        }),
        restart: RestartConfig {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            jitter: 0.0,
            start_limit_burst: 5,
            ..RestartConfig::default()
        },
        limits: Default::default(),
        sharded: false,
        share_handoff: Default::default(),
        credentials: Default::default(),
        depends_on: Vec::new(),
        binds_to: false,
        user: None,
        group: None,
        no_new_privileges: true,
        capabilities: Vec::new(),
    }
}

fn instance_with(config: PoolConfig) -> Instance {
    Instance::new(Arc::new(config), Arc::from([1u32]))
}

const PID: u32 = 4242;

/// Drives a fresh instance through `events`, one per millisecond.
fn drive(instance: &mut Instance, t0: Instant, events: &[Event]) -> Vec<Vec<Action>> {
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            instance
                .step(e.clone(), t0 + Duration::from_millis(i as u64), 0.5)
                .unwrap_or_else(|err| panic!("step {i}: {err}"))
        })
        .collect()
}

fn serving(t0: Instant) -> Instance {
    let mut i = instance_with(config());
    drive(
        &mut i,
        t0,
        &[
            Event::StartRequested,
            Event::Spawned { pid: PID },
            Event::Ready {
                protocol_version: 1,
            },
        ],
    );
    i
}

fn exited(code: i32) -> Event {
    Event::Exited {
        reason: ExitReason::Code(code),
        said: None,
    }
}

fn failed_check() -> Event {
    Event::HealthFailed {
        why: "timeout".into(),
    }
}

#[test]
fn start_spawns_then_serves_once_ready() {
    let t0 = Instant::now();
    let mut i = instance_with(config());
    assert_eq!(i.state(), &State::Stopped);
    let actions = drive(&mut i, t0, &[Event::StartRequested]);
    assert_eq!(actions, [vec![Action::Spawn]]);
    assert_eq!(i.state().phase(), Phase::Starting);
    assert_eq!(i.pid(), None);
    assert!(!i.awaits_readiness());
    drive(&mut i, t0, &[Event::Spawned { pid: PID }]);
    assert_eq!(i.pid(), Some(PID));
    assert!(i.awaits_readiness());
    assert_eq!(i.deadline(), Some(t0 + Duration::from_secs(10)));
    drive(
        &mut i,
        t0,
        &[Event::Ready {
            protocol_version: 1,
        }],
    );
    assert_eq!(
        i.state(),
        &State::Serving {
            pid: PID,
            since: t0
        }
    );
    assert!(i.checks_health());
    assert_eq!(i.deadline(), None);
}

#[test]
fn health_failures_go_unhealthy_then_trip_the_breaker() {
    let t0 = Instant::now();
    let mut i = serving(t0);
    let actions = drive(&mut i, t0, &[failed_check(), failed_check()]);
    assert_eq!(actions, [vec![], vec![]]);
    assert!(matches!(i.state(), State::Unhealthy { failures: 2, .. }));
    assert_eq!(i.breaker(), Breaker::Closed { failures: 2 });

    let actions = drive(&mut i, t0, &[failed_check()]);
    assert_eq!(
        actions,
        [vec![Action::Terminate {
            pid: PID,
            grace: Duration::from_secs(5)
        }]]
    );
    assert_eq!(i.breaker(), Breaker::Open);
    match i.state() {
        State::Stopping { then, kill_at, .. } => {
            assert_eq!(
                then,
                &Then::Restart(StopCause::BreakerTripped { failures: 3 })
            );
            assert_eq!(*kill_at, t0 + Duration::from_secs(5));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_passed_check_heals_an_unhealthy_instance() {
    let t0 = Instant::now();
    let mut i = serving(t0);
    drive(&mut i, t0, &[failed_check(), Event::HealthPassed]);
    assert!(matches!(i.state(), State::Serving { .. }));
    assert_eq!(i.breaker(), Breaker::Closed { failures: 0 });
}

#[test]
fn stopping_escalates_to_kill_at_the_deadline_then_restarts_half_open() {
    let t0 = Instant::now();
    let mut i = serving(t0);
    drive(
        &mut i,
        t0,
        &[failed_check(), failed_check(), failed_check()],
    );
    let kill = i.step(Event::Deadline, t0 + Duration::from_secs(5), 0.5);
    assert_eq!(kill, Ok(vec![Action::Kill { pid: PID }]));
    assert_eq!(i.deadline(), None, "no second escalation after SIGKILL");
    // Stale health results while stopping change nothing.
    assert_eq!(i.step(Event::HealthPassed, t0, 0.5), Ok(vec![]));
    let restart = i.step(
        Event::Exited {
            reason: ExitReason::Signal(9),
            said: None,
        },
        t0 + Duration::from_secs(6),
        0.5,
    );
    // First crash after a stable run: immediate restart, on probation.
    assert_eq!(restart, Ok(vec![Action::Spawn]));
    assert_eq!(i.breaker(), Breaker::HalfOpen { successes: 0 });
    assert_eq!(i.last_exit(), Some(&ExitReason::Signal(9)));
    drive(
        &mut i,
        t0,
        &[
            Event::Spawned { pid: PID + 1 },
            Event::Ready {
                protocol_version: 1,
            },
            Event::HealthPassed,
        ],
    );
    assert_eq!(i.breaker(), Breaker::Closed { failures: 0 });
    assert_eq!(i.restarts(), 1);
}

#[test]
fn half_open_trips_on_the_first_failure() {
    let t0 = Instant::now();
    let mut i = serving(t0);
    drive(
        &mut i,
        t0,
        &[
            exited(1),
            Event::Spawned { pid: PID + 1 },
            Event::Ready {
                protocol_version: 1,
            },
        ],
    );
    assert_eq!(i.breaker(), Breaker::HalfOpen { successes: 0 });
    let actions = drive(&mut i, t0, &[failed_check()]);
    assert!(matches!(actions[0][0], Action::Terminate { .. }));
}

#[test]
fn repeated_crashes_back_off_with_growing_delays() {
    let t0 = Instant::now();
    let mut i = instance_with(
        RestartConfig {
            start_limit_burst: 100,
            ..config().restart
        }
        .into_pool(),
    );
    drive(&mut i, t0, &[Event::StartRequested]);
    let mut now = t0;
    let mut delays = Vec::new();
    for n in 0..6 {
        i.step(Event::Spawned { pid: PID + n }, now, 0.5).unwrap();
        let actions = i.step(exited(1), now, 0.5).unwrap();
        match *i.state() {
            State::Starting { .. } => {
                assert_eq!(actions, [Action::Spawn]);
                delays.push(Duration::ZERO);
            }
            State::Backoff { until, .. } => {
                assert!(actions.is_empty());
                assert_eq!(i.deadline(), Some(until));
                delays.push(until - now);
                now = until;
                assert_eq!(i.step(Event::Deadline, now, 0.5), Ok(vec![Action::Spawn]));
            }
            ref other => panic!("{other:?}"),
        }
    }
    let ms = |n| Duration::from_millis(n);
    assert_eq!(
        delays,
        [ms(0), ms(100), ms(200), ms(400), ms(800), ms(1000)]
    );
}

#[test]
fn a_failed_reason_carries_what_the_process_said_last() {
    let t0 = Instant::now();
    let mut i = serving(t0);
    let last_words = Event::Exited {
        reason: ExitReason::Code(78),
        said: Some("bot: Discord rejected the bot token".into()),
    };
    i.step(last_words, t0, 0.5).unwrap();
    let State::Failed { reason } = i.state() else {
        panic!("{:?}", i.state())
    };
    assert_eq!(
        reason.to_string(),
        "exited with code 78, listed in restart.never_restart_exit_codes: \
         bot: Discord rejected the bot token"
    );
}

#[test]
fn never_restart_codes_fail_at_once() {
    let t0 = Instant::now();
    let mut i = serving(t0);
    assert_eq!(i.step(exited(78), t0, 0.5), Ok(vec![]));
    assert_eq!(
        i.state(),
        &State::Failed {
            reason: FailReason::NeverRestart {
                code: 78,
                said: None
            }
        }
    );
    assert!(i.state().to_string() == "failed");
    // Failed is final: it waits for no deadline and checks nothing, so
    // only an operator's start can move it.
    assert_eq!(i.deadline(), None);
    assert!(!i.checks_health() && !i.awaits_readiness());
    let before = i.state().clone();
    assert!(i.step(Event::Deadline, t0, 0.5).is_err());
    assert_eq!(i.state(), &before);
    // Even while still starting.
    let mut i = instance_with(config());
    drive(
        &mut i,
        t0,
        &[Event::StartRequested, Event::Spawned { pid: PID }],
    );
    i.step(exited(78), t0, 0.5).unwrap();
    assert!(matches!(i.state(), State::Failed { .. }));
}

#[test]
fn a_crash_loop_ends_at_the_start_limit() {
    let t0 = Instant::now();
    let mut i = instance_with(
        RestartConfig {
            initial_delay: Duration::ZERO,
            start_limit_burst: 3,
            ..config().restart
        }
        .into_pool(),
    );
    drive(&mut i, t0, &[Event::StartRequested]);
    for n in 0..3 {
        i.step(Event::Spawned { pid: PID + n }, t0, 0.5).unwrap();
        i.step(exited(1), t0, 0.5).unwrap();
    }
    match i.state() {
        State::Failed { reason } => {
            assert!(
                reason.to_string().contains("3 starts within 10s"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    // An operator can start it again, with a clean slate.
    assert_eq!(
        i.step(Event::StartRequested, t0, 0.5),
        Ok(vec![Action::Spawn])
    );
    assert_eq!(i.restarts(), 0);
}

#[test]
fn spawn_failure_counts_as_a_crash() {
    let t0 = Instant::now();
    let mut i = instance_with(config());
    drive(&mut i, t0, &[Event::StartRequested]);
    let actions = i.step(
        Event::SpawnFailed {
            error: "No such file".into(),
        },
        t0,
        0.5,
    );
    assert_eq!(actions, Ok(vec![Action::Spawn]));
    assert!(matches!(i.last_exit(), Some(ExitReason::SpawnFailed(_))));
}

#[test]
fn startup_timeout_kills_and_restarts() {
    let t0 = Instant::now();
    let mut i = instance_with(config());
    drive(
        &mut i,
        t0,
        &[Event::StartRequested, Event::Spawned { pid: PID }],
    );
    let actions = i.step(Event::Deadline, t0 + Duration::from_secs(10), 0.5);
    assert!(matches!(actions.as_deref(), Ok([Action::Terminate { .. }])));
    assert!(matches!(
        i.state(),
        State::Stopping {
            then: Then::Restart(StopCause::StartupTimeout(_)),
            ..
        }
    ));
}

#[test]
fn a_protocol_mismatch_stops_and_fails_naming_both_versions() {
    let t0 = Instant::now();
    let mut i = instance_with(config());
    drive(
        &mut i,
        t0,
        &[Event::StartRequested, Event::Spawned { pid: PID }],
    );
    let actions = i.step(
        Event::Ready {
            protocol_version: 7,
        },
        t0,
        0.5,
    );
    assert!(matches!(actions.as_deref(), Ok([Action::Terminate { .. }])));
    i.step(exited(0), t0, 0.5).unwrap();
    match i.state() {
        State::Failed { reason } => {
            let text = reason.to_string();
            assert!(
                text.contains("answered 7") && text.contains("[1]"),
                "{text}"
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn stop_requests_from_every_state() {
    let t0 = Instant::now();
    // Running: a graceful stop that ends Stopped.
    let mut i = serving(t0);
    let actions = i.step(Event::StopRequested, t0, 0.5).unwrap();
    assert!(matches!(actions[..], [Action::Terminate { .. }]));
    i.step(exited(0), t0, 0.5).unwrap();
    assert_eq!(i.state(), &State::Stopped);
    assert_eq!(i.step(Event::StopRequested, t0, 0.5), Ok(vec![]));

    // A stop during a breaker kill wins over the planned restart.
    let mut i = serving(t0);
    drive(
        &mut i,
        t0,
        &[failed_check(), failed_check(), failed_check()],
    );
    assert_eq!(i.step(Event::StopRequested, t0, 0.5), Ok(vec![]));
    i.step(exited(0), t0, 0.5).unwrap();
    assert_eq!(i.state(), &State::Stopped);

    // Backoff: nothing to kill.
    let mut i = serving(t0);
    drive(
        &mut i,
        t0,
        &[exited(1), Event::Spawned { pid: 1 }, exited(1)],
    );
    assert!(matches!(i.state(), State::Backoff { .. }));
    assert_eq!(i.step(Event::StartRequested, t0, 0.5), Ok(vec![]));
    assert_eq!(i.step(Event::StopRequested, t0, 0.5), Ok(vec![]));
    assert_eq!(i.state(), &State::Stopped);

    // While starting.
    let mut i = instance_with(config());
    drive(
        &mut i,
        t0,
        &[Event::StartRequested, Event::Spawned { pid: PID }],
    );
    assert_eq!(i.step(Event::StartRequested, t0, 0.5), Ok(vec![]));
    assert!(matches!(
        i.step(Event::StopRequested, t0, 0.5).as_deref(),
        Ok([Action::Terminate { .. }])
    ));

    // Failed stays failed.
    let mut i = serving(t0);
    i.step(exited(78), t0, 0.5).unwrap();
    assert_eq!(i.step(Event::StopRequested, t0, 0.5), Ok(vec![]));
    assert!(matches!(i.state(), State::Failed { .. }));
}

#[test]
fn illegal_transitions_are_refused_and_change_nothing() {
    let t0 = Instant::now();
    let cases: Vec<(Instance, Event)> = vec![
        (instance_with(config()), exited(1)),
        (instance_with(config()), Event::Spawned { pid: 1 }),
        (instance_with(config()), Event::HealthPassed),
        (instance_with(config()), Event::Deadline),
        (serving(t0), Event::Spawned { pid: 1 }),
        (
            serving(t0),
            Event::Ready {
                protocol_version: 1,
            },
        ),
        (serving(t0), Event::Deadline),
    ];
    for (mut instance, event) in cases {
        let before = instance.state().clone();
        let err = instance.step(event.clone(), t0, 0.5).unwrap_err();
        assert_eq!(err.from, before.phase());
        assert_eq!(err.event, event);
        assert_eq!(instance.state(), &before);
    }
}

#[test]
fn a_spawn_in_flight_accepts_nothing_but_its_outcome() {
    let t0 = Instant::now();
    let mut i = instance_with(config());
    drive(&mut i, t0, &[Event::StartRequested]);
    for event in [
        Event::HealthPassed,
        Event::Deadline,
        Event::StopRequested,
        exited(0),
    ] {
        assert!(i.step(event, t0, 0.5).is_err());
    }
}

#[test]
fn display_of_reasons() {
    assert_eq!(ExitReason::Code(3).to_string(), "exit code 3");
    assert_eq!(ExitReason::Signal(9).to_string(), "signal SIGKILL");
    assert_eq!(
        StopCause::StartupTimeout(Duration::from_secs(2)).to_string(),
        "not SERVING within startup_timeout (2s)"
    );
}

trait IntoPool {
    fn into_pool(self) -> PoolConfig;
}

impl IntoPool for RestartConfig {
    fn into_pool(self) -> PoolConfig {
        PoolConfig {
            restart: self,
            ..config()
        }
    }
}

#[test]
fn an_unlaunchable_instance_fails_without_spawning() {
    let t0 = Instant::now();
    let mut i = instance_with(config());
    drive(&mut i, t0, &[Event::StartRequested]);
    let reason = "cgroups are unavailable".to_string();
    assert_eq!(
        i.step(
            Event::Unlaunchable {
                reason: reason.clone()
            },
            t0,
            0.5
        ),
        Ok(vec![])
    );
    assert_eq!(
        i.state(),
        &State::Failed {
            reason: FailReason::Unlaunchable(reason)
        }
    );
    assert_eq!(i.state().to_string(), "failed");
}

#[test]
fn an_oom_kill_is_a_crash_like_any_other() {
    let t0 = Instant::now();
    let mut i = serving(t0);
    let actions = i.step(
        Event::Exited {
            reason: ExitReason::Oom,
            said: None,
        },
        t0,
        0.5,
    );
    assert_eq!(actions, Ok(vec![Action::Spawn]));
    assert_eq!(i.last_exit(), Some(&ExitReason::Oom));
    assert_eq!(ExitReason::Oom.to_string(), "oom");
}

#[test]
fn a_requested_restart_is_not_a_crash() {
    let t0 = Instant::now();
    let mut i = serving(t0);
    let actions = i.step(Event::RestartRequested, t0, 0.5).unwrap();
    assert!(matches!(actions[..], [Action::Terminate { .. }]));
    assert_eq!(
        i.step(Event::RestartRequested, t0, 0.5),
        Ok(vec![]),
        "already on its way"
    );
    assert_eq!(i.step(exited(0), t0, 0.5), Ok(vec![Action::Spawn]));
    assert_eq!(i.breaker(), Breaker::Closed { failures: 0 });
    assert_eq!(i.consecutive_crashes(), 0);
    assert_eq!(i.last_exit(), Some(&ExitReason::Code(0)));

    // From backoff it skips the wait; from failed it starts afresh.
    let mut i = serving(t0);
    drive(
        &mut i,
        t0,
        &[exited(1), Event::Spawned { pid: 1 }, exited(1)],
    );
    assert!(matches!(i.state(), State::Backoff { .. }));
    assert_eq!(
        i.step(Event::RestartRequested, t0, 0.5),
        Ok(vec![Action::Spawn])
    );
    let mut i = serving(t0);
    i.step(exited(78), t0, 0.5).unwrap();
    assert_eq!(
        i.step(Event::RestartRequested, t0, 0.5),
        Ok(vec![Action::Spawn])
    );
    assert_eq!(StopCause::Requested.to_string(), "restart requested");
}

#[test]
fn a_memory_restart_is_graceful_and_not_a_crash() {
    let t0 = Instant::now();
    let mut i = serving(t0);
    let actions = i.step(Event::MemoryAbove, t0, 0.5).unwrap();
    assert!(matches!(actions[..], [Action::Terminate { .. }]));
    assert!(matches!(
        i.state(),
        State::Stopping {
            then: Then::Restart(StopCause::Memory),
            ..
        }
    ));
    assert_eq!(
        i.step(Event::MemoryAbove, t0, 0.5),
        Ok(vec![]),
        "on its way"
    );
    assert_eq!(i.step(exited(0), t0, 0.5), Ok(vec![Action::Spawn]));
    assert_eq!(i.breaker(), Breaker::Closed { failures: 0 });
    assert_eq!(i.consecutive_crashes(), 0);
    // Anywhere but live, the next sample decides again.
    assert_eq!(i.step(Event::MemoryAbove, t0, 0.5), Ok(vec![]));
}
