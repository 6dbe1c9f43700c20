//! The bulkhead: at most `limit` deliveries of one plugin in flight, so a
//! plugin whose jobs hang holds a bounded share of the conductor. A reload
//! may change the limit while deliveries run: a raised limit lets waiting
//! jobs through at once, a lowered one lets none through until the count
//! is below it. (tokio's `Semaphore` cannot take permits back that are
//! held, which a lowered limit needs.)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

pub struct Bulkhead {
    /// Places taken, by deliveries and by the lane's worker holding one
    /// while it waits for the next job: what the limit bounds.
    taken: AtomicUsize,
    /// Places whose job is being delivered: what the metrics show. The
    /// worker's held place is not a job in flight (an idle lane read 1).
    delivering: AtomicUsize,
    limit: AtomicUsize,
    /// Fires when a delivery ends or the limit changes.
    changed: Notify,
}

/// One delivery's place in the bulkhead, given back on drop.
pub struct Permit {
    bulkhead: Arc<Bulkhead>,
    delivering: bool,
}

impl Permit {
    /// The place now carries a job.
    pub fn deliver(mut self) -> Self {
        if !self.delivering {
            self.delivering = true;
            self.bulkhead.delivering.fetch_add(1, Ordering::AcqRel);
        }
        self
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.delivering {
            self.bulkhead.delivering.fetch_sub(1, Ordering::AcqRel);
        }
        self.bulkhead.taken.fetch_sub(1, Ordering::AcqRel);
        self.bulkhead.changed.notify_waiters();
    }
}

impl Bulkhead {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            taken: AtomicUsize::new(0),
            delivering: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            changed: Notify::new(),
        })
    }

    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Jobs being delivered.
    pub fn delivering(&self) -> usize {
        self.delivering.load(Ordering::Acquire)
    }

    /// Waits for a place under the limit.
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        super::wake::when(&self.changed, || self.try_acquire()).await
    }

    fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let limit = self.limit.load(Ordering::Acquire);
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit {
                bulkhead: self.clone(),
                delivering: false,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(bulkhead: &Bulkhead) -> usize {
        bulkhead.taken.load(Ordering::Acquire)
    }

    /// A place held while waiting for a job counts against the limit but
    /// is no job in flight.
    #[tokio::test]
    async fn only_a_place_with_a_job_counts_as_delivering() {
        let bulkhead = Bulkhead::new(2);
        let held = bulkhead.acquire().await;
        assert_eq!((taken(&bulkhead), bulkhead.delivering()), (1, 0));
        let delivering = held.deliver();
        assert_eq!((taken(&bulkhead), bulkhead.delivering()), (1, 1));
        let waiting = bulkhead.acquire().await;
        assert_eq!((taken(&bulkhead), bulkhead.delivering()), (2, 1));
        drop(delivering);
        assert_eq!((taken(&bulkhead), bulkhead.delivering()), (1, 0));
        drop(waiting);
        assert_eq!((taken(&bulkhead), bulkhead.delivering()), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_holds_and_follows_a_reload_both_ways() {
        let bulkhead = Bulkhead::new(2);
        let a = bulkhead.acquire().await;
        let b = bulkhead.acquire().await;
        let waiting = tokio::spawn({
            let bulkhead = bulkhead.clone();
            async move { bulkhead.acquire().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "full at 2");
        bulkhead.set_limit(3);
        let c = waiting.await.unwrap();
        assert_eq!(taken(&bulkhead), 3);

        // Lowered below what runs: nobody new until two have finished.
        bulkhead.set_limit(1);
        let next = tokio::spawn({
            let bulkhead = bulkhead.clone();
            async move { bulkhead.acquire().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!next.is_finished(), "2 in flight, limit 1");
        drop(b);
        tokio::task::yield_now().await;
        assert!(!next.is_finished(), "1 in flight, limit 1");
        drop(c);
        let d = next.await.unwrap();
        assert_eq!(taken(&bulkhead), 1);
        drop(d);
        assert_eq!(taken(&bulkhead), 0);
    }
}
