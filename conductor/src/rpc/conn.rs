//! One HTTP/2 connection to an instance's Unix socket, as the service tonic
//! clients call, straight on the `h2` crate.
//!
//! tonic's `Channel` puts a buffer task and a queue in front of every
//! connection so that it can reconnect and be shared, and hyper's HTTP/2
//! client a channel of its own between the caller and the connection task
//! (allocated in 32-slot blocks of ~8.5 KiB, two per connection once 32
//! calls have gone through). An instance's connection needs neither: the
//! runner makes a new one after a restart, and it carries one health check
//! at a time. At a thousand instances those queues were ~44 KiB each, and
//! every call hopped through another task.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{BufMut as _, Bytes, BytesMut};
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http_body::{Body, Frame};
use tokio::net::UnixStream;
use tokio::task::AbortHandle;

/// Largest header block taken from an instance.
const MAX_HEADER_LIST: u32 = 64 * 1024;
/// Largest health answer: the real one is a few bytes, and a plugin
/// answering without end must not fill the conductor's memory until the
/// check times out.
const MAX_HEALTH_ANSWER: usize = 64 * 1024;

/// A connection; clones share it. When the last clone goes, so does the
/// task driving it.
#[derive(Clone)]
pub struct Connection {
    send: SendRequest<Bytes>,
    _driver: Arc<Driver>,
}

struct Driver(AbortHandle);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP/2 handshake failed: {0}")]
    Handshake(#[from] h2::Error),
}

pub async fn connect(socket: &Path) -> Result<Connection, ConnectError> {
    let stream = UnixStream::connect(socket).await?;
    let (send, connection) = h2::client::Builder::new()
        // No HPACK dynamic table for the instance's answers: every answer
        // carries a `date` that changes each second, so each one would be
        // a new entry until both ends held 4 KiB of dead dates (4 MiB of
        // the conductor's memory at a thousand instances). Literal headers
        // cost a few bytes more on a local socket.
        .header_table_size(0)
        // gRPC answers carry a few short headers; a plugin sending
        // megabytes of them gets its stream refused, not decoded.
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake::<_, Bytes>(stream)
        .await?;
    let driver = tokio::spawn(async move {
        // Ends when the instance closes the socket or every clone is gone.
        let _ = connection.await;
    });
    Ok(Connection {
        send,
        _driver: Arc::new(Driver(driver.abort_handle())),
    })
}

impl Connection {
    /// `grpc.health.v1.Health/Check` for `service`; returns the serving
    /// status. Written out rather than through tonic's client: it runs a
    /// thousand times a second at a thousand instances, and tonic's codec
    /// buffers (8 KiB each way), metadata map and body pump per call were
    /// most of its cost.
    pub async fn check_health(
        &self,
        service: &str,
        traceparent: http::HeaderValue,
    ) -> Result<i32, tonic::Status> {
        use prost::Message as _;
        let message = tonic_health::pb::HealthCheckRequest {
            service: service.to_owned(),
        };
        let length = message.encoded_len();
        let mut body = BytesMut::with_capacity(5 + length);
        // The gRPC frame: not compressed, then the length.
        body.put_u8(0);
        body.put_u32(length as u32);
        message
            .encode(&mut body)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let mut request = http::Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = http::Uri::from_static("http://localhost/grpc.health.v1.Health/Check");
        let headers = request.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        headers.insert(demi_proto::trace::TRACEPARENT, traceparent);

        let mut send = self.send.clone().ready().await.map_err(unavailable)?;
        let (answer, mut stream) = send.send_request(request, false).map_err(unavailable)?;
        // Far below the initial flow-control window: sent at once.
        stream.send_data(body.freeze(), true).map_err(unavailable)?;
        let (head, mut recv) = answer.await.map_err(unavailable)?.into_parts();
        if head.status != http::StatusCode::OK {
            return Err(tonic::Status::unknown(format!(
                "HTTP status {} instead of 200",
                head.status
            )));
        }
        // A failure without a message comes as headers only.
        grpc_status(&head.headers)?;
        let mut data = BytesMut::new();
        while let Some(chunk) = recv.data().await {
            let chunk = chunk.map_err(unavailable)?;
            let _ = recv.flow_control().release_capacity(chunk.len());
            if data.len() + chunk.len() > MAX_HEALTH_ANSWER {
                return Err(tonic::Status::internal(format!(
                    "a health answer of more than {MAX_HEALTH_ANSWER} bytes"
                )));
            }
            data.extend_from_slice(&chunk);
        }
        if let Some(trailers) = recv.trailers().await.map_err(unavailable)? {
            grpc_status(&trailers)?;
        }
        let answer = match (data.first(), data.get(1..5), data.get(5..)) {
            (Some(0), Some(length), Some(rest))
                if u32::from_be_bytes([length[0], length[1], length[2], length[3]]) as usize
                    == rest.len() =>
            {
                tonic_health::pb::HealthCheckResponse::decode(rest)
                    .map_err(|e| tonic::Status::internal(format!("malformed answer: {e}")))?
            }
            _ => {
                return Err(tonic::Status::internal(format!(
                    "not one uncompressed gRPC message ({} bytes)",
                    data.len()
                )));
            }
        };
        Ok(answer.status)
    }
}

fn unavailable(error: h2::Error) -> tonic::Status {
    tonic::Status::unavailable(error.to_string())
}

