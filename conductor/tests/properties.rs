//! Property tests of the parsers operators feed the conductor: the
//! configuration (generated from its own keys with values of every kind,
//! the examples mutated, and plain noise), plugin folders' `plugin.toml`
//! manifests, and `scale-sim`'s traces.
//! Whatever the input: no panic, and every error names the file, and for
//! the configuration the line, column and field.
//!
//! `make test` runs 2,048 cases a property; set `PROPTEST_CASES` (e.g.
//! 100000) for a long run.

use std::path::Path;
use std::time::Duration;

use demi_conductor::config;
use demi_conductor::scaler::trace;
use proptest::prelude::*;

const FILE: &str = "/tmp/demi-properties/conductor.toml";

/// Keys of a plugin's table, known and not.
const PLUGIN_KEYS: &[&str] = &[
    "command",
    "args",
    "env",
    "working_dir",
    "replicas",
    "startup_timeout",
    "shutdown_grace",
    "health",
    "sharded",
    "share_handoff",
    "depends_on",
    "binds_to",
    "user",
    "group",
    "no_new_privileges",
    "capabilities",
    "jobs",
    "submits_to",
    "enabled",
];

/// Sub-tables of a plugin and some of their keys.
const TABLES: &[(&str, &[&str])] = &[
    (
        "health",
        &["interval", "timeout", "failure_threshold", "min_serving"],
    ),
    (
        "restart",
        &[
            "initial_delay",
            "max_delay",
            "multiplier",
            "jitter",
            "reset_after",
            "standby",
            "start_limit_burst",
            "start_limit_interval",
            "never_restart_exit_codes",
            "on_memory_above",
        ],
    ),
    (
        "limits",
        &["memory", "memory_swap", "memory_high", "cpu", "pids"],
    ),
    (
        "dispatch",
        &[
            "queue_capacity",
            "max_in_flight",
            "max_in_flight_per_replica",
            "max_attempts",
            "attempt_timeout",
            "retry_initial",
            "retry_max",
        ],
    ),
    (
        "autoscale",
        &[
            "min",
            "max",
            "bucket",
            "history",
            "seasonal_periods",
            "target",
        ],
    ),
    ("credentials", &["token", "bad/name", ".hidden"]),
    ("shared_limits", &["rest", "identify"]),
    ("env", &["A", "PATH"]),
];

/// `[conductor]` keys and tables.
const CONDUCTOR_KEYS: &[&str] = &[
    "runtime_dir",
    "state_dir",
    "log_format",
    "cgroup_root",
    "cgroup_policy",
    "usage_interval",
    "plugin_dirs",
    "nope",
];

/// A TOML value of any kind, often one a key would accept.
fn value() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (0i64..20).prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}").replace("NaN", "nan")),
        Just("true".to_owned()),
        Just("false".to_owned()),
        prop::sample::select(vec![
            "\"/bin/true\"",
            "\"./nope\"",
            "\"5s\"",
            "\"-1s\"",
            "\"0s\"",
            "\"1h\"",
            "\"250ms\"",
            "\"18446744073709551615s\"",
            "\"512MiB\"",
            "\"0B\"",
            "\"lots\"",
            "\"1KiB\"",
            "\"127.0.0.1:0\"",
            "\"none\"",
            "\"overlap\"",
            "\"exclusive\"",
            "\"CAP_CHOWN\"",
            "\"nobody\"",
            "\"root\"",
            "\"\"",
            "\"a\"",
            "\"b\"",
            "\"json\"",
            "\"off\"",
            "\"/\"",
            "\"..\"",
            "{ rate = 0, per = \"1s\" }",
            "{ every = \"5s\", buckets = 0 }",
            "{ rate = 45, per = \"1s\" }",
        ])
        .prop_map(str::to_owned),
        "[a-zA-Z0-9 ./:_-]{0,16}".prop_map(|s| format!("\"{s}\"")),
    ];
    prop_oneof![
        4 => scalar.clone(),
        1 => prop::collection::vec(scalar.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
        1 => prop::collection::vec(("[a-z]{1,6}", scalar), 0..3).prop_map(|kv| {
            let pairs: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
            format!("{{ {} }}", pairs.join(", "))
        }),
    ]
}

fn quoted_key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        k.to_owned()
    } else {
        format!("{k:?}")
    }
}

