//! The circuit breaker in front of each instance.
//!
//! Closed counts consecutive failed health checks; at the threshold it
//! opens, which means "kill and restart". The restarted instance is
//! half-open: one failure re-opens it, `success_threshold` passes close it.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    Closed { failures: u32 },
    Open,
    HalfOpen { successes: u32 },
}

/// What a health result did to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trip {
    /// Still letting the instance serve.
    Holding,
    /// Just opened: the instance must be replaced.
    Tripped,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker::Closed { failures: 0 }
    }
}

impl Breaker {
    pub fn on_success(&mut self, success_threshold: u32) {
        *self = match *self {
            Breaker::HalfOpen { successes } if successes + 1 < success_threshold => {
                Breaker::HalfOpen {
                    successes: successes + 1,
                }
            }
            Breaker::Open => Breaker::Open,
            _ => Breaker::Closed { failures: 0 },
        };
    }

    pub fn on_failure(&mut self, failure_threshold: u32) -> Trip {
        match *self {
            Breaker::Closed { failures } if failures + 1 < failure_threshold => {
                *self = Breaker::Closed {
                    failures: failures + 1,
                };
                Trip::Holding
            }
            Breaker::Open => Trip::Holding,
            _ => {
                *self = Breaker::Open;
                Trip::Tripped
            }
        }
    }

    /// A crash opens the breaker as surely as failed checks do.
    pub fn open(&mut self) {
        *self = Breaker::Open;
    }

    /// A new instance starts on probation after the breaker opened.
    pub fn on_restart(&mut self) {
        if *self == Breaker::Open {
            *self = Breaker::HalfOpen { successes: 0 };
        }
    }

    pub fn failures(&self) -> u32 {
        match self {
            Breaker::Closed { failures } => *failures,
            _ => 0,
        }
    }
}

impl fmt::Display for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Breaker::Closed { .. } => "closed",
            Breaker::Open => "open",
            Breaker::HalfOpen { .. } => "half-open",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_trips_after_threshold_consecutive_failures() {
        let mut b = Breaker::default();
        assert_eq!(b.on_failure(3), Trip::Holding);
        assert_eq!(b.on_failure(3), Trip::Holding);
        assert_eq!(b, Breaker::Closed { failures: 2 });
        assert_eq!(b.on_failure(3), Trip::Tripped);
        assert_eq!(b, Breaker::Open);
    }

    #[test]
    fn a_success_in_between_resets_the_count() {
        let mut b = Breaker::default();
        b.on_failure(3);
        b.on_failure(3);
        b.on_success(1);
        assert_eq!(b, Breaker::Closed { failures: 0 });
        assert_eq!(b.on_failure(3), Trip::Holding);
    }

    #[test]
    fn open_stays_open_until_a_restart_then_half_open() {
        let mut b = Breaker::Open;
        b.on_success(1);
        assert_eq!(b, Breaker::Open);
        assert_eq!(b.on_failure(3), Trip::Holding);
        b.on_restart();
        assert_eq!(b, Breaker::HalfOpen { successes: 0 });
    }

    #[test]
    fn half_open_closes_after_enough_successes() {
        let mut b = Breaker::HalfOpen { successes: 0 };
        b.on_success(2);
        assert_eq!(b, Breaker::HalfOpen { successes: 1 });
        b.on_success(2);
        assert_eq!(b, Breaker::Closed { failures: 0 });
    }

    #[test]
    fn half_open_reopens_on_the_first_failure() {
        let mut b = Breaker::HalfOpen { successes: 0 };
        assert_eq!(b.on_failure(3), Trip::Tripped);
        assert_eq!(b, Breaker::Open);
    }

    #[test]
    fn restart_of_a_closed_breaker_keeps_it_closed() {
        let mut b = Breaker::Closed { failures: 1 };
        b.on_restart();
        assert_eq!(b, Breaker::Closed { failures: 1 });
        b.open();
        assert_eq!(b.to_string(), "open");
    }
}
