//! Exponential delays with jitter, the one curve behind instance restarts
//! and job retries.

use std::time::Duration;

/// `initial × multiplier^step`, capped at `max`, scaled by a random factor
/// in `1 ± jitter` (from `unit`, uniform in `[0, 1)`) and never above `max`.
pub fn exponential(
    initial: Duration,
    multiplier: f64,
    max: Duration,
    jitter: f64,
    step: u32,
    unit: f64,
) -> Duration {
    let max = max.as_secs_f64();
    let exponent = i32::try_from(step).unwrap_or(i32::MAX);
    let base = (initial.as_secs_f64() * multiplier.powi(exponent)).min(max);
    let jittered = base * (1.0 + jitter * (2.0 * unit - 1.0));
    Duration::from_secs_f64(jittered.clamp(0.0, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curve_grows_caps_and_jitters_within_its_band() {
        let ms = Duration::from_millis;
        let plain: Vec<_> = (0..5)
            .map(|step| exponential(ms(100), 2.0, ms(1000), 0.0, step, 0.9))
            .collect();
        assert_eq!(plain, [ms(100), ms(200), ms(400), ms(800), ms(1000)]);
        assert_eq!(exponential(ms(100), 2.0, ms(1000), 0.5, 0, 0.0), ms(50));
        assert_eq!(exponential(ms(100), 2.0, ms(1000), 0.5, 9, 0.999), ms(1000));
        assert_eq!(
            exponential(ms(100), 2.0, ms(1000), 0.0, u32::MAX, 0.5),
            ms(1000)
        );
    }
}
