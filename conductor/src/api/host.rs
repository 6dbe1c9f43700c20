//! The plugin API (`demi.plugin.v1.Host`): what the conductor serves to
//! the plugins it runs, on a socket of its own. Every call is tied to the
//! calling instance by the token the instance was started with
//! (`DEMI_CONDUCTOR_TOKEN`, sent as `authorization: Bearer TOKEN`).
//!
//! A token, not `SO_PEERCRED`: a peer's pid says little once a plugin
//! forks helpers (their pids map to the instance only through its
//! cgroup, which may be off), and pids are reused; a token goes with
//! whatever the instance hands it to, names one instance exactly, works
//! with cgroups off and in every gRPC library as plain metadata, and dies
//! with the instance.
//!
//! The operator's service answers here too, but only PERMISSION_DENIED
//! (counted and logged with the plugin's name), so a plugin that tries it
//! learns why; reflection lists only what a plugin may call.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use demi_proto::conductor::v1 as admin;
use demi_proto::plugin::v1 as pb;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

use super::config::Grants;
use super::jobs;
use crate::dispatch::{Dispatcher, JobState};
use crate::events::{Bus, Event, PluginApiEvent};
use crate::limits::{LimitError, Limits};
use crate::supervisor::{Caller, Supervisor};

/// What each plugin may do, by plugin; replaced on reload.
#[derive(Default)]
pub struct Access {
    grants: Mutex<Arc<BTreeMap<String, Grants>>>,
    /// Each submitter's budget, with the rate it was made for (a reload
    /// that changes the rate starts it afresh).
    budgets: Mutex<BTreeMap<String, (u32, Arc<governor::DefaultDirectRateLimiter>)>>,
}

impl Access {
    pub fn new(grants: BTreeMap<String, Grants>) -> Self {
        let access = Self::default();
        access.configure(grants);
        access
    }

    pub fn configure(&self, grants: BTreeMap<String, Grants>) {
        *self.grants.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(grants);
    }

    fn may_submit(&self, plugin: &str, target: &str) -> bool {
        let grants = self
            .grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        grants
            .get(plugin)
            .is_some_and(|g| g.submits_to.iter().any(|t| t == target))
    }

    /// Takes one submission from `plugin`'s budget; if it is spent, the
    /// rate and how long until the next one fits.
    fn may_submit_now(&self, plugin: &str) -> Result<(), (u32, Duration)> {
        use governor::clock::{Clock as _, DefaultClock};
        let rate = self
            .grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(plugin)
            .map_or(super::config::DEFAULT_SUBMIT_RATE, |g| g.submit_rate);
        let budget = {
            let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
            match budgets.get(plugin) {
                Some((made_for, budget)) if *made_for == rate => budget.clone(),
                _ => {
                    let per_second = std::num::NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
                    let budget = Arc::new(governor::DefaultDirectRateLimiter::direct(
                        governor::Quota::per_second(per_second),
                    ));
                    budgets.insert(plugin.to_owned(), (rate, budget.clone()));
                    budget
                }
            }
        };
        budget.check().map_err(|not_until| {
            (
                rate,
                not_until.wait_time_from(DefaultClock::default().now()),
            )
        })
    }
}

/// Everything the plugin API reaches.
#[derive(Clone)]
pub struct HostParts {
    pub supervisor: Arc<Supervisor>,
    pub dispatcher: Arc<Dispatcher>,
    pub limits: Arc<Limits>,
    pub access: Arc<Access>,
    pub bus: Bus,
    /// Ends open streams when the conductor stops.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// Ties each call to its instance, or refuses it: UNAUTHENTICATED without
/// a token of a live instance.
#[derive(Clone)]
pub struct Identify(pub Arc<Supervisor>);

impl tonic::service::Interceptor for Identify {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(token) = token else {
            return Err(Status::unauthenticated(
                "send the instance's token as `authorization: Bearer $DEMI_CONDUCTOR_TOKEN`",
            ));
        };
        let caller = self.0.caller(token).ok_or_else(|| {
            Status::unauthenticated("the token belongs to no instance of this conductor")
        })?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

fn caller_of<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("the call carries no instance token"))
}

pub struct Host {
    parts: HostParts,
}

impl Host {
    pub fn new(parts: HostParts) -> Self {
        Self { parts }
    }

    fn deny(&self, caller: &Caller, method: &str, reason: String) -> Status {
        self.parts.bus.emit(Event::PluginApi {
            plugin: caller.plugin.clone(),
            instance: caller.index,
            what: PluginApiEvent::Denied {
                method: method.to_owned(),
                reason: reason.clone(),
            },
        });
        Status::permission_denied(reason)
    }

