//! Which shards a replica runs, and running them: one serenity client per
//! shard, booted when the conductor's shared `identify` limit grants its
//! bucket a turn.
//!
//! One client per shard rather than one per share: serenity's shard
//! queuer spaces every boot of a client 5 s apart whatever
//! `max_concurrency` allows, and it cannot ask anyone before an IDENTIFY.
//! A client per shard lets each boot wait for its own bucket's turn
//! across all replicas, and lets a membership change start and stop
//! single shards. The clients share one HTTP connection pool.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use demi_plugin_sdk::{ClientError, Conductor};
use serenity::all::{
    ClientBuilder, ConnectionStage, Context, EventHandler, GatewayError, GatewayIntents,
    HttpBuilder, Message, Ready, ShardManager, ShardStageUpdateEvent,
};
use serenity::cache::Settings as CacheSettings;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::Select;
use crate::relay::{Incoming, Relay};

/// serenity's `Client::start_shard_range(range, total)` boots
/// `range.start` through `range.end` *inclusive*; a share is half-open.
/// `None` for an empty share (serenity has no empty range).
pub fn serenity_range(share: Range<u32>) -> Option<Range<u32>> {
    (!share.is_empty()).then(|| share.start..share.end - 1)
}

/// The IDENTIFY bucket of `shard`: Discord lets `max_concurrency` shards
/// identify together, one per bucket every 5 s.
pub fn bucket(shard: u32, max_concurrency: u32) -> u32 {
    shard % max_concurrency.max(1)
}

/// A gateway failure that a restart cannot mend, with what to tell the
/// operator.
pub fn fatal_reason(error: &GatewayError) -> Option<&'static str> {
    Some(match error {
        GatewayError::InvalidAuthentication => {
            "Discord rejected the bot token (close code 4004): check the credential"
        }
        GatewayError::InvalidShardData => {
            "Discord rejected the shard numbers (close code 4010): check total_shards"
        }
        GatewayError::OverloadedShard => {
            "Discord requires more shards (close code 4011): raise total_shards or use \"auto\""
        }
        GatewayError::InvalidGatewayIntents => {
            "Discord rejected the gateway intents (close code 4013)"
        }
        GatewayError::DisallowedGatewayIntents => {
            "a privileged intent is not granted to this bot (close code 4014): enable \
             MESSAGE CONTENT in the developer portal or set message_content = false"
        }
        _ => return None,
    })
}

/// Where each shard of this replica stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Waiting for its identify turn, or connecting for the first time.
    Booting,
    Ready,
    /// Lost since then (reconnecting, resuming).
    Down(Instant),
}

/// What shard tasks tell the replica's loop.
#[derive(Debug)]
pub enum ShardNews {
    /// A failure no restart mends: the replica stops with this reason.
    Fatal(String),
    /// The shard's client ended on its own; it is booted again.
    Ended { shard: u32, error: String },
}

/// State the event handlers of every shard share.
pub struct Shared {
    pub links: Mutex<HashMap<u32, Link>>,
    /// Per shard: IDENTIFYs this process paced (boots), and IDENTIFYs seen
    /// to complete. More seen than paced means serenity re-identified on
    /// its own (after op 9 with `d = false`, or a failed resume).
    pub identifies: Mutex<HashMap<u32, (u64, u64)>>,
    /// The bot's own user id, from READY: its messages are never answered.
    pub me: std::sync::atomic::AtomicU64,
    pub relay: Arc<Relay>,
    pub select: Select,
}

impl Shared {
    pub fn set(&self, shard: u32, link: Link) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = links.get_mut(&shard) {
            // Down keeps the moment it went down.
            if !(matches!(old, Link::Down(_)) && matches!(link, Link::Down(_))) {
                *old = link;
            }
        }
    }

    pub fn links(&self) -> HashMap<u32, Link> {
        self.links.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn selects(&self, message: &Message) -> bool {
        let me = self.me.load(std::sync::atomic::Ordering::Relaxed);
        selects(&self.select, me, message)
    }
}

/// Whether the bot (user `me`, 0 before READY) answers `message`: never a
/// bot's or a webhook's (itself included, so two bots cannot talk
/// forever), and otherwise what `select` asks for.
fn selects(select: &Select, me: u64, message: &Message) -> bool {
    if message.author.bot || message.webhook_id.is_some() || message.author.id.get() == me {
        return false;
    }
    if message.guild_id.is_none() {
        return select.direct_messages;
    }
    let mentioned = me != 0 && message.mentions.iter().any(|u| u.id.get() == me);
    (select.mentions && mentioned)
        || select
            .prefix
            .as_deref()
            .is_some_and(|p| message.content.starts_with(p))
}

struct Handler {
    shard: u32,
    shared: Arc<Shared>,
    conductor: Conductor,
    identify_limit: String,
    bucket: u32,
}

