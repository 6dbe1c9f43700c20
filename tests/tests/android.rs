//! The Android bridge through the real conductor and a real worker pool,
//! with simulated phones speaking gRPC over TLS on loopback.

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use demi_e2e::device::{In, Link, Out, Phone, TestCa};
use demi_e2e::fake_fcm::FakeFcm;
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
    /// Wake-ups through this fake FCM, this often at most.
    fcm: Option<(&'static FakeFcm, &'static str)>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            replicas: 2,
            workers: 2,
            bridge: "",
            worker_lines: String::new(),
            fcm: None,
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
        let mut fcm_credential = String::new();
        if let Some((fcm, interval)) = self.fcm {
            let mut settings = std::fs::read_to_string(dir.join("bridge.toml")).unwrap();
            settings.push_str(&format!(
                "[fcm]\nproject = \"demi-test\"\nbase_url = \"{}\"\nwake_interval = \"{interval}\"\n",
                fcm.base_url()
            ));
            std::fs::write(dir.join("bridge.toml"), settings).unwrap();
            secret(&dir.join("fcm.json"), &fcm.key_json());
            fcm_credential = format!(
                "fcm_service_account = \"{}\"\n",
                dir.join("fcm.json").display()
            );
        }
        format!(
            "[plugins.android]\ncommand = \"{}\"\nargs = [\"--config\", \"{}\"]\n\
             jobs = false\nreplicas = {}\nsubmits_to = [\"brain\"]\n\
             startup_timeout = \"30s\"\nshutdown_grace = \"2s\"\n\
             [plugins.android.credentials]\ntls_certificate = \"{}\"\ntls_key = \"{}\"\n{}\
             [plugins.android.restart]\ninitial_delay = \"100ms\"\n\
             [plugins.brain]\ncommand = \"{{echo}}\"\nreplicas = {}\nshutdown_grace = \"1s\"\n{}\n",
            bin("demi-plugin-android").display(),
            settings.display(),
            self.replicas,
            dir.join("cert.pem").display(),
            dir.join("key.pem").display(),
            fcm_credential,
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

impl Bridge {
    /// `devices list`'s columns for `device`.
    fn listed(&self, device: &str) -> Vec<String> {
        let list = String::from_utf8(self.devices(&["list"]).stdout).unwrap();
        list.lines()
            .find(|l| l.split_whitespace().next() == Some(device))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// Waits until `devices list` shows `what` of `device`.
    fn wait_listed(&self, device: &str, what: &str, fine: impl Fn(&[String]) -> bool) {
        let until = Instant::now() + FRAME;
        loop {
            let columns = self.listed(device);
            if fine(&columns) {
                return;
            }
            assert!(
                Instant::now() < until,
                "{device} never showed {what}: {columns:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
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
    // (The Accepted comes from the stream's reading side, so it may come
    // before or after the QueueEmpty of the writing side.)
    let mut link = bridge.connect(&a, 0);
    rt.block_on(link.message("m1", b"hello"));
    let frames = rt.block_on(link.until(FRAME, |f| matches!(f, Out::Message(_))));
    let drained = frames.iter().position(|f| matches!(f, Out::QueueEmpty(_)));
    let answered = frames.iter().position(|f| matches!(f, Out::Message(_)));
    assert!(drained.is_some() && drained < answered, "{frames:?}");
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
    // (The bridge takes a stream's frames in order: m4's Accepted says
    // the ack before it was stored.)
    rt.block_on(link.ack(&[first]));
    for (id, body) in [("m2", "two"), ("m3", "three"), ("m4", "four")] {
        rt.block_on(link.message(id, body.as_bytes()));
    }
    rt.block_on(link.until(
        FRAME,
        |f| matches!(f, Out::Accepted(x) if x.client_message_id == "m4"),
    ));
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

/// What one simulated app saw.
#[derive(Debug, Default)]
struct Ledger {
    /// Its message id → (server id, body) of the answer it kept.
    answers: std::collections::HashMap<String, (u64, Vec<u8>)>,
    deliveries: u64,
    /// An answer delivered again after the app acked it on a stream that
    /// then broke (allowed: the app drops a server id it has seen).
    again_after_reconnect: u64,
    /// Delivered again on the very stream its ack went out on: never.
    again_on_same_stream: u64,
    /// Two server ids for one message: never.
    double_answers: Vec<String>,
    errors: Vec<String>,
    streams: u32,
}

/// An app sending `n` messages `pace` apart, acking every answer at
/// once, reconnecting whenever its stream breaks, until every message
/// has its answer or `deadline`.
async fn app(phone: Phone, name: String, n: usize, pace: Duration, deadline: Instant) -> Ledger {
    use demi_proto::android::v1 as pb;
    use std::collections::HashSet;
    let id = |i: usize| format!("{name}-m{i}");
    let body = |i: usize| format!("{name} says {i}").into_bytes();
    let mut ledger = Ledger::default();
    let mut accepted = HashSet::new();
    let mut acked = HashSet::new();
    let mut sent = 0;
    let mut next_at = tokio::time::Instant::now() + pace.mul_f64(fastrand::f64());
    'outer: while ledger.answers.len() < n && Instant::now() < deadline {
        let mut link = match phone.connect(0).await {
            Ok(link) => link,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        ledger.streams += 1;
        let tx = link.tx.clone();
        let send = |i: usize| {
            let tx = tx.clone();
            let frame = pb::ClientFrame {
                frame: Some(demi_e2e::device::In::Message(pb::ClientMessage {
                    id: id(i),
                    body: body(i),
                })),
            };
            async move {
                let _ = tx.send(frame).await;
            }
        };
        for i in (0..sent).filter(|i| !accepted.contains(&id(*i))) {
            send(i).await;
        }
        let mut acked_here = HashSet::new();
        loop {
            if ledger.answers.len() == n || Instant::now() > deadline {
                break 'outer;
            }
            let frame = tokio::select! {
                () = tokio::time::sleep_until(next_at), if sent < n => {
                    send(sent).await;
                    sent += 1;
                    next_at += pace;
                    continue;
                }
                frame = link.next(Duration::from_secs(30)) => frame,
            };
            match frame {
                Ok(Some(Out::Accepted(a))) => {
                    accepted.insert(a.client_message_id);
                }
                Ok(Some(Out::Message(m))) => {
                    ledger.deliveries += 1;
                    if acked_here.contains(&m.id) {
                        ledger.again_on_same_stream += 1;
                    } else if acked.contains(&m.id) {
                        ledger.again_after_reconnect += 1;
                    }
                    let kept = ledger
                        .answers
                        .entry(m.reply_to.clone())
                        .or_insert((m.id, m.body.clone()));
                    if kept.0 != m.id {
                        ledger.double_answers.push(m.reply_to.clone());
                    }
                    if !m.failure.is_empty() {
                        ledger.errors.push(format!("{}: {}", m.reply_to, m.failure));
                    }
                    link.ack(&[m.id]).await;
                    acked.insert(m.id);
                    acked_here.insert(m.id);
                }
                Ok(Some(Out::Error(e))) => ledger.errors.push(format!("{e:?}")),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'outer;
                }
            }
        }
    }
    for i in 0..n {
        if let Some((_, got)) = ledger.answers.get(&id(i))
            && *got != body(i)
        {
            ledger
                .errors
                .push(format!("{} answered with {got:?}", id(i)));
        }
    }
    ledger
}

#[test]
fn every_message_is_answered_and_delivered_once_through_bridge_worker_and_conductor_kills() {
    const DEVICES: usize = 100;
    const MESSAGES: usize = 50;
    let files = tempfile::tempdir().unwrap();
    let journal = files.path().join("journal.txt");
    let bridge = Setup {
        workers: 3,
        worker_lines: format!("args = [\"--journal\", \"{}\"]", journal.display()),
        ..Setup::default()
    }
    .start();
    let tokens: Vec<String> = (0..DEVICES)
        .map(|i| bridge.add(&format!("phone-{i}")))
        .collect();
    let Bridge {
        mut conductor,
        port,
        ca,
        rt,
    } = bridge;
    let root = conductor.cgroup_root().to_owned();
    let deadline = Instant::now() + Duration::from_secs(240);
    let apps: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(i, token)| {
            let phone = Phone {
                port,
                token: token.clone(),
                ca: Some(ca.ca_pem.clone()),
            };
            rt.spawn(app(
                phone,
                format!("phone-{i}"),
                MESSAGES,
                Duration::from_millis(300),
                deadline,
            ))
        })
        .collect();

    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let (done, root) = (done.clone(), root.clone());
        std::thread::spawn(move || {
            let mut kills = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                let workers = demi_e2e::pids_in_cgroup(&root, "brain");
                if !workers.is_empty() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(
                            workers[fastrand::usize(..workers.len())] as i32,
                        ),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    kills += 1;
                }
            }
            kills
        })
    };
    let kill_a_bridge = || {
        let bridges = demi_e2e::pids_in_cgroup(&root, "android");
        assert!(!bridges.is_empty(), "no bridge replica to kill");
        demi_e2e::signal_pid(bridges[0], nix::sys::signal::Signal::SIGKILL);
    };
    std::thread::sleep(Duration::from_secs(3));
    kill_a_bridge();
    std::thread::sleep(Duration::from_secs(4));
    kill_a_bridge();
    std::thread::sleep(Duration::from_secs(4));
    conductor = conductor.restart();

    let ledgers: Vec<Ledger> = apps
        .into_iter()
        .map(|app| rt.block_on(app).unwrap())
        .collect();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let kills = killer.join().unwrap();

    let answered: usize = ledgers.iter().map(|l| l.answers.len()).sum();
    let deliveries: u64 = ledgers.iter().map(|l| l.deliveries).sum();
    let again: u64 = ledgers.iter().map(|l| l.again_after_reconnect).sum();
    let streams: u32 = ledgers.iter().map(|l| l.streams).sum();
    eprintln!(
        "{answered} of {} messages answered; {deliveries} deliveries ({again} again after a \
         reconnect), {streams} streams, {kills} worker kills",
        DEVICES * MESSAGES
    );
    for (i, ledger) in ledgers.iter().enumerate() {
        assert_eq!(ledger.answers.len(), MESSAGES, "phone-{i}: {ledger:?}");
        assert!(ledger.errors.is_empty(), "phone-{i}: {:?}", ledger.errors);
        assert!(
            ledger.double_answers.is_empty(),
            "phone-{i}: {:?}",
            ledger.double_answers
        );
        assert_eq!(ledger.again_on_same_stream, 0, "phone-{i}");
    }
    // The worker pool's ledger: one job per message, however often each
    // was sent, accepted or retried.
    let jobs = demi_e2e::journal_completed(&journal);
    assert_eq!(
        jobs.len(),
        DEVICES * MESSAGES,
        "jobs answered by the workers"
    );
    assert!(kills >= 10, "{kills} worker kills");
    drop(conductor);
}

/// `bystander` still gets its answers.
fn still_answered(bystander: &mut Link, rt: &tokio::runtime::Runtime, id: &str) {
    rt.block_on(bystander.message(id, id.as_bytes()));
    let frames = rt.block_on(bystander.until(FRAME, |f| matches!(f, Out::Message(_))));
    let got = answers(&frames);
    assert_eq!((got[0].1.as_str(), got[0].2.as_str()), (id, id));
    rt.block_on(bystander.ack(&[got[0].0]));
}

#[test]
fn a_bad_frame_ends_its_own_stream_with_a_clear_status_and_nobody_else_notices() {
    use demi_proto::android::v1 as pb;
    use prost::Message as _;
    let bridge = Setup {
        replicas: 1,
        ..Setup::default()
    }
    .start();
    let rt = &bridge.rt;
    let (bad, good) = (bridge.add("bad"), bridge.add("good"));
    let mut bystander = bridge.connect(&good, 0);
    rt.block_on(bystander.until(FRAME, is_queue_empty));
    let phone = bridge.phone(&bad);
    let frame =
        |frame: demi_e2e::device::In| pb::ClientFrame { frame: Some(frame) }.encode_to_vec();
    let hello = frame(demi_e2e::device::In::Hello(pb::Hello::default()));
    let message = |id: &str, size: usize| {
        frame(demi_e2e::device::In::Message(pb::ClientMessage {
            id: id.into(),
            body: vec![b'x'; size],
        }))
    };
    let within = Duration::from_secs(5);

    // (what, frames, the status code it ends with, words in its message)
    let ending = [
        (
            "a frame over max_frame (64 KiB)",
            vec![hello.clone(), message("big", 70 * 1024)],
            Code::OutOfRange,
            "too large",
        ),
        (
            "garbage bytes",
            vec![hello.clone(), vec![0xff; 24]],
            Code::InvalidArgument,
            "not a ClientFrame",
        ),
        (
            "a message before the hello",
            vec![message("early", 10)],
            Code::InvalidArgument,
            "first frame",
        ),
    ];
    for (what, frames, code, words) in ending {
        let (_, status) = rt.block_on(phone.raw(frames, within));
        let status = status.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(status.message().contains(words), "{what}: {status:?}");
        still_answered(
            &mut bystander,
            rt,
            &format!("after {what}").replace(' ', "-"),
        );
    }

    // Frames the bridge does not know (fields of a newer app) and a
    // message without an id are refused one by one; the stream goes on.
    let unknown_field = vec![0x98, 0x06, 0x01];
    let (seen, open) = rt.block_on(phone.raw(
        vec![
            hello.clone(),
            unknown_field,
            message("", 3),
            message("fine", 4),
        ],
        within,
    ));
    assert!(open.is_ok(), "{open:?}");
    let errors: Vec<(i32, String)> = seen
        .iter()
        .filter_map(|f| match &f.frame {
            Some(Out::Error(e)) => Some((e.code, e.message.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(errors.len(), 2, "{seen:?}");
    assert_eq!(errors[0].0, Code::Unimplemented as i32, "{errors:?}");
    assert_eq!(errors[1].0, Code::InvalidArgument as i32, "{errors:?}");
    assert!(
        seen.iter()
            .any(|f| matches!(&f.frame, Some(Out::Message(m)) if m.reply_to == "fine")),
        "the stream went on: {seen:?}"
    );

    // An app that never reads: its stream is ended after the stall
    // timeout (3 s here) and what it did not read waits in the outbox,
    // not in the bridge's memory. Measured against the same traffic to
    // an app that reads, so what the allocator keeps after handling 9 MiB
    // of messages is in both.
    let pid = demi_e2e::pids_in_cgroup(bridge.conductor.cgroup_root(), "android")[0];
    let big = vec![b'y'; 60 * 1024];
    // The same 9 MiB through an app that reads and acks everything.
    let mut reader = bridge.connect(&bad, 0);
    for i in 0..150 {
        rt.block_on(reader.message(&format!("read-{i}"), &big));
    }
    let mut read = Vec::new();
    rt.block_on(reader.until(FRAME, |f| {
        if let Out::Message(m) = f
            && m.reply_to.starts_with("read-")
        {
            read.push(m.id);
        }
        read.len() == 150
    }));
    rt.block_on(reader.ack(&read));
    // 9 MiB of answers for an app that went away before reading them.
    let mut accepted = 0;
    for i in 0..150 {
        rt.block_on(reader.message(&format!("deaf-{i}"), &big));
    }
    rt.block_on(reader.until(FRAME, |f| {
        accepted +=
            usize::from(matches!(f, Out::Accepted(a) if a.client_message_id.starts_with("deaf-")));
        accepted == 150
    }));
    drop(reader);
    let waiting = || {
        let list = String::from_utf8(bridge.devices(&["list"]).stdout).unwrap();
        let line = list
            .lines()
            .find(|l| l.starts_with("bad "))
            .unwrap_or_default()
            .to_owned();
        line.split_whitespace()
            .nth(2)
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    };
    let until = Instant::now() + FRAME;
    while waiting() < 150 {
        assert!(Instant::now() < until, "the answers never all waited");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = demi_e2e::rss_kib(pid);
    let deaf = bridge.connect(&bad, 0);
    bridge
        .conductor
        .wait_for(0, "the bridge ending the deaf app's stream", |e| {
            e["plugin"] == "android"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("the device reads nothing"))
        });
    let grew = demi_e2e::rss_kib(pid).saturating_sub(before);
    still_answered(&mut bystander, rt, "after-a-deaf-app");
    drop(deaf);
    let mut link = bridge.connect(&bad, 0);
    let mut got = std::collections::BTreeSet::new();
    rt.block_on(link.until(FRAME, |f| {
        if let Out::Message(m) = f
            && m.reply_to.starts_with("deaf-")
        {
            got.insert(m.reply_to.clone());
        }
        got.len() == 150
    }));
    eprintln!("the bridge grew by {grew} KiB while 9 MiB of answers waited for a deaf app");
    assert!(grew < 4 * 1024, "the bridge grew by {grew} KiB");
}

/// Connects `token`'s app with FCM registration `registration`, sends
/// `ids`, and goes away as soon as all are accepted.
fn send_and_leave(bridge: &Bridge, token: &str, registration: &str, ids: &[String]) {
    let rt = &bridge.rt;
    let mut link = bridge.connect(token, 0);
    rt.block_on(link.send(In::Register(demi_proto::android::v1::Register {
        fcm_token: registration.into(),
    })));
    for id in ids {
        rt.block_on(link.message(id, format!("secret {id}").as_bytes()));
    }
    let mut accepted = 0;
    rt.block_on(link.until(FRAME, |f| {
        accepted += usize::from(matches!(f, Out::Accepted(_)));
        accepted == ids.len()
    }));
}

#[test]
fn an_away_device_is_woken_without_content_once_per_interval_and_its_token_follows_fcm() {
    let fcm: &'static FakeFcm = Box::leak(Box::new(FakeFcm::start("demi-test")));
    let bridge = Setup {
        worker_lines: "args = [\"--delay\", \"400ms\"]\n\
                       [plugins.brain.dispatch]\nmax_in_flight_per_replica = 1"
            .into(),
        fcm: Some((fcm, "1s")),
        ..Setup::default()
    }
    .start();
    let rt = &bridge.rt;
    let token = bridge.add("pixel");
    let ids: Vec<String> = (0..12).map(|i| format!("w{i}")).collect();
    send_and_leave(&bridge, &token, "reg-1", &ids);
    // 12 answers over ~2.4 s (400 ms each on 2 workers), all while away.
    bridge.wait_listed("pixel", "12 waiting", |c| {
        c.get(2).is_some_and(|n| n == "12")
    });
    let sends = fcm.sends();
    let gaps: Vec<Duration> = sends.windows(2).map(|w| w[1].at - w[0].at).collect();
    eprintln!(
        "{} wake-ups, {gaps:?} apart; {} OAuth2 grants",
        sends.len(),
        fcm.grants()
    );
    assert!(sends.len() >= 2, "{sends:?}");
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(950)),
        "{gaps:?}"
    );
    for send in &sends {
        assert_eq!(send.token, "reg-1");
        let text = send.message.to_string();
        assert!(
            !text.contains("secret") && send.message.get("notification").is_none(),
            "{text}"
        );
        assert_eq!(send.message["android"]["priority"], "HIGH");
    }
    assert_eq!(
        fcm.grants(),
        1,
        "the access token is reused until it expires"
    );

    // Back: the backlog in order, then queue_empty.
    let mut link = bridge.connect(&token, 0);
    let frames = rt.block_on(link.until(FRAME, is_queue_empty));
    let got = answers(&frames);
    assert_eq!(got.len(), 12);
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(
        got.iter()
            .all(|(_, to, body)| *body == format!("secret {to}"))
    );
    rt.block_on(link.ack(&got.iter().map(|a| a.0).collect::<Vec<_>>()));
    bridge.wait_listed("pixel", "nothing waiting", |c| {
        c.get(2).is_some_and(|n| n == "0")
    });
    drop(link);

    // FCM says the registration is gone: the token is forgotten and the
    // next answer wakes nobody.
    fcm.script(
        404,
        None,
        r#"{"error":{"code":404,"message":"Requested entity was not found.","status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#,
    );
    let before = fcm.sends().len();
    send_and_leave(&bridge, &token, "reg-2", &["u1".into()]);
    bridge.wait_listed("pixel", "no FCM token", |c| {
        c.get(4).is_some_and(|f| f == "no")
    });
    let mut link = bridge.connect(&token, 0);
    let frames = rt.block_on(link.until(FRAME, is_queue_empty));
    rt.block_on(link.ack(&answers(&frames).iter().map(|a| a.0).collect::<Vec<_>>()));
    bridge.wait_listed("pixel", "nothing waiting", |c| {
        c.get(2).is_some_and(|n| n == "0")
    });
    drop(link);
    send_and_leave(&bridge, &token, "", &["u2".into()]);
    bridge.wait_listed("pixel", "u2 waiting", |c| {
        c.get(2).is_some_and(|n| n == "1")
    });
    let sends = fcm.sends();
    assert_eq!(
        sends.len(),
        before + 1,
        "one (refused) wake-up, then none: {sends:?}"
    );
    assert_eq!(sends[before].status, 404);

    // Overloaded: a 429 with Retry-After: 2 is tried again 2 s later.
    let mut link = bridge.connect(&token, 0);
    let frames = rt.block_on(link.until(FRAME, is_queue_empty));
    rt.block_on(link.ack(&answers(&frames).iter().map(|a| a.0).collect::<Vec<_>>()));
    bridge.wait_listed("pixel", "nothing waiting", |c| {
        c.get(2).is_some_and(|n| n == "0")
    });
    drop(link);
    fcm.script(
        429,
        Some(2),
        r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED"}}"#,
    );
    send_and_leave(&bridge, &token, "reg-3", &["v1".into()]);
    let until = Instant::now() + FRAME;
    while fcm.sends().len() < before + 3 {
        assert!(Instant::now() < until, "{:?}", fcm.sends());
        std::thread::sleep(Duration::from_millis(100));
    }
    let sends = fcm.sends();
    let (busy, again) = (&sends[before + 1], &sends[before + 2]);
    assert_eq!(
        (busy.status, again.status, again.token.as_str()),
        (429, 200, "reg-3")
    );
    assert!(
        again.at - busy.at >= Duration::from_secs(2),
        "{:?}",
        again.at - busy.at
    );
}

#[test]
fn the_example_bridge_checks_out() {
    let examples = demi_e2e::repo_root().join("examples");
    let check = |settings: &std::path::Path| {
        std::process::Command::new(bin("demi-plugin-android"))
            .arg("--config")
            .arg(settings)
            .arg("--check")
            .output()
            .unwrap()
    };
    let out = check(&examples.join("android-bridge.toml"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bridge.toml");
    std::fs::write(
        &bad,
        "listen = \"127.0.0.1:1\"\nreply_pool = \"brain\"\nmessage_ttl = \"soon\"\n",
    )
    .unwrap();
    let out = check(&bad);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{said}");
    assert!(
        said.contains("bridge.toml: TOML parse error at line 3, column 15"),
        "{said}"
    );

    // The conductor's side, with a certificate and key beside it.
    let config = std::fs::read_to_string(examples.join("android.toml"))
        .unwrap()
        .replace(
            "../target/debug/",
            &format!("{}/", demi_e2e::bin_dir().display()),
        );
    std::fs::write(dir.path().join("android.toml"), config).unwrap();
    std::fs::copy(
        examples.join("android-bridge.toml"),
        dir.path().join("android-bridge.toml"),
    )
    .unwrap();
    let ca = TestCa::new();
    secret(&dir.path().join("android.crt"), &ca.cert_pem);
    secret(&dir.path().join("android.key"), &ca.key_pem);
    let out = std::process::Command::new(bin("conductor"))
        .arg("check-config")
        .arg(dir.path().join("android.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok (2 plugins, 4 instances)"), "{stdout}");
}
