//! The plugin API: plugins reach the conductor on a socket of their own,
//! as themselves, and can do only what their config allows; their
//! secrets come as files, nowhere else.

use demi_e2e::{Conductor, eventually, grpcurl, ok, repo_root};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

/// A shell script, any-language plugin style, written to `dir/name`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn a_plugin_cannot_use_operator_powers_submit_outside_its_grants_or_see_others_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let (trigger, out) = (dir.path().join("go"), dir.path().join("calls.txt"));
    // Calls the conductor through what it was handed, as any plugin could,
    // once the test says so; then idles.
    let intruder = script(
        dir.path(),
        "intruder.sh",
        r#"while [ ! -e "$TRIGGER" ]; do sleep 0.05; done
call() { # NAME PROTO METHOD DATA
  echo "== $1" >> "$OUT"
  "$GRPCURL" -plaintext -unix -authority localhost -import-path "$PROTO" -proto "$2" \
    -H "authorization: Bearer $DEMI_CONDUCTOR_TOKEN" -d "$4" \
    "$DEMI_CONDUCTOR_SOCKET" "$3" >> "$OUT" 2>&1
  echo "exit $?" >> "$OUT"
}
admin=demi/conductor/v1/conductor.proto
host=demi/plugin/v1/host.proto
call stop $admin demi.conductor.v1.Conductor/StopPlugin '{"name":"workers"}'
call scale $admin demi.conductor.v1.Conductor/ScalePlugin '{"name":"workers","replicas":5}'
call reload $admin demi.conductor.v1.Conductor/Reload '{}'
call purge $admin demi.conductor.v1.Conductor/PurgeDeadLetters '{}'
call outside $host demi.plugin.v1.Host/Submit '{"plugin":"broken"}'
call allowed $host demi.plugin.v1.Host/Submit '{"plugin":"workers","payload":"aGk="}'
own=$(sed -n 's/.*"jobId": "\([0-9a-f]*\)".*/\1/p' "$OUT" | head -n 1)
call own $host demi.plugin.v1.Host/WaitJob "{\"job_id\":\"$own\"}"
for id in $(cat "$TRIGGER"); do
  call "foreign $id" $host demi.plugin.v1.Host/GetJob "{\"job_id\":\"$id\"}"
done
echo done >> "$OUT"
exec sleep 3600"#,
    );
    // Another plugin's job, for the intruder to (fail to) look up.
    let other_id = dir.path().join("other.txt");
    let other = script(
        dir.path(),
        "other.sh",
        r#""$GRPCURL" -plaintext -unix -authority localhost -import-path "$PROTO" \
  -proto demi/plugin/v1/host.proto -H "authorization: Bearer $DEMI_CONDUCTOR_TOKEN" \
  -d '{"plugin":"workers","payload":"aGk="}' "$DEMI_CONDUCTOR_SOCKET" \
  demi.plugin.v1.Host/Submit | sed -n 's/.*"jobId": "\([0-9a-f]*\)".*/\1/p' > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
exec sleep 3600"#,
    );
    let conductor = Conductor::start(&format!(
        "[plugins.other]\ncommand = \"{}\"\nhealth = \"none\"\njobs = false\n\
         submits_to = [\"workers\"]\nshutdown_grace = \"1s\"\n\
         env = {{ OUT = \"{}\", GRPCURL = \"{}\", PROTO = \"{}\" }}\n\
         [plugins.intruder]\ncommand = \"{}\"\nhealth = \"none\"\njobs = false\n\
         submits_to = [\"workers\"]\nshutdown_grace = \"1s\"\n\
         env = {{ TRIGGER = \"{}\", OUT = \"{}\", GRPCURL = \"{}\", PROTO = \"{}\" }}\n\
         [plugins.workers]\ncommand = \"{{echo}}\"\nreplicas = 2\nshutdown_grace = \"1s\"\n\
         [plugins.broken]\ncommand = \"{{echo}}\"\nargs = [\"--fail-permanent\", \"1.0\"]\n\
         shutdown_grace = \"1s\"\n",
        other.display(),
        other_id.display(),
        grpcurl().display(),
        repo_root().join("proto").display(),
        intruder.display(),
        trigger.display(),
        out.display(),
        grpcurl().display(),
        repo_root().join("proto").display(),
    ));
    conductor.wait_serving(0, "workers", 1);
    conductor.wait_serving(0, "broken", 0);
    // A dead letter for PurgeDeadLetters to (not) delete.
    let id = ok(conductor.cli(&["submit", "broken", "--payload", "x"]));
    ok(conductor.cli(&["job", id.trim(), "--wait"]));
    let workers_before = conductor.pids_of("workers");
    assert_eq!(workers_before.len(), 2);

    eventually("the other plugin submitted", || {
        read(&other_id).trim().len() == 32
    });
    let foreign = [read(&other_id).trim().to_owned(), id.trim().to_owned()];
    std::fs::write(&trigger, foreign.join(" ")).unwrap();
    eventually("the intruder made its calls", || {
        read(&out).contains("done")
    });
    let calls = read(&out);
    let section = |name: &str| {
        let start = calls.find(&format!("== {name}\n")).expect(name);
        let rest = &calls[start + 4..];
        rest[..rest.find("== ").unwrap_or(rest.len())].to_owned()
    };
    let foreign = foreign.map(|id| format!("foreign {id}"));
    for denied in [
        "stop",
        "scale",
        "reload",
        "purge",
        "outside",
        &foreign[0],
        &foreign[1],
    ] {
        let answer = section(denied);
        assert!(answer.contains("PermissionDenied"), "{denied}: {answer}");
    }
    assert!(section("allowed").contains("jobId"), "{calls}");
    // Its own job it may look up, answer and all.
    let own = section("own");
    assert!(
        own.contains("STATE_COMPLETED") && own.contains("aGk="),
        "{own}"
    );

    // Nothing changed.
    assert_eq!(conductor.pids_of("workers"), workers_before);
    let letters = ok(conductor.cli(&["dlq", "list"]));
    assert!(letters.contains(id.trim()), "{letters}");
    eventually("each refusal is counted with the plugin's name", || {
        let scrape = conductor.scrape();
        [
            "StopPlugin",
            "ScalePlugin",
            "Reload",
            "PurgeDeadLetters",
            "Submit",
        ]
        .iter()
        .all(|method| {
            demi_e2e::series(
                &scrape,
                "demi_plugin_api_denied_total",
                &[("plugin", "intruder"), ("method", method)],
            ) == Some(1.0)
        })
    });
    let logged = conductor
        .events()
        .iter()
        .filter(|e| e["message"] == "plugin API call denied" && e["plugin"] == "intruder")
        .count();
    assert_eq!(logged, 7, "each logged with the plugin's name");

    // grpcurl on the plugin socket sees only the plugin API, and a call
    // without a token is nobody's.
    let socket = conductor.runtime_dir().join("plugin-api.sock");
    let listed = std::process::Command::new(grpcurl())
        .args(["-plaintext", "-unix", "-authority", "localhost"])
        .arg(&socket)
        .arg("list")
        .output()
        .unwrap();
    assert_eq!(ok(listed).trim(), "demi.plugin.v1.Host");
    let anonymous = std::process::Command::new(grpcurl())
        .args(["-plaintext", "-unix", "-authority", "localhost", "-d", "{}"])
        .arg(&socket)
        .arg("demi.plugin.v1.Host/GetMembership")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&anonymous.stderr);
    assert!(said.contains("Unauthenticated"), "{said}");
    // The admin socket is the owner's alone.
    let mode = std::fs::metadata(conductor.api_socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn credentials_reach_the_instance_as_files_and_nowhere_else() {
    let dir = tempfile::tempdir().unwrap();
    let secret = format!("tok-{:016x}", fastrand::u64(..));
    let file = dir.path().join("bot.token");
    std::fs::write(&file, &secret).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = dir.path().join("seen.txt");
    let holder = script(
        dir.path(),
        "holder.sh",
        r#"d="$DEMI_CREDENTIALS_DIRECTORY"
{ cat "$d/bot_token"; echo; stat -c '%a %U' "$d" "$d/bot_token"; } > "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
exec sleep 3600"#,
    );
    let plugins = format!(
        "[plugins.holder]\ncommand = \"{}\"\nhealth = \"none\"\njobs = false\n\
         shutdown_grace = \"1s\"\nenv = {{ OUT = \"{}\" }}\n\
         [plugins.holder.credentials]\nbot_token = \"{}\"\n",
        holder.display(),
        out.display(),
        file.display()
    );
    let conductor = Conductor::start(&plugins);
    eventually("the plugin read its credential", || {
        read(&out).contains('\n')
    });
    let seen = read(&out);
    let mut lines = seen.lines();
    assert_eq!(lines.next(), Some(secret.as_str()));
    assert_eq!(lines.next(), Some("700 root"), "{seen}");
    assert_eq!(lines.next(), Some("400 root"), "{seen}");

    let pid = conductor.pids_of("holder")[0];
    for place in ["environ", "cmdline"] {
        let bytes = std::fs::read(format!("/proc/{pid}/{place}")).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&secret),
            "{place}"
        );
    }
    let everywhere = [
        serde_json::to_string(&conductor.events()).unwrap(),
        ok(conductor.cli(&["status", "--json"])),
        ok(conductor.cli(&["status"])),
        ok(std::process::Command::new(grpcurl())
            .args(["-plaintext", "-unix", "-authority", "localhost"])
            .arg(conductor.api_socket())
            .arg("demi.conductor.v1.Conductor/GetConfig")
            .output()
            .unwrap()),
        conductor.scrape(),
    ];
    for text in &everywhere {
        assert!(!text.contains(&secret), "the secret leaked: {text}");
    }
    let human = std::process::Command::new(demi_e2e::bin("conductor"))
        .arg("check-config")
        .arg(conductor.config_path())
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&human.stdout),
        String::from_utf8_lossy(&human.stderr)
    );
    assert!(human.status.success() && !said.contains(&secret), "{said}");

    // The daemon's human log says nothing of it either: the same config
    // run in human format (its own folders) for a moment, at debug level.
    let copy = dir.path().join("human.toml");
    let text = std::fs::read_to_string(conductor.config_path()).unwrap();
    let text = text
        .replace(
            "runtime_dir = \"run\"",
            &format!("runtime_dir = \"{}\"", dir.path().join("hrun").display()),
        )
        .replace(
            "state_dir = \"state\"",
            &format!("state_dir = \"{}\"", dir.path().join("hstate").display()),
        )
        .replace("cgroup_root = \"", "cgroup_root = \"human-");
    std::fs::write(&copy, text).unwrap();
    let mut daemon = std::process::Command::new(demi_e2e::bin("conductor"))
        .args(["run", "--log-format", "human", "--config"])
        .arg(&copy)
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = daemon.wait();
    let mut log = String::new();
    use std::io::Read as _;
    daemon
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    daemon
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("instance spawned"), "{log}");
    assert!(
        !log.contains(&secret),
        "the secret leaked into the human log"
    );

    // A new secret reaches the instances on reload (they are replaced).
    let renewed = format!("tok-{:016x}", fastrand::u64(..));
    std::fs::write(&file, &renewed).unwrap();
    ok(conductor.cli(&["reload"]));
    eventually("the instance read the new credential", || {
        read(&out).lines().next() == Some(renewed.as_str())
    });

    // A file other users can read is refused, naming it.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = std::process::Command::new(demi_e2e::bin("conductor"))
        .arg("check-config")
        .arg(conductor.config_path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(said.contains(&file.display().to_string()), "{said}");
    assert!(
        said.contains("plugins.holder.credentials.bot_token"),
        "{said}"
    );
    assert!(said.contains("0644"), "{said}");
}

