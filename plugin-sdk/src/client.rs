//! The conductor's plugin API, as a client: submitting work to other
//! plugins, looking jobs up, the pool's membership and shared limits.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use demi_proto::conductor::v1 as pb;
use demi_proto::plugin::v1 as host;
use demi_proto::trace::{TRACEPARENT, TraceParent};
use host::host_client::HostClient;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::handshake::{CONDUCTOR_SOCKET_KEY, CONDUCTOR_TOKEN_KEY};
use crate::membership::Membership;

/// Why a call to the conductor failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "{CONDUCTOR_SOCKET_KEY} or {CONDUCTOR_TOKEN_KEY} is not set: this process was not \
         started by a conductor"
    )]
    NoSocket,
    #[error("cannot reach the conductor at {socket}: {source}")]
    Connect {
        socket: String,
        source: tonic::transport::Error,
    },
    /// The conductor refused or failed the call; `RESOURCE_EXHAUSTED` means
    /// the target's queue (or the conductor's disk) is full: back off and
    /// try again;
    /// `PERMISSION_DENIED`, that the plugin's config does not allow it.
    #[error("{}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
}

/// A job to hand to another plugin's replicas.
///
/// ```
/// use demi_plugin_sdk::Submit;
///
/// let submit = Submit::new("workers", "resize", b"cat.png".to_vec())
///     .attribute("width", "640")
///     .idempotency_key("resize-cat-640");
/// assert_eq!(submit.plugin(), "workers");
/// ```
#[derive(Debug, Clone, Default)]
pub struct Submit {
    request: pb::SubmitRequest,
    trace: Option<TraceParent>,
}

impl Submit {
    pub fn new(plugin: impl Into<String>, kind: impl Into<String>, payload: Vec<u8>) -> Self {
        Self {
            request: pb::SubmitRequest {
                plugin: plugin.into(),
                kind: kind.into(),
                payload,
                ..Default::default()
            },
            trace: None,
        }
    }

    pub fn plugin(&self) -> &str {
        &self.request.plugin
    }

    pub fn attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.request.attributes.insert(key.into(), value.into());
        self
    }

    pub fn attributes(mut self, attributes: HashMap<String, String>) -> Self {
        self.request.attributes.extend(attributes);
        self
    }

    /// Submissions with the same key (per target plugin) are one job.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.request.idempotency_key = key.into();
        self
    }

    /// Past `deadline` the job is dead-lettered instead of delivered.
    pub fn deadline(mut self, deadline: SystemTime) -> Self {
        self.request.deadline = Some(prost_types::Timestamp::from(deadline));
        self
    }

    /// Continues `trace` (normally the `job.trace` being handled), so the
    /// new job's spans join the same trace.
    pub fn trace(mut self, trace: Option<TraceParent>) -> Self {
        self.trace = trace;
        self
    }

    fn into_request(self) -> tonic::Request<pb::SubmitRequest> {
        let mut request = tonic::Request::new(self.request);
        if let Some(value) = self.trace.and_then(|t| t.to_string().parse().ok()) {
            request.metadata_mut().insert(TRACEPARENT, value);
        }
        request
    }
}

/// Where a job is, as [`Conductor::job`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobStatus {
    /// No such job (or not one this conductor ever accepted).
    Unknown,
    /// Accepted, waiting for a replica (`attempts` made so far).
    Queued {
        attempts: u32,
    },
    /// On a replica now, in its `attempt`th delivery.
    InFlight {
        attempt: u32,
    },
    Completed {
        answer: Vec<u8>,
        attempts: u32,
    },
    DeadLettered {
        errors: Vec<String>,
    },
    /// It finished longer ago than the conductor keeps answers.
    Expired,
}

impl JobStatus {
    fn from_wire(state: pb::JobState) -> Self {
        use pb::job_state::State;
        match State::try_from(state.state) {
            Ok(State::Queued) => JobStatus::Queued {
                attempts: state.attempts,
            },
            Ok(State::InFlight) => JobStatus::InFlight {
                attempt: state.attempts,
            },
            Ok(State::Completed) => JobStatus::Completed {
                answer: state.answer,
                attempts: state.attempts,
            },
            Ok(State::DeadLettered) => JobStatus::DeadLettered {
                errors: state.errors,
            },
            Ok(State::Expired) => JobStatus::Expired,
            _ => JobStatus::Unknown,
        }
    }

