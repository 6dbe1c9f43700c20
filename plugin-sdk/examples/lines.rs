//! An origin plugin: reads the lines of a file and hands each to a worker
//! pool through the conductor, printing every answer. Configure it with
//! `jobs = false` and `submits_to = ["POOL"]`:
//!
//! ```toml
//! [plugins.lines]
//! command = "target/debug/examples/lines"
//! args = ["input.txt", "workers"]
//! jobs = false
//! submits_to = ["workers"]
//! ```
use std::process::ExitCode;

use demi_plugin_sdk::{Answer, Context, Submit};
use tokio::io::AsyncBufReadExt as _;

async fn forward(ctx: Context) -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [source, pool] = &args[..] else {
        return Err("usage: lines FILE POOL".into());
    };
    let mut conductor = ctx.conductor().map_err(|e| e.to_string())?;
    let file = tokio::fs::File::open(&source)
        .await
        .map_err(|e| format!("{source}: {e}"))?;
    let mut lines = tokio::io::BufReader::new(file).lines();
    let stopping = ctx.stopping();
    let mut number = 0;
    loop {
        let line = tokio::select! {
            () = stopping.cancelled() => return Ok(()),
            line = lines.next_line() => line.map_err(|e| format!("{source}: {e}"))?,
        };
        let Some(line) = line else { break };
        number += 1;
        // Keyed by its place in the file: after a restart, a line already
        // sent is the same job, not a second one.
        let job = Submit::new(pool, "line", line.into_bytes())
            .idempotency_key(format!("{source}:{number}"));
        match conductor.submit_and_wait(job).await {
            Ok(Answer::Completed(answer)) => {
                println!("line {number}: {}", String::from_utf8_lossy(&answer));
            }
            Ok(other) => println!("line {number}: not answered: {other:?}"),
            Err(error) => return Err(format!("line {number}: {error}")),
        }
    }
    // Every line is answered: stay up (a plugin that exits is restarted)
    // until the conductor stops us.
    stopping.cancelled().await;
    Ok(())
}

fn main() -> ExitCode {
    demi_plugin_sdk::run_origin(forward)
}
