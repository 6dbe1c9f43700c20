//! The Rust SDK's side of the handshake, driven without a conductor: the
//! test plays the conductor by setting the environment itself.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use demi_e2e::grpc::{self, pb};
use demi_e2e::{WAIT, bin, signal_pid, wait_all_gone};
use demi_proto::handshake as hs;
use nix::sys::signal::Signal;

fn handshake_env(command: &mut Command, socket: &Path) {
    command
        .env(hs::MAGIC_COOKIE_KEY, hs::MAGIC_COOKIE_VALUE)
        .env(hs::PROTOCOL_VERSIONS_KEY, "1")
        .env(hs::SOCKET_KEY, socket)
        .env(hs::NAME_KEY, "echo")
        .env(hs::INSTANCE_KEY, "0");
}

/// Starts echo with the handshake and waits until its socket answers.
fn start_echo(socket: &Path, args: &[&str]) -> Child {
    let mut command = Command::new(bin("demi-plugin-echo"));
    handshake_env(&mut command, socket);
    let child = command.args(args).stdout(Stdio::null()).spawn().unwrap();
    wait_serving(socket);
    child
}

/// Starts echo announcing every job it starts; the lines arrive on the
/// returned channel.
fn start_echo_announcing(
    socket: &Path,
    args: &[&str],
) -> (Child, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let mut command = Command::new(bin("demi-plugin-echo"));
    handshake_env(&mut command, socket);
    let mut child = command
        .args(args)
        .arg("--announce-jobs")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    wait_serving(socket);
    (child, rx)
}

fn wait_serving(socket: &Path) {
    let deadline = Instant::now() + WAIT;
    let rt = grpc::runtime();
    loop {
        let ready = rt.block_on(async {
            let endpoint =
                tonic::transport::Endpoint::from_shared(format!("unix://{}", socket.display()))
                    .unwrap();
            match endpoint.connect().await {
                Ok(channel) => matches!(grpc::health(&channel, "").await, Ok(1)),
                Err(_) => false,
            }
        });
        if ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "echo never served on {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn exit_code_within(child: &mut Child, within: Duration) -> Option<i32> {
    let pid = child.id();
    wait_all_gone(&[pid], within).unwrap_or_else(|_| panic!("{pid} still running"));
    child.wait().unwrap().code()
}

#[test]
fn run_by_hand_it_explains_itself_and_exits_78() {
    let out = Command::new(bin("demi-plugin-echo"))
        .env_remove(hs::MAGIC_COOKIE_KEY)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("started by the conductor"), "{stderr}");
}

#[test]
fn no_common_protocol_version_exits_78_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(bin("demi-plugin-echo"));
    handshake_env(&mut command, &dir.path().join("echo.sock"));
    let out = command
        .env(hs::PROTOCOL_VERSIONS_KEY, "2,3")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("[2, 3]") && stderr.contains("[1]"),
        "{stderr}"
    );
}

#[test]
fn sigterm_drains_and_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("echo.sock");
    let mut echo = start_echo(&socket, &[]);
    signal_pid(echo.id(), Signal::SIGTERM);
    assert_eq!(exit_code_within(&mut echo, Duration::from_secs(5)), Some(0));
    assert!(!socket.exists());
}

