//! The conductor's domain events: what happened to instances, plugins and
//! jobs, published by the component that saw it. Consumers subscribe
//! without the publisher knowing them: telemetry turns each event into a
//! log line and metrics, the API streams them to `WatchEvents`, health
//! aggregation and dispatch follow instances, the scaler measures starts.
//!
//! Also the names the rest of the conductor shares for instance states
//! ([`Phase`]), mapped to strings only at the API and metrics edge.

mod bus;

pub use bus::{Bus, Sink, Stamped};

use std::sync::Arc;
use std::time::Duration;

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Starting,
    Serving,
    Unhealthy,
    Stopping,
    Backoff,
    Failed,
    Stopped,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Starting,
        Phase::Serving,
        Phase::Unhealthy,
        Phase::Stopping,
        Phase::Backoff,
        Phase::Failed,
        Phase::Stopped,
    ];

    /// The name operators read in logs, `conductor status` and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Serving => "serving",
            Phase::Unhealthy => "unhealthy",
            Phase::Stopping => "stopping",
            Phase::Backoff => "backoff",
            Phase::Failed => "failed",
            Phase::Stopped => "stopped",
        }
    }

    /// Not running and not coming back by itself.
    pub fn is_down(self) -> bool {
        matches!(self, Phase::Stopped | Phase::Failed)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a periodic health check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOutcome {
    Serving,
    NotServing,
    Timeout,
    Error,
}

/// Why an instance is started again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestartCause {
    /// An operator asked.
    Requested,
    /// Its memory stayed above `restart.on_memory_above`.
    Memory,
    /// The previous process ended this way (a bounded label: every spawn
    /// error is one class).
    Exit(String),
}

impl RestartCause {
    /// A bounded label, for metrics and status.
    pub fn label(&self) -> &str {
        match self {
            RestartCause::Requested => "requested",
            RestartCause::Memory => "memory",
            RestartCause::Exit(label) => label,
        }
    }
}

/// Something that happened to one instance.
#[derive(Debug, Clone, PartialEq)]
pub enum InstanceEvent {
    Spawned,
    SpawnFailed {
        error: String,
    },
    Exited {
        reason: String,
        ran: Duration,
        /// The conductor stopped it on purpose (not a crash).
        requested: bool,
    },
    HealthChecked {
        outcome: CheckOutcome,
        took: Duration,
    },
    HealthFailed {
        why: String,
        failures: u32,
    },
    PhaseChanged {
        from: Phase,
        to: Phase,
    },
    /// Ready for the first time in this process's life.
    Serving {
        startup: Duration,
        breaker: String,
    },
    /// Serving again after failed health checks.
    Recovered,
    BreakerTripped {
        cause: String,
    },
    Stopping {
        then: String,
    },
    RestartScheduled {
        delay: Duration,
        attempt: u32,
    },
    Restarting {
        cause: RestartCause,
    },
    Failed {
        reason: String,
    },
    Stopped,
    /// The state machine refused an event (a bug, said loudly).
    IllegalTransition {
        from: Phase,
        event: String,
    },
}

/// Something that happened to one job.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    Submitted,
    /// Answered; `took` is from acceptance to answer, `waited` from
    /// acceptance to the first attempt (the queue wait the autoscaler's
    /// SLO is about).
    Completed {
        took: Duration,
        waited: Duration,
    },
    /// One delivery failed (each attempt counts).
    AttemptFailed,
    Retried,
    /// Given up; `waited` is from acceptance to the first attempt, or to
    /// the dead letter when no attempt was made: a job the SLO failed
    /// worst is not left out of the queue wait.
    DeadLettered {
        job: String,
        attempts: u32,
        errors: Vec<String>,
        waited: Duration,
    },
}

/// One autoscaler decision.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoscaleDecision {
    pub plugin: Arc<str>,
    pub from: u32,
    pub to: u32,
    pub recommended: u32,
    pub reason: String,
    /// Load of the last bucket.
    pub load: f64,
    /// Forecast over the lead time: point, lower, upper.
    pub forecast: Option<(f64, f64, f64)>,
    pub capacity: f64,
    pub lead: Duration,
    pub model: Option<&'static str>,
    /// The whole decision in a sentence, as `WatchEvents` shows it.
    pub detail: String,
    /// It changed something (replicas or the reason), so it is news.
    pub notable: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Instance {
        plugin: Arc<str>,
        instance: u32,
        /// The process the event is about, if any.
        pid: Option<u32>,
        what: InstanceEvent,
    },
    /// A plugin's replica count changed (operator or autoscaler).
    Scaled {
        plugin: Arc<str>,
        from: u32,
        to: u32,
    },
    /// A new configuration is in force.
    Reloaded {
        added: Vec<String>,
        removed: Vec<String>,
        changed: Vec<String>,
        unchanged: usize,
    },
    Autoscaled(Box<AutoscaleDecision>),
    Job {
        plugin: Arc<str>,
        what: JobEvent,
    },
    /// A dependency of `plugin` dropped below its `min_serving` (`ready`
    /// false) or is back.
    Dependency {
        plugin: Arc<str>,
        dependency: String,
        ready: bool,
    },
    /// A call on the plugin API, by one instance of `plugin`.
    PluginApi {
        plugin: Arc<str>,
        instance: u32,
        what: PluginApiEvent,
    },
}

/// What a plugin did on the plugin API that is counted.
#[derive(Debug, Clone, PartialEq)]
pub enum PluginApiEvent {
    /// A call outside the plugin's rights (an operator RPC, a job for a
    /// plugin not in its `submits_to`, another plugin's job).
    Denied { method: String, reason: String },
    /// A turn under a shared limit, after `waited`.
    Granted { limit: String, waited: Duration },
    /// No turn before the caller's deadline.
    Refused { limit: String },
}

impl Event {
    pub fn instance(
        plugin: &Arc<str>,
        instance: u32,
        pid: Option<u32>,
        what: InstanceEvent,
    ) -> Self {
        Event::Instance {
            plugin: plugin.clone(),
            instance,
            pid,
            what,
        }
    }

    /// The plugin the event is about; `None` for the whole conductor.
    pub fn plugin(&self) -> Option<&str> {
        match self {
            Event::Instance { plugin, .. }
            | Event::Scaled { plugin, .. }
            | Event::Job { plugin, .. }
            | Event::Dependency { plugin, .. }
            | Event::PluginApi { plugin, .. } => Some(plugin),
            Event::Autoscaled(decision) => Some(&decision.plugin),
            Event::Reloaded { .. } => None,
        }
    }

    /// Whether stream subscribers get it: per-job events and periodic
    /// checks are many and only counted.
    fn streamed(&self) -> bool {
        !matches!(
            self,
            Event::Job { .. }
                | Event::PluginApi { .. }
                | Event::Instance {
                    what: InstanceEvent::HealthChecked { .. },
                    ..
                }
        )
    }
}
