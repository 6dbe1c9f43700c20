//! Jobs end to end: submit, deliver, retry, dead-letter, survive crashes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use demi_e2e::grpc::{self, admin_pb as pb};
use demi_e2e::{Conductor, alive, journal, journal_completed, rss_kib};
use nix::sys::signal::Signal;
use tonic::Code;

fn plugin(name: &str, extra: &str) -> String {
    format!("[plugins.{name}]\ncommand = \"{{echo}}\"\nshutdown_grace = \"2s\"\n{extra}\n")
}

fn job(plugin: &str, kind: &str, payload: &str) -> pb::SubmitRequest {
    pb::SubmitRequest {
        plugin: plugin.into(),
        kind: kind.into(),
        payload: payload.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn completed() -> i32 {
    pb::job_outcome::Status::Completed as i32
}

fn dead_lettered() -> i32 {
    pb::job_outcome::Status::DeadLettered as i32
}

#[test]
fn submit_and_wait_answers_and_the_plugin_sees_the_submitters_trace() {
    let conductor = Conductor::start(&plugin("echo", "replicas = 2"));
    conductor.wait_serving(0, "echo", 1);
    grpc::runtime().block_on(async {
        let mut api = grpc::admin(&conductor.api_socket()).await;
        let outcome = api
            .submit_and_wait(job("echo", "echo", "hello"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (outcome.status, outcome.payload.as_slice(), outcome.attempts),
            (completed(), &b"hello"[..], 1)
        );

        // The conductor continues the submitter's trace down to the plugin.
        let mut request = tonic::Request::new(job("echo", "trace", ""));
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().unwrap());
        let outcome = api.submit_and_wait(request).await.unwrap().into_inner();
        assert_eq!(
            String::from_utf8_lossy(&outcome.payload),
            "0af7651916cd43dd8448eb211c80319c"
        );

        let missing = api.submit(job("nope", "", "")).await.unwrap_err();
        assert_eq!(missing.code(), Code::NotFound);
        assert!(missing.message().contains("\"nope\""));
        let unnamed = api.submit(job("", "", "")).await.unwrap_err();
        assert_eq!(unnamed.code(), Code::InvalidArgument);
        assert!(unnamed.message().starts_with("plugin:"));
    });
}

#[test]
fn permanent_failures_are_dead_lettered_survive_a_restart_and_replay_after_a_fix() {
    let journal_file = tempfile::NamedTempFile::new().unwrap();
    let worker = |extra: &str| {
        plugin(
            "worker",
            &format!(
                "args = [\"--journal\", \"{}\"{extra}]",
                journal_file.path().display()
            ),
        )
    };
    let conductor = Conductor::start(&worker(", \"--fail-permanent\", \"1.0\""));
    conductor.wait_serving(0, "worker", 0);
    let rt = grpc::runtime();
    let ids: Vec<String> = rt.block_on(async {
        let mut api = grpc::admin(&conductor.api_socket()).await;
        let mut ids = Vec::new();
        for i in 0..5 {
            let outcome = api
                .submit_and_wait(job("worker", "k", &format!("job {i}")))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(outcome.status, dead_lettered());
            assert_eq!(outcome.attempts, 1, "a permanent failure is not retried");
            assert!(
                outcome.errors[0].contains("injected permanent failure"),
                "{:?}",
                outcome.errors
            );
            ids.push(outcome.job_id);
        }
        ids
    });
    let listed = String::from_utf8_lossy(&conductor.cli(&["dlq", "list"]).stdout).into_owned();
    assert_eq!(listed.lines().count(), 5, "{listed}");
    // A dead-lettered job's queue wait counts like an answered one's.
    let scrape = conductor.scrape();
    let labels = [("plugin", "worker")];
    assert_eq!(
        demi_e2e::series(&scrape, "demi_jobs_dead_lettered_total", &labels),
        Some(5.0),
        "{scrape}"
    );
    assert_eq!(
        demi_e2e::series(&scrape, "demi_job_queue_wait_seconds_count", &labels),
        Some(5.0),
        "{scrape}"
    );
    let shown =
        String::from_utf8_lossy(&conductor.cli(&["dlq", "show", &ids[0]]).stdout).into_owned();
    assert!(
        shown.contains("payload  job 0") && shown.contains("error    attempt 1 on worker-0"),
        "{shown}"
    );

    // The dead letters survive a restart of the conductor.
    conductor.signal(Signal::SIGTERM);
    let mut conductor = conductor;
    conductor.wait_exit();
    let conductor = conductor.restart();
    conductor.wait_serving(0, "worker", 0);
    let listed = String::from_utf8_lossy(&conductor.cli(&["dlq", "list"]).stdout).into_owned();
    assert_eq!(listed.lines().count(), 5, "after restart: {listed}");

    // Fix the worker, replay, and every job completes.
    conductor.write_plugins(&worker(""));
    let reload = conductor.cli(&["reload"]);
    assert!(
        reload.status.success(),
        "{}",
        String::from_utf8_lossy(&reload.stderr)
    );
    let replay = conductor.cli(&["dlq", "replay", "--all"]);
    assert!(String::from_utf8_lossy(&replay.stdout).contains("replayed 5 jobs"));
    demi_e2e::eventually("the replayed jobs to complete", || {
        let done = journal_completed(journal_file.path());
        ids.iter().all(|id| done.contains(id))
    });
    let listed = conductor.cli(&["dlq", "list"]);
    assert!(
        listed.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&listed.stdout)
    );
}

#[test]
fn a_full_queue_answers_resource_exhausted_at_once_and_memory_stays_bounded() {
    let conductor = Conductor::start(&plugin(
        "slow",
        "args = [\"--delay\", \"30s\"]\n[plugins.slow.dispatch]\nqueue_capacity = 50\nmax_in_flight = 2\nmax_in_flight_per_replica = 2",
    ));
    conductor.wait_serving(0, "slow", 0);
    grpc::runtime().block_on(async {
        let mut api = grpc::admin(&conductor.api_socket()).await;
        let mut accepted = 0;
        let mut refused = None;
        for i in 0..100 {
            match api.submit(job("slow", "k", &i.to_string())).await {
                Ok(_) => accepted += 1,
                Err(status) => {
                    refused = Some(status);
                    break;
                }
            }
        }
        let refused = refused.expect("the queue filled up");
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(
            refused.message().contains("50 jobs waiting"),
            "{}",
            refused.message()
        );
        // 50 queued, 2 in flight, and the one waiting for the bulkhead.
        assert!((50..=53).contains(&accepted), "{accepted}");

        // A flood of refused submissions leaves memory where it was.
        let before = rss_kib(conductor.pid());
        let started = Instant::now();
        for i in 0..20_000 {
            let status = api
                .submit(job("slow", "k", &format!("flood {i}")))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::ResourceExhausted);
        }
        let after = rss_kib(conductor.pid());
        eprintln!(
            "20,000 refusals in {:?}; RSS {before} KiB -> {after} KiB",
            started.elapsed()
        );
        assert!(
            after < before + 16 * 1024,
            "RSS grew from {before} KiB to {after} KiB"
        );
    });
}

