//! Resource isolation end to end, with real cgroups (the tests run as root).

use std::time::{Duration, Instant};

use admin_pb::Usage;
use demi_e2e::grpc::{self, admin_pb, pb};
use demi_e2e::{Conductor, alive, cgroup_dirs, signal_pid, wait_all_gone};
use nix::sys::signal::Signal;
use serde_json::Value;

const SERVING: i32 = 1;

fn plugin(name: &str, extra: &str) -> String {
    format!("[plugins.{name}]\ncommand = \"{{echo}}\"\nshutdown_grace = \"2s\"\n{extra}\n")
}

/// A plugin's own log line `message` (plugin output, not conductor events),
/// with its JSON fields parsed.
fn plugin_line(conductor: &Conductor, plugin: &str, message: &str) -> Value {
    plugin_line_since(conductor, 0, plugin, message)
}

fn plugin_line_since(conductor: &Conductor, from: usize, plugin: &str, message: &str) -> Value {
    let (_, line) = conductor.wait_for(from, &format!("{plugin} says {message}"), |e| {
        e["target"] == "plugin" && e["plugin"] == plugin && e["message"] == message
    });
    serde_json::from_str(line["fields"].as_str().unwrap_or("{}")).unwrap()
}

/// Instance 0 of `plugin`'s usage, read by the conductor when asked
/// (GetPlugin), polled until `pred` holds; with when it was read.
fn usage(conductor: &Conductor, plugin: &str, pred: impl Fn(&Usage) -> bool) -> (Instant, Usage) {
    let deadline = Instant::now() + Duration::from_secs(20);
    grpc::runtime().block_on(async {
        let mut api = grpc::admin(&conductor.api_socket()).await;
        loop {
            let asked = Instant::now();
            let answer = api
                .get_plugin(admin_pb::PluginRef {
                    name: plugin.into(),
                })
                .await
                .expect("GetPlugin")
                .into_inner();
            let usage = answer.instances.first().and_then(|i| i.usage);
            if let Some(usage) = usage
                && pred(&usage)
            {
                return (asked, usage);
            }
            assert!(
                Instant::now() < deadline,
                "{plugin}: usage never matched; last {usage:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

fn millis(d: Option<prost_types::Duration>) -> f64 {
    d.map_or(0.0, |d| d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6)
}

/// Medians of `n` sequential echo jobs, in microseconds.
async fn job_latency_us(
    client: &mut pb::plugin_client::PluginClient<tonic::transport::Channel>,
    n: usize,
) -> f64 {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let result = client
            .handle(pb::Job {
                id: format!("job-{i}"),
                payload: b"x".to_vec(),
                attempt: 1,
                ..Default::default()
            })
            .await
            .expect("job")
            .into_inner();
        assert_eq!(result.payload, b"x");
        samples.push(started.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    samples[n / 2]
}

#[test]
fn an_instance_past_its_memory_limit_is_oom_killed_reported_and_restarted() {
    let conductor = Conductor::start(&format!(
        "{}{}",
        plugin(
            "hog",
            "args = [\"--alloc-mib\", \"200\"]\n[plugins.hog.limits]\nmemory = \"64MiB\"\n\
             [plugins.hog.restart]\ninitial_delay = \"50ms\"\nstart_limit_burst = 4\n"
        ),
        plugin(
            "steady",
            "[plugins.steady.health]\ninterval = \"200ms\"\ntimeout = \"150ms\"\n"
        ),
    ));
    let (_, steady) = conductor.wait_serving(0, "steady", 0);
    let (at, exited) = conductor.wait_event(0, "hog", "instance exited");
    assert_eq!(exited["reason"], "oom", "{exited}");
    let (at, _) = conductor.wait_event(at, "hog", "restart scheduled");
    let (at, _) = conductor.wait_event(at, "hog", "instance spawned");
    let (_, again) = conductor.wait_event(at, "hog", "instance exited");
    assert_eq!(again["reason"], "oom");
    let (_, failed) = conductor.wait_event(0, "hog", "instance failed");
    assert!(failed["reason"].as_str().unwrap().contains("start limit"));

    // The neighbour never blinked.
    assert!(alive(steady));
    assert_eq!(conductor.count("steady", "instance spawned"), 1);
    assert_eq!(conductor.count("steady", "health check failed"), 0);
    grpc::runtime().block_on(async {
        let channel = grpc::connect(&conductor.socket("steady", 0)).await;
        assert_eq!(grpc::health(&channel, "steady").await.unwrap(), SERVING);
    });
}

#[test]
fn a_fork_bomb_is_held_at_its_pids_limit() {
    let conductor = Conductor::start(&format!(
        "{}{}",
        plugin(
            "forker",
            "args = [\"--fork\", \"1000\"]\n[plugins.forker.limits]\npids = 32\n"
        ),
        plugin("steady", ""),
    ));
    let forked = plugin_line(&conductor, "forker", "forked");
    let forked = forked["forked"].as_u64().unwrap();
    assert!(
        forked < 32,
        "only {forked} forks fit under pids.max = 32 (threads count too)"
    );
    let (_, sample) = usage(&conductor, "forker", |u| u.pids >= 32);
    eprintln!("forker held at {} tasks after {forked} forks", sample.pids);
    // A stand-in joins by migration, which pids.max does not refuse.
    assert!(sample.pids <= 33, "{} tasks", sample.pids);

    // The instance still serves, and so does everybody else.
    let (_, forker) = conductor.wait_serving(0, "forker", 0);
    let (_, steady) = conductor.wait_serving(0, "steady", 0);

    // On v1 each hierarchy joined is a migration at every start: an
    // instance joins memory and cpuacct, and pids (or cpu) only for a limit.
    let joined = |pid: u32| {
        let root = conductor.cgroup_root().to_owned();
        let mut controllers: Vec<String> = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap()
            .lines()
            .filter(|l| l.contains(&root))
            .filter_map(|l| l.split(':').nth(1).map(str::to_owned))
            .collect();
        controllers.sort();
        controllers
    };
    assert_eq!(joined(forker), ["cpuacct", "memory", "pids"]);
    assert_eq!(joined(steady), ["cpuacct", "memory"]);
    grpc::runtime().block_on(async {
        let channel = grpc::connect(&conductor.socket("steady", 0)).await;
        let mut client = pb::plugin_client::PluginClient::new(channel);
        job_latency_us(&mut client, 10).await;
    });
}

#[test]
fn a_spinner_is_throttled_to_its_cpu_limit_and_its_neighbour_keeps_its_latency() {
    let conductor = Conductor::start(&format!(
        "{}{}",
        plugin(
            "spinner",
            "args = [\"--spin-threads\", \"2\", \"--spin-on-usr1\"]\n[plugins.spinner.limits]\ncpu = 0.2\n"
        ),
        plugin("steady", ""),
    ));
    let (_, spinner) = conductor.wait_serving(0, "spinner", 0);
    conductor.wait_serving(0, "steady", 0);
    let rt = grpc::runtime();
    let channel = rt.block_on(grpc::connect(&conductor.socket("steady", 0)));
    let mut client = pb::plugin_client::PluginClient::new(channel);
    rt.block_on(job_latency_us(&mut client, 50)); // warm up
    let idle = rt.block_on(job_latency_us(&mut client, 300));

    signal_pid(spinner, Signal::SIGUSR1);
    plugin_line(&conductor, "spinner", "spinning");
    let (at, first) = usage(&conductor, "spinner", |u| u.throttled_periods > 0);
    // Other tests share these two cores: the least of three rounds is the
    // spinner's doing, not theirs.
    let busy = (0..3)
        .map(|_| rt.block_on(job_latency_us(&mut client, 300)))
        .fold(f64::INFINITY, f64::min);
    let (until, last) = usage(&conductor, "spinner", |u| millis(u.cpu) > millis(first.cpu));

    // CPU used over wall time between two samples, in cores.
    let cpu = (millis(last.cpu) - millis(first.cpu)) / (until - at).as_secs_f64() / 1e3;
    eprintln!(
        "spinner: {cpu:.2} cores, throttled {:.0} ms in {} periods; neighbour p50 {idle:.0} µs idle, {busy:.0} µs beside the spinner",
        millis(last.throttled),
        last.throttled_periods
    );
    assert!(last.throttled_periods > 0);
    assert!(
        cpu < 0.3,
        "two spinning threads held near 0.2 cores, got {cpu:.2}"
    );
    // Idle again (the spinner stopped), in case the machine got busier
    // since the first idle round; the higher of the two is the baseline.
    signal_pid(spinner, Signal::SIGSTOP);
    let idle_after = rt.block_on(job_latency_us(&mut client, 300));
    signal_pid(spinner, Signal::SIGCONT);
    let idle = idle.max(idle_after);
    assert!(
        busy < idle * 2.0,
        "neighbour latency {busy:.0} µs vs {idle:.0} µs idle"
    );
}

#[test]
fn a_double_forked_daemon_dies_with_its_instance() {
    let mut conductor = Conductor::start(&plugin("daemonizer", "args = [\"--daemonize\"]"));
    let (_, first) = conductor.wait_serving(0, "daemonizer", 0);
    let daemon = plugin_line(&conductor, "daemonizer", "daemonized")["daemon_pid"]
        .as_u64()
        .unwrap() as u32;
    assert!(alive(daemon));
    assert_ne!(
        nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(daemon as i32)))
            .unwrap()
            .as_raw() as u32,
        first,
        "escaped the process group"
    );

    // Killing the instance takes its daemon along before the restart.
    let cursor = conductor.cursor();
    signal_pid(first, Signal::SIGKILL);
    let (at, _) = conductor.wait_event(cursor, "daemonizer", "instance exited");
    wait_all_gone(&[daemon], Duration::from_secs(2)).expect("daemon outlived its instance");
    conductor.wait_serving(at, "daemonizer", 0);
    let (_, line) = conductor.wait_for(at, "second daemon", |e| {
        e["target"] == "plugin" && e["message"] == "daemonized"
    });
    let fields: Value = serde_json::from_str(line["fields"].as_str().unwrap()).unwrap();
    let second = fields["daemon_pid"].as_u64().unwrap() as u32;

    // And stopping the conductor takes the second one.
    conductor.signal(Signal::SIGTERM);
    assert_eq!(conductor.wait_exit().code(), Some(0));
    wait_all_gone(&[second], Duration::from_secs(2)).expect("daemon outlived the conductor");
}

#[test]
fn no_cgroup_is_left_after_sigterm_and_a_restart_cleans_up_after_sigkill() {
    let plugins = format!(
        "{}{}",
        plugin(
            "a",
            "replicas = 2\n[plugins.a.limits]\nmemory = \"128MiB\"\npids = 64\n"
        ),
        plugin("b", "[plugins.b.limits]\ncpu = 0.5\n"),
    );
    let mut conductor = Conductor::start(&plugins);
    for (p, i) in [("a", 0), ("a", 1), ("b", 0)] {
        conductor.wait_serving(0, p, i);
    }
    let root = conductor.cgroup_root().to_owned();
    assert!(!cgroup_dirs(&root).is_empty());
    conductor.signal(Signal::SIGTERM);
    assert_eq!(conductor.wait_exit().code(), Some(0));
    assert_eq!(
        cgroup_dirs(&root),
        Vec::<std::path::PathBuf>::new(),
        "left behind"
    );

    // SIGKILL leaves the tree; the next start removes what is not its own.
    let conductor = conductor.restart();
    for (p, i) in [("a", 0), ("a", 1), ("b", 0)] {
        conductor.wait_serving(0, p, i);
    }
    conductor.signal(Signal::SIGKILL);
    let mut conductor = conductor.restart();
    let (_, ready) = conductor.wait_for(0, "cgroups ready", |e| e["message"] == "cgroups ready");
    assert_eq!(ready["leftovers"], 3, "{ready}");
    for (p, i) in [("a", 0), ("a", 1), ("b", 0)] {
        conductor.wait_serving(0, p, i);
    }
    let mut names: Vec<String> = cgroup_dirs(&root)
        .iter()
        .filter_map(|d| d.strip_prefix("/sys/fs/cgroup").ok())
        .filter_map(|d| d.to_str().map(str::to_owned))
        .filter_map(|d| {
            d.split_once(&format!("/{root}"))
                .map(|(_, rest)| rest.to_owned())
        })
        .filter(|rest| rest.matches('/').count() == 2)
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(names, ["/a/0", "/a/1", "/b/0"]);
    conductor.signal(Signal::SIGTERM);
    conductor.wait_exit();
    assert!(cgroup_dirs(&root).is_empty());
}

#[test]
fn without_usable_cgroups_required_refuses_and_optional_runs_unconfined() {
    let plugins = format!(
        "{}{}",
        plugin("limited", "[plugins.limited.limits]\nmemory = \"64MiB\"\n"),
        plugin("free", ""),
    );
    // cgroup.procs is a file: no cgroup can be created below it.
    let required = Conductor::builder()
        .conductor("cgroup_root = \"cgroup.procs/demi\"")
        .start(&plugins);
    let (_, failed) = required.wait_event(0, "limited", "instance failed");
    let reason = failed["reason"].as_str().unwrap();
    assert!(reason.contains("cgroups are unavailable"), "{reason}");
    assert!(
        reason.contains("cgroup_policy = \"optional\""),
        "says how to fix it: {reason}"
    );
    assert_eq!(required.count("limited", "instance spawned"), 0);
    required.wait_serving(0, "free", 0);

    let optional = Conductor::builder()
        .conductor("cgroup_root = \"cgroup.procs/demi\"\ncgroup_policy = \"optional\"")
        .start(&plugins);
    optional.wait_serving(0, "limited", 0);
    let (_, warning) = optional.wait_for(0, "the warning", |e| {
        e["level"] == "WARN"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.contains("LIMITS NOT ENFORCED"))
    });
    assert_eq!(warning["plugin"], "limited");
}

#[test]
fn cgroup_policy_off_confines_nothing_and_says_so_once() {
    let conductor = Conductor::builder()
        .conductor("cgroup_policy = \"off\"")
        .start(&format!(
            "{}{}",
            plugin(
                "limited",
                "replicas = 2\n[plugins.limited.limits]\nmemory = \"64MiB\"\n"
            ),
            plugin("free", ""),
        ));
    let (_, a) = conductor.wait_serving(0, "limited", 0);
    let (_, b) = conductor.wait_serving(0, "limited", 1);
    let (_, c) = conductor.wait_serving(0, "free", 0);
    let root = conductor.cgroup_root().to_owned();
    for pid in [a, b, c] {
        let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(
            !membership.contains(&root),
            "{pid} is confined: {membership}"
        );
    }
    assert!(cgroup_dirs(&root).is_empty(), "no cgroup was made");
    let said: Vec<_> = conductor
        .events()
        .into_iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("cgroup_policy = \"off\""))
        })
        .collect();
    assert_eq!(said.len(), 1, "said once: {said:?}");
    assert_eq!(said[0]["unenforced"], "[\"limited\"]");
    assert!(
        !conductor
            .events()
            .iter()
            .any(|e| e["level"] == "WARN"
                && e["message"].as_str().is_some_and(|m| m.contains("LIMITS"))),
        "no warning per instance"
    );
    let status = demi_e2e::json(conductor.cli(&["status", "limited", "--json"]));
    assert_eq!(status[0]["instances"][0]["confined"], false);

    // No cgroup counts them, yet their figures are there: read from the
    // machine (the main process's RSS and CPU time).
    demi_e2e::eventually("usage of an unconfined instance", || {
        let status = demi_e2e::json(conductor.cli(&["status", "free", "--json"]));
        status[0]["instances"][0]["usage"]["memory_bytes"]
            .as_u64()
            .is_some_and(|b| b > 1 << 20)
    });
    let scrape = conductor.scrape();
    let memory = demi_e2e::series(&scrape, "demi_instance_memory_bytes", &[("plugin", "free")]);
    assert!(memory.is_some_and(|b| b > 1_048_576.0), "{memory:?}");
    assert!(
        demi_e2e::series(
            &scrape,
            "demi_instance_cpu_seconds_total",
            &[("plugin", "free")]
        )
        .is_some(),
        "no CPU figure"
    );
    // And the machine itself.
    for name in [
        "demi_host_cpus",
        "demi_host_memory_available_bytes",
        "demi_conductor_resident_memory_bytes",
    ] {
        let value = demi_e2e::series(&scrape, name, &[]);
        assert!(value.is_some_and(|v| v > 0.0), "{name}: {value:?}");
    }
    assert!(demi_e2e::series(&scrape, "demi_host_load", &[("window", "1m")]).is_some());
}

