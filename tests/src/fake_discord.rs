//! A Discord stand-in on loopback, as strict as the real one where the
//! bot's correctness depends on it: the REST API (`/gateway`,
//! `/gateway/bot`, creating messages with rate-limit headers, nonces
//! de-duplicated under `enforce_nonce`) and the gateway (HELLO, IDENTIFY
//! checked and paced per bucket, READY, heartbeats, RESUME with replay,
//! close codes). It records what the bot did — identifies, posts,
//! requests, which sessions were live when — for the tests to judge.
//!
//! It runs on its own thread and runtime, so tests of any flavour can
//! drive it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Discord's IDENTIFY spacing within one bucket.
pub const IDENTIFY_SPACING: Duration = Duration::from_secs(5);
const MESSAGE_CONTENT: u64 = 1 << 15;
pub const BOT_USER_ID: u64 = 900_000_000_000_000_001;

/// How the fake Discord behaves.
#[derive(Debug, Clone)]
pub struct Settings {
    pub token: String,
    pub shards: u32,
    pub max_concurrency: u32,
    pub remaining: u64,
    /// Whether the bot may ask for MESSAGE_CONTENT (else: close 4014).
    pub message_content_granted: bool,
    pub heartbeat_interval_ms: u64,
    /// Share of message posts answered 429 (0.0 to 1.0), and of those the
    /// share that is global.
    pub post_429: f64,
    pub post_429_global: f64,
    /// Per-route bucket size announced in X-RateLimit-Remaining.
    pub bucket_size: u32,
    /// Guilds each shard's READY lists (as unavailable, as Discord does
    /// before their GUILD_CREATE).
    pub guilds_per_shard: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            token: "fake-token".into(),
            shards: 1,
            max_concurrency: 1,
            remaining: 1000,
            message_content_granted: true,
            heartbeat_interval_ms: 41_250,
            post_429: 0.0,
            post_429_global: 0.0,
            bucket_size: 5,
            guilds_per_shard: 0,
        }
    }
}

/// An IDENTIFY the gateway received.
#[derive(Debug, Clone)]
pub struct Identify {
    pub at: Instant,
    pub shard: u32,
    pub total: u32,
    pub bucket: u32,
    pub session: String,
    /// Refused with op 9 because its bucket had another within 5 s.
    pub too_soon: bool,
}

/// A reply the REST API received.
#[derive(Debug, Clone)]
pub struct Post {
    pub at: Instant,
    pub channel: u64,
    pub reply_to: Option<u64>,
    pub content: String,
    pub nonce: Option<String>,
    /// A repeat of an earlier nonce, answered with the first message.
    pub repeat: bool,
}

/// One gateway session of a shard, from READY to its close.
#[derive(Debug, Clone)]
pub struct Span {
    pub shard: u32,
    pub session: String,
    pub ready: Instant,
    pub closed: Option<Instant>,
}

#[derive(Default)]
struct SessionLog {
    shard: u32,
    seq: u64,
    /// Dispatches sent, for RESUME replays: (seq, frame).
    sent: Vec<(u64, String)>,
    /// The connection now carrying it, if any. A session without one is
    /// resumable (its dispatches are kept for a RESUME) unless invalid.
    live: Option<u64>,
    /// Ended for good: invalidated with op 9, or closed with 1000/1001.
    invalid: bool,
}

#[derive(Default)]
struct World {
    identifies: Vec<Identify>,
    posts: Vec<Post>,
    nonces: HashMap<String, u64>,
    requests: Vec<(Instant, String)>,
    spans: Vec<Span>,
    sessions: HashMap<String, SessionLog>,
    /// Connection id → a way to send it frames.
    connections: HashMap<u64, mpsc::UnboundedSender<Outgoing>>,
    /// Connection id → (shard, session) once identified or resumed.
    bound: HashMap<u64, String>,
    /// Heartbeat ACKs to withhold, per shard.
    drop_acks: HashMap<u32, u32>,
    /// Connections whose ACK was withheld: dead from then on, as a
    /// half-open TCP connection is. What is sent to them is lost on the
    /// wire and only a RESUME gets it back.
    zombies: std::collections::HashSet<u64>,
    resumes: Vec<Resume>,
}

