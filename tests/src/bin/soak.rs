//! The chaos soak: `scripts/soak [SECONDS]` (600 by default; `make test`
//! runs 60). A worker pool, a platform plugin forwarding to it and a
//! neighbour OOM-looping under 64 MiB, under a steady stream of jobs from
//! many clients while something goes wrong every half second: a replica
//! SIGKILLed, SIGSTOPped for 1–4 s, SIGTERMed, or handed a job that hangs
//! past its attempt timeout; a reload with a changed table every minute;
//! the conductor itself SIGKILLed and restarted every two minutes (in
//! short runs both come sooner, so that each happens more than once).
//!
//! It prints a summary, writes the figures as JSON (`$BENCH_OUT`, else
//! `target/bench/soak.json`) and exits 1 when a promise broke: a job lost
//! or done twice, a panic, an orphan, a replica not back, a leftover.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use demi_e2e::grpc::admin_pb as pb;
use demi_e2e::{Conductor, alive, cgroup_dirs, processes_under, rss_kib, series};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

type Admin = pb::conductor_client::ConductorClient<Channel>;

const CLIENTS: usize = 16;
const FAULT_EVERY: Duration = Duration::from_millis(500);
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// Plugins the faults hit; the neighbour hurts itself.
const TARGETS: [&str; 2] = ["workers", "platform"];
/// Restart and health settings of the targets, and what they promise: an
/// instance back SERVING within the longest restart delay (with its
/// jitter), a failed check's detection, and a start.
const MAX_DELAY: Duration = Duration::from_secs(1);
/// The longest a SIGSTOP holds a replica.
const LONGEST_PAUSE: Duration = Duration::from_millis(4000);
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
const START_ALLOWANCE: Duration = Duration::from_secs(2);

fn backoff_bound() -> Duration {
    MAX_DELAY.mul_f64(1.2) + HEALTH_INTERVAL * 2 + START_ALLOWANCE
}

/// The plugins, in generation `n` of the config (each reload flips the
/// workers' replica count and the neighbour's appetite).
fn plugins(n: u32, journal: &Path) -> String {
    let replicas = 4 + n % 2;
    let appetite = if n.is_multiple_of(2) { 200 } else { 300 };
    let target = |name: &str| {
        format!(
            "shutdown_grace = \"2s\"\n\
             [plugins.{name}.health]\ninterval = \"{}ms\"\ntimeout = \"500ms\"\nfailure_threshold = 2\n\
             [plugins.{name}.restart]\ninitial_delay = \"50ms\"\nmax_delay = \"{}ms\"\n\
             start_limit_burst = 100000\n",
            HEALTH_INTERVAL.as_millis(),
            MAX_DELAY.as_millis(),
        )
    };
    format!(
        "[plugins.workers]\ncommand = \"{{echo}}\"\nreplicas = {replicas}\n\
         args = [\"--journal\", \"{journal}\", \"--hang-kind\", \"hang\", \"--delay\", \"2ms\"]\n{workers}\
         [plugins.workers.dispatch]\nmax_attempts = 10\nattempt_timeout = \"1s\"\n\
         retry_initial = \"20ms\"\nretry_max = \"500ms\"\n\n\
         [plugins.platform]\ncommand = \"{{echo}}\"\nreplicas = 2\n\
         args = [\"--forward-to\", \"workers\"]\nsubmits_to = [\"workers\"]\n{platform}\
         [plugins.platform.dispatch]\nmax_attempts = 10\nattempt_timeout = \"20s\"\n\
         retry_initial = \"20ms\"\nretry_max = \"500ms\"\n\n\
         [plugins.hog]\ncommand = \"{{echo}}\"\njobs = false\nargs = [\"--alloc-mib\", \"{appetite}\"]\n\
         [plugins.hog.limits]\nmemory = \"64MiB\"\n\
         [plugins.hog.restart]\ninitial_delay = \"100ms\"\nmax_delay = \"2s\"\nstart_limit_burst = 100000\n",
        journal = journal.display(),
        workers = target("workers"),
        platform = target("platform"),
    )
}

