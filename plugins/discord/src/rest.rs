//! Discord's REST API under its limits: the bot-wide shared `rest` limit
//! (the conductor's, so it holds across replicas), Discord's per-route
//! buckets from the `X-RateLimit-*` headers, and 429s waited out and
//! retried, never dropped.
//!
//! serenity's own ratelimiter is off: it sends its requests to Discord
//! even when a proxy base is configured, so a bot pointed at a stand-in
//! would be limited by headers it never sees. This limiter is the one in
//! production too, so what the tests prove is what runs.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use demi_plugin_sdk::Conductor;
use serenity::http::{Http, LightMethod, Request, Route};
use serenity::model::id::ChannelId;
use tokio::time::Instant;

/// Why a request was given up.
#[derive(Debug, thiserror::Error)]
pub enum RestError {
    /// Discord refused it for good (a missing permission, an unknown
    /// channel): retrying cannot help.
    #[error("Discord answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("cannot build the request: {0}")]
    Build(String),
    #[error("shared limit {limit:?}: {reason}")]
    Limit { limit: String, reason: String },
    #[error("stopped")]
    Stopped,
}

/// How long one request may wait for the shared limit before the wait
/// is retried (the conductor refuses a turn further away than this).
const LIMIT_PATIENCE: Duration = Duration::from_secs(30);
/// Backoff after a 5xx or a failed connection, doubled up to the cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    remaining: u32,
    reset: Instant,
}

#[derive(Debug, Default)]
struct Buckets {
    global_until: Option<Instant>,
    /// Route template → the bucket Discord says it shares.
    route_bucket: HashMap<&'static str, String>,
    /// (bucket or route, major parameter) → its state.
    state: HashMap<(String, u64), Bucket>,
}

impl Buckets {
    fn key(&self, route: &'static str, major: u64) -> (String, u64) {
        let bucket = self.route_bucket.get(route).cloned();
        (bucket.unwrap_or_else(|| route.to_owned()), major)
    }

    /// When this request may go: `None` now (its turn is taken).
    fn wait(&mut self, route: &'static str, major: u64, now: Instant) -> Option<Instant> {
        if let Some(until) = self.global_until.filter(|u| *u > now) {
            return Some(until);
        }
        let key = self.key(route, major);
        match self.state.get_mut(&key) {
            Some(b) if b.reset <= now => {
                // The window passed: Discord's next answer says what the
                // new one holds; until then, go.
                self.state.remove(&key);
                None
            }
            Some(b) if b.remaining == 0 => Some(b.reset),
            Some(b) => {
                b.remaining -= 1;
                None
            }
            None => None,
        }
    }

    fn learn(&mut self, route: &'static str, major: u64, headers: &Limits, now: Instant) {
        if let Some(bucket) = &headers.bucket {
            self.route_bucket.insert(route, bucket.clone());
        }
        let key = self.key(route, major);
        if let (Some(remaining), Some(after)) = (headers.remaining, headers.reset_after) {
            self.state.insert(
                key,
                Bucket {
                    remaining,
                    reset: now + after,
                },
            );
        }
    }

    fn hold(&mut self, route: &'static str, major: u64, global: bool, until: Instant) {
        if global {
            self.global_until = Some(self.global_until.map_or(until, |u| u.max(until)));
        } else {
            let key = self.key(route, major);
            self.state.insert(
                key,
                Bucket {
                    remaining: 0,
                    reset: until,
                },
            );
        }
    }
}

/// The `X-RateLimit-*` headers of one answer.
#[derive(Debug, Default, PartialEq)]
struct Limits {
    bucket: Option<String>,
    remaining: Option<u32>,
    reset_after: Option<Duration>,
    global: bool,
    retry_after: Option<Duration>,
}

impl Limits {
    fn read(headers: &reqwest::header::HeaderMap) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let seconds = |name: &str| {
            text(name)
                .and_then(|v| v.parse::<f64>().ok())
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
        };
        Self {
            bucket: text("x-ratelimit-bucket").map(str::to_owned),
            remaining: text("x-ratelimit-remaining").and_then(|v| v.parse().ok()),
            reset_after: seconds("x-ratelimit-reset-after"),
            global: text("x-ratelimit-global") == Some("true")
                || text("x-ratelimit-scope") == Some("global"),
            retry_after: seconds("retry-after"),
        }
    }
}

