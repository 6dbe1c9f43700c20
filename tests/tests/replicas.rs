//! Replicas of one plugin: each knows its place in the pool as the pool
//! changes, and they share limits the conductor serves.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use demi_e2e::{Conductor, bin, eventually, ok};

/// `member`/`stop`/`grant` lines of the probe plugin's journal.
fn journal(path: &Path) -> Vec<Vec<u128>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            let mut words = line.split_whitespace();
            let kind = match words.next() {
                Some("member") => 0,
                Some("stop") => 1,
                Some("grant") => 2,
                other => panic!("bad journal line {other:?}"),
            };
            std::iter::once(kind)
                .chain(words.map(|w| w.parse().expect("number")))
                .collect()
        })
        .collect()
}

/// The `grant` lines: [2, pid, index, bucket, granted µs, received µs].
fn grants(path: &Path) -> Vec<Vec<u128>> {
    journal(path).into_iter().filter(|l| l[0] == 2).collect()
}

/// A shard of `total` split over `replicas` as the SDK's `share` does.
fn share(index: u128, replicas: u128, total: u128) -> std::ops::Range<u128> {
    let (base, extra) = (total / replicas, total % replicas);
    let start = (index * base + index.min(extra)).min(total);
    start..(start + base + u128::from(index < extra)).min(total)
}

#[test]
fn a_scaled_sharded_pool_tells_every_instance_and_no_share_is_held_twice() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("members.txt");
    let conductor = Conductor::start(&format!(
        "[plugins.bot]\ncommand = \"{}\"\nargs = [\"--journal\", \"{}\", \"--handover-ms\", \"300\"]\n\
         replicas = 2\n\
         sharded = true\njobs = false\nshutdown_grace = \"2s\"\n\
         [plugins.plain]\ncommand = \"{{echo}}\"\nreplicas = 2\nsharded = true\n\
         shutdown_grace = \"1s\"\n",
        bin("probe_plugin").display(),
        log.display()
    ));
    conductor.wait_serving(0, "bot", 1);
    conductor.wait_serving(0, "plain", 1);
    let plain_before = conductor.pids_of("plain");

    ok(conductor.cli(&["scale", "bot", "3"]));
    conductor.wait_serving(0, "bot", 2);
    ok(conductor.cli(&["scale", "bot", "1"]));
    // A plugin without MembershipChanged is restarted with the new count.
    ok(conductor.cli(&["scale", "plain", "3"]));

    // Membership as each pid acted on it, over time: (ms, pid, shares).
    let lines = journal(&log);
    let mut latest: BTreeMap<u128, (u128, u128, u128)> = BTreeMap::new();
    let mut segments = Vec::new(); // (pid, from, to, index, replicas)
    for line in &lines {
        match line[0] {
            0 => {
                let (pid, index, replicas, at) = (line[1], line[2], line[3], line[5]);
                if let Some((i, r, from)) = latest.insert(pid, (index, replicas, at)) {
                    segments.push((pid, from, at, i, r));
                }
            }
            1 => {
                let (pid, at) = (line[1], line[3]);
                if let Some((i, r, from)) = latest.remove(&pid) {
                    segments.push((pid, from, at, i, r));
                }
            }
            _ => {}
        }
    }
    for (pid, (i, r, from)) in &latest {
        segments.push((*pid, *from, u128::MAX, *i, *r));
    }
    // Every instance learnt each count it ran under.
    let told: Vec<(u128, u128)> = segments.iter().map(|s| (s.3, s.4)).collect();
    for expected in [(0, 2), (1, 2), (0, 3), (1, 3), (2, 3), (0, 1)] {
        assert!(
            told.contains(&expected),
            "{expected:?} missing from {lines:?}"
        );
    }
    assert_eq!(latest.len(), 1, "one instance left: {lines:?}");
    assert_eq!(latest.values().next().map(|v| (v.0, v.1)), Some((0, 1)));
    // No shard of 12, nor any index, is held by two processes at once.
    for a in &segments {
        for b in &segments {
            if a.0 == b.0 || a.2 <= b.1 || b.2 <= a.1 {
                continue;
            }
            assert_ne!(a.3, b.3, "index held twice: {a:?} {b:?}");
            let (sa, sb) = (share(a.3, a.4, 12), share(b.3, b.4, 12));
            assert!(
                sa.end <= sb.start || sb.end <= sa.start,
                "shards {sa:?} and {sb:?} held at once: {a:?} {b:?}"
            );
        }
    }

    // The plain plugin was rolled: new processes, each started with 3.
    conductor.wait_serving(0, "plain", 2);
    let plain_after = conductor.pids_of("plain");
    assert_eq!(plain_after.len(), 3);
    for pid in &plain_after {
        assert!(!plain_before.contains(pid), "not restarted: {pid}");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let environ = String::from_utf8_lossy(&environ);
        assert!(environ.contains("DEMI_PLUGIN_REPLICAS=3"), "{pid}");
    }
}

