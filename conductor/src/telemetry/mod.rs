//! Logs and Prometheus metrics of the conductor: a leaf that consumes
//! domain events (the [`Recorder`] sink) and snapshots the daemon hands it
//! ([`metrics::Snapshot`]); it knows no component.

pub mod config;
pub mod metrics;
mod recorder;

pub use config::{LogFormat, MetricsConfig};
pub use recorder::Recorder;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG` overrides the `info` default.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    // A second init (tests) keeps the first subscriber; that is fine.
    let _ = match format {
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
}
