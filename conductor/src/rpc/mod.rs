//! The conductor's side of the plugin contract: readiness, health checks,
//! `Describe` and `Shutdown` over the instance's Unix socket.

mod conn;

pub use conn::{SafeChannel, safe};

use std::path::Path;
use std::time::Duration;

use demi_proto::plugin::v1 as pb;
use demi_proto::trace::{TRACEPARENT, TraceParent};
use pb::plugin_client::PluginClient;
use tonic_health::pb::health_check_response::ServingStatus;

/// Protocol versions this conductor speaks, offered to every plugin.
pub const ACCEPTED_PROTOCOLS: &[u32] = &[demi_proto::PROTOCOL_VERSION];

/// Readiness is probed every millisecond for this long: most plugins bind
/// within it, and a refused connect to a missing socket costs one system
/// call. Doubling from the start would notice a plugin ready at 9 ms only
/// at 15 ms, which is restart latency operators measure.
const FAST_PROBING: Duration = Duration::from_millis(25);

/// A plugin that accepted but does not finish the HTTP/2 handshake in
/// this long is tried again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// After that the interval doubles up to this, so a slow starter costs few
/// wake-ups.
const MAX_PROBE_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("status {0:?}")]
    NotServing(ServingStatus),
    #[error("{}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
}

/// A connected instance.
#[derive(Clone)]
pub struct PluginConnection {
    channel: conn::Connection,
}

impl PluginConnection {
    /// Connects to `socket` and waits until its health `Check("")` answers
    /// SERVING. Retries forever with a growing interval: the caller bounds
    /// it with the instance's startup timeout.
    pub async fn await_serving(socket: &Path) -> Self {
        let mut pause = Duration::from_millis(1);
        let started = std::time::Instant::now();
        loop {
            if let Ok(Ok(channel)) =
                tokio::time::timeout(CONNECT_TIMEOUT, conn::connect(socket)).await
            {
                let connection = Self { channel };
                if connection
                    .check("", pause.max(MAX_PROBE_INTERVAL))
                    .await
                    .is_ok()
                {
                    return connection;
                }
            }
            tokio::time::sleep(pause).await;
            if started.elapsed() >= FAST_PROBING {
                pause = (pause * 2).min(MAX_PROBE_INTERVAL);
            }
        }
    }

    /// Connects to `socket` once, without waiting for readiness.
    pub async fn connect(socket: &Path) -> Result<Self, tonic::Status> {
        match tokio::time::timeout(CONNECT_TIMEOUT, conn::connect(socket)).await {
            Ok(Ok(channel)) => Ok(Self { channel }),
            Ok(Err(error)) => Err(tonic::Status::unavailable(format!(
                "cannot connect to {}: {error}",
                socket.display()
            ))),
            Err(_) => Err(tonic::Status::unavailable(format!(
                "cannot connect to {} in time",
                socket.display()
            ))),
        }
    }

    /// Tells the instance its new membership; UNIMPLEMENTED from a plugin
    /// without the call.
    pub async fn membership_changed(
        &self,
        membership: pb::Membership,
        timeout: Duration,
    ) -> Result<(), tonic::Status> {
        let mut client = PluginClient::new(self.channel.clone());
        let mut request = traced(membership);
        request.set_timeout(timeout);
        tokio::time::timeout(timeout, client.membership_changed(request))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("MembershipChanged timed out"))?
            .map(|_| ())
    }

    /// One `grpc.health.v1.Health/Check` for `service`.
    pub async fn check(&self, service: &str, timeout: Duration) -> Result<(), HealthError> {
        let check = self
            .channel
            .check_health(service, traceparent(TraceParent::new(random)));
        let status = tokio::time::timeout(timeout, check)
            .await
            .map_err(|_| HealthError::Timeout(timeout))??;
        match ServingStatus::try_from(status) {
            Ok(ServingStatus::Serving) => Ok(()),
            Ok(other) => Err(HealthError::NotServing(other)),
            Err(_) => Err(HealthError::NotServing(ServingStatus::Unknown)),
        }
    }

    pub async fn describe(&self, timeout: Duration) -> Result<pb::DescribeResponse, tonic::Status> {
        let mut client = PluginClient::new(self.channel.clone());
        let mut request = traced(pb::DescribeRequest {});
        request.set_timeout(timeout);
        tokio::time::timeout(timeout, client.describe(request))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("Describe timed out"))?
            .map(tonic::Response::into_inner)
    }

    /// One `Handle` call, bounded by `timeout`.
    pub async fn handle(
        &self,
        job: pb::Job,
        timeout: Duration,
    ) -> Result<pb::JobResult, tonic::Status> {
        let mut client = PluginClient::new(self.channel.clone());
        let mut request = traced(job);
        request.set_timeout(timeout);
        tokio::time::timeout(timeout + Duration::from_millis(500), client.handle(request))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("Handle timed out"))?
            .map(tonic::Response::into_inner)
    }

    /// Opens a `HandleStream`, delivers `job` as `tag`, and returns the
    /// first answer, all within `timeout`.
    pub async fn handle_on_stream(
        &self,
        tag: u64,
        job: pb::Job,
        timeout: Duration,
    ) -> Result<pb::Answer, tonic::Status> {
        let mut client = PluginClient::new(self.channel.clone());
        let (deliveries, outgoing) = tokio::sync::mpsc::unbounded_channel();
        // Sent before the answer's headers are awaited (some servers send
        // them only with the first answer), and the sender kept until the
        // answer: a closed request stream tells the plugin nobody waits.
        let _ = deliveries.send(pb::Delivery {
            tag,
            body: Some(pb::delivery::Body::Job(job)),
            traceparent: TraceParent::new(random).to_string(),
        });
        let call = async {
            let mut answers = client
                .handle_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(
                    outgoing,
                ))
                .await?
                .into_inner();
            answers
                .message()
                .await?
                .ok_or_else(|| tonic::Status::unavailable("the stream ended without an answer"))
        };
        let answer = tokio::time::timeout(timeout, call)
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("HandleStream gave no answer in time"))?;
        drop(deliveries);
        answer
    }

    /// Asks the instance to drain and leave within `grace`.
    pub async fn shutdown(&self, grace: Duration, timeout: Duration) -> Result<(), tonic::Status> {
        let mut client = PluginClient::new(self.channel.clone());
        let request = traced(pb::ShutdownRequest {
            grace: prost_types::Duration::try_from(grace).ok(),
        });
        tokio::time::timeout(timeout, client.shutdown(request))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("Shutdown timed out"))?
            .map(|_| ())
    }
}

