//! One connection of a shard to Discord's gateway: HELLO, IDENTIFY or
//! RESUME, heartbeats, dispatches, and how it ended.
//!
//! Ours rather than serenity's shard runner, for three things serenity
//! 0.12.5 gets wrong for a bot that must not lose a message: on a missed
//! heartbeat ACK its runner asks the shard manager for a restart, which
//! throws the session away and identifies a new one, so every dispatch
//! sent in between is lost (Discord replays them only on a RESUME); it
//! identifies again on its own after op 9, without asking for a turn under
//! the bot-wide IDENTIFY pacing; and close codes 4010/4011 restart the
//! shard forever instead of stopping with a reason. serenity's models
//! still parse the messages, and its HTTP client does the REST calls.
//!
//! The session (id, sequence, resume address) lives outside one
//! connection, so the next connection resumes it.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use serenity::model::channel::Message;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message as Frame};
use tokio_util::sync::CancellationToken;

/// The gateway version and encoding this client speaks.
const QUERY: &str = "/?v=10&encoding=json";
const CONNECT_WITHIN: Duration = Duration::from_secs(10);
/// Discord sends HELLO as soon as the socket is up.
const HELLO_WITHIN: Duration = Duration::from_secs(10);
/// Closing politely may not hold up a reconnect or a shutdown.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);
/// Any close code but 1000/1001 keeps the session resumable.
const CLOSE_RESUMABLE: u16 = 4000;

/// A session Discord keeps for us: what a RESUME needs, and who the bot
/// is (a RESUME brings no READY to say it again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    /// The last dispatch's sequence number.
    pub seq: u64,
    pub resume_url: String,
    /// The bot's own user id.
    pub user: u64,
}

/// Who connects, and as which shard.
pub struct Identity<'a> {
    pub token: &'a str,
    pub intents: u64,
    pub shard: u32,
    pub total: u32,
}

/// What the connection hands to the shard's owner.
#[derive(Debug)]
pub enum Dispatch {
    /// A new session.
    Ready {
        guilds: usize,
    },
    Resumed,
    Message(Box<Message>),
}

/// How a connection ended, and what comes next.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Closed with 1000 because the shard was stopped.
    Stopped,
    /// A failure no reconnect mends.
    Fatal(String),
    /// Connect again: resuming the session if one is still kept, after a
    /// pause when `backoff` (the connection failed, rather than Discord
    /// asking for a reconnect).
    Reconnect { why: String, backoff: bool },
}

