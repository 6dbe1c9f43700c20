//! The bridge's health as the conductor reads it: SERVING while its store
//! can be written, NOT_SERVING with the store's error when not.

use demi_plugin_sdk::Health as Reporter;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::store::StoreError;

/// Cheap to call on every store operation: only a change of state wakes
/// the task that reports it.
#[derive(Clone)]
pub struct Health {
    failing: watch::Sender<Option<String>>,
}

impl Health {
    /// The switch, and the task that turns its changes into reports
    /// (SERVING at once: the caller has its listener and store).
    pub fn start(reporter: Reporter, stop: CancellationToken) -> (Self, impl Future<Output = ()>) {
        let (failing, mut changes) = watch::channel(None::<String>);
        let report = async move {
            reporter.serving().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
                let state = changes.borrow_and_update().clone();
                match state {
                    Some(reason) => reporter.not_serving(&reason).await,
                    None => {
                        tracing::info!("the store works again");
                        reporter.serving().await;
                    }
                }
            }
        };
        (Self { failing }, report)
    }

    /// Notes a store failure; the status to answer the call with.
    pub fn store_failed(&self, error: &StoreError) -> Status {
        tracing::error!(%error, "the store failed");
        let reason = format!("the outbox cannot be written: {error}");
        self.failing.send_if_modified(|state| {
            let change = state.is_none();
            if change {
                *state = Some(reason);
            }
            change
        });
        Status::unavailable("the bridge cannot store messages now; try again")
    }

    pub fn store_works(&self) {
        self.failing
            .send_if_modified(|state| state.take().is_some());
    }
}
