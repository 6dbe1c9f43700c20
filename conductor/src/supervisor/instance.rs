//! The life of one plugin instance as a pure state machine.
//!
//! [`Instance::step`] reads an [`Event`] and returns the [`Action`]s the
//! runner must carry out; it spawns, signals and sleeps nothing itself, so
//! every transition is unit-tested without processes or clocks.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::breaker::{Breaker, Trip};
use super::config::PoolConfig;
use super::restarts::{Restarts, Verdict};
use crate::events::Phase;

/// Where an instance is in its life. Data lives in the state it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// Spawn requested (`pid` None) or spawned and not yet SERVING.
    Starting {
        pid: Option<u32>,
        since: Instant,
        deadline: Instant,
    },
    /// Ready and passing health checks.
    Serving { pid: u32, since: Instant },
    /// Failing health checks, not yet enough to trip the breaker.
    Unhealthy {
        pid: u32,
        since: Instant,
        failures: u32,
    },
    /// Asked to leave; SIGKILL at `kill_at` unless it exits first.
    Stopping {
        pid: u32,
        since: Instant,
        then: Then,
        kill_at: Instant,
        killed: bool,
    },
    /// Waiting before the next start.
    Backoff { attempt: u32, until: Instant },
    /// Given up on; only an operator's start revives it.
    Failed { reason: FailReason },
    /// Not running, by request.
    Stopped,
}

/// What follows a stop.
#[derive(Debug, Clone, PartialEq)]
pub enum Then {
    Restart(StopCause),
    Stop,
    Fail(FailReason),
}

/// Why the conductor killed a live instance.
#[derive(Debug, Clone, PartialEq)]
pub enum StopCause {
    BreakerTripped {
        failures: u32,
    },
    StartupTimeout(Duration),
    /// An operator asked for a restart.
    Requested,
    /// Its memory stayed above `restart.on_memory_above`.
    Memory,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    Code(i32),
    Signal(i32),
    /// SIGKILLed by the kernel at the cgroup's memory limit (seen in the
    /// cgroup's OOM counter, not guessed from the signal).
    Oom,
    SpawnFailed(String),
}

/// Why an instance is Failed.
#[derive(Debug, Clone, PartialEq)]
pub enum FailReason {
    /// The instance cannot be started as configured (cgroups required but
    /// unusable, for one).
    Unlaunchable(String),
    NeverRestart {
        code: i32,
        said: Option<String>,
    },
    StartLimit {
        starts: usize,
        interval: Duration,
    },
    ProtocolMismatch {
        answered: u32,
        accepted: Vec<u32>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Spawned {
        pid: u32,
    },
    SpawnFailed {
        error: String,
    },
    /// Spawning cannot succeed until an operator changes something.
    Unlaunchable {
        reason: String,
    },
    /// Health answered SERVING and `Describe` named this protocol version.
    Ready {
        protocol_version: u32,
    },
    HealthPassed,
    HealthFailed {
        why: String,
    },
    Exited {
        reason: ExitReason,
        /// The last line the process wrote to stderr, when it exited
        /// with a code that fails it: its own account of why.
        said: Option<String>,
    },
    /// The instant [`Instance::deadline`] named has come.
    Deadline,
    StartRequested,
    StopRequested,
    RestartRequested,
    /// Its memory stayed above `restart.on_memory_above` long enough: a
    /// graceful restart, like an operator's.
    MemoryAbove,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Spawn,
    /// `Shutdown(grace)` RPC, then SIGTERM to the process group.
    Terminate {
        pid: u32,
        grace: Duration,
    },
    /// SIGKILL to the process group.
    Kill {
        pid: u32,
    },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("illegal transition: {event:?} in state {from}")]
pub struct IllegalTransition {
    pub from: Phase,
    pub event: Event,
}

/// One instance: its state, breaker and restart history.
#[derive(Debug, Clone)]
pub struct Instance {
    config: Arc<PoolConfig>,
    accepted_protocols: Arc<[u32]>,
    state: State,
    breaker: Breaker,
    restarts: Restarts,
    last_exit: Option<ExitReason>,
}

impl Instance {
    pub fn new(config: Arc<PoolConfig>, accepted_protocols: Arc<[u32]>) -> Self {
        Self {
            config,
            accepted_protocols,
            state: State::Stopped,
            breaker: Breaker::default(),
            restarts: Restarts::default(),
            last_exit: None,
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn breaker(&self) -> Breaker {
        self.breaker
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.restarts()
    }

    /// Crashes in a row since the last stable run.
    pub fn consecutive_crashes(&self) -> u32 {
        self.restarts.consecutive()
    }

    pub fn last_exit(&self) -> Option<&ExitReason> {
        self.last_exit.as_ref()
    }

    /// The live process, if any.
    pub fn pid(&self) -> Option<u32> {
        self.state.pid()
    }

    /// When the runner must send [`Event::Deadline`].
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Starting { deadline, .. } => Some(deadline),
            State::Backoff { until, .. } => Some(until),
            State::Stopping {
                kill_at,
                killed: false,
                ..
            } => Some(kill_at),
            _ => None,
        }
    }