#[test]
fn replicas_share_limits_fairly_and_a_killed_waiter_takes_no_turn() {
    let dir = tempfile::tempdir().unwrap();
    let (rest, identify) = (dir.path().join("rest.txt"), dir.path().join("identify.txt"));
    let conductor = Conductor::start(&format!(
        "[plugins.rest]\ncommand = \"{probe}\"\nargs = [\"--journal\", \"{}\", \"--acquire\", \
         \"rest\", \"--buckets\", \"1\"]\nreplicas = 4\njobs = false\nshutdown_grace = \"1s\"\n\
         [plugins.rest.shared_limits]\nrest = {{ rate = 50, per = \"1s\" }}\n\
         [plugins.identify]\ncommand = \"{probe}\"\nargs = [\"--journal\", \"{}\", \"--acquire\", \
         \"identify\", \"--buckets\", \"2\"]\nreplicas = 3\njobs = false\nshutdown_grace = \"1s\"\n\
         [plugins.identify.shared_limits]\nidentify = {{ every = \"5s\", buckets = 2 }}\n",
        rest.display(),
        identify.display(),
        probe = bin("probe_plugin").display(),
    ));
    for index in 0..4 {
        conductor.wait_serving(0, "rest", index);
    }
    for index in 0..3 {
        conductor.wait_serving(0, "identify", index);
    }
    // Every rest replica is asking by now; take ten seconds from here.
    eventually("every replica has a grant", || {
        let pids: std::collections::BTreeSet<u128> = grants(&rest).iter().map(|l| l[1]).collect();
        pids.len() == 4
    });
    let start = grants(&rest).iter().map(|l| l[4]).max().unwrap();
    std::thread::sleep(Duration::from_secs(6));
    // Kill an identify replica: it is waiting (its bucket is taken for 5 s).
    let victim = conductor.pids_of("identify")[0];
    demi_e2e::signal_pid(victim as u32, nix::sys::signal::Signal::SIGKILL);
    // A limit's first turn comes one spacing after the conductor made it,
    // so each bucket's second grant is due 10 s in: wait past it.
    std::thread::sleep(Duration::from_secs(7));

    let window: Vec<Vec<u128>> = grants(&rest)
        .into_iter()
        .filter(|l| l[4] > start && l[4] <= start + 10_000_000)
        .collect();
    assert!(
        (490..=510).contains(&window.len()),
        "{} grants in 10 s at 50/s",
        window.len()
    );
    let mut per_replica: BTreeMap<u128, usize> = BTreeMap::new();
    for line in &window {
        *per_replica.entry(line[1]).or_default() += 1;
    }
    let fair = window.len() as f64 / 4.0;
    for (pid, n) in &per_replica {
        assert!(
            (*n as f64 - fair).abs() <= fair * 0.1,
            "replica {pid} got {n} of {}: {per_replica:?}",
            window.len()
        );
    }

    let turns = grants(&identify);
    for bucket in 0..2 {
        let mut granted: Vec<(u128, u128)> = turns
            .iter()
            .filter(|l| l[3] == bucket)
            .map(|l| (l[4], l[5]))
            .collect();
        granted.sort();
        assert!(granted.len() >= 2, "bucket {bucket}: {turns:?}");
        for pair in granted.windows(2) {
            assert!(
                pair[1].0 - pair[0].0 >= 5_000_000,
                "bucket {bucket} granted twice within 5 s: {pair:?} in {turns:?}"
            );
            assert!(pair[1].1 - pair[0].1 >= 4_900_000, "received: {pair:?}");
        }
    }
}
