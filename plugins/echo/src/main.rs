//! `demi-plugin-echo`: a worker that echoes job payloads, and misbehaves on
//! demand so tests and benchmarks can exercise every supervisor path.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use demi_plugin_sdk::{EXIT_CONFIG, Handshake, Job, Outcome, Plugin, serve_with};

#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Time each job takes, e.g. "20ms".
    #[arg(long, env = "ECHO_DELAY", value_parser = humantime::parse_duration)]
    delay: Option<Duration>,
    /// Share of jobs that fail with a retryable error, 0.0 to 1.0.
    #[arg(long, env = "ECHO_FAIL_RETRYABLE", default_value_t = 0.0)]
    fail_retryable: f64,
    /// Share of jobs that fail permanently, 0.0 to 1.0.
    #[arg(long, env = "ECHO_FAIL_PERMANENT", default_value_t = 0.0)]
    fail_permanent: f64,
    /// Abort the process (SIGABRT) on the Nth job.
    #[arg(long, env = "ECHO_CRASH_AFTER")]
    crash_after: Option<u64>,
    /// Wait this long before serving, like a plugin with a slow start.
    #[arg(long, env = "ECHO_START_DELAY", value_parser = humantime::parse_duration)]
    start_delay: Option<Duration>,
    /// Exit at once with this code, before the handshake.
    #[arg(long, env = "ECHO_EXIT_CODE")]
    exit_code: Option<u8>,
    /// Stop answering anything (the process stops itself) after this long.
    #[arg(long, env = "ECHO_HANG_AFTER", value_parser = humantime::parse_duration)]
    hang_after: Option<Duration>,
    /// Allocate and touch this many MiB, one MiB at a time, after start.
    #[arg(long, env = "ECHO_ALLOC_MIB")]
    alloc_mib: Option<u64>,
    /// Spin this many threads on the CPU forever.
    #[arg(long, env = "ECHO_SPIN_THREADS")]
    spin_threads: Option<u32>,
    /// Start spinning only when SIGUSR1 arrives.
    #[arg(long, env = "ECHO_SPIN_ON_USR1")]
    spin_on_usr1: bool,
    /// Leave a double-forked daemon behind, outside the process group.
    #[arg(long, env = "ECHO_DAEMONIZE")]
    daemonize: bool,
    /// Fork this many children that sleep until killed.
    #[arg(long, env = "ECHO_FORK")]
    fork: Option<u32>,
    /// Append "JOB_ID ATTEMPT OUTCOME MICROS" (µs since the epoch) to this
    /// file for every job handled.
    #[arg(long, env = "ECHO_JOURNAL")]
    journal: Option<std::path::PathBuf>,
    /// Hand every job to this plugin through the conductor and answer with
    /// its answer (a "platform" in front of a worker pool).
    #[arg(long, env = "ECHO_FORWARD_TO")]
    forward_to: Option<String>,
    /// Kind of job that never answers (the call hangs until cancelled).
    #[arg(long, env = "ECHO_HANG_KIND")]
    hang_kind: Option<String>,
    /// Print a line on stdout as each job starts, for tests that must act
    /// while a job is in flight.
    #[arg(long, env = "ECHO_ANNOUNCE_JOBS")]
    announce_jobs: bool,
    /// Claim this protocol version in Describe, whatever was negotiated.
    #[arg(long, env = "ECHO_CLAIM_PROTOCOL")]
    claim_protocol: Option<u32>,
}

struct Echo {
    forward: Option<(String, demi_plugin_sdk::Conductor)>,
    journal: Option<std::fs::File>,
    hang_kind: Option<String>,
    delay: Option<Duration>,
    fail_retryable: f64,
    fail_permanent: f64,
    crash_after: Option<u64>,
    announce_jobs: bool,
    handled: AtomicU64,
}