    /// Whether periodic health checks run in this state.
    pub fn checks_health(&self) -> bool {
        matches!(self.state, State::Serving { .. } | State::Unhealthy { .. })
    }

    /// Whether the runner should probe for readiness.
    pub fn awaits_readiness(&self) -> bool {
        matches!(self.state, State::Starting { pid: Some(_), .. })
    }

    /// Applies `event` at `now`. `unit` (uniform in `[0, 1)`) jitters any
    /// restart delay. On error the instance is unchanged.
    pub fn step(
        &mut self,
        event: Event,
        now: Instant,
        unit: f64,
    ) -> Result<Vec<Action>, IllegalTransition> {
        use State as S;
        let actions = match (&self.state, event) {
            (S::Stopped | S::Failed { .. }, Event::StartRequested) => {
                self.breaker = Breaker::default();
                self.restarts = Restarts::default();
                self.start(now)
            }
            (
                S::Starting { .. } | S::Serving { .. } | S::Unhealthy { .. } | S::Stopping { .. },
                Event::StartRequested,
            )
            | (S::Stopped | S::Failed { .. }, Event::StopRequested)
            | (S::Stopping { .. }, Event::HealthPassed | Event::HealthFailed { .. }) => vec![],

            (
                S::Starting {
                    pid: None,
                    since,
                    deadline,
                },
                Event::Spawned { pid },
            ) => {
                self.state = S::Starting {
                    pid: Some(pid),
                    since: *since,
                    deadline: *deadline,
                };
                vec![]
            }
            (S::Starting { pid: None, .. }, Event::Unlaunchable { reason }) => {
                self.state = S::Failed {
                    reason: FailReason::Unlaunchable(reason),
                };
                vec![]
            }
            (
                S::Starting {
                    pid: None, since, ..
                },
                Event::SpawnFailed { error },
            ) => {
                let ran = now.saturating_duration_since(*since);
                self.exited(ExitReason::SpawnFailed(error), ran, now, unit)
            }
            (
                S::Starting {
                    pid: Some(pid),
                    since,
                    ..
                },
                Event::Ready { protocol_version },
            ) => {
                let (pid, since) = (*pid, *since);
                if self.accepted_protocols.contains(&protocol_version) {
                    self.state = S::Serving { pid, since };
                    vec![]
                } else {
                    let reason = FailReason::ProtocolMismatch {
                        answered: protocol_version,
                        accepted: self.accepted_protocols.to_vec(),
                    };
                    self.stop(pid, since, Then::Fail(reason), now)
                }
            }
            (
                S::Starting {
                    pid: Some(pid),
                    since,
                    ..
                },
                Event::Deadline,
            ) => {
                let (pid, since) = (*pid, *since);
                self.breaker.open();
                let cause = StopCause::StartupTimeout(self.config.startup_timeout);
                self.stop(pid, since, Then::Restart(cause), now)
            }
            (S::Serving { pid, since } | S::Unhealthy { pid, since, .. }, Event::HealthPassed) => {
                self.breaker
                    .on_success(self.config.health.config().success_threshold);
                self.state = S::Serving {
                    pid: *pid,
                    since: *since,
                };
                vec![]
            }
            (
                S::Serving { pid, since } | S::Unhealthy { pid, since, .. },
                Event::HealthFailed { .. },
            ) => {
                let (pid, since) = (*pid, *since);
                let failures = self.breaker.failures() + 1;
                match self
                    .breaker
                    .on_failure(self.config.health.config().failure_threshold)
                {
                    Trip::Holding => {
                        self.state = S::Unhealthy {
                            pid,
                            since,
                            failures,
                        };
                        vec![]
                    }
                    Trip::Tripped => {
                        let cause = StopCause::BreakerTripped { failures };
                        self.stop(pid, since, Then::Restart(cause), now)
                    }
                }
            }
            (
                S::Starting {
                    pid: Some(_),
                    since,
                    ..
                }
                | S::Serving { since, .. }
                | S::Unhealthy { since, .. },
                Event::Exited { reason, said },
            ) => {
                let ran = now.saturating_duration_since(*since);
                if let ExitReason::Code(code) = reason
                    && self.config.restart.never_restart_exit_codes.contains(&code)
                {
                    self.last_exit = Some(reason);
                    self.state = S::Failed {
                        reason: FailReason::NeverRestart { code, said },
                    };
                    vec![]
                } else {
                    self.exited(reason, ran, now, unit)
                }
            }
            (S::Stopping { since, then, .. }, Event::Exited { reason, .. }) => {
                let ran = now.saturating_duration_since(*since);
                match then.clone() {
                    // Not a crash: no backoff, no breaker, straight back up.
                    Then::Restart(StopCause::Requested | StopCause::Memory) => {
                        self.last_exit = Some(reason);
                        self.start(now)
                    }
                    Then::Restart(_) => self.exited(reason, ran, now, unit),
                    Then::Stop => {
                        self.last_exit = Some(reason);
                        self.state = S::Stopped;
                        vec![]
                    }
                    Then::Fail(fail) => {
                        self.last_exit = Some(reason);
                        self.state = S::Failed { reason: fail };
                        vec![]
                    }
                }
            }
            (
                S::Stopping {
                    pid, killed: false, ..
                },
                Event::Deadline,
            ) => {
                let pid = *pid;
                if let S::Stopping { killed, .. } = &mut self.state {
                    *killed = true;
                }
                vec![Action::Kill { pid }]
            }
            (S::Stopping { .. }, Event::StopRequested) => {
                if let S::Stopping { then, .. } = &mut self.state {
                    *then = Then::Stop;
                }
                vec![]
            }
            (
                S::Starting {
                    pid: Some(pid),
                    since,
                    ..
                }
                | S::Serving { pid, since }
                | S::Unhealthy { pid, since, .. },
                Event::StopRequested,
            ) => {
                let (pid, since) = (*pid, *since);
                self.stop(pid, since, Then::Stop, now)
            }
            (S::Backoff { .. }, Event::Deadline) => {
                self.breaker.on_restart();
                self.start(now)
            }
            (S::Backoff { .. }, Event::StopRequested) => {
                self.state = S::Stopped;
                vec![]
            }
            (S::Backoff { .. }, Event::StartRequested) => vec![],
            (
                S::Starting {
                    pid: Some(pid),
                    since,
                    ..
                }
                | S::Serving { pid, since }
                | S::Unhealthy { pid, since, .. },
                Event::RestartRequested,
            ) => {
                let (pid, since) = (*pid, *since);
                self.stop(pid, since, Then::Restart(StopCause::Requested), now)
            }
            (S::Serving { pid, since } | S::Unhealthy { pid, since, .. }, Event::MemoryAbove) => {
                let (pid, since) = (*pid, *since);
                self.stop(pid, since, Then::Restart(StopCause::Memory), now)
            }
            // Not running as itself (starting, stopping, down): the next
            // sample decides again.
            (_, Event::MemoryAbove) => vec![],
            (S::Stopped | S::Failed { .. }, Event::RestartRequested) => {
                self.breaker = Breaker::default();
                self.restarts = Restarts::default();
                self.start(now)
            }
            (S::Backoff { .. }, Event::RestartRequested) => self.start(now),
            (S::Stopping { .. }, Event::RestartRequested) => vec![],
            (from, event) => {
                return Err(IllegalTransition {
                    from: from.phase(),
                    event,
                });
            }
        };
        Ok(actions)
    }