/// A job the conductor accepted: its idempotency key (also its payload,
/// so the answer shows which job it answers) and its id.
struct Accepted {
    key: String,
    id: String,
    hang: bool,
}

/// A lazy channel: it reconnects by itself after the conductor restarts.
fn admin(socket: &Path) -> Admin {
    let channel = Endpoint::from_shared(format!("unix://{}", socket.display()))
        .expect("endpoint")
        .connect_lazy();
    Admin::new(channel)
}

/// Submits until the conductor takes it: the same key every time, so a
/// submission whose answer was lost (the conductor killed under it) is
/// not a second job. None if it refused it for good.
async fn submit(api: &mut Admin, plugin: &str, kind: &str, key: &str) -> Option<String> {
    let give_up = Instant::now() + Duration::from_secs(120);
    while Instant::now() < give_up {
        let mut request = tonic::Request::new(pb::SubmitRequest {
            plugin: plugin.into(),
            kind: kind.into(),
            payload: key.as_bytes().to_vec(),
            idempotency_key: key.into(),
            ..Default::default()
        });
        request.set_timeout(Duration::from_secs(10));
        match api.submit(request).await {
            Ok(response) => return Some(response.into_inner().job_id),
            Err(status)
                if matches!(
                    status.code(),
                    Code::ResourceExhausted
                        | Code::Unavailable
                        | Code::Unknown
                        | Code::Cancelled
                        | Code::DeadlineExceeded
                ) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => {
                eprintln!("soak: {key} refused: {status}");
                return None;
            }
        }
    }
    None
}

