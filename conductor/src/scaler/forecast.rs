//! Load forecasts from a bucketed history: MSTL with an AutoETS trend when
//! the history covers two seasonal periods, AutoETS otherwise, and a plain
//! fallback (seasonal naive, last value) when a fit fails or data is short.
//!
//! Fitting is CPU work that grows linearly with the history (about 44 ms
//! per 1,000 points for AutoETS): callers run [`fit`] off the async
//! runtime and cap the window.

use augurs::ets::AutoETS;
use augurs::mstl::MSTLModel;
use augurs::{Fit as _, Predict as _};

/// Which model produced a forecast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// MSTL decomposition with an AutoETS trend model.
    Mstl,
    /// Non-seasonal AutoETS ("ZZN").
    Ets,
    /// The value one season ago.
    SeasonalNaive,
    /// The last observed value.
    LastValue,
    /// The load's level known in advance: only `scale-sim`'s hindsight
    /// reference makes these, never the live scaler.
    Known,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Mstl => "mstl",
            Method::Ets => "ets",
            Method::SeasonalNaive => "seasonal_naive",
            Method::LastValue => "last_value",
            Method::Known => "known",
        }
    }
}

/// What a fit needs besides the data.
#[derive(Debug, Clone, PartialEq)]
pub struct FitParams {
    /// Seasonal periods, in buckets.
    pub periods: Vec<usize>,
    /// Nominal coverage of the prediction interval (0.95).
    pub level: f64,
    /// Buckets to forecast past the end of the history.
    pub horizon: usize,
    /// Longest history fitted bucket by bucket; a longer one is fitted on
    /// the means of consecutive buckets, as few as bring it under this.
    /// 0: never.
    pub max_points: usize,
}

/// What [`FitParams::max_points`] defaults to: AutoETS costs ~45 µs per
/// point and MSTL more, so a day of 10-second buckets fitted point by
/// point took ~250-400 ms; on at most 1,000 means a sixth of that, and the
/// next bucket is forecast as well (`scripts/bench/forecast`).
pub const MAX_FIT_POINTS: usize = 1_000;

/// Why a richer model was not used.
#[derive(Debug, Clone, PartialEq)]
pub enum Shortfall {
    NoData,
    /// The history does not cover two of any seasonal period.
    ShortForSeasons {
        points: usize,
        needed: usize,
    },
    ShortForEts {
        points: usize,
    },
    FitFailed {
        model: &'static str,
        error: String,
    },
    NotFinite {
        model: &'static str,
    },
}

impl Shortfall {
    /// The reason without the history's length, so that the same cause
    /// met at different lengths reads as one.
    pub fn cause(&self) -> String {
        match self {
            Shortfall::NoData => "no data yet".to_owned(),
            Shortfall::ShortForSeasons { needed, .. } => {
                format!("history shorter than two seasonal periods ({needed} buckets)")
            }
            Shortfall::ShortForEts { .. } => {
                format!("history too short for AutoETS (needs {MIN_ETS_POINTS} buckets)")
            }
            Shortfall::FitFailed { model, error } => format!("{model} fit failed: {error}"),
            Shortfall::NotFinite { model } => format!("{model} forecast was not finite"),
        }
    }
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shortfall::ShortForSeasons { points, needed } => write!(
                f,
                "history of {points} buckets is shorter than two seasonal periods ({needed} buckets)"
            ),
            Shortfall::ShortForEts { points } => write!(
                f,
                "history of {points} buckets is too short for AutoETS (needs {MIN_ETS_POINTS})"
            ),
            other => f.write_str(&other.cause()),
        }
    }
}

/// A forecast of the buckets following a history, all in the history's
/// unit (jobs/s, say), never negative.
#[derive(Debug, Clone, PartialEq)]
pub struct Forecast {
    pub method: Method,
    /// Why a richer model was not used, when it was not.
    pub fallback: Vec<Shortfall>,
    pub point: Vec<f64>,
    pub lower: Vec<f64>,
    pub upper: Vec<f64>,
    /// Buckets in the history that had no data and were interpolated.
    pub imputed: usize,
    /// Misses the interval was measured from; 0 when it is the model's.
    pub measured_from: usize,
    /// Buckets per point the model was fitted on (1, or more for a long
    /// history; see [`FitParams::max_points`]).
    pub step: usize,
}

impl Forecast {
    /// Buckets this forecast covers.
    pub fn len(&self) -> usize {
        self.point.len()
    }