/// A value of the type `key` takes, mostly in and sometimes out of its
/// range; now and then one of any type. Well-typed tables get past
/// parsing into each component's own checks, where most panics would be.
fn value_for(key: &'static str) -> BoxedStrategy<String> {
    const DURATIONS: &[&str] = &[
        "startup_timeout",
        "shutdown_grace",
        "interval",
        "timeout",
        "initial_delay",
        "max_delay",
        "reset_after",
        "start_limit_interval",
        "attempt_timeout",
        "retry_initial",
        "retry_max",
        "bucket",
        "history",
        "usage_interval",
        "memory_restart_after",
    ];
    const INTEGERS: &[&str] = &[
        "replicas",
        "failure_threshold",
        "min_serving",
        "start_limit_burst",
        "queue_capacity",
        "max_in_flight",
        "max_in_flight_per_replica",
        "max_attempts",
        "min",
        "max",
        "pids",
    ];
    const FLOATS: &[&str] = &["multiplier", "jitter", "cpu", "target"];
    const SIZES: &[&str] = &["memory", "memory_swap", "memory_high", "on_memory_above"];
    const BOOLS: &[&str] = &[
        "sharded",
        "no_new_privileges",
        "jobs",
        "enabled",
        "standby",
        "binds_to",
    ];
    const LISTS: &[&str] = &[
        "args",
        "depends_on",
        "capabilities",
        "submits_to",
        "never_restart_exit_codes",
        "seasonal_periods",
    ];
    let typed: BoxedStrategy<String> = if DURATIONS.contains(&key) {
        prop_oneof![
            (0u64..100_000).prop_map(|ms| format!("\"{ms}ms\"")),
            any::<u64>().prop_map(|s| format!("\"{s}s\"")),
            prop::sample::select(vec!["\"0s\"", "\"-1s\"", "\"1y\"", "\"soon\""])
                .prop_map(str::to_owned),
        ]
        .boxed()
    } else if INTEGERS.contains(&key) {
        prop_oneof![
            (0i64..20).prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string())
        ]
        .boxed()
    } else if FLOATS.contains(&key) {
        prop_oneof![
            (0.0f64..4.0).prop_map(|f| format!("{f:?}")),
            any::<f64>().prop_map(|f| format!("{f:?}").replace("NaN", "nan"))
        ]
        .boxed()
    } else if SIZES.contains(&key) {
        prop_oneof![
            (0u64..4096).prop_map(|m| format!("\"{m}MiB\"")),
            any::<u64>().prop_map(|b| (b >> 1).to_string()),
            prop::sample::select(vec!["\"0B\"", "\"1KiB\"", "\"16EiB\"", "\"lots\""])
                .prop_map(str::to_owned),
        ]
        .boxed()
    } else if BOOLS.contains(&key) {
        any::<bool>().prop_map(|b| b.to_string()).boxed()
    } else if LISTS.contains(&key) {
        prop::collection::vec(
            prop_oneof![
                prop::sample::select(vec![
                    "\"a\"",
                    "\"b\"",
                    "\"echo\"",
                    "\"1d\"",
                    "\"CAP_CHOWN\"",
                    "\"\""
                ])
                .prop_map(str::to_owned),
                (0i64..300).prop_map(|n| n.to_string()),
            ],
            0..3,
        )
        .prop_map(|v| format!("[{}]", v.join(", ")))
        .boxed()
    } else if key == "command" {
        prop_oneof![9 => Just("\"/bin/true\"".to_owned()), 1 => Just("\"./nope\"".to_owned())]
            .boxed()
    } else {
        value().boxed()
    };
    prop_oneof![29 => typed, 1 => value()].boxed()
}

/// `key = value` lines for a table of `keys`, `command` first when it has one.
fn entries(keys: &'static [&'static str]) -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(
        prop::sample::select(keys).prop_flat_map(|k| (Just(quoted_key(k)), value_for(k))),
        0..6,
    )
}

type Entries = Vec<(String, String)>;

