//! Adapters between components that do not know each other: each narrow
//! view a component asks for, implemented here over the others.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::dispatch::{self, Dispatcher};
use crate::events::Phase;
use crate::machine::Machine;
use crate::scaler::signal::JobTotals;
use crate::scaler::{self, Scaler};
use crate::supervisor::Supervisor;
use crate::supervisor::breaker::Breaker;
use crate::telemetry::metrics::{
    AutoscaleSample, BreakerState, HostSample, InstanceSample, LaneSample, PluginSample, Snapshot,
    UsageSample,
};

/// What metrics read at scrape time. Weak: the metrics endpoint must not
/// keep the components alive past shutdown.
pub struct Scrape {
    pub supervisor: Weak<Supervisor>,
    pub dispatcher: Weak<Dispatcher>,
    pub scaler: Weak<Scaler>,
    pub machine: Arc<Machine>,
    /// The daemon's runtime, for its live task count: a leak of tasks is
    /// the first sign of a leak of anything else.
    pub runtime: tokio::runtime::Handle,
}

impl Snapshot for Scrape {
    fn plugins(&self) -> Vec<PluginSample> {
        let Some(supervisor) = self.supervisor.upgrade() else {
            return Vec::new();
        };
        supervisor
            .list_with_usage()
            .into_iter()
            .map(|view| PluginSample {
                degraded: view.degraded().is_some(),
                desired: view.replicas,
                instances: view
                    .instances
                    .iter()
                    .map(|(index, status)| InstanceSample {
                        index: *index,
                        phase: status.state,
                        running: status.pid.is_some(),
                        breaker: match status.breaker {
                            Breaker::Closed { .. } => BreakerState::Closed,
                            Breaker::HalfOpen { .. } => BreakerState::HalfOpen,
                            Breaker::Open => BreakerState::Open,
                        },
                        usage: status.usage.map(|u| UsageSample {
                            memory_bytes: u.memory_bytes,
                            memory_peak_bytes: u.memory_peak_bytes,
                            cpu: u.cpu,
                            throttled: u.throttled,
                            pids: u.pids,
                            oom_kills: u.oom_kills,
                        }),
                    })
                    .collect(),
                name: view.name,
            })
            .collect()
    }

    fn lanes(&self) -> Vec<LaneSample> {
        let Some(dispatcher) = self.dispatcher.upgrade() else {
            return Vec::new();
        };
        dispatcher
            .lanes()
            .into_iter()
            .map(|(plugin, queued, in_flight)| LaneSample {
                plugin,
                queued,
                in_flight,
            })
            .collect()
    }

    fn host(&self) -> HostSample {
        let m = self.machine.sample();
        HostSample {
            cpus: m.cpus as u64,
            cpu_busy: m.cpu_busy,
            load: m.load,
            memory_total: m.memory_total,
            memory_available: m.memory_available,
            swap_total: m.swap_total,
            swap_used: m.swap_used,
            conductor_rss: m.conductor_rss,
            conductor_cpu: m.conductor_cpu,
            conductor_tasks: self.runtime.metrics().num_alive_tasks() as u64,
            conductor_open_fds: open_fds(),
        }
    }

    fn autoscalers(&self) -> Vec<AutoscaleSample> {
        let Some(scaler) = self.scaler.upgrade() else {
            return Vec::new();
        };
        scaler
            .statuses()
            .into_iter()
            .map(|(plugin, s)| AutoscaleSample {
                plugin,
                desired: s.desired,
                load: s.load,
                forecast: s.ahead.map(|a| (a.point, a.lower, a.upper)),
                capacity: s.capacity,
                lead: s.lead,
                capped: s.capped.is_some(),
            })
            .collect()
    }
}

impl Scrape {
    pub fn new(
        supervisor: &Arc<Supervisor>,
        dispatcher: &Arc<Dispatcher>,
        scaler: &Arc<Scaler>,
        machine: Arc<Machine>,
    ) -> Self {
        Self {
            supervisor: Arc::downgrade(supervisor),
            dispatcher: Arc::downgrade(dispatcher),
            scaler: Arc::downgrade(scaler),
            machine,
            runtime: tokio::runtime::Handle::current(),
        }
    }
}

