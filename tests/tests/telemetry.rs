//! Telemetry end to end: /metrics, promtool, a real Prometheus, JSON logs.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use demi_e2e::{Conductor, WAIT, http_fetch, series, signal_pid};
use nix::sys::signal::Signal;

fn plugin(name: &str, extra: &str) -> String {
    format!("[plugins.{name}]\ncommand = \"{{echo}}\"\nshutdown_grace = \"2s\"\n{extra}\n")
}

/// Debian's prometheus package, which `make test` installs.
fn prometheus_tool(name: &str) -> PathBuf {
    let path = PathBuf::from("/usr/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: `make test` installs Debian's prometheus package",
        path.display()
    );
    path
}

fn health_checks(scrape: &str, plugin: &str) -> f64 {
    series(
        scrape,
        "health_checks_total",
        &[("platform", plugin), ("status", "serving")],
    )
    .unwrap_or(0.0)
}

#[test]
fn metrics_show_restarts_with_their_reason_and_count_health_checks() {
    let conductor = Conductor::start(&plugin(
        "echo",
        "replicas = 2\n[plugins.echo.health]\ninterval = \"200ms\"\ntimeout = \"150ms\"",
    ));
    let (_, pid) = conductor.wait_serving(0, "echo", 0);
    conductor.wait_serving(0, "echo", 1);
    let before = conductor.scrape();
    assert_eq!(
        series(&before, "demi_replicas_serving", &[("plugin", "echo")]),
        Some(2.0)
    );
    assert_eq!(
        series(
            &before,
            "demi_instance_up",
            &[("plugin", "echo"), ("instance", "0")]
        ),
        Some(1.0)
    );
    assert_eq!(
        series(&before, "demi_restarts_total", &[("plugin", "echo")]),
        None
    );

    let cursor = conductor.cursor();
    signal_pid(pid, Signal::SIGKILL);
    conductor.wait_serving(cursor, "echo", 0);
    let after = conductor.scrape();
    assert_eq!(
        series(
            &after,
            "demi_restarts_total",
            &[("plugin", "echo"), ("reason", "signal SIGKILL")]
        ),
        Some(1.0),
        "{after}"
    );
    assert_eq!(
        series(
            &after,
            "demi_instance_start_duration_seconds_count",
            &[("plugin", "echo")]
        ),
        Some(3.0)
    );

    // Periodic checks are counted, each with its duration. (One per
    // interval per instance is the runner's tick, tested on a paused clock
    // in supervisor::runner.)
    let first = health_checks(&conductor.scrape(), "echo");
    let mut last = String::new();
    demi_e2e::eventually("ten more health checks", || {
        last = conductor.scrape();
        health_checks(&last, "echo") >= first + 10.0
    });
    let counted = health_checks(&last, "echo");
    assert!(
        series(
            &last,
            "health_check_duration_seconds_count",
            &[("platform", "echo")]
        )
        .is_some_and(|n| n >= counted),
        "{last}"
    );
}

/// A scrape once echo's health checks are counted and the autoscaler has
/// a forecast (after its first fit).
fn scrape_with_every_kind(conductor: &Conductor) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let scrape = conductor.scrape();
        if health_checks(&scrape, "echo") > 0.0 && scrape.contains("demi_autoscale_forecast{") {
            return scrape;
        }
        assert!(
            Instant::now() < deadline,
            "no health check counted or no forecast yet"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An autoscaled pool with a short bucket, so its series appear quickly.
const SCALED_AUTOSCALE: &str = "[plugins.scaled.autoscale]\ncapacity = 10.0\nbucket = \"200ms\"\n\
    refit_every = \"200ms\"\nhistory = \"1m\"\nseasonal_periods = []";

#[test]
fn promtool_finds_no_problem_in_a_scrape() {
    let conductor = Conductor::start(&format!(
        "{}{}{}",
        plugin(
            "echo",
            "replicas = 2\n[plugins.echo.health]\ninterval = \"100ms\"\ntimeout = \"80ms\"\n[plugins.echo.limits]\nmemory = \"128MiB\""
        ),
        plugin(
            "crashy",
            "args = [\"--exit-code\", \"3\"]\n[plugins.crashy.restart]\nstart_limit_burst = 2"
        ),
        plugin("scaled", SCALED_AUTOSCALE),
    ));
    conductor.wait_serving(0, "echo", 1);
    conductor.wait_event(0, "crashy", "instance failed");
    // A scrape with every kind of series: wait for the first health checks.
    let scrape = scrape_with_every_kind(&conductor);
    let mut promtool = Command::new(prometheus_tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), scrape.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool ({:?}): {said}\n--- scrape:\n{scrape}",
        out.status
    );
    assert!(scrape.contains("health_checks_total{"), "{scrape}");
}