impl Plugin for Echo {
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").into()
    }

    async fn handle(&self, job: Job) -> Outcome {
        if self.announce_jobs {
            log("job started", &format!("\"job\":\"{}\"", job.id));
        }
        let n = self.handled.fetch_add(1, Ordering::Relaxed) + 1;
        if self.crash_after.is_some_and(|limit| n >= limit) {
            log("crashing on purpose", &format!("\"jobs\":{n}"));
            std::process::abort();
        }
        if let Some((target, conductor)) = &self.forward {
            return forward(target, conductor.clone(), job).await;
        }
        if self.hang_kind.as_deref() == Some(job.kind.as_str()) {
            std::future::pending::<()>().await;
        }
        if let Some(delay) = self.delay {
            tokio::time::sleep(delay).await;
        }
        // Kind "trace" answers with the trace id the job arrived with.
        if job.kind == "trace" {
            let id = job.trace.map(|t| t.trace_id_hex()).unwrap_or_default();
            return Outcome::Ok(id.into_bytes());
        }
        // Kind "inflate" answers with as many bytes as its "bytes"
        // attribute says: an answer may be far larger than its job.
        if job.kind == "inflate" {
            let Some(size) = job.attributes.get("bytes").and_then(|n| n.parse().ok()) else {
                return Outcome::Permanent("inflate: attribute \"bytes\" must be a count".into());
            };
            return Outcome::Ok(vec![b'x'; size]);
        }
        let roll = fastrand::f64();
        let outcome = if roll < self.fail_permanent {
            Outcome::Permanent(format!("echo: injected permanent failure (job {})", job.id))
        } else if roll < self.fail_permanent + self.fail_retryable {
            Outcome::Retryable(format!("echo: injected retryable failure (job {})", job.id))
        } else {
            Outcome::Ok(job.payload)
        };
        if let Some(mut journal) = self.journal.as_ref() {
            let word = match outcome {
                Outcome::Ok(_) => "ok",
                Outcome::Retryable(_) => "retryable",
                Outcome::Permanent(_) => "permanent",
            };
            // One write per line: O_APPEND keeps lines from several
            // replicas whole.
            let micros = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros());
            let line = format!("{} {} {word} {micros}\n", job.id, job.attempt);
            let _ = std::io::Write::write_all(&mut journal, line.as_bytes());
        }
        outcome
    }
}

/// Hands `job` to `target` and answers with its answer. The platform job's
/// id is the idempotency key: a retry of this job after this replica died
/// finds the job the first attempt handed over instead of making a second.
async fn forward(target: &str, mut conductor: demi_plugin_sdk::Conductor, job: Job) -> Outcome {
    use demi_plugin_sdk::{Answer, JobStatus};
    let submit = demi_plugin_sdk::Submit::new(target, job.kind.clone(), job.payload.clone())
        .attributes(job.attributes.clone())
        .idempotency_key(job.id.clone())
        .trace(job.trace);
    let handed = match conductor.submit_and_wait(submit).await {
        Ok(Answer::Completed(payload)) => return Outcome::Ok(payload),
        Ok(Answer::DeadLettered(errors)) => {
            return Outcome::Permanent(format!("{target} did not answer: {errors:?}"));
        }
        Ok(Answer::Duplicate(handed)) => handed,
        Err(error) => return Outcome::Retryable(format!("cannot reach {target}: {error}")),
    };
    // The conductor stops waiting for this call at the attempt timeout.
    loop {
        match conductor.wait_job(&handed, Duration::from_secs(60)).await {
            Ok(JobStatus::Completed { answer, .. }) => return Outcome::Ok(answer),
            Ok(JobStatus::DeadLettered { errors }) => {
                return Outcome::Permanent(format!("{target} did not answer: {errors:?}"));
            }
            Ok(JobStatus::Expired | JobStatus::Unknown) => {
                return Outcome::Permanent(format!("{target}: job {handed} is gone"));
            }
            Ok(JobStatus::Queued { .. } | JobStatus::InFlight { .. }) => {}
            Err(error) => return Outcome::Retryable(format!("cannot reach {target}: {error}")),
        }
    }
}

