//! What an operator sets about cgroups: `[conductor] cgroup_policy` and
//! each plugin's `[plugins.NAME.limits]`.

use bytesize::ByteSize;
use serde::Deserialize;

/// What to do when cgroups cannot be used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupPolicy {
    /// A plugin that declares limits is not started without them.
    #[default]
    Required,
    /// Such a plugin runs unconfined, with a warning.
    Optional,
    /// No cgroups at all: every instance runs unconfined and no limit is
    /// enforced (said once at start). For hosts without cgroups, and to
    /// measure what they cost.
    Off,
}

/// CFS period used for CPU limits: 100 ms, the kernel's default, short
/// enough that a throttled plugin stalls for at most a fraction of it.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Sizes as operators write them ("512MiB", "1GiB", or a number of
/// bytes), with an error that says so: bytesize's own says only
/// "expected parsable string".
pub mod size {
    use bytesize::ByteSize;
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bytes(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        match Raw::deserialize(d) {
            Ok(Raw::Bytes(n)) => Ok(ByteSize::b(n)),
            Ok(Raw::Text(text)) => text.trim().parse::<ByteSize>().map_err(|_| {
                serde::de::Error::custom(format!(
                    "{text:?} is not a size: write it like \"512MiB\", \"1GiB\" or a number of bytes"
                ))
            }),
            Err(_) => Err(serde::de::Error::custom(
                "expected a size like \"512MiB\", \"1GiB\" or a number of bytes",
            )),
        }
    }

    pub mod option {
        use super::*;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ByteSize>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

/// The kernel refuses quotas under 1 ms.
pub const MIN_QUOTA_US: u64 = 1_000;

/// Resource limits of each instance of a plugin.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Memory the instance may use, e.g. "256MiB"; past it the kernel's
    /// OOM killer ends the instance.
    #[serde(default, with = "size::option")]
    pub memory: Option<ByteSize>,
    /// Swap the instance may use on top of `memory` (needs `memory`).
    #[serde(default, with = "size::option")]
    pub memory_swap: Option<ByteSize>,
    /// A soft ceiling below `memory`. On cgroup v2 it is `memory.high`:
    /// past it the instance is throttled and reclaimed hard, never killed.
    /// On v1 the closest file is `memory.soft_limit_in_bytes`, which only
    /// makes the instance the first to be reclaimed when the whole host
    /// runs short: no throttling, and nothing at all on a host with memory
    /// to spare.
    #[serde(default, with = "size::option")]
    pub memory_high: Option<ByteSize>,
    /// CPU time in cores, e.g. 0.5 for half of one core.
    pub cpu: Option<f64>,
    /// Processes and threads the instance may have at once.
    pub pids: Option<u64>,
}

impl LimitsConfig {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Problems serde cannot see, as (field below `limits`, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(memory) = self.memory
            && memory.as_u64() < 1 << 20
        {
            out.push((
                "limits.memory",
                format!("{memory} is below the 1 MiB minimum"),
            ));
        }
        if self.memory_swap.is_some() && self.memory.is_none() {
            out.push(("limits.memory_swap", "needs limits.memory too".into()));
        }
        if let (Some(high), Some(memory)) = (self.memory_high, self.memory)
            && high >= memory
        {
            out.push((
                "limits.memory_high",
                format!("{high} must be below limits.memory ({memory})"),
            ));
        }
        if let Some(cpu) = self.cpu
            && !(cpu.is_finite() && cpu * CPU_PERIOD_US as f64 >= MIN_QUOTA_US as f64)
        {
            out.push(("limits.cpu", format!("{cpu} must be at least 0.01 cores")));
        }
        if self.pids == Some(0) {
            out.push(("limits.pids", "must be at least 1".into()));
        }
        out
    }
}