    /// Whether the job will not change any more.
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            JobStatus::Completed { .. } | JobStatus::DeadLettered { .. } | JobStatus::Expired
        )
    }
}

/// How a job submitted with [`Conductor::submit_and_wait`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The target's answer.
    Completed(Vec<u8>),
    /// It failed for good; every attempt's error. Replayable by an operator.
    DeadLettered(Vec<String>),
    /// A job with the same idempotency key exists already: its id.
    Duplicate(String),
}

/// The plugin's dependencies as the conductor sees them; from
/// [`Conductor::dependencies`].
#[derive(Debug)]
pub struct DependencyWatch {
    stream: tonic::Streaming<host::Dependencies>,
}

impl DependencyWatch {
    /// Each dependency (a plugin named in `depends_on`) with whether it
    /// has its `min_serving` instances SERVING: the first call answers
    /// at once, later ones when something changed. `None` once the
    /// conductor ends the watch (it is stopping).
    pub async fn next(
        &mut self,
    ) -> Option<Result<std::collections::BTreeMap<String, bool>, ClientError>> {
        match self.stream.message().await {
            Ok(Some(now)) => Some(Ok(now
                .dependencies
                .into_iter()
                .map(|d| (d.plugin, d.ready))
                .collect())),
            Ok(None) => None,
            Err(status) => Some(Err(status.into())),
        }
    }
}

/// A turn under a shared limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// When the conductor granted it.
    pub at: SystemTime,
    /// How long the call waited for it.
    pub waited: Duration,
}

/// The plugin API of the conductor that launched this plugin
/// (`demi.plugin.v1.Host`). Cheap to clone; every call carries this
/// instance's token.
#[derive(Debug, Clone)]
pub struct Conductor {
    client: HostClient<Channel>,
    token: MetadataValue<tonic::metadata::Ascii>,
}

impl Conductor {
    /// Connects through `DEMI_CONDUCTOR_SOCKET` with `DEMI_CONDUCTOR_TOKEN`.
    /// The connection is made on first use and remade after a failure.
    pub fn from_env() -> Result<Self, ClientError> {
        let socket = std::env::var(CONDUCTOR_SOCKET_KEY).map_err(|_| ClientError::NoSocket)?;
        let token = std::env::var(CONDUCTOR_TOKEN_KEY).map_err(|_| ClientError::NoSocket)?;
        Self::at(Path::new(&socket), &token)
    }

