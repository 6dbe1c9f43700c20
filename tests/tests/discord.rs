//! The Discord plugin through the real conductor, against a fake Discord
//! on loopback and a real worker pool.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use demi_e2e::fake_discord::{FakeDiscord, IDENTIFY_SPACING, Settings};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use demi_e2e::{Conductor, alive, bin, signal_pid};
use nix::sys::signal::Signal;
use serde_json::Value;

/// Unlike anything else in a log, so a leak cannot hide.
const TOKEN: &str = "MTAx.secret-bot-token.q9Zx";

struct Bot {
    replicas: u32,
    total: u32,
    max_concurrency: u32,
    linger: &'static str,
    message_content: bool,
    token: &'static str,
    workers: u32,
    /// Extra lines for the workers' table (`args = …`).
    worker_args: &'static str,
}

impl Default for Bot {
    fn default() -> Self {
        Self {
            replicas: 2,
            total: 4,
            max_concurrency: 4,
            linger: "10s",
            message_content: false,
            token: TOKEN,
            workers: 2,
            worker_args: "",
        }
    }
}

impl Bot {
    /// The conductor's plugins for this bot in front of an echo pool;
    /// the bot's settings and token go to `dir`.
    fn plugins(&self, fake: &FakeDiscord, dir: &Path) -> String {
        let settings = dir.join("bot.toml");
        std::fs::write(
            &settings,
            format!(
                "total_shards = {}\nreply_pool = \"brain\"\napi_base = \"{}\"\n\
                 message_content = {}\nhandoff_linger = \"{}\"\nreconnect_grace = \"10s\"\n",
                self.total,
                fake.api_base(),
                self.message_content,
                self.linger
            ),
        )
        .unwrap();
        let token = dir.join("token");
        std::fs::write(&token, format!("{}\n", self.token)).unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        format!(
            "[plugins.discord]\ncommand = \"{}\"\nargs = [\"--config\", \"{}\"]\n\
             jobs = false\nsharded = true\nshare_handoff = \"overlap\"\nreplicas = {}\nsubmits_to = [\"brain\"]\n\
             startup_timeout = \"60s\"\nshutdown_grace = \"5s\"\n\
             [plugins.discord.credentials]\ndiscord_token = \"{}\"\n\
             [plugins.discord.shared_limits]\n\
             identify = {{ every = \"5500ms\", buckets = {} }}\n\
             rest = {{ rate = 45, per = \"1s\" }}\n\
             [plugins.discord.restart]\ninitial_delay = \"100ms\"\n\
             [plugins.brain]\ncommand = \"{{echo}}\"\nreplicas = {}\nshutdown_grace = \"1s\"\n{}\n",
            bin("demi-plugin-discord").display(),
            settings.display(),
            self.replicas,
            token.display(),
            self.max_concurrency,
            self.workers,
            self.worker_args,
        )
    }
}

fn fake(bot: &Bot, change: impl FnOnce(&mut Settings)) -> FakeDiscord {
    let mut settings = Settings {
        token: TOKEN.into(),
        shards: bot.total,
        max_concurrency: bot.max_concurrency,
        ..Settings::default()
    };
    change(&mut settings);
    FakeDiscord::start(settings)
}

