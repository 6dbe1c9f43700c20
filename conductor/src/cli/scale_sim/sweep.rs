//! `scale-sim --sweep`: each policy replayed over a range of its own knob,
//! so that policies are compared at equal cost: SLO-violation time against
//! replica-seconds, and the frontier of the settings no other setting of
//! the same policy beats on both.

use demi_conductor::scaler::planner::FitJob;

use super::sim::{self, FitStats, Fits, Kind, SimConfig};

/// Target utilisations swept for the HPA and the predictive policy: from
/// a pool mostly idle to one nearly full, in steps fine enough that the
/// frontier is a curve, not a staircase.
const TARGETS: (f64, f64, f64) = (0.3, 0.95, 0.025);
const HEADROOMS: &[f64] = &[0.0, 0.1, 0.25, 0.5];
const LEVELS: &[f64] = &[0.8, 0.9, 0.95];

/// One setting of one policy and what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub kind: Kind,
    /// The setting, as an operator would write it.
    pub knob: String,
    /// The configuration scale-sim was given (or the defaults).
    pub default: bool,
    pub violation: f64,
    /// Separate spells of violation.
    pub spells: u32,
    pub replica_seconds: f64,
}

impl Point {
    /// At most `share` of `other`'s violation at no more of its cost.
    pub fn dominates(&self, other: &Point, share: f64) -> bool {
        self.violation <= other.violation * share + 1e-9
            && self.replica_seconds <= other.replica_seconds + 1e-9
    }
}

/// Everything a sweep produced.
#[derive(Debug, Clone)]
pub struct Sweep {
    pub points: Vec<Point>,
    pub stats: FitStats,
}

/// The settings replayed: each with the config it runs under.
fn settings(config: &SimConfig) -> Vec<(Kind, String, bool, SimConfig)> {
    let given = &config.autoscale;
    let mut out = Vec::new();
    let mut with = |kind, knob: String, change: &dyn Fn(&mut SimConfig)| {
        let mut c = config.clone();
        change(&mut c);
        let default = c == *config;
        out.push((kind, knob, default, c));
    };
    let (low, high, step) = TARGETS;
    let steps = ((high - low) / step).round() as usize;
    // Rounded so that the setting prints as written.
    let swept: Vec<f64> = (0..=steps)
        .map(|i| ((low + step * i as f64) * 1000.0).round() / 1000.0)
        .collect();
    let targets = and_given(&swept, given.target_utilisation);
    let headrooms = and_given(HEADROOMS, given.headroom);
    let levels = and_given(LEVELS, given.forecast_level);
    // Hindsight over the same settings: the bound is for each setting.
    for kind in [Kind::Predictive, Kind::Hindsight] {
        for &level in &levels {
            for &target in &targets {
                for &headroom in &headrooms {
                    with(
                        kind,
                        format!("target {target}, headroom {headroom}, level {level}"),
                        &|c| {
                            c.autoscale.target_utilisation = target;
                            c.autoscale.headroom = headroom;
                            c.autoscale.forecast_level = level;
                        },
                    );
                }
            }
        }
    }
    for &target in &targets {
        with(Kind::Reactive, format!("target {target}"), &|c| {
            c.autoscale.target_utilisation = target;
        });
    }
    for replicas in given.min..=given.max {
        with(Kind::Static, format!("{replicas} replicas"), &|c| {
            c.autoscale.max = replicas;
        });
    }
    out
}

/// `values` and `given`, sorted, once each.
fn and_given(values: &[f64], given: f64) -> Vec<f64> {
    let mut out = values.to_vec();
    out.push(given);
    out.sort_by(f64::total_cmp);
    out.dedup();
    out
}