impl Handler {
    /// serenity re-identified a shard without asking (its shard queuer
    /// restarts a session by itself): take the turn it used after the
    /// fact, so that the other replicas' next IDENTIFY in this bucket
    /// keeps its distance.
    fn account_for_identify(&self) {
        let unpaced = {
            let mut counts = self
                .shared
                .identifies
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let (paced, seen) = counts.entry(self.shard).or_default();
            *seen += 1;
            *seen > *paced
        };
        if !unpaced {
            return;
        }
        tracing::warn!(
            shard = self.shard,
            bucket = self.bucket,
            "serenity re-identified the shard by itself; taking its identify turn late"
        );
        let mut conductor = self.conductor.clone();
        let limit = self.identify_limit.clone();
        let bucket = self.bucket;
        tokio::spawn(async move {
            if let Err(error) = conductor.acquire(&limit, bucket, IDENTIFY_PATIENCE).await {
                tracing::debug!(%error, "late identify turn not taken");
            }
        });
    }
}

#[serenity::async_trait]
impl EventHandler for Handler {
    async fn ready(&self, _ctx: Context, ready: Ready) {
        self.shared
            .me
            .store(ready.user.id.get(), std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            shard = self.shard,
            guilds = ready.guilds.len(),
            "shard READY"
        );
        self.shared.set(self.shard, Link::Ready);
    }

    async fn shard_stage_update(&self, _ctx: Context, event: ShardStageUpdateEvent) {
        if event.old == ConnectionStage::Identifying {
            self.account_for_identify();
        }
        match event.new {
            ConnectionStage::Connected => self.shared.set(self.shard, Link::Ready),
            stage => {
                tracing::debug!(shard = self.shard, ?stage, "shard reconnecting");
                self.shared.set(self.shard, Link::Down(Instant::now()));
            }
        }
    }

    async fn message(&self, _ctx: Context, message: Message) {
        if !self.shared.selects(&message) {
            return;
        }
        self.shared.relay.accept(Incoming {
            message_id: message.id.get(),
            channel_id: message.channel_id.get(),
            guild_id: message.guild_id.map(|g| g.get()),
            author_id: message.author.id.get(),
            author_name: message.author.name.clone(),
            content: message.content.clone(),
            shard: self.shard,
        });
    }
}

/// What every shard's client is made from.
pub struct Maker {
    pub token: String,
    pub proxy: Option<String>,
    pub client: reqwest::Client,
    pub intents: GatewayIntents,
    pub cache: CacheSettings,
    pub conductor: Conductor,
    pub identify_limit: String,
    pub max_concurrency: u32,
    pub shared: Arc<Shared>,
    pub news: mpsc::UnboundedSender<ShardNews>,
    pub stop: tokio_util::sync::CancellationToken,
}

/// How long one identify wait may be before the conductor is asked
/// again (it refuses turns further off than this).
const IDENTIFY_PATIENCE: Duration = Duration::from_secs(300);

/// A running shard: its client's task and the handle that stops it.
pub struct Running {
    manager: Arc<Mutex<Option<Arc<ShardManager>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Closes the shard's session (close code 1000) and waits for it.
    pub async fn close(self) {
        let manager = self
            .manager
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(manager) = manager {
            manager.shutdown_all().await;
        }
        self.task.abort();
        let _ = self.task.await;
    }
}

impl Maker {
    /// Starts `shard`: waits for its identify turn, then runs its client
    /// until it is closed.
    pub fn start(self: &Arc<Self>, shard: u32, total: u32) -> Running {
        self.shared
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(shard, Link::Booting);
        let manager = Arc::new(Mutex::new(None));
        let maker = self.clone();
        let slot = manager.clone();
        let task = tokio::spawn(async move {
            let error = maker.run(shard, total, slot).await;
            if let Some(news) = error {
                let _ = maker.news.send(news);
            }
        });
        Running { manager, task }
    }

    async fn run(
        &self,
        shard: u32,
        total: u32,
        slot: Arc<Mutex<Option<Arc<ShardManager>>>>,
    ) -> Option<ShardNews> {
        // Everything but the connection is made before the turn, so that the
        // IDENTIFY follows the grant by a connect and a HELLO only.
        let mut http = HttpBuilder::new(&self.token)
            .client(self.client.clone())
            .ratelimiter_disabled(true);
        if let Some(proxy) = &self.proxy {
            http = http.proxy(proxy.clone());
        }
        let handler = Handler {
            shard,
            shared: self.shared.clone(),
            conductor: self.conductor.clone(),
            identify_limit: self.identify_limit.clone(),
            bucket: bucket(shard, self.max_concurrency),
        };
        let client = ClientBuilder::new_with_http(http.build(), self.intents)
            .event_handler(handler)
            .cache_settings(self.cache.clone());
        let mut client = match client.await {
            Ok(client) => client,
            Err(error) => {
                return Some(ShardNews::Ended {
                    shard,
                    error: error.to_string(),
                });
            }
        };
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(client.shard_manager.clone());
        if let Err(news) = self.identify_turn(shard).await {
            return news;
        }
        self.shared
            .identifies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(shard)
            .or_default()
            .0 += 1;
        let range = serenity_range(shard..shard + 1)?;
        match client.start_shard_range(range, total).await {
            Ok(()) => None,
            Err(serenity::Error::Gateway(error)) if fatal_reason(&error).is_some() => {
                fatal_reason(&error).map(|r| ShardNews::Fatal(r.to_owned()))
            }
            Err(error) => Some(ShardNews::Ended {
                shard,
                error: error.to_string(),
            }),
        }
    }

