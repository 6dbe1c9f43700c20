//! `conductor scale-sim`: a load trace replayed in virtual time against a
//! model of a worker pool (start-up lead time, per-replica capacity, a
//! queue), for three policies side by side: the conductor's predictive
//! scaler (the very [`Planner`] the daemon runs), the Kubernetes HPA
//! algorithm with its defaults, and a static pool at max; for sweeps also
//! the predictive scaler in hindsight: its forecasts replaced by the
//! trace's own level, what the best forecaster of the load's pattern
//! would have said.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use demi_conductor::scaler::config::AutoscaleConfig;
use demi_conductor::scaler::decision::{self, Ahead, Outlook, Policy};
use demi_conductor::scaler::forecast::{self, Method};
use demi_conductor::scaler::planner::{FitJob, Fitted, Planner, PlannerConfig, glances_per_bucket};

/// How the pool and the policies are modelled. Durations are virtual:
/// every trace bucket lasts `bucket`.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    pub autoscale: AutoscaleConfig,
    /// Load one replica serves, in the trace's unit per second.
    pub capacity: f64,
    /// From asking for a replica to it taking load.
    pub startup: Duration,
    /// Longest acceptable queue wait.
    pub slo: Duration,
    /// Seasonal periods, in buckets.
    pub periods: Vec<usize>,
    /// Buckets of history the forecaster fits on.
    pub window: usize,
}

impl SimConfig {
    fn bucket(&self) -> Duration {
        self.autoscale.bucket
    }

    fn refit_every(&self) -> usize {
        let b = self.bucket().as_secs_f64();
        ((self.autoscale.refit_every.as_secs_f64() / b).round() as usize).max(1)
    }
}

/// One policy's replay.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    pub policy: &'static str,
    /// Replicas asked for at the end of each bucket.
    pub replicas: Vec<u32>,
    /// Time the queue wait exceeded the SLO.
    pub violation: Duration,
    /// Separate spells of it: on spiky load the violation comes from a
    /// handful of spikes, and a reader judging two policies should know
    /// how many spells their difference rests on.
    pub spells: u32,
    pub replica_seconds: f64,
    pub scale_events: u32,
    pub direction_changes: u32,
    /// Longest queue wait seen, seconds (infinite with no replica ready).
    pub max_wait: f64,
}

/// The policies replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Predictive,
    Reactive,
    Static,
    /// The predictive scaler with every forecast's point replaced by the
    /// trace's level ([`level`]) over the forecast's span: a bound on what
    /// a better forecaster could gain, so that what no forecaster can
    /// see coming (a spike) is told apart from what ours misses.
    Hindsight,
}

impl Kind {
    /// The policies of one replay.
    pub const ALL: [Kind; 3] = [Kind::Predictive, Kind::Reactive, Kind::Static];
    /// The policies of a sweep: hindsight is a bound on a frontier, not a
    /// setting to compare one run with.
    pub const SWEPT: [Kind; 4] = [
        Kind::Predictive,
        Kind::Reactive,
        Kind::Static,
        Kind::Hindsight,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Predictive => "predictive",
            Kind::Reactive => "reactive (HPA)",
            Kind::Static => "static at max",
            Kind::Hindsight => "hindsight",
        }
    }
}

/// One cause of falling back, met `count` times at histories of
/// `shortest..=longest` buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct Fallbacks {
    pub cause: String,
    pub count: usize,
    pub shortest: usize,
    pub longest: usize,
}

/// What the forecaster did over a replay.
#[derive(Debug, Clone, Default)]
pub struct FitStats {
    pub fits: usize,
    pub methods: Vec<(Method, usize)>,
    pub fallbacks: Vec<Fallbacks>,
    pub fit_time: Duration,
}

impl FitStats {
    fn fell_back(&mut self, f: Fallbacks) {
        match self.fallbacks.iter_mut().find(|g| g.cause == f.cause) {
            Some(g) => {
                g.count += f.count;
                g.shortest = g.shortest.min(f.shortest);
                g.longest = g.longest.max(f.longest);
            }
            None => self.fallbacks.push(f),
        }
    }
}