    fn start(&mut self, now: Instant) -> Vec<Action> {
        self.restarts.record_start(now);
        self.state = State::Starting {
            pid: None,
            since: now,
            deadline: now + self.config.startup_timeout,
        };
        vec![Action::Spawn]
    }

    fn stop(&mut self, pid: u32, since: Instant, then: Then, now: Instant) -> Vec<Action> {
        let grace = self.config.shutdown_grace;
        self.state = State::Stopping {
            pid,
            since,
            then,
            kill_at: now + grace,
            killed: false,
        };
        vec![Action::Terminate { pid, grace }]
    }

    fn exited(
        &mut self,
        reason: ExitReason,
        ran: Duration,
        now: Instant,
        unit: f64,
    ) -> Vec<Action> {
        self.last_exit = Some(reason);
        self.breaker.open();
        match self
            .restarts
            .after_exit(&self.config.restart, ran, now, unit)
        {
            Verdict::StartLimitHit { starts, interval } => {
                self.state = State::Failed {
                    reason: FailReason::StartLimit { starts, interval },
                };
                vec![]
            }
            Verdict::RestartAfter { delay, .. } if delay.is_zero() => {
                self.breaker.on_restart();
                self.start(now)
            }
            Verdict::RestartAfter { delay, attempt } => {
                self.state = State::Backoff {
                    attempt,
                    until: now + delay,
                };
                vec![]
            }
        }
    }
}

impl State {
    /// The process this state holds, if any.
    pub fn pid(&self) -> Option<u32> {
        match *self {
            State::Starting { pid, .. } => pid,
            State::Serving { pid, .. }
            | State::Unhealthy { pid, .. }
            | State::Stopping { pid, .. } => Some(pid),
            _ => None,
        }
    }

