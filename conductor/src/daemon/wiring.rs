//! Adapters between components that do not know each other: each narrow
//! view a component asks for, implemented here over the others.

use std::sync::{Arc, Weak};

use crate::dispatch::Dispatcher;
use crate::scaler::Scaler;
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