/// `Err` for a `grpc-status` other than 0 in `headers`, with its
/// (percent-encoded) `grpc-message`.
fn grpc_status(headers: &http::HeaderMap) -> Result<(), tonic::Status> {
    let Some(code) = headers.get("grpc-status") else {
        return Ok(());
    };
    let code = tonic::Code::from_bytes(code.as_bytes());
    if code == tonic::Code::Ok {
        return Ok(());
    }
    let message = headers
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    Err(tonic::Status::new(code, message))
}

pub(super) fn percent_decode(text: &[u8]) -> String {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let hex = text
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (text[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends a request's body, then its end or its trailers.
type Pump = Pin<Box<dyn Future<Output = ()> + Send>>;

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<Stripped<Incoming>>, h2::Error>> + Send>>;

impl tower::Service<http::Request<tonic::body::Body>> for Connection {
    type Response = http::Response<Stripped<Incoming>>;
    type Error = h2::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let (mut head, body) = request.into_parts();
        // tonic hands over a path; HTTP/2 wants a scheme and an authority,
        // and a Unix socket has no host name ("localhost", as grpcurl).
        let path = head
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        if let Ok(uri) = http::Uri::builder()
            .scheme("http")
            .authority("localhost")
            .path_and_query(path)
            .build()
        {
            head.uri = uri;
        }
        let send = self.send.clone();
        Box::pin(async move {
            let mut send = send.ready().await?;
            let empty = body.is_end_stream();
            let (mut response, stream) =
                send.send_request(http::Request::from_parts(head, ()), empty)?;
            let mut pump: Option<Pump> = (!empty).then(|| Box::pin(pump(body, stream)) as Pump);
            // A streaming request goes on being sent after the answer's
            // headers arrive: the pump moves into the answer's body.
            let answer = std::future::poll_fn(|cx| {
                if let Some(sending) = pump.as_mut()
                    && sending.as_mut().poll(cx).is_ready()
                {
                    pump = None;
                }
                Pin::new(&mut response).poll(cx)
            })
            .await?;
            let (head, recv) = answer.into_parts();
            Ok(stripped(http::Response::from_parts(
                head,
                Incoming {
                    recv,
                    pump,
                    data_done: false,
                    trailers_done: false,
                },
            )))
        })
    }
}

async fn pump(mut body: tonic::body::Body, mut stream: SendStream<Bytes>) {
    loop {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        let frame = match frame {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(_)) => {
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Some(Ok(frame)) => frame,
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                }
                return;
            }
        };
        // Flow control: send only what the peer has room for.
        while !data.is_empty() {
            stream.reserve_capacity(data.len());
            match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(0)) => {}
                Some(Ok(room)) => {
                    let chunk = data.split_to(room.min(data.len()));
                    let last = data.is_empty() && body.is_end_stream();
                    if stream.send_data(chunk, last).is_err() || last {
                        return;
                    }
                }
                // Reset or closed by the peer: nothing more to send.
                Some(Err(_)) | None => return,
            }
        }
    }
}

/// An answer's body: its data, then its trailers (where gRPC puts the
/// status). Polling it also keeps a streaming request's body going.
pub struct Incoming {
    recv: RecvStream,
    pump: Option<Pump>,
    data_done: bool,
    trailers_done: bool,
}

impl Body for Incoming {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if let Some(sending) = this.pump.as_mut()
            && sending.as_mut().poll(cx).is_ready()
        {
            this.pump = None;
        }
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Read, so the peer may send as much again.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => this.data_done = true,
            }
        }
        if this.trailers_done {
            return Poll::Ready(None);
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.trailers_done = true;
        match trailers {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(error) => Poll::Ready(Some(Err(error))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.trailers_done || (self.data_done && self.recv.is_end_stream())
    }
}

/// tonic panics on a `grpc-status-details-bin` that is not base64 (an
/// `expect` in `Status::from_header_map`), so a plugin could crash the task
/// calling it. The conductor never reads rich error details: they are
/// dropped from every answer's headers and trailers before tonic sees them.
const DETAILS: &str = "grpc-status-details-bin";

/// A plugin's answer body without `grpc-status-details-bin` in its trailers.
pub struct Stripped<B>(B);

/// The answer with `grpc-status-details-bin` dropped (see [`DETAILS`]).
pub fn stripped<B>(answer: http::Response<B>) -> http::Response<Stripped<B>> {
    let (mut head, body) = answer.into_parts();
    head.headers.remove(DETAILS);
    http::Response::from_parts(head, Stripped(body))
}

impl<B: Body<Data = Bytes> + Unpin> Body for Stripped<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Poll::Ready(match ready!(Pin::new(&mut self.0).poll_frame(cx)) {
            Some(Ok(frame)) => Some(Ok(match frame.into_trailers() {
                Ok(mut trailers) => {
                    trailers.remove(DETAILS);
                    Frame::trailers(trailers)
                }
                Err(frame) => frame,
            })),
            other => other,
        })
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

/// A tonic channel whose answers pass through [`stripped`].
pub type SafeChannel = tower::util::MapResponse<
    tonic::transport::Channel,
    fn(http::Response<tonic::body::Body>) -> http::Response<Stripped<tonic::body::Body>>,
>;

pub fn safe(channel: tonic::transport::Channel) -> SafeChannel {
    tower::util::MapResponse::new(channel, stripped)
}
