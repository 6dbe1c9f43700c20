//! Plugins in any language: a Python plugin supervised for real, and the
//! conformance checker against good and deliberately broken plugins.

use std::path::PathBuf;
use std::process::Command;

use demi_e2e::grpc::{self, admin_pb as pb};
use demi_e2e::{Conductor, bin, repo_root, signal_pid};
use nix::sys::signal::Signal;
use serde_json::Value;

/// The Python plugin's launcher; `make test` generates its gRPC code.
fn python_plugin() -> PathBuf {
    let generated = repo_root().join("plugins/python-echo/gen/demi/plugin/v1/plugin_pb2_grpc.py");
    assert!(
        generated.exists(),
        "{} is missing: `make test` (or `make python-plugin`) generates it",
        generated.display()
    );
    repo_root().join("plugins/python-echo/run")
}

fn plugin_check(broken: Option<&str>, command: &[PathBuf]) -> (bool, Value) {
    plugin_check_with(broken, &[], command)
}

fn plugin_check_with(broken: Option<&str>, flags: &[&str], command: &[PathBuf]) -> (bool, Value) {
    let mut check = Command::new(bin("conductor"));
    check
        .args(["plugin-check", "--json", "--startup-timeout", "3s"])
        .args(flags)
        .arg("--")
        .args(command);
    if let Some(mode) = broken {
        check.env("PYTHON_ECHO_BROKEN", mode);
    }
    let out = check.output().expect("plugin-check");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "not JSON: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(
        out.status.success(),
        report["passed"] == true,
        "exit code agrees with the report"
    );
    (out.status.success(), report)
}

fn failed(report: &Value) -> Vec<String> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["verdict"] == "fail")
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

fn verdict<'a>(report: &'a Value, name: &str) -> &'a Value {
    let checks = report["checks"].as_array().unwrap();
    &checks.iter().find(|c| c["name"] == name).expect(name)["verdict"]
}

#[test]
fn plugin_check_passes_the_rust_and_the_python_plugin() {
    // The Rust SDK serves the job stream; the Python example does not,
    // which is allowed (the conductor then calls Handle per job).
    for (command, stream) in [(bin("demi-plugin-echo"), "pass"), (python_plugin(), "skip")] {
        let probe = ["--probe", "count=a b", "--expect-ok"];
        let (passed, report) = plugin_check_with(None, &probe, std::slice::from_ref(&command));
        assert!(passed, "{}: {report:#}", command.display());
        let names: Vec<&str> = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(
            names,
            [
                "refuses-without-cookie",
                "serving",
                "health-for-name",
                "describe",
                "handle",
                "handle-stream",
                "deadline",
                "shutdown",
                "sigterm",
                "parent-death"
            ]
        );
        for check in report["checks"].as_array().unwrap() {
            let expected = if check["name"] == "handle-stream" {
                stream
            } else {
                "pass"
            };
            assert_eq!(check["verdict"], expected, "{report:#}");
        }
    }
}

#[test]
fn plugin_check_cannot_be_fooled_by_a_plugin_that_fails_every_job() {
    let echo = bin("demi-plugin-echo");
    let failing = [echo.clone(), "--fail-permanent".into(), "1.0".into()];
    let probe = ["--probe", "count=a b", "--expect-ok"];
    let (passed, report) = plugin_check_with(None, &probe, &failing);
    assert!(!passed, "{report:#}");
    assert_eq!(failed(&report), ["handle", "handle-stream"], "{report:#}");
    let checks = report["checks"].as_array().unwrap();
    let handle = checks.iter().find(|c| c["name"] == "handle").unwrap();
    let detail = handle["detail"].as_str().unwrap();
    assert!(detail.contains("OUTCOME_PERMANENT"), "by name: {detail}");
    assert!(detail.contains("injected permanent failure"), "{detail}");

    // Without a probe nothing says what the right answer is: unchecked.
    let (passed, report) = plugin_check(None, &failing);
    assert!(passed, "{report:#}");
    assert_eq!(verdict(&report, "handle"), "unchecked", "{report:#}");
    let (_, report) = plugin_check(None, std::slice::from_ref(&echo));
    assert_eq!(verdict(&report, "handle"), "unchecked", "{report:#}");
}