/// Waits until every shard of `total` has exactly `sessions` live
/// sessions.
fn wait_live(fake: &FakeDiscord, total: u32, sessions: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let live = fake.live_shards();
        if (0..total).all(|s| live.get(&s) == Some(&sessions)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "shards never reached {sessions} live session(s) each: {live:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn shards_split_over_replicas_identify_once_each_paced_per_bucket_across_replicas() {
    let bot = Bot {
        max_concurrency: 1,
        ..Bot::default()
    };
    let fake = fake(&bot, |_| {});
    let dir = tempfile::tempdir().unwrap();
    let conductor = Conductor::start(&bot.plugins(&fake, dir.path()));
    conductor.wait_serving(0, "discord", 0);
    conductor.wait_serving(0, "discord", 1);
    // SERVING only once READY: by now every shard has its session.
    wait_live(&fake, 4, 1, Duration::from_secs(1));

    let identifies = fake.identifies();
    let shards: Vec<u32> = identifies.iter().map(|i| i.shard).collect();
    let unique: BTreeSet<u32> = shards.iter().copied().collect();
    assert_eq!(unique, (0..4).collect(), "{shards:?}");
    assert_eq!(
        shards.len(),
        4,
        "each shard identified exactly once: {shards:?}"
    );
    assert!(identifies.iter().all(|i| !i.too_soon && i.total == 4));
    // One bucket (max_concurrency 1): every IDENTIFY of the bot, whichever
    // replica sent it, 5 s after the one before.
    let mut at: Vec<Instant> = identifies.iter().map(|i| i.at).collect();
    at.sort();
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter()
            .all(|g| *g >= IDENTIFY_SPACING - Duration::from_millis(5)),
        "{gaps:?}"
    );
    // Each replica ran the share its index gives: 0 has 0-1, 1 has 2-3.
    let events = conductor.events();
    for (index, first, end) in [(0, 0, 2), (1, 2, 4)] {
        let share = events
            .iter()
            .find(|e| e["message"] == "shard share" && e["instance"] == index);
        let fields: Value = share
            .and_then(|e| e["fields"].as_str())
            .map(|f| serde_json::from_str(f).unwrap())
            .unwrap_or_else(|| panic!("no share logged by replica {index}"));
        assert_eq!(
            (fields["first"].as_u64(), fields["end"].as_u64()),
            (Some(first), Some(end))
        );
    }
}

#[test]
fn scaling_the_bot_hands_shards_over_without_a_gap() {
    let bot = Bot::default();
    let fake = fake(&bot, |_| {});
    let dir = tempfile::tempdir().unwrap();
    let conductor = Conductor::start(&bot.plugins(&fake, dir.path()));
    wait_live(&fake, 4, 1, Duration::from_secs(60));
    let from = Instant::now();

    for replicas in ["4", "1"] {
        demi_e2e::ok(conductor.cli(&["scale", "discord", replicas]));
        // At rest: one session per shard, once the linger is over.
        std::thread::sleep(Duration::from_secs(2));
        wait_live(&fake, 4, 1, Duration::from_secs(60));
    }
    for shard in 0..4 {
        let gap = fake.uncovered(shard, from);
        assert_eq!(gap, Duration::ZERO, "shard {shard} uncovered for {gap:?}");
    }
    let identifies = fake.identifies();
    assert!(identifies.iter().all(|i| !i.too_soon), "{identifies:?}");
    let pids = conductor.pids_of("discord");
    assert_eq!(pids.len(), 1, "{pids:?}");
}

