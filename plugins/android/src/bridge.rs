//! The `demi.android.v1.Bridge` service: one stream per device, its
//! messages in and its answers out.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use demi_proto::android::v1 as pb;
use pb::client_frame::Frame as In;
use pb::server_frame::Frame as Out;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::devices::token_hash;
use crate::notify::News;
use crate::relay::Relay;
use crate::store::{Accept, Acked, Pending, Row, now_ms};
use crate::streams::Live;

/// Answers read from the outbox at a time.
const BATCH: usize = 64;
/// Frames queued for one stream: with the h2 window, what a slow reader
/// can hold in this process's memory. The rest waits in the outbox.
const QUEUE: usize = 16;
/// How long a device has to send its hello.
const HELLO_WITHIN: Duration = Duration::from_secs(10);
const MAX_MESSAGE_ID: usize = 128;

/// The service; clones share one [`Shared`].
pub struct Bridge(pub Arc<Shared>);

pub struct Shared {
    pub relay: Arc<Relay>,
    pub max_pending: u32,
    pub stall_timeout: Duration,
    pub health: crate::Health,
}

type Frames = Pin<Box<dyn Stream<Item = Result<pb::ServerFrame, Status>> + Send>>;

#[tonic::async_trait]
impl pb::bridge_server::Bridge for Bridge {
    type ConnectStream = Frames;

    async fn connect(
        &self,
        request: Request<Streaming<pb::ClientFrame>>,
    ) -> Result<Response<Frames>, Status> {
        let shared = &self.0;
        let device = shared.authenticate(&request)?;
        let relay = &shared.relay;
        let generation = relay
            .store
            .connected(&device, relay.notifier.me())
            .map_err(|e| shared.health.store_failed(&e))?;
        let live = relay.streams.open(&device, generation);
        relay
            .notifier
            .tell_others(&News::Took(device.clone(), generation))
            .await;
        let (tx, rx) = mpsc::channel(QUEUE);
        let session = Session {
            bridge: shared.clone(),
            device,
            live,
            tx,
        };
        relay.tasks.spawn(session.run(request.into_inner()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl Shared {
    /// The device the call's `authorization: Bearer TOKEN` belongs to.
    fn authenticate<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("no device token (authorization: Bearer TOKEN)")
            })?;
        match self.relay.store.device_of(&token_hash(token)) {
            Ok(Some(device)) => Ok(device),
            Ok(None) => Err(Status::unauthenticated(
                "this device token is unknown or revoked",
            )),
            Err(error) => Err(self.health.store_failed(&error)),
        }
    }
}

/// One device's stream on this replica.
struct Session {
    bridge: Arc<Shared>,
    device: String,
    live: Live,
    tx: mpsc::Sender<Result<pb::ServerFrame, Status>>,
}

impl Session {
    async fn run(self, mut inbound: Streaming<pb::ClientFrame>) {
        let relay = &self.bridge.relay;
        let ended = match self.hello(&mut inbound).await {
            Err(status) => Some(status),
            Ok(since) => {
                let writer = self.write(since);
                let reader = self.read(&mut inbound);
                tokio::select! {
                    status = writer => status,
                    status = reader => status,
                    () = self.live.end.cancelled() => self.live.why(),
                    () = relay.stop.cancelled() => Some(Status::unavailable(
                        "the bridge is restarting; connect again",
                    )),
                }
            }
        };
        if let Some(status) = ended.or_else(|| self.live.why()) {
            tracing::debug!(device = self.device, code = ?status.code(), message = status.message(),
                "ending a stream");
            let _ = tokio::time::timeout(Duration::from_secs(1), self.tx.send(Err(status))).await;
        }
        relay.streams.close(&self.device, self.live.generation);
        if let Err(error) = relay.store.disconnected(&self.device, self.live.generation) {
            tracing::warn!(%error, device = self.device, "cannot note a stream's end");
        }
    }

