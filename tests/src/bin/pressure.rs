//! The conductor under pressure from one plugin (`scripts/bench/pressure`,
//! and `tests/tests/pressure.rs` in debug): a plugin writing 100 MB/s to
//! stdout, one opening 10,000 connections to the plugin API socket, one
//! submitting jobs as fast as it can. For each: the conductor's RSS before,
//! at most during, and after; a neighbour's health checks (every 200 ms)
//! before and during: how long each took, and the interval between them,
//! from the conductor's own trace of each check.
//!
//! Prints a table, writes JSON (`$BENCH_OUT`, else
//! `target/bench/pressure.json`) and exits 1 if the conductor did not hold:
//! output unbounded or not reported, connections or submissions not
//! limited, its memory grown by more than 32 MiB, or the neighbour's
//! checks thinned by more than a fifth.

use std::path::Path;
use std::time::{Duration, Instant};

use demi_e2e::{Conductor, bin, rss_kib};
use serde_json::{Value, json};

const CHECK_EVERY: Duration = Duration::from_millis(200);
const BEFORE: Duration = Duration::from_secs(4);
const DURING: Duration = Duration::from_secs(5);
const CONNECTIONS: usize = 10_000;
const FLOOD_MB: u64 = 100;
/// Most growth of the conductor's RSS a case may cause.
const RSS_BOUND_KIB: u64 = 32 * 1024;

struct Case {
    name: &'static str,
    args: String,
    extra: String,
}

fn cases(submit_rate: Option<u32>) -> Vec<Case> {
    let rate = submit_rate.map_or(String::new(), |r| format!("submit_rate = {r}\n"));
    vec![
        Case {
            name: "stdout flood",
            args: format!("\"--flood-stdout\", \"{FLOOD_MB}\""),
            extra: String::new(),
        },
        Case {
            name: "plugin API connections",
            args: format!("\"--connections\", \"{CONNECTIONS}\""),
            extra: String::new(),
        },
        Case {
            name: "submit flood",
            args: "\"--submit-flood\", \"sink\"".into(),
            extra: format!("submits_to = [\"sink\"]\n{rate}"),
        },
    ]
}

fn p(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

fn report(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = serde_json::Map::new();
    for line in text.lines() {
        if let Some((key, value)) = line.split_once(' ')
            && let Ok(n) = value.parse::<f64>()
        {
            out.insert(key.into(), json!(n));
        }
    }
    Value::Object(out)
}

fn run(case: &Case, scratch: &Path) -> Value {
    let report_file = scratch.join(format!("{}.report", case.name.replace(' ', "-")));
    let go = scratch.join(format!("{}.go", case.name.replace(' ', "-")));
    let conductor = Conductor::builder()
        .log("info,demi_conductor::telemetry::recorder=trace")
        .start(&format!(
            "[plugins.neighbour]\ncommand = \"{{echo}}\"\n\
             [plugins.neighbour.health]\ninterval = \"{}ms\"\ntimeout = \"150ms\"\n\n\
             [plugins.sink]\ncommand = \"{{echo}}\"\n\n\
             [plugins.hostile]\ncommand = \"{}\"\nargs = [{}, \"--report\", \"{}\", \"--go\", \"{}\"]\n\
             jobs = false\nshutdown_grace = \"2s\"\n{}",
            CHECK_EVERY.as_millis(),
            bin("hostile_plugin").display(),
            case.args,
            report_file.display(),
            go.display(),
            case.extra,
        ));
    conductor.wait_serving(0, "neighbour", 0);
    conductor.wait_serving(0, "sink", 0);
    conductor.wait_serving(0, "hostile", 0);
    std::thread::sleep(Duration::from_secs(1));

    let from = conductor.cursor();
    std::thread::sleep(BEFORE);
    let rss_before = rss_kib(conductor.pid());
    let (took_before, gaps_before) = conductor.health_checks(from, "neighbour");

    let from = conductor.cursor();
    std::fs::write(&go, "").expect("write the go file");
    let started = Instant::now();
    let mut rss_during = 0;
    while started.elapsed() < DURING {
        rss_during = rss_during.max(rss_kib(conductor.pid()));
        std::thread::sleep(Duration::from_millis(250));
    }
    let (took_during, gaps_during) = conductor.health_checks(from, "neighbour");
    let hostile = report(&report_file);
    let events = conductor.events_since(from);
    let out = conductor.cli(&["stop", "hostile"]);
    assert!(out.status.success(), "stop hostile: {out:?}");
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = rss_kib(conductor.pid());

    let of_hostile = |e: &&Value| e["plugin"] == "hostile" || e["span"]["plugin"] == "hostile";
    let drops: Vec<&Value> = events
        .iter()
        .filter(of_hostile)
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("output dropped"))
        })
        .collect();
    let logged_lines = events
        .iter()
        .filter(of_hostile)
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("flood"))
        })
        .count();
    let sum = |key: &str| drops.iter().filter_map(|e| e[key].as_u64()).sum::<u64>();
    let refusals = events
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("refusing more"))
        })
        .count();

    let expected_checks = DURING.as_secs_f64() / CHECK_EVERY.as_secs_f64();
    json!({
        "case": case.name,
        "conductor_rss_kib": { "before": rss_before, "during_max": rss_during, "after": rss_after },
        "neighbour_checks": {
            "before": { "count": took_before.len(), "took_p50_ms": p(&took_before, 0.5),
                        "took_p99_ms": p(&took_before, 0.99),
                        "interval_p50_ms": p(&gaps_before, 0.5), "interval_max_ms": p(&gaps_before, 1.0) },
            "during": { "count": took_during.len(), "took_p50_ms": p(&took_during, 0.5),
                        "took_p99_ms": p(&took_during, 0.99),
                        "interval_p50_ms": p(&gaps_during, 0.5), "interval_max_ms": p(&gaps_during, 1.0) },
            "expected_during": expected_checks,
        },
        "hostile": hostile,
        "output": {
            "lines_logged": logged_lines,
            "dropped_reports": drops.len(),
            "dropped_lines": sum("lines"),
            "dropped_bytes": sum("bytes"),
        },
        "connection_refusal_warnings": refusals,
    })
}