#[test]
fn a_sigkilled_conductor_delivers_every_accepted_job_after_its_restart() {
    let journal_file = tempfile::NamedTempFile::new().unwrap();
    let conductor = Conductor::start(&plugin(
        "worker",
        &format!(
            "replicas = 2\nargs = [\"--delay\", \"20ms\", \"--journal\", \"{}\"]\n[plugins.worker.dispatch]\nmax_in_flight = 4",
            journal_file.path().display()
        ),
    ));
    conductor.wait_serving(0, "worker", 1);
    let ids: Vec<String> = grpc::runtime().block_on(async {
        let mut api = grpc::admin(&conductor.api_socket()).await;
        let mut ids = Vec::new();
        for i in 0..1000 {
            ids.push(
                api.submit(job("worker", "k", &i.to_string()))
                    .await
                    .unwrap()
                    .into_inner()
                    .job_id,
            );
        }
        ids
    });
    let done_before = journal(journal_file.path()).len();
    conductor.signal(Signal::SIGKILL);
    assert!(
        done_before < 1000,
        "the kill must come while jobs are unfinished ({done_before} done)"
    );
    let conductor = conductor.restart();
    let (_, requeued) = conductor.wait_for(0, "re-queueing", |e| {
        e["message"] == "re-queueing jobs accepted before the last stop"
    });
    eprintln!(
        "{done_before} jobs done before the SIGKILL, {} re-queued after it",
        requeued["jobs"]
    );

    demi_e2e::eventually("every accepted job to complete", || {
        let done = journal_completed(journal_file.path());
        ids.iter().all(|id| done.contains(id))
    });
    let listed = conductor.cli(&["dlq", "list"]);
    assert!(listed.stdout.is_empty());
}