/// A RESUME the bot sent, and how many dispatches it got replayed.
#[derive(Debug, Clone)]
pub struct Resume {
    pub session: String,
    pub seq: u64,
    pub replayed: usize,
}

enum Outgoing {
    Text(String),
    Close(u16, String),
}

/// The fake; stops when dropped.
pub struct FakeDiscord {
    pub api: SocketAddr,
    pub gateway: SocketAddr,
    settings: Arc<Mutex<Settings>>,
    world: Arc<Mutex<World>>,
    next_id: Arc<AtomicU64>,
    started: Instant,
    _runtime: tokio::runtime::Runtime,
}

type Shared = (Arc<Mutex<Settings>>, Arc<Mutex<World>>, Arc<AtomicU64>);

impl FakeDiscord {
    pub fn start(settings: Settings) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let settings = Arc::new(Mutex::new(settings));
        let world = Arc::new(Mutex::new(World::default()));
        let next_id = Arc::new(AtomicU64::new(1_000_000_000_000_000_000));
        let (api_listener, gateway_listener) = runtime.block_on(async {
            (
                tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind"),
                tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind"),
            )
        });
        let api = api_listener.local_addr().expect("addr");
        let gateway = gateway_listener.local_addr().expect("addr");
        let shared: Shared = (settings.clone(), world.clone(), next_id.clone());
        let app = Router::new()
            .route("/api/v10/gateway", get(gateway_url))
            .route("/api/v10/gateway/bot", get(gateway_bot))
            .route("/api/v10/channels/{channel}/messages", post(create_message))
            .with_state((shared.clone(), gateway));
        runtime.spawn(async move {
            let _ = axum::serve(api_listener, app).await;
        });
        runtime.spawn(accept_gateway(gateway_listener, shared, gateway));
        Self {
            api,
            gateway,
            settings,
            world,
            next_id,
            started: Instant::now(),
            _runtime: runtime,
        }
    }

    /// `api_base` for the bot's config.
    pub fn api_base(&self) -> String {
        format!("http://{}", self.api)
    }

    pub fn settings(&self, change: impl FnOnce(&mut Settings)) {
        change(&mut self.settings.lock().unwrap());
    }

    pub fn identifies(&self) -> Vec<Identify> {
        self.world.lock().unwrap().identifies.clone()
    }

    pub fn posts(&self) -> Vec<Post> {
        self.world.lock().unwrap().posts.clone()
    }

    /// Every REST request: (when, "METHOD path").
    pub fn requests(&self) -> Vec<(Instant, String)> {
        self.world.lock().unwrap().requests.clone()
    }

    pub fn spans(&self) -> Vec<Span> {
        self.world.lock().unwrap().spans.clone()
    }

    /// RESUMEs received: (session, seq).
    pub fn resumes(&self) -> Vec<Resume> {
        self.world.lock().unwrap().resumes.clone()
    }

    pub fn since_start(&self, at: Instant) -> Duration {
        at.duration_since(self.started)
    }

    /// The shards with a live session now.
    pub fn live_shards(&self) -> BTreeMap<u32, usize> {
        let world = self.world.lock().unwrap();
        let mut live = BTreeMap::new();
        for log in world.sessions.values().filter(|l| l.live.is_some()) {
            *live.entry(log.shard).or_insert(0) += 1;
        }
        live
    }

    /// A fresh snowflake id.
    pub fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A guild whose events go to `shard` of `total`.
    pub fn guild_on(&self, shard: u32, total: u32) -> u64 {
        let total = u64::from(total.max(1));
        let time = fastrand::u64(1..1 << 40);
        let time = time - time % total + u64::from(shard);
        time << 22 | fastrand::u64(0..1 << 22)
    }

    /// Sends MESSAGE_CREATE to every live session of `shard`; returns the
    /// message id, or `None` when no session of the shard is live.
    pub fn inject_message(
        &self,
        shard: u32,
        guild: Option<u64>,
        channel: u64,
        content: &str,
        mention_bot: bool,
    ) -> Option<u64> {
        let id = self.id();
        let author = json!({"id": (id / 7).to_string(), "username": "someone", "discriminator": "0",
                            "avatar": null, "bot": false});
        let mentions = if mention_bot {
            vec![
                json!({"id": BOT_USER_ID.to_string(), "username": "bot", "discriminator": "0",
                        "avatar": null, "bot": true}),
            ]
        } else {
            vec![]
        };
        let mut d = json!({
            "id": id.to_string(), "channel_id": channel.to_string(), "author": author,
            "content": content, "timestamp": "2026-11-30T05:00:00.000000+00:00",
            "edited_timestamp": null, "tts": false, "mention_everyone": false,
            "mentions": mentions, "mention_roles": [], "attachments": [], "embeds": [],
            "pinned": false, "type": 0,
        });
        if let Some(guild) = guild {
            d["guild_id"] = json!(guild.to_string());
        }
        (self.dispatch(shard, "MESSAGE_CREATE", d) > 0).then_some(id)
    }

    /// Sends a dispatch to every live session of `shard` and keeps it for
    /// the resumable ones (as Discord does, for a RESUME); how many
    /// sessions got or will get it. A session nobody resumes loses what
    /// it kept, as on Discord.
    pub fn dispatch(&self, shard: u32, event: &str, d: Value) -> usize {
        let mut world = self.world.lock().unwrap();
        let World {
            sessions,
            connections,
            zombies,
            ..
        } = &mut *world;
        let mut sent = 0;
        for log in sessions
            .values_mut()
            .filter(|l| l.shard == shard && !l.invalid)
        {
            log.seq += 1;
            let frame = json!({"op": 0, "t": event, "s": log.seq, "d": d}).to_string();
            log.sent.push((log.seq, frame.clone()));
            let tx = log
                .live
                .filter(|c| !zombies.contains(c))
                .and_then(|c| connections.get(&c));
            match tx {
                Some(tx) if tx.send(Outgoing::Text(frame)).is_ok() => sent += 1,
                Some(_) => {}
                // Kept for a RESUME of a session dropped moments ago, or
                // lost on a dead connection.
                None => sent += 1,
            }
        }
        sent
    }

    /// Sends `op` (7 RECONNECT, or 9 INVALID_SESSION with `d`) to the
    /// live sessions of `shard`. Op 9 with `d = false` ends the sessions
    /// there and then: what comes next goes to the bot's new session.
    pub fn send_op(&self, shard: u32, op: u8, d: Value) {
        self.each_live(shard, |tx| {
            let _ = tx.send(Outgoing::Text(json!({"op": op, "d": d}).to_string()));
        });
        if op == 9 && d == json!(false) {
            let mut world = self.world.lock().unwrap();
            let now = Instant::now();
            let World {
                sessions, spans, ..
            } = &mut *world;
            for (id, log) in sessions.iter_mut().filter(|(_, l)| l.shard == shard) {
                log.invalid = true;
                log.live = None;
                for span in spans
                    .iter_mut()
                    .filter(|s| &s.session == id && s.closed.is_none())
                {
                    span.closed = Some(now);
                }
            }
        }
    }

    /// Closes the live connections of `shard` with `code`.
    pub fn close(&self, shard: u32, code: u16) {
        self.each_live(shard, |tx| {
            let _ = tx.send(Outgoing::Close(code, "closed by the test".into()));
        });
    }

    /// Withholds the next `n` heartbeat ACKs of `shard`.
    pub fn drop_acks(&self, shard: u32, n: u32) {
        self.world.lock().unwrap().drop_acks.insert(shard, n);
    }

    fn each_live(&self, shard: u32, f: impl Fn(&mpsc::UnboundedSender<Outgoing>)) {
        let world = self.world.lock().unwrap();
        for log in world.sessions.values().filter(|l| l.shard == shard) {
            if let Some(tx) = log.live.and_then(|c| world.connections.get(&c)) {
                f(tx);
            }
        }
    }

    /// Times since first READY during which `shard` had no live session,
    /// from `from` to now.
    pub fn uncovered(&self, shard: u32, from: Instant) -> Duration {
        let now = Instant::now();
        let mut spans: Vec<(Instant, Instant)> = self
            .spans()
            .into_iter()
            .filter(|s| s.shard == shard)
            .map(|s| (s.ready.max(from), s.closed.unwrap_or(now).max(from)))
            .collect();
        spans.sort();
        let mut gap = Duration::ZERO;
        let mut covered_to = from;
        for (start, end) in spans {
            if start > covered_to {
                gap += start - covered_to;
            }
            covered_to = covered_to.max(end);
        }
        gap + now.saturating_duration_since(covered_to)
    }
}

