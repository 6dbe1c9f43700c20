//! The operator surface end to end: grpcurl through reflection, the CLI,
//! rolling restarts, scaling, reload, events and the TCP token.

use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use demi_e2e::{Conductor, WAIT, alive, json, ok, signal_pid, wait_all_gone};
use nix::sys::signal::Signal;

fn plugin(name: &str, extra: &str) -> String {
    format!("[plugins.{name}]\ncommand = \"{{echo}}\"\nshutdown_grace = \"2s\"\n{extra}\n")
}

fn health(conductor: &Conductor, service: &str) -> String {
    let request = format!("{{\"service\":\"{service}\"}}");
    let answer = json(conductor.grpcurl(&["-d", &request], &["grpc.health.v1.Health/Check"]));
    answer["status"].as_str().unwrap_or("UNKNOWN").to_owned()
}

/// Polls `health` until it reads `want` (grpcurl is a separate process:
/// there is no event to wait on from here).
fn health_becomes(conductor: &Conductor, service: &str, want: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        if health(conductor, service) == want {
            return;
        }
        assert!(Instant::now() < deadline, "{service} never became {want}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn grpcurl_lists_describes_and_checks_health_through_reflection() {
    let conductor = Conductor::start(&format!(
        "{}{}",
        plugin("echo", "replicas = 2"),
        plugin(
            "slow",
            "replicas = 2\nargs = [\"--start-delay\", \"700ms\"]"
        ),
    ));
    conductor.wait_serving(0, "echo", 1);
    conductor.wait_serving(0, "slow", 0);
    conductor.wait_serving(0, "slow", 1);

    let services = ok(conductor.grpcurl(&[], &["list"]));
    for service in [
        "demi.conductor.v1.Conductor",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            services.lines().any(|l| l == service),
            "{service} missing from:\n{services}"
        );
    }
    let described = ok(conductor.grpcurl(&[], &["describe", "demi.conductor.v1.Conductor"]));
    assert!(described.contains("rpc RestartPlugin"), "{described}");
    let described = ok(conductor.grpcurl(&[], &["describe", "demi.conductor.v1.Instance"]));
    assert!(described.contains("last_exit"), "{described}");

    assert_eq!(health(&conductor, ""), "SERVING");
    assert_eq!(health(&conductor, "echo"), "SERVING");
    health_becomes(&conductor, "slow", "SERVING");

    // Every replica killed: NOT_SERVING until one is back (each takes 0.7 s).
    for pid in conductor.pids_of("slow") {
        signal_pid(pid as u32, Signal::SIGKILL);
    }
    health_becomes(&conductor, "slow", "NOT_SERVING");
    health_becomes(&conductor, "slow", "SERVING");
    assert_eq!(
        health(&conductor, "echo"),
        "SERVING",
        "the neighbour never flinched"
    );

    let unknown = conductor.grpcurl(
        &["-d", "{\"name\":\"nope\"}"],
        &["demi.conductor.v1.Conductor/GetPlugin"],
    );
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        stderr.contains("NotFound") && stderr.contains("\"nope\""),
        "{stderr}"
    );
}

