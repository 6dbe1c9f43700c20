//! How jobs reach one replica: multiplexed on one long-lived
//! `HandleStream` when the plugin serves it, one `Handle` call each when it
//! answers UNIMPLEMENTED. A job on the stream costs a message each way; a
//! call costs headers, a stream set-up and trailers at both ends, which was
//! most of the conductor's CPU per job.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use demi_proto::plugin::v1 as pb;
use demi_proto::trace::TraceParent;
use pb::delivery::Body;
use pb::plugin_client::PluginClient;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Code, Status};

use super::lock;
use crate::rpc::{SafeChannel, with_trace};

pub struct Link {
    client: PluginClient<SafeChannel>,
    route: Mutex<Route>,
    /// Held while a stream is being opened, so concurrent jobs wait for
    /// that one instead of each opening their own.
    opening: tokio::sync::Mutex<()>,
}

enum Route {
    /// No stream yet, or the last one ended: the next job opens one.
    Closed,
    Stream(Arc<Mux>),
    /// The plugin has no `HandleStream`: `Handle` for this instance's life.
    Calls,
}

impl Link {
    pub fn new(client: PluginClient<SafeChannel>) -> Self {
        Self {
            client,
            route: Mutex::new(Route::Closed),
            opening: tokio::sync::Mutex::new(()),
        }
    }

    /// Delivers `job` and waits for its result. Dropping the future
    /// cancels the delivery (the plugin is told on a stream; a call is
    /// reset).
    pub async fn handle(&self, job: pb::Job, trace: TraceParent) -> Result<pb::JobResult, Status> {
        match self.route() {
            Some(Some(mux)) => return mux.call(job, trace).await,
            Some(None) => return self.call(job, trace).await,
            None => {}
        }
        let gate = self.opening.lock().await;
        match self.route() {
            Some(Some(mux)) => {
                drop(gate);
                return mux.call(job, trace).await;
            }
            Some(None) => {
                drop(gate);
                return self.call(job, trace).await;
            }
            None => {}
        }
        // This job opens the stream. Some servers (grpc-go, grpc-python)
        // answer with headers only along with the first answer, so the
        // job goes out before the open is awaited; it is kept for a call
        // in case the plugin has no stream.
        let (mux, deliveries) = Mux::new();
        let mut first = mux.send(job.clone(), trace)?;
        let opened = self
            .client
            .clone()
            .handle_stream(UnboundedReceiverStream::new(deliveries))
            .await;
        match opened {
            Ok(answers) => {
                let mux = Arc::new(mux.reading(answers.into_inner()));
                *lock(&self.route) = Route::Stream(mux.clone());
                drop(gate);
                first.wait(&mux).await
            }
            Err(status) if status.code() == Code::Unimplemented => {
                first.forget();
                *lock(&self.route) = Route::Calls;
                drop(gate);
                self.call(job, trace).await
            }
            Err(status) => {
                first.forget();
                Err(status)
            }
        }
    }

    /// `Some(Some(mux))`: an open stream; `Some(None)`: calls; `None`:
    /// a stream must be opened.
    fn route(&self) -> Option<Option<Arc<Mux>>> {
        match &*lock(&self.route) {
            Route::Stream(mux) if !mux.shared.closed.load(Ordering::Acquire) => {
                Some(Some(mux.clone()))
            }
            Route::Calls => Some(None),
            _ => None,
        }
    }

    async fn call(&self, job: pb::Job, trace: TraceParent) -> Result<pb::JobResult, Status> {
        self.client
            .clone()
            .handle(with_trace(job, trace))
            .await
            .map(tonic::Response::into_inner)
    }
}

type Waiter = oneshot::Sender<Result<pb::JobResult, Status>>;

/// What the stream's reader and its senders share.
#[derive(Default)]
struct Shared {
    waiting: Mutex<HashMap<u64, Waiter>>,
    /// Set (under `waiting`'s lock) once the stream has ended.
    closed: AtomicBool,
    /// Tags handed out so far: an answer to a higher one answers nothing.
    next_tag: AtomicU64,
}

/// One job stream: deliveries go out on `deliveries`; a reader task
/// matches answers to waiters by tag.
struct Mux {
    deliveries: mpsc::UnboundedSender<pb::Delivery>,
    shared: Arc<Shared>,
    /// Aborted with the stream: the reader must not outlive its link.
    reader: Option<tokio::task::AbortHandle>,
}

impl Drop for Mux {
    fn drop(&mut self) {
        if let Some(reader) = &self.reader {
            reader.abort();
        }
    }
}

impl Mux {
    fn new() -> (Self, mpsc::UnboundedReceiver<pb::Delivery>) {
        let (deliveries, rx) = mpsc::unbounded_channel();
        let mux = Self {
            deliveries,
            shared: Arc::default(),
            reader: None,
        };
        (mux, rx)
    }

