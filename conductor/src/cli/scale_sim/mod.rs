//! `conductor scale-sim`: replays a load trace against the three policies
//! and prints the table, writes the plot and (optionally) JSON.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
mod plot;
mod sim;

use demi_conductor::scaler::AutoscaleConfig;
use demi_conductor::scaler::config::MAX_HISTORY_BUCKETS;
use demi_conductor::scaler::trace;
use serde_json::json;
use sim::{Outcome, SimConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// CSV trace: time in the first column (RFC 3339, `YYYY-MM-DD
    /// HH:MM:SS` or Unix seconds), load in the second; any header.
    #[arg(long)]
    pub trace: PathBuf,
    /// Take the policy from `[plugins.NAME.autoscale]` of --config.
    #[arg(long)]
    pub plugin: Option<String>,
    /// Trace step (default: derived from the data).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub step: Option<Duration>,
    /// Virtual time one trace step lasts (default: the autoscale bucket).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub bucket: Option<Duration>,
    /// Load one replica serves, in the trace's unit per second (default:
    /// autoscale.capacity, else what lets `max` replicas carry the peak
    /// at the target utilisation).
    #[arg(long)]
    pub capacity: Option<f64>,
    /// Virtual time from asking for a replica to it taking load.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub startup: Duration,
    /// Longest acceptable queue wait (default: autoscale.queue_wait_slo).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub slo: Option<Duration>,
    /// Seasonal periods in trace time (default: autoscale.seasonal_periods).
    #[arg(long = "period", value_parser = humantime::parse_duration)]
    pub periods: Vec<Duration>,
    /// History fitted on, in trace time (default: eight of the longest
    /// period, or two days).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub history: Option<Duration>,
    /// Virtual time between fits (default: autoscale.refit_every).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub refit_every: Option<Duration>,
    /// Extra share on the forecast's upper bound (default: autoscale.headroom).
    #[arg(long)]
    pub headroom: Option<f64>,
    /// Coverage of the forecast interval planned for (default:
    /// autoscale.forecast_level).
    #[arg(long)]
    pub level: Option<f64>,
    /// Share of capacity planned for (default: autoscale.target_utilisation).
    #[arg(long)]
    pub target: Option<f64>,
    #[arg(long)]
    pub min: Option<u32>,
    #[arg(long)]
    pub max: Option<u32>,
    /// Where the plot goes: PREFIX.svg and PREFIX.png.
    #[arg(long, default_value = "scale-sim")]
    pub plot: PathBuf,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(args: Args, config_path: &Path) -> anyhow::Result<()> {
    let mut autoscale = match &args.plugin {
        Some(name) => {
            let config = demi_conductor::config::load(config_path)
                .map_err(|errors| anyhow::anyhow!("{errors}"))?;
            let plugin = config.plugins.get(name).with_context(|| {
                format!("no plugin named {name:?} in {}", config_path.display())
            })?;
            plugin.autoscale.clone().with_context(|| {
                format!("plugin {name:?} has no [plugins.{name}.autoscale] table")
            })?
        }
        None => AutoscaleConfig::default(),
    };
    if let Some(bucket) = args.bucket {
        autoscale.bucket = bucket;
    }
    if let Some(refit) = args.refit_every {
        autoscale.refit_every = refit;
    }
    if let Some(headroom) = args.headroom {
        autoscale.headroom = headroom;
    }
    if let Some(level) = args.level {
        autoscale.forecast_level = level;
    }
    if let Some(target) = args.target {
        autoscale.target_utilisation = target;
    }
    if let Some(min) = args.min {
        autoscale.min = min;
    }
    if let Some(max) = args.max {
        autoscale.max = max;
    }
    if !args.periods.is_empty() {
        autoscale.seasonal_periods = args.periods.clone();
    }
    if let Some(slo) = args.slo {
        autoscale.queue_wait_slo = slo;
    }
    if autoscale.min == 0 || autoscale.max < autoscale.min {
        bail!(
            "min ({}) must be at least 1 and max ({}) at least min",
            autoscale.min,
            autoscale.max
        );
    }
    if autoscale.bucket.is_zero() {
        bail!("--bucket must be longer than 0");
    }
    let trace = trace::load(&args.trace, args.step)?;
    let step = trace.step.as_secs_f64();
    let in_steps = |span: Duration| (span.as_secs_f64() / step).round() as usize;
    let periods: Vec<usize> = autoscale
        .seasonal_periods
        .iter()
        .map(|p| in_steps(*p))
        .filter(|p| *p >= 2)
        .collect();
    let longest = periods.iter().copied().max();
    let window = match args.history {
        Some(h) => in_steps(h),
        None => longest.map_or(in_steps(Duration::from_secs(2 * 86_400)), |p| 8 * p),
    }
    .clamp(1, MAX_HISTORY_BUCKETS);
    let peak = trace
        .values
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let capacity = match args.capacity.or(autoscale.capacity) {
        Some(c) if c > 0.0 && c.is_finite() => c,
        Some(c) => bail!("capacity {c} must be above 0"),
        None if peak > 0.0 => peak / (f64::from(autoscale.max) * autoscale.target_utilisation),
        None => bail!("the trace's load is zero throughout; pass --capacity"),
    };
    let config = SimConfig {
        slo: autoscale.queue_wait_slo,
        autoscale,
        capacity,
        startup: args.startup,
        periods,
        window,
    };
    println!(
        "trace {}: {} buckets of {} ({}), from {}",
        trace.path.display(),
        trace.values.len(),
        humantime::format_duration(trace.step),
        trace.report,
        trace.start
    );
    println!(
        "replayed at {} per bucket; replicas {}..={}, capacity {capacity:.4} jobs/s each at {:.0} % target, \
         start-up {}, SLO queue wait {}; seasonal periods {:?} buckets, history {window} buckets",
        humantime::format_duration(config.autoscale.bucket),
        config.autoscale.min,
        config.autoscale.max,
        config.autoscale.target_utilisation * 100.0,
        humantime::format_duration(config.startup),
        humantime::format_duration(config.slo),
        config.periods,
    );
    let outcome = simulate(&trace.values, &config);
    print!("{}", table(&outcome, trace.values.len(), &config));
    let (time_unit, per_unit) = match trace.values.len() as f64 * step {
        s if s >= 3.0 * 86_400.0 => ("days", 86_400.0),
        s if s >= 3.0 * 3_600.0 => ("hours", 3_600.0),
        _ => ("minutes", 60.0),
    };
    let file = trace
        .path
        .file_name()
        .map_or_else(|| "trace".into(), |n| n.to_string_lossy());
    let column = trace
        .value_name
        .as_deref()
        .map(|name| format!(" (column {name:?} read as jobs/s)"))
        .unwrap_or_default();
    let title = format!(
        "{file}{column}: one trace step replayed as {}",
        humantime::format_duration(config.autoscale.bucket)
    );
    let labels = plot::Labels {
        title: &title,
        unit: "jobs/s",
        step: step / per_unit,
        time_unit,
    };
    let written = plot::write(&args.plot, &trace.values, &outcome, &labels)?;
    let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    println!("plot: {}", names.join(", "));
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&to_json(&outcome, &config))?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("results: {}", path.display());
    }
    Ok(())
}

