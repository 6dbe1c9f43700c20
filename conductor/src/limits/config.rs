//! `[plugins.NAME.shared_limits]`: rate limits the replicas of one plugin
//! share, served by the conductor.

use std::time::Duration;

use serde::Deserialize;

/// One shared limit: either one grant per `every` (per bucket), or `rate`
/// grants per `per`, spread evenly.
///
/// ```toml
/// identify = { every = "5s", buckets = 16 }
/// rest = { rate = 50, per = "1s" }
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    #[serde(default, with = "humantime_serde")]
    pub every: Option<Duration>,
    pub rate: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub per: Option<Duration>,
    /// Independent copies of the limit, chosen by the caller (Discord's
    /// `shard_id % max_concurrency`).
    #[serde(default = "one")]
    pub buckets: u32,
}

fn one() -> u32 {
    1
}

/// Most buckets one limit may have: each is a little state in memory.
pub const MAX_BUCKETS: u32 = 4096;

impl LimitConfig {
    /// The spacing between two grants of one bucket, or why there is none.
    pub fn spacing(&self) -> Result<Duration, String> {
        let spacing = match (self.every, self.rate, self.per) {
            (Some(every), None, None) => every,
            (None, Some(rate), Some(per)) if rate > 0 => per / rate,
            (None, Some(0), Some(_)) => return Err("rate must be at least 1".into()),
            _ => {
                return Err(
                    "set either every = \"5s\", or rate = N with per = \"1s\" (not both)".into(),
                );
            }
        };
        if spacing.is_zero() {
            return Err("allows grants faster than a nanosecond apart".into());
        }
        Ok(spacing)
    }

    /// Problems serde cannot see, as a reason.
    pub fn problem(&self) -> Option<String> {
        if self.buckets == 0 || self.buckets > MAX_BUCKETS {
            return Some(format!(
                "buckets = {} must be between 1 and {MAX_BUCKETS}",
                self.buckets
            ));
        }
        self.spacing().err()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> LimitConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn both_forms_give_a_spacing_and_mixed_forms_are_refused() {
        let identify = parse("every = \"5s\"\nbuckets = 16");
        assert_eq!(identify.spacing(), Ok(Duration::from_secs(5)));
        assert_eq!(identify.buckets, 16);
        let rest = parse("rate = 50\nper = \"1s\"");
        assert_eq!(rest.spacing(), Ok(Duration::from_millis(20)));
        assert_eq!(rest.buckets, 1);
        for bad in [
            "every = \"5s\"\nrate = 1\nper = \"1s\"",
            "rate = 50",
            "rate = 0\nper = \"1s\"",
            "every = \"5s\"\nbuckets = 0",
            "",
        ] {
            assert!(parse(bad).problem().is_some(), "{bad:?}");
        }
    }
}