/// What to do when Discord closes the socket with `code`.
#[derive(Debug, PartialEq, Eq)]
pub enum OnClose {
    Resume,
    /// The session is gone: identify a new one.
    Identify,
    Fatal(&'static str),
}

/// Discord's gateway close codes, as its documentation says to treat them.
pub fn on_close(code: u16) -> OnClose {
    match code {
        4004 => {
            OnClose::Fatal("Discord rejected the bot token (close code 4004): check the credential")
        }
        4010 => OnClose::Fatal(
            "Discord rejected the shard numbers (close code 4010): check total_shards",
        ),
        4011 => OnClose::Fatal(
            "Discord requires more shards (close code 4011): raise total_shards or use \"auto\"",
        ),
        4012 => OnClose::Fatal("Discord no longer serves gateway v10 (close code 4012)"),
        4013 => OnClose::Fatal("Discord rejected the gateway intents (close code 4013)"),
        4014 => OnClose::Fatal(
            "a privileged intent is not granted to this bot (close code 4014): enable \
             MESSAGE CONTENT in the developer portal or set message_content = false",
        ),
        // Invalid sequence, session timed out.
        4007 | 4009 => OnClose::Identify,
        _ => OnClose::Resume,
    }
}

/// The shape every gateway payload shares; `d` is parsed only for the
/// few events the bot reads.
#[derive(Deserialize)]
struct Payload<'a> {
    op: u8,
    #[serde(default)]
    s: Option<u64>,
    #[serde(default)]
    t: Option<&'a str>,
    #[serde(borrow, default)]
    d: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Hello {
    heartbeat_interval: u64,
}

#[derive(Deserialize)]
struct Ready {
    session_id: String,
    resume_gateway_url: String,
    user: User,
    guilds: Vec<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct User {
    #[serde(with = "string_id")]
    id: u64,
}

/// Discord sends snowflakes as strings.
mod string_id {
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text: &str = serde::Deserialize::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One connection: resumes `session` when there is one, identifies
/// otherwise (the caller has taken the identify turn), and runs until the
/// connection ends. `session` is kept up to date as dispatches come, and
/// cleared when Discord says it is gone; `on` gets what the bot reads.
pub async fn connect(
    gateway: &str,
    who: &Identity<'_>,
    session: &mut Option<Session>,
    stop: &CancellationToken,
    mut on: impl FnMut(Dispatch, &Session),
) -> Ended {
    let base = session.as_ref().map_or(gateway, |s| s.resume_url.as_str());
    let url = format!("{}{QUERY}", base.trim_end_matches('/'));
    let mut socket = match timeout(CONNECT_WITHIN, tokio_tungstenite::connect_async(&url)).await {
        Ok(Ok((socket, _))) => socket,
        Ok(Err(error)) => return reconnect(format!("cannot connect to {base}: {error}"), true),
        Err(_) => return reconnect(format!("no answer from {base} to a connect"), true),
    };
    let interval = match hello(&mut socket).await {
        Ok(interval) => interval,
        Err(why) => return reconnect(why, true),
    };
    let greeting = match session {
        Some(s) => serde_json::json!({"op": 6, "d": {
            "token": who.token, "session_id": s.id, "seq": s.seq,
        }}),
        None => serde_json::json!({"op": 2, "d": {
            "token": who.token,
            "intents": who.intents,
            "properties": {"os": std::env::consts::OS, "browser": "demi-conductor",
                           "device": "demi-conductor"},
            "shard": [who.shard, who.total],
            "compress": false,
            "large_threshold": 50,
        }}),
    };
    if let Err(error) = send(&mut socket, &greeting).await {
        return reconnect(
            format!("cannot send {}: {error}", greeting_name(session)),
            true,
        );
    }
    // The first beat is at a random point of the interval, as Discord
    // asks, so that a fleet reconnecting together does not beat together.
    let first = interval.mul_f64(fastrand::f64());
    let mut beat = tokio::time::interval_at(Instant::now() + first, interval);
    let mut acked = true;
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                close(&mut socket, CloseCode::Normal, "shard stopped").await;
                return Ended::Stopped;
            }
            _ = beat.tick() => {
                if !acked {
                    // A zombie connection: Discord's rule is to close with
                    // a code that keeps the session, and resume.
                    close(&mut socket, CloseCode::from(CLOSE_RESUMABLE), "heartbeat not acknowledged").await;
                    return reconnect("the last heartbeat was not acknowledged".into(), false);
                }
                acked = false;
                if let Err(error) = heartbeat(&mut socket, session).await {
                    return reconnect(format!("cannot send a heartbeat: {error}"), true);
                }
            }
            frame = socket.next() => {
                let text = match frame {
                    Some(Ok(Frame::Text(text))) => text,
                    Some(Ok(Frame::Close(frame))) => {
                        let code = frame.as_ref().map_or(1005, |f| u16::from(f.code));
                        let reason = frame.map(|f| f.reason.into_owned()).unwrap_or_default();
                        return closed(code, &reason, session);
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => return reconnect(format!("the connection failed: {error}"), true),
                    None => return reconnect("the connection ended".into(), true),
                };
                let payload: Payload = match serde_json::from_str(&text) {
                    Ok(p) => p,
                    Err(error) => {
                        tracing::warn!(shard = who.shard, %error, "unreadable gateway payload; ignored");
                        continue;
                    }
                };
                match payload.op {
                    0 => {
                        if let Some(end) = dispatch(&payload, session, &mut on) {
                            return end;
                        }
                    }
                    1 => {
                        // Discord asks for a beat now.
                        if let Err(error) = heartbeat(&mut socket, session).await {
                            return reconnect(format!("cannot send a heartbeat: {error}"), true);
                        }
                    }
                    7 => {
                        close(&mut socket, CloseCode::from(CLOSE_RESUMABLE), "reconnect asked").await;
                        return reconnect("Discord asked for a reconnect (op 7)".into(), false);
                    }
                    9 => {
                        let resumable = payload.d.is_some_and(|d| d.get() == "true");
                        if !resumable {
                            *session = None;
                        }
                        close(&mut socket, CloseCode::from(CLOSE_RESUMABLE), "session invalidated").await;
                        return reconnect(
                            format!("Discord invalidated the session (op 9, resumable: {resumable})"),
                            !resumable,
                        );
                    }
                    11 => acked = true,
                    _ => {}
                }
            }
        }
    }
}

fn reconnect(why: String, backoff: bool) -> Ended {
    Ended::Reconnect { why, backoff }
}

fn greeting_name(session: &Option<Session>) -> &'static str {
    if session.is_some() {
        "RESUME"
    } else {
        "IDENTIFY"
    }
}