/// The fits of a replay, in order. Every replay observes the trace
/// itself (load offered does not depend on the policy), so the fits are
/// the same for every policy setting: a sweep fits once, in the first
/// replay, and the others read them here, at their own level.
#[derive(Debug)]
pub struct Fits {
    done: Vec<Fitted>,
    /// The level the fits were made at.
    level: f64,
    pub stats: FitStats,
}

impl Fits {
    pub fn new(level: f64) -> Self {
        Self {
            done: Vec::new(),
            level,
            stats: FitStats::default(),
        }
    }

    /// The `n`th fit of a replay, made now if it was not before.
    pub fn get(&mut self, n: usize, job: FitJob) -> Fitted {
        if let Some(fitted) = self.done.get(n) {
            return fitted.clone();
        }
        let points = job.points();
        let started = Instant::now();
        let fitted = job.run();
        let stats = &mut self.stats;
        stats.fits += 1;
        stats.fit_time += started.elapsed();
        count(&mut stats.methods, fitted.forecast.method);
        if !fitted.forecast.fallback.is_empty() {
            let causes: Vec<String> = fitted.forecast.fallback.iter().map(|s| s.cause()).collect();
            stats.fell_back(Fallbacks {
                cause: causes.join("; "),
                count: 1,
                shortest: points,
                longest: points,
            });
        }
        self.done.push(fitted.clone());
        fitted
    }

    /// The `n`th fit as if made at `level`: a model's interval is point ±
    /// z·σ, so another level only rescales it.
    pub fn at_level(&self, n: usize, level: f64) -> Option<Fitted> {
        let fitted = self.done.get(n)?;
        if level == self.level {
            return Some(fitted.clone());
        }
        Some(Fitted {
            forecast: Arc::new(forecast::at_level(&fitted.forecast, self.level, level)),
            origin: fitted.origin,
        })
    }
}

/// Everything a replay of the three policies produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub runs: Vec<Run>,
    /// The forecast the predictive policy held for each bucket.
    pub forecast: Vec<Option<Ahead>>,
    pub stats: FitStats,
}

/// Longest sub-step, seconds: the queue moves faster than a glance, and
/// the HPA syncs every 15 s whatever the bucket.
const MAX_SUBSTEP: f64 = 1.0;
/// The HPA's sync period and scale-up policies (`max(+100 %, +4)` per
/// period), and its tolerance.
const HPA_PERIOD: Duration = Duration::from_secs(15);
const HPA_TOLERANCE: f64 = 0.1;
/// The HPA's default scale-down stabilization.
const HPA_STABILIZATION: Duration = Duration::from_secs(300);

/// A pool of replicas that take `startup` to become ready, serving a
/// queue at `capacity` each.
struct Pool {
    /// Virtual time each replica is (or becomes) ready, sorted.
    ready_at: Vec<f64>,
    queue: f64,
    startup: f64,
}

impl Pool {
    fn new(replicas: u32) -> Self {
        Self {
            ready_at: vec![0.0; replicas as usize],
            queue: 0.0,
            startup: 0.0,
        }
    }

    fn requested(&self) -> u32 {
        self.ready_at.len() as u32
    }

    fn ready(&self, t: f64) -> u32 {
        self.ready_at.iter().filter(|r| **r <= t).count() as u32
    }

    /// Grows with replicas ready after the start-up time; shrinks the
    /// youngest first (those still starting go before serving ones).
    fn scale(&mut self, t: f64, to: u32) {
        let to = to as usize;
        while self.ready_at.len() < to {
            self.ready_at.push(t + self.startup);
        }
        self.ready_at.truncate(to);
    }
}

enum Controller {
    Predictive {
        planner: Box<Planner>,
        lead: Duration,
    },
    Reactive(Hpa),
    Static,
}

/// The Kubernetes HPA for an average-value metric: desired = ceil(load /
/// (capacity × target)), skipped within the tolerance, scale-up limited
/// to max(+100 %, +4) per period, scale-down to the highest
/// recommendation of the stabilization window.
struct Hpa {
    min: u32,
    max: u32,
    per_replica: f64,
    window: VecDeque<(f64, u32)>,
}