/// What broke in `result`, if anything.
fn broken(result: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let case = result["case"].as_str().unwrap_or_default();
    let rss = &result["conductor_rss_kib"];
    let growth =
        rss["during_max"].as_u64().unwrap_or(0) as i64 - rss["before"].as_u64().unwrap_or(0) as i64;
    if growth > RSS_BOUND_KIB as i64 {
        out.push(format!("{case}: the conductor grew by {growth} KiB"));
    }
    let checks = &result["neighbour_checks"];
    let seen = checks["during"]["count"].as_f64().unwrap_or(0.0);
    let expected = checks["expected_during"].as_f64().unwrap_or(0.0);
    if seen < expected * 0.8 {
        out.push(format!(
            "{case}: {seen} neighbour checks where {expected} were due"
        ));
    }
    let hostile = &result["hostile"];
    let n = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    match case {
        "stdout flood" => {
            let output = &result["output"];
            if n(output, "dropped_reports") < 1.0 || n(output, "dropped_lines") < 1.0 {
                out.push(format!("{case}: no `output dropped` report: {output}"));
            }
            // The budget (1,000 a second, a burst of as many) and a second
            // of slack.
            let bound = 1000.0 * (DURING.as_secs_f64() + 2.0);
            if n(output, "lines_logged") > bound {
                out.push(format!("{case}: {} lines logged", output["lines_logged"]));
            }
            if n(hostile, "bytes") < 1e6 {
                out.push(format!("{case}: the flood did not happen: {hostile}"));
            }
        }
        "plugin API connections" => {
            if n(hostile, "held") > 64.0 {
                out.push(format!("{case}: {} connections held", hostile["held"]));
            }
            if n(hostile, "closed_by_conductor") < (CONNECTIONS - 64) as f64 * 0.9 {
                out.push(format!("{case}: connections not refused: {hostile}"));
            }
        }
        _ => {
            if n(hostile, "resource_exhausted") < 1.0 || n(hostile, "accepted") < 1.0 {
                out.push(format!("{case}: submissions not limited: {hostile}"));
            }
        }
    }
    out
}

fn main() {
    let submit_rate = std::env::var("PRESSURE_SUBMIT_RATE")
        .ok()
        .and_then(|r| r.parse().ok());
    let scratch = tempfile::tempdir().expect("scratch folder");
    let results: Vec<Value> = cases(submit_rate)
        .iter()
        .map(|case| {
            eprintln!("pressure: {} ...", case.name);
            run(case, scratch.path())
        })
        .collect();

    println!(
        "{:<24} {:>28} {:>30} {:>30}",
        "case", "conductor RSS MiB", "neighbour check p50 ms", "check interval p50/max ms"
    );
    println!(
        "{:<24} {:>28} {:>30} {:>30}",
        "", "before / during max / after", "before / during", "before / during"
    );
    let mib = |v: &Value| v.as_f64().unwrap_or(0.0) / 1024.0;
    let ms = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    for r in &results {
        let rss = &r["conductor_rss_kib"];
        let c = &r["neighbour_checks"];
        println!(
            "{:<24} {:>28} {:>30} {:>30}",
            r["case"].as_str().unwrap_or_default(),
            format!(
                "{:.1} / {:.1} / {:.1}",
                mib(&rss["before"]),
                mib(&rss["during_max"]),
                mib(&rss["after"])
            ),
            format!(
                "{:.2} / {:.2}",
                ms(&c["before"]["took_p50_ms"]),
                ms(&c["during"]["took_p50_ms"])
            ),
            format!(
                "{:.0}/{:.0} / {:.0}/{:.0}",
                ms(&c["before"]["interval_p50_ms"]),
                ms(&c["before"]["interval_max_ms"]),
                ms(&c["during"]["interval_p50_ms"]),
                ms(&c["during"]["interval_max_ms"])
            ),
        );
    }
    for r in &results {
        println!(
            "{}: plugin {}; output {}",
            r["case"].as_str().unwrap_or_default(),
            r["hostile"],
            r["output"]
        );
    }
    let problems: Vec<String> = results.iter().flat_map(broken).collect();
    demi_e2e::bench::write_results("pressure", &json!({ "cases": results }));
    if !problems.is_empty() {
        eprintln!("pressure: BROKEN: {}", problems.join("; "));
        std::process::exit(1);
    }
}
