//! Prometheus metrics through OpenTelemetry.
//!
//! Event-driven counts (restarts, health checks, breaker trips, start
//! latency) are recorded where the events are reported (`events.rs`);
//! state (instances up, breaker state, replicas, cgroup usage) is read
//! from the supervisor at scrape time, so it costs nothing between scrapes.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use serde::Deserialize;

use crate::supervisor::Supervisor;
use crate::supervisor::breaker::Breaker;

/// `[conductor.metrics]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve `/metrics` at all.
    pub enabled: bool,
    /// Where `/metrics` listens (port 0 picks a free one and logs it).
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the Prometheus exporter: {0}")]
pub struct MetricsError(String);

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
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        let meter = provider.meter("demi-conductor");
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
            registry,
            provider,
            meter,
            observers: Mutex::new(Vec::new()),
        };
        Ok(Arc::new(metrics))
    }

    /// Registers the instruments read from `supervisor` at scrape time.
    pub fn observe(&self, supervisor: Weak<Supervisor>) {
        let plugin_gauge =
            |name: &'static str, help: &'static str, value: fn(&PluginSample) -> u64| {
                let supervisor = supervisor.clone();
                self.meter
                    .u64_observable_gauge(name)
                    .with_description(help)
                    .with_callback(move |observer| {
                        for sample in samples(&supervisor) {
                            observer.observe(
                                value(&sample),
                                &[KeyValue::new("plugin", sample.name.clone())],
                            );
                        }
                    })
                    .build()
            };
        let desired = plugin_gauge("demi_replicas_desired", "Instances wanted", |p| p.desired);
        let running = plugin_gauge(
            "demi_replicas_running",
            "Instances with a live process",
            |p| p.running,
        );
        let serving = plugin_gauge("demi_replicas_serving", "Instances SERVING", |p| p.serving);

        // One callback shape for every per-instance value, gauge or counter.
        let per_instance = |value: fn(&InstanceSample) -> Option<f64>| {
            let supervisor = supervisor.clone();
            move |observer: &dyn opentelemetry::metrics::AsyncInstrument<f64>| {
                for plugin in samples(&supervisor) {
                    for instance in &plugin.instances {
                        if let Some(v) = value(instance) {
                            observer.observe(v, &instance.labels);
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
        let observers: Vec<Box<dyn std::any::Any + Send + Sync>> = vec![
            Box::new(desired),
            Box::new(running),
            Box::new(serving),
            Box::new(instance_gauge(
                "demi_instance_up",
                "",
                "1 while the instance is SERVING",
                |i| Some(if i.state == "serving" { 1.0 } else { 0.0 }),
            )),
            Box::new(self.instance_states(supervisor.clone())),
            Box::new(instance_gauge(
                "demi_instance_breaker_state",
                "",
                "Circuit breaker: 0 closed, 1 half-open, 2 open",
                |i| Some(i.breaker),
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
        self.observers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(observers);
    }

    /// Queue depth and jobs in flight per plugin, read from `dispatcher`.
    pub fn observe_dispatch(&self, dispatcher: Weak<crate::dispatch::Dispatcher>) {
        let gauge =
            |name: &'static str, help: &'static str, pick: fn(&(String, usize, usize)) -> usize| {
                let dispatcher = dispatcher.clone();
                self.meter
                    .u64_observable_gauge(name)
                    .with_description(help)
                    .with_callback(move |observer| {
                        if let Some(dispatcher) = dispatcher.upgrade() {
                            for lane in dispatcher.lanes() {
                                observer.observe(
                                    pick(&lane) as u64,
                                    &[KeyValue::new("plugin", lane.0.clone())],
                                );
                            }
                        }
                    })
                    .build()
            };
        let queued = gauge("demi_jobs_queued", "Jobs waiting for a replica", |l| l.1);
        let in_flight = gauge("demi_jobs_in_flight", "Jobs being delivered", |l| l.2);
        self.observers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend([
                Box::new(queued) as Box<dyn std::any::Any + Send + Sync>,
                Box::new(in_flight),
            ]);
    }

    /// The autoscaler's latest decision per plugin, read at scrape time.
    pub fn observe_scaler(&self, scaler: Weak<crate::scaler::Scaler>) {
        type Pick = fn(&crate::scaler::live::Status) -> Vec<(Option<&'static str>, f64)>;
        let gauge = |name: &'static str, unit: &'static str, help: &'static str, pick: Pick| {
            let scaler = scaler.clone();
            self.meter
                .f64_observable_gauge(name)
                .with_unit(unit)
                .with_description(help)
                .with_callback(move |observer| {
                    let Some(scaler) = scaler.upgrade() else {
                        return;
                    };
                    for (plugin, status) in scaler.statuses() {
                        for (bound, value) in pick(&status) {
                            let mut labels = vec![KeyValue::new("plugin", plugin.clone())];
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
        let observers: Vec<Box<dyn std::any::Any + Send + Sync>> = vec![
            Box::new(gauge(
                "demi_autoscale_desired_replicas",
                "",
                "Replicas the autoscaler's last decision asked for",
                |s| vec![(None, f64::from(s.desired))],
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
                |s| match s.ahead {
                    Some(a) => vec![
                        (Some("point"), a.point),
                        (Some("lower"), a.lower),
                        (Some("upper"), a.upper),
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
        ];
        self.observers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(observers);
    }

    /// `demi_instance_state{state=…}`: 1 for the current state, 0 for the
    /// others, so a dashboard can count instances per state.
    fn instance_states(
        &self,
        supervisor: Weak<Supervisor>,
    ) -> opentelemetry::metrics::ObservableGauge<u64> {
        const STATES: [&str; 7] = [
            "starting",
            "serving",
            "unhealthy",
            "stopping",
            "backoff",
            "failed",
            "stopped",
        ];
        self.meter
            .u64_observable_gauge("demi_instance_state")
            .with_description("1 for the state the instance is in")
            .with_callback(move |observer| {
                for plugin in samples(&supervisor) {
                    for instance in &plugin.instances {
                        for state in STATES {
                            let mut labels = instance.labels.clone();
                            labels.push(KeyValue::new("state", state));
                            observer.observe(u64::from(instance.state == state), &labels);
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

struct PluginSample {
    name: String,
    desired: u64,
    running: u64,
    serving: u64,
    instances: Vec<InstanceSample>,
}

struct InstanceSample {
    labels: Vec<KeyValue>,
    state: &'static str,
    breaker: f64,
    usage: Option<crate::process::cgroup::Usage>,
}

fn samples(supervisor: &Weak<Supervisor>) -> Vec<PluginSample> {
    let Some(supervisor) = supervisor.upgrade() else {
        return Vec::new();
    };
    supervisor
        .list()
        .into_iter()
        .map(|view| PluginSample {
            desired: u64::from(view.replicas),
            running: view
                .instances
                .iter()
                .filter(|(_, s)| s.pid.is_some())
                .count() as u64,
            serving: u64::from(view.serving()),
            instances: view
                .instances
                .iter()
                .map(|(index, status)| InstanceSample {
                    labels: vec![
                        KeyValue::new("plugin", view.name.clone()),
                        KeyValue::new("instance", i64::from(*index)),
                    ],
                    state: status.state,
                    breaker: match status.breaker {
                        Breaker::Closed { .. } => 0.0,
                        Breaker::HalfOpen { .. } => 1.0,
                        Breaker::Open => 2.0,
                    },
                    usage: status.usage,
                })
                .collect(),
            name: view.name,
        })
        .collect()
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
