//! Supervision end to end: real conductor, real echo processes, real gRPC.

use std::time::Duration;

use demi_e2e::grpc::{self, pb};
use demi_e2e::{Conductor, alive, group_members, signal_pid, timestamp_ms, wait_all_gone};
use nix::sys::signal::Signal;

const SERVING: i32 = 1;

fn echo_plugin(name: &str, replicas: u32, extra: &str) -> String {
    format!(
        "[plugins.{name}]\ncommand = \"{{echo}}\"\nreplicas = {replicas}\nshutdown_grace = \"2s\"\n{extra}\n"
    )
}

#[test]
fn sigkill_restarts_with_growing_jittered_delays() {
    let conductor = Conductor::start(&echo_plugin(
        "echo",
        1,
        "[plugins.echo.restart]\ninitial_delay = \"200ms\"\nmax_delay = \"800ms\"\n\
         multiplier = 2.0\njitter = 0.2\nreset_after = \"1500ms\"\nstart_limit_burst = 100\n",
    ));
    let (mut cursor, mut pid) = conductor.wait_serving(0, "echo", 0);
    let mut delays = Vec::new();
    let mut gaps = Vec::new();
    for _ in 0..6 {
        signal_pid(pid, Signal::SIGKILL);
        let (at, exited) = conductor.wait_event(cursor, "echo", "instance exited");
        assert_eq!(exited["reason"], "signal SIGKILL");
        let (_, scheduled) = conductor.wait_event(at, "echo", "restart scheduled");
        let (spawned_at, spawned) = conductor.wait_event(at, "echo", "instance spawned");
        delays.push(scheduled["delay_ms"].as_u64().unwrap());
        gaps.push(timestamp_ms(&spawned) - timestamp_ms(&exited));
        let (next, new_pid) = conductor.wait_serving(spawned_at, "echo", 0);
        assert_ne!(new_pid, pid, "a new process serves");
        assert!(!alive(pid));
        (cursor, pid) = (next, new_pid);
    }
    eprintln!("delays {delays:?} ms, measured exit→spawn gaps {gaps:?} ms");
    // First crash: at once. Then 200, 400, 800 (capped), each ±20 %.
    assert_eq!(delays[0], 0);
    for (delay, base) in delays[1..4].iter().zip([200.0, 400.0, 800.0]) {
        let d = *delay as f64;
        assert!(
            d >= base * 0.8 - 1.0 && d <= (base * 1.2).min(800.0),
            "{delays:?}"
        );
    }
    assert!(
        delays[1] < delays[2] && delays[2] < delays[3],
        "growing: {delays:?}"
    );
    assert!(delays[3..].iter().all(|d| *d <= 800), "capped: {delays:?}");
    let exact = [0, 200, 400, 800, 800, 800];
    assert_ne!(delays, exact, "jittered");
    // The restart really waited its delay (and no tick added more than a
    // little scheduling noise on two busy cores).
    for (gap, delay) in gaps.iter().zip(&delays) {
        assert!(*gap + 2.0 >= *delay as f64, "gap {gap} < delay {delay}");
    }
}

#[test]
fn a_run_longer_than_reset_after_forgets_earlier_crashes() {
    // Every run outlasts 1 ms (a start alone takes longer), so no crash
    // is ever "in a row": each restart is the immediate first one. The
    // threshold itself is unit-tested in supervisor::restarts.
    let conductor = Conductor::start(&echo_plugin(
        "echo",
        1,
        "[plugins.echo.restart]\ninitial_delay = \"200ms\"\nreset_after = \"1ms\"\n\
         start_limit_burst = 100\n",
    ));
    let (mut cursor, mut pid) = conductor.wait_serving(0, "echo", 0);
    for _ in 0..3 {
        signal_pid(pid, Signal::SIGKILL);
        let (at, _) = conductor.wait_event(cursor, "echo", "instance exited");
        let (_, scheduled) = conductor.wait_event(at, "echo", "restart scheduled");
        assert_eq!(scheduled["delay_ms"], 0);
        assert_eq!(scheduled["attempt"], 1);
        (cursor, pid) = conductor.wait_serving(at, "echo", 0);
    }
}