/// A 429's body: `retry_after` there is more precise than the header.
#[derive(serde::Deserialize)]
struct TooMany {
    retry_after: f64,
    #[serde(default)]
    global: bool,
}

/// The REST client of the bot.
pub struct Rest {
    http: std::sync::Arc<Http>,
    client: reqwest::Client,
    conductor: Conductor,
    limit: String,
    buckets: Mutex<Buckets>,
    stop: tokio_util::sync::CancellationToken,
}

/// What the request counts as for Discord's buckets.
struct RouteKey {
    template: &'static str,
    major: u64,
}

impl Rest {
    pub fn new(
        http: std::sync::Arc<Http>,
        client: reqwest::Client,
        conductor: Conductor,
        limit: String,
        stop: tokio_util::sync::CancellationToken,
    ) -> Self {
        Self {
            http,
            client,
            conductor,
            limit,
            buckets: Mutex::default(),
            stop,
        }
    }

    /// Posts `content` in `channel` as a reply to `message`. `nonce` with
    /// `enforce_nonce` makes Discord answer a repeat of this post (a
    /// retry, another replica) with the message already made, so a user
    /// never sees the reply twice.
    pub async fn reply(
        &self,
        channel: u64,
        message: u64,
        content: &str,
        nonce: &str,
    ) -> Result<(), RestError> {
        let body = serde_json::json!({
            "content": content,
            "message_reference": {
                "message_id": message.to_string(),
                "channel_id": channel.to_string(),
                "fail_if_not_exists": false,
            },
            "nonce": nonce,
            "enforce_nonce": true,
            // The answer may quote the user: it must not ping anyone.
            "allowed_mentions": { "parse": [], "replied_user": false },
        });
        let body = serde_json::to_vec(&body).map_err(|e| RestError::Build(e.to_string()))?;
        let channel_id = ChannelId::new(channel.max(1));
        let key = RouteKey {
            template: "POST /channels/{}/messages",
            major: channel,
        };
        self.send(key, || {
            Request::new(Route::ChannelMessages { channel_id }, LightMethod::Post)
                .body(Some(body.clone()))
        })
        .await
        .map(drop)
    }

    /// One request through every limit, retried until Discord takes it or
    /// refuses it for good.
    async fn send<'a>(
        &self,
        key: RouteKey,
        make: impl Fn() -> Request<'a>,
    ) -> Result<reqwest::Response, RestError> {
        let mut backoff = FIRST_BACKOFF;
        loop {
            self.take_turn(&key).await?;
            let request = make()
                .build(&self.client, self.http.token(), self.http.proxy.as_deref())
                .map_err(|e| RestError::Build(e.to_string()))?
                .build()
                .map_err(|e| RestError::Build(e.to_string()))?;
            let answer = tokio::select! {
                () = self.stop.cancelled() => return Err(RestError::Stopped),
                answer = self.client.execute(request) => answer,
            };
            let response = match answer {
                Ok(response) => response,
                Err(error) => {
                    tracing::warn!(%error, route = key.template, "Discord unreachable; retrying");
                    self.pause(&mut backoff).await?;
                    continue;
                }
            };
            let limits = Limits::read(response.headers());
            let now = Instant::now();
            self.buckets().learn(key.template, key.major, &limits, now);
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            if status.as_u16() == 429 {
                let body = response.json::<TooMany>().await.ok();
                let after = body
                    .as_ref()
                    .and_then(|b| Duration::try_from_secs_f64(b.retry_after).ok())
                    .or(limits.retry_after)
                    .unwrap_or(Duration::from_secs(1));
                let global = limits.global || body.is_some_and(|b| b.global);
                tracing::info!(
                    route = key.template,
                    global,
                    retry_after_ms = after.as_millis() as u64,
                    "rate limited by Discord; waiting"
                );
                self.buckets()
                    .hold(key.template, key.major, global, now + after);
                continue;
            }
            if status.is_server_error() {
                tracing::warn!(%status, route = key.template, "Discord failed; retrying");
                self.pause(&mut backoff).await?;
                continue;
            }
            let body = response.text().await.unwrap_or_default();
            return Err(RestError::Refused {
                status: status.as_u16(),
                body: body.chars().take(300).collect(),
            });
        }
    }

    fn buckets(&self) -> std::sync::MutexGuard<'_, Buckets> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until Discord's buckets let this request go, then for a turn
    /// under the bot-wide limit.
    async fn take_turn(&self, key: &RouteKey) -> Result<(), RestError> {
        loop {
            let wait = self.buckets().wait(key.template, key.major, Instant::now());
            let Some(until) = wait else { break };
            tokio::select! {
                () = self.stop.cancelled() => return Err(RestError::Stopped),
                () = tokio::time::sleep_until(until) => {}
            }
        }
        self.turn().await
    }

    /// A turn under the bot-wide limit, for a request made elsewhere
    /// (serenity's `GET /gateway/bot`).
    pub async fn turn(&self) -> Result<(), RestError> {
        let mut conductor = self.conductor.clone();
        match conductor
            .acquire_until(&self.limit, 0, LIMIT_PATIENCE, &self.stop)
            .await
        {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(RestError::Stopped),
            Err(error) => Err(RestError::Limit {
                limit: self.limit.clone(),
                reason: error.to_string(),
            }),
        }
    }

    async fn pause(&self, backoff: &mut Duration) -> Result<(), RestError> {
        let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
        tokio::select! {
            () = self.stop.cancelled() => return Err(RestError::Stopped),
            () = tokio::time::sleep(*backoff + jitter) => {}
        }
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        Ok(())
    }
}

