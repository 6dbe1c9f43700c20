//! `demi-plugin-discord`: one Discord bot whose shards are spread over the
//! replicas of this plugin. Every message the bot should answer becomes a
//! job for a worker pool; the answer is posted back as a reply.
//!
//! ```toml
//! [plugins.discord]
//! command = "target/debug/demi-plugin-discord"
//! args = ["--config", "discord-bot.toml"]
//! jobs = false
//! sharded = true
//! share_handoff = "overlap"
//! replicas = 2
//! submits_to = ["brain"]
//! [plugins.discord.credentials]
//! discord_token = "/etc/demi/discord.token"
//! [plugins.discord.shared_limits]
//! # Discord's rule is one IDENTIFY per 5 s per bucket, measured where
//! # they arrive; the margin covers the connect between grant and send.
//! identify = { every = "5500ms", buckets = 1 }   # buckets = max_concurrency
//! rest = { rate = 45, per = "1s" }   # under Discord's 50/s, with room for jitter
//! ```

mod config;
mod gateway;
mod owed;
mod relay;
mod rest;
mod sessions;
mod shards;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use demi_plugin_sdk::{Context, LoopError, Membership};
use serenity::all::{GatewayIntents, HttpBuilder};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::{BotConfig, TotalShards};
use crate::relay::Relay;
use crate::rest::Rest;
use crate::shards::{Fatal, Link, Maker, Running, Shared};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The bot's settings (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Check the settings, print what is wrong, and exit (0 when they are
    /// fine, 78 when not); nothing is started.
    #[arg(long)]
    check: bool,
}

const DISCORD: &str = "https://discord.com";
/// How long closing the shards may take at shutdown.
const CLOSE_WITHIN: Duration = Duration::from_secs(3);
/// How often the owed ledger is swept for replies nobody is answering,
/// and how old a row must be to count as left behind.
const OWED_SWEEP: Duration = Duration::from_secs(5);
const OWED_SWEEP_AGE: Duration = Duration::from_secs(10);
/// How often the shards' links are looked at for health.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let args = Args::parse();
    if args.check {
        return match BotConfig::load(&args.config) {
            Ok(_) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("{error}");
                ExitCode::from(demi_plugin_sdk::EXIT_CONFIG)
            }
        };
    }
    tracing_init();
    demi_plugin_sdk::run_origin_when_ready(move |ctx| bot(ctx, args))
}

fn tracing_init() {
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,serenity=warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
}

