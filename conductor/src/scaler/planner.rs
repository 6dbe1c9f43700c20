//! A plugin's load history, its latest forecast and the decision memory,
//! driven the same way by the live scaler and the simulator: observe a
//! bucket, refit when due (the caller chooses where the fit runs), decide.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use super::decision::{self, Decision, Observation, Outlook, Policy, State};
use super::forecast::{self, FitParams, Forecast};

/// The longest wait between glances: the HPA's sync period, so a coarse
/// bucket (minutes) is not answered slower than a reactive scaler would.
const LONGEST_GLANCE: Duration = Duration::from_secs(15);

/// Glances a bucket takes: ten, more when a tenth of the bucket would be
/// longer than 15 s; a whole number, so a glance ends on the bucket's end.
pub fn glances_per_bucket(bucket: Duration) -> u32 {
    let within_longest = (bucket.as_secs_f64() / LONGEST_GLANCE.as_secs_f64()).ceil();
    within_longest.clamp(10.0, f64::from(u32::MAX)) as u32
}

/// What the planner knows besides the policy.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannerConfig {
    pub policy: Policy,
    /// Buckets kept and fitted on.
    pub window: usize,
    /// Seasonal periods in buckets.
    pub periods: Vec<usize>,
    /// Buckets between fits.
    pub refit_every: usize,
    /// Nominal coverage of the forecast's interval.
    pub level: f64,
}

/// A fit to run: self-contained, so it can move to a blocking thread.
#[derive(Debug)]
pub struct FitJob {
    history: Vec<f64>,
    params: FitParams,
    /// Clock time the forecast's first bucket starts at.
    origin: Duration,
}

impl FitJob {
    pub fn points(&self) -> usize {
        self.history.len()
    }

    /// Buckets the forecast must cover, from its origin.
    pub fn horizon(&self) -> usize {
        self.params.horizon
    }

    /// The CPU-heavy part.
    pub fn run(self) -> Fitted {
        Fitted {
            forecast: Arc::new(forecast::fit(&self.history, &self.params)),
            origin: self.origin,
        }
    }
}

/// A finished fit, ready for [`Planner::install`].
#[derive(Debug, Clone)]
pub struct Fitted {
    pub forecast: Arc<Forecast>,
    pub origin: Duration,
}

#[derive(Debug)]
pub struct Planner {
    config: PlannerConfig,
    history: VecDeque<f64>,
    /// End of the last observed bucket on the scaler's clock.
    clock: Duration,
    since_fit: Option<usize>,
    fitted: Option<Fitted>,
    state: State,
    /// How far the installed forecasts missed each bucket since (actual −
    /// point); the interval is measured from these.
    misses: Misses,
}

/// Misses kept: a few hours of 10-second buckets, so the interval follows
/// how the load behaves now.
const MISSES_KEPT: usize = 1_000;

/// The last [`MISSES_KEPT`] finite misses, in arrival order (to drop the
/// oldest) and sorted: an interval's quantiles are then two look-ups at
/// each refit instead of two selections over a thousand misses, which
/// were half of what a `scale-sim --sweep` cost.
#[derive(Debug, Default)]
struct Misses {
    arrived: VecDeque<f64>,
    sorted: Vec<f64>,
}

impl Misses {
    fn push(&mut self, miss: f64) {
        if !miss.is_finite() {
            return;
        }
        if self.arrived.len() == MISSES_KEPT
            && let Some(oldest) = self.arrived.pop_front()
            && let Ok(at) = self.sorted.binary_search_by(|m| m.total_cmp(&oldest))
        {
            self.sorted.remove(at);
        }
        let at = self.sorted.partition_point(|m| m.total_cmp(&miss).is_lt());
        self.sorted.insert(at, miss);
        self.arrived.push_back(miss);
    }
}

impl Planner {
    pub fn new(config: PlannerConfig) -> Self {
        Self {
            history: VecDeque::with_capacity(config.window.min(4096)),
            config,
            clock: Duration::ZERO,
            since_fit: None,
            fitted: None,
            state: State::default(),
            misses: Misses::default(),
        }
    }

    pub fn config(&self) -> &PlannerConfig {
        &self.config
    }

    /// Records one complete bucket ending at `at`; `NaN` when its load is
    /// unknown.
    pub fn observe(&mut self, at: Duration, value: f64) {
        if self.history.len() == self.config.window {
            self.history.pop_front();
        }
        self.history.push_back(value);
        if let Some(miss) = self.miss(at, value) {
            self.misses.push(miss);
        }
        self.clock = at;
        if let Some(n) = &mut self.since_fit {
            *n += 1;
        }
    }

    /// The last bucket's load, if known.
    pub fn last(&self) -> f64 {
        self.history.back().copied().unwrap_or(f64::NAN)
    }

