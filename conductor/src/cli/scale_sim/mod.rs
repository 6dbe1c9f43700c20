//! `conductor scale-sim`: replays a load trace against the three policies
//! and prints the table, writes the plot and (optionally) JSON.

use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
mod plot;
mod sim;
mod sweep;

use demi_conductor::scaler::AutoscaleConfig;
use demi_conductor::scaler::config::MAX_HISTORY_BUCKETS;
use demi_conductor::scaler::trace;
use serde_json::json;
use sim::{FitStats, Outcome, SimConfig};

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
    /// Replay each policy over a range of its own knob (HPA and
    /// predictive: target utilisation; predictive also headroom and
    /// forecast level; static: replica count), the predictive settings
    /// again in hindsight (told the trace's level in advance), and print
    /// the frontier of SLO violation against replica-seconds; the plot
    /// shows it.
    #[arg(long)]
    pub sweep: bool,
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
    let file = trace
        .path
        .file_name()
        .map_or_else(|| "trace".into(), |n| n.to_string_lossy());
    if args.sweep {
        return run_sweep(&args, &file, &trace.values, &config);
    }
    let outcome = simulate(&trace.values, &config);
    print!("{}", table(&outcome, trace.values.len(), &config));
    let (time_unit, per_unit) = match trace.values.len() as f64 * step {
        s if s >= 3.0 * 86_400.0 => ("days", 86_400.0),
        s if s >= 3.0 * 3_600.0 => ("hours", 3_600.0),
        _ => ("minutes", 60.0),
    };
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
        level: config.autoscale.forecast_level,
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

fn run_sweep(args: &Args, file: &str, values: &[f64], config: &SimConfig) -> anyhow::Result<()> {
    let mut progress = Progress::new("replays");
    let swept = sweep::sweep(values, config, |done, total| progress.tick(done, total));
    progress.finish();
    let total = values.len() as f64 * config.autoscale.bucket.as_secs_f64();
    print!("{}", sweep_table(&swept, total));
    print!("{}", forecaster(&swept.stats));
    let title = format!("{file}: SLO violation against cost, each policy over its own knob");
    let written = plot::write_frontier(&args.plot, &swept, &title)?;
    let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    println!("plot: {}", names.join(", "));
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&sweep_json(&swept, config))?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("results: {}", path.display());
    }
    Ok(())
}

/// A violation as seconds, share of the trace and spells.
fn violation(seconds: f64, spells: u32, total: f64) -> String {
    format!(
        "{seconds:.0} s ({:.2} %) in {spells}",
        seconds * 100.0 / total.max(1e-9)
    )
}