/// The v2 code path on this v1 host: in a private mount namespace, the
/// controller-less cgroup2 hierarchy at `unified/` is bind-mounted over
/// `/sys/fs/cgroup`, so detection reports v2, instances join v2 cgroups and
/// are killed with `cgroup.kill`; declared limits fail for want of controllers.
#[test]
fn the_v2_path_confines_kills_and_refuses_limits_without_controllers() {
    let unified = std::path::Path::new("/sys/fs/cgroup/unified");
    let is_cgroup2 = nix::sys::statfs::statfs(unified)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC);
    if !is_cgroup2 {
        eprintln!(
            "SKIPPED: no cgroup2 hierarchy at {} on this host",
            unified.display()
        );
        return;
    }
    let mut conductor = Conductor::builder()
        .wrap(&[
            "unshare",
            "-m",
            "sh",
            "-c",
            "mount --bind /sys/fs/cgroup/unified /sys/fs/cgroup && exec \"$@\"",
            "sh",
        ])
        .start(&format!(
            "{}{}",
            plugin("free", "args = [\"--daemonize\"]"),
            plugin("limited", "[plugins.limited.limits]\nmemory = \"64MiB\"\n"),
        ));
    let (_, ready) = conductor.wait_for(0, "cgroups ready", |e| e["message"] == "cgroups ready");
    assert_eq!(ready["setup"], "v2 (unified)");
    assert_eq!(ready["born_in_cgroup"], true, "clone3 into the cgroup");
    let (_, failed) = conductor.wait_event(0, "limited", "instance failed");
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("memory controller is unavailable"),
        "{failed}"
    );

    let (_, pid) = conductor.wait_serving(0, "free", 0);
    let daemon = plugin_line(&conductor, "free", "daemonized")["daemon_pid"]
        .as_u64()
        .unwrap() as u32;
    let root = conductor.cgroup_root().to_owned();
    let in_cgroup = |p: u32| {
        let membership = std::fs::read_to_string(format!("/proc/{p}/cgroup")).unwrap();
        assert!(
            membership.contains(&format!("0::/{root}/free/0")),
            "{p}: {membership}"
        );
    };
    in_cgroup(pid);
    in_cgroup(daemon);
    // The stand-in is born in the cgroup too, and becomes the next
    // process; the leftover daemon is killed by signals, not cgroup.kill,
    // after which this kernel would kill every later birth in the cgroup.
    let (at, ready) = conductor.wait_event(0, "free", "stand-in ready");
    let standby = ready["pid"].as_u64().unwrap() as u32;
    in_cgroup(standby);
    signal_pid(pid, Signal::SIGKILL);
    wait_all_gone(&[daemon], Duration::from_secs(5)).expect("leftover killed with the instance");
    let (served, again) = conductor.wait_serving(at, "free", 0);
    assert_eq!(again, standby, "the stand-in became the instance");
    let daemon = plugin_line_since(&conductor, at, "free", "daemonized")["daemon_pid"]
        .as_u64()
        .unwrap() as u32;
    // The next stand-in, born once the instance has served a second.
    let (_, ready) = conductor.wait_event(served, "free", "stand-in ready");
    let next = ready["pid"].as_u64().unwrap() as u32;
    let pids = std::fs::read_to_string(unified.join(&root).join("free/0/cgroup.procs")).unwrap();
    let mut pids: Vec<u32> = pids.lines().map(|l| l.parse().unwrap()).collect();
    pids.sort_unstable();
    let mut expected = vec![again, daemon, next];
    expected.sort_unstable();
    assert_eq!(pids, expected, "the plugin, its daemon and the stand-in");
    conductor.signal(Signal::SIGTERM);
    assert_eq!(conductor.wait_exit().code(), Some(0));
    wait_all_gone(&[again, daemon, next], Duration::from_secs(2))
        .expect("cgroup.kill left a process");
    assert!(!unified.join(&root).exists(), "v2 cgroup tree removed");
}

