//! `conductor`: the daemon and its command line.

mod cli;

// Every job allocates a little on several threads; glibc's malloc spent
// ~12 % of the conductor's CPU in a dispatch profile (much of it
// consolidating fragments), mimalloc a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use demi_conductor::telemetry::{self, LogFormat};
use demi_conductor::{config, daemon};
use demi_proto::conductor::v1 as pb;

#[derive(Debug, Parser)]
#[command(
    name = "conductor",
    version,
    about = "Process-per-plugin supervisor that speaks gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    target: cli::Target,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the conductor in the foreground until SIGTERM or SIGINT
    /// (SIGHUP reloads the config).
    Run {
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
    /// Show plugins and their instances.
    Status {
        /// Only this plugin.
        plugin: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Start a plugin's stopped or failed instances.
    Start { plugin: String },
    /// Stop a plugin's instances and wait until they are gone.
    Stop { plugin: String },
    /// Rolling restart: one instance at a time, each back to SERVING
    /// before the next.
    Restart { plugin: String },
    /// Set how many instances a plugin runs.
    Scale { plugin: String, replicas: u32 },
    /// Follow lifecycle events (all plugins, or one).
    Events { plugin: Option<String> },
    /// Re-read the config file and apply the difference.
    Reload,
    /// List the plugins found in `plugin_dirs`, and broken manifests.
    Plugins,
    /// Check a plugin against the contract (proto/README.md) by launching it
    /// as the conductor would: `conductor plugin-check -- ./my-plugin --flag`.
    PluginCheck {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// DEMI_PLUGIN_NAME to give the plugin.
        #[arg(long, default_value = "plugin-check")]
        name: String,
        /// How long the plugin may take to report SERVING.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        startup_timeout: std::time::Duration,
        /// A job to send, as KIND=PAYLOAD (repeatable); without one a
        /// plain echo job is sent and its outcome left unchecked.
        #[arg(long, value_parser = probe)]
        probe: Vec<demi_conductor::conformance::Probe>,
        /// Every probe must answer OUTCOME_OK.
        #[arg(long, requires = "probe")]
        expect_ok: bool,
        /// The folder the plugin starts in (the config's `working_dir`);
        /// the current one by default.
        #[arg(long)]
        working_dir: Option<std::path::PathBuf>,
        /// Run the plugin as this user (a name or id), as the config's
        /// `user` would.
        #[arg(long)]
        user: Option<String>,
        /// ... and this group (the user's own by default).
        #[arg(long, requires = "user")]
        group: Option<String>,
        /// The plugin's command and arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Submit a job to a plugin's replicas.
    Submit {
        plugin: String,
        /// The job's kind.
        #[arg(long, default_value = "")]
        kind: String,
        #[command(flatten)]
        payload: cli::Payload,
        /// Wait for the answer and print it (as text, or as base64 when it
        /// is binary).
        #[arg(long)]
        wait: bool,
    },
    /// Where a job is: queued, in flight, completed (with its answer),
    /// dead-lettered, expired or unknown.
    Job {
        id: String,
        /// Wait until the job has finished (at most --timeout).
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[arg(long)]
        json: bool,
    },
    /// Replay a load trace (CSV) against the predictive scaler, the
    /// Kubernetes HPA and a static pool; print a table and write a plot.
    ScaleSim(Box<cli::scale_sim::Args>),
    /// The dead-letter queue: jobs that failed for good.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// One line per dead letter.
    List,
    /// A dead letter with every attempt's error.
    Show { id: String },
    /// Deliver dead letters again.
    Replay {
        /// The jobs to replay.
        ids: Vec<String>,
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete every dead letter.
    Purge,
}

/// Exit code for a configuration error (sysexits.h `EX_CONFIG`).
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    match args.nth(1) {
        // plugin-check's stand-in for a conductor that dies.
        Some(a) if a == demi_conductor::conformance::parent::ARG => {
            return demi_conductor::conformance::parent::launch_and_wait(args);
        }
        _ => {}
    }
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { path } => check_config(&path),
        Command::Run { log_format } => daemon(&cli.target.config, log_format),
        Command::Plugins => discovered(&cli.target.config),
        Command::ScaleSim(args) => match cli::scale_sim::run(*args, &cli.target.config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("conductor scale-sim: {}", said_once(&error));
                ExitCode::FAILURE
            }
        },
        Command::PluginCheck {
            json,
            name,
            startup_timeout,
            probe,
            expect_ok,
            working_dir,
            user,
            group,
            command,
        } => {
            let mut privileges = demi_conductor::process::privileges::Privileges::default();
            if let Some(user) = &user {
                match demi_conductor::process::privileges::resolve(user, group.as_deref()) {
                    Ok(ids) => privileges.user = Some(ids),
                    Err((field, why)) => {
                        eprintln!("conductor plugin-check: --{field}: {why}");
                        return ExitCode::from(2);
                    }
                }
            }
            let options = demi_conductor::conformance::Options {
                name,
                startup_timeout,
                probes: probe,
                expect_ok,
                working_dir,
                privileges,
                ..Default::default()
            };
            plugin_check(command, options, json)
        }
        command => match client(command, &cli.target) {
            Ok(code) => code,
            Err(error) => {
                eprintln!("conductor: {}", said_once(&error));
                ExitCode::FAILURE
            }
        },
    }
}

