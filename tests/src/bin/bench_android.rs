//! What the Android bridge costs: idle device streams held by one bridge
//! replica (RSS and CPU per 1,000), and messages round trip device →
//! bridge → conductor → echo pool → outbox → device, beside the same pool
//! fed by direct `SubmitAndWait` calls, in one run. Run with
//! `scripts/bench/android [IDLE_STREAMS] [MESSAGES]`.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use demi_e2e::bench::{cpu_seconds, percentile, submit_and_wait, write_results};
use demi_e2e::device::{Link, Out, Phone, TestCa};
use demi_e2e::{Conductor, bin, pids_in_cgroup, rss_kib};

const WORKERS: u32 = 4;
/// Devices sending in the round-trip run, each one message at a time.
const ACTIVE: usize = 64;
/// How long the idle streams are watched for CPU (`BENCH_IDLE_WATCH`
/// seconds overrides).
fn idle_watch() -> Duration {
    let seconds = std::env::var("BENCH_IDLE_WATCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(seconds)
}

fn secret(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn plugins(dir: &std::path::Path, port: u16, ca: &TestCa) -> String {
    std::fs::write(
        dir.join("bridge.toml"),
        format!("listen = \"127.0.0.1:{port}\"\nreply_pool = \"brain\"\n"),
    )
    .expect("bridge settings");
    secret(&dir.join("cert.pem"), &ca.cert_pem);
    secret(&dir.join("key.pem"), &ca.key_pem);
    format!(
        "[plugins.android]\ncommand = \"{}\"\nargs = [\"--config\", \"{}\"]\njobs = false\n\
         replicas = 1\nsubmits_to = [\"brain\"]\nstartup_timeout = \"60s\"\n\
         [plugins.android.credentials]\ntls_certificate = \"{}\"\ntls_key = \"{}\"\n\
         [plugins.brain]\ncommand = \"{{echo}}\"\nreplicas = {WORKERS}\n\
         [plugins.brain.dispatch]\nqueue_capacity = 100000\nmax_in_flight = 1024\n\
         max_in_flight_per_replica = 256\n",
        bin("demi-plugin-android").display(),
        dir.join("bridge.toml").display(),
        dir.join("cert.pem").display(),
        dir.join("key.pem").display(),
    )
}

/// Tokens for `names`, added in batches through the operator's command.
fn add_devices(state: &std::path::Path, names: &[String]) -> HashMap<String, String> {
    let mut tokens = HashMap::new();
    for batch in names.chunks(1000) {
        let out = std::process::Command::new(bin("demi-plugin-android"))
            .arg("devices")
            .arg("--state")
            .arg(state)
            .arg("add")
            .args(batch)
            .output()
            .expect("devices add");
        assert!(out.status.success(), "{out:?}");
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((name, token)) = line.split_once(' ') {
                tokens.insert(name.to_owned(), token.to_owned());
            } else if batch.len() == 1 {
                tokens.insert(batch[0].clone(), line.to_owned());
            }
        }
    }
    tokens
}

/// Opens a stream for every phone and waits for each one's queue_empty.
async fn open_all(phones: Vec<Phone>) -> Vec<Link> {
    let mut links = Vec::with_capacity(phones.len());
    for batch in phones.chunks(256) {
        let mut set = tokio::task::JoinSet::new();
        for phone in batch {
            let phone = phone.clone();
            set.spawn(async move {
                let mut link = phone.connect(0).await.expect("connect");
                link.until(Duration::from_secs(60), |f| matches!(f, Out::QueueEmpty(_)))
                    .await;
                link
            });
        }
        while let Some(link) = set.join_next().await {
            links.push(link.expect("a stream"));
        }
    }
    links
}

/// `n` messages from the `links`, each device one at a time: sorted
/// latencies from send to answer, and the seconds the whole took. `run`
/// makes the message ids new: a message sent again gets no new answer.
async fn round_trips(links: Vec<Link>, n: usize, run: &str) -> (Vec<Duration>, f64) {
    let per_device = n.div_ceil(links.len());
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for (d, mut link) in links.into_iter().enumerate() {
        let run = run.to_owned();
        set.spawn(async move {
            let mut latencies = Vec::with_capacity(per_device);
            for i in 0..per_device {
                let id = format!("{run}-d{d}-{i}");
                let t = Instant::now();
                link.message(&id, br#"{"text":"bench"}"#).await;
                let mut answer = 0;
                link.until(Duration::from_secs(60), |f| match f {
                    Out::Message(m) if m.reply_to == id => {
                        answer = m.id;
                        true
                    }
                    _ => false,
                })
                .await;
                latencies.push(t.elapsed());
                link.ack(&[answer]).await;
            }
            latencies
        });
    }
    let mut latencies = Vec::new();
    while let Some(mine) = set.join_next().await {
        latencies.extend(mine.expect("a device"));
    }
    latencies.sort();
    (latencies, started.elapsed().as_secs_f64())
}

fn main() {
    let idle: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let messages: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    // Every idle stream is a connection, here as on the bridge.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let ca = TestCa::new();
    let conductor = Conductor::builder()
        .log("warn,demi_conductor=info")
        .start(&plugins(dir.path(), port, &ca));
    conductor.wait_serving(0, "android", 0);
    let state = conductor.folder().join("state/plugins/android");
    let names: Vec<String> = (0..idle + ACTIVE).map(|i| format!("phone-{i}")).collect();
    let added = Instant::now();
    let tokens = add_devices(&state, &names);
    let add_seconds = added.elapsed().as_secs_f64();
    let phone = |name: &String| Phone {
        port,
        token: tokens[name].clone(),
        ca: Some(ca.ca_pem.clone()),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let bridge = pids_in_cgroup(conductor.cgroup_root(), "android")[0];

    // Idle streams.
    let rss_before = rss_kib(bridge);
    let connect_started = Instant::now();
    let idle_links = runtime.block_on(open_all(names[..idle].iter().map(phone).collect()));
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    let rss_idle = rss_kib(bridge);
    let cpu_before = cpu_seconds(bridge);
    let watch = idle_watch();
    std::thread::sleep(watch);
    let idle_cpu = (cpu_seconds(bridge) - cpu_before) / watch.as_secs_f64().max(1e-3);
    let per_thousand = |x: f64| x / idle.max(1) as f64 * 1000.0;
    let rss_per_thousand = per_thousand((rss_idle.saturating_sub(rss_before)) as f64) / 1024.0;
    let cpu_per_thousand = per_thousand(idle_cpu) * 100.0;
    drop(idle_links);

    // Round trips, then the pool alone.
    let active = runtime.block_on(open_all(names[idle..].iter().map(phone).collect()));
    runtime.block_on(round_trips(active, ACTIVE * 10, "warm"));
    let active = runtime.block_on(open_all(names[idle..].iter().map(phone).collect()));
    let cpu_before = cpu_seconds(bridge);
    let (bridge_latencies, bridge_seconds) = runtime.block_on(round_trips(active, messages, "run"));
    let bridge_cpu = cpu_seconds(bridge) - cpu_before;
    runtime.block_on(submit_and_wait(
        &conductor,
        "brain",
        b"{}",
        ACTIVE * 10,
        ACTIVE,
        Duration::ZERO,
    ));
    let (pool_latencies, pool_seconds) = runtime.block_on(submit_and_wait(
        &conductor,
        "brain",
        br#"{"text":"bench"}"#,
        messages,
        ACTIVE,
        Duration::ZERO,
    ));

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let rate = |l: &[Duration], s: f64| l.len() as f64 / s;
    let (bridge_rate, pool_rate) = (
        rate(&bridge_latencies, bridge_seconds),
        rate(&pool_latencies, pool_seconds),
    );
    println!("android benchmark: 1 bridge replica, {WORKERS} echo workers");
    println!(
        "{idle} idle device streams (TLS, one connection each): connected in {connect_seconds:.1} s; \
         bridge RSS {} -> {} MiB: {rss_per_thousand:.1} MiB per 1,000 streams; \
         CPU {:.2} % of a core idle: {cpu_per_thousand:.3} % per 1,000 streams",
        rss_before / 1024,
        rss_idle / 1024,
        idle_cpu * 100.0
    );
    println!("({} devices added in {add_seconds:.1} s)", idle + ACTIVE);
    println!(
        "{:<44} {:>9} {:>8} {:>8}",
        format!("{messages} messages, {ACTIVE} at a time"),
        "msgs/s",
        "p50 ms",
        "p99 ms"
    );
    for (name, latencies, rate) in [
        (
            "device -> bridge -> pool -> outbox -> device",
            &bridge_latencies,
            bridge_rate,
        ),
        ("SubmitAndWait -> pool", &pool_latencies, pool_rate),
    ] {
        println!(
            "{name:<44} {rate:>9.0} {:>8.2} {:>8.2}",
            ms(percentile(latencies, 0.5)),
            ms(percentile(latencies, 0.99))
        );
    }
    println!(
        "bridge / direct throughput: {:.0} %; bridge CPU {:.0} µs per message",
        bridge_rate / pool_rate * 100.0,
        bridge_cpu * 1e6 / messages.max(1) as f64
    );
    write_results(
        "android",
        &serde_json::json!({
            "idle_streams": idle,
            "connect_seconds": connect_seconds,
            "rss_kib_before": rss_before, "rss_kib_idle": rss_idle,
            "rss_mib_per_1000_streams": rss_per_thousand,
            "idle_cpu_percent": idle_cpu * 100.0,
            "cpu_percent_per_1000_streams": cpu_per_thousand,
            "messages": messages, "active_devices": ACTIVE,
            "bridge": {"msgs_per_s": bridge_rate, "p50_ms": ms(percentile(&bridge_latencies, 0.5)),
                       "p99_ms": ms(percentile(&bridge_latencies, 0.99)),
                       "cpu_us_per_message": bridge_cpu * 1e6 / messages.max(1) as f64},
            "direct": {"msgs_per_s": pool_rate, "p50_ms": ms(percentile(&pool_latencies, 0.5)),
                       "p99_ms": ms(percentile(&pool_latencies, 0.99))},
            "ratio": bridge_rate / pool_rate,
        }),
    );
}