/// A plugin's table: `command` most of the time, its own keys, and some
/// of its sub-tables.
type PluginBody = (bool, Entries, Vec<(&'static str, Entries)>);

fn plugin_body() -> impl Strategy<Value = PluginBody> {
    (
        prop::bool::weighted(0.9),
        entries(PLUGIN_KEYS),
        prop::collection::vec(
            (0..TABLES.len()).prop_flat_map(|t| (Just(TABLES[t].0), entries(TABLES[t].1))),
            0..3,
        ),
    )
}

/// Writes `body` after its header, its sub-tables as `[PREFIXtable]`. A
/// key twice is a TOML error before any check: each goes in once (those
/// in `written` not at all).
fn write_plugin(
    text: &mut String,
    prefix: &str,
    (command, keys, tables): PluginBody,
    mut written: std::collections::HashSet<String>,
) {
    if command && written.insert("command".to_owned()) {
        text.push_str("command = \"/bin/true\"\n");
    }
    for (k, v) in keys {
        if written.insert(k.clone()) {
            text.push_str(&format!("{k} = {v}\n"));
        }
    }
    for (table, keys) in tables {
        text.push_str(&format!("[{prefix}{table}]\n"));
        let mut written = std::collections::HashSet::new();
        for (k, v) in keys {
            if written.insert(k.clone()) {
                text.push_str(&format!("{k} = {v}\n"));
            }
        }
    }
}

/// A configuration made of the conductor's own keys and tables.
fn config_text() -> impl Strategy<Value = String> {
    let name = prop::sample::select(vec!["a", "b", "echo", "\"x y\"", "\"\"", "\"ünï\"", "a-1"]);
    (
        entries(CONDUCTOR_KEYS),
        prop::collection::vec((name, plugin_body()), 0..4),
    )
        .prop_map(|(conductor, plugins)| {
            let mut text = String::from("[conductor]\nruntime_dir = \"run\"\n");
            for (k, v) in conductor {
                text.push_str(&format!("{k} = {v}\n"));
            }
            for (name, body) in plugins {
                text.push_str(&format!("[plugins.{name}]\n"));
                write_plugin(
                    &mut text,
                    &format!("plugins.{name}."),
                    body,
                    Default::default(),
                );
            }
            text
        })
}

/// A plugin folder's manifest: a name (or not), then a plugin's own keys
/// and tables, as in `[plugins.NAME]`.
fn manifest_text() -> impl Strategy<Value = String> {
    (
        prop::option::weighted(
            0.9,
            prop::sample::select(vec!["\"a\"", "\"echo\"", "\"x y\"", "\"\"", "7", "\"ünï\""]),
        ),
        plugin_body(),
    )
        .prop_map(|(name, body)| {
            let mut text = String::new();
            let mut written = std::collections::HashSet::new();
            if let Some(name) = name {
                text.push_str(&format!("name = {name}\n"));
                written.insert("name".to_owned());
            }
            write_plugin(&mut text, "", body, written);
            text
        })
}

/// Checks what a scan of a plugin folder holding `text` as its manifest
/// made of it: a plugin, or problems that each name the manifest, a line
/// and column, and the field.
fn scanned(text: &str) -> Result<(), TestCaseError> {
    let root = std::env::temp_dir().join(format!("demi-properties-{}", std::process::id()));
    let folder = root.join("plugin");
    let manifest = folder.join(config::discovery::MANIFEST);
    std::fs::create_dir_all(&folder).map_err(|e| TestCaseError::fail(e.to_string()))?;
    std::fs::write(&manifest, text).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let scan = config::discovery::scan(&[root]);
    prop_assert!(
        scan.manifests.len() + usize::from(!scan.problems.is_empty()) >= 1,
        "neither a plugin nor a problem:\n{}",
        text
    );
    for problem in &scan.problems {
        let shown = problem.to_string();
        prop_assert_eq!(&problem.file, &manifest, "{}", shown);
        prop_assert!(
            problem.position.is_some(),
            "no line and column: {}\n{}",
            shown,
            text
        );
        let (line, column) = problem.position.unwrap_or_default();
        prop_assert!(line >= 1 && column >= 1, "{}", shown);
        prop_assert!(!problem.field.is_empty(), "no field: {}\n{}", shown, text);
    }
    Ok(())
}

/// 2,048 cases a property (about a second each here), or
/// `PROPTEST_CASES`.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2048)
}

/// Checks what `config::parse` made of `text`.
fn parsed(text: &str) -> Result<(), TestCaseError> {
    let Err(errors) = config::parse(Path::new(FILE), text) else {
        return Ok(());
    };
    prop_assert!(!errors.0.is_empty());
    for error in &errors.0 {
        let shown = error.to_string();
        prop_assert_eq!(&error.file, Path::new(FILE), "{}", shown);
        prop_assert!(
            error.position.is_some(),
            "no line and column: {}\n{}",
            shown,
            text
        );
        let (line, column) = error.position.unwrap_or_default();
        // Only an error above every table header (or in the first header
        // itself) has no field to name.
        let in_a_table = text.lines().take(line.saturating_sub(1)).any(is_header);
        prop_assert!(
            !error.field.is_empty() || !in_a_table,
            "no field: {}\n{}",
            shown,
            text
        );
        prop_assert!(line >= 1 && column >= 1, "{}", shown);
        prop_assert!(
            line <= text.lines().count().max(1) + 1,
            "line {} past the end: {}",
            line,
            shown
        );
    }
    Ok(())
}

/// A `[table]` line with a name.
fn is_header(line: &str) -> bool {
    let line = line.trim();
    line.strip_prefix('[')
        .and_then(|rest| rest.find(']').map(|end| &rest[..end]))
        .is_some_and(|name| !name.trim_matches('[').trim().is_empty())
}

/// The examples, for mutating.
fn examples() -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    [
        "conductor.toml",
        "discord.toml",
        "platform.toml",
        "android.toml",
    ]
    .iter()
    .map(|f| std::fs::read_to_string(dir.join(f)).unwrap_or_default())
    .collect()
}