#[test]
fn ten_thousand_jobs_under_chaos_are_all_accounted_for() {
    let journal_file = tempfile::NamedTempFile::new().unwrap();
    let conductor = Conductor::start(&plugin(
        "worker",
        &format!(
            "replicas = 4\nargs = [\"--journal\", \"{}\"]\n\
             [plugins.worker.restart]\ninitial_delay = \"10ms\"\nmax_delay = \"100ms\"\nstart_limit_burst = 10000\n\
             [plugins.worker.dispatch]\nmax_attempts = 20\nattempt_timeout = \"5s\"\nretry_initial = \"5ms\"\nretry_max = \"100ms\"",
            journal_file.path().display()
        ),
    ));
    for i in 0..4 {
        conductor.wait_serving(0, "worker", i);
    }
    let conductor = Arc::new(conductor);
    let stop = Arc::new(AtomicBool::new(false));
    let chaos = {
        let (conductor, stop) = (conductor.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut kills = 0;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let live: Vec<u32> = conductor
                    .spawned_pids()
                    .into_iter()
                    .filter(|p| alive(*p))
                    .collect();
                if !live.is_empty() {
                    let pid = live[fastrand::usize(..live.len())];
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        Signal::SIGKILL,
                    );
                    kills += 1;
                }
            }
            kills
        })
    };
    let started = Instant::now();
    let outcomes: Vec<pb::JobOutcome> = grpc::runtime().block_on(async {
        let api = grpc::admin(&conductor.api_socket()).await;
        let mut tasks = tokio::task::JoinSet::new();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        for _ in 0..64 {
            let (mut api, next) = (api.clone(), next.clone());
            tasks.spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= 10_000 {
                        return mine;
                    }
                    loop {
                        match api
                            .submit_and_wait(job("worker", "k", &i.to_string()))
                            .await
                        {
                            Ok(outcome) => {
                                mine.push(outcome.into_inner());
                                break;
                            }
                            // Not accepted: back off and submit again.
                            Err(status) if status.code() == Code::ResourceExhausted => {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Err(status) => panic!("job {i}: {status}"),
                        }
                    }
                }
            });
        }
        let mut all = Vec::new();
        while let Some(mine) = tasks.join_next().await {
            all.extend(mine.unwrap());
        }
        all
    });
    stop.store(true, Ordering::Relaxed);
    let kills = chaos.join().unwrap();

    let completed_jobs = outcomes.iter().filter(|o| o.status == completed()).count();
    let dead = outcomes
        .iter()
        .filter(|o| o.status == dead_lettered())
        .count();
    eprintln!(
        "10,000 jobs in {:?} with {kills} replicas killed: {completed_jobs} completed, {dead} dead-lettered",
        started.elapsed()
    );
    assert_eq!(
        completed_jobs + dead,
        10_000,
        "completed + dead-lettered = accepted"
    );
    let unique: BTreeSet<&str> = outcomes.iter().map(|o| o.job_id.as_str()).collect();
    assert_eq!(unique.len(), 10_000, "no job missing, none answered twice");
    assert!(kills >= 3, "the chaos really happened ({kills} kills)");

    // Every delivery the replicas saw: a second delivery of a job is a
    // retry, same id with a higher attempt number, never a copy.
    let mut deliveries: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (id, attempt, _) in journal(journal_file.path()) {
        deliveries.entry(id).or_default().push(attempt);
    }
    let mut retried = 0;
    for (id, attempts) in &deliveries {
        let distinct: BTreeSet<u32> = attempts.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            attempts.len(),
            "job {id} delivered twice as attempt {attempts:?}"
        );
        retried += usize::from(attempts.len() > 1);
    }
    eprintln!("{retried} jobs delivered more than once (retries after a kill)");
}