fn authorized(settings: &Settings, headers: &HeaderMap) -> bool {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    token == format!("Bot {}", settings.token)
}

fn record(world: &Mutex<World>, what: String) {
    world.lock().unwrap().requests.push((Instant::now(), what));
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn gateway_url(State(((_, world, _), gateway)): State<(Shared, SocketAddr)>) -> Response {
    record(&world, "GET /gateway".into());
    json_response(StatusCode::OK, json!({"url": format!("ws://{gateway}")}))
}

async fn gateway_bot(
    State(((settings, world, _), gateway)): State<(Shared, SocketAddr)>,
    headers: HeaderMap,
) -> Response {
    record(&world, "GET /gateway/bot".into());
    let s = settings.lock().unwrap().clone();
    if !authorized(&s, &headers) {
        return json_response(
            StatusCode::UNAUTHORIZED,
            json!({"message": "401: Unauthorized", "code": 0}),
        );
    }
    json_response(
        StatusCode::OK,
        json!({"url": format!("ws://{gateway}"), "shards": s.shards,
               "session_start_limit": {"total": 1000, "remaining": s.remaining,
               "reset_after": 14_400_000, "max_concurrency": s.max_concurrency}}),
    )
}

async fn create_message(
    State(((settings, world, ids), _)): State<(Shared, SocketAddr)>,
    Path(channel): Path<u64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    record(&world, format!("POST /channels/{channel}/messages"));
    let s = settings.lock().unwrap().clone();
    if !authorized(&s, &headers) {
        return json_response(
            StatusCode::UNAUTHORIZED,
            json!({"message": "401: Unauthorized", "code": 0}),
        );
    }
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"message": "Cannot send an empty message", "code": 50006}),
        );
    };
    if fastrand::f64() < s.post_429 {
        let global = fastrand::f64() < s.post_429_global;
        let retry = 0.05 + fastrand::f64() * 0.2;
        let mut response = json_response(
            StatusCode::TOO_MANY_REQUESTS,
            json!({"message": "You are being rate limited.", "retry_after": retry,
                   "global": global}),
        );
        let h = response.headers_mut();
        h.insert("retry-after", "1".parse().unwrap());
        h.insert(
            "x-ratelimit-scope",
            if global { "global" } else { "user" }.parse().unwrap(),
        );
        if global {
            h.insert("x-ratelimit-global", "true".parse().unwrap());
        }
        return response;
    }
    let content = body["content"].as_str().unwrap_or("").to_owned();
    let nonce = match &body["nonce"] {
        Value::String(n) => Some(n.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    if nonce.as_ref().is_some_and(|n| n.len() > 25) {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"message": "Invalid Form Body", "code": 50035,
                   "errors": {"nonce": "Must be 25 or fewer in length."}}),
        );
    }
    let enforce = body["enforce_nonce"].as_bool().unwrap_or(false);
    let reply_to = body["message_reference"]["message_id"]
        .as_str()
        .and_then(|m| m.parse().ok());
    let mut w = world.lock().unwrap();
    let earlier = nonce
        .as_ref()
        .filter(|_| enforce)
        .and_then(|n| w.nonces.get(n).copied());
    let id = earlier.unwrap_or_else(|| ids.fetch_add(1, Ordering::Relaxed));
    if earlier.is_none()
        && let Some(n) = nonce.clone().filter(|_| enforce)
    {
        w.nonces.insert(n, id);
    }
    w.posts.push(Post {
        at: Instant::now(),
        channel,
        reply_to,
        content: content.clone(),
        nonce,
        repeat: earlier.is_some(),
    });
    drop(w);
    let mut response = json_response(
        StatusCode::OK,
        json!({"id": id.to_string(), "channel_id": channel.to_string(), "content": content}),
    );
    let h = response.headers_mut();
    h.insert(
        "x-ratelimit-bucket",
        format!("msg-{channel}").parse().unwrap(),
    );
    h.insert(
        "x-ratelimit-limit",
        s.bucket_size.to_string().parse().unwrap(),
    );
    h.insert(
        "x-ratelimit-remaining",
        (s.bucket_size - 1).to_string().parse().unwrap(),
    );
    h.insert("x-ratelimit-reset-after", "0.010".parse().unwrap());
    response
}

