//! The Android bridge through the real conductor and a real worker pool,
//! with simulated phones speaking gRPC over TLS on loopback.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use demi_e2e::device::{Link, Out, Phone, TestCa};
use demi_e2e::{Conductor, bin};
use tonic::Code;

const FRAME: Duration = Duration::from_secs(15);

struct Setup {
    replicas: u32,
    workers: u32,
    /// Extra lines for the bridge's own settings.
    bridge: &'static str,
    /// Extra lines for the workers' table.
    worker_lines: String,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            replicas: 2,
            workers: 2,
            bridge: "",
            worker_lines: String::new(),
        }
    }
}

struct Bridge {
    conductor: Conductor,
    port: u16,
    ca: TestCa,
    rt: tokio::runtime::Runtime,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn secret(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

impl Setup {
    fn plugins(&self, dir: &std::path::Path, port: u16, ca: &TestCa) -> String {
        let settings = dir.join("bridge.toml");
        std::fs::write(
            &settings,
            format!(
                "listen = \"127.0.0.1:{port}\"\nreply_pool = \"brain\"\nstall_timeout = \"3s\"\n{}",
                self.bridge
            ),
        )
        .unwrap();
        secret(&dir.join("cert.pem"), &ca.cert_pem);
        secret(&dir.join("key.pem"), &ca.key_pem);
        format!(
            "[plugins.android]\ncommand = \"{}\"\nargs = [\"--config\", \"{}\"]\n\
             jobs = false\nreplicas = {}\nsubmits_to = [\"brain\"]\n\
             startup_timeout = \"30s\"\nshutdown_grace = \"2s\"\n\
             [plugins.android.credentials]\ntls_certificate = \"{}\"\ntls_key = \"{}\"\n\
             [plugins.android.restart]\ninitial_delay = \"100ms\"\n\
             [plugins.brain]\ncommand = \"{{echo}}\"\nreplicas = {}\nshutdown_grace = \"1s\"\n{}\n",
            bin("demi-plugin-android").display(),
            settings.display(),
            self.replicas,
            dir.join("cert.pem").display(),
            dir.join("key.pem").display(),
            self.workers,
            self.worker_lines,
        )
    }

    fn start(self) -> Bridge {
        let files = tempfile::tempdir().unwrap();
        let port = free_port();
        let ca = TestCa::new();
        let conductor = Conductor::start(&self.plugins(files.path(), port, &ca));
        for index in 0..self.replicas {
            conductor.wait_serving(0, "android", index);
        }
        // The settings and keys were read at start.
        std::mem::forget(files);
        Bridge {
            conductor,
            port,
            ca,
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        }
    }
}

impl Bridge {
    fn state(&self) -> PathBuf {
        self.conductor.folder().join("state/plugins/android")
    }

    fn devices(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(bin("demi-plugin-android"))
            .arg("devices")
            .arg("--state")
            .arg(self.state())
            .args(args)
            .output()
            .unwrap()
    }

    /// A new device's token.
    fn add(&self, name: &str) -> String {
        let out = self.devices(&["add", name]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    fn phone(&self, token: &str) -> Phone {
        Phone {
            port: self.port,
            token: token.to_owned(),
            ca: Some(self.ca.ca_pem.clone()),
        }
    }

    fn connect(&self, token: &str, since: u64) -> Link {
        let phone = self.phone(token);
        self.rt.block_on(phone.connect(since)).expect("connect")
    }
}

fn is_queue_empty(frame: &Out) -> bool {
    matches!(frame, Out::QueueEmpty(_))
}

/// The answers among `frames`, as (server id, reply_to, body).
fn answers(frames: &[Out]) -> Vec<(u64, String, String)> {
    frames
        .iter()
        .filter_map(|f| match f {
            Out::Message(m) => Some((
                m.id,
                m.reply_to.clone(),
                String::from_utf8_lossy(&m.body).into_owned(),
            )),
            _ => None,
        })
        .collect()
}

fn ended_with(link: &mut Link, rt: &tokio::runtime::Runtime, within: Duration) -> tonic::Status {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rt.block_on(link.next(left)) {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended without a status"),
            Err(status) => return status,
        }
    }
}

#[test]
fn devices_get_their_answers_once_over_tls_now_or_after_a_reconnect_and_only_theirs() {
    let bridge = Setup::default().start();
    let (a, b) = (bridge.add("pixel"), bridge.add("tablet"));
    let rt = &bridge.rt;

    // A message, its Accepted, and its answer after the drained backlog.
    let mut link = bridge.connect(&a, 0);
    rt.block_on(link.message("m1", b"hello"));
    let frames = rt.block_on(link.until(FRAME, |f| matches!(f, Out::Message(_))));
    assert!(matches!(frames[0], Out::QueueEmpty(_)), "{frames:?}");
    assert!(
        frames
            .iter()
            .any(|f| matches!(f, Out::Accepted(x) if x.client_message_id == "m1")),
        "{frames:?}"
    );
    let got = answers(&frames);
    assert_eq!((got[0].1.as_str(), got[0].2.as_str()), ("m1", "hello"));
    let first = got[0].0;

    // Three more, then the app goes away before acking any answer: they
    // wait in the outbox and come again, in order, after the reconnect.
    for (id, body) in [("m2", "two"), ("m3", "three"), ("m4", "four")] {
        rt.block_on(link.message(id, body.as_bytes()));
    }
    rt.block_on(link.until(
        FRAME,
        |f| matches!(f, Out::Accepted(x) if x.client_message_id == "m4"),
    ));
    rt.block_on(link.ack(&[first]));
    drop(link);
    std::thread::sleep(Duration::from_millis(1500));
    let mut link = bridge.connect(&a, 0);
    let frames = rt.block_on(link.until(FRAME, is_queue_empty));
    // Two workers answer in any order; the outbox keeps the order in
    // which answers were stored, and the backlog comes in that order.
    let mut backlog: Vec<(String, String)> = answers(&frames)
        .into_iter()
        .map(|(_, to, body)| (to, body))
        .collect();
    backlog.sort();
    assert_eq!(
        backlog,
        [("m2", "two"), ("m3", "three"), ("m4", "four")]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .to_vec(),
        "the backlog, without the acked answer"
    );
    let ids: Vec<u64> = answers(&frames).iter().map(|a| a.0).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in server-id order: {ids:?}"
    );

    // Device B cannot ack A's answers (nor see them).
    let mut other = bridge.connect(&b, 0);
    let frames = rt.block_on(other.until(FRAME, is_queue_empty));
    assert_eq!(answers(&frames), vec![], "B sees none of A's answers");
    rt.block_on(other.ack(&[ids[0]]));
    match rt.block_on(other.next(FRAME)) {
        Ok(Some(Out::Error(e))) => {
            assert_eq!(
                (e.code, e.server_id),
                (Code::PermissionDenied as i32, ids[0]),
                "{e:?}"
            )
        }
        other => panic!("expected PERMISSION_DENIED, got {other:?}"),
    }

    // `since` skips what the app already has; acks delete for good.
    drop(link);
    let mut link = bridge.connect(&a, ids[0]);
    let frames = rt.block_on(link.until(FRAME, is_queue_empty));
    assert_eq!(
        answers(&frames).iter().map(|a| a.0).collect::<Vec<_>>(),
        ids[1..].to_vec()
    );
    rt.block_on(link.ack(&ids));
    // A message sent again after its answer was acked is neither a new
    // job nor a new answer.
    rt.block_on(link.message("m1", b"hello"));
    rt.block_on(link.until(
        FRAME,
        |f| matches!(f, Out::Accepted(x) if x.client_message_id == "m1"),
    ));
    assert!(
        matches!(rt.block_on(link.next(Duration::from_secs(2))), Err(s) if s.code() == Code::DeadlineExceeded),
        "no second answer to m1"
    );
    drop(link);
    let mut link = bridge.connect(&a, 0);
    let frames = rt.block_on(link.until(FRAME, is_queue_empty));
    assert_eq!(answers(&frames), vec![], "all acked");
    drop(link);

    let jobs = bridge.conductor.scrape();
    let submitted: f64 = jobs
        .lines()
        .filter(|l| l.starts_with("demi_jobs_submitted_total") && l.contains("brain"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(submitted, 4.0, "one job per message: {jobs}");

    let list = String::from_utf8(bridge.devices(&["list"]).stdout).unwrap();
    assert!(list.contains("pixel") && list.contains("tablet"), "{list}");
}

#[test]
fn only_a_live_token_connects_a_revoked_one_is_cut_off_and_the_newer_stream_wins() {
    let bridge = Setup::default().start();
    let rt = &bridge.rt;
    let token = bridge.add("pixel");
    let other = bridge.add("tablet");

    for (what, token) in [("no token", ""), ("a wrong token", "demi_dev_not-a-token")] {
        let status = rt
            .block_on(bridge.phone(token).connect(0))
            .err()
            .unwrap_or_else(|| panic!("{what} connected"));
        assert_eq!(status.code(), Code::Unauthenticated, "{what}: {status:?}");
    }
    // A plaintext client against the TLS listener does not get in.
    let plain = Phone {
        ca: None,
        ..bridge.phone(&token)
    };
    let refused = rt.block_on(async {
        let mut link = plain.connect(0).await?;
        link.next(Duration::from_secs(5)).await
    });
    assert!(refused.is_err(), "plaintext got through: {refused:?}");

    // The newer stream of a device ends the older one, on either replica.
    let mut older = bridge.connect(&token, 0);
    rt.block_on(older.until(FRAME, is_queue_empty));
    let mut newer = bridge.connect(&token, 0);
    rt.block_on(newer.until(FRAME, is_queue_empty));
    let status = ended_with(&mut older, rt, Duration::from_secs(2));
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("newer"), "{status:?}");

    // Revoked mid-stream: cut off within a second, and nothing goes in.
    let mut bystander = bridge.connect(&other, 0);
    rt.block_on(bystander.until(FRAME, is_queue_empty));
    let revoked_at = Instant::now();
    let out = bridge.devices(&["revoke", "pixel"]);
    assert!(out.status.success(), "{out:?}");
    let status = ended_with(&mut newer, rt, Duration::from_secs(1));
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    let status = rt.block_on(bridge.phone(&token).connect(0)).err().unwrap();
    assert_eq!(status.code(), Code::Unauthenticated);

    // The other device never noticed.
    rt.block_on(bystander.message("b1", b"still here"));
    let frames = rt.block_on(bystander.until(FRAME, |f| matches!(f, Out::Message(_))));
    assert_eq!(answers(&frames)[0].2, "still here");
}