#[test]
fn grpcurl_calls_list_and_get_with_every_field() {
    let conductor = Conductor::start(&format!(
        "{}{}",
        plugin(
            "echo",
            "replicas = 2\n[plugins.echo.limits]\nmemory = \"128MiB\""
        ),
        plugin("other", ""),
    ));
    let (at, pid) = conductor.wait_serving(0, "echo", 0);
    signal_pid(pid, Signal::SIGKILL);
    conductor.wait_serving(at + 1, "echo", 0);

    let list = json(conductor.grpcurl(&[], &["demi.conductor.v1.Conductor/ListPlugins"]));
    let names: Vec<&str> = list["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["echo", "other"]);

    let echo = json(conductor.grpcurl(
        &["-d", "{\"name\":\"echo\"}"],
        &["demi.conductor.v1.Conductor/GetPlugin"],
    ));
    assert_eq!(echo["replicas"], 2);
    assert_eq!(echo["serving"], 2);
    assert_eq!(echo["healthy"], true);
    let first = &echo["instances"][0];
    assert_eq!(first["state"], "serving");
    assert!(first["pid"].as_u64().is_some_and(|p| p != u64::from(pid)));
    assert_eq!(first["breaker"], "half-open");
    assert_eq!(first["restarts"], "1", "uint64 is a string in JSON");
    assert_eq!(first["lastExit"], "signal SIGKILL");
    assert!(first["uptime"].as_str().is_some_and(|u| u.ends_with('s')));
    assert_eq!(first["confined"], true);
    assert!(first["usage"]["memoryBytes"].as_str().is_some());
    assert_eq!(first["history"][0]["reason"], "signal SIGKILL");
    assert_eq!(first["history"][0]["pid"], pid);
}

#[test]
fn the_cli_shows_status_rolls_restarts_and_scales() {
    let conductor = Conductor::start(&format!(
        "{}{}",
        plugin("echo", "replicas = 3"),
        plugin("other", "")
    ));
    for i in 0..3 {
        conductor.wait_serving(0, "echo", i);
    }
    conductor.wait_serving(0, "other", 0);

    let table = ok(conductor.cli(&["status"]));
    let mut lines = table.lines();
    assert_eq!(lines.next(), Some("conductor: ok"), "{table}");
    let host = lines.next().unwrap_or_default();
    assert!(
        host.starts_with("host: ") && host.contains(" CPUs "),
        "{table}"
    );
    assert!(lines.next().unwrap().starts_with("PLUGIN"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 4, "{table}");
    assert!(rows.iter().all(|r| r.contains("serving")), "{table}");

    // Rolling restart, as the event stream tells it.
    let before = conductor.pids_of("echo");
    let cursor = conductor.cursor();
    ok(conductor.cli(&["restart", "echo"]));
    let after = conductor.pids_of("echo");
    assert!(
        before.iter().all(|p| !after.contains(p)),
        "{before:?} -> {after:?}"
    );
    let order: Vec<(String, u64)> = conductor.events()[cursor..]
        .iter()
        .filter(|e| e["span"]["plugin"] == "echo")
        .filter(|e| {
            matches!(
                e["message"].as_str(),
                Some("instance exited" | "instance serving")
            )
        })
        .map(|e| {
            (
                e["message"].as_str().unwrap().to_owned(),
                e["span"]["instance"].as_u64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, u64)> = (0..3)
        .flat_map(|i| {
            [
                ("instance exited".to_owned(), i),
                ("instance serving".to_owned(), i),
            ]
        })
        .collect();
    assert_eq!(
        order, expected,
        "one at a time, each back before the next goes"
    );

    ok(conductor.cli(&["scale", "echo", "5"]));
    conductor.wait_serving(0, "echo", 4);
    assert_eq!(conductor.pids_of("echo").len(), 5);
    let before = conductor.pids_of("echo");
    let table = ok(conductor.cli(&["scale", "echo", "1"]));
    assert_eq!(
        table.lines().count(),
        3,
        "conductor line, header, one row: {table}"
    );
    wait_all_gone(
        &before[1..].iter().map(|p| *p as u32).collect::<Vec<_>>(),
        Duration::from_secs(5),
    )
    .expect("scaled-down instances exited");
    assert!(alive(before[0] as u32));

    let refused = conductor.cli(&["scale", "echo", "0"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("replicas"),
        "names the field"
    );
    let unknown = conductor.cli(&["restart", "nope"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no plugin named \"nope\""));

    ok(conductor.cli(&["stop", "other"]));
    assert!(ok(conductor.cli(&["status", "other"])).contains("stopped"));
    let cursor = conductor.cursor();
    ok(conductor.cli(&["start", "other"]));
    conductor.wait_serving(cursor, "other", 0);
}

#[test]
fn reload_adds_removes_and_rolls_only_what_changed() {
    let conductor = Conductor::start(&format!(
        "{}{}{}",
        plugin("keep", "replicas = 2"),
        plugin("change", "replicas = 2"),
        plugin("remove", ""),
    ));
    for (p, i) in [
        ("keep", 0),
        ("keep", 1),
        ("change", 0),
        ("change", 1),
        ("remove", 0),
    ] {
        conductor.wait_serving(0, p, i);
    }
    let keep = conductor.pids_of("keep");
    let change = conductor.pids_of("change");
    let removed = conductor.pids_of("remove");

    conductor.write_plugins(&format!(
        "{}{}{}",
        plugin("keep", "replicas = 2"),
        plugin("change", "replicas = 2\nargs = [\"--delay\", \"1ms\"]"),
        plugin("added", ""),
    ));
    let summary = ok(conductor.cli(&["reload"]));
    assert!(
        summary.contains("added [\"added\"]") && summary.contains("removed [\"remove\"]"),
        "{summary}"
    );
    assert!(
        summary.contains("changed [\"change\"]") && summary.contains("unchanged [\"keep\"]"),
        "{summary}"
    );
    assert_eq!(conductor.pids_of("keep"), keep, "untouched: same pids");
    let changed = conductor.pids_of("change");
    assert_eq!(changed.len(), 2);
    assert!(
        changed.iter().all(|p| !change.contains(p)),
        "rolled: {change:?} -> {changed:?}"
    );
    wait_all_gone(
        &removed.iter().map(|p| *p as u32).collect::<Vec<_>>(),
        Duration::from_secs(5),
    )
    .expect("removed plugin stopped");
    conductor.wait_serving(0, "added", 0);
    let gone = conductor.grpcurl(
        &["-d", "{\"name\":\"remove\"}"],
        &["demi.conductor.v1.Conductor/GetPlugin"],
    );
    assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));

    // A broken file changes nothing and says why.
    let before = json(conductor.grpcurl(&[], &["demi.conductor.v1.Conductor/GetConfig"]));
    conductor.write_plugins("[plugins.keep]\ncommand = \"{echo}\"\nreplicas = 0\n[plugins.bad]\n");
    let refused = conductor.cli(&["reload"]);
    assert_eq!(refused.status.code(), Some(78));
    let errors = String::from_utf8_lossy(&refused.stderr);
    assert!(
        errors.contains("plugins.keep.replicas") && errors.contains("plugins.bad"),
        "{errors}"
    );
    assert_eq!(conductor.pids_of("keep"), keep);
    assert_eq!(
        json(conductor.grpcurl(&[], &["demi.conductor.v1.Conductor/GetConfig"])),
        before
    );

    // SIGHUP reloads too.
    conductor.write_plugins(&format!(
        "{}{}",
        plugin("keep", "replicas = 2"),
        plugin("hup", "")
    ));
    conductor.signal(Signal::SIGHUP);
    conductor.wait_serving(0, "hup", 0);
    assert_eq!(conductor.pids_of("keep"), keep);
}

#[test]
fn the_unix_socket_is_private_and_tcp_needs_the_token() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "s3cret-token\n").unwrap();
    let conductor = Conductor::builder()
        .conductor(&format!(
            "[conductor.api]\ntcp = \"127.0.0.1:{port}\"\ntoken_file = \"{}\"\ninsecure = true",
            token.path().display()
        ))
        .start(&plugin("echo", ""));
    conductor.wait_serving(0, "echo", 0);
    // Plaintext TCP only with insecure = true, and said at every start.
    let (_, warning) = conductor.wait_for(0, "the plaintext warning", |e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("admin API listening on TCP WITHOUT TLS"))
    });
    assert_eq!(warning["level"], "WARN");
    let mode = std::fs::metadata(conductor.api_socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let addr = format!("127.0.0.1:{port}");
    let call = |extra: &[&str]| {
        std::process::Command::new(demi_e2e::grpcurl())
            .arg("-plaintext")
            .args(extra)
            .args(["-d", "{}", &addr, "demi.conductor.v1.Conductor/ListPlugins"])
            .output()
            .unwrap()
    };
    let denied = call(&[
        "-use-reflection=false",
        "-proto",
        &proto("demi/conductor/v1/conductor.proto"),
        "-import-path",
        &proto(""),
    ]);
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    let wrong = call(&["-H", "authorization: Bearer nope"]);
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("Unauthenticated"));
    let allowed = json(call(&["-H", "authorization: Bearer s3cret-token"]));
    assert_eq!(allowed["plugins"][0]["name"], "echo");
}

