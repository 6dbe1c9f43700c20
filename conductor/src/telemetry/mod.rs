//! Logs and Prometheus metrics of the conductor: a leaf that consumes
//! domain events (the [`Recorder`] sink) and snapshots the daemon hands it
//! ([`metrics::Snapshot`]); it knows no component.

pub mod config;
pub mod metrics;
mod recorder;

pub use config::{LogFormat, MetricsConfig};
pub use recorder::Recorder;

use std::sync::OnceLock;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// Log lines held for stdout while it is not read: a few MB of JSON, a
/// few seconds of every plugin's output budget at once.
const BUFFERED_LINES: usize = 16_384;
/// How often lines lost to an unread stdout are reported.
const REPORT_DROPS_EVERY: Duration = Duration::from_secs(5);
/// How long an exit waits for the buffered lines to reach stdout.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(2);

/// The installed writer's count of lines it had no room for.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Log lines lost since start because stdout was not read fast enough.
pub fn dropped_log_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Keeps the log writer running. Dropping it reports lines lost since the
/// last report and writes out what is buffered, waiting for a stalled
/// stdout no longer than [`FLUSH_AT_EXIT`].
#[must_use = "logs are written only while the guard lives"]
pub struct LogGuard {
    writer: Option<WorkerGuard>,
    /// Closing the sender stops the reporter.
    reporter: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

/// Installs the global subscriber. `RUST_LOG` overrides the `info` default.
///
/// Lines reach stdout through a bounded buffer and a thread of their own,
/// so that a stdout nobody reads (a pager left open, a stalled collector)
/// costs lines, counted in `demi_log_lines_dropped_total` and reported
/// every [`REPORT_DROPS_EVERY`] while it lasts, and never blocks a task
/// that logs: written in place, it held up restarts, health checks and
/// the API until the reader came back.
pub fn init(format: LogFormat) -> LogGuard {
    let (writer, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(BUFFERED_LINES)
        .lossy(true)
        .thread_name("demi-log-writer")
        .finish(std::io::stdout());
    let counter = writer.error_counter();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let installed = match format {
        LogFormat::Human => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    // A second init (tests) keeps the first subscriber and its count.
    if installed.is_err() || DROPPED.set(counter.clone()).is_err() {
        return LogGuard {
            writer: Some(guard),
            reporter: None,
        };
    }
    let (stop, stopped) = mpsc::channel();
    let reporter = std::thread::Builder::new()
        .name("demi-log-drops".into())
        .spawn(move || report_drops(&counter, &stopped))
        .ok()
        .map(|thread| (stop, thread));
    LogGuard {
        writer: Some(guard),
        reporter,
    }
}

/// Logs how many lines were lost since the last report, until `stop`
/// closes. While stdout stays unread the report is lost too, and counts:
/// the first one read again has the whole count.
fn report_drops(counter: &ErrorCounter, stop: &mpsc::Receiver<()>) {
    let mut reported = 0;
    loop {
        let stopping = !matches!(
            stop.recv_timeout(REPORT_DROPS_EVERY),
            Err(RecvTimeoutError::Timeout)
        );
        let dropped = counter.dropped_lines();
        if dropped > reported {
            tracing::warn!(
                dropped = dropped - reported,
                total = dropped,
                "log lines dropped: stdout was not read fast enough"
            );
            reported = dropped;
        }
        if stopping {
            return;
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.reporter.take() {
            drop(stop);
            let _ = thread.join();
        }
        // The writer's own guard waits for the buffer to drain, but prints
        // to stdout when the buffer has no room for its stop message: it
        // would wait on the very stdout that stalled. It waits aside, and
        // a writer still stuck at the deadline ends with the process.
        if let Some(writer) = self.writer.take() {
            let (done, flushed) = mpsc::channel();
            let flusher = std::thread::Builder::new()
                .name("demi-log-flush".into())
                .spawn(move || {
                    drop(writer);
                    let _ = done.send(());
                });
            if flusher.is_ok() {
                let _ = flushed.recv_timeout(FLUSH_AT_EXIT);
            }
        }
    }
}