/// Replays every setting; `progress(done, total)` counts replays. The
/// configuration given is replayed first and makes the fits; the rest
/// read them and run on every core.
pub fn sweep(
    values: &[f64],
    config: &SimConfig,
    progress: impl FnMut(usize, usize) + Send,
) -> Sweep {
    let mut settings = settings(config);
    let total = settings.len();
    let first = settings
        .iter()
        .position(|(kind, _, default, _)| *kind == Kind::Predictive && *default)
        .unwrap_or(0);
    let (kind, knob, default, c) = settings.remove(first);
    let mut fits = Fits::new(c.autoscale.forecast_level);
    let run = sim::replay(
        values,
        &c,
        kind,
        &mut |n, job| fits.get(n, job),
        None,
        &mut |_| {},
    );
    let point = |kind, knob, default, run: sim::Run| Point {
        kind,
        knob,
        default,
        violation: run.violation.as_secs_f64(),
        spells: run.spells,
        replica_seconds: run.replica_seconds,
    };
    let mut points = vec![point(kind, knob, default, run)];
    let progress = std::sync::Mutex::new((1, progress));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = settings.len().div_ceil(threads).max(1);
    let fits = &fits;
    let rest: Vec<Point> = std::thread::scope(|scope| {
        let workers: Vec<_> = settings
            .chunks(chunk)
            .map(|part| {
                let progress = &progress;
                scope.spawn(move || {
                    part.iter()
                        .map(|(kind, knob, default, c)| {
                            let level = c.autoscale.forecast_level;
                            let mut fit = |n, job: FitJob| {
                                fits.at_level(n, level).unwrap_or_else(|| job.run())
                            };
                            let run = sim::replay(values, c, *kind, &mut fit, None, &mut |_| {});
                            if let Ok(mut p) = progress.lock() {
                                p.0 += 1;
                                let done = p.0;
                                (p.1)(done, total);
                            }
                            point(*kind, knob.clone(), *default, run)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            // A replay that panicked is a bug to see, not points to drop.
            .flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    points.extend(rest);
    Sweep {
        points,
        stats: fits.stats.clone(),
    }
}

/// The settings of `kind` that no other setting of it beats on both
/// violation and cost, cheapest first.
pub fn frontier(points: &[Point], kind: Kind) -> Vec<&Point> {
    let mut own: Vec<&Point> = points.iter().filter(|p| p.kind == kind).collect();
    own.sort_by(|a, b| {
        a.replica_seconds
            .total_cmp(&b.replica_seconds)
            .then(a.violation.total_cmp(&b.violation))
    });
    let mut out: Vec<&Point> = Vec::new();
    for p in own {
        if out.last().is_none_or(|last| p.violation < last.violation) {
            out.push(p);
        }
    }
    out
}

/// For each HPA setting, the cheapest predictive setting with at most
/// `share` of its violation at no more of its cost, if there is one.
pub fn against_hpa(points: &[Point], share: f64) -> Vec<(&Point, Option<&Point>)> {
    let ours: Vec<&Point> = points
        .iter()
        .filter(|p| p.kind == Kind::Predictive)
        .collect();
    points
        .iter()
        .filter(|p| p.kind == Kind::Reactive)
        .map(|hpa| {
            let best = ours
                .iter()
                .copied()
                .filter(|p| p.dominates(hpa, share))
                .min_by(|a, b| a.replica_seconds.total_cmp(&b.replica_seconds));
            (hpa, best)
        })
        .collect()
}

/// The least share of `hpa`'s violation a setting of `kind` reaches at
/// no more of its cost (`None` when every setting costs more); 0 when
/// both are free of violation.
pub fn least_share(points: &[Point], kind: Kind, hpa: &Point) -> Option<f64> {
    points
        .iter()
        .filter(|p| p.kind == kind && p.replica_seconds <= hpa.replica_seconds + 1e-9)
        .map(|p| match (p.violation, hpa.violation) {
            (v, h) if h > 0.0 => v / h,
            (v, _) if v > 0.0 => f64::INFINITY,
            _ => 0.0,
        })
        .min_by(f64::total_cmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(kind: Kind, violation: f64, cost: f64) -> Point {
        Point {
            kind,
            knob: format!("{violation}/{cost}"),
            default: false,
            violation,
            spells: u32::from(violation > 0.0),
            replica_seconds: cost,
        }
    }

    #[test]
    fn the_frontier_keeps_only_settings_nothing_beats() {
        let points = vec![
            point(Kind::Reactive, 10.0, 100.0),
            point(Kind::Reactive, 12.0, 110.0),
            point(Kind::Reactive, 2.0, 150.0),
            point(Kind::Reactive, 0.0, 300.0),
            point(Kind::Reactive, 0.0, 200.0),
            point(Kind::Static, 0.0, 50.0),
        ];
        let f: Vec<(f64, f64)> = frontier(&points, Kind::Reactive)
            .iter()
            .map(|p| (p.violation, p.replica_seconds))
            .collect();
        assert_eq!(f, vec![(10.0, 100.0), (2.0, 150.0), (0.0, 200.0)]);
    }

    #[test]
    fn an_hpa_setting_is_matched_only_at_half_its_violation_and_no_more_cost() {
        let points = vec![
            point(Kind::Reactive, 10.0, 100.0),
            point(Kind::Reactive, 0.0, 200.0),
            point(Kind::Predictive, 6.0, 90.0),
            point(Kind::Predictive, 5.0, 100.0),
            point(Kind::Predictive, 0.0, 201.0),
        ];
        let matched: Vec<Option<f64>> = against_hpa(&points, 0.5)
            .iter()
            .map(|(_, ours)| ours.map(|p| p.replica_seconds))
            .collect();
        assert_eq!(matched, vec![Some(100.0), None]);
    }

    #[test]
    fn the_least_share_is_of_the_settings_at_no_more_cost() {
        let hpa = point(Kind::Reactive, 10.0, 100.0);
        let points = vec![
            point(Kind::Hindsight, 1.0, 101.0),
            point(Kind::Hindsight, 7.0, 100.0),
            point(Kind::Hindsight, 8.0, 60.0),
            point(Kind::Predictive, 2.0, 50.0),
        ];
        assert_eq!(least_share(&points, Kind::Hindsight, &hpa), Some(0.7));
        assert_eq!(
            least_share(&points, Kind::Hindsight, &point(Kind::Reactive, 0.0, 100.0)),
            Some(f64::INFINITY)
        );
        assert_eq!(least_share(&points, Kind::Static, &hpa), None);
    }
}