    /// Connects to the plugin API at `socket` as the instance holding
    /// `token`.
    pub fn at(socket: &Path, token: &str) -> Result<Self, ClientError> {
        let endpoint =
            Endpoint::from_shared(format!("unix://{}", socket.display())).map_err(|source| {
                ClientError::Connect {
                    socket: socket.display().to_string(),
                    source,
                }
            })?;
        let token = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::NoSocket)?;
        Ok(Self {
            client: HostClient::new(endpoint.connect_lazy()),
            token,
        })
    }

    fn signed<T>(&self, mut request: tonic::Request<T>) -> tonic::Request<T> {
        request
            .metadata_mut()
            .insert("authorization", self.token.clone());
        request
    }

    /// Hands `job` over; returns its id once the conductor has stored it.
    pub async fn submit(&mut self, job: Submit) -> Result<String, ClientError> {
        let request = self.signed(job.into_request());
        Ok(self.client.submit(request).await?.into_inner().job_id)
    }

    /// Hands `job` over and waits for its end.
    pub async fn submit_and_wait(&mut self, job: Submit) -> Result<Answer, ClientError> {
        use pb::job_outcome::Status;
        let request = self.signed(job.into_request());
        let outcome = self.client.submit_and_wait(request).await?.into_inner();
        Ok(match Status::try_from(outcome.status) {
            Ok(Status::Completed) => Answer::Completed(outcome.payload),
            Ok(Status::Duplicate) => Answer::Duplicate(outcome.job_id),
            _ => Answer::DeadLettered(outcome.errors),
        })
    }

    /// Where job `id` (one this plugin submitted) is now.
    pub async fn job(&mut self, id: &str) -> Result<JobStatus, ClientError> {
        let request = self.signed(tonic::Request::new(pb::GetJobRequest {
            job_id: id.to_owned(),
        }));
        let state = self.client.get_job(request).await?.into_inner();
        Ok(JobStatus::from_wire(state))
    }

    /// [`Conductor::job`] once the job has finished, or after `timeout`
    /// (at most 5 minutes) with the state it is in then.
    pub async fn wait_job(
        &mut self,
        id: &str,
        timeout: Duration,
    ) -> Result<JobStatus, ClientError> {
        let mut request = self.signed(tonic::Request::new(pb::WaitJobRequest {
            job_id: id.to_owned(),
            timeout: prost_types::Duration::try_from(timeout).ok(),
        }));
        request.set_timeout(timeout + Duration::from_secs(5));
        let state = self.client.wait_job(request).await?.into_inner();
        Ok(JobStatus::from_wire(state))
    }

    /// This instance's index and its pool's replica count now.
    pub async fn membership(&mut self) -> Result<Membership, ClientError> {
        let request = self.signed(tonic::Request::new(host::GetMembershipRequest {}));
        let m = self.client.get_membership(request).await?.into_inner();
        Ok(Membership::from_wire(&m))
    }

    /// The plugins this plugin `depends_on`, as they come and go.
    pub async fn dependencies(&mut self) -> Result<DependencyWatch, ClientError> {
        let request = self.signed(tonic::Request::new(host::WatchDependenciesRequest {}));
        let stream = self.client.watch_dependencies(request).await?.into_inner();
        Ok(DependencyWatch { stream })
    }

    /// Tells the conductor why this instance is (or is no longer) not
    /// serving; [`crate::Health`] does it for you.
    pub async fn report_health(&mut self, serving: bool, reason: &str) -> Result<(), ClientError> {
        let request = self.signed(tonic::Request::new(host::ReportHealthRequest {
            serving,
            reason: reason.to_owned(),
        }));
        self.client.report_health(request).await?;
        Ok(())
    }

    /// Waits for this replica's turn under the plugin's shared limit
    /// `limit` (in `bucket`; 0 for limits without buckets), at most
    /// `patience`: `DEADLINE_EXCEEDED` if the turn would come later.
    pub async fn acquire(
        &mut self,
        limit: &str,
        bucket: u32,
        patience: Duration,
    ) -> Result<Grant, ClientError> {
        let mut request = self.signed(tonic::Request::new(host::AcquireRequest {
            limit: limit.to_owned(),
            bucket,
        }));
        request.set_timeout(patience);
        let grant = self.client.acquire(request).await?.into_inner();
        Ok(Grant {
            at: grant
                .granted_at
                .and_then(|t| SystemTime::try_from(t).ok())
                .unwrap_or_else(SystemTime::now),
            waited: grant
                .waited
                .and_then(|d| Duration::try_from(d).ok())
                .unwrap_or_default(),
        })
    }

    /// Waits for a turn under `limit` however long it takes: asks again,
    /// `patience` at a time, while the turn is further off
    /// (`DEADLINE_EXCEEDED`) or the conductor is restarting
    /// (`UNAVAILABLE`). `Ok(None)` once `stop` is cancelled; any other
    /// refusal (a limit the plugin does not have, a bucket out of range)
    /// is returned, for no amount of waiting mends it.
    ///
    /// ```no_run
    /// # async fn bot(ctx: demi_plugin_sdk::Context) -> Result<(), demi_plugin_sdk::ClientError> {
    /// use std::time::Duration;
    ///
    /// let mut conductor = ctx.conductor()?;
    /// let stop = ctx.stopping();
    /// // Bucket 0 of the plugin's shared limit `identify`.
    /// if let Some(grant) = conductor
    ///     .acquire_until("identify", 0, Duration::from_secs(300), &stop)
    ///     .await?
    /// {
    ///     println!("my turn, after {:?}", grant.waited);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn acquire_until(
        &mut self,
        limit: &str,
        bucket: u32,
        patience: Duration,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<Option<Grant>, ClientError> {
        loop {
            let turn = tokio::select! {
                () = stop.cancelled() => return Ok(None),
                turn = self.acquire(limit, bucket, patience) => turn,
            };
            match turn {
                Ok(grant) => return Ok(Some(grant)),
                Err(ClientError::Rpc(status))
                    if matches!(
                        status.code(),
                        tonic::Code::DeadlineExceeded | tonic::Code::Unavailable
                    ) =>
                {
                    // Not a hot loop: the conductor refuses at once a turn
                    // further off than `patience`, and a restarting one
                    // refuses every call.
                    tokio::select! {
                        () = stop.cancelled() => return Ok(None),
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }
}
