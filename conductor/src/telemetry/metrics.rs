//! Prometheus metrics through OpenTelemetry.
//!
//! Event-driven counts (restarts, health checks, breaker trips, start
//! latency, jobs) are recorded by the [`Recorder`](super::Recorder) as
//! events happen; state (instances up, breaker state, replicas, cgroup
//! usage, queues, the autoscaler's view) is read from a [`Snapshot`] at
//! scrape time, so it costs nothing between scrapes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::{Instrument, SdkMeterProvider, Stream};

use crate::events::Phase;

/// What metrics read at scrape time. The daemon implements it over its
/// components; telemetry knows none of them.
pub trait Snapshot: Send + Sync {
    fn plugins(&self) -> Vec<PluginSample>;
    fn lanes(&self) -> Vec<LaneSample>;
    fn autoscalers(&self) -> Vec<AutoscaleSample>;
    fn host(&self) -> HostSample;
}

/// The machine, and the conductor's own process on it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostSample {
    pub cpus: u64,
    /// Busy share of all CPUs, 0.0 to 1.0.
    pub cpu_busy: f64,
    pub load: [f64; 3],
    pub memory_total: u64,
    pub memory_available: u64,
    pub swap_total: u64,
    pub swap_used: u64,
    pub conductor_rss: u64,
    pub conductor_cpu: Duration,
    pub conductor_tasks: u64,
    pub conductor_open_fds: u64,
}

/// One plugin's pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginSample {
    pub name: String,
    /// Instances wanted now.
    pub desired: u32,
    pub instances: Vec<InstanceSample>,
    /// An instance Failed or fewer than `min_serving` SERVING.
    pub degraded: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InstanceSample {
    pub index: u32,
    pub phase: Phase,
    /// A process is alive.
    pub running: bool,
    pub breaker: BreakerState,
    pub usage: Option<UsageSample>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    HalfOpen,
    Open,
}

/// An instance's cgroup counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageSample {
    pub memory_bytes: u64,
    pub memory_peak_bytes: u64,
    pub cpu: Duration,
    pub throttled: Duration,
    pub pids: u64,
    pub oom_kills: u64,
}

/// One plugin's jobs.
#[derive(Debug, Clone, PartialEq)]
pub struct LaneSample {
    pub plugin: String,
    pub queued: usize,
    pub in_flight: usize,
}

/// One plugin's latest autoscaler decision.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoscaleSample {
    pub plugin: String,
    pub desired: u32,
    pub load: f64,
    /// Point, lower and upper bound over the lead time.
    pub forecast: Option<(f64, f64, f64)>,
    pub capacity: f64,
    pub lead: Duration,
    /// The host could not hold what the last decision wanted.
    pub capped: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the Prometheus exporter: {0}")]
pub struct MetricsError(String);

/// Instances whose per-instance series stay apart; past it the SDK merges
/// the rest of a family into one `otel_metric_overflow="true"` series.
const INSTANCES: usize = 2000;

/// The SDK's limit is 2,000 series a family, which `demi_instance_state`
/// (a series per instance and state) passes at 286 instances. Each family
/// reserves a table for its limit up front, so the limits stay this tight.
fn per_instance_series(instrument: &Instrument) -> Option<Stream> {
    let series = match instrument.name() {
        "demi_instance_state" => INSTANCES * Phase::ALL.len(),
        name if name.starts_with("demi_instance_") => INSTANCES,
        _ => return None,
    };
    Stream::builder()
        .with_cardinality_limit(series)
        .build()
        .ok()
}