    /// Starts the reader on the plugin's answers.
    fn reading(mut self, answers: tonic::Streaming<pb::Answer>) -> Self {
        self.reader = Some(tokio::spawn(read(self.shared.clone(), answers)).abort_handle());
        self
    }

    fn send(&self, job: pb::Job, trace: TraceParent) -> Result<Pending, Status> {
        let tag = self.shared.next_tag.fetch_add(1, Ordering::AcqRel);
        let (waiter, answer) = oneshot::channel();
        {
            let mut waiting = lock(&self.shared.waiting);
            if self.shared.closed.load(Ordering::Acquire) {
                return Err(ended());
            }
            waiting.insert(tag, waiter);
        }
        let delivery = pb::Delivery {
            tag,
            body: Some(Body::Job(job)),
            traceparent: trace.to_string(),
        };
        if self.deliveries.send(delivery).is_err() {
            lock(&self.shared.waiting).remove(&tag);
            return Err(ended());
        }
        Ok(Pending {
            tag,
            answer: Some(answer),
        })
    }

    async fn call(&self, job: pb::Job, trace: TraceParent) -> Result<pb::JobResult, Status> {
        self.send(job, trace)?.wait(self).await
    }
}

/// A delivery sent and not yet answered.
struct Pending {
    tag: u64,
    answer: Option<oneshot::Receiver<Result<pb::JobResult, Status>>>,
}

impl Pending {
    async fn wait(&mut self, mux: &Mux) -> Result<pb::JobResult, Status> {
        let Some(answer) = self.answer.as_mut() else {
            return Err(ended());
        };
        // Dropped before the answer (the attempt timed out): the plugin is
        // told to stop working on it.
        let cancel = CancelOnDrop {
            mux,
            tag: self.tag,
            armed: true,
        };
        let result = answer.await.unwrap_or_else(|_| Err(ended()));
        cancel.disarm();
        self.answer = None;
        result
    }

    /// The stream never opened: nobody will answer.
    fn forget(&mut self) {
        self.answer = None;
    }
}

struct CancelOnDrop<'a> {
    mux: &'a Mux,
    tag: u64,
    armed: bool,
}

impl CancelOnDrop<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Only a delivery still waiting is cancelled: one the reader just
        // answered needs nothing.
        if lock(&self.mux.shared.waiting).remove(&self.tag).is_some() {
            let _ = self.mux.deliveries.send(pb::Delivery {
                tag: self.tag,
                body: Some(Body::Cancel(pb::Cancel {})),
                traceparent: String::new(),
            });
        }
    }
}

fn ended() -> Status {
    Status::unavailable("the job stream to this replica has ended")
}

/// Hands each answer to its waiter; when the stream ends, every delivery
/// still waiting fails with why, as a failure to retry: the stream broke,
/// not their jobs. An answer too big to read ends it too, and which
/// delivery it answered is never read: every job on the stream is
/// delivered again, none dead-lettered for another's fault.
///
/// A plugin answers each delivery once at most (late, after a cancel, is
/// fine). Answers to deliveries never made, or more answers nobody waits
/// for than deliveries made, are a plugin gone wrong: reading them would
/// only spend the conductor's CPU, so the stream ends.
async fn read(shared: Arc<Shared>, mut answers: tonic::Streaming<pb::Answer>) {
    let mut unclaimed: u64 = 0;
    let why = loop {
        match answers.message().await {
            Ok(Some(answer)) => {
                let issued = shared.next_tag.load(Ordering::Acquire);
                if answer.tag >= issued {
                    break Status::internal(format!(
                        "the plugin answered delivery {}, which was never made",
                        answer.tag
                    ));
                }
                let waiter = lock(&shared.waiting).remove(&answer.tag);
                match waiter {
                    Some(waiter) => {
                        let _ = waiter.send(answer.result.ok_or_else(|| {
                            Status::internal("the plugin answered without a result")
                        }));
                    }
                    None => {
                        unclaimed += 1;
                        if unclaimed > issued {
                            break Status::internal(format!(
                                "the plugin sent {unclaimed} answers nobody waited for, \
                                 for {issued} deliveries"
                            ));
                        }
                    }
                }
            }
            Ok(None) => break Status::unavailable("the plugin ended its job stream"),
            Err(status) => {
                break Status::unavailable(format!(
                    "the job stream to this replica broke ({:?}): {}",
                    status.code(),
                    status.message()
                ));
            }
        }
    };
    let waiting: Vec<Waiter> = {
        let mut waiting = lock(&shared.waiting);
        shared.closed.store(true, Ordering::Release);
        waiting.drain().map(|(_, waiter)| waiter).collect()
    };
    for waiter in waiting {
        let _ = waiter.send(Err(why.clone()));
    }
}
