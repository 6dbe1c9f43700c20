use std::path::Path;

use super::*;

/// A config file in a temp folder, beside an executable `plugin` script.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let plugin = dir.path().join("plugin");
        std::fs::write(&plugin, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.path().join("not-executable"), "").unwrap();
        Self { dir }
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("conductor.toml")
    }

    fn parse(&self, text: &str) -> Result<Config, ConfigErrors> {
        parse(&self.file(), text)
    }
}

const GOOD: &str = r#"
[conductor]
runtime_dir = "run"
log_format = "json"

[plugins.echo]
command = "./plugin"
args = ["--delay", "1ms"]
replicas = 2
startup_timeout = "3s"

[plugins.echo.health]
interval = "250ms"
timeout = "100ms"

[plugins.echo.restart]
initial_delay = "10ms"
max_delay = "1s"
never_restart_exit_codes = [78, 64]
"#;

#[test]
fn a_good_config_resolves_paths_and_keeps_defaults() {
    let f = Fixture::new();
    let config = f.parse(GOOD).unwrap();
    assert_eq!(config.conductor.runtime_dir, f.dir.path().join("run"));
    assert_eq!(
        config.conductor.log_format,
        crate::telemetry::config::LogFormat::Json
    );
    let echo = &config.plugins["echo"];
    assert_eq!(echo.pool.command, f.dir.path().join("plugin"));
    assert_eq!(echo.pool.working_dir.as_deref(), Some(f.dir.path()));
    assert_eq!(echo.pool.replicas, 2);
    assert_eq!(
        echo.pool.health.config().interval,
        std::time::Duration::from_millis(250)
    );
    assert_eq!(
        echo.pool.health.config().failure_threshold,
        3,
        "default kept"
    );
    assert_eq!(echo.pool.restart.never_restart_exit_codes, [78, 64]);
    assert_eq!(echo.pool.shutdown_grace, std::time::Duration::from_secs(5));
}

#[test]
fn bare_commands_are_found_in_path() {
    let f = Fixture::new();
    let config = f.parse("[plugins.s]\ncommand = \"sh\"\n").unwrap();
    assert!(config.plugins["s"].pool.command.is_absolute());
}

/// (config, line, field, words the reason must contain)
const BROKEN: &[(&str, &str, usize, &str, &str)] = &[
    (
        "bad TOML",
        "[plugins.echo]\ncommand = \"./plugin\nreplicas = 1\n",
        2,
        "plugins.echo.command",
        "invalid basic string",
    ),
    (
        "unknown key",
        "[plugins.echo]\ncommand = \"./plugin\"\nreplica = 2\n",
        3,
        "plugins.echo.replica",
        "unknown field",
    ),
    (
        "wrong type",
        "[plugins.echo]\ncommand = \"./plugin\"\nreplicas = \"two\"\n",
        3,
        "plugins.echo.replicas",
        "invalid type",
    ),
    (
        "negative duration",
        "[plugins.echo]\ncommand = \"./plugin\"\n[plugins.echo.health]\ninterval = \"-5s\"\n",
        4,
        "plugins.echo.health.interval",
        "",
    ),
    (
        "missing command",
        "[plugins.echo]\nreplicas = 1\n",
        1,
        "plugins.echo.command",
        "missing field `command`",
    ),
    (
        "duplicate plugin",
        "[plugins.echo]\ncommand = \"./plugin\"\n[plugins.echo]\ncommand = \"./plugin\"\n",
        3,
        "plugins.echo",
        "duplicate",
    ),
    (
        "zero replicas",
        "[plugins.echo]\ncommand = \"./plugin\"\nreplicas = 0\n",
        3,
        "plugins.echo.replicas",
        "at least 1",
    ),
    (
        "missing binary",
        "[plugins.echo]\ncommand = \"./no-such-plugin\"\n",
        2,
        "plugins.echo.command",
        "No such file",
    ),
    (
        "not executable",
        "[plugins.echo]\ncommand = \"./not-executable\"\n",
        2,
        "plugins.echo.command",
        "not executable",
    ),
    (
        "unknown section",
        "[plugin.echo]\ncommand = \"./plugin\"\n",
        1,
        "plugin",
        "unknown section",
    ),
    (
        "bad log format",
        "[conductor]\nlog_format = \"xml\"\n",
        2,
        "conductor.log_format",
        "unknown variant",
    ),
    (
        "health timeout longer than interval",
        "[plugins.echo]\ncommand = \"./plugin\"\n[plugins.echo.health]\ninterval = \"1s\"\ntimeout = \"2s\"\n",
        5,
        "plugins.echo.health.timeout",
        "longer than health.interval",
    ),
    (
        "jitter out of range",
        "[plugins.echo]\ncommand = \"./plugin\"\n[plugins.echo.restart]\njitter = 1.5\n",
        4,
        "plugins.echo.restart.jitter",
        "between 0.0 and 1.0",
    ),
    (
        "duplicate key",
        "[plugins.echo]\ncommand = \"./plugin\"\nargs = []\ncommand = \"./plugin\"\n",
        4,
        "plugins.echo.command",
        "duplicate key",
    ),
    (
        "bad plugin name",
        "[plugins.\"my plugin\"]\ncommand = \"./plugin\"\n",
        1,
        "plugins.my plugin",
        "plugin name",
    ),
    (
        "reserved env",
        "[plugins.echo]\ncommand = \"./plugin\"\nenv = { DEMI_PLUGIN_SOCKET = \"/x\" }\n",
        3,
        "plugins.echo.env",
        "reserved",
    ),
    (
        "missing working dir",
        "[plugins.echo]\ncommand = \"./plugin\"\nworking_dir = \"nowhere\"\n",
        3,
        "plugins.echo.working_dir",
        "not a directory",
    ),
];

