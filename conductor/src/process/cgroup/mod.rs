//! Resource isolation: every instance in its own cgroup, `ROOT/PLUGIN/INDEX`,
//! with memory, CPU and pids limits, usage counters and OOM accounting.
//!
//! The host's setup is detected once. Everything version-specific sits
//! behind the [`Cgroup`] trait (`v1.rs`, `v2.rs`); cgroups-rs types do not
//! leave this module. Children join their cgroup before exec: the spawner
//! opens [`Cgroup::procs_files`] before forking and writes `0` to each.

pub mod config;
mod counters;
mod limits;
mod v1;
mod v2;

pub use config::{CPU_PERIOD_US, CgroupPolicy, LimitsConfig};
pub use limits::{Plan, cpu_quota};

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cgroups_rs::fs::hierarchies::{V1 as V1Hierarchy, V2 as V2Hierarchy};
use cgroups_rs::fs::{Controller as _, Hierarchy, MaxValue};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::claim::{Claim, ClaimError, claim};

/// Where cgroup filesystems are mounted.
pub const CGROUP_FS: &str = "/sys/fs/cgroup";

/// Controllers an instance cgroup is created in (where the host has them).
const CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "freezer"];

/// Resource usage of one instance, read from its cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub memory_bytes: u64,
    pub memory_peak_bytes: u64,
    /// CPU time consumed, all tasks together.
    pub cpu: Duration,
    /// Time the CPU limit held tasks back.
    pub throttled: Duration,
    pub throttled_periods: u64,
    /// Processes and threads.
    pub pids: u64,
    pub oom_kills: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroups are unavailable: {0}")]
    Unavailable(String),
    #[error("cannot create cgroup {cgroup}: {reason}")]
    Create { cgroup: String, reason: String },
    #[error("the {controller} controller is unavailable for cgroup {cgroup}")]
    ControllerUnavailable {
        cgroup: String,
        controller: &'static str,
    },
    #[error("cannot set {file} of cgroup {cgroup} to {value}: {reason}")]
    Write {
        cgroup: String,
        file: &'static str,
        value: String,
        reason: String,
    },
    #[error("cgroup {cgroup} still has processes after SIGKILL")]
    StillPopulated { cgroup: String },
    #[error("cannot remove cgroup {cgroup}: {reason}")]
    Remove { cgroup: String, reason: String },
}

/// One instance's cgroup.
pub trait Cgroup: Send + Sync + fmt::Debug {
    /// Path below the hierarchy root, e.g. `demi-conductor/echo/0`.
    fn name(&self) -> &str;
    /// The `cgroup.procs` files a child writes `0` to before exec: one on
    /// v2, one per controller on v1.
    fn procs_files(&self) -> Vec<PathBuf>;
    /// The directory a child can be born in (cgroup v2 only), so that it
    /// never has to migrate.
    fn birthplace(&self) -> Option<PathBuf> {
        None
    }
    fn usage(&self) -> Usage;
    /// OOM kills so far; compared around a process's life to tell an OOM
    /// kill from any other SIGKILL.
    fn oom_kills(&self) -> u64;
    fn procs(&self) -> Vec<u32>;
    /// SIGKILLs every process in the cgroup, including those that left the
    /// instance's process group, and waits until it is empty; for a cgroup
    /// about to be removed. Blocking.
    fn kill_all(&self) -> Result<(), CgroupError>;
    /// The same for a cgroup the instance's next process will use, sparing
    /// `keep` (a stand-in). Blocking.
    fn kill_all_but(&self, keep: Option<u32>) -> Result<(), CgroupError>;
    /// Removes the (empty) cgroup. Blocking; idempotent.
    fn remove(&self) -> Result<(), CgroupError>;
}

/// How the host mounts cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// cgroup2 at the root: one hierarchy for every controller.
    Unified,
    /// v1 controllers, plus a controller-less cgroup2 at `unified/`.
    Hybrid,
    /// v1 controllers only.
    Legacy,
}

impl fmt::Display for Setup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Setup::Unified => "v2 (unified)",
            Setup::Hybrid => "v1 (hybrid)",
            Setup::Legacy => "v1 (legacy)",
        })
    }
}