/// A CSV trace row's time, in formats the parser takes and not.
fn time() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u32..4000, 1u32..13, 1u32..32, 0u32..25, 0u32..61)
            .prop_map(|(y, mo, d, h, mi)| { format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:00Z") }),
        (2000u32..2030, 1u32..13, 1u32..29, 0u32..24)
            .prop_map(|(y, mo, d, h)| format!("{y}-{mo:02}-{d:02} {h:02}:00:00")),
        any::<i64>().prop_map(|n| n.to_string()),
        (1_700_000_000i64..1_700_100_000).prop_map(|n| n.to_string()),
        "[0-9:T .Z+-]{0,24}",
        "\\PC{0,10}",
    ]
}

fn trace_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<f64>().prop_map(|f| f.to_string()),
        (0.0f64..1000.0).prop_map(|f| format!("{f:.3}")),
        prop::sample::select(vec![
            "", "NaN", "nan", "inf", "-inf", "-1", "1e308", "1e309", "x"
        ])
        .prop_map(str::to_owned),
    ]
}

proptest! {
    // Failures are shown, not stored: the tests run from a clean checkout.
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn a_configuration_of_its_own_keys_parses_or_says_where_it_is_wrong(text in config_text()) {
        parsed(&text)?;
    }

    #[test]
    fn a_mutated_example_parses_or_says_where_it_is_wrong(
        which in 0usize..4,
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0usize..12, "\\PC{0,6}|[\\[\\]=\"\\n#{}.,]{0,4}"), 1..4),
    ) {
        let mut text = examples()[which].clone();
        for (at, cut, insert) in edits {
            let mut at = at.index(text.len().max(1)).min(text.len());
            while !text.is_char_boundary(at) { at -= 1; }
            let mut end = (at + cut).min(text.len());
            while !text.is_char_boundary(end) { end -= 1; }
            text.replace_range(at..end.max(at), &insert);
        }
        parsed(&text)?;
    }

    #[test]
    fn a_manifest_makes_a_plugin_or_says_where_it_is_wrong(text in manifest_text()) {
        scanned(&text)?;
    }

    #[test]
    fn noise_parses_or_says_where_it_is_wrong(text in "[\\[\\]=\"a-z0-9 .\\n#{},'_-]{0,200}|\\PC{0,100}") {
        parsed(&text)?;
    }

    #[test]
    fn a_trace_parses_or_names_the_file_and_line(
        header in prop::option::of(Just("timestamp,value".to_owned())),
        rows in prop::collection::vec((time(), trace_value(), prop::option::of("[a-z0-9]{0,4}")), 0..40),
        step in prop::option::of(prop_oneof![Just(Duration::ZERO), Just(Duration::from_millis(1)), Just(Duration::from_secs(900)), Just(Duration::from_secs(86_400 * 365))]),
    ) {
        let mut text = header.map(|h| format!("{h}\n")).unwrap_or_default();
        for (t, v, extra) in rows {
            text.push_str(&t);
            text.push(',');
            text.push_str(&v);
            if let Some(extra) = extra {
                text.push(',');
                text.push_str(&extra);
            }
            text.push('\n');
        }
        if let Err(error) = trace::parse(Path::new("trace.csv"), &text, step) {
            let shown = error.to_string();
            prop_assert!(shown.starts_with("trace.csv"), "{}", shown);
        }
    }
}