/// One client: a job every `period`, each submitted until accepted.
async fn client(
    n: usize,
    mut api: Admin,
    period: Duration,
    stop: Arc<AtomicBool>,
    refused: Arc<AtomicU64>,
) -> Vec<Accepted> {
    let first = tokio::time::Instant::now() + period.mul_f64(n as f64 / CLIENTS as f64);
    let mut ticks = tokio::time::interval_at(first, period);
    // After the conductor was away, go on at the same pace: a client that
    // caught up in a burst would test the burst, not the soak.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut accepted = Vec::new();
    for seq in 0.. {
        ticks.tick().await;
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let key = format!("c{n}-{seq}");
        match submit(&mut api, "platform", "echo", &key).await {
            Some(id) => accepted.push(Accepted {
                key,
                id,
                hang: false,
            }),
            None => {
                refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    accepted
}

/// Where job `id` ended (the default state, "unspecified", when it did
/// not end within ten minutes).
async fn end_of(mut api: Admin, id: String) -> pb::JobState {
    let open = [pb::job_state::State::Queued, pb::job_state::State::InFlight].map(|s| s as i32);
    for _ in 0..10 {
        let mut request = tonic::Request::new(pb::WaitJobRequest {
            job_id: id.clone(),
            timeout: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
        });
        request.set_timeout(Duration::from_secs(70));
        match api.wait_job(request).await {
            Ok(state) if !open.contains(&state.get_ref().state) => return state.into_inner(),
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    pb::JobState::default()
}

fn instance_processes(root: &str, plugin: &str) -> Vec<u32> {
    demi_e2e::pids_in_cgroup(root, plugin)
}

/// What plugins wrote about a panic, as the conductor logged their output.
fn panicked_plugins(conductor: &Conductor) -> Vec<String> {
    conductor
        .events()
        .iter()
        .filter(|e| e["target"] == "plugin")
        .filter_map(|e| e["message"].as_str())
        .filter(|m| m.contains("panicked"))
        .map(str::to_owned)
        .collect()
}

fn micros_now() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

fn signal(pid: u32, signal: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
}

#[derive(Default)]
struct Faults {
    kill: u32,
    stop: u32,
    term: u32,
    hang: u32,
    reloads: u32,
    conductor_kills: u32,
}

/// The conductor's own figures at one moment.
struct Sample {
    at: f64,
    rss_kib: u64,
    fds: u64,
    tasks: u64,
}

fn sample(conductor: &Conductor, at: f64) -> Sample {
    let pid = conductor.pid();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    let tasks = series(&conductor.scrape(), "demi_conductor_tasks", &[]).unwrap_or(0.0) as u64;
    Sample {
        at,
        rss_kib: rss_kib(pid),
        fds,
        tasks,
    }
}

/// Whether every instance of the targets is SERVING, with as many as
/// wanted.
fn all_serving(conductor: &Conductor) -> bool {
    let out = conductor.cli(&["status", "--json"]);
    if !out.status.success() {
        return false;
    }
    let Ok(status) = serde_json::from_slice::<Value>(&out.stdout) else {
        return false;
    };
    TARGETS.iter().all(|name| {
        status.as_array().into_iter().flatten().any(|plugin| {
            let instances = plugin["instances"].as_array();
            plugin["name"] == *name
                && instances.is_some_and(|i| {
                    i.len() as u64 == plugin["replicas"].as_u64().unwrap_or(u64::MAX)
                        && i.iter().all(|i| i["state"] == "serving")
                })
        })
    })
}

fn mean(samples: &[&Sample], value: fn(&Sample) -> u64) -> f64 {
    samples.iter().map(|s| value(s) as f64).sum::<f64>() / samples.len().max(1) as f64
}

fn main() {
    let seconds: u64 = match std::env::args().nth(1).map(|s| s.parse()) {
        None => 600,
        Some(Ok(n)) if n >= 30 => n,
        _ => {
            eprintln!("usage: soak [SECONDS ≥ 30]");
            std::process::exit(2);
        }
    };
    let rate: f64 = std::env::var("SOAK_RATE")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(170.0);
    let length = Duration::from_secs(seconds);
    let reload_every = Duration::from_secs((seconds / 4).min(60));
    let kill_every = Duration::from_secs((seconds / 3).min(120));

    let scratch = tempfile::tempdir().expect("scratch folder");
    let journal = scratch.path().join("journal");
    let stderr = scratch.path().join("conductor.stderr");
    let mut generation = 0;
    // The soak audits every job at the end: answers must outlive the run
    // (the default keeps them 10 minutes, the length of a full soak).
    let mut conductor = Conductor::builder()
        .conductor("[conductor.jobs]\nkeep_answers = \"6h\"\n")
        .log("info")
        .stderr(&stderr)
        .start(&plugins(generation, &journal));
    let root = conductor.cgroup_root().to_owned();
    let socket = conductor.api_socket();
    for index in 0..4 {
        conductor.wait_serving(0, "workers", index);
    }
    conductor.wait_serving(0, "platform", 1);
    println!(
        "soak: {seconds} s, {rate} jobs/s from {CLIENTS} clients, a fault every {} ms, \
         a reload every {} s, the conductor killed every {} s",
        FAULT_EVERY.as_millis(),
        reload_every.as_secs(),
        kill_every.as_secs()
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let period = Duration::from_secs_f64(CLIENTS as f64 / rate);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let api = runtime.block_on(async { admin(&socket) });
            runtime.spawn(client(n, api, period, stop.clone(), refused.clone()))
        })
        .collect();
    let hang_api = runtime.block_on(async { admin(&socket) });
    let mut hangs = Vec::new();

    let started = Instant::now();
    let mut faults = Faults::default();
    // From the first 10 s on: the very start has no clients yet.
    let mut samples = Vec::new();
    let mut orphans = Vec::new();
    let mut conductor_killed_at: Vec<u128> = Vec::new();
    let mut plugin_panics: Vec<String> = Vec::new();
    let mut continues: Vec<(Instant, u32)> = Vec::new();
    let mut last_fault = started;
    let (mut next_reload, mut next_kill, mut next_sample) = (
        started + reload_every,
        started + kill_every,
        started + SAMPLE_EVERY,
    );
    let mut tick = started;
    while tick.elapsed() < length && started.elapsed() < length {
        tick += FAULT_EVERY;
        std::thread::sleep(tick.saturating_duration_since(Instant::now()));
        let now = Instant::now();
        continues.retain(|&(at, pid)| {
            let due = at <= now;
            if due {
                signal(pid, Signal::SIGCONT);
            }
            !due
        });

        let target = TARGETS[fastrand::usize(..TARGETS.len())];
        let live = instance_processes(&root, target);
        match (fastrand::u8(..4), live.is_empty()) {
            (3, _) => {
                faults.hang += 1;
                let (mut api, key) = (hang_api.clone(), format!("hang-{}", faults.hang));
                hangs.push(runtime.spawn(async move {
                    let id = submit(&mut api, "workers", "hang", &key).await;
                    id.map(|id| Accepted {
                        key,
                        id,
                        hang: true,
                    })
                }));
            }
            (_, true) => {}
            (kind, false) => {
                let pid = live[fastrand::usize(..live.len())];
                match kind {
                    0 => {
                        signal(pid, Signal::SIGKILL);
                        faults.kill += 1;
                    }
                    1 => {
                        signal(pid, Signal::SIGSTOP);
                        let pause = Duration::from_millis(fastrand::u64(
                            1000..=LONGEST_PAUSE.as_millis() as u64,
                        ));
                        continues.push((now + pause, pid));
                        faults.stop += 1;
                    }
                    _ => {
                        signal(pid, Signal::SIGTERM);
                        faults.term += 1;
                    }
                }
            }
        }
        last_fault = Instant::now();

        if now >= next_reload {
            next_reload += reload_every;
            generation += 1;
            conductor.write_plugins(&plugins(generation, &journal));
            let out = conductor.cli(&["reload"]);
            if !out.status.success() {
                eprintln!(
                    "soak: reload failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            faults.reloads += 1;
        }
        if now >= next_sample {
            next_sample += SAMPLE_EVERY;
            samples.push(sample(&conductor, started.elapsed().as_secs_f64()));
        }
        if now >= next_kill {
            next_kill += kill_every;
            let before = processes_under(&root);
            conductor.signal(Signal::SIGKILL);
            conductor_killed_at.push(micros_now());
            conductor.wait_exit();
            std::thread::sleep(Duration::from_secs(1));
            let mut left: BTreeSet<u32> = before.into_iter().filter(|p| alive(*p)).collect();
            left.extend(processes_under(&root));
            orphans.push(left.len());
            faults.conductor_kills += 1;
            plugin_panics.extend(panicked_plugins(&conductor));
            conductor = conductor.restart();
            conductor.api_socket();
            last_fault = Instant::now();
        }
    }
    for (_, pid) in continues.drain(..) {
        signal(pid, Signal::SIGCONT);
        last_fault = Instant::now();
    }
    let chaos_seconds = started.elapsed().as_secs_f64();

    // Back to health: every replica SERVING, as many as configured.
    let serving_after = loop {
        if all_serving(&conductor) {
            break Some(last_fault.elapsed());
        }
        if last_fault.elapsed() > Duration::from_secs(120) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };

    stop.store(true, Ordering::Relaxed);
    let mut accepted: Vec<Accepted> = runtime.block_on(async {
        let mut all = Vec::new();
        for client in clients {
            all.extend(client.await.unwrap_or_default());
        }
        for hang in hangs {
            all.extend(hang.await.ok().flatten());
        }
        all
    });
    let submitted_seconds = started.elapsed().as_secs_f64();
    accepted.sort_by(|a, b| a.key.cmp(&b.key));

    // Every accepted job's end, as the conductor records it.
    let drain_started = Instant::now();
    let ends: Vec<pb::JobState> = runtime.block_on(async {
        let api = admin(&socket);
        let mut ends = Vec::new();
        for chunk in accepted.chunks(64) {
            let mut waits = tokio::task::JoinSet::new();
            for (n, job) in chunk.iter().enumerate() {
                let (api, id) = (api.clone(), job.id.clone());
                waits.spawn(async move { (n, end_of(api, id).await) });
            }
            let mut chunk_ends = vec![pb::JobState::default(); chunk.len()];
            while let Some(Ok((n, state))) = waits.join_next().await {
                chunk_ends[n] = state;
            }
            ends.extend(chunk_ends);
        }
        ends
    });
    let states: Vec<(pb::JobState, &Accepted)> = ends.into_iter().zip(&accepted).collect();
    let drain_seconds = drain_started.elapsed().as_secs_f64();

    let completed = pb::job_state::State::Completed as i32;
    let dead = pb::job_state::State::DeadLettered as i32;
    let expired = pb::job_state::State::Expired as i32;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut wrong_answers = 0;
    let mut platform_completed = 0;
    let mut unanswered = Vec::new();
    let mut unanswered_n = 0;
    for (state, job) in &states {
        let word = match state.state {
            s if s == completed => {
                if !job.hang {
                    platform_completed += 1;
                }
                if state.answer != job.key.as_bytes() {
                    wrong_answers += 1;
                }
                "completed"
            }
            s if s == dead => {
                // A platform job dead-lettered is a client's message that
                // got no answer: why, for the record.
                if !job.hang {
                    unanswered_n += 1;
                    if unanswered.len() < 20 {
                        unanswered.push(json!({"job": job.key, "errors": state.errors}));
                    }
                }
                "dead_lettered"
            }
            // Finished, but its answer is no longer kept: not lost, and
            // not checked either.
            s if s == expired => "expired",
            _ => "lost",
        };
        *counts.entry(word).or_default() += 1;
    }
    let lost_by_conductor = counts.get("lost").copied().unwrap_or(0) + wrong_answers;

    // The workers' own journal: a delivery repeated with the same attempt
    // number is a copy, not a retry; more worker jobs answered than
    // platform jobs is work done twice; fewer, answers nobody computed.
    let lines = demi_e2e::journal_timed(&journal);
    // Kept beside the results, for a look at what went wrong.
    let bench_dir = demi_e2e::repo_root().join("target/bench");
    let journal_copy = bench_dir.join("soak-journal");
    let _ = std::fs::create_dir_all(&bench_dir);
    let _ = std::fs::copy(&journal, &journal_copy);
    let mut deliveries: BTreeMap<(&str, u32), Vec<u128>> = BTreeMap::new();
    let mut answered: BTreeSet<&str> = BTreeSet::new();
    for (id, attempt, outcome, at) in &lines {
        deliveries
            .entry((id.as_str(), *attempt))
            .or_default()
            .push(*at);
        if outcome == "ok" {
            answered.insert(id.as_str());
        }
    }
    // The conductor counts an attempt in the store a moment after the
    // delivery (dispatch/store.rs): a delivery repeated across a SIGKILL
    // of the conductor is its retry. Any other is a copy. A worker
    // journals a delivery once it has handled it, which for one sent just
    // before the kill can be after it: by the job's 2 ms, or by a
    // SIGSTOP's pause (a CI run saw a delivery journalled after the kill
    // was, and its retry 1.1 s later, counted as a copy). A second on top
    // for the handling on a loaded host.
    let in_worker = (LONGEST_PAUSE + Duration::from_secs(1)).as_micros();
    let (mut copies, mut crash_retries) = (0, 0);
    for times in deliveries.values().filter(|t| t.len() > 1) {
        let (first, last) = (times.iter().min(), times.iter().max());
        let across_a_kill = conductor_killed_at.iter().any(|k| {
            first.is_some_and(|f| f.saturating_sub(in_worker) <= *k) && last.is_some_and(|l| k <= l)
        });
        let extra = times.len() - 1;
        if across_a_kill {
            crash_retries += extra;
        } else {
            copies += extra;
        }
    }
    let expired_n = counts.get("expired").copied().unwrap_or(0);
    // A platform job dead-lettered may have handed its worker job over
    // before it failed: that worker job is not work done twice.
    let platform_dead = unanswered_n;
    let twice = answered
        .len()
        .saturating_sub(platform_completed + platform_dead + expired_n);
    let lost_by_journal = platform_completed.saturating_sub(answered.len());
    let retried = {
        let mut per_job: BTreeMap<&str, u32> = BTreeMap::new();
        for (id, _) in deliveries.keys() {
            *per_job.entry(id).or_default() += 1;
        }
        per_job.values().filter(|n| **n > 1).count()
    };

    // The final stop: nothing may outlive it.
    samples.push(sample(&conductor, started.elapsed().as_secs_f64()));
    plugin_panics.extend(panicked_plugins(&conductor));
    let spawned: Vec<u32> = conductor.spawned_pids();
    conductor.signal(Signal::SIGTERM);
    let exit = conductor.wait_exit();
    let mut leftover: BTreeSet<u32> = processes_under(&root);
    leftover.extend(spawned.into_iter().filter(|p| alive(*p)));
    let leftover_cgroups: Vec<PathBuf> = cgroup_dirs(&root);
    let leftover_sockets = std::fs::read_dir(conductor.runtime_dir().join("plugins"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|plugin| std::fs::read_dir(plugin.path()).into_iter().flatten())
        .flatten()
        .map(|entry| entry.path().display().to_string())
        .collect::<Vec<_>>();
    let panics = std::fs::read_to_string(&stderr)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("panicked at"))
        .count();

    // First and last minute (a third of a short run) of the conductor's
    // own figures: flat, or it leaks.
    let window = (seconds as f64 / 3.0).min(60.0);
    let end = samples.last().map_or(0.0, |s| s.at);
    // (A second of slack: samples come a moment after each 10 s mark.)
    let first: Vec<&Sample> = samples.iter().filter(|s| s.at <= window + 1.0).collect();
    let last: Vec<&Sample> = samples.iter().filter(|s| s.at >= end - window).collect();
    let growth = |value: fn(&Sample) -> u64| mean(&last, value) / mean(&first, value).max(1.0);
    let flat = [
        growth(|s| s.rss_kib),
        growth(|s| s.fds),
        growth(|s| s.tasks),
    ];

    let accepted_n = accepted.len();
    let lost = lost_by_conductor.max(lost_by_journal);
    let duplicates = copies + twice;
    let orphans_total: usize = orphans.iter().sum();
    let bound = backoff_bound();
    let back_in_time = serving_after.is_some_and(|t| t <= bound);
    let result = json!({
        "seconds": seconds,
        "rate": rate,
        "accepted": accepted_n,
        "accepted_per_second": accepted_n as f64 / submitted_seconds,
        "refused": refused.load(Ordering::Relaxed),
        "completed": counts.get("completed").copied().unwrap_or(0),
        "dead_lettered": counts.get("dead_lettered").copied().unwrap_or(0),
        "platform_jobs_dead_lettered": unanswered_n,
        "platform_dead_letters_why": unanswered,
        "plugin_panics": plugin_panics,
        "expired_unchecked": expired_n,
        "lost": lost,
        "lost_by_conductor": lost_by_conductor,
        "lost_by_journal": lost_by_journal,
        "wrong_answers": wrong_answers,
        "duplicates": duplicates,
        "deliveries_copied": copies,
        "deliveries_repeated_across_a_conductor_kill": crash_retries,
        "worker_jobs_beyond_platform_jobs": twice,
        "jobs_retried": retried,
        "worker_deliveries": lines.len(),
        "journal": journal_copy.display().to_string(),
        "faults": {
            "sigkill": faults.kill,
            "sigstop": faults.stop,
            "sigterm": faults.term,
            "hanging_job": faults.hang,
            "reloads": faults.reloads,
            "conductor_sigkills": faults.conductor_kills,
        },
        "orphans_after_conductor_sigkill": orphans,
        "panics": panics,
        "serving_after_last_fault_s": serving_after.map(|t| t.as_secs_f64()),
        "backoff_bound_s": bound.as_secs_f64(),
        "chaos_s": chaos_seconds,
        "drain_s": drain_seconds,
        "conductor_samples": samples.iter().map(|s| json!({
            "at_s": s.at, "rss_kib": s.rss_kib, "open_fds": s.fds, "tasks": s.tasks,
        })).collect::<Vec<_>>(),
        "last_vs_first_window": {
            "window_s": window,
            "rss": flat[0], "open_fds": flat[1], "tasks": flat[2],
        },
        "final_sigterm": {
            "exit": exit.code(),
            "processes_left": leftover.len(),
            "cgroups_left": leftover_cgroups.len(),
            "sockets_left": leftover_sockets,
        },
    });

    println!(
        "accepted {accepted_n} ({:.0}/s), completed {}, dead-lettered {}, lost {lost}, duplicates {duplicates}",
        accepted_n as f64 / submitted_seconds,
        result["completed"],
        result["dead_lettered"],
    );
    println!(
        "faults: {} SIGKILL, {} SIGSTOP, {} SIGTERM, {} hanging jobs, {} reloads, {} conductor SIGKILLs \
         (orphans 1 s after each: {orphans:?})",
        faults.kill, faults.stop, faults.term, faults.hang, faults.reloads, faults.conductor_kills
    );
    if !plugin_panics.is_empty() {
        println!("plugin panics: {plugin_panics:?}");
    }
    if unanswered_n > 0 {
        println!("{unanswered_n} platform jobs dead-lettered: {unanswered:?}");
    }
    println!(
        "panics {panics}; every replica SERVING {} after the last fault (bound {:.1} s)",
        serving_after.map_or("never".into(), |t| format!("{:.2} s", t.as_secs_f64())),
        bound.as_secs_f64()
    );
    println!(
        "conductor, last {window:.0} s vs first: RSS ×{:.2}, fds ×{:.2}, tasks ×{:.2}",
        flat[0], flat[1], flat[2]
    );
    println!(
        "after the final SIGTERM (exit {:?}): {} processes, {} cgroups, {} sockets left",
        exit.code(),
        leftover.len(),
        leftover_cgroups.len(),
        leftover_sockets.len()
    );
    demi_e2e::bench::write_results("soak", &result);

    let mut broken = Vec::new();
    if lost > 0 {
        broken.push(format!("{lost} jobs lost"));
    }
    if expired_n > 0 {
        broken.push(format!("{expired_n} jobs no longer on record"));
    }
    if duplicates > 0 {
        broken.push(format!("{duplicates} jobs done twice"));
    }
    if panics > 0 {
        broken.push(format!("{panics} panics"));
    }
    if orphans_total > 0 {
        broken.push(format!("{orphans_total} orphans"));
    }
    if !back_in_time {
        broken.push("replicas not back SERVING within the bound".into());
    }
    if !leftover.is_empty() || !leftover_cgroups.is_empty() || !leftover_sockets.is_empty() {
        broken.push("leftovers after SIGTERM".into());
    }
    if exit.code() != Some(0) {
        broken.push(format!("the final SIGTERM ended in {exit:?}"));
    }
    if !broken.is_empty() {
        eprintln!("soak: BROKEN: {}", broken.join("; "));
        std::process::exit(1);
    }
}
