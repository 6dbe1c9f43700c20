//! Jobs as a plugin sees them, free of protobuf plumbing.

use std::collections::HashMap;
use std::time::SystemTime;

use demi_proto::plugin::v1 as pb;
pub use demi_proto::trace::TraceParent;

/// One unit of work the conductor hands to a plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Job {
    /// Unique per job and stable across retries: de-duplicate on it.
    pub id: String,
    /// What to do; the plugin defines its kinds.
    pub kind: String,
    /// The job's input.
    pub payload: Vec<u8>,
    /// Free-form metadata from the submitter.
    pub attributes: HashMap<String, String>,
    /// 1 on first delivery, 2 on the first retry, and so on.
    pub attempt: u32,
    /// When the submitter stops caring about the answer.
    pub deadline: Option<SystemTime>,
    /// The W3C trace this job belongs to (from the `traceparent` the
    /// conductor sent), to parent the plugin's own spans on.
    pub trace: Option<TraceParent>,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done, with the answer: at most 4 MiB less a few bytes, what a
    /// conductor reads in one message; a larger one is sent as a
    /// [`Outcome::Permanent`] failure saying so.
    Ok(Vec<u8>),
    /// Failed for a passing reason; the conductor may retry it.
    Retryable(String),
    /// Failed for good; the conductor moves it to the dead-letter queue.
    Permanent(String),
}

impl From<pb::Job> for Job {
    fn from(job: pb::Job) -> Self {
        Self {
            id: job.id,
            kind: job.kind,
            payload: job.payload,
            attributes: job.attributes,
            attempt: job.attempt,
            deadline: job.deadline.and_then(|t| SystemTime::try_from(t).ok()),
            trace: None,
        }
    }
}

impl Outcome {
    pub(crate) fn into_result(self, job_id: String) -> pb::JobResult {
        use pb::job_result::Outcome as O;
        let (outcome, payload, error) = match self {
            Outcome::Ok(payload) => (O::Ok, payload, String::new()),
            Outcome::Retryable(error) => (O::Retryable, Vec::new(), error),
            Outcome::Permanent(error) => (O::Permanent, Vec::new(), error),
        };
        pb::JobResult {
            job_id,
            outcome: outcome as i32,
            payload,
            error,
        }
    }
}