    /// When the process this state holds was spawned.
    pub fn since(&self) -> Option<Instant> {
        match *self {
            State::Starting { since, .. }
            | State::Serving { since, .. }
            | State::Unhealthy { since, .. }
            | State::Stopping { since, .. } => Some(since),
            _ => None,
        }
    }

    /// The state's name, as everyone outside the machine sees it.
    pub fn phase(&self) -> Phase {
        match self {
            State::Starting { .. } => Phase::Starting,
            State::Serving { .. } => Phase::Serving,
            State::Unhealthy { .. } => Phase::Unhealthy,
            State::Stopping { .. } => Phase::Stopping,
            State::Backoff { .. } => Phase::Backoff,
            State::Failed { .. } => Phase::Failed,
            State::Stopped => Phase::Stopped,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.phase().fmt(f)
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Code(code) => write!(f, "exit code {code}"),
            ExitReason::Signal(signal) => match nix::sys::signal::Signal::try_from(*signal) {
                Ok(name) => write!(f, "signal {name}"),
                Err(_) => write!(f, "signal {signal}"),
            },
            ExitReason::Oom => f.write_str("oom"),
            ExitReason::SpawnFailed(error) => write!(f, "spawn failed: {error}"),
        }
    }
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailReason::Unlaunchable(reason) => f.write_str(reason),
            FailReason::NeverRestart { code, said } => {
                write!(
                    f,
                    "exited with code {code}, listed in restart.never_restart_exit_codes"
                )?;
                match said {
                    Some(said) => write!(f, ": {said}"),
                    None => Ok(()),
                }
            }
            FailReason::StartLimit { starts, interval } => write!(
                f,
                "start limit hit: {starts} starts within {}",
                humantime::format_duration(*interval)
            ),
            FailReason::ProtocolMismatch { answered, accepted } => write!(
                f,
                "protocol version mismatch: plugin answered {answered}, conductor accepts {accepted:?}"
            ),
        }
    }
}

impl fmt::Display for StopCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopCause::BreakerTripped { failures } => {
                write!(f, "breaker tripped after {failures} failed health checks")
            }
            StopCause::Requested => f.write_str("restart requested"),
            StopCause::Memory => f.write_str("memory stayed above restart.on_memory_above"),
            StopCause::StartupTimeout(t) => write!(
                f,
                "not SERVING within startup_timeout ({})",
                humantime::format_duration(*t)
            ),
        }
    }
}

#[cfg(test)]
#[path = "instance_tests.rs"]
mod tests;
