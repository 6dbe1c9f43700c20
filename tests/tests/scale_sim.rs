//! Acceptance: `conductor scale-sim` on a real public trace (vic_elec) and
//! a synthetic daily-seasonal one: the predictive policy has less
//! SLO-violation time than the Kubernetes HPA at no more than 10 % more
//! replica-seconds; the table and a readable plot are produced.

use std::path::Path;
use std::process::Command;

use demi_e2e::{bin, repo_root};
use serde_json::Value;

/// One configuration for both traces: workers that take 30 s to start,
/// planned at 80 % utilisation, daily and weekly seasons.
const POLICY: &[&str] = &[
    "--target",
    "0.8",
    "--startup",
    "30s",
    "--max",
    "20",
    "--period",
    "1d",
    "--period",
    "7d",
    "--history",
    "14d",
    "--refit-every",
    "120s",
];

/// `conductor scale-sim --trace TRACE --plot PLOT` with `extra` flags.
fn scale_sim(trace: &Path, plot: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(bin("conductor"))
        .arg("scale-sim")
        .arg("--trace")
        .arg(trace)
        .arg("--plot")
        .arg(plot)
        .args(extra)
        .output()
        .expect("run conductor scale-sim")
}

fn simulate(trace: &str) -> (String, Value, tempfile::TempDir) {
    let out = tempfile::tempdir().expect("temp dir");
    let trace = repo_root().join("tests/data").join(trace);
    let prefix = out.path().join("plot");
    let json = out.path().join("result.json");
    let json_arg = json.to_string_lossy().into_owned();
    let flags: Vec<&str> = ["--json", json_arg.as_str()]
        .into_iter()
        .chain(POLICY.iter().copied())
        .collect();
    let output = scale_sim(&trace, &prefix, &flags);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "scale-sim failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written"))
            .expect("valid json");
    (stdout, result, out)
}

fn policy<'a>(result: &'a Value, name: &str) -> &'a Value {
    result["policies"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["policy"].as_str() == Some(name)))
        .unwrap_or_else(|| panic!("no policy {name} in {result}"))
}

fn predictive_beats_reactive(trace: &str) {
    let (table, result, out) = simulate(trace);
    println!("{table}");
    let ours = policy(&result, "predictive");
    let hpa = policy(&result, "reactive (HPA)");
    let fixed = policy(&result, "static at max");
    let seconds = |p: &Value, key: &str| p[key].as_f64().unwrap_or(f64::NAN);
    let (ours_bad, hpa_bad) = (
        seconds(ours, "slo_violation_seconds"),
        seconds(hpa, "slo_violation_seconds"),
    );
    let ratio = seconds(ours, "replica_seconds") / seconds(hpa, "replica_seconds");
    assert!(
        ours_bad < hpa_bad,
        "{trace}: predictive violated the SLO for {ours_bad} s, reactive {hpa_bad} s"
    );
    assert!(
        ratio <= 1.10,
        "{trace}: predictive used {ratio:.3}x the reactive replica-seconds"
    );
    // The static pool is the upper bound on cost.
    assert!(seconds(fixed, "replica_seconds") > seconds(ours, "replica_seconds"));
    // The table names every policy and what it measures.
    for needle in [
        "SLO violation",
        "replica-seconds",
        "scale events",
        "direction changes",
        "predictive",
        "reactive (HPA)",
        "static at max",
        "forecaster:",
    ] {
        assert!(table.contains(needle), "table lacks {needle:?}:\n{table}");
    }
    check_plot(out.path(), trace);
}

/// Both files exist; the SVG carries title, axis names with units, and a
/// legend entry per series; the PNG is a real PNG of the size asked for.
fn check_plot(dir: &Path, trace: &str) {
    let svg = std::fs::read_to_string(dir.join("plot.svg")).expect("svg written");
    for needle in [
        trace,
        "trace time (",
        "load (jobs/s)",
        "replicas",
        "forecast 95 % interval",
        "forecast",
        "predictive",
        "reactive (HPA)",
        "static at max",
    ] {
        assert!(svg.contains(needle), "plot lacks {needle:?}");
    }
    let png = std::fs::read(dir.join("plot.png")).expect("png written");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let (width, height) = (
        u32::from_be_bytes([png[16], png[17], png[18], png[19]]),
        u32::from_be_bytes([png[20], png[21], png[22], png[23]]),
    );
    assert_eq!((width, height), (1400, 900));
}

#[test]
fn predictive_beats_reactive_on_vic_elec() {
    predictive_beats_reactive("vic_elec.csv");
}

#[test]
fn predictive_beats_reactive_on_a_synthetic_daily_trace() {
    predictive_beats_reactive("daily_synthetic.csv");
}

#[test]
fn a_malformed_trace_is_refused_naming_its_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("broken.csv");
    std::fs::write(
        &trace,
        "timestamp,value\n2026-01-01T00:00:00Z,5\n2026-01-01T00:01:00Z,five\n",
    )
    .expect("write trace");
    let output = scale_sim(&trace, &dir.path().join("p"), &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("broken.csv:3: value \"five\": not a number"),
        "{stderr}"
    );
    assert!(!dir.path().join("p.svg").exists());
}

#[test]
fn gaps_and_irregular_rows_are_reported_not_fatal() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("gappy.csv");
    // A shop open 08:00-18:00 for four days: nights are missing, one
    // row is late and one duplicated.
    let mut text = String::from("when,load\n");
    for day in 1..=4 {
        for hour in 8..18 {
            let minute = if day == 2 && hour == 12 { 7 } else { 0 };
            text.push_str(&format!(
                "2026-03-0{day} {hour:02}:{minute:02}:00,{}\n",
                50 + (hour - 8) * 10
            ));
        }
    }
    text.push_str("2026-03-03 09:00:00,70\n");
    std::fs::write(&trace, text).expect("write trace");
    let output = scale_sim(&trace, &dir.path().join("p"), &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("buckets of 1h"), "{stdout}");
    assert!(stdout.contains("empty buckets in 3 gaps"), "{stdout}");
    assert!(stdout.contains("1 rows out of order"), "{stdout}");
    assert!(stdout.contains("1 rows sharing a bucket"), "{stdout}");
    assert!(dir.path().join("p.png").exists());
}