/// Replays with progress on stderr once a replay takes more than a moment.
fn simulate(values: &[f64], config: &SimConfig) -> Outcome {
    let started = Instant::now();
    let mut last = started;
    let terminal = std::io::stderr().is_terminal();
    let mut shown = false;
    let outcome = sim::simulate(values, config, |done, total| {
        let now = Instant::now();
        if now.duration_since(started) < Duration::from_secs(1)
            || now.duration_since(last) < Duration::from_millis(500)
        {
            return;
        }
        last = now;
        shown = true;
        let line = format!(
            "simulating: {:3.0} % ({done}/{total} bucket-steps, {:.0}s)",
            done as f64 * 100.0 / total.max(1) as f64,
            now.duration_since(started).as_secs_f64()
        );
        let mut err = std::io::stderr();
        let _ = if terminal {
            write!(err, "\r{line}")
        } else {
            writeln!(err, "{line}")
        };
    });
    if shown && terminal {
        eprintln!();
    }
    outcome
}

fn table(outcome: &Outcome, buckets: usize, config: &SimConfig) -> String {
    let total = buckets as f64 * config.autoscale.bucket.as_secs_f64();
    let reactive = outcome
        .runs
        .iter()
        .find(|r| r.policy.starts_with("reactive"))
        .map_or(f64::NAN, |r| r.replica_seconds);
    let mut out = format!(
        "\n{:<16} {:>22} {:>16} {:>12} {:>12} {:>18} {:>14}\n",
        "policy",
        "SLO violation",
        "replica-seconds",
        "vs reactive",
        "scale events",
        "direction changes",
        "max queue wait"
    );
    for run in &outcome.runs {
        let violation = run.violation.as_secs_f64();
        out.push_str(&format!(
            "{:<16} {:>22} {:>16.0} {:>11.3}x {:>12} {:>18} {:>14}\n",
            run.policy,
            format!(
                "{violation:.0} s ({:.2} %)",
                violation * 100.0 / total.max(1e-9)
            ),
            run.replica_seconds,
            run.replica_seconds / reactive,
            run.scale_events,
            run.direction_changes,
            if run.max_wait.is_finite() {
                format!("{:.1} s", run.max_wait)
            } else {
                "no replica".into()
            },
        ));
    }
    let methods: Vec<String> = outcome
        .methods
        .iter()
        .map(|(m, n)| format!("{} {n}", m.as_str()))
        .collect();
    out.push_str(&format!(
        "\nforecaster: {} fits ({}) in {:.2} s\n",
        outcome.fits,
        methods.join(", "),
        outcome.fit_time.as_secs_f64()
    ));
    for (why, n) in &outcome.fallbacks {
        out.push_str(&format!("  fallback ×{n}: {why}\n"));
    }
    out
}

fn to_json(outcome: &Outcome, config: &SimConfig) -> serde_json::Value {
    json!({
        "capacity": config.capacity,
        "startup_seconds": config.startup.as_secs_f64(),
        "slo_seconds": config.slo.as_secs_f64(),
        "bucket_seconds": config.autoscale.bucket.as_secs_f64(),
        "fits": outcome.fits,
        "fit_seconds": outcome.fit_time.as_secs_f64(),
        "fallbacks": outcome.fallbacks.iter().map(|(w, n)| json!({"reason": w, "count": n})).collect::<Vec<_>>(),
        "policies": outcome.runs.iter().map(|r| json!({
            "policy": r.policy,
            "slo_violation_seconds": r.violation.as_secs_f64(),
            "replica_seconds": r.replica_seconds,
            "scale_events": r.scale_events,
            "direction_changes": r.direction_changes,
            "max_queue_wait_seconds": if r.max_wait.is_finite() { json!(r.max_wait) } else { json!(null) },
        })).collect::<Vec<_>>(),
    })
}