#[test]
fn a_real_prometheus_scrapes_the_restart_counter() {
    let conductor = Conductor::start(&plugin("echo", ""));
    let (at, pid) = conductor.wait_serving(0, "echo", 0);
    signal_pid(pid, Signal::SIGKILL);
    conductor.wait_serving(at + 1, "echo", 0);
    let target = conductor.metrics_addr();

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: conductor\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    /// Stops the Prometheus server however the test ends.
    struct Server(std::process::Child);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Server(
        Command::new(prometheus_tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus"),
    );

    // Poll Prometheus's query API until its scrape has landed; it answers
    // 503 until its storage is open, which is not a failure.
    let deadline = Instant::now() + WAIT * 2;
    let query = "/api/v1/query?query=demi_restarts_total%7Bplugin%3D%22echo%22%7D";
    loop {
        let answer = std::net::TcpStream::connect(&listen)
            .ok()
            .map(|_| http_fetch(&listen, query))
            .filter(|(head, _)| !head.contains(" 503 "));
        if let Some((head, answer)) = answer {
            assert!(head.contains(" 200 "), "{head}\n{answer}");
            let parsed: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
            if let Some(value) = parsed["data"]["result"][0]["value"][1].as_str() {
                assert_eq!(value, "1", "{answer}");
                assert_eq!(
                    parsed["data"]["result"][0]["metric"]["reason"],
                    "signal SIGKILL"
                );
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never reported the restart counter"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn json_logs_are_json_on_every_line_and_plugin_lines_name_their_source() {
    let mut conductor = Conductor::start(&plugin("echo", "replicas = 2"));
    conductor.wait_serving(0, "echo", 0);
    conductor.wait_serving(0, "echo", 1);
    conductor.signal(Signal::SIGTERM);
    conductor.wait_exit();
    let events = conductor.events();
    assert!(events.len() > 10);
    for event in &events {
        assert!(event.is_object(), "not a JSON object: {event}");
    }
    let plugin_lines: Vec<_> = events.iter().filter(|e| e["target"] == "plugin").collect();
    assert!(plugin_lines.len() >= 2, "echo prints a line at start");
    for line in plugin_lines {
        assert_eq!(line["plugin"], "echo", "{line}");
        assert!(
            line["instance"].as_u64().is_some() && line["pid"].as_u64().is_some(),
            "{line}"
        );
        assert!(
            line["lifecycle"].as_str().is_some_and(|l| !l.is_empty()),
            "{line}"
        );
    }
    // Every event of an instance's life carries its lifecycle id.
    let serving: Vec<_> = events
        .iter()
        .filter(|e| e["message"] == "instance serving")
        .collect();
    let ids: std::collections::BTreeSet<_> = serving
        .iter()
        .filter_map(|e| e["span"]["lifecycle"].as_str())
        .collect();
    assert_eq!(
        ids.len(),
        2,
        "one lifecycle id per instance life: {serving:?}"
    );
}

#[test]
fn every_metric_the_grafana_dashboard_queries_exists() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(demi_e2e::repo_root().join("dashboards/demi-conductor.json"))
            .unwrap(),
    )
    .expect("the dashboard is JSON");
    // Every kind of event once: a crash, a breaker trip (the first
    // instance stops answering after 300 ms), usage (read at the scrape).
    let conductor = Conductor::start(&format!(
        "{}{}{}",
        plugin(
            "echo",
            "[plugins.echo.health]\ninterval = \"100ms\"\ntimeout = \"80ms\"\n[plugins.echo.limits]\nmemory = \"64MiB\"",
        ),
        plugin(
            "hangs",
            "args = [\"--hang-after\", \"300ms\"]\n\
             [plugins.hangs.health]\ninterval = \"100ms\"\ntimeout = \"80ms\"\nfailure_threshold = 2",
        ),
        plugin("scaled", SCALED_AUTOSCALE),
    ));
    let (at, pid) = conductor.wait_serving(0, "echo", 0);
    signal_pid(pid, Signal::SIGKILL);
    conductor.wait_serving(at + 1, "echo", 0);
    conductor.wait_event(0, "hangs", "breaker tripped");
    let scrape = scrape_with_every_kind(&conductor);
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                let is_metric = word.starts_with("demi_") || word.starts_with("health_check");
                if is_metric {
                    assert!(
                        scrape.lines().any(|l| l.starts_with(word)),
                        "panel {:?} queries {word}, which the conductor does not export",
                        panel["title"]
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 15, "only {checked} metric references found");
}

/// A stdout nobody reads (a pager left open, a stalled log collector)
/// costs log lines, counted and then reported, and nothing else: with the
/// pipe and the log buffer full, the conductor still restarts a killed
/// plugin and answers its API and scrapes. Written in place, every task
/// that logged waited for the reader, and this test timed out.
#[test]
fn an_unread_stdout_costs_log_lines_not_supervision() {
    let scratch = tempfile::tempdir().expect("temp dir");
    let go = scratch.path().join("go");
    std::fs::write(&go, "").expect("write the go file");
    // Three replicas logging their output budget (1,000 lines a second
    // each) fill the pipe and the log buffer (16,384 lines) within seconds.
    let conductor = Conductor::start(&format!(
        "{}[plugins.chatty]\ncommand = \"{}\"\n\
         args = [\"--flood-stdout\", \"1\", \"--report\", \"{}\", \"--go\", \"{}\"]\n\
         jobs = false\nreplicas = 3\nshutdown_grace = \"2s\"\n",
        plugin("echo", ""),
        demi_e2e::bin("hostile_plugin").display(),
        scratch.path().join("report").display(),
        go.display(),
    ));
    let (_, pid) = conductor.wait_serving(0, "echo", 0);
    let addr = conductor.metrics_addr();
    let dropped = || {
        series(
            &demi_e2e::http_get(&addr, "/metrics"),
            "demi_log_lines_dropped_total",
            &[],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(dropped(), 0.0, "nothing lost while stdout is read");

    conductor.pause_log();
    demi_e2e::eventually("log lines dropped", || dropped() > 0.0);
    signal_pid(pid, Signal::SIGKILL);
    demi_e2e::eventually("echo restarted while stdout is unread", || {
        let status = demi_e2e::json(conductor.cli(&["status", "echo", "--json"]));
        let instance = &status[0]["instances"][0];
        instance["state"] == "serving" && instance["pid"].as_u64() != Some(u64::from(pid))
    });
    let lost = dropped();

    let from = conductor.cursor();
    conductor.resume_log();
    let (_, report) = conductor.wait_for(from, "the report of lost lines", |e| {
        e["message"] == "log lines dropped: stdout was not read fast enough"
    });
    assert_eq!(report["level"], "WARN", "{report}");
    let total = report["total"].as_f64().expect("total");
    assert!(total >= lost, "{total} reported, {lost} counted before");
}

/// `demi_jobs_in_flight` counts jobs being delivered: none on an idle
/// lane (it read 1: the lane's worker holds a bulkhead place while it
/// waits for the next job), exactly the hung ones while jobs hang.
#[test]
fn jobs_in_flight_counts_deliveries_and_reads_zero_when_idle() {
    let conductor = Conductor::start(&plugin("echo", "args = [\"--hang-kind\", \"hang\"]"));
    conductor.wait_serving(0, "echo", 0);
    let in_flight = || {
        series(
            &conductor.scrape(),
            "demi_jobs_in_flight",
            &[("plugin", "echo")],
        )
    };
    assert_eq!(in_flight(), Some(0.0), "idle");
    for kind in ["hang", "hang", "hang"] {
        demi_e2e::ok(conductor.cli(&["submit", "echo", "--kind", kind, "--payload", "x"]));
    }
    demi_e2e::eventually("three jobs in flight", || in_flight() == Some(3.0));
    let answer = demi_e2e::ok(conductor.cli(&["submit", "echo", "--payload", "quick", "--wait"]));
    assert_eq!(answer.trim(), "quick");
    assert_eq!(
        in_flight(),
        Some(3.0),
        "the hung ones, not the answered one"
    );
}