impl Hpa {
    fn sync(&mut self, t: f64, rate: f64, current: u32) -> u32 {
        let ratio = rate / (f64::from(current.max(1)) * self.per_replica);
        let recommended = if (ratio - 1.0).abs() <= HPA_TOLERANCE {
            current
        } else {
            ((rate / self.per_replica).ceil() as u32).clamp(self.min, self.max)
        };
        self.window.push_back((t, recommended));
        let horizon = HPA_STABILIZATION.as_secs_f64();
        while self.window.front().is_some_and(|(at, _)| t - at > horizon) {
            self.window.pop_front();
        }
        let stabilized = if recommended < current {
            self.window
                .iter()
                .map(|(_, r)| *r)
                .max()
                .unwrap_or(recommended)
        } else {
            recommended
        };
        let up_limit = current.saturating_mul(2).max(current.saturating_add(4));
        stabilized.min(up_limit).clamp(self.min, self.max)
    }
}

/// Replays `values` (one per bucket, `NaN` = no data, simulated as no
/// load) for the three policies. `progress(done, total)` is called as
/// buckets are simulated.
pub fn simulate(
    values: &[f64],
    config: &SimConfig,
    mut progress: impl FnMut(usize, usize),
) -> Outcome {
    let total = values.len() * Kind::ALL.len();
    let mut fits = Fits::new(config.autoscale.forecast_level);
    let mut forecast = vec![None; values.len()];
    let mut runs = Vec::new();
    for (k, kind) in Kind::ALL.into_iter().enumerate() {
        let done = k * values.len();
        let run = replay(
            values,
            config,
            kind,
            &mut |n, job| fits.get(n, job),
            Some(&mut forecast),
            &mut |n| progress(done + n, total),
        );
        runs.push(run);
    }
    Outcome {
        runs,
        forecast,
        stats: fits.stats,
    }
}