async fn accept_gateway(listener: tokio::net::TcpListener, shared: Shared, me: SocketAddr) {
    let mut next = 0u64;
    while let Ok((stream, _)) = listener.accept().await {
        next += 1;
        tokio::spawn(connection(stream, shared.clone(), next, me));
    }
}

async fn connection(stream: tokio::net::TcpStream, shared: Shared, id: u64, me: SocketAddr) {
    let (settings, world, _) = shared;
    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel();
    world.lock().unwrap().connections.insert(id, tx.clone());
    let interval = settings.lock().unwrap().heartbeat_interval_ms;
    let hello = json!({"op": 10, "d": {"heartbeat_interval": interval}}).to_string();
    let _ = tx.send(Outgoing::Text(hello));
    let writer = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            let frame = match out {
                Outgoing::Text(text) => Frame::Text(text),
                Outgoing::Close(code, reason) => {
                    let _ = sink
                        .send(Frame::Close(Some(CloseFrame {
                            code: CloseCode::from(code),
                            reason: reason.into(),
                        })))
                        .await;
                    break;
                }
            };
            if sink.send(frame).await.is_err() {
                break;
            }
        }
        let _ = sink.close().await;
    });
    // Closing with 1000 or 1001 ends the session; anything else (or no
    // close at all) leaves it resumable.
    let mut ended = false;
    while let Some(Ok(frame)) = source.next().await {
        let Frame::Text(text) = frame else {
            if let Frame::Close(close) = frame {
                ended = close.is_some_and(|c| matches!(u16::from(c.code), 1000 | 1001));
                break;
            }
            continue;
        };
        let Ok(payload) = serde_json::from_str::<Value>(&text) else {
            let _ = tx.send(Outgoing::Close(4002, "decode error".into()));
            break;
        };
        let s = settings.lock().unwrap().clone();
        match payload["op"].as_u64() {
            Some(1) => {
                let mut w = world.lock().unwrap();
                let shard = w
                    .bound
                    .get(&id)
                    .and_then(|s| w.sessions.get(s))
                    .map(|l| l.shard);
                let withheld = shard.and_then(|shard| w.drop_acks.get_mut(&shard));
                match withheld {
                    Some(n) if *n > 0 => {
                        *n -= 1;
                        w.zombies.insert(id);
                    }
                    _ => {
                        let _ = tx.send(Outgoing::Text(json!({"op": 11}).to_string()));
                    }
                }
            }
            Some(2) => identify(&s, &world, &tx, id, &payload["d"], me),
            Some(6) => resume(&s, &world, &tx, id, &payload["d"]),
            _ => {}
        }
    }
    writer.abort();
    let mut w = world.lock().unwrap();
    w.connections.remove(&id);
    w.zombies.remove(&id);
    if let Some(session) = w.bound.remove(&id) {
        if let Some(log) = w.sessions.get_mut(&session)
            && log.live == Some(id)
        {
            log.live = None;
            log.invalid |= ended;
        }
        let now = Instant::now();
        for span in w
            .spans
            .iter_mut()
            .filter(|s| s.session == session && s.closed.is_none())
        {
            span.closed = Some(now);
        }
    }
}