/// Latency buckets in seconds, from a fast local gRPC call to a slow start.
const SECONDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The conductor's instruments and the registry they are scraped from.
pub struct Metrics {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
    meter: Meter,
    /// Restarts by plugin and the reason the previous process ended.
    pub restarts: Counter<u64>,
    /// The seed's `health_checks_total{platform,status}`.
    pub health_checks: Counter<u64>,
    pub health_check_duration: Histogram<f64>,
    pub breaker_trips: Counter<u64>,
    /// Spawn to SERVING.
    pub start_duration: Histogram<f64>,
    pub jobs_submitted: Counter<u64>,
    pub jobs_completed: Counter<u64>,
    /// Failed deliveries (each attempt counts).
    pub jobs_failed: Counter<u64>,
    pub jobs_retried: Counter<u64>,
    pub jobs_dead_lettered: Counter<u64>,
    /// Accepted to answered.
    pub job_duration: Histogram<f64>,
    /// Accepted to the first attempt (to the dead letter if none).
    pub job_queue_wait: Histogram<f64>,
    /// Plugin API calls refused, by plugin and method.
    pub plugin_api_denied: Counter<u64>,
    /// Turns granted under shared limits, and how long each waited.
    pub limit_grants: Counter<u64>,
    pub limit_wait: Histogram<f64>,
    /// Acquires whose turn would have come after their deadline.
    pub limit_refusals: Counter<u64>,
    /// Observable instruments live as long as their registration.
    observers: Mutex<Vec<Box<dyn std::any::Any + Send + Sync>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Result<Arc<Self>, MetricsError> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            // Every series would otherwise carry otel_scope_* labels.
            .scope_info_enabled(false)
            .without_target_info()
            .build()
            .map_err(|e| MetricsError(e.to_string()))?;
        let provider = SdkMeterProvider::builder()
            .with_reader(exporter)
            .with_view(per_instance_series)
            .build();
        let meter = provider.meter("demi-conductor");
        let log_drops = meter
            .u64_observable_counter("demi_log_lines_dropped")
            .with_description("Log lines lost because stdout was not read fast enough")
            .with_callback(|observer| observer.observe(super::dropped_log_lines(), &[]))
            .build();
        // Names carry no `_total`: the exporter adds it to counters (and a
        // second one if the name already had it).
        let metrics = Self {
            restarts: meter
                .u64_counter("demi_restarts")
                .with_description("Instance restarts, by the reason the previous process ended")
                .build(),
            health_checks: meter
                .u64_counter("health_checks")
                .with_description("Periodic gRPC health checks, by plugin and outcome")
                .build(),
            health_check_duration: meter
                .f64_histogram("health_check_duration")
                .with_unit("s")
                .with_boundaries(SECONDS.to_vec())
                .with_description("Time a health check took to answer or time out")
                .build(),
            breaker_trips: meter
                .u64_counter("demi_breaker_trips")
                .with_description("Circuit breaker trips (instance killed and replaced)")
                .build(),
            start_duration: meter
                .f64_histogram("demi_instance_start_duration")
                .with_unit("s")
                .with_boundaries(SECONDS.to_vec())
                .with_description("Time from spawn to SERVING")
                .build(),
            jobs_submitted: meter
                .u64_counter("demi_jobs_submitted")
                .with_description("Jobs accepted; its rate is the arrival rate")
                .build(),
            jobs_completed: meter
                .u64_counter("demi_jobs_completed")
                .with_description("Jobs a replica answered")
                .build(),
            jobs_failed: meter
                .u64_counter("demi_jobs_failed")
                .with_description("Failed deliveries (every attempt counts)")
                .build(),
            jobs_retried: meter
                .u64_counter("demi_jobs_retried")
                .with_description("Deliveries retried after a retryable failure")
                .build(),
            jobs_dead_lettered: meter
                .u64_counter("demi_jobs_dead_lettered")
                .with_description("Jobs moved to the dead-letter queue")
                .build(),
            job_duration: meter
                .f64_histogram("demi_job_duration")
                .with_unit("s")
                .with_boundaries(SECONDS.to_vec())
                .with_description("Time from acceptance to answer")
                .build(),
            job_queue_wait: meter
                .f64_histogram("demi_job_queue_wait")
                .with_unit("s")
                .with_boundaries(SECONDS.to_vec())
                .with_description(
                    "Time from acceptance to the first attempt (to the dead letter if none)",
                )
                .build(),
            plugin_api_denied: meter
                .u64_counter("demi_plugin_api_denied")
                .with_description("Plugin API calls refused as outside the plugin's rights")
                .build(),
            limit_grants: meter
                .u64_counter("demi_shared_limit_grants")
                .with_description("Turns granted under a plugin's shared limits")
                .build(),
            limit_wait: meter
                .f64_histogram("demi_shared_limit_wait")
                .with_unit("s")
                .with_boundaries(SECONDS.to_vec())
                .with_description("Time an Acquire waited for its turn")
                .build(),
            limit_refusals: meter
                .u64_counter("demi_shared_limit_refusals")
                .with_description("Acquires refused: the turn came after the caller's deadline")
                .build(),
            registry,
            provider,
            meter,
            observers: Mutex::new(vec![Box::new(log_drops)]),
        };
        Ok(Arc::new(metrics))
    }

    /// Registers the instruments read from `snapshot` at scrape time.
    pub fn observe(&self, snapshot: Arc<dyn Snapshot>) {
        let plugin_gauge =
            |name: &'static str, help: &'static str, value: fn(&PluginSample) -> u64| {
                let snapshot = snapshot.clone();
                self.meter
                    .u64_observable_gauge(name)
                    .with_description(help)
                    .with_callback(move |observer| {
                        for sample in snapshot.plugins() {
                            observer.observe(
                                value(&sample),
                                &[KeyValue::new("plugin", sample.name.clone())],
                            );
                        }
                    })
                    .build()
            };
        let desired = plugin_gauge("demi_replicas_desired", "Instances wanted", |p| {
            u64::from(p.desired)
        });
        let running = plugin_gauge(
            "demi_replicas_running",
            "Instances with a live process",
            |p| p.instances.iter().filter(|i| i.running).count() as u64,
        );
        let serving = plugin_gauge("demi_replicas_serving", "Instances SERVING", |p| {
            p.instances
                .iter()
                .filter(|i| i.phase == Phase::Serving)
                .count() as u64
        });
        let plugin_degraded = plugin_gauge(
            "demi_plugin_degraded",
            "1 while an instance is Failed or fewer than min_serving are SERVING",
            |p| u64::from(p.degraded),
        );
        let degraded = {
            let snapshot = snapshot.clone();
            self.meter
                .u64_observable_gauge("demi_degraded")
                .with_description(
                    "1 while any plugin is degraded (the conductor itself stays SERVING)",
                )
                .with_callback(move |observer| {
                    let any = snapshot.plugins().iter().any(|p| p.degraded);
                    observer.observe(u64::from(any), &[]);
                })
                .build()
        };

        // One callback shape for every per-instance value, gauge or counter.
        let per_instance = |value: fn(&InstanceSample) -> Option<f64>| {
            let snapshot = snapshot.clone();
            move |observer: &dyn opentelemetry::metrics::AsyncInstrument<f64>| {
                for plugin in snapshot.plugins() {
                    for instance in &plugin.instances {
                        if let Some(v) = value(instance) {
                            observer.observe(v, &instance_labels(&plugin, instance));
                        }
                    }
                }
            }
        };
        let instance_gauge = |name: &'static str, unit: &'static str, help: &'static str, value| {
            self.meter
                .f64_observable_gauge(name)
                .with_unit(unit)
                .with_description(help)
                .with_callback(per_instance(value))
                .build()
        };
        let instance_counter =
            |name: &'static str, unit: &'static str, help: &'static str, value| {
                self.meter
                    .f64_observable_counter(name)
                    .with_unit(unit)
                    .with_description(help)
                    .with_callback(per_instance(value))
                    .build()
            };
        let mut observers: Vec<Box<dyn std::any::Any + Send + Sync>> = vec![
            Box::new(desired),
            Box::new(running),
            Box::new(serving),
            Box::new(plugin_degraded),
            Box::new(degraded),
            Box::new(instance_gauge(
                "demi_instance_up",
                "",
                "1 while the instance is SERVING",
                |i| Some(if i.phase == Phase::Serving { 1.0 } else { 0.0 }),
            )),
            Box::new(self.instance_states(snapshot.clone())),
            Box::new(instance_gauge(
                "demi_instance_breaker_state",
                "",
                "Circuit breaker: 0 closed, 1 half-open, 2 open",
                |i| {
                    Some(match i.breaker {
                        BreakerState::Closed => 0.0,
                        BreakerState::HalfOpen => 1.0,
                        BreakerState::Open => 2.0,
                    })
                },
            )),
            Box::new(instance_gauge(
                "demi_instance_memory",
                "By",
                "Memory charged to the instance's cgroup",
                |i| i.usage.map(|u| u.memory_bytes as f64),
            )),
            Box::new(instance_gauge(
                "demi_instance_memory_peak",
                "By",
                "Peak memory of the instance's cgroup",
                |i| i.usage.map(|u| u.memory_peak_bytes as f64),
            )),
            Box::new(instance_gauge(
                "demi_instance_pids",
                "",
                "Tasks in the instance's cgroup",
                |i| i.usage.map(|u| u.pids as f64),
            )),
            Box::new(instance_counter(
                "demi_instance_cpu",
                "s",
                "CPU time of the instance's cgroup",
                |i| i.usage.map(|u| u.cpu.as_secs_f64()),
            )),
            Box::new(instance_counter(
                "demi_instance_cpu_throttled",
                "s",
                "Time the CPU limit held the instance back",
                |i| i.usage.map(|u| u.throttled.as_secs_f64()),
            )),
            Box::new(instance_counter(
                "demi_instance_oom_kills",
                "",
                "OOM kills in the instance's cgroup",
                |i| i.usage.map(|u| u.oom_kills as f64),
            )),
        ];
        observers.extend(self.host_gauges(&snapshot));
        observers.extend(self.lane_gauges(&snapshot));
        observers.extend(self.autoscale_gauges(&snapshot));
        self.observers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(observers);
    }

    /// Queue depth and jobs in flight per plugin.
    fn lane_gauges(
        &self,
        snapshot: &Arc<dyn Snapshot>,
    ) -> Vec<Box<dyn std::any::Any + Send + Sync>> {
        let gauge = |name: &'static str, help: &'static str, pick: fn(&LaneSample) -> usize| {
            let snapshot = snapshot.clone();
            self.meter
                .u64_observable_gauge(name)
                .with_description(help)
                .with_callback(move |observer| {
                    for lane in snapshot.lanes() {
                        observer.observe(
                            pick(&lane) as u64,
                            &[KeyValue::new("plugin", lane.plugin.clone())],
                        );
                    }
                })
                .build()
        };
        vec![
            Box::new(gauge(
                "demi_jobs_queued",
                "Jobs waiting for a replica",
                |l| l.queued,
            )),
            Box::new(gauge("demi_jobs_in_flight", "Jobs being delivered", |l| {
                l.in_flight
            })),
        ]
    }

    /// The machine and the conductor's own process, read at scrape time
    /// (one reading per scrape, shared by every gauge of it).
    fn host_gauges(
        &self,
        snapshot: &Arc<dyn Snapshot>,
    ) -> Vec<Box<dyn std::any::Any + Send + Sync>> {
        let reading: Arc<Mutex<(std::time::Instant, HostSample)>> =
            Arc::new(Mutex::new((std::time::Instant::now(), snapshot.host())));
        let read = {
            let snapshot = snapshot.clone();
            move || {
                let mut last = reading.lock().unwrap_or_else(|p| p.into_inner());
                // A scrape reads every gauge within moments: one reading.
                if last.0.elapsed() > Duration::from_millis(500) {
                    *last = (std::time::Instant::now(), snapshot.host());
                }
                last.1
            }
        };
        let read = Arc::new(read);
        let gauge = |name: &'static str,
                     unit: &'static str,
                     help: &'static str,
                     value: fn(&HostSample) -> f64| {
            let read = read.clone();
            Box::new(
                self.meter
                    .f64_observable_gauge(name)
                    .with_unit(unit)
                    .with_description(help)
                    .with_callback(move |observer| observer.observe(value(&read()), &[]))
                    .build(),
            ) as Box<dyn std::any::Any + Send + Sync>
        };
        let load = {
            let read = read.clone();
            Box::new(
                self.meter
                    .f64_observable_gauge("demi_host_load")
                    .with_description("Load average, by window (1m, 5m, 15m)")
                    .with_callback(move |observer| {
                        let host = read();
                        for (window, value) in ["1m", "5m", "15m"].into_iter().zip(host.load) {
                            observer.observe(value, &[KeyValue::new("window", window)]);
                        }
                    })
                    .build(),
            ) as Box<dyn std::any::Any + Send + Sync>
        };
        vec![
            gauge("demi_host_cpus", "", "CPUs of the machine", |h| {
                h.cpus as f64
            }),
            gauge(
                "demi_host_cpu_busy",
                "",
                "Busy share of all CPUs, 0 to 1",
                |h| h.cpu_busy,
            ),
            load,
            gauge(
                "demi_host_memory_total",
                "By",
                "Memory of the machine",
                |h| h.memory_total as f64,
            ),
            gauge(
                "demi_host_memory_available",
                "By",
                "Memory available for new work",
                |h| h.memory_available as f64,
            ),
            gauge("demi_host_swap_total", "By", "Swap of the machine", |h| {
                h.swap_total as f64
            }),
            gauge("demi_host_swap_used", "By", "Swap in use", |h| {
                h.swap_used as f64
            }),
            gauge(
                "demi_conductor_resident_memory",
                "By",
                "The conductor's own RSS",
                |h| h.conductor_rss as f64,
            ),
            gauge(
                "demi_conductor_cpu",
                "s",
                "CPU time the conductor itself has used",
                |h| h.conductor_cpu.as_secs_f64(),
            ),
            gauge(
                "demi_conductor_tasks",
                "",
                "Tasks alive in the conductor's runtime",
                |h| h.conductor_tasks as f64,
            ),
            gauge(
                "demi_conductor_open_fds",
                "",
                "File descriptors the conductor has open",
                |h| h.conductor_open_fds as f64,
            ),
        ]
    }

    /// The autoscaler's latest decision per plugin.
    fn autoscale_gauges(
        &self,
        snapshot: &Arc<dyn Snapshot>,
    ) -> Vec<Box<dyn std::any::Any + Send + Sync>> {
        type Pick = fn(&AutoscaleSample) -> Vec<(Option<&'static str>, f64)>;
        let gauge = |name: &'static str, unit: &'static str, help: &'static str, pick: Pick| {
            let snapshot = snapshot.clone();
            self.meter
                .f64_observable_gauge(name)
                .with_unit(unit)
                .with_description(help)
                .with_callback(move |observer| {
                    for sample in snapshot.autoscalers() {
                        for (bound, value) in pick(&sample) {
                            let mut labels = vec![KeyValue::new("plugin", sample.plugin.clone())];
                            if let Some(bound) = bound {
                                labels.push(KeyValue::new("bound", bound));
                            }
                            if value.is_finite() {
                                observer.observe(value, &labels);
                            }
                        }
                    }
                })
                .build()
        };
        vec![
            Box::new(gauge(
                "demi_autoscale_desired_replicas",
                "",
                "Replicas the autoscaler's last decision asked for",
                |s| vec![(None, f64::from(s.desired))],
            )),
            Box::new(gauge(
                "demi_autoscale_capped",
                "",
                "1 when the host could not hold the replicas the last decision wanted",
                |s| vec![(None, if s.capped { 1.0 } else { 0.0 })],
            )),
            Box::new(gauge(
                "demi_autoscale_load",
                "",
                "Load of the last bucket (jobs/s, or cores for signal = cpu)",
                |s| vec![(None, s.load)],
            )),
            Box::new(gauge(
                "demi_autoscale_forecast",
                "",
                "Forecast load over the lead time: point, lower and upper bound",
                |s| match s.forecast {
                    Some((point, lower, upper)) => vec![
                        (Some("point"), point),
                        (Some("lower"), lower),
                        (Some("upper"), upper),
                    ],
                    None => Vec::new(),
                },
            )),
            Box::new(gauge(
                "demi_autoscale_capacity",
                "",
                "Load one replica carries at full utilisation",
                |s| vec![(None, s.capacity)],
            )),
            Box::new(gauge(
                "demi_autoscale_lead",
                "s",
                "Start-up time plus one bucket: how far ahead replicas are planned",
                |s| vec![(None, s.lead.as_secs_f64())],
            )),
        ]
    }

    /// `demi_instance_state{state=…}`: 1 for the current state, 0 for the
    /// others, so a dashboard can count instances per state.
    fn instance_states(
        &self,
        snapshot: Arc<dyn Snapshot>,
    ) -> opentelemetry::metrics::ObservableGauge<u64> {
        self.meter
            .u64_observable_gauge("demi_instance_state")
            .with_description("1 for the state the instance is in")
            .with_callback(move |observer| {
                for plugin in snapshot.plugins() {
                    for instance in &plugin.instances {
                        let labels = instance_labels(&plugin, instance);
                        for phase in Phase::ALL {
                            let mut labels = labels.clone();
                            labels.push(KeyValue::new("state", phase.as_str()));
                            observer.observe(u64::from(instance.phase == phase), &labels);
                        }
                    }
                }
            })
            .build()
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(error) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)
        {
            tracing::warn!(%error, "cannot encode metrics");
        }
        out
    }

    pub fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }
}

