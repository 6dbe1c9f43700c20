//! What the Discord bot costs: messages from injection at the fake
//! gateway to the reply at the fake REST API, through 2 bot replicas
//! (4 shards), the conductor and a 4-replica echo pool, beside the same
//! pool fed by direct `SubmitAndWait` calls, in one run. Also the bots'
//! RSS per shard with 1,000 guilds a shard. Run with
//! `scripts/bench/discord`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use demi_e2e::fake_discord::{FakeDiscord, Settings};
use demi_e2e::{Conductor, bin, rss_kib};

const SHARDS: u32 = 4;
const BOTS: u32 = 2;
const WORKERS: u32 = 4;
const GUILDS_PER_SHARD: u32 = 1000;
const TOKEN: &str = "bench-token";
const CONCURRENCY: usize = 64;

struct Run {
    messages: usize,
    seconds: f64,
    latencies: Vec<Duration>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds
    }

    fn percentile(&self, p: f64) -> Duration {
        demi_e2e::bench::percentile(&self.latencies, p)
    }
}

fn plugins(fake: &FakeDiscord, dir: &std::path::Path) -> String {
    let settings = dir.join("bot.toml");
    std::fs::write(
        &settings,
        format!(
            "total_shards = {SHARDS}\nreply_pool = \"brain\"\napi_base = \"{}\"\n",
            fake.api_base()
        ),
    )
    .expect("bot settings");
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).expect("token");
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    // The fake enforces no global limit: a high one measures the bot, not
    // Discord's 50/s.
    format!(
        "[plugins.discord]\ncommand = \"{}\"\nargs = [\"--config\", \"{}\"]\njobs = false\n\
         sharded = true\nshare_handoff = \"overlap\"\nreplicas = {BOTS}\nsubmits_to = [\"brain\"]\n\
         startup_timeout = \"60s\"\n\
         [plugins.discord.credentials]\ndiscord_token = \"{}\"\n\
         [plugins.discord.shared_limits]\nidentify = {{ every = \"5500ms\", buckets = {SHARDS} }}\n\
         rest = {{ rate = 100000, per = \"1s\" }}\n\
         [plugins.brain]\ncommand = \"{{echo}}\"\nreplicas = {WORKERS}\n\
         [plugins.brain.dispatch]\nqueue_capacity = 100000\nmax_in_flight = 1024\n\
         max_in_flight_per_replica = 256\n",
        bin("demi-plugin-discord").display(),
        settings.display(),
        token.display(),
    )
}

/// Injects `n` messages over the shards, one every `gap` (as fast as the
/// fake takes them for zero), and waits for every reply.
fn through_the_bot(fake: &FakeDiscord, n: usize, gap: Duration) -> Run {
    let mut injected = HashMap::with_capacity(n);
    let guilds: Vec<u64> = (0..SHARDS).map(|s| fake.guild_on(s, SHARDS)).collect();
    let before = fake.posts().len();
    let started = Instant::now();
    for i in 0..n {
        let shard = i as u32 % SHARDS;
        let channel = fake.id();
        let at = Instant::now();
        let id = fake
            .inject_message(shard, Some(guilds[shard as usize]), channel, "bench", true)
            .expect("a live session");
        injected.insert(id, at);
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if fake.posts().len() - before >= n {
            break;
        }
        assert!(Instant::now() < deadline, "replies missing");
        std::thread::sleep(Duration::from_millis(5));
    }
    let posts = fake.posts();
    let mut latencies: Vec<Duration> = posts[before..]
        .iter()
        .filter(|p| !p.repeat)
        .filter_map(|p| Some(p.at - *injected.get(&p.reply_to?)?))
        .collect();
    let last = posts[before..]
        .iter()
        .map(|p| p.at)
        .max()
        .unwrap_or(started);
    latencies.sort();
    Run {
        messages: latencies.len(),
        seconds: (last - started).as_secs_f64(),
        latencies,
    }
}

/// `n` SubmitAndWait calls to the pool, `CONCURRENCY` at a time, or one
/// every `gap`.
async fn direct(conductor: &Conductor, n: usize, gap: Duration) -> Run {
    let payload = br#"{"content":"bench"}"#;
    let (latencies, seconds) =
        demi_e2e::bench::submit_and_wait(conductor, "brain", payload, n, CONCURRENCY, gap).await;
    Run {
        messages: latencies.len(),
        seconds,
        latencies,
    }
}

