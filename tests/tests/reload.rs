//! Reload reaches every part: dispatch settings of a running plugin, a
//! removed plugin's queued jobs, and a broken file that must reach the
//! daemon to be refused.

use std::collections::BTreeSet;

use demi_e2e::grpc::{self, admin_pb as pb};
use demi_e2e::{Conductor, eventually, journal_completed, json, ok};
use tonic::Code;

type Admin = pb::conductor_client::ConductorClient<tonic::transport::Channel>;

fn plugin(name: &str, extra: &str) -> String {
    format!("[plugins.{name}]\ncommand = \"{{echo}}\"\nshutdown_grace = \"2s\"\n{extra}\n")
}

fn job(plugin: &str, payload: &str) -> pb::SubmitRequest {
    pb::SubmitRequest {
        plugin: plugin.into(),
        kind: "k".into(),
        payload: payload.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// A worker whose every job fails retryably, with fast retries.
fn failing_worker(max_attempts: u32, queue_capacity: u32) -> String {
    plugin(
        "worker",
        &format!(
            "args = [\"--fail-retryable\", \"1.0\"]\n[plugins.worker.dispatch]\n\
             max_attempts = {max_attempts}\nqueue_capacity = {queue_capacity}\n\
             retry_initial = \"1ms\"\nretry_max = \"5ms\"\n"
        ),
    )
}

#[test]
fn changed_dispatch_settings_apply_to_the_next_jobs_without_a_restart() {
    let conductor = Conductor::start(&failing_worker(2, 3));
    conductor.wait_serving(0, "worker", 0);
    let pids = conductor.pids_of("worker");
    let rt = grpc::runtime();
    let mut api = rt.block_on(grpc::admin(&conductor.api_socket()));
    let attempts = |api: &mut Admin| {
        // A full queue (jobs queued while the worker was stopped, not yet
        // taken) has room again once the first of them are out.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let outcome = loop {
            match rt.block_on(api.submit_and_wait(job("worker", "x"))) {
                Err(status)
                    if status.code() == Code::ResourceExhausted
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                answer => break answer,
            }
        }
        .unwrap_or_else(|status| panic!("no outcome: {status:?}"))
        .into_inner();
        assert_eq!(outcome.status, pb::job_outcome::Status::DeadLettered as i32);
        outcome.attempts
    };
    assert_eq!(attempts(&mut api), 2);

    // With no replica, the queue fills up to its capacity.
    ok(conductor.cli(&["stop", "worker"]));
    let fill = |api: &mut Admin, n: usize| {
        (0..n)
            .map(|i| rt.block_on(api.submit(job("worker", &format!("q{i}")))))
            .filter(Result::is_ok)
            .count()
    };
    assert_eq!(fill(&mut api, 5), 3, "queue_capacity = 3");

    conductor.write_plugins(&failing_worker(4, 6));
    let summary = ok(conductor.cli(&["reload"]));
    assert!(summary.contains("changed [\"worker\"]"), "{summary}");
    assert_eq!(
        fill(&mut api, 5),
        3,
        "three more places: queue_capacity = 6"
    );

    // Only dispatch changed: the stopped instance was not restarted.
    let status = json(conductor.cli(&["status", "worker", "--json"]));
    assert_eq!(status[0]["instances"][0]["state"], "stopped");
    assert!(pids.iter().all(|p| !demi_e2e::alive(*p as u32)));

    // Every queued job now gets the new attempt budget.
    let cursor = conductor.cursor();
    ok(conductor.cli(&["start", "worker"]));
    conductor.wait_serving(cursor, "worker", 0);
    assert_eq!(attempts(&mut api), 4);
    // The six queued jobs and the one just waited for, four attempts each.
    eventually("the queued jobs to be dead-lettered", || {
        let letters = ok(conductor.cli(&["dlq", "list"]));
        letters.lines().filter(|l| l.contains("attempts=4")).count() == 7
    });
}

#[test]
fn a_removed_plugins_queued_jobs_are_dead_lettered_and_replay_once_it_is_back() {
    let journal_file = tempfile::NamedTempFile::new().expect("journal");
    let worker = plugin(
        "worker",
        &format!(
            "args = [\"--journal\", \"{}\"]",
            journal_file.path().display()
        ),
    );
    let bystander = plugin("bystander", "");
    let conductor = Conductor::start(&format!("{worker}{bystander}"));
    conductor.wait_serving(0, "worker", 0);
    conductor.wait_serving(0, "bystander", 0);
    let bystanders = conductor.pids_of("bystander");
    ok(conductor.cli(&["stop", "worker"]));
    let rt = grpc::runtime();
    let mut api = rt.block_on(grpc::admin(&conductor.api_socket()));
    let ids: BTreeSet<String> = (0..100)
        .map(|i| {
            rt.block_on(api.submit(job("worker", &format!("job {i}"))))
                .expect("accepted")
                .into_inner()
                .job_id
        })
        .collect();
    assert_eq!(ids.len(), 100);

    conductor.write_plugins(&bystander);
    let summary = ok(conductor.cli(&["reload"]));
    assert!(summary.contains("removed [\"worker\"]"), "{summary}");
    let letters = ok(conductor.cli(&["dlq", "list"]));
    let dead: BTreeSet<String> = letters
        .lines()
        .filter(|l| l.ends_with("plugin removed"))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    assert_eq!(dead, ids, "{letters}");
    let gone = rt
        .block_on(api.submit(job("worker", "late")))
        .expect_err("no such plugin");
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    assert_eq!(conductor.pids_of("bystander"), bystanders, "untouched");

    let cursor = conductor.cursor();
    conductor.write_plugins(&format!("{worker}{bystander}"));
    ok(conductor.cli(&["reload"]));
    conductor.wait_serving(cursor, "worker", 0);
    let replayed = ok(conductor.cli(&["dlq", "replay", "--all"]));
    assert!(replayed.contains("replayed 100 jobs"), "{replayed}");
    eventually("every replayed job to complete", || {
        ids.is_subset(&journal_completed(journal_file.path()))
    });
    assert_eq!(ok(conductor.cli(&["dlq", "list"])), "");
}

#[test]
fn a_broken_file_reaches_the_daemon_which_refuses_it_and_says_every_problem() {
    let conductor = Conductor::start(&plugin("keep", "replicas = 2"));
    conductor.wait_serving(0, "keep", 0);
    conductor.wait_serving(0, "keep", 1);
    let pids = conductor.pids_of("keep");
    conductor.write_plugins(
        "[plugins.keep]\ncommand = \"{echo}\"\nreplicas = 0\n\
         [plugins.keep.dispatch]\nmax_attempts = 0\n[plugins.bad]\n",
    );
    // The operator's way: through the config file, which is broken.
    let refused = conductor.cli_through_config(&["reload"]);
    let errors = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(78), "{errors}");
    for problem in [
        "plugins.keep.replicas: must be at least 1",
        "plugins.keep.dispatch.max_attempts: must be at least 1",
        "plugins.bad.command: missing field `command`",
    ] {
        assert!(errors.contains(problem), "{problem} not in:\n{errors}");
    }
    assert_eq!(conductor.pids_of("keep"), pids, "the plugins are untouched");
}
