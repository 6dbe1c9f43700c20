//! The retry policy: which failures deserve another delivery, and when.
//! It only decides; the lane carries the decision out.

use std::time::Duration;

use demi_proto::plugin::v1 as pb;
use tonic::Code;

use super::config::DispatchConfig;
use crate::backoff::exponential;

/// What one delivery came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Done(Vec<u8>),
    /// Worth another try, on another replica if there is one.
    Retry(String),
    /// Retrying cannot help.
    Permanent(String),
}

/// Classifies one `Handle` call: `None` means the attempt timed out.
pub fn classify(
    answer: Option<Result<pb::JobResult, tonic::Status>>,
    timeout: Duration,
) -> Verdict {
    use pb::job_result::Outcome;
    match answer {
        None => Verdict::Retry(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
        Some(Ok(result)) => match Outcome::try_from(result.outcome) {
            Ok(Outcome::Ok) => Verdict::Done(result.payload),
            Ok(Outcome::Retryable) => Verdict::Retry(result.error),
            Ok(Outcome::Permanent) => Verdict::Permanent(result.error),
            _ => Verdict::Permanent(format!(
                "the plugin answered no outcome ({})",
                result.outcome
            )),
        },
        Some(Err(status)) => {
            let text = format!("{}: {}", status.code(), status.message());
            match status.code() {
                // The replica is gone, going, busy or broke mid-call (a
                // replica killed mid-job shows up as one of these).
                Code::Unavailable
                | Code::Cancelled
                | Code::Unknown
                | Code::DeadlineExceeded
                | Code::ResourceExhausted
                | Code::Aborted
                | Code::Internal => Verdict::Retry(text),
                _ => Verdict::Permanent(text),
            }
        }
    }
}

/// The pause before retry number `retry` (from 1).
pub fn delay(config: &DispatchConfig, retry: u32, unit: f64) -> Duration {
    exponential(
        config.retry_initial,
        config.retry_multiplier,
        config.retry_max,
        config.retry_jitter,
        retry.saturating_sub(1),
        unit,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(
        outcome: pb::job_result::Outcome,
        text: &str,
    ) -> Option<Result<pb::JobResult, tonic::Status>> {
        Some(Ok(pb::JobResult {
            job_id: "j".into(),
            outcome: outcome as i32,
            payload: text.as_bytes().to_vec(),
            error: text.into(),
        }))
    }

    #[test]
    fn outcomes_and_codes_are_classified() {
        use pb::job_result::Outcome;
        let t = Duration::from_secs(1);
        assert_eq!(
            classify(result(Outcome::Ok, "hi"), t),
            Verdict::Done(b"hi".to_vec())
        );
        assert_eq!(
            classify(result(Outcome::Retryable, "db down"), t),
            Verdict::Retry("db down".into())
        );
        assert_eq!(
            classify(result(Outcome::Permanent, "bad"), t),
            Verdict::Permanent("bad".into())
        );
        assert!(matches!(
            classify(result(Outcome::Unspecified, ""), t),
            Verdict::Permanent(_)
        ));
        assert_eq!(
            classify(None, t),
            Verdict::Retry("no answer within 1s".into())
        );
        for code in [
            Code::Unavailable,
            Code::Cancelled,
            Code::Unknown,
            Code::Internal,
            Code::ResourceExhausted,
        ] {
            assert!(
                matches!(
                    classify(Some(Err(tonic::Status::new(code, "x"))), t),
                    Verdict::Retry(_)
                ),
                "{code:?}"
            );
        }
        for code in [
            Code::InvalidArgument,
            Code::Unimplemented,
            Code::NotFound,
            Code::PermissionDenied,
        ] {
            assert!(
                matches!(
                    classify(Some(Err(tonic::Status::new(code, "x"))), t),
                    Verdict::Permanent(_)
                ),
                "{code:?}"
            );
        }
    }

    #[test]
    fn retry_delays_grow_from_the_initial_delay() {
        let config = DispatchConfig {
            retry_jitter: 0.0,
            ..DispatchConfig::default()
        };
        let got: Vec<_> = (1..=8)
            .map(|r| delay(&config, r, 0.5).as_millis())
            .collect();
        assert_eq!(got, [50, 100, 200, 400, 800, 1600, 3200, 5000]);
    }
}
