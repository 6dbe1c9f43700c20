//! Walks `docs/bad-inputs.md`: every malformed input in its table gets
//! the error the table shows, and leaves what it says unchanged.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

use demi_e2e::{Conductor, bin};

struct Row {
    id: String,
    kind: String,
    input: String,
    shown: String,
}

/// A markdown code span's text: `x`, or ``x`` for one holding a backtick.
fn code(cell: &str) -> &str {
    let ticks = cell.len() - cell.trim_start_matches('`').len();
    &cell[ticks..cell.len() - ticks]
}

fn rows() -> Vec<Row> {
    let text = std::fs::read_to_string(demi_e2e::repo_root().join("docs/bad-inputs.md"))
        .expect("docs/bad-inputs.md");
    text.lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| id ") && !l.starts_with("| ---"))
        .map(|line| {
            let cells: Vec<&str> = line
                .trim_start_matches("| ")
                .trim_end_matches(" |")
                .split(" | ")
                .collect();
            assert_eq!(cells.len(), 5, "a row of five cells: {line}");
            Row {
                id: cells[0].to_owned(),
                kind: cells[1].to_owned(),
                input: code(cells[2]).replace("\\n", "\n"),
                // Padding inside a double-backtick span is not the message's.
                shown: code(cells[3]).trim().to_owned(),
            }
        })
        .collect()
}

/// Words of a command line, with "double quotes" holding spaces.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn check(row: &Row, out: &Output, code: Option<i32>) {
    let text = said(out);
    assert!(
        !out.status.success() && (code.is_none() || out.status.code() == code),
        "{}: exited {:?}, expected {code:?}: {text}",
        row.id,
        out.status.code()
    );
    assert!(
        text.contains(&row.shown),
        "{}: expected\n  {}\nin:\n{text}",
        row.id,
        row.shown
    );
}

fn file(dir: &Path, name: &str, text: &str, mode: u32) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn config(row: &Row) {
    let dir = tempfile::tempdir().unwrap();
    file(
        dir.path(),
        "marker.sh",
        "#!/bin/sh\ntouch \"$(dirname \"$0\")/started\"\nsleep 60\n",
        0o755,
    );
    file(dir.path(), "token", "s3cret\n", 0o600);
    file(dir.path(), "api.key", "key\n", 0o600);
    file(dir.path(), "open", "s3cret\n", 0o644);
    file(dir.path(), "open.key", "key\n", 0o640);
    file(dir.path(), "api.crt", "certificate\n", 0o644);
    let text = format!(
        "[conductor]\nruntime_dir = \"run\"\n[plugins.marker]\ncommand = \"./marker.sh\"\n{}",
        row.input
    );
    std::fs::write(dir.path().join("conductor.toml"), text).unwrap();
    for args in [&["check-config"][..], &["run", "--config"][..]] {
        let out = Command::new(bin("conductor"))
            .current_dir(dir.path())
            .args(args)
            .arg("conductor.toml")
            .output()
            .unwrap();
        check(row, &out, Some(78));
    }
    assert!(
        !dir.path().join("started").exists(),
        "{}: a plugin started",
        row.id
    );
    assert!(
        !dir.path().join("run").exists(),
        "{}: the runtime folder was made",
        row.id
    );
}

fn plugin_setting(row: &Row, binary: &str, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    file(dir.path(), name, &row.input, 0o644);
    let out = Command::new(bin(binary))
        .current_dir(dir.path())
        .args(["--config", name, "--check"])
        .output()
        .unwrap();
    check(row, &out, Some(78));
}

fn devices(row: &Row) {
    let state = tempfile::tempdir().unwrap();
    let run = |args: &[String]| {
        Command::new(bin("demi-plugin-android"))
            .arg("devices")
            .arg("--state")
            .arg(state.path())
            .args(args)
            .output()
            .unwrap()
    };
    let added = run(&["add".into(), "pixel".into()]);
    assert!(added.status.success(), "{}: {added:?}", row.id);
    let before = said(&run(&["list".into()]));
    let out = run(&words(&row.input)[1..]);
    check(row, &out, Some(1));
    let after = said(&run(&["list".into()]));
    assert_eq!(before, after, "{}: the devices changed", row.id);
}

/// The jobs the conductor has accepted so far.
fn submitted(conductor: &Conductor) -> f64 {
    conductor
        .scrape()
        .lines()
        .filter(|l| l.starts_with("demi_jobs_submitted_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn every_bad_input_in_the_table_gets_its_error_and_changes_nothing() {
    let rows = rows();
    assert!(rows.len() >= 40, "{} rows", rows.len());
    let mut ids = std::collections::BTreeSet::new();
    for row in &rows {
        assert!(ids.insert(row.id.clone()), "{} twice", row.id);
    }
    let conductor = Conductor::start("[plugins.echo]\ncommand = \"{echo}\"\n");
    let (_, echo) = conductor.wait_serving(0, "echo", 0);
    let socket = conductor.api_socket();
    let jobs = submitted(&conductor);
    for row in &rows {
        match row.kind.as_str() {
            "config" => config(row),
            "cli" => {
                let out = Command::new(bin("conductor"))
                    .arg("--socket")
                    .arg(&socket)
                    .args(words(&row.input))
                    .output()
                    .unwrap();
                check(row, &out, None);
            }
            "grpc" => {
                let (method, request) = row.input.split_once(' ').expect("METHOD JSON");
                let out = Command::new(demi_e2e::grpcurl())
                    .args([
                        "-plaintext",
                        "-authority",
                        "localhost",
                        "-unix",
                        "-d",
                        request,
                    ])
                    .arg(&socket)
                    .arg(format!("demi.conductor.v1.Conductor/{method}"))
                    .output()
                    .unwrap();
                check(row, &out, None);
            }
            "plugin-check" => {
                let out = Command::new(bin("conductor"))
                    .args(["plugin-check", "--startup-timeout", "3s", "--"])
                    .args(words(&row.input))
                    .output()
                    .unwrap();
                check(row, &out, None);
            }
            "bridge" if row.input.starts_with("devices ") => devices(row),
            "bridge" => plugin_setting(row, "demi-plugin-android", "bridge.toml"),
            "discord" => plugin_setting(row, "demi-plugin-discord", "bot.toml"),
            other => panic!("{}: no kind {other:?}", row.id),
        }
    }
    // The running conductor took none of it: its plugin is the same
    // process, and no job was stored.
    assert_eq!(conductor.pids_of("echo"), vec![u64::from(echo)]);
    assert_eq!(submitted(&conductor), jobs, "a bad request stored a job");
}