/// Waits for op 10 HELLO; its heartbeat interval.
async fn hello(socket: &mut Socket) -> Result<Duration, String> {
    let deadline = Instant::now() + HELLO_WITHIN;
    loop {
        let frame = tokio::time::timeout_at(deadline, socket.next())
            .await
            .map_err(|_| "no HELLO from the gateway".to_owned())?;
        match frame {
            Some(Ok(Frame::Text(text))) => {
                let payload: Payload = serde_json::from_str(&text)
                    .map_err(|e| format!("unreadable first payload: {e}"))?;
                if payload.op != 10 {
                    return Err(format!("expected HELLO (op 10), got op {}", payload.op));
                }
                let hello: Hello = parse(payload.d)?;
                return Ok(Duration::from_millis(hello.heartbeat_interval.max(1)));
            }
            Some(Ok(Frame::Close(frame))) => {
                return Err(format!("closed before HELLO: {frame:?}"));
            }
            Some(Ok(_)) => continue,
            Some(Err(error)) => return Err(format!("the connection failed: {error}")),
            None => return Err("the connection ended before HELLO".into()),
        }
    }
}

fn parse<'a, T: Deserialize<'a>>(d: Option<&'a RawValue>) -> Result<T, String> {
    let d = d.ok_or("a payload without data")?;
    serde_json::from_str(d.get()).map_err(|e| e.to_string())
}

/// An op 0 dispatch: keeps the sequence, hands on what the bot reads with
/// the session as it now stands.
fn dispatch(
    payload: &Payload,
    session: &mut Option<Session>,
    on: &mut impl FnMut(Dispatch, &Session),
) -> Option<Ended> {
    let seq = payload.s?;
    let handed = match payload.t {
        Some("READY") => match parse::<Ready>(payload.d) {
            Ok(ready) => {
                *session = Some(Session {
                    id: ready.session_id,
                    seq,
                    resume_url: ready.resume_gateway_url,
                    user: ready.user.id,
                });
                Some(Dispatch::Ready {
                    guilds: ready.guilds.len(),
                })
            }
            Err(error) => {
                // Without a session id nothing can be resumed: start over.
                *session = None;
                return Some(reconnect(format!("unreadable READY: {error}"), true));
            }
        },
        Some("RESUMED") => Some(Dispatch::Resumed),
        Some("MESSAGE_CREATE") => match parse::<Message>(payload.d) {
            Ok(message) => Some(Dispatch::Message(Box::new(message))),
            Err(error) => {
                tracing::warn!(seq, %error, "unreadable MESSAGE_CREATE; skipped");
                None
            }
        },
        _ => None,
    };
    let session = session.as_mut()?;
    session.seq = session.seq.max(seq);
    if let Some(handed) = handed {
        on(handed, session);
    }
    None
}

