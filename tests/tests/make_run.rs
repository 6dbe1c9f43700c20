//! Acceptance: `make run` on a checkout brings the example's 2 echo
//! replicas to SERVING, and they answer Describe and Handle.

use std::io::{BufRead as _, BufReader};
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::sync::mpsc;

use demi_e2e::grpc::{self, pb};
use demi_e2e::{WAIT, repo_root, signal_pid, wait_all_gone};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Kills the whole `make run` process group however the test ends.
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.0 as i32), Signal::SIGKILL);
    }
}

#[test]
fn make_run_serves_two_echo_replicas() {
    let root = repo_root();
    let mut make = Command::new("make");
    // What cargo set for this test (CARGO_PKG_NAME and the like) must not
    // reach the cargo that `make run` starts: build scripts that watch
    // those variables (ring's does) would rebuild half the tree.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_TARGET_DIR" {
            make.env_remove(&*key);
        }
    }
    // Kept to say why, should make run stop early.
    let stderr = tempfile::NamedTempFile::new().expect("stderr file");
    let mut make = make
        .arg("run")
        .current_dir(&root)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr.reopen().expect("stderr file"))
        .process_group(0)
        .spawn()
        .expect("make run");
    let _group = Group(make.id());
    let (lines_tx, lines) = mpsc::channel();
    let stdout = make.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut serving_pids = Vec::new();
    while serving_pids.len() < 2 {
        let line = lines.recv_timeout(WAIT * 4).unwrap_or_else(|error| {
            let said = std::fs::read_to_string(stderr.path()).unwrap_or_default();
            panic!("make run printed no 'instance serving' in time ({error}); stderr:\n{said}")
        });
        if line.contains("instance serving") {
            let pid = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("pid="))
                .and_then(|p| p.parse::<u32>().ok())
                .expect("pid field");
            serving_pids.push(pid);
        }
    }

    let sockets = root.join("target/demi-run/plugins/echo");
    let rt = grpc::runtime();
    rt.block_on(async {
        for i in 0..2 {
            let channel = grpc::connect(&sockets.join(format!("{i}.sock"))).await;
            assert_eq!(grpc::health(&channel, "echo").await.unwrap(), 1);
            let mut client = pb::plugin_client::PluginClient::new(channel);
            let about = client.describe(pb::DescribeRequest {}).await.unwrap();
            assert_eq!(about.into_inner().name, "echo");
            let result = client
                .handle(pb::Job {
                    id: format!("job-{i}"),
                    payload: b"ping".to_vec(),
                    attempt: 1,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(result.payload, b"ping");
        }
    });

    // Stop the conductor (make's child) the way an operator would.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", make.id()))
        .expect("make's children");
    let conductor: u32 = children.split_whitespace().next().unwrap().parse().unwrap();
    signal_pid(conductor, Signal::SIGTERM);
    let status = make.wait().expect("make exits");
    assert!(status.success(), "make run ended with {status:?}");
    wait_all_gone(&serving_pids, std::time::Duration::from_secs(1)).expect("replicas stopped");
}