/// Replays one policy with the settings in `config`. `fit(n, job)` gives
/// the replay's `n`th fit; `forecast`, when given, receives the predictive
/// policy's forecast per bucket.
pub fn replay(
    values: &[f64],
    config: &SimConfig,
    kind: Kind,
    fit: &mut dyn FnMut(usize, FitJob) -> Fitted,
    mut forecast: Option<&mut [Option<Ahead>]>,
    progress: &mut dyn FnMut(usize),
) -> Run {
    let a = &config.autoscale;
    let known = (kind == Kind::Hindsight).then(|| level(values, &config.periods));
    let mut controller = match kind {
        Kind::Predictive | Kind::Hindsight => Controller::Predictive {
            planner: Box::new(Planner::new(PlannerConfig {
                policy: Policy::from(a),
                window: config.window.max(1),
                periods: config.periods.clone(),
                refit_every: config.refit_every(),
                level: a.forecast_level,
            })),
            lead: config.startup + config.bucket(),
        },
        Kind::Reactive => Controller::Reactive(Hpa {
            min: a.min,
            max: a.max,
            per_replica: config.capacity * a.target_utilisation,
            window: VecDeque::new(),
        }),
        Kind::Static => Controller::Static,
    };
    let name = kind.name();
    let mut fitted_so_far = 0;
    let bucket = config.bucket().as_secs_f64();
    // The predictive policy looks at the backlog and the load between
    // bucket ends as often as the daemon does.
    let glances = glances_per_bucket(config.bucket());
    let per_glance = (bucket / f64::from(glances) / MAX_SUBSTEP).ceil().max(1.0) as u32;
    let substeps = glances * per_glance;
    let dt = bucket / f64::from(substeps);
    let slo = config.slo.as_secs_f64();
    // The trace starts with the system already running: sized for the
    // first bucket's load, as any policy would have left it.
    let first = values
        .iter()
        .copied()
        .find(|v| v.is_finite())
        .unwrap_or(0.0);
    let warm = (first / (config.capacity * a.target_utilisation)).ceil() as u32;
    let initial = match controller {
        Controller::Static => a.max,
        _ => warm.clamp(a.min, a.max),
    };
    let mut pool = Pool::new(initial);
    pool.startup = config.startup.as_secs_f64();
    let load = |i: usize| {
        values
            .get(i)
            .copied()
            .filter(|v| v.is_finite())
            .unwrap_or(0.0)
    };
    let mut run = Run {
        policy: name,
        replicas: Vec::with_capacity(values.len()),
        violation: Duration::ZERO,
        spells: 0,
        replica_seconds: 0.0,
        scale_events: 0,
        direction_changes: 0,
        max_wait: 0.0,
    };
    let mut violation = 0.0;
    let mut was_late = false;
    let mut last_direction: Option<bool> = None;
    let mut apply = |pool: &mut Pool, t: f64, to: u32, run: &mut Run| {
        let from = pool.requested();
        if to == from {
            return;
        }
        let up = to > from;
        if last_direction.is_some_and(|d| d != up) {
            run.direction_changes += 1;
        }
        last_direction = Some(up);
        run.scale_events += 1;
        pool.scale(t, to);
    };
    let hpa_period = HPA_PERIOD.as_secs_f64();
    let mut next_sync = hpa_period;
    let mut last_sync = 0.0;
    let mut sync_arrivals = 0.0;
    for (i, value) in values.iter().enumerate() {
        let (from, to) = (load(i), load(i + 1));
        let mut arrivals = 0.0;
        let mut glance_arrivals = 0.0;
        for s in 0..substeps {
            let t = i as f64 * bucket + f64::from(s) * dt;
            // Linear between bucket starts: ramps, not stairs.
            let frac = (f64::from(s) + 0.5) / f64::from(substeps);
            let rate = from + (to - from) * frac;
            let ready = f64::from(pool.ready(t));
            let served = ready * config.capacity * dt;
            pool.queue = (pool.queue + rate * dt - served).max(0.0);
            let wait = if pool.queue <= 1e-9 {
                0.0
            } else if ready > 0.0 {
                pool.queue / (ready * config.capacity)
            } else {
                f64::INFINITY
            };
            run.max_wait = run.max_wait.max(wait);
            let late = wait > slo;
            if late {
                violation += dt;
                if !was_late {
                    run.spells += 1;
                }
            }
            was_late = late;
            run.replica_seconds += f64::from(pool.requested()) * dt;
            arrivals += rate * dt;
            glance_arrivals += rate * dt;
            sync_arrivals += rate * dt;
            let end = t + dt;
            if let Controller::Predictive { planner, lead } = &mut controller
                && (s + 1) % per_glance == 0
            {
                // The glance's load, without the daemon's allowance for
                // counting noise: the trace's unit need not count anything.
                let seen = glance_arrivals / (dt * f64::from(per_glance));
                glance_arrivals = 0.0;
                let d = planner.glance(
                    Duration::from_secs_f64(end),
                    seen,
                    pool.queue,
                    config.capacity,
                    pool.requested(),
                    *lead,
                );
                if let Some(d) = d {
                    apply(&mut pool, end, d.desired, &mut run);
                }
            }
            if let Controller::Reactive(hpa) = &mut controller
                && end + 1e-9 >= next_sync
            {
                // The rate since the last sync: a sub-step need not end on
                // the period.
                let rate = sync_arrivals / (end - last_sync);
                let desired = hpa.sync(end, rate, pool.requested());
                apply(&mut pool, end, desired, &mut run);
                sync_arrivals = 0.0;
                last_sync = end;
                next_sync += hpa_period;
            }
        }
        let end = (i + 1) as f64 * bucket;
        if let Controller::Predictive { planner, lead } = &mut controller {
            let now = Duration::from_secs_f64(end);
            let observed = if value.is_finite() {
                arrivals / bucket
            } else {
                0.0
            };
            planner.observe(now, observed);
            if let Some(job) = planner.refit_due(*lead) {
                let fitted = match &known {
                    Some(level) => hindsight(level, i + 1, job.horizon(), now),
                    None => {
                        let n = fitted_so_far;
                        fitted_so_far += 1;
                        fit(n, job)
                    }
                };
                planner.install(fitted);
            }
            let d = planner.decide(pool.queue, config.capacity, pool.requested(), *lead);
            apply(&mut pool, end, d.desired, &mut run);
            if let (Some(f), Some(slot), Kind::Predictive) = (
                planner.fitted(),
                forecast.as_mut().and_then(|f| f.get_mut(i + 1)),
                kind,
            ) {
                let outlook = Outlook {
                    forecast: &f.forecast,
                    origin: f.origin,
                };
                *slot = decision::ahead(&outlook, now, now, config.bucket());
            }
        }
        run.replicas.push(pool.requested());
        progress(i + 1);
    }
    run.violation = Duration::from_secs_f64(violation);
    run
}