#[test]
fn the_tcp_api_speaks_tls_with_the_token_and_asks_for_client_certificates_when_told() {
    use demi_e2e::device::TestCa;
    let (ca, wrong) = (TestCa::new(), TestCa::new());
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path.display().to_string()
    };
    let (cert, key) = (file("api.crt", &ca.cert_pem), file("api.key", &ca.key_pem));
    let (ca_file, wrong_ca) = (
        file("ca.pem", &ca.ca_pem),
        file("wrong-ca.pem", &wrong.ca_pem),
    );
    let (client_cert, client_key) = (
        file("client.crt", &ca.client_cert_pem),
        file("client.key", &ca.client_key_pem),
    );
    let token = file("api.token", "s3cret-token\n");
    let start = |client_ca: &str| {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let conductor = Conductor::builder()
            .conductor(&format!(
                "[conductor.api]\ntcp = \"127.0.0.1:{port}\"\ntoken_file = \"{token}\"\n\
                 tls_certificate = \"{cert}\"\ntls_key = \"{key}\"\n{client_ca}"
            ))
            .start(&plugin("echo", ""));
        conductor.wait_serving(0, "echo", 0);
        (conductor, format!("127.0.0.1:{port}"))
    };
    let grpcurl = |addr: &str, flags: &[&str]| {
        let out = std::process::Command::new(demi_e2e::grpcurl())
            .args(flags)
            .args(["-d", "{}", addr, "demi.conductor.v1.Conductor/ListPlugins"])
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let bearer = "authorization: Bearer s3cret-token";

    let (conductor, addr) = start("");
    let (fine, said) = grpcurl(&addr, &["-cacert", &ca_file, "-H", bearer]);
    assert!(fine && said.contains("\"echo\""), "{said}");
    for (what, flags, words) in [
        ("plaintext", vec!["-plaintext", "-H", bearer], ""),
        (
            "a wrong CA",
            vec!["-cacert", &wrong_ca, "-H", bearer],
            "certificate",
        ),
        ("no token", vec!["-cacert", &ca_file], "Unauthenticated"),
        (
            "a wrong token",
            vec!["-cacert", &ca_file, "-H", "authorization: Bearer nope"],
            "Unauthenticated",
        ),
    ] {
        let (fine, said) = grpcurl(&addr, &flags);
        assert!(
            !fine && said.contains(words),
            "{what} got through or said: {said}"
        );
    }
    // The conductor's own commands speak TLS too.
    let cli = |addr: &str, extra: &[&str]| {
        std::process::Command::new(demi_e2e::bin("conductor"))
            .args([
                "--api",
                &format!("https://{addr}"),
                "--api-token-file",
                &token,
                "--tls-ca",
                &ca_file,
            ])
            .args(extra)
            .args(["status", "--json"])
            .output()
            .unwrap()
    };
    let status = json(cli(&addr, &[]));
    assert_eq!(status[0]["name"], "echo");
    drop(conductor);

    // Mutual TLS: a client certificate from the CA, or no call.
    let (_conductor, addr) = start(&format!("tls_client_ca = \"{ca_file}\""));
    let (fine, said) = grpcurl(&addr, &["-cacert", &ca_file, "-H", bearer]);
    assert!(!fine, "no client certificate got through: {said}");
    let (fine, said) = grpcurl(
        &addr,
        &[
            "-cacert",
            &ca_file,
            "-cert",
            &client_cert,
            "-key",
            &client_key,
            "-H",
            bearer,
        ],
    );
    assert!(fine && said.contains("\"echo\""), "{said}");
    let out = cli(&addr, &[]);
    assert!(
        !out.status.success(),
        "the CLI without a certificate got through"
    );
    let status = json(cli(
        &addr,
        &["--tls-cert", &client_cert, "--tls-key", &client_key],
    ));
    assert_eq!(status[0]["name"], "echo");
}

