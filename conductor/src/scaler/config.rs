//! `[plugins.NAME.autoscale]`: how many replicas a worker plugin runs,
//! decided from its load and a forecast of it.

use std::time::Duration;

use serde::Deserialize;

/// What the scaler measures as a plugin's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Signal {
    /// Jobs submitted per second (from dispatch); capacity is in jobs/s.
    #[default]
    Jobs,
    /// CPU cores used by all instances (from their cgroups), for plugins
    /// that take no jobs; capacity is in cores per replica.
    Cpu,
}

impl Signal {
    pub fn unit(self) -> &'static str {
        match self {
            Signal::Jobs => "jobs/s",
            Signal::Cpu => "cores",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoscaleConfig {
    pub min: u32,
    pub max: u32,
    /// Load one replica handles: jobs/s, or cores for `signal = "cpu"`.
    /// Measured from completed jobs when unset.
    pub capacity: Option<f64>,
    /// Share of the capacity the scaler plans to use; the rest absorbs
    /// what the forecast misses.
    pub target_utilisation: f64,
    pub signal: Signal,
    /// Length of one point of the load history.
    #[serde(with = "humantime_serde")]
    pub bucket: Duration,
    /// How much history the forecaster fits on (capped at
    /// [`MAX_HISTORY_BUCKETS`]).
    #[serde(with = "humantime_serde")]
    pub history: Duration,
    /// Seasons of the load, such as one day.
    #[serde(deserialize_with = "durations")]
    pub seasonal_periods: Vec<Duration>,
    /// How often the model is fitted again.
    #[serde(with = "humantime_serde")]
    pub refit_every: Duration,
    /// A scale-down happens only when every recommendation in this window
    /// allowed it. Shorter than the Kubernetes HPA's 300 s: the forecast's
    /// upper bound already holds what the next lead time may need, and a
    /// pool held five minutes after every spike pays for it in full.
    #[serde(with = "humantime_serde")]
    pub scale_down_stabilization: Duration,
    /// No scale-down sooner than this after a scale-up.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Most replicas added in one decision.
    pub max_step_up: u32,
    /// Extra share on top of the forecast's upper bound, which holds a
    /// scale-down (the pool keeps what that bound needs at full capacity).
    pub headroom: f64,
    /// Coverage of the forecast interval whose upper bound holds a
    /// scale-down; measured from the forecast's recent misses once there
    /// are 50, the model's own before.
    pub forecast_level: f64,
    /// Changes of the needed capacity smaller than this share are ignored.
    pub tolerance: f64,
    /// A CSV of past load (time, value; the format `scale-sim` reads) with
    /// the bucket's step, loaded as history at start, so forecasts need
    /// not wait days for the conductor to gather its own.
    pub history_seed: Option<std::path::PathBuf>,
    /// Longest acceptable queue wait: a backlog that would wait longer at
    /// the replicas asked for is decided on before the bucket ends (jobs
    /// signal); the simulator counts the time it is exceeded.
    #[serde(with = "humantime_serde")]
    pub queue_wait_slo: Duration,
}

fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let spans: Vec<humantime_serde::Serde<Duration>> = Vec::deserialize(d)?;
    Ok(spans.into_iter().map(|s| *s).collect())
}

/// Fits are linear in the history; past this they take seconds.
pub const MAX_HISTORY_BUCKETS: usize = 20_000;

impl Default for AutoscaleConfig {
    fn default() -> Self {
        Self {
            min: 1,
            max: 8,
            capacity: None,
            target_utilisation: 0.7,
            signal: Signal::Jobs,
            bucket: Duration::from_secs(10),
            history: Duration::from_secs(2 * 86_400),
            seasonal_periods: vec![Duration::from_secs(86_400)],
            refit_every: Duration::from_secs(300),
            scale_down_stabilization: Duration::from_secs(60),
            cooldown: Duration::from_secs(60),
            max_step_up: 4,
            headroom: 0.5,
            forecast_level: 0.8,
            tolerance: 0.1,
            queue_wait_slo: Duration::from_secs(1),
            history_seed: None,
        }
    }
}

impl AutoscaleConfig {
    /// Buckets of history kept and fitted on.
    pub fn history_buckets(&self) -> usize {
        self.buckets(self.history).clamp(1, MAX_HISTORY_BUCKETS)
    }