fn instance_labels(plugin: &PluginSample, instance: &InstanceSample) -> Vec<KeyValue> {
    vec![
        KeyValue::new("plugin", plugin.name.clone()),
        KeyValue::new("instance", i64::from(instance.index)),
    ]
}

/// Serves `GET /metrics` on `listen` until `shutdown`; returns the bound
/// address (useful with port 0).
pub async fn serve(
    metrics: Arc<Metrics>,
    listen: SocketAddr,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "metrics endpoint failed");
        }
    });
    Ok((addr, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool of `n` instances, all SERVING with cgroup usage.
    struct Fleet(u32);

    impl Snapshot for Fleet {
        fn plugins(&self) -> Vec<PluginSample> {
            let usage = UsageSample {
                memory_bytes: 1,
                memory_peak_bytes: 1,
                cpu: Duration::ZERO,
                throttled: Duration::ZERO,
                pids: 1,
                oom_kills: 0,
            };
            vec![PluginSample {
                name: "worker".into(),
                desired: self.0,
                instances: (0..self.0)
                    .map(|index| InstanceSample {
                        index,
                        phase: Phase::Serving,
                        running: true,
                        breaker: BreakerState::Closed,
                        usage: Some(usage),
                    })
                    .collect(),
                degraded: false,
            }]
        }
        fn lanes(&self) -> Vec<LaneSample> {
            Vec::new()
        }
        fn autoscalers(&self) -> Vec<AutoscaleSample> {
            Vec::new()
        }
        fn host(&self) -> HostSample {
            HostSample::default()
        }
    }

    fn series(text: &str, family: &str) -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{family}{{")))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn every_instance_of_a_large_fleet_has_its_own_series() {
        let n = 1000;
        let metrics = Metrics::new().unwrap();
        metrics.observe(Arc::new(Fleet(n)));
        let text = metrics.encode();
        assert!(
            !text.contains("overflow"),
            "series merged into an overflow series"
        );
        let states = series(&text, "demi_instance_state");
        assert_eq!(states.len(), n as usize * Phase::ALL.len());
        let serving = states
            .iter()
            .filter(|l| l.contains("state=\"serving\"") && l.ends_with(" 1"));
        assert_eq!(serving.count(), n as usize);
        for family in [
            "demi_instance_up",
            "demi_instance_memory_bytes",
            "demi_instance_pids",
        ] {
            assert_eq!(series(&text, family).len(), n as usize, "{family}");
        }
    }
}
