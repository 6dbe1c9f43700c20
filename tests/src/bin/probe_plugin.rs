//! `probe_plugin`: an origin plugin (no jobs) for the plugin API tests.
//! It journals what the conductor tells it, one line per fact, so a test
//! can check the order of things across replicas:
//!
//! - `member PID INDEX REPLICAS GENERATION US` (µs since the epoch): the membership it acts
//!   on from then (at start, and at every change);
//! - `stop PID INDEX US`: it stopped acting (on Shutdown or SIGTERM);
//! - `grant PID INDEX BUCKET GRANTED_US RECEIVED_US`: with `--acquire`,
//!   each turn under a shared limit, as fast as it can ask, in bucket
//!   `INDEX % BUCKETS` (`--buckets`, 1 by default).
//!
//! `--watch-dependencies` journals `dep PID PLUGIN READY US` for each
//! dependency at start and at every change.
//! `--handover-ms N` takes N ms to hand a share over on a membership
//! change, before journaling and acknowledging the new one.
//! `--not-serving REASON` reports NOT_SERVING, with the reason, a second
//! after it started.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use demi_plugin_sdk::Context;

fn us(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros())
}

fn note(journal: &Path, line: String) {
    if let Ok(mut file) = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(journal)
    {
        // One write per line keeps lines of several replicas whole.
        let _ = file.write_all(format!("{line}\n").as_bytes());
    }
}

struct Args {
    journal: PathBuf,
    acquire: Option<String>,
    buckets: u32,
    /// Report NOT_SERVING with this reason once started.
    not_serving: Option<String>,
    /// How long handing a share over takes, before the new membership is
    /// journaled and acknowledged.
    handover: Duration,
    /// Journal the plugin's dependencies as they change.
    dependencies: bool,
}

fn args() -> Option<Args> {
    let mut journal = None;
    let mut acquire = None;
    let mut buckets = 1;
    let mut not_serving = None;
    let mut handover = Duration::ZERO;
    let mut dependencies = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--journal" => journal = it.next().map(PathBuf::from),
            "--acquire" => acquire = it.next(),
            "--not-serving" => not_serving = it.next(),
            "--watch-dependencies" => dependencies = true,
            "--handover-ms" => handover = Duration::from_millis(it.next()?.parse().ok()?),
            "--buckets" => buckets = it.next()?.parse().ok().filter(|b| *b > 0)?,
            _ => return None,
        }
    }
    Some(Args {
        journal: journal?,
        acquire,
        buckets,
        not_serving,
        handover,
        dependencies,
    })
}

async fn probe(ctx: Context, args: Args) -> Result<(), String> {
    let pid = std::process::id();
    let mut members = ctx.membership_changes();
    let journal = args.journal.clone();
    let member = move |m: demi_plugin_sdk::Membership| {
        note(
            &journal,
            format!(
                "member {pid} {} {} {} {}",
                m.index,
                m.replicas,
                m.generation,
                us(SystemTime::now())
            ),
        );
    };
    member(ctx.membership());
    if let Some(reason) = &args.not_serving {
        // After the conductor saw it ready, as an upstream would fail.
        tokio::time::sleep(Duration::from_secs(1)).await;
        ctx.health().not_serving(reason).await;
    }
    let stopping = ctx.stopping();
    if args.dependencies {
        let mut conductor = ctx.conductor().map_err(|e| e.to_string())?;
        let mut watch = conductor.dependencies().await.map_err(|e| e.to_string())?;
        let journal = args.journal.clone();
        tokio::spawn(async move {
            while let Some(Ok(now)) = watch.next().await {
                for (name, ready) in now {
                    let line = format!("dep {pid} {name} {ready} {}", us(SystemTime::now()));
                    note(&journal, line);
                }
            }
        });
    }
    if let Some(limit) = &args.acquire {
        let mut conductor = ctx.conductor().map_err(|e| e.to_string())?;
        let index = ctx.membership().index;
        let journal = args.journal.clone();
        let limit = limit.clone();
        let stopping = stopping.clone();
        let bucket = index % args.buckets;
        tokio::spawn(async move {
            loop {
                let asked = tokio::select! {
                    () = stopping.cancelled() => return,
                    asked = conductor.acquire(&limit, bucket, Duration::from_secs(30)) => asked,
                };
                match asked {
                    Ok(grant) => note(
                        &journal,
                        format!(
                            "grant {pid} {index} {bucket} {} {}",
                            us(grant.at),
                            us(SystemTime::now())
                        ),
                    ),
                    Err(error) => {
                        eprintln!("probe_plugin: acquire: {error}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
    loop {
        tokio::select! {
            () = stopping.cancelled() => break,
            changed = members.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = *members.borrow_and_update();
                // Closing what is no longer ours takes a while; the new
                // share is ours only after.
                tokio::time::sleep(args.handover).await;
                member(now);
                ctx.membership_applied(now);
            }
        }
    }
    let index = ctx.membership().index;
    note(
        &args.journal,
        format!("stop {pid} {index} {}", us(SystemTime::now())),
    );
    Ok(())
}

fn main() -> ExitCode {
    let Some(args) = args() else {
        eprintln!(
            "usage: probe_plugin --journal FILE [--acquire LIMIT [--buckets N]] \
             [--not-serving REASON] [--handover-ms N] [--watch-dependencies]"
        );
        return ExitCode::from(2);
    };
    demi_plugin_sdk::run_origin(move |ctx| probe(ctx, args))
}
