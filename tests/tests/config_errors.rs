//! Acceptance: malformed configs are refused with file, line and field,
//! and no plugin is started; a job store that cannot be opened stops the
//! start with its path, and no plugin is left running.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

use demi_e2e::{Conductor, bin};

/// (what, broken part, line of the error in the whole file, field). The
/// prelude above the broken part is 4 lines long.
const CASES: &[(&str, &str, usize, &str)] = &[
    (
        "bad TOML",
        "[plugins.x]\ncommand = \"./marker.sh\nreplicas = 1\n",
        6,
        "plugins.x.command",
    ),
    (
        "unknown key",
        "[plugins.x]\ncommand = \"./marker.sh\"\nreplica = 2\n",
        7,
        "plugins.x.replica",
    ),
    (
        "wrong type",
        "[plugins.x]\ncommand = \"./marker.sh\"\nreplicas = \"2\"\n",
        7,
        "plugins.x.replicas",
    ),
    (
        "negative duration",
        "[plugins.x]\ncommand = \"./marker.sh\"\nshutdown_grace = \"-1s\"\n",
        7,
        "plugins.x.shutdown_grace",
    ),
    (
        "missing command",
        "[plugins.x]\nreplicas = 1\n",
        5,
        "plugins.x.command",
    ),
    (
        "duplicate plugin",
        "[plugins.marker]\ncommand = \"./marker.sh\"\n",
        5,
        "plugins.marker",
    ),
    (
        "replicas 0",
        "[plugins.x]\ncommand = \"./marker.sh\"\nreplicas = 0\n",
        7,
        "plugins.x.replicas",
    ),
    (
        "missing binary",
        "[plugins.x]\ncommand = \"./nope\"\n",
        6,
        "plugins.x.command",
    ),
    (
        "binary not in PATH",
        "[plugins.x]\ncommand = \"no-such-program-xyz\"\n",
        6,
        "plugins.x.command",
    ),
    (
        "zero failure threshold",
        "[plugins.x]\ncommand = \"./marker.sh\"\n[plugins.x.health]\nfailure_threshold = 0\n",
        8,
        "plugins.x.health.failure_threshold",
    ),
    (
        "multiplier below 1",
        "[plugins.x]\ncommand = \"./marker.sh\"\n[plugins.x.restart]\nmultiplier = 0.5\n",
        8,
        "plugins.x.restart.multiplier",
    ),
    (
        "max below initial",
        "[plugins.x]\ncommand = \"./marker.sh\"\n[plugins.x.restart]\ninitial_delay = \"2s\"\nmax_delay = \"1s\"\n",
        9,
        "plugins.x.restart.max_delay",
    ),
    (
        "unknown health key",
        "[plugins.x]\ncommand = \"./marker.sh\"\n[plugins.x.health]\nperiod = \"1s\"\n",
        8,
        "plugins.x.health.period",
    ),
    (
        "unknown section",
        "[plugin.x]\ncommand = \"./marker.sh\"\n",
        5,
        "plugin",
    ),
    (
        "unknown user",
        "[plugins.x]\ncommand = \"./marker.sh\"\nuser = \"no-such-user-xyz\"\n",
        7,
        "plugins.x.user",
    ),
    (
        "group without a user",
        "[plugins.x]\ncommand = \"./marker.sh\"\ngroup = \"nogroup\"\n",
        7,
        "plugins.x.group",
    ),
    (
        "unknown capability",
        "[plugins.x]\ncommand = \"./marker.sh\"\ncapabilities = [\"CAP_FLY\"]\n",
        7,
        "plugins.x.capabilities",
    ),
];

#[test]
fn every_malformed_config_is_refused_with_its_place_and_nothing_starts() {
    for (what, broken, line, field) in CASES {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("marker.sh");
        std::fs::write(
            &marker,
            "#!/bin/sh\ntouch \"$(dirname \"$0\")/started\"\nsleep 60\n",
        )
        .unwrap();
        std::fs::set_permissions(&marker, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A valid plugin first: it must not start either.
        let text = format!(
            "[conductor]\nruntime_dir = \"run\"\n[plugins.marker]\ncommand = \"./marker.sh\"\n{broken}"
        );
        let path = dir.path().join("conductor.toml");
        std::fs::write(&path, &text).unwrap();

        for args in [&["run", "--config"][..], &["check-config"][..]] {
            let out = Command::new(bin("conductor"))
                .args(args)
                .arg(&path)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(78), "{what}: {args:?}: {stderr}");
            let place = format!("{}:{line}:", path.display());
            assert!(
                stderr.contains(&place),
                "{what}: expected {place} in: {stderr}"
            );
            assert!(
                stderr.contains(&format!(": {field}: ")),
                "{what}: expected field {field} in: {stderr}"
            );
        }
        assert!(
            !dir.path().join("started").exists(),
            "{what}: a plugin was started"
        );
        assert!(
            !dir.path().join("run").exists(),
            "{what}: the runtime folder was touched"
        );
    }
}