#[test]
fn a_plugin_whose_jobs_hang_does_not_slow_another_plugins_jobs() {
    let conductor = Conductor::start(&format!(
        "{}{}",
        plugin(
            "stuck",
            "replicas = 2\nargs = [\"--hang-kind\", \"hang\"]\n[plugins.stuck.dispatch]\nmax_in_flight = 32\nqueue_capacity = 1000\nattempt_timeout = \"1h\""
        ),
        plugin("quick", "replicas = 2"),
    ));
    conductor.wait_serving(0, "stuck", 1);
    conductor.wait_serving(0, "quick", 1);
    grpc::runtime().block_on(async {
        let mut api = grpc::admin(&conductor.api_socket()).await;
        let median = |mut v: Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let mut measure = async |n: usize| {
            let mut samples = Vec::with_capacity(n);
            for i in 0..n {
                let started = Instant::now();
                let outcome = api.submit_and_wait(job("quick", "k", &i.to_string())).await.unwrap().into_inner();
                assert_eq!(outcome.status, completed());
                samples.push(started.elapsed());
            }
            median(samples)
        };
        measure(50).await;
        let idle = measure(300).await;

        let mut flood = grpc::admin(&conductor.api_socket()).await;
        for i in 0..500 {
            flood.submit(job("stuck", "hang", &i.to_string())).await.unwrap();
        }
        let busy = measure(300).await;
        eprintln!("quick's median latency: {idle:?} with stuck idle, {busy:?} with stuck's 32 slots hung and 468 jobs queued");
        assert!(busy < idle * 2, "{busy:?} vs {idle:?}");
    });
    let scrape = conductor.scrape();
    assert_eq!(
        demi_e2e::series(&scrape, "demi_jobs_in_flight", &[("plugin", "stuck")]),
        Some(32.0),
        "the bulkhead holds"
    );
}

#[test]
fn a_platform_plugin_hands_jobs_to_a_worker_pool_and_gets_the_answers_back() {
    let journal_file = tempfile::NamedTempFile::new().unwrap();
    let conductor = Conductor::start(&format!(
        "{}{}",
        plugin(
            "platform",
            "args = [\"--forward-to\", \"workers\"]\nsubmits_to = [\"workers\"]"
        ),
        plugin(
            "workers",
            &format!(
                "replicas = 3\nargs = [\"--journal\", \"{}\"]",
                journal_file.path().display()
            )
        ),
    ));
    conductor.wait_serving(0, "platform", 0);
    for i in 0..3 {
        conductor.wait_serving(0, "workers", i);
    }
    grpc::runtime().block_on(async {
        let mut api = grpc::admin(&conductor.api_socket()).await;
        for i in 0..20 {
            let outcome = api
                .submit_and_wait(job("platform", "echo", &format!("req {i}")))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(outcome.status, completed());
            assert_eq!(
                String::from_utf8_lossy(&outcome.payload),
                format!("req {i}")
            );
        }
        // One trace from the submitter through the platform to a worker.
        let mut request = tonic::Request::new(job("platform", "trace", ""));
        request.metadata_mut().insert(
            "traceparent",
            "00-11111111111111112222222222222222-3333333333333333-01"
                .parse()
                .unwrap(),
        );
        let outcome = api.submit_and_wait(request).await.unwrap().into_inner();
        assert_eq!(
            String::from_utf8_lossy(&outcome.payload),
            "11111111111111112222222222222222"
        );
    });
    // The workers did the work (platform jobs are not journaled).
    let worked = journal(journal_file.path())
        .iter()
        .filter(|(_, _, o)| o == "ok")
        .count();
    assert_eq!(worked, 20);
}