#[test]
fn a_stopped_replica_trips_the_breaker_and_is_replaced() {
    let conductor = Conductor::start(&echo_plugin(
        "echo",
        2,
        "[plugins.echo.health]\ninterval = \"200ms\"\ntimeout = \"100ms\"\nfailure_threshold = 3\n",
    ));
    let (_, pid) = conductor.wait_serving(0, "echo", 0);
    let (cursor, other) = conductor.wait_serving(0, "echo", 1);
    signal_pid(pid, Signal::SIGSTOP);

    let (at, tripped) = conductor.wait_event(cursor, "echo", "breaker tripped");
    assert_eq!(tripped["pid"], pid);
    assert_eq!(tripped["span"]["instance"], 0);
    let failures = conductor
        .events()
        .iter()
        .skip(cursor)
        .filter(|e| e["message"] == "health check failed" && e["pid"] == pid)
        .count();
    assert_eq!(failures, 3, "threshold of 3 consecutive failed checks");
    let (at, exited) = conductor.wait_event(at, "echo", "instance exited");
    assert_eq!(exited["pid"], pid);
    assert_eq!(
        exited["reason"], "signal SIGKILL",
        "a stopped process only dies by SIGKILL"
    );
    let (_, new_pid) = conductor.wait_serving(at, "echo", 0);
    assert_ne!(new_pid, pid);
    assert!(!alive(pid));
    // The other replica never noticed.
    assert!(alive(other));
    assert_eq!(conductor.count("echo", "instance spawned"), 3);
}

#[test]
fn exit_78_fails_without_restart_and_a_crash_loop_hits_the_start_limit() {
    let conductor = Conductor::start(&format!(
        "{}{}{}",
        echo_plugin("config-error", 1, "args = [\"--exit-code\", \"78\"]"),
        echo_plugin(
            "crasher",
            1,
            "args = [\"--exit-code\", \"3\"]\n[plugins.crasher.restart]\n\
             initial_delay = \"10ms\"\nstart_limit_burst = 4\nstart_limit_interval = \"30s\"\n"
        ),
        echo_plugin("steady", 1, ""),
    ));
    let (_, steady) = conductor.wait_serving(0, "steady", 0);

    let (_, failed) = conductor.wait_event(0, "config-error", "instance failed");
    let reason = failed["reason"].as_str().unwrap();
    assert!(reason.contains("code 78"), "{reason}");
    let (_, failed) = conductor.wait_event(0, "crasher", "instance failed");
    let reason = failed["reason"].as_str().unwrap();
    assert!(
        reason.contains("start limit hit: 4 starts within 30s"),
        "{reason}"
    );
    assert_eq!(conductor.count("crasher", "instance spawned"), 4);

    // Failed is final (the machine's tests show nothing but an operator
    // moves it): both say so, with the starts they had.
    for (plugin, spawned) in [("config-error", 1), ("crasher", 4)] {
        let status = demi_e2e::json(conductor.cli(&["status", plugin, "--json"]));
        assert_eq!(status[0]["instances"][0]["state"], "failed", "{status}");
        assert_eq!(
            status[0]["instances"][0]["restarts"],
            spawned - 1,
            "{status}"
        );
        assert_eq!(conductor.count(plugin, "instance spawned"), spawned);
    }
    // One plugin's failure touched nobody else.
    assert!(alive(steady));
    assert_eq!(conductor.count("steady", "instance spawned"), 1);
    let rt = grpc::runtime();
    rt.block_on(async {
        let channel = grpc::connect(&conductor.socket("steady", 0)).await;
        assert_eq!(grpc::health(&channel, "steady").await.unwrap(), SERVING);
        // The conductor says it is degraded, and stays SERVING itself.
        let channel = grpc::connect(&conductor.api_socket()).await;
        assert_eq!(grpc::health(&channel, "").await.unwrap(), SERVING);
        let mut api = demi_e2e::grpc::admin(&conductor.api_socket()).await;
        let listed = api
            .list_plugins(demi_e2e::grpc::admin_pb::ListPluginsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.degraded, ["config-error", "crasher"]);
    });
    let table = demi_e2e::ok(conductor.cli(&["status"]));
    let first = table.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("conductor: degraded: config-error (failed: instance 0); crasher"),
        "{table}"
    );
    let scrape = conductor.scrape();
    assert_eq!(demi_e2e::series(&scrape, "demi_degraded", &[]), Some(1.0));
    assert_eq!(
        demi_e2e::series(&scrape, "demi_plugin_degraded", &[("plugin", "steady")]),
        Some(0.0)
    );
}