    pub fn is_empty(&self) -> bool {
        self.point.is_empty()
    }

    /// The fallback's reasons as one line, if it fell back.
    pub fn fallback_reason(&self) -> Option<String> {
        (!self.fallback.is_empty()).then(|| {
            let why: Vec<String> = self.fallback.iter().map(|s| s.to_string()).collect();
            why.join("; ")
        })
    }
}

/// Fewest misses a measured interval is drawn from.
pub const MIN_MISSES: usize = 50;

/// The forecast with its interval replaced by one measured from how far
/// recent forecasts missed the load they forecast (actual − point): split
/// conformal prediction. A model's nominal interval assumes Gaussian
/// errors; on bursty load the spikes inflate its spread everywhere, while
/// the quantiles of real misses stay where most of the load is. `misses`
/// are finite and sorted (by `total_cmp`). `None` with fewer than
/// [`MIN_MISSES`] misses.
pub fn measured_interval(forecast: &Forecast, misses: &[f64], level: f64) -> Option<Forecast> {
    if misses.len() < MIN_MISSES {
        return None;
    }
    let level = level.clamp(0.0, 1.0);
    let last = (misses.len() - 1) as f64;
    let quantile = |q: f64| misses[(last * q).round() as usize];
    let (below, above) = (quantile((1.0 - level) / 2.0), quantile((1.0 + level) / 2.0));
    let measured_from = misses.len();
    let mut out = forecast.clone();
    // An interval never excludes its own point.
    out.lower = out
        .point
        .iter()
        .map(|p| (p + below).min(*p).max(0.0))
        .collect();
    out.upper = out.point.iter().map(|p| (p + above).max(*p)).collect();
    out.measured_from = measured_from;
    Some(out)
}

/// Fewest points AutoETS is given: below this its estimates are noise.
const MIN_ETS_POINTS: usize = 8;

/// Fits the best model the history allows and forecasts `params.horizon`
/// buckets. Missing buckets are `NaN`; they are interpolated first. Never
/// fails: a model that cannot be fitted falls back to a simpler one and
/// says why in [`Forecast::fallback`].
pub fn fit(history: &[f64], params: &FitParams) -> Forecast {
    let (data, imputed) = impute(history);
    let horizon = params.horizon.max(1);
    let mut forecast = if data.is_empty() {
        fallback_last(&data, horizon, params.level, vec![Shortfall::NoData])
    } else if params.max_points > 0 && data.len() > params.max_points {
        coarse(&data, params, horizon)
    } else {
        fit_models(&data, params, horizon)
    };
    forecast.imputed = imputed;
    for v in forecast
        .point
        .iter_mut()
        .chain(&mut forecast.lower)
        .chain(&mut forecast.upper)
    {
        *v = v.max(0.0);
    }
    forecast
}

/// Fits on the means of `k` consecutive buckets (the newest chunk ends at
/// the newest bucket; the oldest `len % k` are dropped) with periods
/// divided by `k`, and draws the forecast back at bucket resolution by
/// linear interpolation between chunk centres, from the last observed
/// chunk on. A chunk mean varies √k times less than a bucket, so the
/// model's interval is widened by √k.
fn coarse(data: &[f64], params: &FitParams, horizon: usize) -> Forecast {
    let k = data.len().div_ceil(params.max_points);
    let skip = data.len() % k;
    let means: Vec<f64> = data[skip..]
        .chunks_exact(k)
        .map(|c| c.iter().sum::<f64>() / k as f64)
        .collect();
    let coarse_params = FitParams {
        periods: params
            .periods
            .iter()
            .map(|p| (*p as f64 / k as f64).round() as usize)
            .collect(),
        level: params.level,
        horizon: horizon.div_ceil(k) + 1,
        max_points: 0,
    };
    let fitted = fit_models(&means, &coarse_params, coarse_params.horizon);
    let last = means.last().copied().unwrap_or(0.0);
    let widen = (k as f64).sqrt();
    // Chunk c of the forecast is centred (k - 1) / 2 buckets after its
    // start; the last observed one (c = -1) k buckets before that.
    let at = |series: &[f64], anchor: f64, j: usize| {
        let centre = (k as f64 - 1.0) / 2.0;
        let x = (j as f64 - centre) / k as f64;
        let c = x.floor();
        let value = |c: f64| {
            if c < 0.0 {
                anchor
            } else {
                series
                    .get(c as usize)
                    .or(series.last())
                    .copied()
                    .unwrap_or(anchor)
            }
        };
        let t = x - c;
        value(c) + t * (value(c + 1.0) - value(c))
    };
    let point: Vec<f64> = (0..horizon).map(|j| at(&fitted.point, last, j)).collect();
    let spread = |bound: &[f64]| -> Vec<f64> {
        let gaps: Vec<f64> = bound
            .iter()
            .zip(&fitted.point)
            .map(|(b, p)| (b - p) * widen)
            .collect();
        (0..horizon)
            .map(|j| at(&gaps, gaps.first().copied().unwrap_or(0.0), j))
            .collect()
    };
    let (below, above) = (spread(&fitted.lower), spread(&fitted.upper));
    Forecast {
        lower: point.iter().zip(&below).map(|(p, b)| p + b).collect(),
        upper: point.iter().zip(&above).map(|(p, b)| p + b).collect(),
        point,
        step: k,
        ..fitted
    }
}

