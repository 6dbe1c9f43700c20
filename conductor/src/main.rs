//! `conductor`: the daemon and its command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use demi_conductor::config;
use demi_conductor::telemetry::{self, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "conductor",
    version,
    about = "Process-per-plugin supervisor that speaks gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the conductor in the foreground until SIGTERM or SIGINT.
    Run {
        /// The TOML configuration.
        #[arg(long, short, default_value = "/etc/demi-conductor/conductor.toml")]
        config: PathBuf,
        /// Overrides `[conductor] log_format`.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Check a configuration and print every problem with file, line,
    /// column and field.
    CheckConfig {
        /// The TOML configuration.
        path: PathBuf,
    },
}

/// Exit code for a configuration error (sysexits.h `EX_CONFIG`).
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::CheckConfig { path } => match config::load(&path) {
            Ok(config) => {
                let instances: u32 = config.plugins.values().map(|p| p.replicas).sum();
                println!(
                    "{}: ok ({} plugins, {instances} instances)",
                    path.display(),
                    config.plugins.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run { config, log_format } => {
            let config = match config::load(&config) {
                Ok(config) => config,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            telemetry::init(log_format.unwrap_or(config.conductor.log_format));
            match run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    eprintln!("conductor: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run(config: config::Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("demi-conductor")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(demi_conductor::daemon::run(config))?;
    Ok(())
}