#[test]
fn a_protocol_mismatch_fails_naming_both_versions() {
    let conductor = Conductor::start(&echo_plugin(
        "future",
        1,
        "args = [\"--claim-protocol\", \"9\"]",
    ));
    let (_, failed) = conductor.wait_event(0, "future", "instance failed");
    assert_eq!(
        failed["reason"],
        "protocol version mismatch: plugin answered 9, conductor accepts [1]"
    );
    let status = demi_e2e::json(conductor.cli(&["status", "future", "--json"]));
    assert_eq!(status[0]["instances"][0]["state"], "failed", "{status}");
    assert_eq!(status[0]["instances"][0]["restarts"], 0, "not restarted");
    assert_eq!(conductor.count("future", "instance spawned"), 1);
}

#[test]
fn sigterm_stops_everything_and_exits_zero() {
    let mut conductor = Conductor::start(&echo_plugin("echo", 3, "args = [\"--fork\", \"2\"]"));
    for i in 0..3 {
        conductor.wait_serving(0, "echo", i);
    }
    let pids = conductor.spawned_pids();
    assert_eq!(pids.len(), 3);
    for pid in &pids {
        assert_eq!(
            group_members(*pid).len(),
            3,
            "leader and two forked helpers"
        );
    }
    conductor.signal(Signal::SIGTERM);
    let status = conductor.wait_exit();
    assert_eq!(status.code(), Some(0), "{status:?}");
    // The plugins, and the helpers they forked into their groups.
    for pid in &pids {
        assert!(!alive(*pid), "plugin {pid} survived");
        assert_eq!(group_members(*pid), Vec::<u32>::new(), "group of {pid}");
    }
    assert_eq!(conductor.count("echo", "instance stopped"), 3);
}

#[test]
fn sigkill_of_the_conductor_takes_every_plugin_along_within_two_seconds() {
    let mut conductor = Conductor::start(&echo_plugin("echo", 3, ""));
    for i in 0..3 {
        conductor.wait_serving(0, "echo", i);
    }
    let pids = conductor.spawned_pids();
    conductor.signal(Signal::SIGKILL);
    conductor.wait_exit();
    let took = wait_all_gone(&pids, Duration::from_secs(2))
        .unwrap_or_else(|left| panic!("still running 2 s after SIGKILL: {left:?}"));
    eprintln!(
        "all {} plugins gone {took:?} after the conductor's SIGKILL",
        pids.len()
    );
}

