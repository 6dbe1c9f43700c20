//! One HTTP/2 connection to an instance's Unix socket, as the service tonic
//! clients call.
//!
//! tonic's `Channel` puts a buffer task and a queue in front of every
//! connection so that it can reconnect and be shared; an instance's
//! connection needs neither (the runner makes a new one after a restart).
//! At a thousand instances those queues held ~27 KiB each, and every call
//! hopped through the buffer task.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixStream;
use tokio::task::AbortHandle;

/// A connection; clones share it. When the last clone goes, so does the
/// task driving it.
#[derive(Clone)]
pub struct Connection {
    send: http2::SendRequest<tonic::body::Body>,
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
    Handshake(#[from] hyper::Error),
}

pub async fn connect(socket: &Path) -> Result<Connection, ConnectError> {
    let stream = UnixStream::connect(socket).await?;
    let (send, connection) = http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
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

type ResponseFuture = Pin<
    Box<dyn Future<Output = Result<http::Response<hyper::body::Incoming>, hyper::Error>> + Send>,
>;

impl tower::Service<http::Request<tonic::body::Body>> for Connection {
    type Response = http::Response<hyper::body::Incoming>;
    type Error = hyper::Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        // tonic hands over a path; HTTP/2 wants a scheme and an authority,
        // and a Unix socket has no host name ("localhost", as grpcurl).
        let path = request
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        if let Ok(uri) = http::Uri::builder()
            .scheme("http")
            .authority("localhost")
            .path_and_query(path)
            .build()
        {
            *request.uri_mut() = uri;
        }
        Box::pin(self.send.send_request(request))
    }
}