#[test]
fn the_kernels_death_signal_is_enough_for_parent_death_and_stderr_is_shown() {
    // The conductor's own death signal ends a plugin with no watch of its
    // own: plugin-check launches it the same way.
    let mut check = Command::new(bin("conductor"));
    check
        .args(["plugin-check", "--json", "--startup-timeout", "3s", "--"])
        .arg(python_plugin())
        .env("PYTHON_ECHO_NO_PARENT_WATCH", "1");
    let out = check.output().unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdict(&report, "parent-death"), "pass", "{report:#}");

    // A plugin that dies says why, and plugin-check shows it.
    let dir = tempfile::tempdir().unwrap();
    let dying = dir.path().join("dying.sh");
    std::fs::write(
        &dying,
        "#!/bin/sh
[ -z \"$DEMI_PLUGIN_MAGIC_COOKIE\" ] && { echo 'started by hand' >&2; exit 78; }
         echo 'cannot open /etc/bot.toml: permission denied' >&2
exit 1
",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dying, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (passed, report) = plugin_check(None, &[dying]);
    assert!(!passed);
    let checks = report["checks"].as_array().unwrap();
    let serving = checks.iter().find(|c| c["name"] == "serving").unwrap();
    let detail = serving["detail"].as_str().unwrap();
    assert!(detail.contains("cannot open /etc/bot.toml"), "{detail}");
}

#[test]
fn plugin_check_names_what_a_broken_plugin_gets_wrong() {
    let python = python_plugin();
    for (mode, expected) in [
        ("no-cookie-check", vec!["refuses-without-cookie"]),
        ("never-serving", vec!["serving"]),
        ("ignore-shutdown", vec!["shutdown", "sigterm"]),
        ("wrong-socket", vec!["serving"]),
    ] {
        let (passed, report) = plugin_check(Some(mode), std::slice::from_ref(&python));
        assert!(!passed, "{mode} passed: {report:#}");
        assert_eq!(failed(&report), expected, "{mode}: {report:#}");
    }
}

#[test]
fn a_python_plugin_is_supervised_beside_the_rust_one_and_both_take_jobs() {
    let conductor = Conductor::start(&format!(
        "[plugins.rust]\ncommand = \"{{echo}}\"\n\n[plugins.python]\ncommand = \"{}\"\nshutdown_grace = \"2s\"\n",
        python_plugin().display()
    ));
    conductor.wait_serving(0, "rust", 0);
    let (at, pid) = conductor.wait_serving(0, "python", 0);
    let rt = grpc::runtime();
    let ask = |plugin: &str, payload: &str| {
        rt.block_on(async {
            let mut api = grpc::admin(&conductor.api_socket()).await;
            let request = pb::SubmitRequest {
                plugin: plugin.into(),
                payload: payload.as_bytes().to_vec(),
                ..Default::default()
            };
            api.submit_and_wait(request).await.unwrap().into_inner()
        })
    };
    for plugin in ["rust", "python"] {
        let outcome = ask(plugin, &format!("hello {plugin}"));
        assert_eq!(outcome.status, pb::job_outcome::Status::Completed as i32);
        assert_eq!(
            String::from_utf8_lossy(&outcome.payload),
            format!("hello {plugin}")
        );
    }
    // Killed, the Python plugin comes back like any other.
    signal_pid(pid, Signal::SIGKILL);
    let (_, again) = conductor.wait_serving(at + 1, "python", 0);
    assert_ne!(again, pid);
    assert_eq!(ask("python", "after").payload, b"after");
}

#[test]
fn the_guides_python_example_copied_verbatim_passes_plugin_check_from_another_folder() {
    let guide = std::fs::read_to_string(repo_root().join("proto/README.md")).unwrap();
    let section = &guide[guide
        .find("## 6. A complete plugin in Python")
        .expect("section 6")..];
    let start = section.find("```python\n").expect("a python block") + "```python\n".len();
    let code = &section[start..start + section[start..].find("```").unwrap()];

    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("plugin.py");
    std::fs::write(&plugin, code).unwrap();
    // The stubs, as the guide generates them: into gen/ beside plugin.py.
    let python = repo_root().join(".venv/bin/python");
    std::fs::create_dir_all(dir.path().join("gen")).unwrap();
    let generated = Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(repo_root().join("proto"))
        .args([
            "--python_out=gen",
            "--grpc_python_out=gen",
            "demi/plugin/v1/plugin.proto",
        ])
        .current_dir(dir.path())
        .status()
        .is_ok_and(|s| s.success());
    assert!(generated, "grpc_tools could not generate the stubs");

    // Started from a folder that is not the plugin's.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = Command::new(bin("conductor"))
        .args(["plugin-check", "--json", "--startup-timeout", "5s"])
        .args(["--probe", "echo=hi", "--expect-ok", "--"])
        .arg(&python)
        .arg(&plugin)
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!("not JSON: {}", String::from_utf8_lossy(&out.stderr));
    });
    assert!(out.status.success(), "{report:#}");
    assert_eq!(verdict(&report, "handle"), "pass", "{report:#}");
    assert_eq!(verdict(&report, "parent-death"), "pass", "{report:#}");
}

