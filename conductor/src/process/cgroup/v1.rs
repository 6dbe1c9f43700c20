//! cgroup v1 (legacy and hybrid hosts): one directory per controller.

use std::path::PathBuf;
use std::time::Duration;

use cgroups_rs::FreezerState;
use cgroups_rs::fs::freezer::FreezerController;

use super::counters::{keyed, number, pids};
use super::{Cgroup, CgroupError, Usage, kill_pids};

/// The controller directories of one v1 cgroup; usage is read from here,
/// so tests can point it at fixture folders.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dirs {
    pub memory: Option<PathBuf>,
    pub cpu: Option<PathBuf>,
    pub cpuacct: Option<PathBuf>,
    pub pids: Option<PathBuf>,
    pub freezer: Option<PathBuf>,
}

impl Dirs {
    fn all(&self) -> impl Iterator<Item = &PathBuf> {
        [
            &self.memory,
            &self.cpu,
            &self.cpuacct,
            &self.pids,
            &self.freezer,
        ]
        .into_iter()
        .flatten()
    }

    pub fn usage(&self) -> Usage {
        let at = |dir: &Option<PathBuf>, file: &str| dir.as_ref().map(|d| d.join(file));
        let num = |p: Option<PathBuf>| p.as_deref().and_then(number).unwrap_or(0);
        let key = |p: Option<PathBuf>, k: &str| p.as_deref().and_then(|p| keyed(p, k)).unwrap_or(0);
        Usage {
            memory_bytes: num(at(&self.memory, "memory.usage_in_bytes")),
            memory_peak_bytes: num(at(&self.memory, "memory.max_usage_in_bytes")),
            cpu: Duration::from_nanos(num(at(&self.cpuacct, "cpuacct.usage"))),
            throttled: Duration::from_nanos(key(at(&self.cpu, "cpu.stat"), "throttled_time")),
            throttled_periods: key(at(&self.cpu, "cpu.stat"), "nr_throttled"),
            pids: num(at(&self.pids, "pids.current")),
            // `failcnt` counts limit hits, not kills: only oom_kill is reliable.
            oom_kills: key(at(&self.memory, "memory.oom_control"), "oom_kill"),
        }
    }

    fn procs(&self) -> Vec<u32> {
        let mut all: Vec<u32> = self
            .all()
            .flat_map(|d| pids(&d.join("cgroup.procs")))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

#[derive(Debug)]
pub struct V1Cgroup {
    pub(super) name: String,
    pub(super) cgroup: cgroups_rs::fs::Cgroup,
    pub(super) dirs: Dirs,
}

impl V1Cgroup {
    pub fn new(name: String, cgroup: cgroups_rs::fs::Cgroup) -> Self {
        use cgroups_rs::fs::{cpu, cpuacct, memory, pid};
        let dirs = Dirs {
            memory: dir_of::<memory::MemController>(&cgroup),
            cpu: dir_of::<cpu::CpuController>(&cgroup),
            cpuacct: dir_of::<cpuacct::CpuAcctController>(&cgroup),
            pids: dir_of::<pid::PidController>(&cgroup),
            freezer: dir_of::<FreezerController>(&cgroup),
        };
        Self { name, cgroup, dirs }
    }

    /// Stops every task so none can fork while the others are killed.
    fn freeze(&self) -> bool {
        let Some(freezer) = self.cgroup.controller_of::<FreezerController>() else {
            return false;
        };
        if freezer.freeze().is_err() {
            return false;
        }
        // Freezing is asynchronous on v1: FREEZING until every task stops.
        for _ in 0..100 {
            if matches!(freezer.state(), Ok(FreezerState::Frozen)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    fn thaw(&self) {
        if let Some(freezer) = self.cgroup.controller_of::<FreezerController>() {
            let _ = freezer.thaw();
        }
    }
}

/// The folder of controller `T` in `cgroup`, if the host has it.
fn dir_of<'a, T>(cgroup: &'a cgroups_rs::fs::Cgroup) -> Option<PathBuf>
where
    &'a T: From<&'a cgroups_rs::fs::Subsystem>,
    T: cgroups_rs::fs::Controller + cgroups_rs::fs::ControllIdentifier + 'a,
{
    cgroup.controller_of::<T>().map(|c| c.path().to_owned())
}

impl Cgroup for V1Cgroup {
    fn name(&self) -> &str {
        &self.name
    }

    fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.all().map(|d| d.join("cgroup.procs")).collect()
    }

    fn usage(&self) -> Usage {
        self.dirs.usage()
    }

    fn oom_kills(&self) -> u64 {
        self.dirs
            .memory
            .as_deref()
            .and_then(|d| keyed(&d.join("memory.oom_control"), "oom_kill"))
            .unwrap_or(0)
    }

    fn procs(&self) -> Vec<u32> {
        self.dirs.procs()
    }

    fn kill_all_but(&self, keep: Option<u32>) -> Result<(), CgroupError> {
        let others = || {
            let mut pids = self.dirs.procs();
            pids.retain(|&pid| Some(pid) != keep);
            pids
        };
        if others().is_empty() {
            return Ok(());
        }
        let frozen = self.freeze();
        kill_pids(&self.name, others, || {
            if frozen {
                self.thaw();
            }
        })
    }

    fn kill_all(&self) -> Result<(), CgroupError> {
        if self.dirs.procs().is_empty() {
            return Ok(());
        }
        // v1 has no cgroup.kill: freeze, SIGKILL every task, thaw so the
        // signals are delivered, and repeat until the cgroup is empty.
        let frozen = self.freeze();
        let result = kill_pids(
            &self.name,
            || self.dirs.procs(),
            || {
                if frozen {
                    self.thaw();
                }
            },
        );
        self.thaw();
        result
    }

    fn remove(&self) -> Result<(), CgroupError> {
        super::delete(&self.cgroup, &self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_reads_the_v1_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = |name: &str, files: &[(&str, &str)]| {
            let d = root.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            for (f, text) in files {
                std::fs::write(d.join(f), text).unwrap();
            }
            Some(d)
        };
        let dirs = Dirs {
            memory: dir(
                "memory",
                &[
                    ("memory.usage_in_bytes", "1048576\n"),
                    ("memory.max_usage_in_bytes", "2097152\n"),
                    (
                        "memory.oom_control",
                        "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
                    ),
                ],
            ),
            cpu: dir(
                "cpu",
                &[(
                    "cpu.stat",
                    "nr_periods 50\nnr_throttled 7\nthrottled_time 250000000\n",
                )],
            ),
            cpuacct: dir("cpuacct", &[("cpuacct.usage", "1500000000\n")]),
            pids: dir(
                "pids",
                &[("pids.current", "12\n"), ("cgroup.procs", "40\n41\n")],
            ),
            freezer: None,
        };
        assert_eq!(
            dirs.usage(),
            Usage {
                memory_bytes: 1 << 20,
                memory_peak_bytes: 2 << 20,
                cpu: Duration::from_millis(1500),
                throttled: Duration::from_millis(250),
                throttled_periods: 7,
                pids: 12,
                oom_kills: 3,
            }
        );
        assert_eq!(dirs.procs(), [40, 41]);
        assert_eq!(Dirs::default().usage(), Usage::default());
    }
}