fn token_ok(s: &Settings, token: &str) -> bool {
    token == s.token || token == format!("Bot {}", s.token)
}

fn identify(
    s: &Settings,
    world: &Mutex<World>,
    tx: &mpsc::UnboundedSender<Outgoing>,
    id: u64,
    d: &Value,
    me: SocketAddr,
) {
    if !token_ok(s, d["token"].as_str().unwrap_or("")) {
        let _ = tx.send(Outgoing::Close(4004, "Authentication failed.".into()));
        return;
    }
    let intents = d["intents"].as_u64().unwrap_or(0);
    if intents & MESSAGE_CONTENT != 0 && !s.message_content_granted {
        let _ = tx.send(Outgoing::Close(4014, "Disallowed intent(s).".into()));
        return;
    }
    let shard = d["shard"][0].as_u64().unwrap_or(0) as u32;
    let total = d["shard"][1].as_u64().unwrap_or(1) as u32;
    if total != s.shards || shard >= total {
        let _ = tx.send(Outgoing::Close(4010, "Invalid shard.".into()));
        return;
    }
    let bucket = shard % s.max_concurrency.max(1);
    let now = Instant::now();
    let mut w = world.lock().unwrap();
    let too_soon = w
        .identifies
        .iter()
        .any(|i| i.bucket == bucket && !i.too_soon && now.duration_since(i.at) < IDENTIFY_SPACING);
    let session = format!("session-{id}-{}", fastrand::u64(..));
    w.identifies.push(Identify {
        at: now,
        shard,
        total,
        bucket,
        session: session.clone(),
        too_soon,
    });
    if too_soon {
        let _ = tx.send(Outgoing::Text(json!({"op": 9, "d": false}).to_string()));
        return;
    }
    let guilds: Vec<Value> = (0..u64::from(s.guilds_per_shard))
        .map(|n| {
            // (id >> 22) % total == shard: the guild belongs here.
            let id = ((n * u64::from(total) + u64::from(shard)) << 22) | 1;
            json!({"id": id.to_string(), "unavailable": true})
        })
        .collect();
    let ready = json!({
        "v": 10,
        "user": {"id": BOT_USER_ID.to_string(), "username": "bot", "discriminator": "0",
                 "avatar": null, "bot": true, "verified": true, "mfa_enabled": false},
        "guilds": guilds,
        "session_id": session,
        "resume_gateway_url": format!("ws://{me}"),
        "shard": [shard, total],
        "application": {"id": "900000000000000002", "flags": 0},
    });
    let frame = json!({"op": 0, "t": "READY", "s": 1, "d": ready}).to_string();
    w.sessions.insert(
        session.clone(),
        SessionLog {
            shard,
            seq: 1,
            sent: vec![(1, frame.clone())],
            live: Some(id),
            invalid: false,
        },
    );
    w.bound.insert(id, session.clone());
    w.spans.push(Span {
        shard,
        session,
        ready: now,
        closed: None,
    });
    let _ = tx.send(Outgoing::Text(frame));
}

