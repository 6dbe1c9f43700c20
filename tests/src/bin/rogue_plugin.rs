//! `rogue_plugin MODE`: a plugin that breaks the protocol, spoken by hand
//! over HTTP/2 (no gRPC library would let it), for
//! `tests/tests/rogue_plugins.rs`. It binds the socket the handshake names
//! and answers Describe and Shutdown properly; then, by MODE:
//!
//! - `silent`: accepts connections and never says a byte;
//! - `garbage-health`: answers health checks with random bytes as a gRPC
//!   message;
//! - `endless-health`: answers health checks with data that never ends;
//! - `huge-headers`: answers health checks with 4 MiB of headers;
//! - `garbage-answers`, `duplicate-answers`, `wrong-tags`,
//!   `endless-answers`: passes its health checks, and on HandleStream
//!   answers each delivery with random bytes; twice; with a tag never
//!   delivered; or with a stream of answers to deliveries never made,
//!   without end;
//! - `oversized-answers`: passes its health checks, answers a job's first
//!   delivery with 5 MiB (more than a conductor reads in one message) and
//!   a later one with its payload, and never answers a job of kind `hang`.

use std::path::Path;
use std::time::Duration;

use bytes::{BufMut as _, Bytes, BytesMut};
use demi_e2e::grpc::pb;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use prost::Message as _;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Silent,
    GarbageHealth,
    EndlessHealth,
    HugeHeaders,
    GarbageAnswers,
    DuplicateAnswers,
    WrongTags,
    EndlessAnswers,
    OversizedAnswers,
}

fn mode(name: &str) -> Option<Mode> {
    Some(match name {
        "silent" => Mode::Silent,
        "garbage-health" => Mode::GarbageHealth,
        "endless-health" => Mode::EndlessHealth,
        "huge-headers" => Mode::HugeHeaders,
        "garbage-answers" => Mode::GarbageAnswers,
        "duplicate-answers" => Mode::DuplicateAnswers,
        "wrong-tags" => Mode::WrongTags,
        "endless-answers" => Mode::EndlessAnswers,
        "oversized-answers" => Mode::OversizedAnswers,
        _ => return None,
    })
}

/// One uncompressed gRPC message frame.
fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

fn garbage() -> Bytes {
    let bytes: Vec<u8> = (0..fastrand::usize(1..512))
        .map(|_| fastrand::u8(..))
        .collect();
    frame(&bytes)
}

fn ok_head() -> http::Response<()> {
    http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(())
        .unwrap_or_default()
}

fn ok_trailers() -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    trailers
}

/// Sends `data` as flow control allows; false once the peer is gone.
async fn send(stream: &mut SendStream<Bytes>, mut data: Bytes) -> bool {
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(0)) => {}
            Some(Ok(room)) => {
                let chunk = data.split_to(room.min(data.len()));
                if stream.send_data(chunk, false).is_err() {
                    return false;
                }
            }
            Some(Err(_)) | None => return false,
        }
    }
    true
}

/// A unary answer: `message`, then status OK.
async fn unary(mut respond: SendResponse<Bytes>, message: Bytes) {
    let Ok(mut stream) = respond.send_response(ok_head(), false) else {
        return;
    };
    if send(&mut stream, message).await {
        let _ = stream.send_trailers(ok_trailers());
    }
}

/// The gRPC messages of a request body, one at a time.
struct Messages {
    body: RecvStream,
    buffer: BytesMut,
}

impl Messages {
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if self.buffer.len() >= 5 {
                let length = u32::from_be_bytes([
                    self.buffer[1],
                    self.buffer[2],
                    self.buffer[3],
                    self.buffer[4],
                ]) as usize;
                if self.buffer.len() >= 5 + length {
                    let mut message = self.buffer.split_to(5 + length);
                    return Some(message.split_off(5).freeze());
                }
            }
            let chunk = self.body.data().await?.ok()?;
            let _ = self.body.flow_control().release_capacity(chunk.len());
            self.buffer.extend_from_slice(&chunk);
        }
    }
}

async fn health(mode: Mode, mut respond: SendResponse<Bytes>) {
    match mode {
        Mode::GarbageHealth => unary(respond, garbage()).await,
        Mode::EndlessHealth => {
            let Ok(mut stream) = respond.send_response(ok_head(), false) else {
                return;
            };
            let chunk = Bytes::from(vec![0u8; 16 * 1024]);
            while send(&mut stream, chunk.clone()).await {}
        }
        Mode::HugeHeaders => {
            let value = "x".repeat(64 * 1024);
            let mut head = ok_head();
            for i in 0..64 {
                if let (Ok(name), Ok(value)) = (
                    http::HeaderName::from_bytes(format!("x-huge-{i}").as_bytes()),
                    http::HeaderValue::from_str(&value),
                ) {
                    head.headers_mut().insert(name, value);
                }
            }
            if let Ok(mut stream) = respond.send_response(head, false) {
                let serving = tonic_health::pb::HealthCheckResponse { status: 1 };
                if send(&mut stream, frame(&serving.encode_to_vec())).await {
                    let _ = stream.send_trailers(ok_trailers());
                }
            }
        }
        _ => {
            let serving = tonic_health::pb::HealthCheckResponse { status: 1 };
            unary(respond, frame(&serving.encode_to_vec())).await;
        }
    }
}