fn sweep_table(swept: &sweep::Sweep, total: f64) -> String {
    let mut out = format!(
        "\nfrontier: the settings of each policy that no other setting of it beats on both \
         (* = the configuration given; \"in N\": N separate spells over the SLO)\n\
         {:<16} {:<40} {:>25} {:>16}\n",
        "policy", "setting", "SLO violation", "replica-seconds"
    );
    let row = |p: &sweep::Point, setting: &str| {
        format!(
            "{:<16} {:<40} {:>25} {:>16.0}\n",
            p.kind.name(),
            setting,
            violation(p.violation, p.spells, total),
            p.replica_seconds
        )
    };
    for kind in sim::Kind::SWEPT {
        for p in sweep::frontier(&swept.points, kind) {
            let marked = format!("{}{}", p.knob, if p.default { " *" } else { "" });
            out.push_str(&row(p, &marked));
        }
    }
    let defaults: Vec<&sweep::Point> = swept.points.iter().filter(|p| p.default).collect();
    out.push_str("\nthe configuration given:\n");
    for p in &defaults {
        out.push_str(&row(p, &p.knob));
    }
    let ours = defaults.iter().find(|p| p.kind == sim::Kind::Predictive);
    let hpa = defaults.iter().find(|p| p.kind == sim::Kind::Reactive);
    if let (Some(ours), Some(hpa)) = (ours, hpa) {
        out.push_str(&format!(
            "predictive vs HPA: {:.1} % of its SLO violation at {:.3}x its replica-seconds\n",
            if hpa.violation > 0.0 {
                ours.violation * 100.0 / hpa.violation
            } else if ours.violation > 0.0 {
                f64::INFINITY
            } else {
                0.0
            },
            ours.replica_seconds / hpa.replica_seconds
        ));
    }
    let matched = sweep::against_hpa(&swept.points, DOMINANCE_SHARE);
    let beaten = matched.iter().filter(|(_, ours)| ours.is_some()).count();
    out.push_str(&format!(
        "\nagainst each HPA setting, the cheapest predictive setting with at most {:.0} % of its \
         violation at no more replica-seconds: {beaten} of {} matched; then the least share of \
         its violation reached at no more replica-seconds, predictive / hindsight (the same \
         scaler told the trace's level in advance: what no forecaster could beat)\n",
        DOMINANCE_SHARE * 100.0,
        matched.len()
    ));
    let share = |kind, hpa| match sweep::least_share(&swept.points, kind, hpa) {
        Some(s) if s.is_finite() => format!("{:.0} %", s * 100.0),
        _ => "-".to_owned(),
    };
    for (hpa, ours) in &matched {
        let answer = match ours {
            Some(p) => format!(
                "{}: {} at {:.3}x",
                p.knob,
                violation(p.violation, p.spells, total),
                p.replica_seconds / hpa.replica_seconds
            ),
            None => "none".to_owned(),
        };
        out.push_str(&format!(
            "  HPA {:<12} {:>25} {:>10.0}  ->  {answer}; least {} / {}\n",
            hpa.knob,
            violation(hpa.violation, hpa.spells, total),
            hpa.replica_seconds,
            share(sim::Kind::Predictive, hpa),
            share(sim::Kind::Hindsight, hpa),
        ));
    }
    out
}

/// "Better than the HPA": at most this share of its violation.
const DOMINANCE_SHARE: f64 = 0.5;

