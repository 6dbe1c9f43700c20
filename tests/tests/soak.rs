//! A minute of the chaos soak (`scripts/soak` runs it for ten): the
//! promises hold when everything goes wrong at once.

use demi_e2e::bin;

#[test]
fn a_minute_of_chaos_loses_no_job_leaves_no_orphan_and_nothing_behind() {
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let out = std::process::Command::new(bin("soak"))
        .arg("60")
        .env("BENCH_OUT", out_file.path())
        .output()
        .expect("run the soak");
    let printed = String::from_utf8_lossy(&out.stdout);
    let errors = String::from_utf8_lossy(&out.stderr);
    eprintln!("{printed}");
    assert!(out.status.success(), "{printed}\n{errors}");

    let result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_file.path()).unwrap()).unwrap();
    let accepted = result["accepted"].as_u64().unwrap();
    assert!(accepted >= 60 * 100, "the load really came: {result:#}");
    assert_eq!(
        result["completed"].as_u64().unwrap() + result["dead_lettered"].as_u64().unwrap(),
        accepted,
        "{result:#}"
    );
    for zero in ["lost", "duplicates", "panics", "wrong_answers"] {
        assert_eq!(result[zero], 0, "{zero}: {result:#}");
    }
    let faults = &result["faults"];
    for fault in ["sigkill", "sigstop", "sigterm", "hanging_job"] {
        assert!(faults[fault].as_u64().unwrap() >= 3, "{fault}: {faults}");
    }
    assert!(faults["reloads"].as_u64().unwrap() >= 3, "{faults}");
    let orphans = result["orphans_after_conductor_sigkill"]
        .as_array()
        .unwrap();
    assert!(orphans.len() >= 2, "{result:#}");
    assert!(orphans.iter().all(|n| n == 0), "{result:#}");
    // Hanging jobs end dead-lettered: the attempt timeout really fired.
    assert!(result["dead_lettered"].as_u64().unwrap() >= 3, "{result:#}");
    let after = &result["final_sigterm"];
    assert_eq!(after["exit"], 0, "{after}");
    assert_eq!(after["processes_left"], 0, "{after}");
    assert_eq!(after["cgroups_left"], 0, "{after}");
    assert_eq!(
        after["sockets_left"].as_array().map(Vec::len),
        Some(0),
        "{after}"
    );
}
