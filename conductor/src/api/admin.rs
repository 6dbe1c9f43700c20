//! `demi.conductor.v1.Conductor`: the operator's view and levers.

use std::pin::Pin;
use std::time::{Duration, Instant};

use demi_proto::conductor::v1 as pb;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::jobs::{self, timestamp};
use super::{Parts, ReloadError};
use crate::events::{Event, InstanceEvent, Stamped};
use crate::supervisor::{InstanceStatus, PluginView, SupervisorError};

pub struct Admin {
    parts: Parts,
    /// Ends open event streams when the conductor stops.
    shutdown: CancellationToken,
}

impl Admin {
    pub fn new(parts: Parts, shutdown: CancellationToken) -> Self {
        Self { parts, shutdown }
    }

    fn plugin(&self, view: PluginView) -> pb::Plugin {
        let autoscale = self.parts.scaler.status(&view.name).map(autoscale);
        pb::Plugin {
            autoscale,
            ..plugin(view)
        }
    }

    fn answer(&self, view: Result<PluginView, SupervisorError>) -> Answer<pb::Plugin> {
        view.map(|v| Response::new(self.plugin(v))).map_err(status)
    }
}

fn autoscale(s: crate::scaler::live::Status) -> pb::Autoscale {
    pb::Autoscale {
        min: s.min,
        max: s.max,
        desired: s.desired,
        signal: match s.signal {
            crate::scaler::Signal::Jobs => "jobs",
            crate::scaler::Signal::Cpu => "cpu",
        }
        .into(),
        load: s.load,
        forecast: s.ahead.map(|a| a.point),
        forecast_lower: s.ahead.map(|a| a.lower),
        forecast_upper: s.ahead.map(|a| a.upper),
        capacity: s.capacity,
        capacity_measured: s.capacity_measured,
        lead: prost_types::Duration::try_from(s.lead).ok(),
        model: s.model.map(|m| m.as_str().to_owned()).unwrap_or_default(),
        fallback: s.fallback.unwrap_or_default(),
        reason: s.reason,
        decided_at: Some(prost_types::Timestamp::from(s.decided_at)),
        history: s.history as u32,
        capped: s.capped.unwrap_or_default(),
    }
}

fn name_of(request: Request<pb::PluginRef>) -> Result<String, Status> {
    plugin_name(request.into_inner().name)
}

/// A plugin name from a request; one longer than any plugin's is refused
/// before it is looked up, and never echoed whole in an answer.
fn plugin_name(name: String) -> Result<String, Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("name: must name a plugin"));
    }
    super::bounded_name("name", "a plugin name", &name)?;
    Ok(name)
}