fn resume(
    s: &Settings,
    world: &Mutex<World>,
    tx: &mpsc::UnboundedSender<Outgoing>,
    id: u64,
    d: &Value,
) {
    let session = d["session_id"].as_str().unwrap_or("").to_owned();
    let seq = d["seq"].as_u64().unwrap_or(0);
    let mut w = world.lock().unwrap();
    let mut record = Resume {
        session: session.clone(),
        seq,
        replayed: 0,
    };
    if !token_ok(s, d["token"].as_str().unwrap_or("")) {
        w.resumes.push(record);
        let _ = tx.send(Outgoing::Close(4004, "Authentication failed.".into()));
        return;
    }
    let Some(log) = w.sessions.get_mut(&session).filter(|l| !l.invalid) else {
        w.resumes.push(record);
        let _ = tx.send(Outgoing::Text(json!({"op": 9, "d": false}).to_string()));
        return;
    };
    for (_, frame) in log.sent.iter().filter(|(n, _)| *n > seq) {
        record.replayed += 1;
        let _ = tx.send(Outgoing::Text(frame.clone()));
    }
    log.seq += 1;
    let resumed = json!({"op": 0, "t": "RESUMED", "s": log.seq, "d": {}}).to_string();
    log.sent.push((log.seq, resumed.clone()));
    log.live = Some(id);
    let shard = log.shard;
    w.bound.insert(id, session.clone());
    w.spans.push(Span {
        shard,
        session,
        ready: Instant::now(),
        closed: None,
    });
    let _ = tx.send(Outgoing::Text(resumed));
    w.resumes.push(record);
}