#[test]
fn the_sdk_origin_example_hands_every_line_to_a_pool_and_stops_when_told() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.txt");
    std::fs::write(&input, "one\ntwo\nthree\nvier fünf\n").unwrap();
    let conductor = Conductor::start(&format!(
        "[plugins.lines]\ncommand = \"{}\"\nargs = [\"{}\", \"workers\"]\njobs = false\n\
         submits_to = [\"workers\"]\nshutdown_grace = \"5s\"\n\
         [plugins.workers]\ncommand = \"{{echo}}\"\nreplicas = 2\nshutdown_grace = \"1s\"\n",
        demi_e2e::bin_dir().join("examples/lines").display(),
        input.display()
    ));
    let said = |text: &str| {
        conductor
            .events()
            .iter()
            .any(|e| e["message"] == text && e["plugin"] == "lines")
    };
    eventually("every line answered", || said("line 4: vier fünf"));
    for line in ["line 1: one", "line 2: two", "line 3: three"] {
        assert!(said(line), "{line}");
    }
    // Stopping it fires its context's token: it leaves by itself, in time.
    ok(conductor.cli(&["stop", "lines"]));
    let status = demi_e2e::json(conductor.cli(&["status", "lines", "--json"]));
    let exit = &status[0]["instances"][0]["last_exit"];
    assert_eq!(exit, "exit code 0", "{status}");
}

#[test]
fn an_instance_says_why_it_is_not_serving_and_status_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let conductor = Conductor::start(&format!(
        "[plugins.bot]\ncommand = \"{}\"\nargs = [\"--journal\", \"{}\", \"--not-serving\", \
         \"gateway unreachable\"]\njobs = false\nshutdown_grace = \"1s\"\n\
         [plugins.bot.health]\ninterval = \"500ms\"\ntimeout = \"400ms\"\nfailure_threshold = 1000\n",
        demi_e2e::bin("probe_plugin").display(),
        dir.path().join("journal.txt").display()
    ));
    conductor.wait_serving(0, "bot", 0);
    eventually("the instance is unhealthy, with its reason", || {
        let status = demi_e2e::json(conductor.cli(&["status", "bot", "--json"]));
        let instance = &status[0]["instances"][0];
        instance["state"] == "unhealthy" && instance["health_note"] == "gateway unreachable"
    });
    let table = ok(conductor.cli(&["status", "bot"]));
    assert!(table.contains("unhealthy (gateway unreachable)"), "{table}");
}