/// Detects the setup under `root` (normally [`CGROUP_FS`]).
pub fn detect(root: &Path) -> Setup {
    detect_with(root, |path| {
        nix::sys::statfs::statfs(path)
            .ok()
            .map(|s| s.filesystem_type())
    })
}

fn detect_with(root: &Path, fs_type: impl Fn(&Path) -> Option<nix::sys::statfs::FsType>) -> Setup {
    use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, TMPFS_MAGIC};
    match fs_type(root) {
        Some(t) if t == CGROUP2_SUPER_MAGIC => Setup::Unified,
        Some(t)
            if t == TMPFS_MAGIC && fs_type(&root.join("unified")) == Some(CGROUP2_SUPER_MAGIC) =>
        {
            Setup::Hybrid
        }
        _ => Setup::Legacy,
    }
}

/// The conductor's cgroup tree.
#[derive(Debug)]
pub struct Cgroups {
    setup: Setup,
    root: String,
    controllers: Vec<String>,
    unavailable: Option<String>,
    favordynmods: bool,
    /// Where each v1 controller is mounted, read once: cgroups-rs reads
    /// and parses /proc/self/mountinfo for every hierarchy it is given,
    /// which a fleet start paid once per instance on its way to the fork.
    mounts: Option<V1Hierarchy>,
    /// The root, held for this conductor's life (see [`Cgroups::claim`]).
    claim: Option<Claim>,
}

impl Cgroups {
    /// Detects the host's setup and creates `root`. Never fails: when
    /// cgroups cannot be used, [`Cgroups::unavailable`] says why.
    pub fn open(root: &str) -> Self {
        let setup = detect(Path::new(CGROUP_FS));
        let mut this = Self {
            setup,
            root: root.trim_matches('/').to_owned(),
            controllers: Vec::new(),
            unavailable: None,
            favordynmods: favordynmods(setup),
            mounts: (setup != Setup::Unified).then(V1Hierarchy::new),
            claim: None,
        };
        this.controllers = this.available_controllers();
        let hierarchy = this.hierarchy();
        if let Err(e) = cgroups_rs::fs::Cgroup::new_with_specified_controllers(
            hierarchy,
            &this.root,
            Some(this.controllers.clone()),
        ) {
            this.unavailable = Some(format!(
                "cannot create cgroup {} under {CGROUP_FS}: {}",
                this.root,
                error_text(&e)
            ));
        }
        this
    }

    /// No cgroups, by choice (`cgroup_policy = "off"`): nothing on the
    /// host is touched.
    pub fn off() -> Self {
        Self {
            setup: detect(Path::new(CGROUP_FS)),
            root: String::new(),
            controllers: Vec::new(),
            unavailable: Some("cgroup_policy = \"off\"".into()),
            favordynmods: false,
            mounts: None,
            claim: None,
        }
    }

    /// Takes the root for this conductor until it drops: another conductor
    /// on the same root would take these instances' cgroups for leftovers
    /// of an earlier run and kill them. Locks the root's folder in the
    /// first hierarchy (the same one for every conductor on this host).
    /// Nothing to take when cgroups are not used.
    pub fn claim(&mut self) -> Result<(), ClaimError> {
        if self.unavailable.is_some() {
            return Ok(());
        }
        if let Some(dir) = self.dirs_of("").first() {
            self.claim = Some(claim(dir)?);
        }
        Ok(())
    }