#[test]
fn a_stand_in_waits_in_the_instances_cgroup_and_becomes_its_next_process() {
    let mut conductor = Conductor::start(&plugin(
        "spare",
        "[plugins.spare.limits]\nmemory = \"128MiB\"\n\
         [plugins.spare.restart]\ninitial_delay = \"0ms\"\nstandby = true\n",
    ));
    let (at, first) = conductor.wait_serving(0, "spare", 0);
    let (at, ready) = conductor.wait_event(at, "spare", "stand-in ready");
    let standby = ready["pid"].as_u64().unwrap() as u32;
    let cgroup_of = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap()
            .lines()
            .find(|l| l.contains(":memory:"))
            .map(|l| l.rsplit(':').next().unwrap_or_default().to_owned())
            .unwrap()
    };
    assert_eq!(cgroup_of(standby), cgroup_of(first), "joined ahead of need");
    assert!(
        cgroup_of(first).ends_with("/spare/0"),
        "{}",
        cgroup_of(first)
    );
    let pgid = |pid: u32| {
        nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid as i32)))
            .unwrap()
            .as_raw() as u32
    };
    assert_eq!(
        pgid(standby),
        standby,
        "a group of its own, not the instance's"
    );
    let program = |pid: u32| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let first = cmdline
            .split(|&b| b == 0)
            .next()
            .unwrap_or_default()
            .to_vec();
        String::from_utf8(first).unwrap()
    };
    assert!(
        program(standby).ends_with("/demi-standin"),
        "the small stand-in binary, not the conductor: {}",
        program(standby)
    );
    // The pool grows after the stand-in started: its go carries the new size.
    demi_e2e::ok(conductor.cli(&["scale", "spare", "2"]));
    let (at, _) = conductor.wait_serving(at, "spare", 1);
    // Instance 0's events from here on.
    let zero = |message: &'static str| {
        move |e: &Value| {
            e["message"] == message && e["span"]["plugin"] == "spare" && e["span"]["instance"] == 0
        }
    };

    // The instance dies: the stand-in is told to go, and the stand-in
    // itself (not a new fork) becomes the plugin, with /dev/null on stdin.
    signal_pid(first, Signal::SIGKILL);
    let (at, spawned) = conductor.wait_for(at, "spare-0 spawned", zero("instance spawned"));
    assert_eq!(
        spawned["pid"].as_u64(),
        Some(u64::from(standby)),
        "{spawned}"
    );
    let (at, again) = conductor.wait_serving(at, "spare", 0);
    assert_eq!(again, standby);
    assert_eq!(
        std::fs::read_link(format!("/proc/{standby}/fd/0")).unwrap(),
        std::path::Path::new("/dev/null")
    );
    assert!(!program(standby).ends_with("/demi-standin"), "exec'd");
    let environ = std::fs::read(format!("/proc/{standby}/environ")).unwrap();
    assert!(
        environ
            .split(|&b| b == 0)
            .any(|v| v == b"DEMI_PLUGIN_REPLICAS=2"),
        "the pool's size as of the go"
    );
    // A killed instance's leftovers are killed; the stand-in is spared.
    // And a new one is prepared for the next time.
    let (_, next) = conductor.wait_for(at, "spare-0 stand-in", zero("stand-in ready"));
    let next = next["pid"].as_u64().unwrap() as u32;
    assert_ne!(next, standby);
    assert!(alive(next));

    conductor.signal(Signal::SIGTERM);
    assert_eq!(conductor.wait_exit().code(), Some(0));
    wait_all_gone(&[standby, next], Duration::from_secs(2)).expect("outlived the conductor");
    assert!(cgroup_dirs(conductor.cgroup_root()).is_empty());
}

