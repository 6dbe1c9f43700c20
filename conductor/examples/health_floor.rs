//! The floor under the conductor's health checks: a bare client that
//! checks every socket it is given once a second over one HTTP/2
//! connection each (the same client code the conductor uses, without a
//! supervisor around it), and prints the CPU it spent per check.
//! `scripts/bench/overhead` runs it beside the conductor, against the
//! same instances, in the same window.
//!
//! Usage: health_floor SECONDS SOCKET…

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use demi_conductor::rpc::PluginConnection;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: health_floor SECONDS SOCKET…"))?
        .parse()?;
    let sockets: Vec<PathBuf> = args.map(PathBuf::from).collect();
    let mut connections = Vec::with_capacity(sockets.len());
    for socket in &sockets {
        connections.push(
            PluginConnection::connect(socket)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", socket.display()))?,
        );
    }
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let window = Duration::from_secs(seconds);
    let started = Instant::now();
    let cpu_before = cpu_seconds()?;
    let mut checkers = tokio::task::JoinSet::new();
    let count = connections.len().max(1) as u32;
    for (i, connection) in connections.into_iter().enumerate() {
        let (done, failed) = (done.clone(), failed.clone());
        // Spread over the second, as a supervisor's checks would be.
        let offset = Duration::from_secs(1) * i as u32 / count;
        checkers.spawn(async move {
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + offset,
                Duration::from_secs(1),
            );
            while started.elapsed() < window {
                tick.tick().await;
                match connection.check("", Duration::from_secs(1)).await {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    while checkers.join_next().await.is_some() {}
    let cpu = cpu_seconds()? - cpu_before;
    let checks = done.load(Ordering::Relaxed);
    println!(
        "{{\"checks\": {checks}, \"failed\": {}, \"cpu_s\": {cpu:.4}, \"us_per_check\": {:.2}}}",
        failed.load(Ordering::Relaxed),
        1e6 * cpu / checks.max(1) as f64
    );
    Ok(())
}

/// This process's user and system time, every thread included.
fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // USER_HZ is 100 on every Linux this runs on.
    Ok((ticks(11) + ticks(12)) / 100.0)
}
