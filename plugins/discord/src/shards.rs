//! Which shards a replica runs, and running them: each shard's gateway
//! connection in its own task, identifying only when the conductor's
//! shared `identify` limit grants its bucket a turn.
//!
//! A task per shard rather than one per share: each IDENTIFY waits for its
//! own bucket's turn across all replicas, and a membership change starts
//! and stops single shards.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use demi_plugin_sdk::Conductor;
use serenity::model::channel::Message;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Select;
use crate::gateway::{self, Dispatch, Ended, Identity, Session};
use crate::relay::{Incoming, Relay};
use crate::sessions::Sessions;

/// The IDENTIFY bucket of `shard`: Discord lets `max_concurrency` shards
/// identify together, one per bucket every 5 s.
pub fn bucket(shard: u32, max_concurrency: u32) -> u32 {
    shard % max_concurrency.max(1)
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

/// What shard tasks tell the replica's loop: a failure no reconnect
/// mends; the replica stops with this reason.
#[derive(Debug)]
pub struct Fatal(pub String);

/// State the shards of this replica share.
pub struct Shared {
    pub links: Mutex<HashMap<u32, Link>>,
    /// The bot's own user id, from READY: its messages are never answered.
    pub me: AtomicU64,
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

    fn on_dispatch(&self, shard: u32, dispatch: Dispatch, session: &Session) {
        self.me.store(session.user, Ordering::Relaxed);
        match dispatch {
            Dispatch::Ready { guilds } => {
                tracing::info!(shard, guilds, "shard READY");
                self.set(shard, Link::Ready);
            }
            Dispatch::Resumed => {
                tracing::info!(shard, "shard resumed");
                self.set(shard, Link::Ready);
            }
            Dispatch::Message(message) => {
                if !selects(&self.select, self.me.load(Ordering::Relaxed), &message) {
                    return;
                }
                let message = *message;
                self.relay.accept(Incoming {
                    message_id: message.id.get(),
                    channel_id: message.channel_id.get(),
                    guild_id: message.guild_id.map(|g| g.get()),
                    author_id: message.author.id.get(),
                    author_name: message.author.name,
                    content: message.content,
                    shard,
                });
            }
        }
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

/// What every shard's connection is made from.
pub struct Maker {
    pub token: String,
    /// The gateway's address (`url` of `GET /gateway/bot`).
    pub gateway: String,
    pub intents: u64,
    pub conductor: Conductor,
    pub identify_limit: String,
    pub max_concurrency: u32,
    pub shared: Arc<Shared>,
    /// Sessions written down for a successor to resume (none without a
    /// state folder).
    pub sessions: Option<Sessions>,
    pub news: mpsc::UnboundedSender<Fatal>,
    pub stop: CancellationToken,
}

/// How long one identify wait may be before the conductor is asked
/// again (it refuses turns further off than this).
const IDENTIFY_PATIENCE: Duration = Duration::from_secs(300);
/// Pauses between failed connections: doubling from the first, capped,
/// with jitter so that shards do not come back in step.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often a session's sequence is written down at most.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

fn backoff(failures: u32) -> Duration {
    let step = BACKOFF_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(5));
    step.min(BACKOFF_MAX).mul_f64(0.5 + fastrand::f64())
}

/// A running shard: its task and the token that stops it.
pub struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Closes the shard's session (close code 1000) and waits for it.
    pub async fn close(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

impl Maker {
    /// Starts `shard`: waits for its identify turn, then keeps it
    /// connected until it is closed.
    pub fn start(self: &Arc<Self>, shard: u32, total: u32) -> Running {
        self.shared
            .links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(shard, Link::Booting);
        let stop = self.stop.child_token();
        let maker = self.clone();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            if let Some(fatal) = maker.run(shard, total, &token).await {
                let _ = maker.news.send(fatal);
            }
        });
        Running { stop, task }
    }

    /// Connects again and again, resuming the session whenever Discord
    /// still keeps it — one a dead process left behind too; returns when
    /// stopped or on a fatal failure.
    async fn run(&self, shard: u32, total: u32, stop: &CancellationToken) -> Option<Fatal> {
        let who = Identity {
            token: &self.token,
            intents: self.intents,
            shard,
            total,
        };
        let mut session = self.adopt(shard, total);
        let mut failures = 0;
        let mut saved: Option<Instant> = None;
        let end = loop {
            if session.is_none() {
                if let Err(fatal) = self.identify_turn(shard, stop).await {
                    break Some(fatal);
                }
                if stop.is_cancelled() {
                    break None;
                }
            }
            let mut live = false;
            let ended = gateway::connect(&self.gateway, &who, &mut session, stop, |d, s| {
                let fresh = matches!(d, Dispatch::Ready { .. } | Dispatch::Resumed);
                live |= fresh;
                self.shared.on_dispatch(shard, d, s);
                // After the message is handed over (and written down as
                // owed): a successor resuming from here replays only
                // what came later.
                if fresh || saved.is_none_or(|at| at.elapsed() >= CHECKPOINT_EVERY) {
                    self.save(shard, total, s);
                    saved = Some(Instant::now());
                }
            })
            .await;
            let (why, pause) = match ended {
                Ended::Stopped => break None,
                Ended::Fatal(reason) => break Some(Fatal(reason)),
                Ended::Reconnect { why, backoff } => (why, backoff),
            };
            self.shared.set(shard, Link::Down(Instant::now()));
            if live {
                failures = 0;
            }
            tracing::info!(shard, %why, resume = session.is_some(), "shard reconnecting");
            if pause {
                failures += 1;
                tokio::select! {
                    () = stop.cancelled() => break None,
                    () = tokio::time::sleep(backoff(failures)) => {}
                }
            }
        };
        // Closed with 1000, or failed for good: nothing to resume.
        if let Some(sessions) = &self.sessions
            && let Err(error) = sessions.forget(shard)
        {
            tracing::warn!(shard, %error, "cannot cross out the shard's session");
        }
        end
    }

    /// A session of `shard` that a dead process left resumable.
    fn adopt(&self, shard: u32, total: u32) -> Option<Session> {
        match self.sessions.as_ref()?.adopt(shard, total) {
            Ok(Some(session)) => {
                tracing::info!(
                    shard,
                    seq = session.seq,
                    "resuming the session a stopped process left"
                );
                Some(session)
            }
            Ok(None) => None,
            Err(error) => {
                tracing::warn!(shard, %error, "cannot look for a session to resume");
                None
            }
        }
    }

    fn save(&self, shard: u32, total: u32, session: &Session) {
        if let Some(sessions) = &self.sessions
            && let Err(error) = sessions.save(shard, total, session)
        {
            tracing::warn!(shard, %error, "cannot write the shard's session down");
        }
    }

    /// Waits for `shard`'s bucket's turn under the bot-wide identify
    /// limit. `Ok` also when stopped meanwhile.
    async fn identify_turn(&self, shard: u32, stop: &CancellationToken) -> Result<(), Fatal> {
        let bucket = bucket(shard, self.max_concurrency);
        let mut conductor = self.conductor.clone();
        match conductor
            .acquire_until(&self.identify_limit, bucket, IDENTIFY_PATIENCE, stop)
            .await
        {
            Ok(Some(grant)) => {
                tracing::info!(
                    shard,
                    bucket,
                    waited_ms = grant.waited.as_millis() as u64,
                    "identify turn"
                );
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(error) => Err(Fatal(format!(
                "cannot take an identify turn for shard {shard} (bucket {bucket}) under \
                 the shared limit {:?}: {error}; the plugin's shared_limits need \
                 `{} = {{ every = \"5s\", buckets = {} }}` at least",
                self.identify_limit, self.identify_limit, self.max_concurrency
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap_with_jitter() {
        for _ in 0..100 {
            let first = backoff(1);
            assert!(first >= BACKOFF_FIRST / 2 && first <= BACKOFF_FIRST * 3 / 2);
            let third = backoff(3);
            assert!(third >= BACKOFF_FIRST * 2 && third <= BACKOFF_FIRST * 6);
            assert!(backoff(40) <= BACKOFF_MAX * 3 / 2);
        }
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
