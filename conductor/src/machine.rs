//! The machine the conductor runs on, through `sysinfo`: its memory,
//! CPUs and load, the conductor's own process, and a process's usage
//! when no cgroup counts it.

use std::sync::Mutex;
use std::time::Duration;

use sysinfo::{MemoryRefreshKind, Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// One reading of the machine.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MachineSample {
    pub cpus: usize,
    /// Busy share of all CPUs since the previous reading, 0.0 to 1.0.
    pub cpu_busy: f64,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f64; 3],
    pub memory_total: u64,
    pub memory_available: u64,
    pub swap_total: u64,
    pub swap_used: u64,
    /// The conductor's own resident memory and CPU time.
    pub conductor_rss: u64,
    pub conductor_cpu: Duration,
}

/// A process's own figures: resident memory and CPU time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessUsage {
    pub rss: u64,
    pub cpu: Duration,
}

/// Readings share one `System`: sysinfo keeps what CPU usage needs
/// between two refreshes there.
pub struct Machine {
    system: Mutex<System>,
}

impl Default for Machine {
    fn default() -> Self {
        Self::new()
    }
}

impl Machine {
    pub fn new() -> Self {
        Self {
            system: Mutex::new(System::new()),
        }
    }

    fn system(&self) -> std::sync::MutexGuard<'_, System> {
        self.system.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn sample(&self) -> MachineSample {
        let me = Pid::from_u32(std::process::id());
        let mut system = self.system();
        system.refresh_memory_specifics(MemoryRefreshKind::everything());
        system.refresh_cpu_usage();
        let own = process(&mut system, me);
        let load = System::load_average();
        let cpus = system.cpus();
        let busy = match cpus.is_empty() {
            true => 0.0,
            false => f64::from(system.global_cpu_usage()) / 100.0,
        };
        MachineSample {
            cpus: cpus.len(),
            cpu_busy: busy.clamp(0.0, 1.0),
            load: [load.one, load.five, load.fifteen],
            memory_total: system.total_memory(),
            memory_available: system.available_memory(),
            swap_total: system.total_swap(),
            swap_used: system.used_swap(),
            conductor_rss: own.map_or(0, |u| u.rss),
            conductor_cpu: own.map_or(Duration::ZERO, |u| u.cpu),
        }
    }

    /// Process `pid`'s own figures (not its children's), if it exists.
    pub fn process(&self, pid: u32) -> Option<ProcessUsage> {
        process(&mut self.system(), Pid::from_u32(pid))
    }
}

fn process(system: &mut System, pid: Pid) -> Option<ProcessUsage> {
    let what = ProcessRefreshKind::nothing().with_memory().with_cpu();
    system.refresh_processes_specifics(ProcessesToUpdate::Some(&[pid]), true, what);
    let process = system.process(pid)?;
    Some(ProcessUsage {
        rss: process.memory(),
        cpu: Duration::from_millis(process.accumulated_cpu_time()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_reads_this_machine_and_this_process() {
        let machine = Machine::new();
        let sample = machine.sample();
        assert!(sample.cpus >= 1);
        assert!(sample.memory_total > 0);
        assert!(sample.memory_available <= sample.memory_total);
        assert!(sample.conductor_rss > 0, "{sample:?}");
        let me = machine.process(std::process::id()).unwrap();
        assert!(me.rss > 0);
        assert_eq!(machine.process(u32::MAX - 1), None);
    }
}
