//! `hostile_plugin`: a plugin that leans on its conductor as hard as it
//! can, for the pressure benchmark (`scripts/bench/pressure`). It serves
//! the contract properly (health, Shutdown) and, once started, does one
//! of:
//!
//! - `--flood-stdout MB`: writes 120-byte lines to stdout at MB megabytes
//!   a second (as fast as the pipe takes them, if that is less);
//! - `--connections N`: opens N connections to the plugin API socket and
//!   holds them;
//! - `--submit-flood TARGET`: submits jobs to TARGET from 32 tasks, as
//!   fast as the answers come.
//!
//! It starts when `--go FILE` exists (so a benchmark can measure before),
//! and every 100 ms it rewrites `--report FILE` with what it did so far,
//! as `key value` lines.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use demi_plugin_sdk::{ClientError, Submit};

enum Mode {
    Flood { megabytes: u64 },
    Connections { n: usize },
    Submit { target: String },
}

fn args() -> Option<(Mode, PathBuf, PathBuf)> {
    let mut mode = None;
    let mut report = None;
    let mut go = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--flood-stdout" => {
                mode = Some(Mode::Flood {
                    megabytes: it.next()?.parse().ok()?,
                })
            }
            "--connections" => {
                mode = Some(Mode::Connections {
                    n: it.next()?.parse().ok()?,
                })
            }
            "--submit-flood" => mode = Some(Mode::Submit { target: it.next()? }),
            "--report" => report = it.next().map(PathBuf::from),
            "--go" => go = it.next().map(PathBuf::from),
            _ => return None,
        }
    }
    Some((mode?, report?, go?))
}

/// Counters, written to the report file as they grow.
#[derive(Default)]
struct Counts(Vec<(&'static str, AtomicU64)>);

impl Counts {
    fn new(keys: &[&'static str]) -> Arc<Self> {
        Arc::new(Self(keys.iter().map(|k| (*k, AtomicU64::new(0))).collect()))
    }

    fn add(&self, key: &str, n: u64) {
        if let Some((_, count)) = self.0.iter().find(|(k, _)| *k == key) {
            count.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn write(&self, path: &Path, started: Instant) {
        let mut text = format!("seconds {:.3}\n", started.elapsed().as_secs_f64());
        for (key, count) in &self.0 {
            text.push_str(&format!("{key} {}\n", count.load(Ordering::Relaxed)));
        }
        let partial = path.with_extension("partial");
        if std::fs::write(&partial, text).is_ok() {
            let _ = std::fs::rename(partial, path);
        }
    }
}

fn flood(megabytes: u64, counts: &Counts) {
    let line = format!("{}\n", "flood ".repeat(20).trim_end());
    let lines_per_ms = (megabytes * 1_000_000 / 1000) / line.len() as u64;
    let batch = line.repeat(lines_per_ms.max(1) as usize);
    let mut stdout = std::io::stdout().lock();
    let started = Instant::now();
    for ms in 0u64.. {
        if stdout.write_all(batch.as_bytes()).is_err() {
            return;
        }
        counts.add("bytes", batch.len() as u64);
        counts.add("lines", lines_per_ms);
        // Paced to the rate; a slower reader paces it instead.
        let due = started + Duration::from_millis(ms + 1);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
    }
}

fn connections(n: usize, counts: &Counts) -> Vec<std::os::unix::net::UnixStream> {
    let Some(socket) = std::env::var_os("DEMI_CONDUCTOR_SOCKET") else {
        return Vec::new();
    };
    let mut held = Vec::new();
    for _ in 0..n {
        match std::os::unix::net::UnixStream::connect(&socket) {
            Ok(stream) => {
                counts.add("connected", 1);
                held.push(stream);
            }
            Err(_) => counts.add("connect_failed", 1),
        }
    }
    // A connection the conductor refused is closed: reading it says EOF.
    std::thread::sleep(Duration::from_secs(1));
    let mut open = Vec::new();
    for stream in held {
        let _ = stream.set_nonblocking(true);
        let mut byte = [0u8; 1];
        match std::io::Read::read(&mut &stream, &mut byte) {
            Ok(0) => counts.add("closed_by_conductor", 1),
            _ => {
                counts.add("held", 1);
                open.push(stream);
            }
        }
    }
    open
}

async fn submit_flood(target: String, counts: Arc<Counts>) {
    let Ok(conductor) = demi_plugin_sdk::Conductor::from_env() else {
        return;
    };
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..32 {
        let (mut conductor, counts, target) = (conductor.clone(), counts.clone(), target.clone());
        tasks.spawn(async move {
            loop {
                let job = Submit::new(target.clone(), "flood", b"x".to_vec());
                match conductor.submit(job).await {
                    Ok(_) => counts.add("accepted", 1),
                    Err(ClientError::Rpc(status))
                        if status.code() == tonic::Code::ResourceExhausted =>
                    {
                        counts.add("resource_exhausted", 1)
                    }
                    Err(_) => {
                        counts.add("other_errors", 1);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

fn main() -> std::process::ExitCode {
    let Some((mode, report, go)) = args() else {
        eprintln!(
            "usage: hostile_plugin (--flood-stdout MB | --connections N | --submit-flood TARGET) \
             --report FILE --go FILE"
        );
        return std::process::ExitCode::from(demi_plugin_sdk::EXIT_CONFIG);
    };
    demi_plugin_sdk::run_origin(move |ctx| async move {
        let stopping = ctx.stopping();
        while !go.exists() {
            tokio::select! {
                () = stopping.cancelled() => return Ok(()),
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        let started = Instant::now();
        let counts = match &mode {
            Mode::Flood { .. } => Counts::new(&["bytes", "lines"]),
            Mode::Connections { .. } => {
                Counts::new(&["connected", "connect_failed", "held", "closed_by_conductor"])
            }
            Mode::Submit { .. } => Counts::new(&["accepted", "resource_exhausted", "other_errors"]),
        };
        let reporter = {
            let (counts, report) = (counts.clone(), report.clone());
            tokio::spawn(async move {
                loop {
                    counts.write(&report, started);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        // Plain threads for the blocking work: the process ends under them
        // when the conductor stops it.
        let work = match mode {
            Mode::Flood { megabytes } => {
                let counts = counts.clone();
                std::thread::spawn(move || flood(megabytes, &counts));
                None
            }
            Mode::Connections { n } => {
                let counts = counts.clone();
                std::thread::spawn(move || {
                    let _held = connections(n, &counts);
                    std::thread::park();
                });
                None
            }
            Mode::Submit { target } => Some(tokio::spawn(submit_flood(target, counts.clone()))),
        };
        stopping.cancelled().await;
        reporter.abort();
        counts.write(&report, started);
        if let Some(work) = work {
            work.abort();
        }
        Ok::<(), String>(())
    })
}