fn closed(code: u16, reason: &str, session: &mut Option<Session>) -> Ended {
    match on_close(code) {
        OnClose::Fatal(why) => Ended::Fatal(why.to_owned()),
        OnClose::Identify => {
            *session = None;
            reconnect(
                format!("Discord closed the session ({code} {reason})"),
                false,
            )
        }
        OnClose::Resume => reconnect(
            format!("Discord closed the connection ({code} {reason})"),
            true,
        ),
    }
}

async fn heartbeat(
    socket: &mut Socket,
    session: &Option<Session>,
) -> Result<(), tungstenite::Error> {
    let seq = session.as_ref().map(|s| s.seq);
    send(socket, &serde_json::json!({"op": 1, "d": seq})).await
}

async fn send(socket: &mut Socket, value: &serde_json::Value) -> Result<(), tungstenite::Error> {
    socket.send(Frame::Text(value.to_string())).await
}

/// Sends a close frame and waits briefly for Discord's, so that a 1000
/// really ends the session there.
async fn close(socket: &mut Socket, code: CloseCode, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.to_owned().into(),
    };
    let _ = timeout(CLOSE_WITHIN, async {
        if socket.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = socket.next().await {}
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_follow_discords_table() {
        for code in [4004, 4010, 4011, 4012, 4013, 4014] {
            assert!(matches!(on_close(code), OnClose::Fatal(_)), "{code}");
        }
        assert_eq!(on_close(4007), OnClose::Identify);
        assert_eq!(on_close(4009), OnClose::Identify);
        for code in [1000, 1001, 1006, 4000, 4001, 4002, 4003, 4005, 4008] {
            assert_eq!(on_close(code), OnClose::Resume, "{code}");
        }
    }

    #[test]
    fn dispatches_keep_the_sequence_and_ready_starts_a_session() {
        let mut session = None;
        let mut seen = Vec::new();
        let ready = r#"{"op":0,"s":1,"t":"READY","d":{"v":10,"session_id":"abc",
            "resume_gateway_url":"wss://resume.example","user":{"id":"42","username":"bot"},
            "guilds":[{"id":"1","unavailable":true},{"id":"2","unavailable":true}],"shard":[0,1]}}"#;
        let payload: Payload = serde_json::from_str(ready).unwrap();
        assert_eq!(
            dispatch(&payload, &mut session, &mut |d, _| seen.push(d)),
            None
        );
        assert_eq!(
            session,
            Some(Session {
                id: "abc".into(),
                seq: 1,
                resume_url: "wss://resume.example".into(),
                user: 42,
            })
        );
        assert!(matches!(seen[0], Dispatch::Ready { guilds: 2 }));
        let other = r#"{"op":0,"s":7,"t":"TYPING_START","d":{}}"#;
        let payload: Payload = serde_json::from_str(other).unwrap();
        dispatch(&payload, &mut session, &mut |d, _| seen.push(d));
        assert_eq!(session.as_ref().map(|s| s.seq), Some(7));
        assert_eq!(
            seen.len(),
            1,
            "events the bot does not read are not handed on"
        );
    }

    #[test]
    fn an_unreadable_ready_starts_over_rather_than_resume_nothing() {
        let mut session = Some(Session {
            id: "old".into(),
            seq: 3,
            resume_url: "wss://x".into(),
            user: 42,
        });
        let payload: Payload =
            serde_json::from_str(r#"{"op":0,"s":1,"t":"READY","d":{"v":10}}"#).unwrap();
        let end = dispatch(&payload, &mut session, &mut |_, _| {});
        assert!(matches!(end, Some(Ended::Reconnect { .. })), "{end:?}");
        assert_eq!(session, None);
    }
}