async fn bot(ctx: Context, args: Args) -> Result<(), LoopError> {
    let config = BotConfig::load(&args.config).map_err(|e| LoopError::config(e.to_string()))?;
    let token = ctx.credential(&config.token_credential).map_err(|e| {
        LoopError::config(format!(
            "the bot token: {e} (token_credential = {:?})",
            config.token_credential
        ))
    })?;
    let token = String::from_utf8(token)
        .map_err(|_| LoopError::config("the bot token is not UTF-8"))?
        .trim()
        .to_owned();
    if token.is_empty() {
        return Err(LoopError::config("the bot token credential is empty"));
    }
    let conductor = ctx
        .conductor()
        .map_err(|e| LoopError::config(e.to_string()))?;
    let stop = ctx.stopping();
    let proxy = (config.api_base.trim_end_matches('/') != DISCORD).then(|| config.api_base.clone());
    let client = reqwest::Client::builder()
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
    // Replies under way are finished (within the grace) after the shards
    // close, so this is not the plugin's stop token but follows it.
    let replies_stop = tokio_util::sync::CancellationToken::new();
    let mut http = HttpBuilder::new(&token)
        .client(client.clone())
        .ratelimiter_disabled(true);
    if let Some(proxy) = &proxy {
        http = http.proxy(proxy.clone());
    }
    let http = Arc::new(http.build());
    let rest = Arc::new(Rest::new(
        http.clone(),
        client.clone(),
        conductor.clone(),
        config.rest_limit.clone(),
        replies_stop.clone(),
    ));

    let gateway = tokio::select! {
        () = stop.cancelled() => return Ok(()),
        gateway = bot_gateway(&rest, &http) => gateway?,
    };
    let total = match config.total_shards {
        TotalShards::Fixed(n) => n,
        TotalShards::Auto => gateway.shards.max(1),
    };
    let limit = gateway.session_start_limit;
    let max_concurrency = u32::try_from(limit.max_concurrency.max(1)).unwrap_or(1);
    let membership = ctx.membership();
    let share = membership.share(total);
    if limit.remaining < u64::from(share.end - share.start) {
        return Err(LoopError::config(format!(
            "Discord allows {} more session starts today (session_start_limit.remaining), \
             fewer than the {} shards this replica boots; they reset in {} s",
            limit.remaining,
            share.end - share.start,
            limit.reset_after / 1000
        )));
    }
    tracing::info!(
        total,
        max_concurrency,
        first = share.start,
        end = share.end,
        remaining = limit.remaining,
        "starting shards"
    );

    let (owed, sessions) = match ctx.state_directory() {
        Some(dir) => (
            Some(owed::Owed::open(&dir.join("discord-owed.sqlite")).map_err(|e| e.to_string())?),
            Some(
                sessions::Sessions::open(&dir.join("discord-sessions.sqlite"))
                    .map_err(|e| e.to_string())?,
            ),
        ),
        None => {
            tracing::warn!(
                "no state folder: replies owed and sessions of a replica that dies are lost"
            );
            (None, None)
        }
    };
    let relay = Arc::new(Relay::new(
        conductor.clone(),
        rest,
        &config,
        owed,
        replies_stop.clone(),
    ));
    let shared = Arc::new(Shared {
        links: Default::default(),
        me: Default::default(),
        relay: relay.clone(),
        select: config.select.clone(),
    });
    let (news_tx, news) = mpsc::unbounded_channel();
    let maker = Arc::new(Maker {
        token: token.clone(),
        gateway: gateway.url.clone(),
        intents: intents(&config).bits(),
        conductor,
        identify_limit: config.identify_limit.clone(),
        max_concurrency,
        shared: shared.clone(),
        sessions,
        news: news_tx,
        stop: stop.clone(),
    });
    drop(token);

    let mut replica = Replica {
        maker,
        shared,
        total,
        running: BTreeMap::new(),
        leaving: HashMap::new(),
        pending: None,
        ready_once: false,
        reported: None,
        config: config.clone(),
        share: membership,
    };
    let result = replica.run(&ctx, membership, news).await;
    // A Discord that never answers the close must not eat the grace.
    if tokio::time::timeout(CLOSE_WITHIN, replica.close_all())
        .await
        .is_err()
    {
        tracing::warn!("shards did not close in time; leaving them");
    }
    relay
        .drain(
            ctx.grace()
                .saturating_sub(CLOSE_WITHIN + Duration::from_secs(1)),
        )
        .await;
    // What is left stays owed, for the next replica of these shards.
    replies_stop.cancel();
    let c = &relay.counts;
    use std::sync::atomic::Ordering::Relaxed;
    tracing::info!(
        submitted = c.submitted.load(Relaxed),
        replied = c.replied.load(Relaxed),
        empty = c.empty.load(Relaxed),
        dead_lettered = c.dead_lettered.load(Relaxed),
        failed = c.failed.load(Relaxed),
        "bot stopped"
    );
    result
}

/// What Discord says about this bot (`GET /gateway/bot`), through the
/// same limits as every other request.
async fn bot_gateway(
    rest: &Rest,
    http: &serenity::http::Http,
) -> Result<serenity::model::gateway::BotGateway, LoopError> {
    rest.turn().await.map_err(|e| e.to_string())?;
    http.get_bot_gateway().await.map_err(|e| match &e {
        serenity::Error::Http(serenity::http::HttpError::UnsuccessfulRequest(answer))
            if answer.status_code == reqwest::StatusCode::UNAUTHORIZED =>
        {
            LoopError::config(format!("Discord rejected the bot token: {e}"))
        }
        _ => LoopError::from(format!("GET /gateway/bot failed: {e}")),
    })
}

fn intents(config: &BotConfig) -> GatewayIntents {
    // Not GUILDS: nothing is cached, and its GUILD_CREATE of every guild
    // on every connect would be parsed for nothing.
    let mut intents = GatewayIntents::GUILD_MESSAGES | GatewayIntents::DIRECT_MESSAGES;
    if config.message_content {
        intents |= GatewayIntents::MESSAGE_CONTENT;
    }
    intents
}

/// This replica's shards through membership changes.
struct Replica {
    maker: Arc<Maker>,
    shared: Arc<Shared>,
    total: u32,
    running: BTreeMap<u32, Running>,
    /// Shards given away, closed once their new owner has had time to
    /// be READY.
    leaving: HashMap<u32, Instant>,
    /// A membership waiting for its new shards to be READY before it is
    /// reported applied.
    pending: Option<Membership>,
    ready_once: bool,
    reported: Option<Result<(), String>>,
    config: BotConfig,
    /// The membership whose share this replica runs.
    share: Membership,
}