fn fit_models(data: &[f64], params: &FitParams, horizon: usize) -> Forecast {
    let mut periods: Vec<usize> = params
        .periods
        .iter()
        .copied()
        .filter(|&p| p >= 2 && data.len() >= 2 * p)
        .collect();
    periods.sort_unstable();
    periods.dedup();
    let mut why = Vec::new();
    if !params.periods.is_empty() && periods.is_empty() {
        // Two of the shortest period would have been enough for MSTL.
        let shortest = params.periods.iter().filter(|&&p| p >= 2).min();
        why.push(Shortfall::ShortForSeasons {
            points: data.len(),
            needed: 2 * shortest.copied().unwrap_or(2),
        });
    }
    if !periods.is_empty() {
        let ets = AutoETS::non_seasonal().into_trend_model();
        let fitted = MSTLModel::new(periods.clone(), ets)
            .fit(data)
            .map_err(|e| e.to_string())
            .and_then(|m| m.predict(horizon, params.level).map_err(|e| e.to_string()));
        if let Some(forecast) = accepted(Method::Mstl, fitted, horizon, &mut why) {
            return Forecast {
                fallback: why,
                ..forecast
            };
        }
    }
    if data.len() >= MIN_ETS_POINTS {
        // "ZZN" lets AutoETS pick error and trend; fixed specs with trend N
        // ("ANN") fail to fit in augurs.
        let fitted = AutoETS::new(1, "ZZN")
            .map_err(|e| e.to_string())
            .and_then(|m| m.fit(data).map_err(|e| e.to_string()))
            .and_then(|m| m.predict(horizon, params.level).map_err(|e| e.to_string()));
        if let Some(forecast) = accepted(Method::Ets, fitted, horizon, &mut why) {
            return Forecast {
                fallback: why,
                ..forecast
            };
        }
    } else {
        why.push(Shortfall::ShortForEts { points: data.len() });
    }
    match params
        .periods
        .iter()
        .copied()
        .filter(|&p| p >= 2 && data.len() >= p)
        .max()
    {
        Some(period) => seasonal_naive(data, period, horizon, params.level, why),
        None => fallback_last(data, horizon, params.level, why),
    }
}

/// A fitted model's forecast, or `None` with the reason added to `why`.
fn accepted(
    method: Method,
    fitted: Result<augurs::Forecast, String>,
    horizon: usize,
    why: &mut Vec<Shortfall>,
) -> Option<Forecast> {
    let name = match method {
        Method::Mstl => "MSTL",
        _ => "AutoETS",
    };
    match fitted {
        Ok(f) => {
            let forecast = from_augurs(method, f, horizon);
            if forecast.is_none() {
                why.push(Shortfall::NotFinite { model: name });
            }
            forecast
        }
        Err(error) => {
            why.push(Shortfall::FitFailed { model: name, error });
            None
        }
    }
}

fn from_augurs(method: Method, f: augurs::Forecast, horizon: usize) -> Option<Forecast> {
    let (lower, upper) = match f.intervals {
        Some(i) => (i.lower, i.upper),
        None => (f.point.clone(), f.point.clone()),
    };
    let finite = |v: &[f64]| v.len() == horizon && v.iter().all(|x| x.is_finite());
    if !(finite(&f.point) && finite(&lower) && finite(&upper)) {
        return None;
    }
    Some(Forecast {
        method,
        fallback: Vec::new(),
        measured_from: 0,
        step: 1,
        point: f.point,
        lower,
        upper,
        imputed: 0,
    })
}