/// The trace's level: each bucket's median over a 24th of the shortest
/// seasonal period either side of it (an hour of a day), which a spike of
/// a few buckets does not move. Gaps are left out; a window of gaps only
/// is no load, as the replay treats it.
pub fn level(values: &[f64], periods: &[usize]) -> Vec<f64> {
    let half = periods.iter().min().map_or(3, |p| (p / 24).max(1));
    let mut window = Vec::with_capacity(2 * half + 1);
    (0..values.len())
        .map(|i| {
            window.clear();
            let around = i.saturating_sub(half)..(i + half + 1).min(values.len());
            window.extend(values[around].iter().copied().filter(|v| v.is_finite()));
            window.sort_by(f64::total_cmp);
            match window.len() {
                0 => 0.0,
                n if n % 2 == 1 => window[n / 2],
                n => (window[n / 2 - 1] + window[n / 2]) / 2.0,
            }
        })
        .collect()
}

/// A "forecast" of `horizon` buckets from bucket `first` that is the
/// trace's level itself; its interval is left to the planner to measure
/// from the misses, as it does for a real forecast.
fn hindsight(level: &[f64], first: usize, horizon: usize, origin: Duration) -> Fitted {
    let last = level.last().copied().unwrap_or(0.0);
    let point: Vec<f64> = (first..first + horizon)
        .map(|i| level.get(i).copied().unwrap_or(last))
        .collect();
    Fitted {
        forecast: Arc::new(forecast::Forecast {
            method: Method::Known,
            fallback: Vec::new(),
            lower: point.clone(),
            upper: point.clone(),
            point,
            imputed: 0,
            measured_from: 0,
            step: 1,
        }),
        origin,
    }
}

