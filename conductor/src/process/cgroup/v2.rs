//! cgroup v2 (unified hierarchy): one directory holds every controller.

use std::path::PathBuf;
use std::time::Duration;

use super::counters::{keyed, number, pids};
use super::{Cgroup, CgroupError, Usage, kill_pids};

/// Reads usage from one v2 directory; tests point it at a fixture.
pub fn usage(dir: &std::path::Path) -> Usage {
    let stat = dir.join("cpu.stat");
    Usage {
        memory_bytes: number(&dir.join("memory.current")).unwrap_or(0),
        // memory.peak exists from kernel 5.19.
        memory_peak_bytes: number(&dir.join("memory.peak")).unwrap_or(0),
        cpu: Duration::from_micros(keyed(&stat, "usage_usec").unwrap_or(0)),
        throttled: Duration::from_micros(keyed(&stat, "throttled_usec").unwrap_or(0)),
        throttled_periods: keyed(&stat, "nr_throttled").unwrap_or(0),
        pids: number(&dir.join("pids.current")).unwrap_or(0),
        // The crate's OOM notifier is broken on v2; memory.events is what
        // runc reads too.
        oom_kills: keyed(&dir.join("memory.events"), "oom_kill").unwrap_or(0),
    }
}

#[derive(Debug)]
pub struct V2Cgroup {
    pub(super) name: String,
    pub(super) cgroup: cgroups_rs::fs::Cgroup,
    pub(super) dir: PathBuf,
}

impl V2Cgroup {
    fn populated(&self) -> bool {
        keyed(&self.dir.join("cgroup.events"), "populated").is_none_or(|p| p != 0)
    }
}

impl Cgroup for V2Cgroup {
    fn name(&self) -> &str {
        &self.name
    }

    fn procs_files(&self) -> Vec<PathBuf> {
        vec![self.dir.join("cgroup.procs")]
    }

    fn birthplace(&self) -> Option<PathBuf> {
        Some(self.dir.clone())
    }

    fn usage(&self) -> Usage {
        usage(&self.dir)
    }

    fn oom_kills(&self) -> u64 {
        keyed(&self.dir.join("memory.events"), "oom_kill").unwrap_or(0)
    }

    fn procs(&self) -> Vec<u32> {
        pids(&self.dir.join("cgroup.procs"))
    }

    fn kill_all_but(&self, keep: Option<u32>) -> Result<(), CgroupError> {
        // Not cgroup.kill, which spares nobody and, on some kernels (6.18
        // here), marks the cgroup so that every child later born in it
        // with CLONE_INTO_CGROUP is killed at birth: the signal loop.
        kill_pids(
            &self.name,
            || {
                let mut pids = self.procs();
                pids.retain(|&pid| Some(pid) != keep);
                pids
            },
            || {},
        )
    }

    fn kill_all(&self) -> Result<(), CgroupError> {
        if !self.populated() {
            return Ok(());
        }
        // cgroup.kill (kernel 5.14+) kills every task atomically, forks in
        // flight included; older kernels get the signal loop.
        if self.cgroup.kill().is_ok() {
            for _ in 0..500 {
                if !self.populated() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        kill_pids(&self.name, || self.procs(), || {})
    }

    fn remove(&self) -> Result<(), CgroupError> {
        super::delete(&self.cgroup, &self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_reads_the_v2_files() {
        let dir = tempfile::tempdir().unwrap();
        for (file, text) in [
            ("memory.current", "1048576\n"),
            ("memory.peak", "4194304\n"),
            (
                "cpu.stat",
                "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\nnr_periods 9\nnr_throttled 4\nthrottled_usec 800000\n",
            ),
            ("pids.current", "5\n"),
            (
                "memory.events",
                "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n",
            ),
        ] {
            std::fs::write(dir.path().join(file), text).unwrap();
        }
        assert_eq!(
            usage(dir.path()),
            Usage {
                memory_bytes: 1 << 20,
                memory_peak_bytes: 4 << 20,
                cpu: Duration::from_millis(2500),
                throttled: Duration::from_millis(800),
                throttled_periods: 4,
                pids: 5,
                oom_kills: 2,
            }
        );
    }
}