/// The bot replicas' RSS, in KiB.
fn bot_rss(conductor: &Conductor) -> Vec<u64> {
    conductor
        .pids_of("discord")
        .iter()
        .map(|p| rss_kib(*p as u32))
        .collect()
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    let fake = FakeDiscord::start(Settings {
        token: TOKEN.into(),
        shards: SHARDS,
        max_concurrency: SHARDS,
        guilds_per_shard: GUILDS_PER_SHARD,
        ..Settings::default()
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let conductor = Conductor::builder()
        .log("warn,demi_conductor=info")
        .start(&plugins(&fake, dir.path()));
    for index in 0..BOTS {
        conductor.wait_serving(0, "discord", index);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let rss_idle = bot_rss(&conductor);
    // Warm both paths, then measure: all at once for throughput, then at
    // Discord's 50 a second for latency.
    let (burst, paced) = (Duration::ZERO, Duration::from_millis(20));
    through_the_bot(&fake, 200, burst);
    runtime.block_on(direct(&conductor, 200, burst));
    let bot = through_the_bot(&fake, n, burst);
    let pool = runtime.block_on(direct(&conductor, n, burst));
    let bot_paced = through_the_bot(&fake, 500, paced);
    let pool_paced = runtime.block_on(direct(&conductor, 500, paced));
    let rss = bot_rss(&conductor);
    let per_shard = |rss: &[u64]| rss.iter().sum::<u64>() as f64 / f64::from(SHARDS) / 1024.0;
    let (rss_per_shard, idle_per_shard) = (per_shard(&rss), per_shard(&rss_idle));

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "discord benchmark: {BOTS} bot replicas x {} shards, {WORKERS} echo workers, {n} messages",
        SHARDS / BOTS
    );
    println!(
        "{:<34} {:>10} {:>8} {:>8}   at 50/s: {:>6} {:>6}",
        "", "msgs/s", "p50 ms", "p99 ms", "p50", "p99"
    );
    for (name, run, paced) in [
        ("gateway -> bot -> pool -> REST", &bot, &bot_paced),
        ("SubmitAndWait -> pool", &pool, &pool_paced),
    ] {
        println!(
            "{name:<34} {:>10.0} {:>8.2} {:>8.2}   {:>14.2} {:>6.2}",
            run.rate(),
            ms(run.percentile(0.5)),
            ms(run.percentile(0.99)),
            ms(paced.percentile(0.5)),
            ms(paced.percentile(0.99))
        );
    }
    let ratio = bot.rate() / pool.rate();
    println!("bot / direct throughput: {:.0} %", ratio * 100.0);
    let mib = |rss: &[u64]| rss.iter().map(|k| k / 1024).collect::<Vec<_>>();
    println!(
        "bot RSS ({GUILDS_PER_SHARD} guilds a shard, nothing cached): READY and idle {:?} MiB per replica, \
         {idle_per_shard:.1} MiB per shard; after the run {:?}, {rss_per_shard:.1} MiB per shard",
        mib(&rss_idle),
        mib(&rss)
    );
    let result = serde_json::json!({
        "shards": SHARDS, "bots": BOTS, "workers": WORKERS, "messages": n,
        "bot": {"msgs_per_s": bot.rate(), "p50_ms": ms(bot.percentile(0.5)), "p99_ms": ms(bot.percentile(0.99)),
                "paced_p50_ms": ms(bot_paced.percentile(0.5)), "paced_p99_ms": ms(bot_paced.percentile(0.99))},
        "direct": {"msgs_per_s": pool.rate(), "p50_ms": ms(pool.percentile(0.5)), "p99_ms": ms(pool.percentile(0.99)),
                   "paced_p50_ms": ms(pool_paced.percentile(0.5)), "paced_p99_ms": ms(pool_paced.percentile(0.99))},
        "ratio": ratio,
        "rss_kib_per_replica": rss,
        "rss_mib_per_shard": rss_per_shard,
        "idle_rss_kib_per_replica": rss_idle,
        "idle_rss_mib_per_shard": idle_per_shard,
    });
    demi_e2e::bench::write_results("discord", &result);
}
