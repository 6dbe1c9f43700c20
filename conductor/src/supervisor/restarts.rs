//! Restart pacing: exponential backoff with jitter, reset after a stable
//! run, and a start limit that ends a crash loop.
//!
//! Pure bookkeeping over instants the caller supplies, so tests need no clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::config::RestartConfig;
use crate::backoff::exponential;

/// What to do after an instance ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Start again after `delay`; `attempt` counts crashes in a row, from 1.
    RestartAfter { delay: Duration, attempt: u32 },
    /// Too many starts inside the interval: stop trying.
    StartLimitHit { starts: usize, interval: Duration },
}

/// Restart history of one instance.
#[derive(Debug, Clone, Default)]
pub struct Restarts {
    consecutive: u32,
    starts: VecDeque<Instant>,
    total: u64,
}

impl Restarts {
    /// Notes that the instance was started at `now`.
    pub fn record_start(&mut self, now: Instant) {
        self.starts.push_back(now);
        self.total += 1;
    }

    /// How many times the instance was restarted, all told.
    pub fn restarts(&self) -> u64 {
        self.total.saturating_sub(1)
    }

    /// Crashes in a row since the last stable run.
    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }

    /// Decides the next start after an instance that ran for `ran` ended
    /// at `now`. `unit` is a uniform random number in `[0, 1)` for jitter.
    pub fn after_exit(
        &mut self,
        config: &RestartConfig,
        ran: Duration,
        now: Instant,
        unit: f64,
    ) -> Verdict {
        if ran >= config.reset_after {
            self.consecutive = 0;
        }
        self.consecutive = self.consecutive.saturating_add(1);

        while let Some(first) = self.starts.front() {
            if now.saturating_duration_since(*first) >= config.start_limit_interval {
                self.starts.pop_front();
            } else {
                break;
            }
        }
        if self.starts.len() >= config.start_limit_burst as usize {
            return Verdict::StartLimitHit {
                starts: self.starts.len(),
                interval: config.start_limit_interval,
            };
        }
        Verdict::RestartAfter {
            delay: delay(config, self.consecutive, unit),
            attempt: self.consecutive,
        }
    }
}

/// The delay before restart number `attempt` in a row. The first is
/// immediate: one crash after a stable run is an accident, not a loop, and
/// restart latency is what operators measure us by.
pub fn delay(config: &RestartConfig, attempt: u32, unit: f64) -> Duration {
    if attempt <= 1 {
        return Duration::ZERO;
    }
    exponential(
        config.initial_delay,
        config.multiplier,
        config.max_delay,
        config.jitter,
        attempt - 2,
        unit,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RestartConfig {
        RestartConfig {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            multiplier: 2.0,
            jitter: 0.0,
            reset_after: Duration::from_secs(10),
            start_limit_burst: 100,
            start_limit_interval: Duration::from_secs(10),
            never_restart_exit_codes: vec![78],
            ..RestartConfig::default()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn first_restart_is_immediate_then_delays_double_up_to_the_max() {
        let c = config();
        let got: Vec<_> = (1..=7).map(|a| delay(&c, a, 0.5)).collect();
        assert_eq!(
            got,
            [
                ms(0),
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1000),
                ms(1000)
            ]
        );
    }

    #[test]
    fn jitter_stays_within_its_band_and_never_passes_the_max() {
        let c = RestartConfig {
            jitter: 0.2,
            ..config()
        };
        assert_eq!(delay(&c, 3, 0.0), ms(160));
        assert_eq!(delay(&c, 3, 0.5), ms(200));
        assert!(delay(&c, 3, 0.999) <= ms(240));
        assert_eq!(delay(&c, 10, 0.999), ms(1000));
        assert_eq!(delay(&c, 10, 0.0), ms(800));
    }

    #[test]
    fn zero_initial_delay_restarts_at_once_every_time() {
        let c = RestartConfig {
            initial_delay: Duration::ZERO,
            ..config()
        };
        assert!((1..20).all(|a| delay(&c, a, 0.7).is_zero()));
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        assert_eq!(delay(&config(), u32::MAX, 0.5), ms(1000));
    }

    #[test]
    fn a_stable_run_resets_the_crash_count() {
        let c = config();
        let mut r = Restarts::default();
        let t0 = Instant::now();
        let short = ms(50);
        let mut attempts = Vec::new();
        for i in 0..3 {
            r.record_start(t0 + ms(i * 10));
            match r.after_exit(&c, short, t0 + ms(i * 10 + 5), 0.5) {
                Verdict::RestartAfter { attempt, .. } => attempts.push(attempt),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(attempts, [1, 2, 3]);
        r.record_start(t0 + ms(100));
        let v = r.after_exit(
            &c,
            Duration::from_secs(11),
            t0 + Duration::from_secs(20),
            0.5,
        );
        assert_eq!(
            v,
            Verdict::RestartAfter {
                delay: Duration::ZERO,
                attempt: 1
            }
        );
        assert_eq!(r.restarts(), 3);
    }

    #[test]
    fn the_start_limit_ends_a_crash_loop_and_forgets_old_starts() {
        let c = RestartConfig {
            start_limit_burst: 3,
            start_limit_interval: Duration::from_secs(10),
            ..config()
        };
        let mut r = Restarts::default();
        let t0 = Instant::now();
        for i in 0..2 {
            r.record_start(t0 + ms(i));
            assert!(matches!(
                r.after_exit(&c, ms(1), t0 + ms(i), 0.5),
                Verdict::RestartAfter { .. }
            ));
        }
        r.record_start(t0 + ms(2));
        assert_eq!(
            r.after_exit(&c, ms(1), t0 + ms(3), 0.5),
            Verdict::StartLimitHit {
                starts: 3,
                interval: Duration::from_secs(10)
            }
        );
        // Eleven seconds later the window is empty again.
        assert!(matches!(
            r.after_exit(&c, ms(1), t0 + Duration::from_secs(11), 0.5),
            Verdict::RestartAfter { .. }
        ));
    }
}
