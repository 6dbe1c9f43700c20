//! The conductor under pressure from one plugin (`scripts/bench/pressure`
//! prints the figures): a stdout flood is cut to its budget and reported,
//! 10,000 connections to the plugin API are refused past 64, submissions
//! past the plugin's `submit_rate` get RESOURCE_EXHAUSTED; the conductor's
//! memory stays within 32 MiB of where it was, and a neighbour's health
//! checks keep their interval throughout.

use demi_e2e::bin;

#[test]
fn a_flooding_connecting_or_submitting_plugin_is_held_to_its_share() {
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let out = std::process::Command::new(bin("pressure"))
        .env("BENCH_OUT", out_file.path())
        // Below what a debug conductor takes, so the limit is what answers.
        .env("PRESSURE_SUBMIT_RATE", "1000")
        .output()
        .expect("run the pressure cases");
    let printed = String::from_utf8_lossy(&out.stdout);
    eprintln!("{printed}");
    assert!(
        out.status.success(),
        "{printed}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_file.path()).unwrap()).unwrap();
    let cases = result["cases"].as_array().unwrap();
    let case = |name: &str| cases.iter().find(|c| c["case"] == name).unwrap();
    let flood = case("stdout flood");
    let dropped = flood["output"]["dropped_lines"].as_u64().unwrap();
    let written = flood["hostile"]["lines"].as_f64().unwrap() as u64;
    assert!(
        dropped * 2 > written,
        "most of the flood is dropped: {flood}"
    );
    let connections = &case("plugin API connections")["hostile"];
    assert_eq!(connections["held"], 64.0, "{connections}");
    let submits = &case("submit flood")["hostile"];
    let accepted = submits["accepted"].as_f64().unwrap();
    let seconds = submits["seconds"].as_f64().unwrap();
    // 1,000 a second and a burst of as many, and a second of slack.
    assert!(
        accepted <= 1000.0 * (seconds + 2.0),
        "{accepted} accepted in {seconds} s: {submits}"
    );
    assert!(submits["resource_exhausted"].as_f64().unwrap() > 0.0);
}
