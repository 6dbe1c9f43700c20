//! What the benchmarks under `scripts/bench/` share: latency percentiles,
//! a process's CPU time, and where results are written.

use std::path::PathBuf;
use std::time::Duration;

/// The `p` quantile (0 to 1) of `sorted` latencies; zero when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

/// utime + stime of `pid` in seconds (0 when it is gone).
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name start with state (field 3); utime and
    // stime are fields 14 and 15.
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|t| t.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    // SAFETY: sysconf reads a constant of the running system.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// Writes `result` as JSON to `$BENCH_OUT`, or `target/bench/NAME.json`
/// of the repository (a test runs in `tests/`, not beside the build).
pub fn write_results(name: &str, result: &serde_json::Value) {
    let out = std::env::var_os("BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join(format!("target/bench/{name}.json")));
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&out, format!("{result:#}\n")).expect("write results");
    println!("wrote {}", out.display());
}

/// `n` SubmitAndWait calls of `payload` to `plugin` through the admin API,
/// `concurrency` at a time, or one every `gap` when it is not zero (then
/// each call is its own caller): the sorted latencies and the seconds the
/// whole took. The floor a platform plugin's path is measured against.
pub async fn submit_and_wait(
    conductor: &crate::Conductor,
    plugin: &str,
    payload: &[u8],
    n: usize,
    concurrency: usize,
    gap: Duration,
) -> (Vec<Duration>, f64) {
    use crate::grpc::{self, admin_pb};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let api = grpc::admin(&conductor.api_socket()).await;
    let next = Arc::new(AtomicUsize::new(0));
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let callers = if gap.is_zero() { concurrency } else { n };
    for caller in 0..callers {
        let (mut api, next) = (api.clone(), next.clone());
        let (plugin, payload) = (plugin.to_owned(), payload.to_vec());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            tokio::time::sleep(gap * caller as u32).await;
            let mut first = true;
            while (first || gap.is_zero()) && next.fetch_add(1, Ordering::Relaxed) < n {
                first = false;
                let t = std::time::Instant::now();
                let request = admin_pb::SubmitRequest {
                    plugin: plugin.clone(),
                    kind: "bench".into(),
                    payload: payload.clone(),
                    ..Default::default()
                };
                api.submit_and_wait(request).await.expect("SubmitAndWait");
                latencies.push(t.elapsed());
            }
            latencies
        });
    }
    let mut latencies = Vec::new();
    while let Some(mine) = tasks.join_next().await {
        latencies.extend(mine.unwrap_or_default());
    }
    latencies.sort();
    (latencies, started.elapsed().as_secs_f64())
}