    /// The submission, if the caller may send it where it goes.
    fn submission(
        &self,
        request: Request<admin::SubmitRequest>,
        method: &str,
    ) -> Result<crate::dispatch::Submission, Status> {
        let caller = caller_of(&request)?;
        let target = request.get_ref().plugin.clone();
        // Named in the refusal below: bounded first.
        super::bounded_name("plugin", "a plugin name", &target)?;
        if !self.parts.access.may_submit(&caller.plugin, &target) {
            return Err(self.deny(
                &caller,
                method,
                format!(
                    "{:?} may not submit jobs to {target:?}: add it to \
                     [plugins.{}] submits_to",
                    &*caller.plugin, caller.plugin
                ),
            ));
        }
        if let Err((rate, wait)) = self.parts.access.may_submit_now(&caller.plugin) {
            return Err(Status::resource_exhausted(format!(
                "{:?} submits more than {rate} jobs a second ([plugins.{}] submit_rate); \
                 retry in {} ms",
                &*caller.plugin,
                caller.plugin,
                wait.as_millis().max(1)
            )));
        }
        Ok(jobs::submission(request, Some(&caller.plugin)))
    }

    /// `state`, if it is the caller's plugin's job (or says nothing).
    fn own(
        &self,
        caller: &Caller,
        method: &str,
        id: String,
        state: JobState,
    ) -> Result<Response<admin::JobState>, Status> {
        match state.submitter() {
            Some(owner) if owner != &*caller.plugin => Err(self.deny(
                caller,
                method,
                format!("job {id} was not submitted by {:?}", &*caller.plugin),
            )),
            None if !matches!(state, JobState::Unknown | JobState::Expired) => Err(self.deny(
                caller,
                method,
                format!("job {id} was submitted by an operator"),
            )),
            _ => Ok(Response::new(jobs::state(id, state))),
        }
    }
}