#[test]
fn shutdown_finishes_in_flight_jobs_refuses_new_ones_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("echo.sock");
    let (mut echo, mut announced) = start_echo_announcing(&socket, &["--delay", "400ms"]);
    let rt = grpc::runtime();
    rt.block_on(async {
        let channel = grpc::connect(&socket).await;
        let mut client = pb::plugin_client::PluginClient::new(channel.clone());
        let mut slow = client.clone();
        let in_flight = tokio::spawn(async move {
            slow.handle(pb::Job {
                id: "slow".into(),
                payload: b"done".to_vec(),
                attempt: 1,
                ..Default::default()
            })
            .await
        });
        // Shutdown only once the slow job is in the plugin's hands.
        let started = tokio::time::timeout(WAIT, async {
            while let Some(line) = announced.recv().await {
                if line.contains("job started") && line.contains("\"slow\"") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(started, Ok(true), "the slow job never started");
        client
            .shutdown(pb::ShutdownRequest {
                grace: Some(prost_types_duration(Duration::from_secs(5))),
            })
            .await
            .unwrap();
        assert_eq!(
            grpc::health(&channel, "echo").await.unwrap(),
            2,
            "NOT_SERVING while draining"
        );
        let refused = client
            .handle(pb::Job {
                id: "late".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        let finished = in_flight.await.unwrap().unwrap().into_inner();
        assert_eq!(finished.payload, b"done", "the in-flight job completed");
    });
    assert_eq!(exit_code_within(&mut echo, Duration::from_secs(5)), Some(0));
}

#[test]
fn it_exits_by_itself_when_its_parent_dies() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("echo.sock");
    // A shell stands in for the conductor, without any death signal: only
    // the SDK's own watch on its parent can notice the shell is gone.
    let mut command = Command::new("sh");
    handshake_env(&mut command, &socket);
    let mut shell = command
        .args(["-c", "\"$0\" >/dev/null & echo $!; read _"])
        .arg(bin("demi-plugin-echo"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(shell.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let echo: u32 = line.trim().parse().unwrap();
    wait_serving(&socket);
    shell.stdin.take().unwrap().write_all(b"\n").unwrap();
    shell.wait().unwrap();
    let took = wait_all_gone(&[echo], Duration::from_secs(2)).expect("echo outlived its parent");
    eprintln!("echo left {took:?} after its parent");
}

fn prost_types_duration(d: Duration) -> demi_e2e::grpc::ProstDuration {
    demi_e2e::grpc::ProstDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[test]
fn handle_receives_the_callers_trace_id() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("echo.sock");
    let mut echo = start_echo(&socket, &[]);
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    grpc::runtime().block_on(async {
        let mut client = pb::plugin_client::PluginClient::new(grpc::connect(&socket).await);
        let mut request = tonic::Request::new(pb::Job {
            id: "traced".into(),
            kind: "trace".into(),
            attempt: 1,
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().unwrap());
        let answer = client.handle(request).await.unwrap().into_inner();
        assert_eq!(answer.payload, b"4bf92f3577b34da6a3ce929d0e0e4736");
        // Without one, there is none.
        let bare = pb::Job {
            id: "bare".into(),
            kind: "trace".into(),
            ..Default::default()
        };
        assert_eq!(client.handle(bare).await.unwrap().into_inner().payload, b"");
    });
    signal_pid(echo.id(), Signal::SIGTERM);
    exit_code_within(&mut echo, Duration::from_secs(5));
}

fn delivery(tag: u64, kind: &str, payload: &str, traceparent: &str) -> pb::Delivery {
    pb::Delivery {
        tag,
        body: Some(pb::delivery::Body::Job(pb::Job {
            id: format!("job-{tag}"),
            kind: kind.into(),
            payload: payload.as_bytes().to_vec(),
            attempt: 1,
            ..Default::default()
        })),
        traceparent: traceparent.into(),
    }
}

#[test]
fn a_job_stream_answers_by_tag_refuses_while_draining_and_a_cancel_ends_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("echo.sock");
    let mut echo = start_echo(&socket, &["--hang-kind", "hang"]);
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    grpc::runtime().block_on(async {
        let channel = grpc::connect(&socket).await;
        let mut client = pb::plugin_client::PluginClient::new(channel);
        let (deliveries, outgoing) = tokio::sync::mpsc::unbounded_channel();
        let mut answers = client
            .handle_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(
                outgoing,
            ))
            .await
            .unwrap()
            .into_inner();
        deliveries.send(delivery(1, "hang", "", "")).unwrap();
        deliveries
            .send(delivery(2, "trace", "", traceparent))
            .unwrap();
        deliveries.send(delivery(3, "k", "three", "")).unwrap();
        let mut got = std::collections::BTreeMap::new();
        for _ in 0..2 {
            let answer = answers.message().await.unwrap().unwrap();
            let result = answer.result.unwrap();
            assert_eq!(result.job_id, format!("job-{}", answer.tag));
            got.insert(answer.tag, String::from_utf8(result.payload).unwrap());
        }
        assert_eq!(
            got[&2], "4bf92f3577b34da6a3ce929d0e0e4736",
            "the delivery's trace"
        );
        assert_eq!(got[&3], "three");

        // Draining: the hung job keeps the plugin up; new deliveries are
        // answered retryable so the conductor takes them elsewhere.
        client
            .shutdown(pb::ShutdownRequest {
                grace: Some(prost_types_duration(Duration::from_secs(30))),
            })
            .await
            .unwrap();
        deliveries.send(delivery(4, "k", "late", "")).unwrap();
        let refused = answers.message().await.unwrap().unwrap();
        assert_eq!(refused.tag, 4);
        let refused = refused.result.unwrap();
        assert_eq!(refused.outcome, pb::job_result::Outcome::Retryable as i32);
        assert!(refused.error.contains("shutting down"), "{}", refused.error);

        // Cancelling the hung job is what lets the drain end long before
        // its 30 s grace; the stream then ends without an answer for it.
        deliveries
            .send(pb::Delivery {
                tag: 1,
                body: Some(pb::delivery::Body::Cancel(pb::Cancel {})),
                traceparent: String::new(),
            })
            .unwrap();
        // Well inside the 30 s grace: the drain did not wait for the hung job.
        let end = tokio::time::timeout(Duration::from_secs(10), answers.message())
            .await
            .expect("the stream outlived the cancel by 10 s: the hung job still runs");
        assert!(end.unwrap_or(None).is_none(), "no answer after a cancel");
    });
    assert_eq!(
        exit_code_within(&mut echo, Duration::from_secs(10)),
        Some(0)
    );
}