/// The forecast with its interval, made at `from`, rescaled to the
/// nominal coverage `to`: every interval here is point ± z·spread.
pub fn at_level(forecast: &Forecast, from: f64, to: f64) -> Forecast {
    let scale = z(to) / z(from);
    let mut out = forecast.clone();
    for (bound, p) in out.lower.iter_mut().zip(&forecast.point) {
        *bound = (p - (p - *bound) * scale).max(0.0);
    }
    for (bound, p) in out.upper.iter_mut().zip(&forecast.point) {
        *bound = p + (*bound - p) * scale;
    }
    out
}

/// z for a two-sided interval of nominal coverage `level`, for the few
/// levels operators use; others get the 95 % value.
fn z(level: f64) -> f64 {
    match level {
        l if l >= 0.99 => 2.576,
        l if l >= 0.95 => 1.96,
        l if l >= 0.9 => 1.645,
        l if l >= 0.8 => 1.282,
        _ => 1.0,
    }
}

/// Next value = the value one period ago; the interval comes from how far
/// that rule missed on the history.
fn seasonal_naive(
    data: &[f64],
    period: usize,
    horizon: usize,
    level: f64,
    why: Vec<Shortfall>,
) -> Forecast {
    let misses: Vec<f64> = data.windows(period + 1).map(|w| w[period] - w[0]).collect();
    let spread = z(level) * std_dev(&misses);
    let start = data.len() - period;
    let point: Vec<f64> = (0..horizon).map(|h| data[start + h % period]).collect();
    bands(Method::SeasonalNaive, point, spread, why)
}

fn fallback_last(data: &[f64], horizon: usize, level: f64, why: Vec<Shortfall>) -> Forecast {
    let steps: Vec<f64> = data.windows(2).map(|w| w[1] - w[0]).collect();
    let spread = z(level) * std_dev(&steps);
    let last = data.last().copied().unwrap_or(0.0);
    bands(Method::LastValue, vec![last; horizon], spread, why)
}

fn bands(method: Method, point: Vec<f64>, spread: f64, why: Vec<Shortfall>) -> Forecast {
    Forecast {
        method,
        fallback: why,
        measured_from: 0,
        step: 1,
        lower: point.iter().map(|p| p - spread).collect(),
        upper: point.iter().map(|p| p + spread).collect(),
        point,
        imputed: 0,
    }
}

fn std_dev(values: &[f64]) -> f64 {
    if values.len() < 2 {
        return 0.0;
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len() - 1) as f64;
    var.sqrt()
}