type Answer<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl pb::host_server::Host for Host {
    async fn submit(
        &self,
        request: Request<admin::SubmitRequest>,
    ) -> Answer<admin::SubmitResponse> {
        let submission = self.submission(request, "Submit")?;
        let receipt = self
            .parts
            .dispatcher
            .submit(submission)
            .await
            .map_err(jobs::status)?;
        Ok(Response::new(admin::SubmitResponse {
            job_id: receipt.id,
            duplicate: receipt.duplicate,
        }))
    }

    async fn submit_and_wait(
        &self,
        request: Request<admin::SubmitRequest>,
    ) -> Answer<admin::JobOutcome> {
        let submission = self.submission(request, "SubmitAndWait")?;
        let (receipt, finished) = self
            .parts
            .dispatcher
            .submit_and_wait(submission)
            .await
            .map_err(jobs::status)?;
        Ok(Response::new(jobs::outcome(receipt, finished)))
    }

    async fn get_job(&self, request: Request<admin::GetJobRequest>) -> Answer<admin::JobState> {
        let caller = caller_of(&request)?;
        let id = jobs::job_id(request.into_inner().job_id)?;
        let state = self.parts.dispatcher.job(&id).await.map_err(jobs::status)?;
        self.own(&caller, "GetJob", id, state)
    }

    async fn wait_job(&self, request: Request<admin::WaitJobRequest>) -> Answer<admin::JobState> {
        let caller = caller_of(&request)?;
        let request = request.into_inner();
        let id = jobs::job_id(request.job_id)?;
        let patience = jobs::patience(request.timeout)?;
        // Whose job it is, before waiting on it.
        let now = self.parts.dispatcher.job(&id).await.map_err(jobs::status)?;
        self.own(&caller, "WaitJob", id.clone(), now)?;
        let dispatcher = &self.parts.dispatcher;
        let state = dispatcher
            .wait_job(&id, patience)
            .await
            .map_err(jobs::status)?;
        self.own(&caller, "WaitJob", id, state)
    }

    async fn get_membership(
        &self,
        request: Request<pb::GetMembershipRequest>,
    ) -> Answer<pb::Membership> {
        let caller = caller_of(&request)?;
        let members =
            self.parts.supervisor.members(&caller).ok_or_else(|| {
                Status::not_found(format!("no plugin named {:?}", &*caller.plugin))
            })?;
        Ok(Response::new(pb::Membership {
            index: caller.index,
            replicas: members.replicas,
            generation: members.generation,
        }))
    }

    async fn acquire(&self, request: Request<pb::AcquireRequest>) -> Answer<pb::AcquireResponse> {
        let caller = caller_of(&request)?;
        let deadline = grpc_timeout(&request).map(|t| tokio::time::Instant::now() + t);
        let pb::AcquireRequest { limit, bucket } = request.into_inner();
        super::bounded_name("limit", "a limit's name", &limit)?;
        let granted = self
            .parts
            .limits
            .acquire(&caller.plugin, &limit, bucket, deadline)
            .await;
        let event = |what| Event::PluginApi {
            plugin: caller.plugin.clone(),
            instance: caller.index,
            what,
        };
        match granted {
            Ok(grant) => {
                self.parts.bus.emit(event(PluginApiEvent::Granted {
                    limit,
                    waited: grant.waited,
                }));
                Ok(Response::new(pb::AcquireResponse {
                    granted_at: Some(prost_types::Timestamp::from(grant.at)),
                    waited: prost_types::Duration::try_from(grant.waited).ok(),
                }))
            }
            Err(error) => Err(match &error {
                LimitError::Unknown { .. } => Status::not_found(error.to_string()),
                LimitError::Bucket { .. } => Status::invalid_argument(error.to_string()),
                LimitError::Deadline { .. } => {
                    self.parts
                        .bus
                        .emit(event(PluginApiEvent::Refused { limit }));
                    Status::deadline_exceeded(error.to_string())
                }
            }),
        }
    }

    type WatchDependenciesStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::Dependencies, Status>> + Send>,
    >;

    async fn watch_dependencies(
        &self,
        request: Request<pb::WatchDependenciesRequest>,
    ) -> Answer<Self::WatchDependenciesStream> {
        let caller = caller_of(&request)?;
        let plugin = caller.plugin.clone();
        let supervisor = self.parts.supervisor.clone();
        let snapshot = move || {
            let now = supervisor.dependencies(&caller.plugin).unwrap_or_default();
            pb::Dependencies {
                dependencies: now
                    .into_iter()
                    .map(|(plugin, ready)| pb::Dependency { plugin, ready })
                    .collect(),
            }
        };
        // Subscribed before the first snapshot: no change falls between.
        let mut events = self.parts.bus.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let shutdown = self.parts.shutdown.clone();
        tokio::spawn(async move {
            let mut last = snapshot();
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            loop {
                let event = tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    event = events.recv() => event,
                };
                let relevant = match &event {
                    Ok(stamped) => match &stamped.event {
                        Event::Dependency { plugin: p, .. } => **p == *plugin,
                        Event::Reloaded { .. } => true,
                        _ => false,
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => true,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let now = snapshot();
                if relevant && now != last {
                    if tx.send(Ok(now.clone())).await.is_err() {
                        return;
                    }
                    last = now;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn report_health(
        &self,
        request: Request<pb::ReportHealthRequest>,
    ) -> Answer<pb::ReportHealthResponse> {
        let caller = caller_of(&request)?;
        let pb::ReportHealthRequest { serving, reason } = request.into_inner();
        // A note is for a terminal line, not a place to park data.
        let reason: String = reason.chars().take(MAX_NOTE).collect();
        if !serving {
            tracing::info!(
                plugin = &*caller.plugin,
                instance = caller.index,
                reason,
                "instance reports it is not serving"
            );
        }
        self.parts.supervisor.note_health(&caller, serving, reason);
        Ok(Response::new(pb::ReportHealthResponse {}))
    }
}

/// Longest health note kept, in characters.
const MAX_NOTE: usize = 256;

/// The call's deadline as its `grpc-timeout` header gives it: digits and
/// one unit letter (H, M, S, m, u, n), as the gRPC HTTP/2 spec says.
fn grpc_timeout<T>(request: &Request<T>) -> Option<Duration> {
    let text = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The operator's service as plugins see it: every method refused, and
/// the attempt counted and logged with the plugin's name.
#[derive(Clone)]
pub struct OperatorOnly {
    pub bus: Bus,
}

impl NamedService for OperatorOnly {
    const NAME: &'static str = "demi.conductor.v1.Conductor";
}

impl tower::Service<http::Request<Body>> for OperatorOnly {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let method = request
            .uri()
            .path()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let reason = format!(
            "{method} is the operator's: plugins reach only demi.plugin.v1.Host on this socket"
        );
        if let Some(caller) = request.extensions().get::<Caller>() {
            self.bus.emit(Event::PluginApi {
                plugin: caller.plugin.clone(),
                instance: caller.index,
                what: PluginApiEvent::Denied {
                    method,
                    reason: reason.clone(),
                },
            });
        }
        std::future::ready(Ok(Status::permission_denied(reason).into_http()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        let with = |value: &str| {
            let mut request = Request::new(());
            request
                .metadata_mut()
                .insert("grpc-timeout", value.parse().unwrap());
            grpc_timeout(&request)
        };
        assert_eq!(with("5S"), Some(Duration::from_secs(5)));
        assert_eq!(with("250m"), Some(Duration::from_millis(250)));
        assert_eq!(with("2M"), Some(Duration::from_secs(120)));
        assert_eq!(with("7u"), Some(Duration::from_micros(7)));
        assert_eq!(with("x"), None);
        assert_eq!(with("5"), None);
        assert_eq!(grpc_timeout(&Request::new(())), None);
    }
}