    pub fn history(&self) -> &VecDeque<f64> {
        &self.history
    }

    /// A fit when one is due: the first one, then every `refit_every`
    /// buckets. The forecast reaches `lead` past the next refit.
    pub fn refit_due(&mut self, lead: Duration) -> Option<FitJob> {
        if self.history.is_empty()
            || self
                .since_fit
                .is_some_and(|n| n < self.config.refit_every.max(1))
        {
            return None;
        }
        self.since_fit = Some(0);
        let bucket = self.config.policy.bucket.as_secs_f64().max(1e-3);
        let lead_buckets = (lead.as_secs_f64() / bucket).ceil() as usize;
        Some(FitJob {
            history: self.history.iter().copied().collect(),
            params: FitParams {
                periods: self.config.periods.clone(),
                level: self.config.level,
                horizon: self.config.refit_every.max(1) + lead_buckets + 1,
                max_points: forecast::MAX_FIT_POINTS,
            },
            origin: self.clock,
        })
    }

    /// How far the installed forecast missed the bucket ending at `at`.
    fn miss(&self, at: Duration, value: f64) -> Option<f64> {
        let fitted = self.fitted.as_ref()?;
        let bucket = self.config.policy.bucket;
        let start = at.checked_sub(bucket)?.checked_sub(fitted.origin)?;
        if !value.is_finite() || bucket.is_zero() {
            return None;
        }
        let i = (start.as_secs_f64() / bucket.as_secs_f64()).round() as usize;
        fitted.forecast.point.get(i).map(|p| value - p)
    }

    /// Installs a fit, its interval measured from the recent misses once
    /// there are enough of them.
    pub fn install(&mut self, fitted: Fitted) {
        let misses = &self.misses.sorted;
        let fitted = match forecast::measured_interval(&fitted.forecast, misses, self.config.level)
        {
            Some(measured) => Fitted {
                forecast: Arc::new(measured),
                origin: fitted.origin,
            },
            None => fitted,
        };
        self.fitted = Some(fitted);
    }

    pub fn fitted(&self) -> Option<&Fitted> {
        self.fitted.as_ref()
    }

    /// Decides at the end of the last observed bucket.
    pub fn decide(&mut self, queued: f64, capacity: f64, current: u32, lead: Duration) -> Decision {
        self.decide_at(self.clock, self.last(), queued, capacity, current, lead)
    }

    /// Decides now, before the bucket under way ends, when `queued` would
    /// wait longer than the SLO at the `current` replicas asked for, or
    /// `rate` (the load of the last glance) would overrun them at the
    /// target utilisation beyond the tolerance: a burst or a ramp answered
    /// at the bucket's end starts its replicas up to a bucket late.
    /// `None` when both can wait for the bucket's decision.
    pub fn glance(
        &mut self,
        now: Duration,
        rate: f64,
        queued: f64,
        capacity: f64,
        current: u32,
        lead: Duration,
    ) -> Option<Decision> {
        let policy = &self.config.policy;
        let slo = policy.queue_wait_slo.as_secs_f64();
        let served = f64::from(current) * capacity;
        // Nothing asked for, or no capacity known (NaN): any backlog waits
        // too long, and no load can be judged against the pool.
        let serves_in_time = served.is_finite() && queued <= slo * served;
        let waits_too_long = queued > 0.0 && !serves_in_time;
        let overruns = served.is_finite()
            && rate > served * policy.target_utilisation * (1.0 + policy.tolerance);
        (waits_too_long || overruns)
            .then(|| self.decide_at(now, rate, queued, capacity, current, lead))
    }

    fn decide_at(
        &mut self,
        now: Duration,
        rate: f64,
        queued: f64,
        capacity: f64,
        current: u32,
        lead: Duration,
    ) -> Decision {
        let seen = Observation {
            now,
            rate,
            queued,
            capacity,
            current,
            lead,
            outlook: self.fitted.as_ref().map(|f| Outlook {
                forecast: &f.forecast,
                origin: f.origin,
            }),
        };
        decision::decide(&self.config.policy, &seen, &mut self.state)
    }