/// Fills missing (non-finite) buckets by linear interpolation between their
/// neighbours, and the edges with the nearest value. Models reject NaN.
pub fn impute(history: &[f64]) -> (Vec<f64>, usize) {
    let known: Vec<usize> = (0..history.len())
        .filter(|&i| history[i].is_finite())
        .collect();
    let (Some(&first), Some(&last)) = (known.first(), known.last()) else {
        return (Vec::new(), history.len());
    };
    let mut out = history.to_vec();
    let mut missing = 0;
    for v in &mut out[..first] {
        *v = history[first];
        missing += 1;
    }
    for v in &mut out[last + 1..] {
        *v = history[last];
        missing += 1;
    }
    for pair in known.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        for (i, v) in out.iter_mut().enumerate().take(b).skip(a + 1) {
            let t = (i - a) as f64 / (b - a) as f64;
            *v = history[a] + t * (history[b] - history[a]);
            missing += 1;
        }
    }
    (out, missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(periods: Vec<usize>, horizon: usize) -> FitParams {
        FitParams {
            periods,
            level: 0.95,
            horizon,
            max_points: 0,
        }
    }

    fn daily(days: usize, per_day: usize) -> Vec<f64> {
        (0..days * per_day)
            .map(|i| {
                let phase = (i % per_day) as f64 / per_day as f64 * std::f64::consts::TAU;
                100.0 + 50.0 * phase.sin()
            })
            .collect()
    }

    #[test]
    fn seasonal_history_uses_mstl_and_follows_the_season() {
        let history = daily(4, 24);
        let f = fit(&history, &params(vec![24], 24));
        assert_eq!(f.method, Method::Mstl, "{:?}", f.fallback);
        assert!(f.fallback.is_empty());
        // The next day repeats the pattern: peak at hour 6, trough at 18.
        assert!((f.point[6] - 150.0).abs() < 10.0, "{:?}", f.point);
        assert!((f.point[18] - 50.0).abs() < 10.0, "{:?}", f.point);
        for h in 0..24 {
            assert!(f.lower[h] <= f.point[h] && f.point[h] <= f.upper[h]);
        }
    }

    #[test]
    fn one_season_of_history_falls_back_to_ets_and_says_why() {
        let history = daily(1, 24);
        let f = fit(&history, &params(vec![24], 4));
        assert_eq!(f.method, Method::Ets);
        let why = f.fallback_reason().unwrap_or_default();
        assert!(why.contains("shorter than two seasonal periods"), "{why}");
    }

    #[test]
    fn a_ramp_is_extrapolated() {
        let history: Vec<f64> = (0..60).map(|i| 10.0 + 2.0 * i as f64).collect();
        let f = fit(&history, &params(vec![], 5));
        assert_eq!(f.method, Method::Ets);
        assert!(f.point[4] > history[59] + 5.0, "{:?}", f.point);
    }

    #[test]
    fn short_history_falls_back_to_last_value() {
        let f = fit(&[5.0, 7.0, 6.0], &params(vec![24], 3));
        assert_eq!(f.method, Method::LastValue);
        assert_eq!(f.point, vec![6.0; 3]);
        assert!(
            f.fallback_reason()
                .unwrap_or_default()
                .contains("too short")
        );
        assert!(f.upper[0] > 6.0 && f.lower[0] < 6.0);
    }

    #[test]
    fn no_data_forecasts_zero() {
        let f = fit(&[f64::NAN, f64::NAN], &params(vec![], 3));
        assert_eq!(f.method, Method::LastValue);
        assert_eq!(f.point, vec![0.0; 3]);
        assert_eq!(f.imputed, 2);
        assert_eq!(f.fallback, vec![Shortfall::NoData]);
    }

    #[test]
    fn a_failed_fit_falls_back_to_seasonal_naive() {
        // A constant series makes AutoETS's likelihood degenerate; whatever
        // augurs does with it, the result must be finite and flat.
        let mut history = vec![3.0; 30];
        history.extend(daily(1, 24).iter().map(|v| v / 10.0));
        let f = fit(&history, &params(vec![24], 24));
        assert!(f.point.iter().all(|v| v.is_finite()));
        let naive = seasonal_naive(&history, 24, 24, 0.95, Vec::new());
        assert_eq!(naive.point[..], history[history.len() - 24..]);
        assert!(naive.upper[0] > naive.point[0]);
    }

    #[test]
    fn gaps_are_interpolated_and_counted() {
        let (filled, missing) = impute(&[f64::NAN, 2.0, f64::NAN, f64::NAN, 8.0, f64::NAN]);
        assert_eq!(filled, vec![2.0, 2.0, 4.0, 6.0, 8.0, 8.0]);
        assert_eq!(missing, 4);
        let mut history = daily(3, 24);
        for v in &mut history[30..40] {
            *v = f64::NAN;
        }
        let f = fit(&history, &params(vec![24], 24));
        assert_eq!(f.imputed, 10);
        assert_eq!(f.method, Method::Mstl);
    }

    #[test]
    fn forecasts_are_never_negative() {
        let history: Vec<f64> = (0..40).map(|i| 100.0 - 3.0 * i as f64).collect();
        let f = fit(&history, &params(vec![], 30));
        assert!(f.point.iter().chain(&f.lower).all(|v| *v >= 0.0));
    }

    #[test]
    fn a_measured_interval_follows_the_misses_not_the_model() {
        let f = fit(&daily(3, 24), &params(vec![24], 4));
        // Misses: mostly small, a few large spikes above.
        let mut misses: Vec<f64> = (0..95).map(|i| (i % 5) as f64 - 2.0).collect();
        misses.extend([40.0, 50.0, 60.0, 70.0, 80.0]);
        misses.sort_by(f64::total_cmp);
        let m = measured_interval(&f, &misses, 0.8).expect("enough misses");
        assert_eq!(m.measured_from, 100);
        // The 90th percentile is a small miss; the spikes are beyond it.
        for h in 0..4 {
            assert_eq!(m.upper[h], m.point[h] + 2.0);
            assert_eq!(m.lower[h], (m.point[h] - 2.0).max(0.0));
        }
        assert_eq!(measured_interval(&f, &misses[..MIN_MISSES - 1], 0.8), None);
    }
}
