//! Connections to the plugin API socket: at most [`PER_PROCESS`] open at
//! once from one process, and an accept loop that pauses when the
//! conductor runs out of file descriptors instead of spinning on the
//! error.
//!
//! The socket is open to every local user (the token decides who may
//! call), so a connection costs the conductor a descriptor, a task and
//! HTTP/2 buffers before anyone is known. A well-behaved plugin needs one
//! (HTTP/2 multiplexes its calls); a looping or hostile one must not take
//! the conductor's descriptors and memory from everyone else. The peer's
//! pid, from `SO_PEERCRED`, is good enough to count by: a plugin that
//! forks to get more is bounded by its cgroup's pids limit.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio_stream::Stream;
use tonic::transport::server::Connected;

/// Connections one process may hold open.
pub const PER_PROCESS: usize = 64;
/// Pause after a failed accept (EMFILE, ENFILE, ENOMEM): a connection
/// waiting in the backlog would fail again at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Open connections by peer pid; entries go with their last connection.
type Open = Arc<Mutex<HashMap<i32, Held>>>;

#[derive(Default)]
struct Held {
    open: usize,
    /// Connections refused since the last warning about this process.
    refused: u64,
}

/// The accepted connections, as tonic's server takes them.
pub struct Limited {
    listener: UnixListener,
    open: Open,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Limited {
    pub fn new(listener: UnixListener) -> Self {
        Self {
            listener,
            open: Arc::default(),
            pause: None,
        }
    }

    /// Counts a connection from `pid`, or refuses it.
    fn admit(&self, pid: i32) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let held = open.entry(pid).or_default();
        if held.open < PER_PROCESS {
            held.open += 1;
            return true;
        }
        // The first refusal, then every 1000th: a loop must not flood the
        // log it is being refused into.
        if held.refused.is_multiple_of(1000) {
            tracing::warn!(
                pid,
                open = held.open,
                refused = held.refused + 1,
                "plugin API: a process holds {PER_PROCESS} connections; refusing more"
            );
        }
        held.refused += 1;
        false
    }
}

impl Stream for Limited {
    type Item = io::Result<Counted>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(pause) = self.pause.as_mut() {
                std::task::ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            let stream = match self.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok((stream, _))) => stream,
                Poll::Ready(Err(error)) => {
                    tracing::warn!(%error, "plugin API: accept failed; pausing");
                    self.pause = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                    continue;
                }
            };
            // Without a pid (never on Linux) there is nothing to count by.
            let Some(pid) = stream.peer_cred().ok().and_then(|c| c.pid()) else {
                return Poll::Ready(Some(Ok(Counted {
                    stream,
                    _slot: None,
                })));
            };
            if self.admit(pid) {
                let slot = Some(Slot {
                    pid,
                    open: self.open.clone(),
                });
                return Poll::Ready(Some(Ok(Counted {
                    stream,
                    _slot: slot,
                })));
            }
            // Refused: dropping it closes it, and the peer sees EOF.
        }
    }
}

/// A connection's place in its process's count, given back on drop.
struct Slot {
    pid: i32,
    open: Open,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(held) = open.get_mut(&self.pid) {
            held.open = held.open.saturating_sub(1);
            if held.open == 0 {
                open.remove(&self.pid);
            }
        }
    }
}

/// An accepted connection that counts against its process while open.
pub struct Counted {
    stream: UnixStream,
    /// Held for its drop.
    _slot: Option<Slot>,
}

impl Connected for Counted {
    type ConnectInfo = <UnixStream as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt as _;

    #[tokio::test]
    async fn a_process_gets_its_share_and_a_closed_connection_frees_a_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let mut incoming = Limited::new(UnixListener::bind(&path).unwrap());
        let mut clients = Vec::new();
        let mut accepted = Vec::new();
        for _ in 0..PER_PROCESS + 3 {
            clients.push(UnixStream::connect(&path).await.unwrap());
        }
        // Every connection is ours (one pid): the first PER_PROCESS are
        // accepted; the rest are closed, which the next accept skips.
        for _ in 0..PER_PROCESS {
            accepted.push(incoming.next().await.unwrap().unwrap());
        }
        let refused = tokio::time::timeout(Duration::from_millis(200), incoming.next()).await;
        assert!(refused.is_err(), "a connection past the share was accepted");
        let mut probe = [0u8; 1];
        let extra = &mut clients[PER_PROCESS];
        let read = tokio::io::AsyncReadExt::read(extra, &mut probe).await;
        assert!(matches!(read, Ok(0)), "refused means closed: {read:?}");

        drop(accepted.pop());
        let _late = UnixStream::connect(&path).await.unwrap();
        let again = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
        assert!(matches!(again, Ok(Some(Ok(_)))), "a place freed is taken");
    }
}