/// What a process as the plugin's user can reach: it tries each
/// `NAME=KIND:PATH` (KIND: read a file, connect to a socket, write into a
/// folder; `@run` and `@state` stand for the conductor's folders, found
/// from the handshake) and logs one line of outcomes (`ok` or the errno's
/// name).
const PROBER: &str = r#"
import errno, json, os, socket, sys, time
run = os.path.dirname(os.environ["DEMI_CONDUCTOR_SOCKET"])
state = os.path.dirname(os.path.dirname(os.environ["DEMI_STATE_DIRECTORY"]))
def attempt(kind, path):
    try:
        if kind == "connect":
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.close()
        elif kind == "read":
            with open(path, "rb") as f:
                f.read()
        else:
            with open(os.path.join(path, "probe"), "w") as f:
                f.write("x")
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
out = {"message": "probed"}
for arg in sys.argv[1:]:
    name, rest = arg.split("=", 1)
    kind, path = rest.split(":", 1)
    path = os.path.expandvars(path.replace("@run", run).replace("@state", state))
    out[name] = attempt(kind, path)
print(json.dumps(out), flush=True)
time.sleep(3600)
"#;

fn status_field(pid: u64, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("{field} in {status}"))
        .trim()
        .to_owned()
}

#[test]
fn a_plugin_run_as_nobody_keeps_no_powers_and_reaches_nothing_of_the_conductors() {
    let secrets = tempfile::tempdir().unwrap();
    let secret = secrets.path().join("secret");
    std::fs::write(&secret, "s3cret").unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let probes = [
        "job_store=read:@state/jobs.db",
        "admin_socket=connect:@run/conductor.sock",
        "others_credential=read:@run/credentials/root-0/theirs",
        "others_socket=connect:@run/plugins/root/0.sock",
        "others_state=write:@state/plugins/root",
        "plugin_api=connect:@run/plugin-api.sock",
        "own_credential=read:$DEMI_CREDENTIALS_DIRECTORY/mine",
        "own_state=write:$DEMI_STATE_DIRECTORY",
    ];
    let args: Vec<String> = std::iter::once(PROBER)
        .chain(probes)
        .map(|a| serde_json::to_string(a).unwrap())
        .collect();
    let conductor = Conductor::start(&format!(
        r#"
[plugins.echo]
command = "{{echo}}"
user = "nobody"
[plugins.echo.credentials]
mine = "{secret}"

[plugins.bound]
command = "{{echo}}"
user = "nobody"
group = "nogroup"
capabilities = ["CAP_NET_BIND_SERVICE"]

[plugins.root]
command = "{{echo}}"
[plugins.root.credentials]
theirs = "{secret}"

[plugins.prober]
command = "/usr/bin/python3"
args = ["-c", {args}]
working_dir = "/"
health = "none"
user = "nobody"
[plugins.prober.credentials]
mine = "{secret}"
"#,
        secret = secret.display(),
        args = args.join(", "),
    ));
    for plugin in ["echo", "bound", "root"] {
        conductor.wait_serving(0, plugin, 0);
    }
    let (_, probed) = conductor.wait_for(0, "the prober's line", |e| {
        e["plugin"] == "prober" && e["message"] == "probed"
    });
    let fields: Value = serde_json::from_str(probed["fields"].as_str().unwrap()).unwrap();
    eprintln!("as nobody: {fields}");
    for denied in [
        "job_store",
        "admin_socket",
        "others_credential",
        "others_socket",
        "others_state",
    ] {
        assert_eq!(fields[denied], "EACCES", "{denied}: {fields}");
    }
    for allowed in ["plugin_api", "own_credential", "own_state"] {
        assert_eq!(fields[allowed], "ok", "{allowed}: {fields}");
    }

    // Its identity and powers, as the kernel sees them.
    let echo = conductor.pids_of("echo")[0];
    assert!(status_field(echo, "Uid").starts_with("65534	"));
    assert!(status_field(echo, "Gid").starts_with("65534	"));
    assert_eq!(status_field(echo, "Groups"), "");
    assert_eq!(status_field(echo, "NoNewPrivs"), "1");
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(echo, set), "0000000000000000", "{set}");
    }
    let bound = conductor.pids_of("bound")[0];
    for set in ["CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(bound, set), "0000000000000400", "{set}");
    }
    // Root, but with every capability dropped: root's files are still its
    // own, nobody else's are out of reach.
    let root = conductor.pids_of("root")[0];
    assert!(status_field(root, "Uid").starts_with("0	"));
    assert_eq!(status_field(root, "CapEff"), "0000000000000000");
    assert_eq!(status_field(root, "CapBnd"), "0000000000000000");

    // The same plugin passes the contract's checks as nobody.
    let (passed, report) =
        plugin_check_with(None, &["--user", "nobody"], &[bin("demi-plugin-echo")]);
    assert!(passed, "{report}");
}