impl Replica {
    async fn run(
        &mut self,
        ctx: &Context,
        membership: Membership,
        mut news: mpsc::UnboundedReceiver<Fatal>,
    ) -> Result<(), LoopError> {
        let stop = ctx.stopping();
        let mut changes = ctx.membership_changes();
        let health = ctx.health();
        self.adopt(membership);
        let mut tick = tokio::time::interval(HEALTH_EVERY);
        let mut sweep = tokio::time::interval(OWED_SWEEP);
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                Some(Fatal(reason)) = news.recv() => return Err(LoopError::config(reason)),
                Ok(()) = changes.changed() => {
                    let membership = *changes.borrow_and_update();
                    self.adopt(membership);
                }
                _ = tick.tick() => {}
                _ = sweep.tick() => {
                    // Rows a process left behind after this one looked
                    // (a stand-in retired, a replica stopped mid-reply).
                    let share = self.share.share(self.total);
                    self.shared.relay.answer_owed(share, OWED_SWEEP_AGE);
                }
            }
            self.settle(ctx).await;
            self.report(&health).await;
        }
    }

    /// Starts the shards of `membership`'s share that are not running and
    /// marks the others as leaving.
    fn adopt(&mut self, membership: Membership) {
        let share = membership.share(self.total);
        tracing::info!(
            index = membership.index,
            replicas = membership.replicas,
            first = share.start,
            end = share.end,
            "shard share"
        );
        for shard in share.clone() {
            self.leaving.remove(&shard);
            if !self.running.contains_key(&shard) {
                self.start(shard);
            }
        }
        let linger = Instant::now() + self.config.handoff_linger;
        for shard in self.running.keys() {
            if !share.contains(shard) {
                self.leaving.entry(*shard).or_insert(linger);
            }
        }
        self.pending = Some(membership);
        self.shared.relay.answer_owed(share, Duration::ZERO);
        self.share = membership;
    }

    fn start(&mut self, shard: u32) {
        let running = self.maker.start(shard, self.total);
        self.running.insert(shard, running);
    }

    /// Reports a membership applied once its shards are READY, and closes
    /// shards whose linger is over.
    async fn settle(&mut self, ctx: &Context) {
        let links = self.shared.links();
        if let Some(pending) = self.pending {
            let share = pending.share(self.total);
            if share.clone().all(|s| links.get(&s) == Some(&Link::Ready)) {
                ctx.membership_applied(pending);
                self.pending = None;
                self.ready_once = true;
            }
        }
        let now = Instant::now();
        let done: Vec<u32> = self
            .leaving
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(s, _)| *s)
            .collect();
        for shard in done {
            self.leaving.remove(&shard);
            if let Some(running) = self.running.remove(&shard) {
                tracing::info!(shard, "closing a shard given away");
                running.close().await;
                self.shared
                    .links
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&shard);
            }
        }
    }

    /// SERVING while every shard is connected (or back within the
    /// reconnect grace); the first time, once all are READY.
    async fn report(&mut self, health: &demi_plugin_sdk::Health) {
        let links = self.shared.links();
        let now = Instant::now();
        let mut problem = None;
        for (shard, link) in &links {
            match link {
                Link::Booting if !self.ready_once => {
                    problem = Some(format!("shard {shard} is identifying"));
                }
                Link::Down(since) if now.duration_since(*since) > self.config.reconnect_grace => {
                    problem = Some(format!(
                        "shard {shard} has been disconnected for {} s",
                        now.duration_since(*since).as_secs()
                    ));
                    break;
                }
                _ => {}
            }
        }
        let now = match problem {
            None => Ok(()),
            Some(reason) => Err(reason),
        };
        if self.reported.as_ref() != Some(&now) {
            match &now {
                Ok(()) => health.serving().await,
                Err(reason) => health.not_serving(reason).await,
            }
            self.reported = Some(now);
        }
    }

    async fn close_all(&mut self) {
        // Side by side: each close waits for Discord's answer.
        let mut closing = tokio::task::JoinSet::new();
        for (_, running) in std::mem::take(&mut self.running) {
            closing.spawn(running.close());
        }
        while closing.join_next().await.is_some() {}
    }
}