type Answer<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl pb::conductor_server::Conductor for Admin {
    #[tracing::instrument(skip_all)]
    async fn list_plugins(
        &self,
        _: Request<pb::ListPluginsRequest>,
    ) -> Answer<pb::ListPluginsResponse> {
        let plugins: Vec<pb::Plugin> = self
            .parts
            .supervisor
            .list_with_usage()
            .into_iter()
            .map(|v| self.plugin(v))
            .collect();
        let degraded = plugins
            .iter()
            .filter(|p| !p.degraded.is_empty())
            .map(|p| p.name.clone())
            .collect();
        let m = self.parts.machine.sample();
        let machine = Some(pb::Machine {
            cpus: m.cpus as u32,
            cpu_busy: m.cpu_busy,
            load1: m.load[0],
            load5: m.load[1],
            load15: m.load[2],
            memory_total_bytes: m.memory_total,
            memory_available_bytes: m.memory_available,
            swap_total_bytes: m.swap_total,
            swap_used_bytes: m.swap_used,
            conductor_rss_bytes: m.conductor_rss,
            conductor_cpu: duration(m.conductor_cpu),
        });
        Ok(Response::new(pb::ListPluginsResponse {
            plugins,
            degraded,
            machine,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_plugin(&self, request: Request<pb::PluginRef>) -> Answer<pb::Plugin> {
        let name = name_of(request)?;
        self.answer(self.parts.supervisor.get_with_usage(&name))
    }

    #[tracing::instrument(skip_all)]
    async fn start_plugin(&self, request: Request<pb::PluginRef>) -> Answer<pb::Plugin> {
        let name = name_of(request)?;
        self.answer(self.parts.supervisor.start_plugin(&name).await)
    }

    #[tracing::instrument(skip_all)]
    async fn stop_plugin(&self, request: Request<pb::PluginRef>) -> Answer<pb::Plugin> {
        let name = name_of(request)?;
        self.answer(self.parts.supervisor.stop_plugin(&name).await)
    }

    #[tracing::instrument(skip_all)]
    async fn restart_plugin(&self, request: Request<pb::PluginRef>) -> Answer<pb::Plugin> {
        let name = name_of(request)?;
        self.answer(self.parts.supervisor.restart_plugin(&name).await)
    }

    #[tracing::instrument(skip_all)]
    async fn scale_plugin(&self, request: Request<pb::ScalePluginRequest>) -> Answer<pb::Plugin> {
        let request = request.into_inner();
        let name = plugin_name(request.name)?;
        self.answer(self.parts.supervisor.scale(&name, request.replicas).await)
    }

    type WatchEventsStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

    #[tracing::instrument(skip_all)]
    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Answer<Self::WatchEventsStream> {
        let only = request.into_inner().plugin;
        if !only.is_empty()
            && self
                .parts
                .supervisor
                .get(&plugin_name(only.clone())?)
                .is_err()
        {
            return Err(Status::not_found(format!("no plugin named {only:?}")));
        }
        let mut events = self.parts.supervisor.events().subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let shutdown = self.shutdown.clone();
        // Ends when the conductor stops or the watcher goes away.
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    event = events.recv() => event,
                };
                match event {
                    Ok(stamped) => {
                        let wanted = match stamped.event.plugin() {
                            Some(plugin) => only.is_empty() || plugin == only,
                            // Conductor-wide (a reload) goes to everyone.
                            None => true,
                        };
                        if let Some(event) = event_of(&stamped).filter(|_| wanted)
                            && tx.send(Ok(event)).await.is_err()
                        {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(
                            missed,
                            "an event watcher fell behind; events were dropped for it"
                        );
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    #[tracing::instrument(skip_all)]
    async fn reload(&self, _: Request<pb::ReloadRequest>) -> Answer<pb::ReloadResponse> {
        let summary = self
            .parts
            .control
            .reload()
            .await
            .map_err(|error| match error {
                ReloadError::Invalid(_) => Status::invalid_argument(error.to_string()),
                ReloadError::Apply(error) => status(error),
            })?;
        Ok(Response::new(pb::ReloadResponse {
            added: summary.added,
            removed: summary.removed,
            changed: summary.changed,
            unchanged: summary.unchanged,
            ignored: summary.ignored,
            warnings: summary.warnings,
        }))
    }

    // No span for the two job entry points: they run once per job, a span
    // costs more than the rest of the handler, and dispatch's own events
    // name the job and plugin.
    async fn submit(&self, request: Request<pb::SubmitRequest>) -> Answer<pb::SubmitResponse> {
        let receipt = self
            .parts
            .dispatcher
            .submit(jobs::submission(request, None))
            .await
            .map_err(jobs::status)?;
        Ok(Response::new(pb::SubmitResponse {
            job_id: receipt.id,
            duplicate: receipt.duplicate,
        }))
    }

    async fn submit_and_wait(&self, request: Request<pb::SubmitRequest>) -> Answer<pb::JobOutcome> {
        let (receipt, finished) = self
            .parts
            .dispatcher
            .submit_and_wait(jobs::submission(request, None))
            .await
            .map_err(jobs::status)?;
        Ok(Response::new(jobs::outcome(receipt, finished)))
    }

    #[tracing::instrument(skip_all)]
    async fn get_job(&self, request: Request<pb::GetJobRequest>) -> Answer<pb::JobState> {
        let id = jobs::job_id(request.into_inner().job_id)?;
        let state = self.parts.dispatcher.job(&id).await.map_err(jobs::status)?;
        Ok(Response::new(jobs::state(id, state)))
    }

    #[tracing::instrument(skip_all)]
    async fn wait_job(&self, request: Request<pb::WaitJobRequest>) -> Answer<pb::JobState> {
        let request = request.into_inner();
        let id = jobs::job_id(request.job_id)?;
        let patience = jobs::patience(request.timeout)?;
        let dispatcher = &self.parts.dispatcher;
        let state = dispatcher
            .wait_job(&id, patience)
            .await
            .map_err(jobs::status)?;
        Ok(Response::new(jobs::state(id, state)))
    }

    #[tracing::instrument(skip_all)]
    async fn list_dead_letters(
        &self,
        _: Request<pb::ListDeadLettersRequest>,
    ) -> Answer<pb::ListDeadLettersResponse> {
        let letters = self
            .parts
            .dispatcher
            .dead_letters()
            .await
            .map_err(jobs::status)?;
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters: letters
                .into_iter()
                .map(|l| pb::DeadLetter {
                    job_id: l.job.id,
                    plugin: l.job.plugin,
                    kind: l.job.kind,
                    payload: l.job.payload,
                    attributes: l.job.attributes,
                    attempts: l.job.attempts,
                    errors: l.errors,
                    accepted_at: timestamp(l.job.accepted_ms),
                    dead_at: timestamp(l.dead_ms),
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn replay_dead_letters(
        &self,
        request: Request<pb::ReplayDeadLettersRequest>,
    ) -> Answer<pb::ReplayDeadLettersResponse> {
        let request = request.into_inner();
        let ids = match (request.all, request.job_ids.is_empty()) {
            (true, true) => None,
            (false, false) => Some(request.job_ids),
            _ => {
                return Err(Status::invalid_argument(
                    "job_ids: name the dead letters to replay, or set all (not both)",
                ));
            }
        };
        let job_ids = self
            .parts
            .dispatcher
            .replay(ids)
            .await
            .map_err(jobs::status)?;
        Ok(Response::new(pb::ReplayDeadLettersResponse { job_ids }))
    }

    #[tracing::instrument(skip_all)]
    async fn purge_dead_letters(
        &self,
        _: Request<pb::PurgeDeadLettersRequest>,
    ) -> Answer<pb::PurgeDeadLettersResponse> {
        let purged = self.parts.dispatcher.purge().await.map_err(jobs::status)?;
        Ok(Response::new(pb::PurgeDeadLettersResponse {
            purged: purged as u64,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_config(&self, _: Request<pb::GetConfigRequest>) -> Answer<pb::GetConfigResponse> {
        let (path, text) = self.parts.control.config().await;
        Ok(Response::new(pb::GetConfigResponse {
            path: path.display().to_string(),
            text,
        }))
    }
}

/// Typed errors to gRPC codes, at the edge.
fn status(error: SupervisorError) -> Status {
    match &error {
        SupervisorError::NotFound(_) => Status::not_found(error.to_string()),
        SupervisorError::InvalidArgument { .. } => Status::invalid_argument(error.to_string()),
        SupervisorError::NotServing { .. } => Status::aborted(error.to_string()),
        SupervisorError::Autoscaled { .. } => Status::failed_precondition(error.to_string()),
    }
}

fn duration(d: Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(d).ok()
}

pub(crate) fn plugin(view: PluginView) -> pb::Plugin {
    let serving = view.serving();
    let healthy = view.healthy();
    pb::Plugin {
        degraded: view.degraded().unwrap_or_default(),
        waiting_for: view.waiting_for.clone(),
        held: view.held,
        name: view.name,
        replicas: view.replicas,
        serving,
        healthy,
        min_serving: view.min_serving,
        command: view.command,
        source: view.source,
        instances: view
            .instances
            .into_iter()
            .map(|(i, s)| pb::Instance {
                health_note: view.notes.get(&i).cloned().unwrap_or_default(),
                ..instance(i, s)
            })
            .collect(),
        autoscale: None,
    }
}

fn instance(index: u32, s: InstanceStatus) -> pb::Instance {
    pb::Instance {
        index,
        state: s.state.as_str().into(),
        pid: s.pid.unwrap_or(0),
        breaker: s.breaker.to_string(),
        restarts: s.restarts,
        last_exit: s.last_exit.map(|e| e.to_string()).unwrap_or_default(),
        failure: s.failure.unwrap_or_default(),
        last_restart: s.last_restart.unwrap_or_default(),
        uptime: s
            .spawned
            .and_then(|t| duration(Instant::now().saturating_duration_since(t))),
        confined: s.confined,
        usage: s.usage.map(|u| pb::Usage {
            memory_bytes: u.memory_bytes,
            memory_peak_bytes: u.memory_peak_bytes,
            cpu: duration(u.cpu),
            throttled: duration(u.throttled),
            throttled_periods: u.throttled_periods,
            pids: u.pids,
            oom_kills: u.oom_kills,
        }),
        history: s
            .history
            .into_iter()
            .map(|e| pb::Exit {
                at: Some(prost_types::Timestamp::from(e.at)),
                pid: e.pid.unwrap_or(0),
                reason: e.reason.to_string(),
                ran: duration(e.ran),
            })
            .collect(),
        health_note: String::new(),
    }
}

/// The events `WatchEvents` streams, as the proto names them; the rest
/// (phase changes, job events, …) are internal.
fn event_of(stamped: &Stamped) -> Option<pb::Event> {
    use pb::event::Kind as K;
    let (kind, plugin, instance, pid, detail) = match &stamped.event {
        Event::Instance {
            plugin,
            instance,
            pid,
            what,
        } => {
            let (kind, detail) = match what {
                InstanceEvent::Spawned => (K::Started, String::new()),
                InstanceEvent::Serving { startup, .. } => {
                    (K::Serving, format!("ready in {} ms", startup.as_millis()))
                }
                InstanceEvent::Recovered => (K::Serving, "healthy again".into()),
                InstanceEvent::HealthFailed { why, .. } => (K::Unhealthy, why.clone()),
                InstanceEvent::BreakerTripped { cause } => (K::BreakerTripped, cause.clone()),
                InstanceEvent::Exited { reason, .. } => (K::Exited, reason.clone()),
                InstanceEvent::RestartScheduled { delay, attempt } => (
                    K::Backoff,
                    format!("restart in {} ms (attempt {attempt})", delay.as_millis()),
                ),
                InstanceEvent::Failed { reason } => (K::Failed, reason.clone()),
                InstanceEvent::Stopped => (K::Stopped, String::new()),
                _ => return None,
            };
            // A restart scheduled or a failure is about the instance, not
            // a process.
            let pid = match what {
                InstanceEvent::RestartScheduled { .. }
                | InstanceEvent::Failed { .. }
                | InstanceEvent::Stopped => None,
                _ => *pid,
            };
            (kind, plugin.to_string(), *instance, pid, detail)
        }
        Event::Scaled { plugin, from, to } => (
            K::Scaled,
            plugin.to_string(),
            0,
            None,
            format!("{from} -> {to}"),
        ),
        Event::Reloaded {
            added,
            removed,
            changed,
            ..
        } => (
            K::Reloaded,
            String::new(),
            0,
            None,
            format!("added {added:?}, removed {removed:?}, changed {changed:?}"),
        ),
        Event::Autoscaled(decision) => (
            K::Autoscale,
            decision.plugin.to_string(),
            0,
            None,
            decision.detail.clone(),
        ),
        Event::Dependency {
            plugin,
            dependency,
            ready,
        } => (
            K::Dependency,
            plugin.to_string(),
            0,
            None,
            format!("{dependency} {}", if *ready { "back" } else { "lost" }),
        ),
        Event::Job { .. } | Event::PluginApi { .. } => return None,
    };
    Some(pb::Event {
        at: Some(prost_types::Timestamp::from(stamped.at)),
        plugin,
        instance,
        kind: kind as i32,
        pid: pid.unwrap_or(0),
        detail,
    })
}
