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
    let mut check = Command::new(bin("conductor"));
    check
        .args(["plugin-check", "--json", "--startup-timeout", "3s", "--"])
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

#[test]
fn plugin_check_passes_the_rust_and_the_python_plugin() {
    // The Rust SDK serves the job stream; the Python example does not,
    // which is allowed (the conductor then calls Handle per job).
    for (command, stream) in [(bin("demi-plugin-echo"), "pass"), (python_plugin(), "skip")] {
        let (passed, report) = plugin_check(None, std::slice::from_ref(&command));
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