    /// The `since` of the device's hello.
    async fn hello(&self, inbound: &mut Streaming<pb::ClientFrame>) -> Result<u64, Status> {
        let first = tokio::select! {
            () = self.live.end.cancelled() => return Err(self.live.why().unwrap_or_else(|| Status::aborted("ended"))),
            first = tokio::time::timeout(HELLO_WITHIN, inbound.message()) => first,
        };
        match first {
            Err(_) => Err(Status::deadline_exceeded(
                "no hello within 10 s of connecting",
            )),
            Ok(Ok(Some(pb::ClientFrame {
                frame: Some(In::Hello(hello)),
            }))) => {
                tracing::debug!(
                    device = self.device,
                    app = hello.app_version,
                    since = hello.since,
                    "device connected"
                );
                Ok(hello.since)
            }
            Ok(Ok(_)) => Err(Status::invalid_argument(
                "the first frame of a stream must be a hello",
            )),
            Ok(Err(status)) => Err(frame_error(status)),
        }
    }

    /// Sends what waits in the outbox after `since`, then `queue_empty`,
    /// then answers as they are stored. Ends (with a status) only when the
    /// device stops reading or the store fails for good.
    async fn write(&self, since: u64) -> Option<Status> {
        let relay = &self.bridge.relay;
        let mut cursor = i64::try_from(since).unwrap_or(i64::MAX);
        let mut drained = false;
        loop {
            let rows = match relay.store.after(&self.device, cursor, BATCH) {
                Ok(rows) => {
                    self.bridge.health.store_works();
                    rows
                }
                Err(error) => {
                    self.bridge.health.store_failed(&error);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let more = rows.len() == BATCH;
            for row in rows {
                cursor = row.id;
                if let Err(status) = self.send(message(row)).await {
                    return Some(status);
                }
            }
            if more {
                continue;
            }
            if !drained {
                drained = true;
                if let Err(status) = self.send(Out::QueueEmpty(pb::QueueEmpty {})).await {
                    return Some(status);
                }
            }
            tokio::select! {
                () = self.live.wake.notified() => {}
                () = self.tx.closed() => return None,
            }
        }
    }

    /// Takes the device's frames until it closes its side.
    async fn read(&self, inbound: &mut Streaming<pb::ClientFrame>) -> Option<Status> {
        loop {
            let frame = match inbound.message().await {
                Ok(Some(frame)) => frame,
                // The device has nothing more to say; answers still go
                // to it until it hangs up.
                Ok(None) => {
                    self.tx.closed().await;
                    return None;
                }
                Err(_) if self.tx.is_closed() => return None,
                Err(status) => return Some(frame_error(status)),
            };
            let reply: Vec<Out> = match frame.frame {
                Some(In::Message(message)) => self.message(message).await.into_iter().collect(),
                Some(In::Ack(ack)) => self.ack(&ack.server_ids),
                Some(In::Register(register)) => {
                    self.register(&register.fcm_token).into_iter().collect()
                }
                Some(In::Hello(_)) => vec![error(
                    Code::InvalidArgument,
                    "hello is the first frame only",
                    "",
                    0,
                )],
                None => vec![error(
                    Code::Unimplemented,
                    "a frame this bridge does not know (from a newer app?) was skipped",
                    "",
                    0,
                )],
            };
            for out in reply {
                if let Err(status) = self.send(out).await {
                    return Some(status);
                }
            }
        }
    }

    async fn message(&self, message: pb::ClientMessage) -> Option<Out> {
        let id = message.id;
        if id.is_empty() || id.len() > MAX_MESSAGE_ID {
            return Some(error(
                Code::InvalidArgument,
                "a message id is 1 to 128 bytes",
                &id.chars().take(MAX_MESSAGE_ID).collect::<String>(),
                0,
            ));
        }
        let relay = &self.bridge.relay;
        let accepted = relay.store.accept(
            &self.device,
            &id,
            &message.body,
            relay.notifier.me(),
            self.bridge.max_pending,
        );
        match accepted {
            Ok(Accept::Taken) => {
                self.bridge.health.store_works();
                relay.answer_later(Pending {
                    device: self.device.clone(),
                    client_id: id.clone(),
                    body: message.body,
                    since_ms: now_ms(),
                });
            }
            Ok(Accept::Pending | Accept::Answered) => {}
            Ok(Accept::Full) => {
                return Some(error(
                    Code::ResourceExhausted,
                    &format!(
                        "{} messages of this device are being answered; send this one again later",
                        self.bridge.max_pending
                    ),
                    &id,
                    0,
                ));
            }
            Err(e) => {
                self.bridge.health.store_failed(&e);
                return Some(error(
                    Code::Unavailable,
                    "the message could not be stored; send it again",
                    &id,
                    0,
                ));
            }
        }
        Some(Out::Accepted(pb::Accepted {
            client_message_id: id,
        }))
    }

    fn ack(&self, ids: &[u64]) -> Vec<Out> {
        match self.bridge.relay.store.ack(&self.device, ids) {
            Ok(found) => ids
                .iter()
                .zip(found)
                .filter(|(_, f)| *f == Acked::NotYours)
                .map(|(&id, _)| {
                    error(
                        Code::PermissionDenied,
                        "this answer is not this device's",
                        "",
                        id,
                    )
                })
                .collect(),
            Err(e) => {
                self.bridge.health.store_failed(&e);
                vec![error(
                    Code::Unavailable,
                    "the ack could not be stored; send it again",
                    "",
                    0,
                )]
            }
        }
    }

    fn register(&self, fcm_token: &str) -> Option<Out> {
        if fcm_token.len() > 4096 {
            return Some(error(
                Code::InvalidArgument,
                "an FCM registration token is at most 4096 bytes",
                "",
                0,
            ));
        }
        match self.bridge.relay.store.register(&self.device, fcm_token) {
            Ok(()) => None,
            Err(e) => {
                self.bridge.health.store_failed(&e);
                Some(error(
                    Code::Unavailable,
                    "the registration could not be stored; send it again",
                    "",
                    0,
                ))
            }
        }
    }

    /// Queues `frame`; a device that has not read for the stall timeout
    /// loses its stream (its answers wait in the outbox).
    async fn send(&self, frame: Out) -> Result<(), Status> {
        let frame = pb::ServerFrame { frame: Some(frame) };
        match tokio::time::timeout(self.bridge.stall_timeout, self.tx.send(Ok(frame))).await {
            Ok(Ok(())) => Ok(()),
            // The device hung up.
            Ok(Err(_)) => Err(Status::cancelled("the device hung up")),
            Err(_) => {
                tracing::warn!(
                    device = self.device,
                    "the device reads nothing; ending its stream"
                );
                Err(Status::resource_exhausted(format!(
                    "the device read nothing for {}; its answers wait for its next stream",
                    humantime::format_duration(self.bridge.stall_timeout)
                )))
            }
        }
    }
}

fn message(row: Row) -> Out {
    Out::Message(pb::ServerMessage {
        id: row.id as u64,
        reply_to: row.reply_to,
        body: row.body,
        failure: row.failure,
        created_unix_ms: row.created_ms,
    })
}

fn error(code: Code, message: &str, client_message_id: &str, server_id: u64) -> Out {
    Out::Error(pb::Error {
        code: code as i32,
        message: message.to_owned(),
        client_message_id: client_message_id.to_owned(),
        server_id,
    })
}

/// A frame that could not be read, as the status that ends the stream.
fn frame_error(status: Status) -> Status {
    match status.code() {
        Code::Internal | Code::Unknown if status.message().contains("decode") => {
            Status::invalid_argument(format!(
                "a frame is not a ClientFrame: {}",
                status.message()
            ))
        }
        _ => status,
    }
}
