//! `[plugins.NAME.limits]` in cgroup v1 and v2 terms.
//!
//! Pure functions, so both versions are covered by unit tests on any host.

use bytesize::ByteSize;

use super::config::{CPU_PERIOD_US, LimitsConfig, MIN_QUOTA_US};

/// What to write where, once the version is known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Plan {
    /// `memory.limit_in_bytes` (v1) or `memory.max` (v2).
    pub memory: Option<i64>,
    /// `memory.memsw.limit_in_bytes` (v1: memory plus swap) or
    /// `memory.swap.max` (v2: swap alone).
    pub swap: Option<i64>,
    /// CFS quota and period in microseconds (`cpu.cfs_*_us` or `cpu.max`).
    pub cpu: Option<(i64, u64)>,
    /// `pids.max`.
    pub pids: Option<i64>,
    /// `memory.soft_limit_in_bytes` (v1) or `memory.high` (v2).
    pub memory_high: Option<i64>,
}

impl Plan {
    pub fn new(limits: &LimitsConfig, v2: bool) -> Self {
        let bytes = |b: ByteSize| i64::try_from(b.as_u64()).unwrap_or(i64::MAX);
        let memory = limits.memory.map(bytes);
        let swap = limits.memory_swap.map(bytes).map(|swap| {
            if v2 {
                swap
            } else {
                // v1 limits memory and swap together.
                memory.unwrap_or(0).saturating_add(swap)
            }
        });
        Self {
            memory,
            swap,
            cpu: limits.cpu.map(cpu_quota),
            pids: limits.pids.map(|p| i64::try_from(p).unwrap_or(i64::MAX)),
            memory_high: limits.memory_high.map(bytes),
        }
    }
}

/// Cores to a CFS (quota, period) pair in microseconds.
pub fn cpu_quota(cores: f64) -> (i64, u64) {
    let quota = (cores * CPU_PERIOD_US as f64)
        .round()
        .max(MIN_QUOTA_US as f64);
    (quota as i64, CPU_PERIOD_US)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(text: &str) -> LimitsConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn cores_become_quota_over_a_100ms_period() {
        assert_eq!(cpu_quota(0.5), (50_000, 100_000));
        assert_eq!(cpu_quota(0.2), (20_000, 100_000));
        assert_eq!(cpu_quota(2.0), (200_000, 100_000));
        assert_eq!(cpu_quota(0.001), (1_000, 100_000), "kernel minimum");
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        let l = limits("memory = \"256MiB\"\nmemory_swap = \"1GiB\"\npids = 64\ncpu = 0.5");
        assert_eq!(l.memory, Some(ByteSize::mib(256)));
        assert_eq!(l.memory_swap, Some(ByteSize::gib(1)));
        assert!(toml::from_str::<LimitsConfig>("memory = \"-5MiB\"").is_err());
        assert!(toml::from_str::<LimitsConfig>("memroy = \"5MiB\"").is_err());
    }

    #[test]
    fn v1_plan_adds_swap_to_memory() {
        let l = limits(
            "memory = \"64MiB\"\nmemory_swap = \"16MiB\"\ncpu = 0.25\npids = 100\n\
             memory_high = \"48MiB\"",
        );
        assert_eq!(
            Plan::new(&l, false),
            Plan {
                memory: Some(64 << 20),
                swap: Some(80 << 20),
                cpu: Some((25_000, 100_000)),
                pids: Some(100),
                memory_high: Some(48 << 20),
            }
        );
    }

    #[test]
    fn v2_plan_keeps_swap_apart() {
        let l = limits("memory = \"64MiB\"\nmemory_swap = \"16MiB\"\ncpu = 1.5");
        assert_eq!(
            Plan::new(&l, true),
            Plan {
                memory: Some(64 << 20),
                swap: Some(16 << 20),
                cpu: Some((150_000, 100_000)),
                pids: None,
                memory_high: None,
            }
        );
    }

    #[test]
    fn empty_limits_plan_nothing() {
        assert!(LimitsConfig::default().is_empty());
        assert_eq!(Plan::new(&LimitsConfig::default(), true), Plan::default());
    }

    #[test]
    fn nonsense_limits_are_reported() {
        let l = limits("memory = \"10KiB\"\ncpu = 0.001\npids = 0");
        let fields: Vec<_> = l.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(fields, ["limits.memory", "limits.cpu", "limits.pids"]);
        let l = limits("memory_swap = \"1MiB\"");
        assert_eq!(l.problems()[0].0, "limits.memory_swap");
        let l = limits("memory = \"64MiB\"\nmemory_high = \"64MiB\"");
        assert_eq!(l.problems()[0].0, "limits.memory_high");
    }
}