#[test]
fn describe_and_handle_answer_on_the_instance_socket() {
    let conductor = Conductor::start(&echo_plugin("echo", 1, ""));
    conductor.wait_serving(0, "echo", 0);
    let rt = grpc::runtime();
    rt.block_on(async {
        let channel = grpc::connect(&conductor.socket("echo", 0)).await;
        assert_eq!(grpc::health(&channel, "").await.unwrap(), SERVING);
        assert_eq!(grpc::health(&channel, "echo").await.unwrap(), SERVING);
        let mut client = pb::plugin_client::PluginClient::new(channel);
        let description = client
            .describe(pb::DescribeRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(description.name, "echo");
        assert_eq!(description.protocol_version, 1);
        assert_eq!(description.capabilities, ["jobs"]);
        let result = client
            .handle(pb::Job {
                id: "job-1".into(),
                kind: "echo".into(),
                payload: b"hello".to_vec(),
                attempt: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(result.job_id, "job-1");
        assert_eq!(result.outcome, pb::job_result::Outcome::Ok as i32);
        assert_eq!(result.payload, b"hello");
    });
}

#[test]
fn a_plain_process_with_health_none_is_supervised_without_grpc() {
    let mut conductor = Conductor::start(
        "[plugins.plain]\ncommand = \"sleep\"\nargs = [\"1000\"]\nhealth = \"none\"\nreplicas = 2\nshutdown_grace = \"1s\"\n",
    );
    let (_, first) = conductor.wait_serving(0, "plain", 0);
    conductor.wait_serving(0, "plain", 1);
    // Liveness is the process: killed, it is replaced at once.
    let cursor = conductor.cursor();
    signal_pid(first, Signal::SIGKILL);
    let (_, second) = conductor.wait_serving(cursor, "plain", 0);
    assert_ne!(second, first);
    assert_eq!(
        conductor.count("plain", "health check failed"),
        0,
        "no gRPC checks"
    );
    // It takes no jobs.
    grpc::runtime().block_on(async {
        let mut api = grpc::admin(&conductor.api_socket()).await;
        let request = demi_e2e::grpc::admin_pb::SubmitRequest {
            plugin: "plain".into(),
            ..Default::default()
        };
        let refused = api.submit(request).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(
            refused.message().contains("health = \"none\""),
            "{}",
            refused.message()
        );
    });
    // And it stops by signal, without a Shutdown call.
    let pids = conductor.spawned_pids();
    conductor.signal(Signal::SIGTERM);
    assert_eq!(conductor.wait_exit().code(), Some(0));
    assert!(pids.iter().all(|p| !alive(*p)));
}

/// The conductor's pipe descriptors.
fn pipes_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

#[test]
fn a_process_dying_mid_line_is_heard_to_the_end_and_its_pipes_are_let_go() {
    // Each life says hello and, once `go` exists, the first five say
    // goodbye and SIGKILL themselves; the sixth stays. (The plugin's
    // folder is the config's.)
    let script = "n=$(cat lives 2>/dev/null || echo 0); echo $((n + 1)) > lives; \
                  echo \"life $$\"; while [ ! -e go ]; do sleep 0.02; done; \
                  if [ $n -lt 5 ]; then echo \"bye $$\"; kill -9 $$; fi; exec sleep 1000";
    let conductor = Conductor::start(&format!(
        "[plugins.dier]\ncommand = \"sh\"\nargs = [\"-c\", {script:?}]\nhealth = \"none\"\n\
         shutdown_grace = \"1s\"\n[plugins.dier.restart]\ninitial_delay = \"0ms\"\n\
         start_limit_burst = 100\n"
    ));
    let stand_in = |from: usize| {
        conductor.wait_for(from, "dier-0 stand-in", |e| {
            e["message"] == "stand-in ready" && e["span"]["plugin"] == "dier"
        })
    };
    let (at, first) = conductor.wait_serving(0, "dier", 0);
    stand_in(at);
    let before = pipes_of(conductor.pid());

    std::fs::write(conductor.folder().join("go"), b"").unwrap();
    let mut pids = vec![first];
    let mut at = at;
    for _ in 0..5 {
        let (next, pid) = conductor.wait_for(at + 1, "dier-0 spawned", |e| {
            e["message"] == "instance spawned" && e["span"]["plugin"] == "dier"
        });
        pids.push(pid["pid"].as_u64().unwrap() as u32);
        at = next;
    }
    let (at, last) = conductor.wait_serving(at, "dier", 0);
    assert_eq!(Some(&last), pids.last());
    stand_in(at);
    // Every life was heard, its last words too, though it died right after.
    for (life, pid) in pids.iter().enumerate() {
        let said = |message: String| {
            move |e: &serde_json::Value| {
                e["target"] == "plugin" && e["plugin"] == "dier" && e["message"] == message
            }
        };
        conductor.wait_for(0, "hello", said(format!("life {pid}")));
        if life < 5 {
            conductor.wait_for(0, "goodbye", said(format!("bye {pid}")));
        }
    }
    // And the conductor holds no more pipes than with the first life: the
    // dead ones' were let go once their successors ran.
    demi_e2e::eventually("the dead lives' pipes closed", || {
        pipes_of(conductor.pid()) <= before
    });
}