#[test]
fn check_config_accepts_the_example() {
    let example = demi_e2e::repo_root().join("examples/conductor.toml");
    let out = Command::new(bin("conductor"))
        .arg("check-config")
        .arg(&example)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok (1 plugins, 2 instances)"), "{stdout}");
}

#[test]
fn the_tcp_api_is_refused_without_tls_or_with_secrets_others_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, mode: u32| {
        let path = dir.path().join(name);
        std::fs::write(&path, "x\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    file("token", 0o600);
    file("open-token", 0o644);
    file("api.crt", 0o644);
    file("api.key", 0o600);
    file("open.key", 0o640);
    // (what, [conductor.api] lines, the field named, words of the reason)
    let cases = [
        (
            "plaintext TCP without insecure = true",
            "tcp = \"127.0.0.1:1\"\ntoken_file = \"token\"",
            "conductor.api",
            "insecure = true serves plaintext instead",
        ),
        (
            "a token others can read",
            "tcp = \"127.0.0.1:1\"\ntoken_file = \"open-token\"\ninsecure = true",
            "conductor.api.token_file",
            "mode 0644",
        ),
        (
            "a key others can read",
            "tcp = \"127.0.0.1:1\"\ntoken_file = \"token\"\ntls_certificate = \"api.crt\"\ntls_key = \"open.key\"",
            "conductor.api.tls_key",
            "mode 0640",
        ),
        (
            "a certificate without its key",
            "tcp = \"127.0.0.1:1\"\ntoken_file = \"token\"\ntls_certificate = \"api.crt\"",
            "conductor.api",
            "go together",
        ),
        (
            "TLS and insecure at once",
            "tcp = \"127.0.0.1:1\"\ntoken_file = \"token\"\ntls_certificate = \"api.crt\"\ntls_key = \"api.key\"\ninsecure = true",
            "conductor.api",
            "not both",
        ),
        (
            "client certificates without TLS",
            "tcp = \"127.0.0.1:1\"\ntoken_file = \"token\"\ninsecure = true\ntls_client_ca = \"api.crt\"",
            "conductor.api",
            "over TLS only",
        ),
    ];
    for (what, api, field, words) in cases {
        let path = dir.path().join("conductor.toml");
        std::fs::write(
            &path,
            format!("[conductor]\nruntime_dir = \"run\"\n[conductor.api]\n{api}\n"),
        )
        .unwrap();
        let out = Command::new(bin("conductor"))
            .arg("check-config")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{what}: {stderr}");
        assert!(
            stderr.contains(&format!(": {field}")) && stderr.contains(words),
            "{what}: expected {field} and {words:?} in: {stderr}"
        );
    }
    // TLS with the key kept private is fine.
    let path = dir.path().join("conductor.toml");
    std::fs::write(
        &path,
        "[conductor]\nruntime_dir = \"run\"\n[conductor.api]\ntcp = \"127.0.0.1:1\"\n\
         token_file = \"token\"\ntls_certificate = \"api.crt\"\ntls_key = \"api.key\"\n",
    )
    .unwrap();
    let out = Command::new(bin("conductor"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The store opens beside the pools' first starts: when it cannot (here
/// `jobs.db` is a folder), the conductor says which file, fails, and
/// stops whatever it had started on the way out.
#[test]
fn a_job_store_that_cannot_open_fails_the_start_and_leaves_no_plugin() {
    let errors = tempfile::NamedTempFile::new().unwrap();
    let mut conductor = Conductor::builder()
        .stderr(errors.path())
        // The arguments after the wrapper: the conductor, run,
        // --log-format, json, --config, the config file.
        .wrap(&[
            "sh",
            "-c",
            "mkdir -p \"$(dirname \"$5\")/state/jobs.db\" && exec \"$0\" \"$@\"",
        ])
        .start("[plugins.echo]\ncommand = \"{echo}\"\nreplicas = 3\n");
    let status = conductor.wait_exit();
    let stderr = std::fs::read_to_string(errors.path()).unwrap();
    assert!(!status.success(), "{stderr}");
    let store = conductor.folder().join("state/jobs.db");
    assert!(
        stderr.contains(&store.display().to_string()),
        "expected {} in: {stderr}",
        store.display()
    );
    let spawned = conductor.spawned_pids();
    for pid in &spawned {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "plugin {pid} outlived the failed start"
        );
    }
    // Stopped as at any shutdown, not left to the death signal.
    assert_eq!(
        conductor.count("echo", "instance stopped"),
        spawned.len(),
        "{:?}",
        conductor.events()
    );
}
