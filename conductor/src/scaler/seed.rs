//! Past load to start the history with: a trace exported from elsewhere
//! (Prometheus, an older conductor), one row per bucket.

use std::path::Path;
use std::time::Duration;

use super::config::MAX_HISTORY_BUCKETS;
use super::trace::{self, TraceError};

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(transparent)]
    Trace(#[from] TraceError),
    #[error(
        "{}: its step is {} but the autoscale bucket is {}; export the history at the bucket's step",
        path.display(),
        humantime::format_duration(*step),
        humantime::format_duration(*bucket)
    )]
    Step {
        path: std::path::PathBuf,
        step: Duration,
        bucket: Duration,
    },
}

/// The seed's values, oldest first, at most [`MAX_HISTORY_BUCKETS`] (the
/// newest); gaps stay `NaN` and are interpolated by the forecaster.
pub fn load(path: &Path, bucket: Duration) -> Result<Vec<f64>, SeedError> {
    let trace = trace::load(path, None)?;
    // Steps in whole milliseconds: CSV times rarely carry more.
    if trace.step.as_millis() != bucket.as_millis() {
        return Err(SeedError::Step {
            path: path.to_owned(),
            step: trace.step,
            bucket,
        });
    }
    let skip = trace.values.len().saturating_sub(MAX_HISTORY_BUCKETS);
    Ok(trace.values[skip..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_must_have_the_buckets_step() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("seed.csv");
        std::fs::write(&path, "t,v\n0,1\n10,2\n20,\n30,4\n").expect("write");
        let values = load(&path, Duration::from_secs(10)).expect("seed");
        assert_eq!(values.len(), 4);
        assert!(values[2].is_nan());
        let error = load(&path, Duration::from_secs(1)).expect_err("wrong step");
        assert!(
            error
                .to_string()
                .contains("step is 10s but the autoscale bucket is 1s")
        );
    }
}
