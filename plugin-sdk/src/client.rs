//! Submitting work to other plugins through the conductor.

use std::collections::HashMap;
use std::path::Path;
use std::time::SystemTime;

use demi_proto::conductor::v1 as pb;
use demi_proto::trace::{TRACEPARENT, TraceParent};
use pb::conductor_client::ConductorClient;
use tonic::transport::{Channel, Endpoint};

use crate::handshake::CONDUCTOR_SOCKET_KEY;

/// Why a submission failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{CONDUCTOR_SOCKET_KEY} is not set: this process was not started by a conductor")]
    NoSocket,
    #[error("cannot reach the conductor at {socket}: {source}")]
    Connect {
        socket: String,
        source: tonic::transport::Error,
    },
    /// The conductor refused or failed the call; `RESOURCE_EXHAUSTED` means
    /// the target's queue is full: back off and try again.
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

/// A connection to the conductor that launched this plugin. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Conductor {
    client: ConductorClient<Channel>,
}

impl Conductor {
    /// Connects through `DEMI_CONDUCTOR_SOCKET`. The connection is made on
    /// first use and remade after a failure.
    pub fn from_env() -> Result<Self, ClientError> {
        let socket = std::env::var(CONDUCTOR_SOCKET_KEY).map_err(|_| ClientError::NoSocket)?;
        Self::at(Path::new(&socket))
    }

    /// Connects to the conductor's API socket at `socket`.
    pub fn at(socket: &Path) -> Result<Self, ClientError> {
        let endpoint =
            Endpoint::from_shared(format!("unix://{}", socket.display())).map_err(|source| {
                ClientError::Connect {
                    socket: socket.display().to_string(),
                    source,
                }
            })?;
        Ok(Self {
            client: ConductorClient::new(endpoint.connect_lazy()),
        })
    }

    /// Hands `job` over; returns its id once the conductor has stored it.
    pub async fn submit(&mut self, job: Submit) -> Result<String, ClientError> {
        Ok(self
            .client
            .submit(job.into_request())
            .await?
            .into_inner()
            .job_id)
    }

    /// Hands `job` over and waits for its end.
    pub async fn submit_and_wait(&mut self, job: Submit) -> Result<Answer, ClientError> {
        use pb::job_outcome::Status;
        let outcome = self
            .client
            .submit_and_wait(job.into_request())
            .await?
            .into_inner();
        Ok(match Status::try_from(outcome.status) {
            Ok(Status::Completed) => Answer::Completed(outcome.payload),
            Ok(Status::Duplicate) => Answer::Duplicate(outcome.job_id),
            _ => Answer::DeadLettered(outcome.errors),
        })
    }
}
