//! What a refit costs the autoscaler and how well it forecasts, fitted
//! bucket by bucket (before) and on chunk means (after, the default), in
//! one run on the same history: 10-second buckets of a daily cycle with
//! Poisson-like noise, one seasonal period of a day (8,640 buckets), as
//! the defaults configure. Run by `scripts/bench/forecast [ORIGINS]`.

use std::time::{Duration, Instant};

use demi_conductor::scaler::forecast::{self, FitParams, Forecast};

const DAY: usize = 8_640;
const SIZES: [usize; 3] = [1_000, 8_640, 20_000];
/// Buckets forecast per fit: a refit every 5 minutes plus a lead time.
const HORIZON: usize = 40;

fn series(len: usize) -> Vec<f64> {
    let mut rng = fastrand::Rng::with_seed(11);
    (0..len)
        .map(|i| {
            let hour = (i % DAY) as f64 / DAY as f64 * 24.0;
            let morning = 1.0 / (1.0 + (-(hour - 7.5) * 2.2).exp());
            let evening = (-(hour - 19.5).powi(2) / 3.0).exp() * 0.6;
            let mean = 20.0 + 160.0 * morning * (1.0 - morning * 0.3) + 110.0 * evening;
            // Arrivals in a bucket: Poisson, approximated.
            let z = (0..12).map(|_| rng.f64()).sum::<f64>() - 6.0;
            (mean + z * mean.sqrt()).max(0.0)
        })
        .collect()
}

struct Measured {
    median_fit: Duration,
    one_step: f64,
    over_horizon: f64,
    step: usize,
    method: &'static str,
}

fn measure(data: &[f64], size: usize, origins: &[usize], max_points: usize) -> Measured {
    let params = FitParams {
        periods: vec![DAY],
        level: 0.8,
        horizon: HORIZON,
        max_points,
    };
    let mut times = Vec::new();
    let (mut one, mut over) = (0.0, 0.0);
    let mut last: Option<Forecast> = None;
    for &o in origins {
        let started = Instant::now();
        let f = forecast::fit(&data[o - size..o], &params);
        times.push(started.elapsed());
        one += (data[o] - f.point[0]).abs();
        over += (0..HORIZON)
            .map(|h| (data[o + h] - f.point[h]).abs())
            .sum::<f64>()
            / HORIZON as f64;
        last = Some(f);
    }
    times.sort();
    let n = origins.len() as f64;
    Measured {
        median_fit: times[times.len() / 2],
        one_step: one / n,
        over_horizon: over / n,
        step: last.as_ref().map_or(1, |f| f.step),
        method: last.map_or("none", |f| f.method.as_str()),
    }
}

fn main() {
    let origins: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(96);
    let longest = SIZES[SIZES.len() - 1];
    let data = series(longest + DAY / 2 + HORIZON);
    // Spread over half a day, so the errors average over its shapes.
    let spacing = (DAY / 2) / origins.max(1);
    let at: Vec<usize> = (0..origins).map(|i| longest + i * spacing).collect();
    println!(
        "refit of the autoscaler's forecast, {origins} origins, 10-second buckets, period 1 day; \
         errors in jobs/s (mean absolute)"
    );
    println!(
        "{:>7}  {:>22}  {:>22}  {:>8}  {:>22}  {:>22}",
        "points",
        "before: fit (model)",
        "after: fit (model)",
        "speedup",
        "1-step error b / a",
        "40-step error b / a"
    );
    for size in SIZES {
        let before = measure(&data, size, &at, 0);
        let after = measure(&data, size, &at, forecast::MAX_FIT_POINTS);
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{size:>7}  {:>22}  {:>22}  {:>7.1}x  {:>22}  {:>22}",
            format!("{:.1} ms ({})", ms(before.median_fit), before.method),
            format!(
                "{:.1} ms ({}, 1:{})",
                ms(after.median_fit),
                after.method,
                after.step
            ),
            ms(before.median_fit) / ms(after.median_fit).max(1e-6),
            format!(
                "{:.2} / {:.2} ({:+.1} %)",
                before.one_step,
                after.one_step,
                (after.one_step / before.one_step - 1.0) * 100.0
            ),
            format!(
                "{:.2} / {:.2} ({:+.1} %)",
                before.over_horizon,
                after.over_horizon,
                (after.over_horizon / before.over_horizon - 1.0) * 100.0
            ),
        );
    }
}