#[test]
fn every_broken_config_names_file_line_and_field() {
    let f = Fixture::new();
    for (what, text, line, field, words) in BROKEN {
        let errors = match f.parse(text) {
            Ok(_) => panic!("{what}: accepted"),
            Err(errors) => errors,
        };
        let first = &errors.0[0];
        let shown = errors.to_string();
        assert_eq!(first.file, f.file(), "{what}");
        assert_eq!(first.position.map(|p| p.0), Some(*line), "{what}: {shown}");
        assert_eq!(first.field, *field, "{what}: {shown}");
        assert!(shown.contains(words), "{what}: {shown}");
        assert!(
            shown.starts_with(&format!("{}:{line}:", f.file().display())),
            "{what}: {shown}"
        );
    }
}

#[test]
fn all_problems_are_reported_at_once() {
    let f = Fixture::new();
    let text = "[plugins.a]\ncommand = \"./plugin\"\nreplicas = 0\n\
                [plugins.b]\ncommand = \"./missing\"\n\
                [plugins.c]\ncomand = \"./plugin\"\n";
    let errors = f.parse(text).unwrap_err();
    let fields: Vec<&str> = errors.0.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "plugins.a.replicas",
            "plugins.b.command",
            "plugins.c.comand"
        ]
    );
}

#[test]
fn an_unreadable_file_says_so() {
    let errors = load(Path::new("/nonexistent/conductor.toml")).unwrap_err();
    assert!(
        errors
            .to_string()
            .starts_with("/nonexistent/conductor.toml: cannot read")
    );
}

#[test]
fn discovered_plugins_can_be_overridden_and_disabled() {
    let f = Fixture::new();
    let plugins = f.dir.path().join("plugins.d");
    for (name, extra) in [
        ("greeter", "replicas = 2\n[health]\ninterval = \"2s\"\n"),
        ("quiet", ""),
        ("bare", ""),
    ] {
        let dir = plugins.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let program = dir.join("run");
        std::fs::write(&program, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(
            dir.join("plugin.toml"),
            format!("name = \"{name}\"\ncommand = \"./run\"\n{extra}"),
        )
        .unwrap();
    }
    std::fs::create_dir_all(plugins.join("broken")).unwrap();
    std::fs::write(
        plugins.join("broken/plugin.toml"),
        "name = \"broken\"\nreplicas = 1\n",
    )
    .unwrap();

    let config = f
        .parse(
            "[conductor]\nplugin_dirs = [\"plugins.d\"]\n\
             [plugins.greeter]\nreplicas = 3\n[plugins.greeter.health]\ntimeout = \"500ms\"\n\
             [plugins.quiet]\nenabled = false\n\
             [plugins.local]\ncommand = \"./plugin\"\n",
        )
        .unwrap();
    assert_eq!(
        config.plugins.keys().collect::<Vec<_>>(),
        ["bare", "greeter", "local"]
    );
    let greeter = &config.plugins["greeter"];
    assert_eq!(
        greeter.pool.replicas, 3,
        "the config overrides the manifest"
    );
    assert_eq!(
        greeter.pool.health.config().interval,
        std::time::Duration::from_secs(2),
        "the manifest's value stays"
    );
    assert_eq!(
        greeter.pool.health.config().timeout,
        std::time::Duration::from_millis(500)
    );
    assert_eq!(
        greeter.pool.command,
        plugins.join("greeter/run"),
        "relative to the manifest"
    );
    assert_eq!(
        config.plugins["greeter"].source,
        plugins.join("greeter/plugin.toml")
    );
    assert_eq!(config.plugins["local"].source, f.file());
    assert_eq!(config.disabled, ["quiet"]);
    assert_eq!(config.manifests.len(), 3);
    let warnings: Vec<String> = config.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0].contains("broken/plugin.toml:1:1: command: missing field `command`"),
        "{warnings:?}"
    );
}

#[test]
fn health_is_a_table_or_none() {
    let f = Fixture::new();
    let plain = f
        .parse("[plugins.p]\ncommand = \"./plugin\"\nhealth = \"none\"\n")
        .unwrap();
    assert!(plain.plugins["p"].pool.health.is_none());
    let errors = f
        .parse("[plugins.p]\ncommand = \"./plugin\"\nhealth = \"off\"\n")
        .unwrap_err();
    let shown = errors.to_string();
    assert!(
        shown.contains(":3:10: plugins.p.health:") && shown.contains("\"none\" or a table"),
        "{shown}"
    );
    let errors = f
        .parse("[plugins.p]\ncommand = \"./plugin\"\n[plugins.p.health]\nintervall = \"1s\"\n")
        .unwrap_err();
    assert!(
        errors
            .to_string()
            .contains("plugins.p.health.intervall: unknown field"),
        "{errors}"
    );
}