/// A request carrying a new W3C `traceparent`, so whatever the plugin logs
/// or traces for this call joins a trace the conductor started.
pub fn traced<T>(message: T) -> tonic::Request<T> {
    with_trace(message, TraceParent::new(random))
}

/// A request carrying `trace` (a job's trace, kept across its attempts).
pub fn with_trace<T>(message: T, trace: TraceParent) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(mut value) = trace
        .to_string()
        .parse::<tonic::metadata::AsciiMetadataValue>()
    {
        // Never indexed, as in `traceparent`.
        value.set_sensitive(true);
        request.metadata_mut().insert(TRACEPARENT, value);
    }
    request
}

/// `trace` as a `traceparent` header value.
fn traceparent(trace: TraceParent) -> http::HeaderValue {
    // Always valid: the W3C form is lowercase hex and dashes.
    let mut value = http::HeaderValue::from_str(&trace.to_string())
        .unwrap_or_else(|_| http::HeaderValue::from_static(""));
    // Never indexed by HPACK: every value is new, so indexing only fills
    // both ends' header tables (4 KiB per connection) with dead entries.
    value.set_sensitive(true);
    value
}

fn random() -> u64 {
    fastrand::u64(..)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::wrappers::UnixListenerStream;

    /// A real tonic health server on a Unix socket: "" SERVING, "down"
    /// NOT_SERVING, anything else unknown to it.
    async fn health_server(dir: &Path) -> std::path::PathBuf {
        let socket = dir.join("health.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("down", tonic_health::ServingStatus::NotServing)
            .await;
        tokio::spawn(async move {
            // The reporter must live as long as the server.
            let _reporter = reporter;
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(UnixListenerStream::new(listener))
                .await
        });
        socket
    }

    #[tokio::test]
    async fn health_checks_read_serving_not_serving_and_errors_with_their_message() {
        let dir = tempfile::tempdir().unwrap();
        let socket = health_server(dir.path()).await;
        let connection = PluginConnection::await_serving(&socket).await;
        let timeout = Duration::from_secs(5);
        assert!(connection.check("", timeout).await.is_ok());
        match connection.check("down", timeout).await {
            Err(HealthError::NotServing(ServingStatus::NotServing)) => {}
            other => panic!("expected NOT_SERVING, got {other:?}"),
        }
        // An error status, with its percent-encoded message decoded.
        match connection.check("no such service", timeout).await {
            Err(HealthError::Rpc(status)) => {
                assert_eq!(status.code(), tonic::Code::NotFound);
                assert!(!status.message().contains('%'), "{}", status.message());
            }
            other => panic!("expected NOT_FOUND, got {other:?}"),
        }
        // Many in a row on one connection.
        for _ in 0..100 {
            connection.check("", timeout).await.unwrap();
        }
    }

    /// An HTTP/2 server that fails every call with a
    /// `grpc-status-details-bin` that is not base64: in the headers of a
    /// trailers-only answer, or in the trailers.
    async fn rude_server(socket: &Path, trailers_only: bool) {
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut connection) = h2::server::handshake(stream).await else {
                        return;
                    };
                    while let Some(Ok((_, mut respond))) = connection.accept().await {
                        let mut head = http::Response::builder()
                            .status(200)
                            .header("content-type", "application/grpc");
                        if trailers_only {
                            head = head
                                .header("grpc-status", "13")
                                .header("grpc-status-details-bin", "!not base64!");
                        }
                        let Ok(mut send) =
                            respond.send_response(head.body(()).unwrap(), trailers_only)
                        else {
                            continue;
                        };
                        if !trailers_only {
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert("grpc-status", http::HeaderValue::from_static("13"));
                            trailers.insert(
                                "grpc-status-details-bin",
                                http::HeaderValue::from_static("!not base64!"),
                            );
                            let _ = send.send_trailers(trailers);
                        }
                    }
                });
            }
        });
    }

    #[tokio::test]
    async fn malformed_error_details_are_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        for trailers_only in [true, false] {
            let socket = dir.path().join(format!("rude-{trailers_only}.sock"));
            rude_server(&socket, trailers_only).await;
            // The instance connection (Describe, Shutdown) …
            let mut client = PluginClient::new(conn::connect(&socket).await.unwrap());
            let status = client.describe(pb::DescribeRequest {}).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
            // … and the lanes' channel (jobs).
            let endpoint =
                tonic::transport::Endpoint::from_shared(format!("unix://{}", socket.display()))
                    .unwrap();
            let mut client = PluginClient::new(safe(endpoint.connect_lazy()));
            let status = client.describe(pb::DescribeRequest {}).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        }
    }

    #[test]
    fn grpc_messages_are_percent_decoded() {
        assert_eq!(conn::percent_decode(b"a%20b%25c%2"), "a b%c%2");
    }
}