fn count<T: PartialEq>(counts: &mut Vec<(T, usize)>, key: T) {
    match counts.iter_mut().find(|(k, _)| *k == key) {
        Some((_, n)) => *n += 1,
        None => counts.push((key, 1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(capacity: f64) -> SimConfig {
        SimConfig {
            autoscale: AutoscaleConfig {
                min: 1,
                max: 20,
                refit_every: Duration::from_secs(60),
                ..AutoscaleConfig::default()
            },
            capacity,
            startup: Duration::from_secs(30),
            slo: Duration::from_secs(1),
            periods: vec![48],
            window: 48 * 7,
        }
    }

    #[test]
    fn the_pool_model_queues_what_capacity_cannot_serve() {
        // Twice the load one replica serves: the static pool of 20 keeps
        // up, a pool stuck at min would not.
        let values = vec![20.0; 30];
        let mut c = config(10.0);
        c.autoscale.max = 1;
        let outcome = simulate(&values, &c, |_, _| {});
        let stuck = &outcome.runs[2];
        assert_eq!(stuck.replicas, vec![1; 30]);
        // The queue grows by 10 jobs/s from the start: over the SLO after
        // one second, so for nearly the whole 300 s.
        assert!(
            stuck.violation.as_secs_f64() > 290.0,
            "{:?}",
            stuck.violation
        );
        assert!((stuck.replica_seconds - 300.0).abs() < 1e-6);
    }

    #[test]
    fn each_spike_over_the_slo_is_one_spell() {
        // One replica serving 10 jobs/s at a load of 5, with two spikes to
        // 30 far enough apart for the queue to drain between them.
        let calm = [5.0; 20];
        let values: Vec<f64> = [&calm[..], &[30.0], &calm[..], &[30.0], &calm[..]].concat();
        let mut c = config(10.0);
        c.autoscale.max = 1;
        let stuck = &simulate(&values, &c, |_, _| {}).runs[2];
        assert_eq!(stuck.spells, 2, "{stuck:?}");
        assert!(stuck.violation > Duration::ZERO, "{stuck:?}");
        let calm = simulate(&[5.0; 60], &c, |_, _| {});
        assert_eq!(
            (calm.runs[2].spells, calm.runs[2].violation),
            (0, Duration::ZERO)
        );
    }

    #[test]
    fn hpa_follows_the_kubernetes_rules() {
        let mut hpa = Hpa {
            min: 1,
            max: 50,
            per_replica: 10.0,
            window: VecDeque::new(),
        };
        // 200/s needs 20; from 2 at most max(4, 6) = 6.
        assert_eq!(hpa.sync(15.0, 200.0, 2), 6);
        assert_eq!(hpa.sync(30.0, 200.0, 6), 12);
        assert_eq!(hpa.sync(45.0, 200.0, 12), 20);
        // Within 10 %: no change.
        assert_eq!(hpa.sync(60.0, 215.0, 20), 20);
        // Load gone: held by the 300 s window, then down.
        assert_eq!(hpa.sync(75.0, 10.0, 20), 20);
        assert_eq!(hpa.sync(350.0, 10.0, 20), 20);
        assert_eq!(hpa.sync(400.0, 10.0, 20), 1);
    }

    #[test]
    fn the_level_passes_over_a_spike_and_a_gap() {
        let mut values = vec![10.0; 48];
        values[20] = 500.0;
        values[21] = 300.0;
        values[30] = f64::NAN;
        // A 24th of 48 either side: medians of five.
        let level = level(&values, &[48]);
        assert_eq!(level, vec![10.0; 48]);
        assert_eq!(self::level(&[f64::NAN; 3], &[48]), vec![0.0; 3]);
    }

    #[test]
    fn hindsight_is_told_the_level_and_fits_nothing() {
        // A step from 10 to 100 half-way: the level knows it is coming.
        let values: Vec<f64> = (0..240)
            .map(|i| if i < 120 { 10.0 } else { 100.0 })
            .collect();
        let c = config(10.0);
        let mut fit = |_: usize, _: FitJob| -> Fitted { panic!("hindsight fits nothing") };
        let known = replay(&values, &c, Kind::Hindsight, &mut fit, None, &mut |_| {});
        let reactive = replay(&values, &c, Kind::Reactive, &mut fit, None, &mut |_| {});
        // Replicas for the step are asked for before it, at most a lead
        // time (30 s start-up + a 10 s bucket = 4 buckets) early.
        let first_up = known.replicas.iter().position(|r| *r > 2);
        assert!(
            first_up.is_some_and(|i| (115..120).contains(&i)),
            "{:?}",
            known.replicas
        );
        assert!(known.violation < reactive.violation, "{known:?}");
    }

    #[test]
    fn a_coarse_bucket_keeps_the_hpa_at_its_own_period() {
        // Five-minute buckets: the HPA still syncs every 15 s on the rate
        // since its last sync, so a steady load keeps the pool it was
        // sized for (50 / (10 x 0.7) = 8), not one for twice the rate.
        let values = vec![50.0; 12];
        let mut c = config(10.0);
        c.autoscale.bucket = Duration::from_secs(300);
        let mut fit = |_: usize, _: FitJob| -> Fitted { panic!("the HPA fits nothing") };
        let hpa = replay(&values, &c, Kind::Reactive, &mut fit, None, &mut |_| {});
        assert_eq!(hpa.replicas, vec![8; 12]);
        assert_eq!((hpa.scale_events, hpa.violation), (0, Duration::ZERO));
    }

    #[test]
    fn static_pool_costs_max_for_the_whole_trace() {
        let values = vec![5.0; 10];
        let outcome = simulate(&values, &config(10.0), |_, _| {});
        let fixed = &outcome.runs[2];
        assert_eq!(fixed.scale_events, 0);
        assert!((fixed.replica_seconds - 20.0 * 100.0).abs() < 1e-6);
    }
}