#[test]
fn memory_above_its_ceiling_restarts_gracefully_one_replica_at_a_time() {
    let conductor = Conductor::builder()
        .conductor("usage_interval = \"200ms\"")
        .start(&plugin(
            "grower",
            "replicas = 2\nargs = [\"--alloc-mib\", \"96\", \"--delay\", \"100ms\"]\n\
             [plugins.grower.limits]\nmemory = \"256MiB\"\nmemory_high = \"192MiB\"\n\
             [plugins.grower.restart]\non_memory_above = \"48MiB\"\nmemory_restart_after = \"600ms\"\n",
        ));
    conductor.wait_serving(0, "grower", 0);
    conductor.wait_serving(0, "grower", 1);
    // The soft ceiling is written where the host's cgroup version keeps it.
    let soft = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/{}/grower/0/memory.soft_limit_in_bytes",
        conductor.cgroup_root()
    ))
    .unwrap();
    assert_eq!(soft.trim(), (192u64 << 20).to_string());

    // Jobs keep flowing through the restarts.
    let rt = grpc::runtime();
    let outcomes = rt.block_on(async {
        let api = demi_e2e::grpc::admin(&conductor.api_socket()).await;
        let mut calls = tokio::task::JoinSet::new();
        for n in 0..60 {
            let mut api = api.clone();
            calls.spawn(async move {
                tokio::time::sleep(Duration::from_millis(n * 80)).await;
                let job = demi_e2e::grpc::admin_pb::SubmitRequest {
                    plugin: "grower".into(),
                    payload: format!("job {n}").into_bytes(),
                    ..Default::default()
                };
                api.submit_and_wait(job)
                    .await
                    .map(|r| r.into_inner().status)
            });
        }
        let mut all = Vec::new();
        while let Some(done) = calls.join_next().await {
            all.push(done.unwrap());
        }
        all
    });
    let completed = demi_e2e::grpc::admin_pb::job_outcome::Status::Completed as i32;
    assert!(
        outcomes.iter().all(|o| o.as_ref().ok() == Some(&completed)),
        "{outcomes:?}"
    );

    // Restarted for memory, gracefully (exit 0 after Shutdown).
    let log = conductor.events();
    let restarts: Vec<&Value> = log
        .iter()
        .filter(|e| e["message"] == "instance restarting: memory above its ceiling")
        .collect();
    assert!(restarts.len() >= 2, "{} memory restarts", restarts.len());
    let exits: Vec<&Value> = log
        .iter()
        .filter(|e| e["message"] == "instance exited" && e["span"]["plugin"] == "grower")
        .collect();
    assert!(!exits.is_empty());
    assert!(
        exits.iter().all(|e| e["reason"] == "exit code 0"),
        "not all graceful: {exits:?}"
    );
    let scrape = conductor.scrape();
    assert!(
        demi_e2e::series(&scrape, "demi_restarts_total", &[("reason", "memory")])
            .is_some_and(|n| n >= 2.0),
        "no memory restarts counted"
    );
    let status = demi_e2e::json(conductor.cli(&["status", "grower", "--json"]));
    let reasons: Vec<&Value> = status[0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["last_restart"])
        .collect();
    assert!(reasons.iter().any(|r| *r == "memory"), "{status}");

    // Never both down: from each "stopping instance" to the next
    // "instance serving" of the same index, the other one served.
    let mut down: [Option<usize>; 2] = [None, None];
    for (at, e) in log.iter().enumerate() {
        if e["span"]["plugin"] != "grower" {
            continue;
        }
        let Some(index) = e["span"]["instance"].as_u64().map(|i| i as usize) else {
            continue;
        };
        if e["message"] == "stopping instance" {
            down[index] = Some(at);
            assert!(down[1 - index].is_none(), "both replicas down at line {at}");
        } else if e["message"] == "instance serving" {
            down[index] = None;
        }
    }
}
