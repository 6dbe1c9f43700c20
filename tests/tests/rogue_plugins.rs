//! Plugins that break the protocol (`rogue_plugin`, HTTP/2 by hand): a
//! socket that never speaks, health answers of garbage, without end or
//! with 4 MiB of headers, job answers of garbage, twice over, with wrong
//! tags or for deliveries never made, without end. All at once, beside a well-behaved neighbour:
//! the conductor does not panic, its memory stays bounded, it restarts or
//! retries what misbehaves, and the neighbour's checks and jobs go on as
//! before.

use std::time::{Duration, Instant};

use demi_e2e::grpc::{self, admin_pb as pb};
use demi_e2e::{Conductor, bin, rss_kib};

const HEALTH_ROGUES: [&str; 4] = ["silent", "garbage-health", "endless-health", "huge-headers"];
const JOB_ROGUES: [&str; 4] = [
    "garbage-answers",
    "duplicate-answers",
    "wrong-tags",
    "endless-answers",
];
const JOBS: usize = 40;

fn rogue(mode: &str) -> String {
    format!(
        "[plugins.{mode}]\ncommand = \"{}\"\nargs = [\"{mode}\"]\n\
         startup_timeout = \"1s\"\nshutdown_grace = \"500ms\"\n\
         [plugins.{mode}.health]\ninterval = \"500ms\"\ntimeout = \"300ms\"\n\
         [plugins.{mode}.restart]\ninitial_delay = \"100ms\"\nmax_delay = \"500ms\"\nstart_limit_burst = 1000\n\
         [plugins.{mode}.dispatch]\nmax_attempts = 2\nattempt_timeout = \"1s\"\nretry_initial = \"50ms\"\n",
        bin("rogue_plugin").display()
    )
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

#[test]
fn protocol_breaking_plugins_are_restarted_or_retried_and_nobody_else_notices() {
    let scratch = tempfile::tempdir().unwrap();
    let stderr = scratch.path().join("conductor.stderr");
    let mut plugins = "[plugins.neighbour]\ncommand = \"{echo}\"\n\
                       [plugins.neighbour.health]\ninterval = \"200ms\"\ntimeout = \"150ms\"\n\n"
        .to_owned();
    let rogues = HEALTH_ROGUES.iter().chain(&JOB_ROGUES);
    for mode in rogues {
        plugins.push_str(&rogue(mode));
    }
    let conductor = Conductor::builder()
        .log("info,demi_conductor::telemetry::recorder=trace")
        .stderr(&stderr)
        .start(&plugins);
    conductor.wait_serving(0, "neighbour", 0);
    for mode in JOB_ROGUES {
        conductor.wait_serving(0, mode, 0);
    }
    let rss_before = rss_kib(conductor.pid());
    let from = conductor.cursor();
    let started = Instant::now();

    // Jobs to the neighbour and to each job rogue, side by side.
    let outcomes: Vec<(String, pb::JobOutcome)> = grpc::runtime().block_on(async {
        let api = grpc::admin(&conductor.api_socket()).await;
        let mut calls = tokio::task::JoinSet::new();
        for target in std::iter::once("neighbour").chain(JOB_ROGUES) {
            for i in 0..JOBS {
                let mut api = api.clone();
                let request = pb::SubmitRequest {
                    plugin: target.into(),
                    kind: "k".into(),
                    payload: format!("{target} {i}").into_bytes(),
                    ..Default::default()
                };
                calls.spawn(async move {
                    let outcome = api.submit_and_wait(request).await.expect("accepted");
                    (target.to_owned(), outcome.into_inner())
                });
            }
        }
        let mut all = Vec::new();
        while let Some(done) = calls.join_next().await {
            all.push(done.unwrap());
        }
        all
    });
    // Give the health rogues time for several rounds of restarts.
    let mut rss_max = rss_kib(conductor.pid());
    while started.elapsed() < Duration::from_secs(8) {
        rss_max = rss_max.max(rss_kib(conductor.pid()));
        std::thread::sleep(Duration::from_millis(200));
    }
    let elapsed = started.elapsed().as_secs_f64();

    let of = |target: &str, status: i32| {
        outcomes
            .iter()
            .filter(|(t, o)| t == target && o.status == status)
            .count()
    };
    let completed = pb::job_outcome::Status::Completed as i32;
    let dead = pb::job_outcome::Status::DeadLettered as i32;
    assert_eq!(of("neighbour", completed), JOBS, "the neighbour's jobs");
    // Answered twice: one outcome, the right one; the second is dropped.
    assert_eq!(of("duplicate-answers", completed), JOBS);
    for (target, outcome) in &outcomes {
        if outcome.status == completed {
            assert!(
                outcome.payload.starts_with(target.as_bytes()),
                "{target}: {outcome:?}"
            );
        }
    }
    assert_eq!(of("garbage-answers", dead), JOBS, "garbage is no answer");
    assert_eq!(
        of("wrong-tags", dead),
        JOBS,
        "an answer to another delivery"
    );
    assert_eq!(of("endless-answers", dead), JOBS, "noise is no answer");

    for mode in HEALTH_ROGUES {
        assert_eq!(
            conductor.count(mode, "instance serving"),
            0,
            "{mode} passed a check"
        );
        assert!(
            conductor.count(mode, "instance spawned") >= 2,
            "{mode} was not restarted"
        );
    }

    let (took, gaps) = conductor.health_checks(from, "neighbour");
    let expected = elapsed / 0.2;
    eprintln!(
        "neighbour: {} checks in {elapsed:.1} s (p50 {:.2} ms, interval p50 {:.0} ms, max {:.0} ms); \
         conductor RSS {rss_before} KiB before, at most {rss_max} KiB",
        took.len(),
        median(&took),
        median(&gaps),
        gaps.iter().copied().fold(0.0, f64::max),
    );
    assert!(
        took.len() as f64 >= expected * 0.8,
        "the neighbour's checks thinned: {} of {expected:.0}",
        took.len()
    );
    assert!(
        rss_max < rss_before + 20 * 1024,
        "the conductor grew from {rss_before} to {rss_max} KiB"
    );
    let panics = std::fs::read_to_string(&stderr).unwrap_or_default();
    assert!(!panics.contains("panicked"), "{panics}");
}

/// A plugin's answer too big to read ends its job stream, and which
/// delivery it answered is never read: every job on the stream is
/// delivered again, the one beside it included, and none is dead-lettered
/// for another's fault.
#[test]
fn an_answer_too_big_to_read_has_every_job_on_its_stream_delivered_again() {
    let mode = "oversized-answers";
    let conductor = Conductor::start(&format!(
        "[plugins.{mode}]\ncommand = \"{}\"\nargs = [\"{mode}\"]\nshutdown_grace = \"500ms\"\n\
         [plugins.{mode}.dispatch]\nmax_attempts = 3\nattempt_timeout = \"1h\"\nretry_initial = \"50ms\"\n",
        bin("rogue_plugin").display()
    ));
    conductor.wait_serving(0, mode, 0);
    grpc::runtime().block_on(async {
        let mut api = grpc::admin(&conductor.api_socket()).await;
        let submit = |kind: &str| pb::SubmitRequest {
            plugin: mode.into(),
            kind: kind.into(),
            payload: kind.as_bytes().to_vec(),
            ..Default::default()
        };
        let hung = api
            .submit(submit("hang"))
            .await
            .unwrap()
            .into_inner()
            .job_id;
        let watcher = api.clone();
        // Waits until the hanging job is in flight at `attempt`.
        let in_flight = |attempt: u32| {
            let (mut api, id) = (watcher.clone(), hung.clone());
            async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let request = pb::GetJobRequest { job_id: id.clone() };
                    let found = api.get_job(request).await.unwrap().into_inner();
                    let state = pb::job_state::State::InFlight as i32;
                    if (found.state, found.attempts) == (state, attempt) {
                        return;
                    }
                    assert!(
                        Instant::now() < deadline && found.attempts <= attempt,
                        "not in flight at attempt {attempt}: {found:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        in_flight(1).await;
        let outcome = api.submit_and_wait(submit("k")).await.unwrap().into_inner();
        assert_eq!(
            (outcome.status, outcome.attempts, outcome.payload.as_slice()),
            (pb::job_outcome::Status::Completed as i32, 2, &b"k"[..]),
            "{:?}",
            outcome.errors
        );
        in_flight(2).await;
    });
}
