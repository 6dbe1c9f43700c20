//! Dispatch throughput and latency: jobs through the conductor
//! (`SubmitAndWait`) against direct `Handle` calls to the same echo
//! replicas, side by side in one run. Run with `scripts/bench/dispatch`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use demi_e2e::Conductor;
use demi_e2e::grpc::{self, admin_pb, pb};

const REPLICAS: u32 = 4;
const CONCURRENCY: usize = 256;

struct Run {
    jobs: usize,
    seconds: f64,
    latencies: Vec<Duration>,
    /// CPU seconds spent during the run by the caller (this process), the
    /// conductor and the replicas.
    cpu: [f64; 3],
}

impl Run {
    fn rate(&self) -> f64 {
        self.jobs as f64 / self.seconds
    }

    /// Microseconds of CPU per job, per party.
    fn cpu_per_job(&self) -> [f64; 3] {
        self.cpu.map(|s| s * 1e6 / self.jobs.max(1) as f64)
    }

    fn percentile(&self, p: f64) -> Duration {
        demi_e2e::bench::percentile(&self.latencies, p)
    }
}

/// The caller, the conductor and the replicas (the conductor's children).
#[derive(Clone)]
struct Parties {
    conductor: u32,
    replicas: Vec<u32>,
}

impl Parties {
    fn of(conductor: u32) -> Self {
        let replicas = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                    stat.rsplit_once(") ")
                        .and_then(|(_, rest)| rest.split(' ').nth(1).map(str::to_owned))
                        .is_some_and(|ppid| ppid == conductor.to_string())
                })
            })
            .collect();
        Self {
            conductor,
            replicas,
        }
    }

    fn cpu(&self) -> [f64; 3] {
        [
            demi_e2e::bench::cpu_seconds(std::process::id()),
            demi_e2e::bench::cpu_seconds(self.conductor),
            self.replicas
                .iter()
                .map(|&p| demi_e2e::bench::cpu_seconds(p))
                .sum(),
        ]
    }
}

/// Runs `CONCURRENCY` loops of `call` for `duration`.
async fn load<F, Fut>(parties: &Parties, duration: Duration, call: F) -> Run
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    let cpu_before = parties.cpu();
    let started = Instant::now();
    for worker in 0..CONCURRENCY {
        let (call, stop) = (call.clone(), stop.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                call(worker * 1_000_000 + n).await;
                latencies.push(t.elapsed());
                n += 1;
            }
            latencies
        });
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    while let Some(mine) = tasks.join_next().await {
        latencies.extend(mine.unwrap_or_default());
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_after = parties.cpu();
    latencies.sort();
    Run {
        jobs: latencies.len(),
        seconds,
        latencies,
        cpu: [0, 1, 2].map(|i| cpu_after[i] - cpu_before[i]),
    }
}

fn main() {
    let seconds: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let duration = Duration::from_secs(seconds);
    // Quiet, but for the line that says the admin API is up.
    let conductor = Conductor::builder().log("warn,demi_conductor::api=info").start(&format!(
        "[plugins.echo]\ncommand = \"{{echo}}\"\nreplicas = {REPLICAS}\n\
         [plugins.echo.dispatch]\nqueue_capacity = 100000\nmax_in_flight = 1024\nmax_in_flight_per_replica = 256\n"
    ));
    for i in 0..REPLICAS {
        let socket = conductor.socket("echo", i);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "echo-{i} never came up");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let parties = Parties::of(conductor.pid());
    assert_eq!(
        parties.replicas.len(),
        REPLICAS as usize,
        "replicas among the conductor's children"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (direct, through) = runtime.block_on(async {
        // Warm up both paths (connections, caches).
        let mut api = grpc::admin(&conductor.api_socket()).await;
        for _ in 0..100 {
            let request = admin_pb::SubmitRequest {
                plugin: "echo".into(),
                payload: b"warm".to_vec(),
                ..Default::default()
            };
            api.submit_and_wait(request).await.expect("warm-up job");
        }
        let mut clients = Vec::new();
        for i in 0..REPLICAS {
            clients.push(pb::plugin_client::PluginClient::new(
                grpc::connect(&conductor.socket("echo", i)).await,
            ));
        }
        let clients = Arc::new(clients);
        let direct = load(&parties, duration, move |n| {
            let mut client = clients[n % clients.len()].clone();
            async move {
                let job = pb::Job {
                    id: n.to_string(),
                    payload: b"bench".to_vec(),
                    attempt: 1,
                    ..Default::default()
                };
                client.handle(job).await.expect("direct Handle");
            }
        })
        .await;
        let apis: Arc<Vec<_>> = Arc::new({
            let mut v = Vec::new();
            for _ in 0..4 {
                v.push(grpc::admin(&conductor.api_socket()).await);
            }
            v
        });
        let through = load(&parties, duration, move |n| {
            let mut api = apis[n % apis.len()].clone();
            async move {
                let request = admin_pb::SubmitRequest {
                    plugin: "echo".into(),
                    payload: b"bench".to_vec(),
                    ..Default::default()
                };
                let outcome = api
                    .submit_and_wait(request)
                    .await
                    .expect("SubmitAndWait")
                    .into_inner();
                assert_eq!(
                    outcome.status,
                    admin_pb::job_outcome::Status::Completed as i32
                );
            }
        })
        .await;
        (direct, through)
    });
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "dispatch benchmark: {REPLICAS} echo replicas, {CONCURRENCY} concurrent callers, {seconds} s per side"
    );
    println!(
        "{:<22} {:>10} {:>8} {:>8}   {:>28}",
        "", "jobs/s", "p50 ms", "p99 ms", "CPU µs/job caller+cond+repl"
    );
    for (name, run) in [("direct Handle", &direct), ("through conductor", &through)] {
        let [caller, cond, repl] = run.cpu_per_job();
        println!(
            "{name:<22} {:>10.0} {:>8.2} {:>8.2}   {caller:>8.1} {cond:>8.1} {repl:>8.1}",
            run.rate(),
            ms(run.percentile(0.5)),
            ms(run.percentile(0.99))
        );
    }
    let ratio = through.rate() / direct.rate();
    println!("conductor / direct throughput: {:.0} %", ratio * 100.0);
    let result = serde_json::json!({
        "replicas": REPLICAS,
        "concurrency": CONCURRENCY,
        "seconds": seconds,
        "direct": {"jobs_per_s": direct.rate(), "p50_ms": ms(direct.percentile(0.5)), "p99_ms": ms(direct.percentile(0.99)), "cpu_us_per_job": direct.cpu_per_job()},
        "conductor": {"jobs_per_s": through.rate(), "p50_ms": ms(through.percentile(0.5)), "p99_ms": ms(through.percentile(0.99)), "cpu_us_per_job": through.cpu_per_job()},
        "ratio": ratio,
    });
    demi_e2e::bench::write_results("dispatch", &result);
}
