//! Start order on readiness: a plugin that depends on a pool starts once
//! the pool serves, hears when it goes, and stops before it.

use demi_e2e::{Conductor, bin, eventually, json, ok, signal_pid};
use nix::sys::signal::Signal;

fn dependency_event(e: &serde_json::Value, plugin: &str, message: &str) -> bool {
    e["message"] == message && e["plugin"] == plugin && e["dependency"] == "pool"
}

#[test]
fn a_dependant_starts_after_its_pool_serves_hears_when_it_goes_and_stops_first() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("watcher.txt");
    let mut conductor = Conductor::start(&format!(
        "[plugins.watcher]\ncommand = \"{}\"\nargs = [\"--journal\", \"{}\", \
         \"--watch-dependencies\"]\njobs = false\ndepends_on = [\"pool\"]\n\
         shutdown_grace = \"1s\"\n{}",
        bin("probe_plugin").display(),
        journal.display(),
        "[plugins.pool]\ncommand = \"{echo}\"\nargs = [\"--start-delay\", \"2s\"]\nreplicas = 2\n\
         shutdown_grace = \"1s\"\n\
         [plugins.bot]\ncommand = \"{echo}\"\ndepends_on = [\"pool\"]\nshutdown_grace = \"1s\"\n\
         [plugins.bound]\ncommand = \"{echo}\"\ndepends_on = [\"pool\"]\nbinds_to = true\n\
         shutdown_grace = \"1s\"\n",
    ));
    // While the pool starts, the dependants wait, and say so.
    let waiting = ok(conductor.cli(&["status"]));
    assert!(waiting.contains("waiting (pool)"), "{waiting}");
    let status = json(conductor.cli(&["status", "bot", "--json"]));
    assert_eq!(status[0]["held"], true, "{status}");
    assert_eq!(status[0]["waiting_for"][0], "pool", "{status}");

    // Either replica may be first, and one is enough (min_serving = 1).
    let (pool_serving, _) = conductor.wait_for(0, "a pool replica serving", |e| {
        e["message"] == "instance serving" && e["span"]["plugin"] == "pool"
    });
    let (bot_at, bot_pid) = conductor.wait_serving(0, "bot", 0);
    let (_, bound_pid) = conductor.wait_serving(0, "bound", 0);
    let first_spawn = |plugin: &str| {
        conductor
            .events()
            .iter()
            .position(|e| e["message"] == "instance spawned" && e["span"]["plugin"] == plugin)
            .expect("spawned")
    };
    assert!(
        first_spawn("bot") > pool_serving,
        "bot spawned before the pool served"
    );
    assert!(first_spawn("bound") > pool_serving);
    assert!(bot_at > pool_serving);

    // The watcher journals what it sees from its start on: it must have
    // started seeing before the pool goes, or it sees only the way back.
    let watched = |journal: &std::path::Path| -> Vec<String> {
        std::fs::read_to_string(journal)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("dep "))
            .map(|l| l.split_whitespace().nth(3).unwrap_or_default().to_owned())
            .collect()
    };
    eventually("the watcher saw the pool ready", || {
        watched(&journal).first().is_some_and(|r| r == "true")
    });

    // Every pool replica killed: below min_serving for its 2 s start.
    let from = conductor.cursor();
    for pid in conductor.pids_of("pool") {
        signal_pid(pid as u32, Signal::SIGKILL);
    }
    conductor.wait_for(from, "bot told", |e| {
        dependency_event(e, "bot", "dependency lost")
    });
    conductor.wait_for(from, "bound stopped", |e| {
        e["message"] == "instance stopped" && e["span"]["plugin"] == "bound"
    });
    let (back, _) = conductor.wait_for(from, "bot told it is back", |e| {
        dependency_event(e, "bot", "dependency back")
    });
    let (_, new_bound) = conductor.wait_serving(back, "bound", 0);
    assert_ne!(new_bound, bound_pid, "bound was started again");
    // The bot was told, not touched; a plugin can follow it too.
    assert_eq!(conductor.pids_of("bot"), [u64::from(bot_pid)]);
    eventually("the watcher saw the pool go and come back", || {
        watched(&journal)
            .windows(3)
            .any(|w| w == ["true", "false", "true"])
    });

    // Stop order: the dependants before the pool they depend on.
    let from = conductor.cursor();
    conductor.signal(Signal::SIGTERM);
    assert!(conductor.wait_exit().success());
    let log = conductor.events();
    let stopped = |plugin: &str| {
        log[from..]
            .iter()
            .position(|e| e["message"] == "instance stopped" && e["span"]["plugin"] == plugin)
            .unwrap_or_else(|| panic!("{plugin} never stopped"))
    };
    assert!(
        stopped("bot") < stopped("pool"),
        "bot stopped after the pool"
    );
    assert!(stopped("bound") < stopped("pool"));
}

#[test]
fn a_dependency_cycle_or_unknown_name_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("conductor.toml");
    let echo = bin("demi-plugin-echo");
    std::fs::write(
        &config,
        format!(
            "[plugins.a]\ncommand = \"{0}\"\ndepends_on = [\"b\"]\n\
             [plugins.b]\ncommand = \"{0}\"\ndepends_on = [\"c\"]\n\
             [plugins.c]\ncommand = \"{0}\"\ndepends_on = [\"a\"]\n\
             [plugins.d]\ncommand = \"{0}\"\ndepends_on = [\"nowhere\"]\n",
            echo.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bin("conductor"))
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{said}");
    assert!(
        said.contains("a dependency cycle: a -> b -> c -> a"),
        "{said}"
    );
    assert!(said.contains("plugins.d.depends_on"), "{said}");
    assert!(said.contains("\"nowhere\""), "{said}");
}