#[test]
fn submit_and_wait_with_every_replica_stopped_answers_unavailable_and_the_job_waits() {
    let journal_file = tempfile::NamedTempFile::new().unwrap();
    let conductor = Conductor::start(&plugin(
        "worker",
        &format!(
            "replicas = 2\nargs = [\"--journal\", \"{}\"]\n\
             [plugins.worker.dispatch]\nwait_without_replicas = \"1s\"",
            journal_file.path().display()
        ),
    ));
    conductor.wait_serving(0, "worker", 0);
    conductor.wait_serving(0, "worker", 1);
    let stopped = conductor.cli(&["stop", "worker"]);
    assert!(stopped.status.success());
    let rt = grpc::runtime();
    let refused = rt.block_on(async {
        let mut api = grpc::admin(&conductor.api_socket()).await;
        api.submit_and_wait(job("worker", "k", "later"))
            .await
            .expect_err("no replica to answer")
    });
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let message = refused.message();
    assert!(
        message.contains("no replica of \"worker\" has been live for 1s"),
        "{message}"
    );
    // The answer names the job, which stays queued.
    let id = message
        .split_whitespace()
        .find(|w| w.len() == 32 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no job id in {message:?}"))
        .to_owned();
    assert!(journal(journal_file.path()).is_empty(), "not delivered yet");

    let cursor = conductor.cursor();
    assert!(conductor.cli(&["start", "worker"]).status.success());
    conductor.wait_serving(cursor, "worker", 0);
    demi_e2e::eventually("the queued job to complete", || {
        journal_completed(journal_file.path()).contains(&id)
    });
}

/// A tmpfs of `size`, unmounted when dropped: a disk that fills.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(mounted.success(), "mount a tmpfs (tests run as root)");
        Self(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// A full disk refuses the next job as RESOURCE_EXHAUSTED (what a client
/// backs off on, as for a full queue), naming the store, and loses none
/// accepted before it: each is still there, and the conductor serves on.
#[test]
fn a_full_disk_refuses_new_jobs_as_resource_exhausted_and_keeps_those_accepted() {
    let disk = SmallDisk::mount("3m");
    let conductor = Conductor::builder()
        .conductor(&format!("state_dir = \"{}\"", disk.0.path().display()))
        .start(&plugin("stuck", "args = [\"--hang-kind\", \"hang\"]"));
    conductor.wait_serving(0, "stuck", 0);
    let store = disk.0.path().join("jobs.db");
    grpc::runtime().block_on(async {
        let mut api = grpc::admin(&conductor.api_socket()).await;
        let payload = vec![b'x'; 256 << 10];
        let mut accepted = Vec::new();
        let refused = loop {
            let mut request = job("stuck", "hang", "");
            request.payload = payload.clone();
            match api.submit(request).await {
                Ok(receipt) => accepted.push(receipt.into_inner().job_id),
                Err(status) => break status,
            }
            assert!(accepted.len() < 64, "3 MB never filled");
        };
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(
            refused.message().contains(&store.display().to_string())
                && refused.message().contains("disk is full"),
            "{refused:?}"
        );
        assert!(accepted.len() >= 2, "{} accepted", accepted.len());
        for id in &accepted {
            let found = api
                .get_job(pb::GetJobRequest { job_id: id.clone() })
                .await
                .unwrap()
                .into_inner();
            assert!(
                [
                    pb::job_state::State::Queued as i32,
                    pb::job_state::State::InFlight as i32
                ]
                .contains(&found.state),
                "{id}: {found:?}"
            );
        }
    });
    demi_e2e::ok(conductor.cli(&["status"]));
}

/// A job too big for a plugin to receive (4 MiB is what a gRPC server
/// takes in one message) is refused at Submit as INVALID_ARGUMENT naming
/// the limit, instead of being accepted and then failing at every replica
/// (each failure ended that replica's job stream); one just under the
/// bound is answered whole.
#[test]
fn a_job_too_big_for_a_plugin_is_refused_at_submit_and_one_just_under_is_answered() {
    let conductor = Conductor::start(&plugin("echo", "replicas = 2"));
    conductor.wait_serving(0, "echo", 1);
    grpc::runtime().block_on(async {
        let mut api = grpc::admin(&conductor.api_socket()).await;
        let mut request = job("echo", "echo", "");
        request.payload = vec![b'x'; (4 << 20) - 34];
        let refused = api.submit(request).await.unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().contains("payload") && refused.message().contains("4 MiB"),
            "{refused:?}"
        );

        let mut request = job("echo", "echo", "");
        request.payload = vec![b'y'; (4 << 20) - 300];
        let outcome = api.submit_and_wait(request).await.unwrap().into_inner();
        assert_eq!(
            (outcome.status, outcome.payload.len(), outcome.attempts),
            (completed(), (4 << 20) - 300, 1)
        );
    });
}

/// An answer larger than a conductor takes in one message (4 MiB) fails
/// its own job at its first attempt, naming its size, instead of ending
/// the replica's job stream: the job in flight beside it on that stream
/// is neither failed nor delivered again. One just under is answered.
#[test]
fn an_answer_too_big_fails_its_own_job_and_spares_the_others_on_its_stream() {
    let conductor = Conductor::start(&plugin("echo", "args = [\"--hang-kind\", \"hang\"]"));
    conductor.wait_serving(0, "echo", 0);
    grpc::runtime().block_on(async {
        let mut api = grpc::admin(&conductor.api_socket()).await;
        let hung = api
            .submit(job("echo", "hang", ""))
            .await
            .unwrap()
            .into_inner()
            .job_id;
        let in_flight = |found: &pb::JobState| {
            (found.state, found.attempts) == (pb::job_state::State::InFlight as i32, 1)
        };
        let watcher = api.clone();
        let get = |id: &str| {
            let request = pb::GetJobRequest { job_id: id.into() };
            let mut api = watcher.clone();
            async move { api.get_job(request).await.unwrap().into_inner() }
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !in_flight(&get(&hung).await) {
            assert!(Instant::now() < deadline, "the hanging job never went out");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let inflate = |bytes: usize| {
            let mut request = job("echo", "inflate", "");
            request.attributes.insert("bytes".into(), bytes.to_string());
            request
        };
        let outcome = api
            .submit_and_wait(inflate(5 << 20))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (outcome.status, outcome.attempts),
            (dead_lettered(), 1),
            "{:?}",
            outcome.errors
        );
        assert!(
            outcome.errors[0].contains(&(5 << 20).to_string())
                && outcome.errors[0].contains("4 MiB"),
            "{:?}",
            outcome.errors
        );
        let outcome = api
            .submit_and_wait(inflate((4 << 20) - 100))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (outcome.status, outcome.payload.len(), outcome.attempts),
            (completed(), (4 << 20) - 100, 1)
        );
        let found = get(&hung).await;
        assert!(in_flight(&found), "{found:?}");
    });
}