    /// Waits for `shard`'s bucket's turn under the bot-wide identify
    /// limit.
    async fn identify_turn(&self, shard: u32) -> Result<(), Option<ShardNews>> {
        let bucket = bucket(shard, self.max_concurrency);
        loop {
            let mut conductor = self.conductor.clone();
            let turn = tokio::select! {
                () = self.stop.cancelled() => return Err(None),
                turn = conductor.acquire(&self.identify_limit, bucket, IDENTIFY_PATIENCE) => turn,
            };
            match turn {
                Ok(grant) => {
                    tracing::info!(
                        shard,
                        bucket,
                        waited_ms = grant.waited.as_millis() as u64,
                        "identify turn"
                    );
                    return Ok(());
                }
                Err(ClientError::Rpc(status))
                    if matches!(
                        status.code(),
                        tonic::Code::DeadlineExceeded | tonic::Code::Unavailable
                    ) =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => {
                    return Err(Some(ShardNews::Fatal(format!(
                        "cannot take an identify turn for shard {shard} (bucket {bucket}) under \
                         the shared limit {:?}: {error}; the plugin's shared_limits need \
                         `{} = {{ every = \"5s\", buckets = {} }}` at least",
                        self.identify_limit, self.identify_limit, self.max_concurrency
                    ))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use demi_plugin_sdk::Membership;

    #[test]
    fn serenity_ranges_end_one_before_the_share() {
        assert_eq!(serenity_range(4..8), Some(4..7));
        assert_eq!(serenity_range(0..1), Some(0..0));
        assert_eq!(serenity_range(3..3), None);
        // Two replicas of four shards boot 0, 1 and 2, 3; never shard 4.
        let share = |index| {
            Membership {
                index,
                replicas: 2,
                generation: 1,
            }
            .share(4)
        };
        assert_eq!(serenity_range(share(0)), Some(0..1));
        assert_eq!(serenity_range(share(1)), Some(2..3));
    }

    fn message(
        author: u64,
        bot: bool,
        guild: Option<u64>,
        mentions: &[u64],
        text: &str,
    ) -> Message {
        let user = |id: u64, bot: bool| serde_json::json!({"id": id.to_string(), "username": "u", "avatar": null, "bot": bot});
        let mut m = serde_json::json!({
            "id": "10", "channel_id": "20", "author": user(author, bot), "content": text,
            "timestamp": "2026-11-30T05:00:00.000000+00:00", "edited_timestamp": null,
            "tts": false, "mention_everyone": false,
            "mentions": mentions.iter().map(|id| user(*id, true)).collect::<Vec<_>>(),
            "mention_roles": [], "attachments": [], "embeds": [], "pinned": false, "type": 0,
        });
        if let Some(guild) = guild {
            m["guild_id"] = serde_json::json!(guild.to_string());
        }
        serde_json::from_value(m).unwrap()
    }

    #[test]
    fn the_bot_answers_what_it_is_asked_to_and_never_a_bot() {
        const ME: u64 = 99;
        let all = Select {
            direct_messages: true,
            mentions: true,
            prefix: Some("!".into()),
        };
        let none = Select {
            direct_messages: false,
            mentions: false,
            prefix: None,
        };
        let dm = message(1, false, None, &[], "hi");
        let mention = message(1, false, Some(5), &[ME], "hey bot");
        let prefixed = message(1, false, Some(5), &[], "!help");
        let chatter = message(1, false, Some(5), &[], "hello all");
        for m in [&dm, &mention, &prefixed] {
            assert!(selects(&all, ME, m), "{}", m.content);
            assert!(!selects(&none, ME, m), "{}", m.content);
        }
        assert!(!selects(&all, ME, &chatter));
        assert!(!selects(
            &all,
            ME,
            &message(2, true, None, &[], "a bot's DM")
        ));
        assert!(!selects(&all, ME, &message(ME, false, None, &[], "myself")));
        assert!(
            !selects(&all, 0, &mention),
            "before READY the bot does not know its own id"
        );
    }

    #[test]
    fn identify_buckets_follow_max_concurrency() {
        assert_eq!(bucket(5, 1), 0);
        assert_eq!(bucket(5, 4), 1);
        assert_eq!(bucket(5, 0), 0, "max_concurrency 0 is read as 1");
    }
}