/// One JSON line on stdout, which the conductor turns into a log event.
fn log(msg: &str, fields: &str) {
    let sep = if fields.is_empty() { "" } else { "," };
    println!("{{\"level\":\"info\",\"msg\":\"{msg}\"{sep}{fields}}}");
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(code) = args.exit_code {
        eprintln!("echo: exiting with code {code} as asked");
        return ExitCode::from(code);
    }
    let mut handshake = match Handshake::from_env() {
        Ok(handshake) => handshake,
        Err(error) => {
            eprintln!("demi-plugin-echo: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(version) = args.claim_protocol {
        handshake.protocol_version = version;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("demi-plugin-echo: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(delay) = args.start_delay {
        std::thread::sleep(delay);
    }
    misbehave(&args, &runtime);
    log(
        "echo starting",
        &format!(
            "\"instance\":{},\"socket\":\"{}\"",
            handshake.instance,
            handshake.socket.display()
        ),
    );
    let journal = match &args.journal {
        Some(path) => match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(file) => Some(file),
            Err(error) => {
                eprintln!(
                    "demi-plugin-echo: cannot open the journal {}: {error}",
                    path.display()
                );
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => None,
    };
    // The client's lazy channel needs the runtime it will run on.
    let _runtime = runtime.enter();
    let forward = match &args.forward_to {
        Some(target) => match demi_plugin_sdk::Conductor::from_env() {
            Ok(conductor) => Some((target.clone(), conductor)),
            Err(error) => {
                eprintln!("demi-plugin-echo: --forward-to: {error}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => None,
    };
    let echo = Echo {
        forward,
        journal,
        hang_kind: args.hang_kind.clone(),
        delay: args.delay,
        fail_retryable: args.fail_retryable,
        fail_permanent: args.fail_permanent,
        crash_after: args.crash_after,
        announce_jobs: args.announce_jobs,
        handled: AtomicU64::new(0),
    };
    match runtime.block_on(serve_with(echo, handshake)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demi-plugin-echo: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// Starts the resource and liveness misbehaviours asked for on the command line.
fn misbehave(args: &Args, runtime: &tokio::runtime::Runtime) {
    if let Some(after) = args.hang_after {
        std::thread::spawn(move || {
            std::thread::sleep(after);
            log("hanging on purpose", "");
            // A stopped process answers nothing, exactly like a deadlock, and
            // ignores SIGTERM until it is SIGKILLed.
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
        });
    }
    if let Some(mib) = args.alloc_mib {
        std::thread::spawn(move || {
            let mut held: Vec<Vec<u8>> = Vec::new();
            for i in 0..mib {
                // Touch every page, or the kernel never charges it.
                held.push(vec![0x5a; 1 << 20]);
                if (i + 1) % 16 == 0 {
                    log("allocated", &format!("\"mib\":{}", i + 1));
                }
            }
            log("allocation done", &format!("\"mib\":{mib}"));
            loop {
                std::thread::park();
                std::hint::black_box(&held);
            }
        });
    }
    let spinners = args.spin_threads.unwrap_or(0);
    if args.spin_on_usr1 {
        let _guard = runtime.enter();
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()) {
            Ok(mut usr1) => {
                runtime.spawn(async move {
                    usr1.recv().await;
                    spin(spinners);
                });
            }
            Err(error) => eprintln!("echo: cannot wait for SIGUSR1: {error}"),
        }
    } else {
        spin(spinners);
    }
    if args.daemonize {
        daemonize();
    }
    if let Some(count) = args.fork {
        let mut forked = 0;
        for _ in 0..count {
            // The children only sleep: no allocation or locking after fork.
            match unsafe { nix::unistd::fork() } {
                Ok(nix::unistd::ForkResult::Child) => loop {
                    nix::unistd::pause();
                },
                Ok(nix::unistd::ForkResult::Parent { .. }) => forked += 1,
                Err(_) => break,
            }
        }
        log("forked", &format!("\"asked\":{count},\"forked\":{forked}"));
    }
}

fn spin(threads: u32) {
    for _ in 0..threads {
        std::thread::spawn(|| {
            let mut x = 0u64;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        });
    }
    if threads > 0 {
        log("spinning", &format!("\"threads\":{threads}"));
    }
}

/// The classic double fork: the grandchild starts its own session, so it
/// is in neither the plugin's process group nor its parentage.
fn daemonize() {
    use nix::unistd::{ForkResult, fork, pause, setsid};
    use std::io::Write as _;
    // SAFETY: after a fork in a multi-threaded process the children make
    // only system calls and format into a stack buffer: no allocation, no
    // locks another thread might have held.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let _ = setsid();
            match unsafe { fork() } {
                Ok(ForkResult::Child) => {
                    let mut line = [0u8; 96];
                    let mut cursor = std::io::Cursor::new(&mut line[..]);
                    let _ = writeln!(
                        cursor,
                        "{{\"level\":\"info\",\"msg\":\"daemonized\",\"daemon_pid\":{}}}",
                        nix::unistd::getpid()
                    );
                    let len = cursor.position() as usize;
                    let _ = nix::unistd::write(std::io::stdout(), &line[..len]);
                    loop {
                        pause();
                    }
                }
                // _exit: no atexit handlers or stdio flushing after a fork.
                _ => unsafe { nix::libc::_exit(0) },
            }
        }
        Ok(ForkResult::Parent { child }) => {
            let _ = nix::sys::wait::waitpid(child, None);
        }
        Err(error) => eprintln!("echo: cannot daemonize: {error}"),
    }
}