    pub fn state(&self) -> &State {
        &self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scaler::decision::Reason;
    use crate::scaler::forecast::Method;

    const BUCKET: Duration = Duration::from_secs(10);
    const LEAD: Duration = Duration::from_secs(30);

    fn planner(periods: Vec<usize>) -> Planner {
        Planner::new(PlannerConfig {
            policy: Policy {
                min: 1,
                max: 20,
                target_utilisation: 0.7,
                headroom: 0.1,
                tolerance: 0.1,
                stabilization: Duration::from_secs(300),
                cooldown: Duration::from_secs(60),
                max_step_up: 4,
                bucket: BUCKET,
                queue_wait_slo: Duration::from_secs(1),
            },
            window: 2_000,
            periods,
            refit_every: 6,
            level: 0.95,
        })
    }

    /// Runs a load series through the planner with a pool that does what
    /// it is told; returns each decision.
    fn run(planner: &mut Planner, load: &[f64], capacity: f64) -> Vec<Decision> {
        let mut current = planner.config().policy.min;
        let mut out = Vec::new();
        for (i, v) in load.iter().enumerate() {
            planner.observe(BUCKET * (i as u32 + 1), *v);
            if let Some(job) = planner.refit_due(LEAD) {
                let fitted = job.run();
                planner.install(fitted);
            }
            let d = planner.decide(0.0, capacity, current, LEAD);
            current = d.desired;
            out.push(d);
        }
        out
    }

    fn served(decisions: &[Decision], load: &[f64], capacity: f64) -> usize {
        // Buckets where the replicas asked for one lead time earlier
        // could not carry the load.
        let lead = (LEAD.as_secs() / BUCKET.as_secs()) as usize;
        (lead..load.len())
            .filter(|&i| f64::from(decisions[i - lead].desired) * capacity < load[i])
            .count()
    }

    fn daily(days: usize, per_day: usize, base: f64, amplitude: f64) -> Vec<f64> {
        (0..days * per_day)
            .map(|i| {
                let phase = (i % per_day) as f64 / per_day as f64 * std::f64::consts::TAU;
                base + amplitude * phase.sin()
            })
            .collect()
    }

    #[test]
    fn a_coarse_bucket_is_glanced_at_least_every_15_s() {
        let per = |secs| glances_per_bucket(Duration::from_secs(secs));
        assert_eq!((per(1), per(10), per(150)), (10, 10, 10));
        // 300 s: 20 glances of 15 s; 151 s: 11 of 13.7 s, not 10 of 15.1.
        assert_eq!((per(300), per(151)), (20, 11));
    }

    #[test]
    fn ramp_is_followed_upwards_ahead_of_the_load() {
        let load: Vec<f64> = (0..120).map(|i| 5.0 + i as f64).collect();
        let mut p = planner(vec![]);
        let decisions = run(&mut p, &load, 10.0);
        assert!(decisions.last().is_some_and(|d| d.desired >= 13));
        assert_eq!(p.state().direction_changes, 0);
        assert_eq!(served(&decisions, &load, 10.0), 0);
    }

    #[test]
    fn step_up_is_met_at_once_within_the_step_limit() {
        let mut load = vec![10.0; 40];
        load.extend(vec![100.0; 40]);
        let mut p = planner(vec![]);
        let decisions = run(&mut p, &load, 10.0);
        // 100 / (10 × 0.7) = 15: +4 per bucket.
        assert_eq!(decisions[40].desired, decisions[39].desired + 4);
        // 14 carry 98 of the 100 at 70 %: within the tolerance of 15.
        assert!(decisions[45].desired >= 14, "{:?}", decisions[45]);
        assert_eq!(p.state().direction_changes, 0);
    }

    #[test]
    fn a_backlog_over_the_slo_or_a_load_past_the_pool_is_decided_on_before_the_bucket_ends() {
        let mut p = planner(vec![]);
        let decisions = run(&mut p, &[10.0; 20], 10.0);
        let current = decisions[19].desired;
        let mid = BUCKET * 20 + Duration::from_secs(3);
        // A queue the replicas asked for serve within the 1 s SLO waits.
        let within = f64::from(current) * 10.0 * 0.9;
        assert_eq!(p.glance(mid, 10.0, within, 10.0, current, LEAD), None);
        // A burst: 60 jobs/s over the last glance and 300 queued.
        let d = p
            .glance(mid, 60.0, 300.0, 10.0, current, LEAD)
            .expect("a backlog over the SLO is decided on");
        assert_eq!(d.at, mid);
        assert_eq!(d.reason, Reason::UpForLoad);
        assert_eq!(d.desired, current + 4, "{d:?}");
        // With nothing asked for, any backlog is over the SLO.
        assert!(p.glance(mid, 1.0, 1.0, 10.0, 0, LEAD).is_some());

        // Nothing queued yet, but a load past the pool's target (70 % of
        // 10 per replica) plus the 10 % tolerance: a ramp.
        let at_target = f64::from(current) * 10.0 * 0.7;
        assert_eq!(
            p.glance(mid, at_target * 1.09, 0.0, 10.0, current, LEAD),
            None
        );
        let d = p
            .glance(mid, at_target * 1.5, 0.0, 10.0, current, LEAD)
            .expect("a load past the tolerance is decided on");
        assert_eq!(d.reason, Reason::UpForLoad);
        assert!(d.desired > current, "{d:?}");
        // Without a capacity the load cannot be judged: the bucket decides.
        assert_eq!(p.glance(mid, 1e6, 0.0, f64::NAN, current, LEAD), None);
    }

    #[test]
    fn seasonal_load_is_forecast_and_met_before_each_peak() {
        // Six "days" of 48 buckets; the scaler sees the peaks coming.
        let load = daily(6, 48, 60.0, 50.0);
        let mut p = planner(vec![48]);
        let decisions = run(&mut p, &load, 10.0);
        let fitted = p.fitted().map(|f| f.forecast.method);
        assert_eq!(fitted, Some(Method::Mstl));
        // After two days of history, upward decisions are made for the
        // forecast, not only for the load already there.
        let ahead = decisions[96..]
            .iter()
            .filter(|d| d.reason == Reason::UpForForecast)
            .count();
        assert!(ahead > 0, "no decision used the forecast");
        let misses: usize = served(&decisions[96..], &load[96..], 10.0);
        assert_eq!(misses, 0, "under-provisioned buckets after warm-up");
    }

    #[test]
    fn flat_noisy_load_does_not_oscillate() {
        let mut rng = fastrand::Rng::with_seed(7);
        let load: Vec<f64> = (0..600).map(|_| 50.0 + 10.0 * (rng.f64() - 0.5)).collect();
        let mut p = planner(vec![]);
        run(&mut p, &load, 10.0);
        assert_eq!(
            p.state().direction_changes,
            0,
            "changes: {}",
            p.state().changes
        );
        assert!(p.state().changes <= 3, "changes: {}", p.state().changes);
    }

    #[test]
    fn flat_load_holds_steady() {
        let load = vec![21.0; 200];
        let mut p = planner(vec![]);
        let decisions = run(&mut p, &load, 10.0);
        assert!(
            decisions[1..]
                .iter()
                .all(|d| d.desired == decisions[0].desired)
        );
        // 21 jobs/s at 7 per replica (70 % of 10).
        assert_eq!(decisions[0].desired, 3);
    }

    #[test]
    fn missing_buckets_are_interpolated_not_read_as_zero() {
        let mut load = vec![70.0; 100];
        for v in &mut load[50..60] {
            *v = f64::NAN;
        }
        let mut p = planner(vec![]);
        let decisions = run(&mut p, &load, 10.0);
        // The gap neither scales the pool down nor breaks the forecast.
        assert!(decisions[50..60].iter().all(|d| d.desired >= 10));
        assert!(
            p.fitted()
                .is_some_and(|f| f.forecast.imputed >= 10 || f.forecast.point[0] > 60.0)
        );
    }

    #[test]
    fn fit_failure_falls_back_and_still_decides() {
        // Too short for AutoETS: the last value, with the reason kept.
        let mut p = planner(vec![48]);
        let decisions = run(&mut p, &[30.0, 31.0, 29.0], 10.0);
        let fitted = p
            .fitted()
            .map(|f| (f.forecast.method, f.forecast.fallback_reason()));
        assert!(
            matches!(fitted, Some((Method::LastValue, Some(_)))),
            "{fitted:?}"
        );
        assert!(decisions.last().is_some_and(|d| d.desired >= 5));
    }

    #[test]
    fn history_is_capped_at_the_window() {
        let mut p = planner(vec![]);
        for i in 0..2_500 {
            p.observe(BUCKET * i, 1.0);
        }
        assert_eq!(p.history().len(), 2_000);
    }

    #[test]
    fn misses_stay_sorted_and_the_oldest_go_first() {
        let miss = |i: usize| ((i * 7919) % 101) as f64 - 50.0;
        let mut m = Misses::default();
        m.push(f64::NAN);
        // Values repeat: the oldest goes by value among equal ones.
        for i in 0..MISSES_KEPT + 10 {
            m.push(miss(i));
        }
        let mut expected: Vec<f64> = (10..MISSES_KEPT + 10).map(miss).collect();
        assert!(m.arrived.iter().eq(expected.iter()));
        expected.sort_by(f64::total_cmp);
        assert_eq!(m.sorted, expected);
    }

    #[test]
    fn the_interval_is_measured_from_the_forecasts_misses() {
        // A steady 50 with ±3 of noise: the measured interval is about that
        // wide, however wide the model's own is.
        let mut rng = fastrand::Rng::with_seed(3);
        let load: Vec<f64> = (0..300).map(|_| 50.0 + 6.0 * (rng.f64() - 0.5)).collect();
        let mut p = planner(vec![]);
        run(&mut p, &load, 10.0);
        let f = p.fitted().map(|f| f.forecast.clone()).expect("fitted");
        assert!(f.measured_from >= 200, "{}", f.measured_from);
        let width = f.upper[0] - f.point[0];
        assert!(width > 1.0 && width < 4.0, "{width}");
    }
}
