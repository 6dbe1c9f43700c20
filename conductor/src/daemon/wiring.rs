//! Adapters between components that do not know each other: each narrow
//! view a component asks for, implemented here over the others.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::dispatch::{self, Dispatcher};
use crate::events::Phase;
use crate::scaler::signal::JobTotals;
use crate::scaler::{self, Scaler};
use crate::supervisor::Supervisor;
use crate::supervisor::breaker::Breaker;
use crate::telemetry::metrics::{
    AutoscaleSample, BreakerState, InstanceSample, LaneSample, PluginSample, Snapshot, UsageSample,
};

/// What metrics read at scrape time. Weak: the metrics endpoint must not
/// keep the components alive past shutdown.
pub struct Scrape {
    pub supervisor: Weak<Supervisor>,
    pub dispatcher: Weak<Dispatcher>,
    pub scaler: Weak<Scaler>,
}

impl Snapshot for Scrape {
    fn plugins(&self) -> Vec<PluginSample> {
        let Some(supervisor) = self.supervisor.upgrade() else {
            return Vec::new();
        };
        supervisor
            .list()
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
            })
            .collect()
    }
}

impl Scrape {
    pub fn new(
        supervisor: &Arc<Supervisor>,
        dispatcher: &Arc<Dispatcher>,
        scaler: &Arc<Scaler>,
    ) -> Self {
        Self {
            supervisor: Arc::downgrade(supervisor),
            dispatcher: Arc::downgrade(dispatcher),
            scaler: Arc::downgrade(scaler),
        }
    }
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
        let view = self.supervisor.get(plugin).ok()?;
        Some(
            view.instances
                .iter()
                .filter_map(|(i, s)| Some((*i, s.pid?, s.usage.as_ref()?.cpu)))
                .collect(),
        )
    }
}

/// The scaler's lever: the supervisor's pools.
pub struct Pools(pub Arc<Supervisor>);

impl scaler::Actuator for Pools {
    fn replicas(&self, plugin: &str) -> Option<u32> {
        self.0.replicas(plugin)
    }

    fn scale<'a>(
        &'a self,
        plugin: &'a str,
        replicas: u32,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            self.0
                .autoscale(plugin, replicas)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
    }
}