async fn handle_stream(mode: Mode, body: RecvStream, mut respond: SendResponse<Bytes>) {
    let Ok(mut stream) = respond.send_response(ok_head(), false) else {
        return;
    };
    let mut deliveries = Messages {
        body,
        buffer: BytesMut::new(),
    };
    if mode == Mode::EndlessAnswers {
        // Answers to deliveries that were never made, as fast as they go.
        loop {
            let answer = pb::Answer {
                tag: fastrand::u64(1_000_000..),
                result: Some(pb::JobResult {
                    job_id: "never-delivered".into(),
                    payload: vec![0; 256],
                    ..Default::default()
                }),
            };
            if !send(&mut stream, frame(&answer.encode_to_vec())).await {
                return;
            }
        }
    }
    while let Some(message) = deliveries.next().await {
        let Ok(delivery) = pb::Delivery::decode(message) else {
            return;
        };
        let Some(pb::delivery::Body::Job(job)) = delivery.body else {
            continue;
        };
        let answer = |tag| pb::Answer {
            tag,
            result: Some(pb::JobResult {
                job_id: job.id.clone(),
                outcome: pb::job_result::Outcome::Ok as i32,
                payload: job.payload.clone(),
                ..Default::default()
            }),
        };
        let out = match mode {
            Mode::OversizedAnswers if job.kind == "hang" => continue,
            Mode::OversizedAnswers if job.attempt == 1 => {
                let mut answer = answer(delivery.tag);
                if let Some(result) = answer.result.as_mut() {
                    result.payload = vec![b'x'; 5 << 20];
                }
                vec![frame(&answer.encode_to_vec())]
            }
            Mode::OversizedAnswers => vec![frame(&answer(delivery.tag).encode_to_vec())],
            Mode::GarbageAnswers => vec![garbage()],
            Mode::WrongTags => vec![frame(&answer(delivery.tag + 1_000_000).encode_to_vec())],
            _ => vec![
                frame(&answer(delivery.tag).encode_to_vec()),
                frame(&answer(delivery.tag).encode_to_vec()),
            ],
        };
        for data in out {
            if !send(&mut stream, data).await {
                return;
            }
        }
    }
}

async fn serve(stream: tokio::net::UnixStream, mode: Mode, name: String, version: u32) {
    if mode == Mode::Silent {
        // Holds the connection open and says nothing.
        let _held = stream;
        return std::future::pending().await;
    }
    let Ok(mut connection) = h2::server::handshake(stream).await else {
        return;
    };
    while let Some(Ok((request, mut respond))) = connection.accept().await {
        let path = request.uri().path().to_owned();
        let body = request.into_body();
        let name = name.clone();
        tokio::spawn(async move {
            match path.as_str() {
                "/grpc.health.v1.Health/Check" => health(mode, respond).await,
                "/demi.plugin.v1.Plugin/Describe" => {
                    let described = pb::DescribeResponse {
                        name,
                        version: "0.0.0-rogue".into(),
                        protocol_version: version,
                        capabilities: Vec::new(),
                    };
                    unary(respond, frame(&described.encode_to_vec())).await;
                }
                "/demi.plugin.v1.Plugin/Shutdown" => {
                    unary(respond, frame(&[])).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    std::process::exit(0);
                }
                "/demi.plugin.v1.Plugin/HandleStream" => handle_stream(mode, body, respond).await,
                _ => {
                    let mut head = ok_head();
                    head.headers_mut()
                        .insert("grpc-status", http::HeaderValue::from_static("12"));
                    let _ = respond.send_response(head, true);
                }
            }
        });
    }
}

fn main() -> std::process::ExitCode {
    let Some(mode) = std::env::args().nth(1).as_deref().and_then(mode) else {
        eprintln!("usage: rogue_plugin MODE (see the source)");
        return std::process::ExitCode::from(demi_plugin_sdk::EXIT_CONFIG);
    };
    let handshake = match demi_plugin_sdk::Handshake::from_env() {
        Ok(handshake) => handshake,
        Err(error) => {
            eprintln!("rogue_plugin: {error}");
            return std::process::ExitCode::from(demi_plugin_sdk::EXIT_CONFIG);
        }
    };
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return std::process::ExitCode::FAILURE;
    };
    runtime.block_on(async move {
        let socket: &Path = &handshake.socket;
        let _ = std::fs::remove_file(socket);
        let Ok(listener) = tokio::net::UnixListener::bind(socket) else {
            return std::process::ExitCode::FAILURE;
        };
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(serve(
                stream,
                mode,
                handshake.name.clone(),
                handshake.protocol_version,
            ));
        }
    })
}
