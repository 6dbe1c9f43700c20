//! A phone running the companion app, as far as the Android bridge can
//! tell: a TLS gRPC client of `demi.android.v1.Bridge` with its own token.

use std::time::Duration;

use demi_proto::android::v1 as pb;
use pb::bridge_client::BridgeClient;
pub use pb::client_frame::Frame as In;
pub use pb::server_frame::Frame as Out;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Status, Streaming};

/// A certificate authority made for one test, a server's certificate
/// for `localhost` and 127.0.0.1 signed by it, and a client's (for mutual
/// TLS).
pub struct TestCa {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

impl TestCa {
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).expect("CA certificate");
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("params")
            .signed_by(&key, &ca, &ca_key)
            .expect("certificate");
        let client_key = KeyPair::generate().expect("client key");
        let mut client = CertificateParams::new(vec!["operator".to_owned()]).expect("params");
        client.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client = client
            .signed_by(&client_key, &ca, &ca_key)
            .expect("client certificate");
        Self {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            client_cert_pem: client.pem(),
            client_key_pem: client_key.serialize_pem(),
        }
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

/// How a phone reaches the bridge.
#[derive(Clone)]
pub struct Phone {
    pub port: u16,
    pub token: String,
    /// The CA to check the bridge against; None speaks plaintext.
    pub ca: Option<String>,
}

impl Phone {
    pub async fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        let endpoint = match &self.ca {
            Some(ca) => Endpoint::from_shared(format!("https://localhost:{}", self.port))?
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(ca))
                        .domain_name("localhost"),
                )?,
            None => Endpoint::from_shared(format!("http://127.0.0.1:{}", self.port))?,
        };
        endpoint
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
    }

    /// Opens the stream and says hello.
    pub async fn connect(&self, since: u64) -> Result<Link, Status> {
        let channel = self
            .channel()
            .await
            .map_err(|e| Status::unavailable(format!("connect: {e}")))?;
        self.connect_on(channel, Some(since)).await
    }

    /// Opens the stream on `channel`; says hello when `since` is given.
    pub async fn connect_on(&self, channel: Channel, since: Option<u64>) -> Result<Link, Status> {
        let (tx, rx) = mpsc::channel(1024);
        if let Some(since) = since {
            let hello = In::Hello(pb::Hello {
                since,
                app_version: "sim".into(),
            });
            tx.send(pb::ClientFrame { frame: Some(hello) })
                .await
                .map_err(|_| Status::internal("closed"))?;
        }
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        if !self.token.is_empty() {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {}", self.token)
                    .parse()
                    .map_err(|_| Status::internal("token"))?,
            );
        }
        let inbound = BridgeClient::new(channel)
            .max_decoding_message_size(16 << 20)
            .connect(request)
            .await?
            .into_inner();
        Ok(Link { tx, inbound })
    }
}

/// One open stream.
pub struct Link {
    pub tx: mpsc::Sender<pb::ClientFrame>,
    pub inbound: Streaming<pb::ServerFrame>,
}

impl Link {
    pub async fn send(&self, frame: In) {
        let _ = self.tx.send(pb::ClientFrame { frame: Some(frame) }).await;
    }

    pub async fn message(&self, id: &str, body: &[u8]) {
        self.send(In::Message(pb::ClientMessage {
            id: id.into(),
            body: body.to_vec(),
        }))
        .await;
    }

    pub async fn ack(&self, ids: &[u64]) {
        self.send(In::Ack(pb::Ack {
            server_ids: ids.to_vec(),
        }))
        .await;
    }

    /// The next frame within `within`: Ok(None) when the stream ended
    /// cleanly, Err with the status it ended with.
    pub async fn next(&mut self, within: Duration) -> Result<Option<Out>, Status> {
        match tokio::time::timeout(within, self.inbound.message()).await {
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no frame within {within:?}"
            ))),
            Ok(Ok(Some(frame))) => Ok(frame.frame),
            Ok(Ok(None)) => Ok(None),
            Ok(Err(status)) => Err(status),
        }
    }

    /// Frames until `stop` says so (it sees each), failing on an end.
    pub async fn until(
        &mut self,
        within: Duration,
        mut stop: impl FnMut(&Out) -> bool,
    ) -> Vec<Out> {
        let mut seen = Vec::new();
        loop {
            match self.next(within).await {
                Ok(Some(frame)) => {
                    let done = stop(&frame);
                    seen.push(frame);
                    if done {
                        return seen;
                    }
                }
                other => {
                    let kinds: Vec<String> = seen.iter().map(summary).collect();
                    panic!("the stream ended after {kinds:?}: {other:?}")
                }
            }
        }
    }
}

/// A frame without its body, for messages.
pub fn summary(frame: &Out) -> String {
    match frame {
        Out::Message(m) => format!(
            "message {} to {} ({} bytes) {}",
            m.id,
            m.reply_to,
            m.body.len(),
            m.failure
        ),
        other => format!("{other:?}"),
    }
}

impl Phone {
    /// Sends `frames` as they are (each one gRPC message): what the bridge
    /// sent back until the stream ended, and the status it ended with (or
    /// Ok when it was still open after `within`).
    pub async fn raw(
        &self,
        frames: Vec<Vec<u8>>,
        within: Duration,
    ) -> (Vec<pb::ServerFrame>, Result<(), Status>) {
        let mut seen = Vec::new();
        let status = self.raw_into(frames, within, &mut seen).await;
        (seen, status)
    }

    async fn raw_into(
        &self,
        frames: Vec<Vec<u8>>,
        within: Duration,
        seen: &mut Vec<pb::ServerFrame>,
    ) -> Result<(), Status> {
        let channel = self
            .channel()
            .await
            .map_err(|e| Status::unavailable(format!("connect: {e}")))?;
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        // Kept open after the frames, as an app that says nothing more.
        let frames =
            tokio_stream::StreamExt::chain(tokio_stream::iter(frames), tokio_stream::pending());
        let mut request = tonic::Request::new(frames);
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", self.token)
                .parse()
                .map_err(|_| Status::internal("token"))?,
        );
        let path = http::uri::PathAndQuery::from_static("/demi.android.v1.Bridge/Connect");
        let mut inbound = grpc
            .streaming(request, path, crate::grpc::Raw)
            .await?
            .into_inner();
        let until = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(until, inbound.message()).await {
                Err(_) => return Ok(()),
                Ok(Ok(Some(bytes))) => seen.push(
                    prost::Message::decode(bytes.as_slice())
                        .map_err(|e| Status::internal(format!("the bridge sent garbage: {e}")))?,
                ),
                Ok(Ok(None)) => return Err(Status::ok("ended without a status")),
                Ok(Err(status)) => return Err(status),
            }
        }
    }
}