    pub fn setup(&self) -> Setup {
        self.setup
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    /// Why cgroups cannot be used, if they cannot.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// Whether the hierarchy is mounted with `favordynmods`: without it,
    /// moving a task into a cgroup after a quiet spell waits for an RCU
    /// grace period (~6 ms per start measured here).
    pub fn favordynmods(&self) -> bool {
        self.favordynmods
    }

    fn v2(&self) -> bool {
        self.setup == Setup::Unified
    }

    fn hierarchy(&self) -> Box<dyn Hierarchy> {
        match (&self.mounts, self.v2()) {
            (_, true) => Box::new(V2Hierarchy::new()),
            (Some(mounts), false) => Box::new(mounts.clone()),
            (None, false) => Box::new(V1Hierarchy::new()),
        }
    }

    fn available_controllers(&self) -> Vec<String> {
        let present: Vec<String> = if self.v2() {
            std::fs::read_to_string(Path::new(CGROUP_FS).join("cgroup.controllers"))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        } else {
            self.hierarchy()
                .subsystems()
                .iter()
                .map(|s| s.controller_name())
                .collect()
        };
        CONTROLLERS
            .iter()
            .filter(|c| present.iter().any(|p| p == *c))
            .map(|c| c.to_string())
            .collect()
    }

    /// Creates (or reuses) the cgroup of instance `index` of `plugin` and
    /// applies `limits`, verifying each one took effect.
    pub fn create(
        &self,
        plugin: &str,
        index: u32,
        limits: &LimitsConfig,
    ) -> Result<Arc<dyn Cgroup>, CgroupError> {
        if let Some(why) = &self.unavailable {
            return Err(CgroupError::Unavailable(why.clone()));
        }
        let name = format!("{}/{plugin}/{index}", self.root);
        let cgroup = cgroups_rs::fs::Cgroup::new_with_specified_controllers(
            self.hierarchy(),
            &name,
            Some(self.joined(limits)),
        )
        .map_err(|e| CgroupError::Create {
            cgroup: name.clone(),
            reason: error_text(&e),
        })?;
        if let Err(error) = apply(&cgroup, &name, &Plan::new(limits, self.v2()), self.v2()) {
            let _ = cgroup.delete();
            return Err(error);
        }
        Ok(self.wrap(name, cgroup))
    }

    /// The controllers an instance with `limits` joins. On v2, every one:
    /// a single hierarchy, a single migration. On v1 each controller is a
    /// hierarchy of its own and a process joins each one separately (after
    /// a quiet spell, each join may wait for an RCU grace period), so an
    /// instance joins memory (its memory, OOM kills, and the process list
    /// kill-all walks) and cpuacct (its CPU time), plus cpu and pids for
    /// their limits. The freezer is left out: kill-all SIGKILLs until the
    /// list is empty, which a pids limit bounds for a plugin that forks in
    /// a loop.
    fn joined(&self, limits: &LimitsConfig) -> Vec<String> {
        if self.v2() {
            return self.controllers.clone();
        }
        let wanted = |controller: &str| match controller {
            "memory" | "cpuacct" => true,
            "cpu" => limits.cpu.is_some(),
            "pids" => limits.pids.is_some(),
            _ => false,
        };
        self.controllers
            .iter()
            .filter(|c| wanted(c))
            .cloned()
            .collect()
    }

    fn wrap(&self, name: String, cgroup: cgroups_rs::fs::Cgroup) -> Arc<dyn Cgroup> {
        if self.v2() {
            let dir = Path::new(CGROUP_FS).join(&name);
            Arc::new(v2::V2Cgroup { name, cgroup, dir })
        } else {
            Arc::new(v1::V1Cgroup::new(name, cgroup))
        }
    }

    /// Folders of `relative` (below the root) in every hierarchy used.
    fn dirs_of(&self, relative: &str) -> Vec<PathBuf> {
        let path = if relative.is_empty() {
            self.root.clone()
        } else {
            format!("{}/{relative}", self.root)
        };
        let cgroup = cgroups_rs::fs::Cgroup::load_with_specified_controllers(
            self.hierarchy(),
            &path,
            self.controllers.clone(),
        );
        if self.v2() {
            vec![Path::new(CGROUP_FS).join(&path)]
        } else {
            cgroup
                .subsystems()
                .iter()
                .map(|s| s.to_controller().path().to_owned())
                .collect()
        }
    }

    /// Children of `relative` (below the root), in any hierarchy.
    fn children(&self, relative: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .dirs_of(relative)
            .iter()
            .filter_map(|dir| std::fs::read_dir(dir).ok())
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Empties and removes instance cgroups an earlier run left under the
    /// root, and the plugin folders above them. Returns how many instance
    /// cgroups there were. Blocking.
    pub fn clean_leftovers(&self) -> usize {
        if self.unavailable.is_some() {
            return 0;
        }
        let mut cleaned = 0;
        for plugin in self.children("") {
            for index in self.children(&plugin) {
                let name = format!("{}/{plugin}/{index}", self.root);
                let cgroup = self.wrap(
                    name.clone(),
                    cgroups_rs::fs::Cgroup::load_with_specified_controllers(
                        self.hierarchy(),
                        &name,
                        self.controllers.clone(),
                    ),
                );
                let killed = cgroup.procs().len();
                if let Err(error) = cgroup.kill_all().and_then(|()| cgroup.remove()) {
                    tracing::warn!(cgroup = name, %error, "cannot clean a leftover cgroup");
                    continue;
                }
                tracing::info!(
                    cgroup = name,
                    killed,
                    "removed a cgroup left by an earlier run"
                );
                cleaned += 1;
            }
            self.remove_plugin(&plugin);
        }
        cleaned
    }

    /// Removes the (empty) folder of `plugin`. Blocking.
    pub fn remove_plugin(&self, plugin: &str) {
        if self.unavailable.is_some() {
            return;
        }
        let name = format!("{}/{plugin}", self.root);
        let cgroup = cgroups_rs::fs::Cgroup::load_with_specified_controllers(
            self.hierarchy(),
            &name,
            self.controllers.clone(),
        );
        if let Err(e) = cgroup.delete() {
            tracing::warn!(
                cgroup = name,
                error = error_text(&e),
                "cannot remove cgroup"
            );
        }
    }

    /// Removes the root, once every instance is gone. Blocking.
    pub fn remove_root(&self) {
        if self.unavailable.is_some() {
            return;
        }
        for plugin in self.children("") {
            self.remove_plugin(&plugin);
        }
        let cgroup = cgroups_rs::fs::Cgroup::load_with_specified_controllers(
            self.hierarchy(),
            &self.root,
            self.controllers.clone(),
        );
        if let Err(e) = cgroup.delete() {
            tracing::warn!(
                cgroup = self.root,
                error = error_text(&e),
                "cannot remove cgroup root"
            );
        }
    }
}

fn apply(
    cgroup: &cgroups_rs::fs::Cgroup,
    name: &str,
    plan: &Plan,
    v2: bool,
) -> Result<(), CgroupError> {
    use cgroups_rs::fs::cpu::CpuController;
    use cgroups_rs::fs::memory::MemController;
    use cgroups_rs::fs::pid::PidController;

    let missing = |controller| CgroupError::ControllerUnavailable {
        cgroup: name.to_owned(),
        controller,
    };
    let write_error =
        |file: &'static str, value: String, e: cgroups_rs::fs::error::Error| CgroupError::Write {
            cgroup: name.to_owned(),
            file,
            value,
            reason: error_text(&e),
        };
    if plan.memory.is_some() || plan.swap.is_some() {
        let memory = cgroup
            .controller_of::<MemController>()
            .ok_or(missing("memory"))?;
        if let Some(bytes) = plan.memory {
            let file = if v2 {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            };
            memory
                .set_limit(bytes)
                .map_err(|e| write_error(file, bytes.to_string(), e))?;
            // Measured: a limit can be silently absent; the kernel also
            // rounds it down to whole pages. Read it back.
            let got = counters::number(&memory.path().join(file));
            let page = 4096;
            if !got.is_some_and(|g| g as i64 <= bytes && g as i64 > bytes - page) {
                return Err(CgroupError::Write {
                    cgroup: name.to_owned(),
                    file,
                    value: bytes.to_string(),
                    reason: format!("read back {got:?}"),
                });
            }
        }
        if let Some(bytes) = plan.swap {
            let file = if v2 {
                "memory.swap.max"
            } else {
                "memory.memsw.limit_in_bytes"
            };
            if !memory.path().join(file).exists() {
                return Err(missing("memory swap accounting"));
            }
            memory
                .set_memswap_limit(bytes)
                .map_err(|e| write_error(file, bytes.to_string(), e))?;
        }
    }
    if let Some(bytes) = plan.memory_high {
        let memory = cgroup
            .controller_of::<MemController>()
            .ok_or(missing("memory"))?;
        let (file, written) = if v2 {
            let high = cgroups_rs::fs::memory::SetMemory {
                high: Some(MaxValue::Value(bytes)),
                ..Default::default()
            };
            ("memory.high", memory.set_mem(high))
        } else {
            ("memory.soft_limit_in_bytes", memory.set_soft_limit(bytes))
        };
        written.map_err(|e| write_error(file, bytes.to_string(), e))?;
    }
    if let Some((quota, period)) = plan.cpu {
        let cpu = cgroup
            .controller_of::<CpuController>()
            .ok_or(missing("cpu"))?;
        let file = if v2 { "cpu.max" } else { "cpu.cfs_quota_us" };
        cpu.set_cfs_quota_and_period(Some(quota), Some(period))
            .map_err(|e| write_error(file, format!("{quota} {period}"), e))?;
    }
    if let Some(max) = plan.pids {
        let pids = cgroup
            .controller_of::<PidController>()
            .ok_or(missing("pids"))?;
        pids.set_pid_max(MaxValue::Value(max))
            .map_err(|e| write_error("pids.max", max.to_string(), e))?;
    }
    Ok(())
}

/// SIGKILLs what `procs` lists until it lists nothing; `after_first` runs
/// after the first round (v1 thaws there so the signals land).
fn kill_pids(
    name: &str,
    procs: impl Fn() -> Vec<u32>,
    after_first: impl Fn(),
) -> Result<(), CgroupError> {
    for round in 0..500 {
        let pids = procs();
        if pids.is_empty() {
            return Ok(());
        }
        for pid in pids {
            if let Ok(pid) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if round == 0 {
            after_first();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Err(CgroupError::StillPopulated {
        cgroup: name.to_owned(),
    })
}

/// Removes an (empty) cgroup; idempotent (cgroups-rs retries EBUSY).
fn delete(cgroup: &cgroups_rs::fs::Cgroup, name: &str) -> Result<(), CgroupError> {
    cgroup.delete().map_err(|e| CgroupError::Remove {
        cgroup: name.to_owned(),
        reason: error_text(&e),
    })
}

/// cgroups-rs errors print only their kind; the cause says what happened.
fn error_text(error: &cgroups_rs::fs::error::Error) -> String {
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

/// Whether the hierarchies in use are mounted with `favordynmods`.
fn favordynmods(setup: Setup) -> bool {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let fs = if setup == Setup::Unified {
        "cgroup2"
    } else {
        "cgroup"
    };
    let mut mounts = mountinfo.lines().filter_map(|line| {
        let (_, after) = line.split_once(" - ")?;
        let mut parts = after.split_whitespace();
        (parts.next()? == fs).then(|| parts.nth(1).unwrap_or("").to_owned())
    });
    let options: Vec<String> = mounts.by_ref().collect();
    !options.is_empty()
        && options
            .iter()
            .all(|o| o.split(',').any(|x| x == "favordynmods"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, EXT4_SUPER_MAGIC, TMPFS_MAGIC};

    #[test]
    fn detection_follows_the_filesystem_types() {
        let root = Path::new("/sys/fs/cgroup");
        let unified = root.join("unified");
        assert_eq!(
            detect_with(root, |_| Some(CGROUP2_SUPER_MAGIC)),
            Setup::Unified
        );
        assert_eq!(
            detect_with(root, |p| Some(if p == unified {
                CGROUP2_SUPER_MAGIC
            } else {
                TMPFS_MAGIC
            })),
            Setup::Hybrid
        );
        assert_eq!(detect_with(root, |_| Some(TMPFS_MAGIC)), Setup::Legacy);
        assert_eq!(detect_with(root, |_| Some(EXT4_SUPER_MAGIC)), Setup::Legacy);
        assert_eq!(detect_with(root, |_| None), Setup::Legacy);
        assert_eq!(Setup::Hybrid.to_string(), "v1 (hybrid)");
    }

    #[test]
    fn this_host_is_detected_as_it_is_mounted() {
        // Whatever this machine is, detection must agree with cgroups-rs.
        let ours = detect(Path::new(CGROUP_FS)) == Setup::Unified;
        assert_eq!(ours, cgroups_rs::fs::hierarchies::is_cgroup2_unified_mode());
    }
}