/// Injects `n` messages spread over every shard and direct messages,
/// waiting for a live session where needed; returns the message ids with
/// their channels.
fn inject(fake: &FakeDiscord, total: u32, n: usize) -> BTreeMap<u64, u64> {
    let mut sent = BTreeMap::new();
    for i in 0..n {
        let shard = (i as u32) % (total + 1);
        let (guild, shard) = if shard == total {
            (None, 0)
        } else {
            (Some(fake.guild_on(shard, total)), shard)
        };
        let channel = fake.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        let id = loop {
            if let Some(id) = fake.inject_message(shard, guild, channel, &format!("hi {i}"), true) {
                break id;
            }
            assert!(Instant::now() < deadline, "shard {shard} never live");
            std::thread::sleep(Duration::from_millis(20));
        };
        sent.insert(id, channel);
        if i % 50 == 49 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    sent
}

/// Waits until every message has a reply and checks each is the worker's
/// answer to it, shown once.
fn check_replies(fake: &FakeDiscord, sent: &BTreeMap<u64, u64>, within: Duration) {
    let deadline = Instant::now() + within;
    let shown = loop {
        let shown: Vec<_> = fake
            .posts()
            .into_iter()
            .filter(|p| !p.repeat && p.reply_to.is_some_and(|m| sent.contains_key(&m)))
            .collect();
        if shown.len() >= sent.len() || Instant::now() > deadline {
            break shown;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut answered = BTreeMap::new();
    for post in &shown {
        let to = post.reply_to.expect("a reply references its message");
        *answered.entry(to).or_insert(0) += 1;
        assert_eq!(
            sent.get(&to),
            Some(&post.channel),
            "reply in the message's channel"
        );
        // The echo worker answers with the job's payload: the message.
        let payload: Value = serde_json::from_str(&post.content).unwrap();
        assert_eq!(payload["message_id"], to, "{payload}");
        assert!(
            payload["traceparent"]
                .as_str()
                .is_some_and(|t| t.len() == 55)
        );
    }
    let missing: Vec<_> = sent
        .keys()
        .filter(|id| !answered.contains_key(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} unanswered",
        missing.len(),
        sent.len()
    );
    let doubled: Vec<_> = answered.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "shown twice: {doubled:?}");
    assert_eq!(shown.len(), sent.len());
}

#[test]
fn every_message_gets_one_reply_with_the_workers_answer_while_workers_die() {
    let bot = Bot {
        workers: 3,
        ..Bot::default()
    };
    let fake = fake(&bot, |_| {});
    let dir = tempfile::tempdir().unwrap();
    let conductor = Conductor::start(&bot.plugins(&fake, dir.path()));
    wait_live(&fake, 4, 1, Duration::from_secs(60));

    let sent = inject(&fake, 4, 1000);
    check_replies(&fake, &sent, Duration::from_secs(120));
    let first_raw = fake.posts().len();

    // Again with a worker SIGKILLed every 200 ms.
    let done = AtomicBool::new(false);
    let kills = AtomicUsize::new(0);
    let sent = std::thread::scope(|s| {
        s.spawn(|| {
            // Workers from the log, not `conductor status`: a CLI call per
            // kill would stretch the 200 ms.
            let (mut cursor, mut pids) = (0, Vec::new());
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                let events = conductor.events_since(cursor);
                cursor += events.len();
                pids.extend(
                    events
                        .iter()
                        .filter(|e| {
                            e["message"] == "instance spawned" && e["span"]["plugin"] == "brain"
                        })
                        .filter_map(|e| e["pid"].as_u64())
                        .map(|p| p as u32),
                );
                pids.retain(|p| alive(*p));
                if !pids.is_empty() {
                    signal_pid(pids[fastrand::usize(..pids.len())], Signal::SIGKILL);
                    kills.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let sent = inject(&fake, 4, 1000);
        check_replies(&fake, &sent, Duration::from_secs(180));
        done.store(true, Ordering::Relaxed);
        sent
    });
    let raw = fake.posts().len() - first_raw;
    let posts = fake.posts();
    let span = posts.last().unwrap().at - posts[first_raw].at;
    eprintln!(
        "second phase posts over {span:?}; busiest second: {}",
        busiest_second(&fake)
    );
    eprintln!(
        "1000 + {} messages, {} worker kills: {} + {} posts (raw, repeats included)",
        sent.len(),
        kills.load(Ordering::Relaxed),
        first_raw,
        raw
    );
    assert!(kills.load(Ordering::Relaxed) >= 5);
    let bots: Vec<u32> = conductor
        .pids_of("discord")
        .iter()
        .map(|p| *p as u32)
        .collect();
    assert_token_hidden(&conductor, TOKEN, &bots);
    let dead = demi_e2e::ok(conductor.cli(&["dlq", "list"]));
    assert!(
        dead.trim().is_empty() || !dead.contains("brain"),
        "dead-lettered: {dead}"
    );
}

/// The most message posts the fake received within one second.
fn busiest_second(fake: &FakeDiscord) -> usize {
    let at: Vec<Instant> = fake
        .requests()
        .into_iter()
        .filter(|(_, what)| what.starts_with("POST"))
        .map(|(at, _)| at)
        .collect();
    let mut most = 0;
    let mut start = 0;
    for end in 0..at.len() {
        while at[end] - at[start] >= Duration::from_secs(1) {
            start += 1;
        }
        most = most.max(end - start + 1);
    }
    most
}

/// Where the token must never show: the conductor's log (plugin output
/// included), the processes' environment and command lines, API answers.
fn assert_token_hidden(conductor: &Conductor, token: &str, pids: &[u32]) {
    let log: String = conductor.events().iter().map(Value::to_string).collect();
    assert!(!log.contains(token), "the token is in the log");
    for pid in pids {
        for file in ["environ", "cmdline"] {
            let text = std::fs::read(format!("/proc/{pid}/{file}")).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&text).contains(token),
                "the token is in /proc/{pid}/{file}"
            );
        }
    }
    let status = demi_e2e::ok(conductor.cli(&["status", "--json"]));
    assert!(!status.contains(token), "the token is in an API answer");
}

#[test]
fn a_rejected_token_intent_or_shard_count_fails_the_bot_with_the_reason_never_restarting_it() {
    // (bot, whether MESSAGE_CONTENT is granted, the shard count Discord
    // holds the bot to, the reason shown).
    let cases = [
        (
            Bot {
                replicas: 1,
                token: "MTAx.not-the-token.kq3",
                ..Bot::default()
            },
            true,
            4,
            "rejected the bot token",
        ),
        (
            Bot {
                replicas: 1,
                message_content: true,
                ..Bot::default()
            },
            false,
            4,
            "close code 4014",
        ),
        (
            Bot {
                replicas: 1,
                ..Bot::default()
            },
            true,
            8,
            "close code 4010",
        ),
    ];
    for (bot, granted, shards, reason) in cases {
        let fake = fake(&bot, |s| {
            s.message_content_granted = granted;
            s.shards = shards;
        });
        let dir = tempfile::tempdir().unwrap();
        let conductor = Conductor::start(&bot.plugins(&fake, dir.path()));
        let (_, failed) = conductor.wait_event(0, "discord", "instance failed");
        let said = failed["reason"].as_str().unwrap();
        eprintln!("Failed: {said}");
        assert!(said.contains("code 78") && said.contains(reason), "{said}");
        let status = demi_e2e::json(conductor.cli(&["status", "discord", "--json"]));
        assert_eq!(status[0]["instances"][0]["state"], "failed", "{status}");
        // Failed for good: no restart comes.
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(conductor.count("discord", "instance spawned"), 1);
        assert_token_hidden(&conductor, bot.token, &[]);
    }
}

#[test]
fn a_429_storm_delays_replies_but_drops_none_and_keeps_the_bot_under_50_requests_a_second() {
    let bot = Bot::default();
    let fake = fake(&bot, |s| {
        s.post_429 = 0.3;
        s.post_429_global = 0.05;
    });
    let dir = tempfile::tempdir().unwrap();
    let _conductor = Conductor::start(&bot.plugins(&fake, dir.path()));
    wait_live(&fake, 4, 1, Duration::from_secs(60));

    let sent = inject(&fake, 4, 500);
    check_replies(&fake, &sent, Duration::from_secs(120));
    let posts = fake
        .requests()
        .iter()
        .filter(|(_, what)| what.starts_with("POST"))
        .count();
    let busiest = busiest_second(&fake);
    eprintln!(
        "500 messages: {posts} posts made, {} answered 429; busiest second {busiest} requests",
        posts - fake.posts().len()
    );
    assert!(
        posts > 600,
        "the storm was real: {posts} posts for 500 replies"
    );
    assert!(busiest <= 50, "{busiest} requests within one second");
}

#[test]
fn the_example_bot_checks_out() {
    let examples = demi_e2e::repo_root().join("examples");
    let out = std::process::Command::new(bin("demi-plugin-discord"))
        .arg("--config")
        .arg(examples.join("discord-bot.toml"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = tempfile::tempdir().unwrap();
    let bad_settings = bad.path().join("bot.toml");
    std::fs::write(
        &bad_settings,
        "total_shards = \"lots\"\nreply_pool = \"brain\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin("demi-plugin-discord"))
        .arg("--config")
        .arg(&bad_settings)
        .arg("--check")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{said}");
    assert!(said.contains("bot.toml: line 1, column 16"), "{said}");

    // The conductor's side, with a token beside it and the binaries where
    // this build put them.
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(examples.join("discord.toml"))
        .unwrap()
        .replace(
            "../target/debug/",
            &format!("{}/", demi_e2e::bin_dir().display()),
        );
    std::fs::write(dir.path().join("discord.toml"), config).unwrap();
    std::fs::copy(
        examples.join("discord-bot.toml"),
        dir.path().join("discord-bot.toml"),
    )
    .unwrap();
    let token = dir.path().join("discord.token");
    std::fs::write(&token, "token\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = std::process::Command::new(bin("conductor"))
        .arg("check-config")
        .arg(dir.path().join("discord.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok (2 plugins, 4 instances)"), "{stdout}");
}

#[test]
fn replies_owed_by_a_killed_bot_replica_or_conductor_are_posted_once() {
    // Slow workers: replies are still owed when the kills come.
    let bot = Bot {
        worker_args: "args = [\"--delay\", \"400ms\"]",
        ..Bot::default()
    };
    let fake = fake(&bot, |_| {});
    let dir = tempfile::tempdir().unwrap();
    let mut conductor = Conductor::start(&bot.plugins(&fake, dir.path()));
    wait_live(&fake, 4, 1, Duration::from_secs(60));

    // A bot replica SIGKILLed with replies owed: its successor (same
    // index, same shards) resumes the sessions it left, gets what Discord
    // sent meanwhile replayed, and posts every reply.
    let identified = fake.identifies().len();
    let resumed = fake.resumes().len();
    let mut sent = inject(&fake, 4, 150);
    std::thread::sleep(Duration::from_millis(500));
    let (_, replica) = conductor.wait_serving(0, "discord", 1);
    let killed = Instant::now();
    signal_pid(replica, Signal::SIGKILL);
    // Sent while shards 2 and 3 have no connection: kept for a RESUME.
    sent.extend(inject(&fake, 4, 100));
    std::thread::sleep(Duration::from_millis(200));
    wait_live(&fake, 4, 1, Duration::from_secs(60));
    let gaps: Vec<String> = (0..4)
        .map(|s| format!("shard {s}: {:?}", fake.uncovered(s, killed)))
        .collect();
    let resumes = fake.resumes()[resumed..].to_vec();
    eprintln!(
        "bot replica SIGKILL: without a session for {}; resumed {resumes:?}",
        gaps.join(", ")
    );
    assert_eq!(
        fake.uncovered(0, killed),
        Duration::ZERO,
        "replica 0's shards untouched"
    );
    assert_eq!(
        fake.identifies().len(),
        identified,
        "the successor resumes; it never identifies"
    );
    assert_eq!(resumes.len(), 2, "{resumes:?}");
    assert!(resumes.iter().all(|r| r.replayed > 0), "{resumes:?}");
    check_replies(&fake, &sent, Duration::from_secs(60));

    // The whole conductor SIGKILLed (its plugins die with it) mid-run,
    // with 1,000 messages handed over and replies flowing: the next
    // conductor's bots post what is owed.
    let sent = inject(&fake, 4, 1000);
    let replied = || {
        fake.posts()
            .iter()
            .filter(|p| p.reply_to.is_some_and(|m| sent.contains_key(&m)))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while replied() < 200 {
        assert!(Instant::now() < deadline, "replies never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let resumed = fake.resumes().len();
    conductor.signal(Signal::SIGKILL);
    conductor.wait_exit();
    let owed_at_kill = sent.len() - replied();
    let conductor = conductor.restart();
    wait_live(&fake, 4, 1, Duration::from_secs(60));
    check_replies(&fake, &sent, Duration::from_secs(120));
    assert_eq!(
        fake.identifies().len(),
        identified,
        "every shard resumed after the conductor's restart"
    );
    assert_eq!(fake.resumes().len() - resumed, 4);
    let raw = fake
        .posts()
        .iter()
        .filter(|p| p.reply_to.is_some_and(|m| sent.contains_key(&m)))
        .count();
    eprintln!(
        "conductor SIGKILL with {owed_at_kill} of 1000 replies owed: all posted once \
         ({raw} posts, repeats included)"
    );
    assert!(owed_at_kill > 0, "the kill came too late to prove anything");
    drop(conductor);
}

/// Injects `n` messages over every shard (not DMs), one every `gap`.
fn inject_paced(fake: &FakeDiscord, total: u32, n: usize, gap: Duration) -> Vec<(u32, u64, u64)> {
    let mut sent = Vec::new();
    for i in 0..n {
        let shard = i as u32 % total;
        let channel = fake.id();
        let guild = fake.guild_on(shard, total);
        let deadline = Instant::now() + Duration::from_secs(30);
        let id = loop {
            if let Some(id) = fake.inject_message(shard, Some(guild), channel, "hi", true) {
                break id;
            }
            assert!(
                Instant::now() < deadline,
                "shard {shard} never had a session"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        sent.push((shard, id, channel));
        std::thread::sleep(gap);
    }
    sent
}

#[test]
fn reconnects_resumes_and_invalid_sessions_lose_no_message() {
    let bot = Bot {
        replicas: 1,
        ..Bot::default()
    };
    let fake = fake(&bot, |s| s.heartbeat_interval_ms = 1000);
    let dir = tempfile::tempdir().unwrap();
    let _conductor = Conductor::start(&bot.plugins(&fake, dir.path()));
    wait_live(&fake, 4, 1, Duration::from_secs(60));
    // Past Discord's spacing, so op 9's new IDENTIFY need not wait.
    std::thread::sleep(IDENTIFY_SPACING + Duration::from_secs(1));
    let identified = fake.identifies().len();

    // Op 7 on shard 0, op 9 resumable on 1, op 9 not resumable on 2, a
    // dropped connection (close 4000) on 3, while messages flow: the
    // resumed sessions get what they missed replayed after their seq.
    let sent = std::thread::scope(|s| {
        s.spawn(|| {
            for (shard, step) in [
                (0, "op 7"),
                (1, "op 9 true"),
                (2, "op 9 false"),
                (3, "close"),
            ] {
                std::thread::sleep(Duration::from_millis(400));
                match step {
                    "op 7" => fake.send_op(shard, 7, Value::Null),
                    "op 9 true" => fake.send_op(shard, 9, Value::Bool(true)),
                    "op 9 false" => fake.send_op(shard, 9, Value::Bool(false)),
                    _ => fake.close(shard, 4000),
                }
            }
        });
        inject_paced(&fake, 4, 200, Duration::from_millis(12))
    });
    let by_id: BTreeMap<u64, u64> = sent.iter().map(|(_, id, ch)| (*id, *ch)).collect();
    check_replies(&fake, &by_id, Duration::from_secs(60));
    let resumes = fake.resumes();
    assert!(
        resumes.len() >= 3,
        "op 7, op 9 true and the close resume: {resumes:?}"
    );
    assert!(resumes.iter().all(|r| r.seq >= 1), "{resumes:?}");
    let again: Vec<u32> = fake.identifies()[identified..]
        .iter()
        .map(|i| i.shard)
        .collect();
    assert_eq!(
        again,
        vec![2],
        "only the invalidated session identifies again"
    );
    assert!(fake.identifies().iter().all(|i| !i.too_soon));

    // A heartbeat ACK that never comes: the connection is a zombie, so the
    // bot closes it keeping the session and resumes, and what Discord sent
    // in between is replayed (serenity's runner would identify a new
    // session and lose it).
    let identified = fake.identifies().len();
    let resumed = fake.resumes().len();
    fake.drop_acks(0, 1);
    let sent = inject_paced(&fake, 4, 240, Duration::from_millis(25));
    let by_id: BTreeMap<u64, u64> = sent.iter().map(|(_, id, ch)| (*id, *ch)).collect();
    check_replies(&fake, &by_id, Duration::from_secs(60));
    let resumes = fake.resumes()[resumed..].to_vec();
    eprintln!("missed heartbeat ACK on shard 0: resumed {resumes:?}");
    assert_eq!(resumes.len(), 1, "{resumes:?}");
    assert!(
        resumes[0].replayed > 0,
        "what the dead connection never delivered comes with the resume: {resumes:?}"
    );
    assert_eq!(
        fake.identifies().len(),
        identified,
        "a zombie connection resumes; it never identifies"
    );
}

#[test]
fn a_rolling_restart_leaves_no_shard_without_a_session_and_answers_every_message_once() {
    let bot = Bot::default();
    let fake = fake(&bot, |_| {});
    let dir = tempfile::tempdir().unwrap();
    let conductor = Conductor::start(&bot.plugins(&fake, dir.path()));
    wait_live(&fake, 4, 1, Duration::from_secs(60));
    let before = conductor.pids_of("discord");
    let from = Instant::now();

    // `conductor restart discord` with messages flowing at 50 a second.
    let (sent, restarted) = std::thread::scope(|s| {
        let restart = s.spawn(|| conductor.cli(&["restart", "discord"]));
        let mut sent = Vec::new();
        while !restart.is_finished() {
            sent.extend(inject_paced(&fake, 4, 4, Duration::from_millis(20)));
        }
        (sent, restart.join().unwrap())
    });
    demi_e2e::ok(restarted);
    let took = from.elapsed();
    for shard in 0..4 {
        let gap = fake.uncovered(shard, from);
        assert_eq!(
            gap,
            Duration::ZERO,
            "shard {shard} had no session for {gap:?}"
        );
    }
    let by_id: BTreeMap<u64, u64> = sent.iter().map(|(_, id, ch)| (*id, *ch)).collect();
    check_replies(&fake, &by_id, Duration::from_secs(60));
    let after = conductor.pids_of("discord");
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} -> {after:?}"
    );
    assert!(fake.identifies().iter().all(|i| !i.too_soon));
    eprintln!(
        "rolling restart of 2 replicas in {took:?}: {} messages, each answered once, no shard \
         without a session",
        by_id.len()
    );
}