fn sweep_json(swept: &sweep::Sweep, config: &SimConfig) -> serde_json::Value {
    let point = |p: &sweep::Point| {
        json!({
            "policy": p.kind.name(),
            "setting": p.knob,
            "default": p.default,
            "slo_violation_seconds": p.violation,
            "slo_violation_spells": p.spells,
            "replica_seconds": p.replica_seconds,
        })
    };
    json!({
        "capacity": config.capacity,
        "bucket_seconds": config.autoscale.bucket.as_secs_f64(),
        "fits": swept.stats.fits,
        "fit_seconds": swept.stats.fit_time.as_secs_f64(),
        "fallbacks": fallbacks_json(&swept.stats),
        "points": swept.points.iter().map(point).collect::<Vec<_>>(),
        "frontier": sim::Kind::SWEPT.iter().map(|k| json!({
            "policy": k.name(),
            "points": sweep::frontier(&swept.points, *k).into_iter().map(point).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "against_hpa": sweep::against_hpa(&swept.points, DOMINANCE_SHARE).into_iter().map(|(hpa, ours)| json!({
            "hpa": point(hpa),
            "predictive": ours.map(point),
            // JSON has no infinity: a share that cannot be had is null.
            "least_share": {
                "predictive": sweep::least_share(&swept.points, sim::Kind::Predictive, hpa).filter(|s| s.is_finite()),
                "hindsight": sweep::least_share(&swept.points, sim::Kind::Hindsight, hpa).filter(|s| s.is_finite()),
            },
        })).collect::<Vec<_>>(),
    })
}

/// One progress line per trace on stderr: redrawn in place on a
/// terminal, written once at the end elsewhere (a log is not a terminal).
struct Progress {
    started: Instant,
    last: Instant,
    terminal: bool,
    unit: &'static str,
    done: (usize, usize),
}

impl Progress {
    fn new(unit: &'static str) -> Self {
        let now = Instant::now();
        Self {
            started: now,
            last: now,
            terminal: std::io::stderr().is_terminal(),
            unit,
            done: (0, 0),
        }
    }

    fn line(&self) -> String {
        let (done, total) = self.done;
        format!(
            "simulating: {:3.0} % ({done}/{total} {}, {:.1} s)",
            done as f64 * 100.0 / total.max(1) as f64,
            self.unit,
            self.started.elapsed().as_secs_f64()
        )
    }

    fn tick(&mut self, done: usize, total: usize) {
        self.done = (done, total);
        let now = Instant::now();
        if !self.terminal || now.duration_since(self.last) < Duration::from_millis(200) {
            return;
        }
        self.last = now;
        let _ = write!(std::io::stderr(), "\r{}", self.line());
    }

    fn finish(self) {
        if self.terminal {
            eprintln!("\r{}", self.line());
        } else {
            eprintln!("{}", self.line());
        }
    }
}

fn simulate(values: &[f64], config: &SimConfig) -> Outcome {
    let mut progress = Progress::new("bucket-steps");
    let outcome = sim::simulate(values, config, |done, total| progress.tick(done, total));
    progress.finish();
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
        "\n{:<16} {:>25} {:>16} {:>12} {:>12} {:>18} {:>14}\n",
        "policy",
        "SLO violation (spells)",
        "replica-seconds",
        "vs reactive",
        "scale events",
        "direction changes",
        "max queue wait"
    );
    for run in &outcome.runs {
        out.push_str(&format!(
            "{:<16} {:>25} {:>16.0} {:>11.3}x {:>12} {:>18} {:>14}\n",
            run.policy,
            violation(run.violation.as_secs_f64(), run.spells, total),
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
    out.push_str(&forecaster(&outcome.stats));
    out
}

/// What the forecaster did, its fallbacks one line per cause.
fn forecaster(stats: &FitStats) -> String {
    let methods: Vec<String> = stats
        .methods
        .iter()
        .map(|(m, n)| format!("{} {n}", m.as_str()))
        .collect();
    let mut out = format!(
        "\nforecaster: {} fits ({}) in {:.2} s\n",
        stats.fits,
        methods.join(", "),
        stats.fit_time.as_secs_f64()
    );
    for f in &stats.fallbacks {
        let span = if f.shortest == f.longest {
            format!("{}", f.shortest)
        } else {
            format!("{}-{}", f.shortest, f.longest)
        };
        out.push_str(&format!(
            "  fallback ×{} (history of {span} buckets): {}\n",
            f.count, f.cause
        ));
    }
    out
}

fn to_json(outcome: &Outcome, config: &SimConfig) -> serde_json::Value {
    json!({
        "capacity": config.capacity,
        "startup_seconds": config.startup.as_secs_f64(),
        "slo_seconds": config.slo.as_secs_f64(),
        "bucket_seconds": config.autoscale.bucket.as_secs_f64(),
        "fits": outcome.stats.fits,
        "fit_seconds": outcome.stats.fit_time.as_secs_f64(),
        "fallbacks": fallbacks_json(&outcome.stats),
        "policies": outcome.runs.iter().map(|r| json!({
            "policy": r.policy,
            "slo_violation_seconds": r.violation.as_secs_f64(),
            "slo_violation_spells": r.spells,
            "replica_seconds": r.replica_seconds,
            "scale_events": r.scale_events,
            "direction_changes": r.direction_changes,
            "max_queue_wait_seconds": if r.max_wait.is_finite() { json!(r.max_wait) } else { json!(null) },
        })).collect::<Vec<_>>(),
    })
}

fn fallbacks_json(stats: &FitStats) -> serde_json::Value {
    stats
        .fallbacks
        .iter()
        .map(|f| {
            json!({
                "reason": f.cause,
                "count": f.count,
                "shortest_history": f.shortest,
                "longest_history": f.longest,
            })
        })
        .collect()
}