fn proto(relative: &str) -> String {
    demi_e2e::repo_root()
        .join("proto")
        .join(relative)
        .display()
        .to_string()
}

#[test]
fn watch_events_tells_a_kill_and_restart_in_order() {
    let conductor = Conductor::start(&plugin(
        "echo",
        "[plugins.echo.restart]\ninitial_delay = \"50ms\"",
    ));
    let (_, pid) = conductor.wait_serving(0, "echo", 0);
    let mut watcher = std::process::Command::new(demi_e2e::bin("conductor"))
        .arg("--socket")
        .arg(conductor.api_socket())
        .args(["events", "echo"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watcher.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // The stream is open once the watcher is connected; a kill before that
    // would be missed, so prove it is live first with a harmless event.
    ok(conductor.cli(&["scale", "echo", "1"]));
    ok(conductor.cli(&["restart", "echo"]));
    let mut seen = Vec::new();
    let deadline = Instant::now() + WAIT;
    while !seen.iter().any(|l: &String| l.contains(" serving ")) {
        seen.push(
            lines
                .recv_timeout(deadline - Instant::now())
                .expect("events after restart"),
        );
    }
    seen.clear();
    let new_pid = conductor.pids_of("echo")[0] as u32;
    assert_ne!(new_pid, pid);
    signal_pid(new_pid, Signal::SIGKILL);
    while !seen.iter().any(|l| l.contains(" serving ")) {
        seen.push(
            lines
                .recv_timeout(deadline - Instant::now())
                .expect("events after kill"),
        );
    }
    let kinds: Vec<&str> = seen
        .iter()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(
        kinds,
        ["exited", "backoff", "started", "serving"],
        "{seen:#?}"
    );
    assert!(
        seen[0].contains(&format!("pid={new_pid}")) && seen[0].contains("signal SIGKILL"),
        "{seen:#?}"
    );
    let _ = watcher.kill();
    let _ = watcher.wait();
}

#[test]
fn a_plugin_dropped_into_a_plugin_folder_starts_on_reload_beside_a_broken_one() {
    let conductor = Conductor::builder()
        .conductor("plugin_dirs = [\"plugins.d\"]")
        .start(&plugin("echo", ""));
    conductor.wait_serving(0, "echo", 0);
    let echo = conductor.pids_of("echo");

    let folder = conductor.folder().join("plugins.d");
    std::fs::create_dir_all(folder.join("greeter")).unwrap();
    std::fs::create_dir_all(folder.join("broken")).unwrap();
    let echo_bin = demi_e2e::bin("demi-plugin-echo");
    std::fs::write(
        folder.join("greeter/plugin.toml"),
        format!(
            "name = \"greeter\"\ncommand = \"{}\"\nreplicas = 2\n",
            echo_bin.display()
        ),
    )
    .unwrap();
    std::fs::write(
        folder.join("broken/plugin.toml"),
        "name = \"broken\"\ncommand = 42\n",
    )
    .unwrap();

    let reload = conductor.cli(&["reload"]);
    let stdout = ok(reload.clone());
    let stderr = String::from_utf8_lossy(&reload.stderr);
    assert!(stdout.contains("added [\"greeter\"]"), "{stdout}");
    assert!(
        stderr.contains("broken/plugin.toml:2:11: command: invalid type"),
        "{stderr}"
    );
    conductor.wait_serving(0, "greeter", 0);
    conductor.wait_serving(0, "greeter", 1);
    assert_eq!(conductor.pids_of("echo"), echo);

    let listed = ok(std::process::Command::new(demi_e2e::bin("conductor"))
        .arg("--config")
        .arg(conductor.config_path())
        .arg("plugins")
        .output()
        .unwrap());
    assert!(
        listed.lines().any(|l| l.starts_with("greeter")
            && l.contains("enabled")
            && l.contains("greeter/plugin.toml")),
        "{listed}"
    );
    assert!(
        listed.contains("broken: ") && listed.contains("broken/plugin.toml"),
        "{listed}"
    );
    let greeter = json(conductor.grpcurl(
        &["-d", "{\"name\":\"greeter\"}"],
        &["demi.conductor.v1.Conductor/GetPlugin"],
    ));
    assert!(
        greeter["source"]
            .as_str()
            .unwrap()
            .ends_with("greeter/plugin.toml")
    );
}

/// Runs `conductor run` on `config`, which must stop by itself; its exit
/// status and what it said on stderr.
fn run_to_exit(config: &std::path::Path) -> (std::process::ExitStatus, String) {
    let stderr = config.with_extension("stderr");
    let mut child = std::process::Command::new(demi_e2e::bin("conductor"))
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the second conductor did not stop: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, std::fs::read_to_string(&stderr).unwrap())
}

/// A second conductor given the first one's job store or cgroup root
/// (with a runtime folder of its own, which the first would have
/// refused) stops at once naming the folder, the first's pid and the
/// setting to change: sharing the store would deliver every job twice,
/// sharing the root would kill the first's instances as leftovers.
#[test]
fn a_second_conductor_on_the_same_state_or_cgroup_root_stops_and_leaves_the_first_alone() {
    let first = Conductor::start(&plugin("echo", "replicas = 2"));
    first.wait_serving(0, "echo", 1);
    let pids = first.pids_of("echo");
    let state = first.config_path().with_file_name("state");
    let scratch = tempfile::tempdir().unwrap();
    let own_root = format!("{}-second", first.cgroup_root());
    let second = |state_dir: &std::path::Path, cgroup_root: &str| {
        let config = scratch.path().join("second.toml");
        std::fs::write(
            &config,
            format!(
                "[conductor]\nruntime_dir = \"{}\"\nstate_dir = \"{}\"\ncgroup_root = \"{cgroup_root}\"\n\
                 [conductor.metrics]\nlisten = \"127.0.0.1:0\"\n\
                 [plugins.echo]\ncommand = \"{}\"\n",
                scratch.path().join("run").display(),
                state_dir.display(),
                demi_e2e::bin("demi-plugin-echo").display()
            ),
        )
        .unwrap();
        run_to_exit(&config)
    };
    let pid = format!("(pid {})", first.pid());
    let (status, said) = second(&state, &own_root);
    assert!(!status.success());
    assert!(
        said.contains(&format!("state folder {}", state.display()))
            && said.contains(&pid)
            && said.contains("another conductor.state_dir"),
        "{said}"
    );
    let (status, said) = second(&scratch.path().join("state"), first.cgroup_root());
    assert!(!status.success());
    assert!(
        said.contains("cgroup root /sys/fs/cgroup/")
            && said.contains(&format!("/{} is in use", first.cgroup_root()))
            && said.contains(&pid)
            && said.contains("another conductor.cgroup_root"),
        "{said}"
    );
    assert_eq!(first.pids_of("echo"), pids);
    assert_eq!(first.count("echo", "instance exited"), 0);
    ok(first.cli(&["status"]));
}