/// A reply's nonce, the same for every post of one job's answer:
/// Discord takes at most 25 characters, and a job id may be longer, so
/// it is the job id's 128-bit FNV-1a hash in base 36 (25 digits hold
/// 2^128).
pub fn nonce(job_id: &str) -> String {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013b;
    let mut hash = OFFSET;
    for byte in job_id.bytes() {
        hash ^= u128::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    let mut digits = Vec::with_capacity(25);
    loop {
        let digit = (hash % 36) as u32;
        digits.push(char::from_digit(digit, 36).unwrap_or('0'));
        hash /= 36;
        if hash == 0 {
            break;
        }
    }
    digits.iter().rev().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_fit_discord_and_follow_the_job() {
        let a = nonce("01JDX5S8QK6F3V2ZB3W9T5N7HC");
        assert!(a.len() <= 25 && !a.is_empty(), "{a}");
        assert_eq!(a, nonce("01JDX5S8QK6F3V2ZB3W9T5N7HC"));
        assert_ne!(a, nonce("01JDX5S8QK6F3V2ZB3W9T5N7HD"));
        assert!(nonce("").len() <= 25);
        let longest = (0..2000)
            .map(|i| nonce(&format!("job-{i}")).len())
            .max()
            .unwrap();
        assert!(longest <= 25);
    }

    #[test]
    fn buckets_hold_requests_until_the_reset_and_learn_shared_buckets() {
        let route = "POST /channels/{}/messages";
        let now = Instant::now();
        let mut b = Buckets::default();
        assert_eq!(b.wait(route, 1, now), None, "nothing known: go");
        let limits = Limits {
            bucket: Some("abc".into()),
            remaining: Some(1),
            reset_after: Some(Duration::from_secs(2)),
            ..Limits::default()
        };
        b.learn(route, 1, &limits, now);
        assert_eq!(b.wait(route, 1, now), None, "one left");
        assert_eq!(b.wait(route, 1, now), Some(now + Duration::from_secs(2)));
        assert_eq!(
            b.wait(route, 2, now),
            None,
            "another channel, another bucket"
        );
        assert_eq!(b.wait(route, 1, now + Duration::from_secs(2)), None);
        b.hold(route, 3, true, now + Duration::from_secs(5));
        assert_eq!(
            b.wait(route, 2, now),
            Some(now + Duration::from_secs(5)),
            "a global 429 holds every route"
        );
    }

    #[test]
    fn limits_are_read_from_discords_headers() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("x-ratelimit-bucket", "b1".parse().unwrap());
        h.insert("x-ratelimit-remaining", "4".parse().unwrap());
        h.insert("x-ratelimit-reset-after", "1.250".parse().unwrap());
        h.insert("x-ratelimit-scope", "global".parse().unwrap());
        let l = Limits::read(&h);
        assert_eq!(l.bucket.as_deref(), Some("b1"));
        assert_eq!(l.remaining, Some(4));
        assert_eq!(l.reset_after, Some(Duration::from_millis(1250)));
        assert!(l.global);
    }
}