/// The conductor's open file descriptors; 0 where /proc cannot tell.
fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |dir| dir.count() as u64)
}

/// Dispatch's view of the instances: which serve.
pub struct Serving(pub Arc<Supervisor>);

impl dispatch::Replicas for Serving {
    fn serving(&self, plugin: &str) -> Vec<(u32, u32)> {
        let Ok(view) = self.0.get(plugin) else {
            return Vec::new();
        };
        view.instances
            .iter()
            .filter(|(_, s)| s.state == Phase::Serving)
            .filter_map(|(index, s)| Some((*index, s.pid?)))
            .collect()
    }
}

/// The scaler's view of the load: jobs from dispatch, CPU from the
/// instances' cgroups.
pub struct Load {
    pub dispatcher: Arc<Dispatcher>,
    pub supervisor: Arc<Supervisor>,
}

impl scaler::LoadSource for Load {
    fn jobs(&self, plugin: &str) -> Option<JobTotals> {
        let load = self.dispatcher.load(plugin)?;
        Some(JobTotals {
            offered: load.offered,
            completed: load.completed,
            busy: load.busy,
            queued: load.queued,
            slots_per_replica: load.slots_per_replica,
        })
    }

    fn cpu(&self, plugin: &str) -> Option<Vec<(u32, u32, Duration)>> {
        let view = self.supervisor.get_with_usage(plugin).ok()?;
        Some(
            view.instances
                .iter()
                .filter_map(|(i, s)| Some((*i, s.pid?, s.usage.as_ref()?.cpu)))
                .collect(),
        )
    }

    fn backlogged<'a>(&'a self, plugin: &'a str) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        match self.dispatcher.backlogged(plugin) {
            Some(waited) => Box::pin(waited),
            None => Box::pin(std::future::pending()),
        }
    }
}

/// The scaler's lever: the supervisor's pools.
pub struct Pools {
    pub supervisor: Arc<Supervisor>,
    pub machine: Arc<Machine>,
}

/// Memory kept free for the host itself when sizing pools: 5 % of it,
/// at least 256 MiB.
fn memory_reserve(total: u64) -> u64 {
    (total / 20).max(256 << 20)
}

impl scaler::Actuator for Pools {
    fn replicas(&self, plugin: &str) -> Option<u32> {
        self.supervisor.replicas(plugin)
    }

    /// What the host holds: memory available (less a reserve) over each
    /// replica's memory limit, or its measured peak without one, on top
    /// of the replicas running (their use is already out of what is
    /// available); and cores over its CPU limit.
    fn room(&self, plugin: &str) -> Option<scaler::live::Room> {
        let config = self.supervisor.config(plugin)?;
        let view = self.supervisor.get_with_usage(plugin).ok()?;
        let host = self.machine.sample();
        let mut rooms = Vec::new();
        let peak = view
            .instances
            .iter()
            .filter_map(|(_, s)| s.usage.map(|u| u.memory_peak_bytes))
            .max();
        let per_replica = config.limits.memory.map(|m| m.as_u64()).or(peak);
        if let Some(per) = per_replica.filter(|p| *p > 0) {
            let reserve = memory_reserve(host.memory_total);
            let free = host.memory_available.saturating_sub(reserve);
            let fits = view
                .replicas
                .saturating_add((free / per).min(u64::from(u32::MAX)) as u32);
            rooms.push(scaler::live::Room {
                replicas: fits,
                by: format!(
                    "memory: {} MiB available, {} MiB kept for the host, {} MiB per replica",
                    host.memory_available >> 20,
                    reserve >> 20,
                    per >> 20
                ),
            });
        }
        if let Some(cores) = config.limits.cpu.filter(|c| *c > 0.0) {
            rooms.push(scaler::live::Room {
                replicas: (host.cpus as f64 / cores).floor() as u32,
                by: format!("CPU: {} cores, {cores} per replica", host.cpus),
            });
        }
        rooms.into_iter().min_by_key(|r| r.replicas)
    }

    fn scale<'a>(
        &'a self,
        plugin: &'a str,
        replicas: u32,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            self.supervisor
                .autoscale(plugin, replicas)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }
}