    /// Seasonal periods in buckets.
    pub fn period_buckets(&self) -> Vec<usize> {
        self.seasonal_periods
            .iter()
            .map(|p| self.buckets(*p))
            .collect()
    }

    fn buckets(&self, span: Duration) -> usize {
        if self.bucket.is_zero() {
            return 0;
        }
        (span.as_secs_f64() / self.bucket.as_secs_f64()).round() as usize
    }

    /// Problems serde cannot see, as (field below the plugin, message).
    pub fn problems(&self, min_serving: u32) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let mut bad = |field, msg: String| out.push((field, msg));
        if self.min == 0 {
            bad("autoscale.min", "must be at least 1".into());
        } else if self.min < min_serving {
            bad(
                "autoscale.min",
                format!("{} is below health.min_serving ({min_serving})", self.min),
            );
        }
        if self.max < self.min {
            bad(
                "autoscale.max",
                format!("{} is below autoscale.min ({})", self.max, self.min),
            );
        }
        if let Some(c) = self.capacity
            && !(c > 0.0 && c.is_finite())
        {
            bad("autoscale.capacity", format!("{c} must be above 0"));
        }
        if !(self.target_utilisation > 0.0 && self.target_utilisation <= 1.0) {
            bad(
                "autoscale.target_utilisation",
                format!("{} must be above 0 and at most 1", self.target_utilisation),
            );
        }
        if self.bucket < Duration::from_millis(100) {
            bad("autoscale.bucket", "must be at least 100ms".into());
        }
        if self.refit_every < self.bucket {
            bad(
                "autoscale.refit_every",
                "must not be shorter than autoscale.bucket".into(),
            );
        }
        if !self.bucket.is_zero() && self.buckets(self.history) > MAX_HISTORY_BUCKETS {
            bad(
                "autoscale.history",
                format!(
                    "{} is {} buckets; at most {MAX_HISTORY_BUCKETS} are fitted (make the bucket longer)",
                    humantime::format_duration(self.history),
                    self.buckets(self.history)
                ),
            );
        }
        // (Two buckets of an absurd length overflow: then no period spans them.)
        let two_buckets = self.bucket.checked_mul(2);
        if self
            .seasonal_periods
            .iter()
            .any(|p| two_buckets.is_none_or(|two| *p < two))
        {
            bad(
                "autoscale.seasonal_periods",
                "each period must span at least two buckets".into(),
            );
        }
        if !(self.forecast_level >= 0.5 && self.forecast_level < 1.0) {
            bad(
                "autoscale.forecast_level",
                format!("{} must be at least 0.5 and below 1", self.forecast_level),
            );
        }
        if self.max_step_up == 0 {
            bad("autoscale.max_step_up", "must be at least 1".into());
        }
        for (field, value) in [
            ("autoscale.headroom", self.headroom),
            ("autoscale.tolerance", self.tolerance),
        ] {
            if !(0.0..=1.0).contains(&value) {
                bad(field, format!("{value} must be between 0.0 and 1.0"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = AutoscaleConfig::default();
        assert!(c.problems(1).is_empty(), "{:?}", c.problems(1));
        assert_eq!(c.scale_down_stabilization, Duration::from_secs(60));
        assert_eq!(c.history_buckets(), 17_280);
        assert_eq!(c.period_buckets(), vec![8_640]);
    }

    #[test]
    fn problems_name_their_fields() {
        let c = AutoscaleConfig {
            min: 3,
            max: 2,
            capacity: Some(0.0),
            target_utilisation: 1.5,
            bucket: Duration::from_millis(10),
            history: Duration::from_secs(86_400),
            seasonal_periods: vec![Duration::from_millis(10)],
            max_step_up: 0,
            headroom: -0.1,
            ..AutoscaleConfig::default()
        };
        let fields: Vec<_> = c.problems(1).into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "autoscale.max",
                "autoscale.capacity",
                "autoscale.target_utilisation",
                "autoscale.bucket",
                "autoscale.history",
                "autoscale.seasonal_periods",
                "autoscale.max_step_up",
                "autoscale.headroom"
            ]
        );
        let low = AutoscaleConfig {
            min: 1,
            ..AutoscaleConfig::default()
        };
        assert_eq!(low.problems(2)[0].0, "autoscale.min");
    }
}
