//! `[plugins.NAME.dispatch]`: how jobs reach a plugin's replicas.

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {
    /// Jobs waiting for a replica; past it, Submit answers
    /// RESOURCE_EXHAUSTED at once instead of growing memory.
    pub queue_capacity: usize,
    /// Jobs in flight to the whole plugin (the bulkhead): a slow plugin
    /// holds at most this many tasks of the conductor.
    pub max_in_flight: usize,
    /// Jobs in flight to one replica.
    pub max_in_flight_per_replica: usize,
    /// How long one delivery may take before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Deliveries before a job that keeps failing is dead-lettered.
    pub max_attempts: u32,
    /// Delay before the first retry; later ones grow by `retry_multiplier`.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    pub retry_multiplier: f64,
    /// Each retry delay is scaled by a random factor in `1 ± retry_jitter`.
    pub retry_jitter: f64,
    /// How long `SubmitAndWait` (without a deadline of its own) waits while
    /// the plugin has no live replica before it answers UNAVAILABLE; the
    /// job stays queued and is delivered once a replica is back.
    #[serde(with = "humantime_serde")]
    pub wait_without_replicas: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 10_000,
            max_in_flight: 256,
            max_in_flight_per_replica: 64,
            attempt_timeout: Duration::from_secs(30),
            max_attempts: 5,
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_secs(5),
            retry_multiplier: 2.0,
            retry_jitter: 0.2,
            wait_without_replicas: Duration::from_secs(30),
        }
    }
}

impl DispatchConfig {
    /// Problems serde cannot see, as (field below the plugin, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (field, value) in [
            ("dispatch.queue_capacity", self.queue_capacity),
            ("dispatch.max_in_flight", self.max_in_flight),
            (
                "dispatch.max_in_flight_per_replica",
                self.max_in_flight_per_replica,
            ),
        ] {
            if value == 0 {
                out.push((field, "must be at least 1".to_owned()));
            }
        }
        if self.max_attempts == 0 {
            out.push(("dispatch.max_attempts", "must be at least 1".into()));
        }
        for (field, value) in [
            ("dispatch.attempt_timeout", self.attempt_timeout),
            ("dispatch.wait_without_replicas", self.wait_without_replicas),
        ] {
            if value.is_zero() {
                out.push((field, "must be longer than 0s".into()));
            }
        }
        if !(self.retry_multiplier >= 1.0 && self.retry_multiplier.is_finite()) {
            out.push((
                "dispatch.retry_multiplier",
                format!("{} must be at least 1.0", self.retry_multiplier),
            ));
        }
        if !(0.0..=1.0).contains(&self.retry_jitter) {
            out.push((
                "dispatch.retry_jitter",
                format!("{} must be between 0.0 and 1.0", self.retry_jitter),
            ));
        }
        out
    }
}

/// `[conductor.jobs]`: what the job store keeps of finished jobs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// How long a completed job's answer can still be looked up
    /// (`GetJob`, `WaitJob`, `conductor job`), and its idempotency key
    /// still names it. "0s" keeps none.
    #[serde(with = "humantime_serde")]
    pub keep_answers: Duration,
    /// At most this much answer data is kept; the oldest go first.
    #[serde(with = "crate::process::cgroup::config::size")]
    pub keep_answers_bytes: bytesize::ByteSize,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            keep_answers: Duration::from_secs(600),
            keep_answers_bytes: bytesize::ByteSize::mib(64),
        }
    }
}
