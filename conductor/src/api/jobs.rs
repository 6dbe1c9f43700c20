//! Jobs on the wire: what the admin API and the plugin API both say about
//! submissions and look-ups, translated once.

use std::time::{Duration, SystemTime};

use demi_proto::conductor::v1 as pb;
use demi_proto::trace::{TRACEPARENT, TraceParent};
use tonic::{Request, Status};

use crate::dispatch::{
    DispatchError, Finished, JobState, MAX_JOB_WAIT, Receipt, StoreError, Submission,
};

/// How long `WaitJob` waits when the request names no timeout.
const DEFAULT_JOB_WAIT: Duration = Duration::from_secs(30);

/// A `SubmitRequest` as dispatch takes it, from `submitter` (`None`: an
/// operator).
pub fn submission(request: Request<pb::SubmitRequest>, submitter: Option<&str>) -> Submission {
    let trace = request
        .metadata()
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse);
    let r = request.into_inner();
    Submission {
        plugin: r.plugin,
        kind: r.kind,
        payload: r.payload,
        attributes: r.attributes,
        idempotency_key: Some(r.idempotency_key).filter(|k| !k.is_empty()),
        deadline: r.deadline.and_then(|d| SystemTime::try_from(d).ok()),
        trace,
        submitter: submitter.map(str::to_owned),
    }
}

/// Dispatch errors to gRPC codes, at the edge.
pub fn status(error: DispatchError) -> Status {
    match &error {
        DispatchError::NotFound(_) => Status::not_found(error.to_string()),
        DispatchError::NoJobs(_) => Status::failed_precondition(error.to_string()),
        DispatchError::QueueFull { .. } => Status::resource_exhausted(error.to_string()),
        DispatchError::NoReplicas { .. } => Status::unavailable(error.to_string()),
        DispatchError::InvalidArgument { .. } => Status::invalid_argument(error.to_string()),
        // A full disk is the textbook RESOURCE_EXHAUSTED: a client backs
        // off and tries again, as for a full queue.
        DispatchError::Store(StoreError::Full { .. }) => {
            Status::resource_exhausted(error.to_string())
        }
        DispatchError::Store(StoreError::Gone) => Status::unavailable(error.to_string()),
        DispatchError::Store(StoreError::Sqlite { .. }) => Status::internal(error.to_string()),
        DispatchError::Stopping => Status::unavailable(error.to_string()),
    }
}

/// What `SubmitAndWait` answers.
pub fn outcome(receipt: Receipt, finished: Option<Finished>) -> pb::JobOutcome {
    use pb::job_outcome::Status as S;
    let mut outcome = pb::JobOutcome {
        job_id: receipt.id,
        ..Default::default()
    };
    match finished {
        None => outcome.status = S::Duplicate as i32,
        Some(Finished::Completed { payload, attempts }) => {
            outcome.status = S::Completed as i32;
            outcome.payload = payload;
            outcome.attempts = attempts;
        }
        Some(Finished::DeadLettered { errors, attempts }) => {
            outcome.status = S::DeadLettered as i32;
            outcome.errors = errors;
            outcome.attempts = attempts;
        }
    }
    outcome
}

/// The job id a look-up names, or INVALID_ARGUMENT.
pub fn job_id(id: String) -> Result<String, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("job_id: must name a job"));
    }
    Ok(id)
}

/// How long a `WaitJob` may wait.
pub fn patience(timeout: Option<prost_types::Duration>) -> Result<Duration, Status> {
    match timeout {
        None => Ok(DEFAULT_JOB_WAIT),
        Some(d) => Duration::try_from(d)
            .map(|d| d.min(MAX_JOB_WAIT))
            .map_err(|_| Status::invalid_argument("timeout: must not be negative")),
    }
}

pub fn timestamp(ms: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

/// A look-up's answer on the wire.
pub fn state(id: String, state: JobState) -> pb::JobState {
    use pb::job_state::State as S;
    let mut out = pb::JobState {
        job_id: id,
        ..Default::default()
    };
    let pending = |out: &mut pb::JobState, job: &crate::dispatch::StoredJob| {
        out.plugin = job.plugin.clone();
        out.kind = job.kind.clone();
        out.accepted_at = timestamp(job.accepted_ms);
    };
    match state {
        JobState::Unknown => out.state = S::Unknown as i32,
        JobState::Expired => out.state = S::Expired as i32,
        JobState::Queued(job) => {
            out.state = S::Queued as i32;
            out.attempts = job.attempts;
            pending(&mut out, &job);
        }
        JobState::InFlight { job, attempt } => {
            out.state = S::InFlight as i32;
            out.attempts = attempt;
            pending(&mut out, &job);
        }
        JobState::Completed(answer) => {
            out.state = S::Completed as i32;
            out.plugin = answer.plugin;
            out.kind = answer.kind;
            out.attempts = answer.attempts;
            out.answer = answer.payload;
            out.accepted_at = timestamp(answer.accepted_ms);
            out.finished_at = timestamp(answer.finished_ms);
        }
        JobState::DeadLettered(letter) => {
            out.state = S::DeadLettered as i32;
            out.attempts = letter.job.attempts;
            out.errors = letter.errors;
            pending(&mut out, &letter.job);
            out.finished_at = timestamp(letter.dead_ms);
        }
    }
    out
}