/// Loads and plans the configuration at `path` as `run` would, or says
/// every problem found.
fn prepare(path: &std::path::Path) -> Result<daemon::Prepared, config::ConfigErrors> {
    daemon::prepare(config::load(path)?)
}

fn check_config(path: &std::path::Path) -> ExitCode {
    match prepare(path) {
        Ok(prepared) => {
            let instances: u32 = prepared.plan.pools.values().map(|p| p.replicas).sum();
            println!(
                "{}: ok ({} plugins, {instances} instances)",
                path.display(),
                prepared.config.plugins.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `KIND=PAYLOAD` for `plugin-check --probe`.
fn probe(text: &str) -> Result<demi_conductor::conformance::Probe, String> {
    let (kind, payload) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not KIND=PAYLOAD"))?;
    Ok(demi_conductor::conformance::Probe {
        kind: kind.to_owned(),
        payload: payload.as_bytes().to_vec(),
    })
}

fn plugin_check(
    command: Vec<String>,
    options: demi_conductor::conformance::Options,
    json: bool,
) -> ExitCode {
    use demi_conductor::conformance;
    let Some((program, args)) = command.split_first() else {
        eprintln!("conductor plugin-check: name the plugin's command");
        return ExitCode::from(2);
    };
    // A bare name is looked up in PATH, as the conductor's config would.
    let program = if program.contains('/') {
        std::path::absolute(program).unwrap_or_else(|_| program.into())
    } else {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
            .unwrap_or_else(|| program.into())
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("conductor plugin-check: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let report = runtime.block_on(conformance::run(program, args.to_vec(), options));
    if json {
        println!("{}", conformance::json(&report));
    } else {
        print!("{}", conformance::table(&report));
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Discovery is a look at the filesystem through the config: no daemon needed.
fn discovered(path: &std::path::Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if config.conductor.plugin_dirs.is_empty() {
        println!("no plugin_dirs in {}", path.display());
    }
    for (name, manifest) in &config.manifests {
        let state = if config.disabled.contains(name) {
            "disabled"
        } else {
            "enabled"
        };
        println!("{name:<24} {state:<9} {}", manifest.display());
    }
    for warning in &config.warnings {
        println!("broken: {warning}");
    }
    ExitCode::SUCCESS
}

fn daemon(path: &std::path::Path, log_format: Option<LogFormat>) -> ExitCode {
    let prepared = match prepare(path) {
        Ok(prepared) => prepared,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let _logs = telemetry::init(log_format.unwrap_or(prepared.config.conductor.log_format));
    let run = || -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("demi-conductor")
            .build()
            .context("cannot start the async runtime")?;
        runtime.block_on(daemon::run(prepared))?;
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{}", said_once(&error));
            eprintln!("conductor: {}", said_once(&error));
            ExitCode::FAILURE
        }
    }
}

fn client(command: Command, target: &cli::Target) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut api = target.connect().await?;
        let named = |name: &str| pb::PluginRef {
            name: name.to_owned(),
        };
        match command {
            Command::Status { plugin, json } => {
                let (plugins, machine) = match plugin {
                    Some(name) => (vec![cli::rpc(api.get_plugin(named(&name)).await)?], None),
                    None => {
                        let all = cli::rpc(api.list_plugins(pb::ListPluginsRequest {}).await)?;
                        (all.plugins, all.machine)
                    }
                };
                cli::print_plugins(&plugins, machine.as_ref(), json);
            }
            Command::Start { plugin } => cli::print_plugins(
                &[cli::rpc(api.start_plugin(named(&plugin)).await)?],
                None,
                false,
            ),
            Command::Stop { plugin } => cli::print_plugins(
                &[cli::rpc(api.stop_plugin(named(&plugin)).await)?],
                None,
                false,
            ),
            Command::Restart { plugin } => cli::print_plugins(
                &[cli::rpc(api.restart_plugin(named(&plugin)).await)?],
                None,
                false,
            ),
            Command::Scale { plugin, replicas } => {
                let request = pb::ScalePluginRequest {
                    name: plugin,
                    replicas,
                };
                cli::print_plugins(&[cli::rpc(api.scale_plugin(request).await)?], None, false)
            }
            Command::Events { plugin } => {
                let request = pb::WatchEventsRequest {
                    plugin: plugin.unwrap_or_default(),
                };
                let mut events = cli::rpc(api.watch_events(request).await)?;
                while let Some(event) = events.message().await? {
                    println!("{}", cli::event_line(&event));
                }
            }
            Command::Reload => match api.reload(pb::ReloadRequest {}).await {
                Ok(summary) => {
                    let s = summary.into_inner();
                    println!(
                        "reloaded: added {:?}, removed {:?}, changed {:?}, unchanged {:?}",
                        s.added, s.removed, s.changed, s.unchanged
                    );
                    for ignored in s.ignored {
                        println!("not applied until restart: {ignored}");
                    }
                    for warning in s.warnings {
                        eprintln!("skipped: {warning}");
                    }
                }
                Err(status) if status.code() == tonic::Code::InvalidArgument => {
                    eprintln!("{}", status.message());
                    return Ok(ExitCode::from(EXIT_CONFIG));
                }
                Err(status) => anyhow::bail!("{}: {}", status.code(), status.message()),
            },
            Command::Submit {
                plugin,
                kind,
                payload,
                wait,
            } => {
                let request = pb::SubmitRequest {
                    plugin,
                    kind,
                    payload: payload.bytes()?,
                    ..Default::default()
                };
                if wait {
                    let outcome = cli::rpc(api.submit_and_wait(request).await)?;
                    if outcome.status == pb::job_outcome::Status::Completed as i32 {
                        println!("{}", cli::shown(&outcome.payload));
                    } else {
                        eprintln!("job {} did not complete:", outcome.job_id);
                        for error in outcome.errors {
                            eprintln!("  {error}");
                        }
                        return Ok(ExitCode::FAILURE);
                    }
                } else {
                    println!("{}", cli::rpc(api.submit(request).await)?.job_id);
                }
            }
            Command::Job {
                id,
                wait,
                timeout,
                json,
            } => {
                let state = if wait {
                    let request = pb::WaitJobRequest {
                        job_id: id,
                        timeout: prost_types::Duration::try_from(timeout).ok(),
                    };
                    cli::rpc(api.wait_job(request).await)?
                } else {
                    cli::rpc(api.get_job(pb::GetJobRequest { job_id: id }).await)?
                };
                if !json && state.state == pb::job_state::State::Unknown as i32 {
                    anyhow::bail!(
                        "no job {}: this conductor never accepted it, or has forgotten it",
                        state.job_id
                    );
                }
                cli::print_job(&state, json);
            }
            Command::Dlq { command } => {
                let letters = || async {
                    let list = api
                        .clone()
                        .list_dead_letters(pb::ListDeadLettersRequest {})
                        .await;
                    cli::rpc(list).map(|l| l.dead_letters)
                };
                match command {
                    DlqCommand::List => {
                        for l in letters().await? {
                            let last = l.errors.last().cloned().unwrap_or_default();
                            println!(
                                "{}  {}  attempts={}  {last}",
                                l.job_id, l.plugin, l.attempts
                            );
                        }
                    }
                    DlqCommand::Show { id } => {
                        let letter = letters().await?.into_iter().find(|l| l.job_id == id);
                        let Some(l) = letter else {
                            anyhow::bail!("no dead letter with id {id}");
                        };
                        println!(
                            "job      {}\nplugin   {}\nkind     {}\nattempts {}",
                            l.job_id, l.plugin, l.kind, l.attempts
                        );
                        println!("payload  {}", cli::shown(&l.payload));
                        for error in &l.errors {
                            println!("error    {error}");
                        }
                    }
                    DlqCommand::Replay { ids, all } => {
                        if ids.is_empty() && !all {
                            anyhow::bail!("name the dead letters to replay, or pass --all");
                        }
                        let request = pb::ReplayDeadLettersRequest { job_ids: ids, all };
                        let replayed = cli::rpc(api.replay_dead_letters(request).await)?;
                        println!("replayed {} jobs", replayed.job_ids.len());
                    }
                    DlqCommand::Purge => {
                        let purged =
                            cli::rpc(api.purge_dead_letters(pb::PurgeDeadLettersRequest {}).await)?;
                        println!("purged {} dead letters", purged.purged);
                    }
                }
            }
            Command::Run { .. }
            | Command::CheckConfig { .. }
            | Command::Plugins
            | Command::ScaleSim(_)
            | Command::PluginCheck { .. } => {}
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// An error and its causes, as `{:#}` would print them but each said
/// once: most of our errors name their cause in their own message (logs
/// show only that) and also give it as their source.
fn said_once(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot serve metrics on 127.0.0.1:9464: {source}")]
    struct Busy {
        source: std::io::Error,
    }

    #[test]
    fn each_cause_is_said_once() {
        let busy = Busy {
            source: std::io::Error::from_raw_os_error(98),
        };
        let error = anyhow::Error::new(busy).context("cannot start");
        assert_eq!(
            super::said_once(&error),
            "cannot start: cannot serve metrics on 127.0.0.1:9464: \
             Address already in use (os error 98)"
        );
        // A cause the message does not spell out is still said.
        let plain = anyhow::Error::new(std::io::Error::from_raw_os_error(2)).context("reading x");
        assert_eq!(
            super::said_once(&plain),
            "reading x: No such file or directory (os error 2)"
        );
    }
}
