//! A lane's queue: first in, first out, bounded by a capacity a reload
//! may change. A submission reserves its place before the job is stored,
//! so a full queue refuses before anything is written and memory stays
//! bounded; jobs the conductor already holds (re-queued after a restart,
//! replayed) go in whatever the bound. Closing it hands back what waits.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use super::store::StoredJob;

pub struct Queue {
    state: Mutex<State>,
    capacity: AtomicUsize,
    /// Fires when a job arrives or the queue closes.
    ready: Notify,
    /// Fires when a job has to wait: it arrives behind another, or the
    /// one at the front finds no replica free. The autoscaler looks at the
    /// backlog only after this, so an idle lane wakes nobody. A permit
    /// (`notify_one`) keeps a wait that comes while no one listens.
    waiting: Notify,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<StoredJob>,
    /// Places promised to submissions being stored.
    reserved: usize,
    /// Jobs taken off the front that wait for a replica: still queued.
    taken: usize,
    closed: bool,
}

/// The job at the front, taken to wait for a replica. It still counts as
/// queued until it is handed to a delivery; dropped unused, it goes back
/// to the front.
pub struct Taken<'a> {
    queue: &'a Queue,
    job: Option<StoredJob>,
}

impl Taken<'_> {
    pub fn job(&self) -> Option<&StoredJob> {
        self.job.as_ref()
    }

    /// The job leaves the queue.
    pub fn hand_over(mut self) -> Option<StoredJob> {
        self.queue.state().taken -= 1;
        self.job.take()
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            let mut state = self.queue.state();
            state.taken -= 1;
            if !state.closed {
                state.jobs.push_front(job);
            }
        }
    }
}

/// A place in the queue, held while the job is being stored; given back
/// if it is dropped unused.
pub struct Reservation<'a> {
    queue: &'a Queue,
    used: bool,
}

impl Reservation<'_> {
    /// Puts the job in its place; hands it back if the queue closed in
    /// the meantime.
    // The job itself is the error: handed back whole on the rare closed
    // path rather than cloned or boxed on every push.
    #[allow(clippy::result_large_err)]
    pub fn fill(mut self, job: StoredJob) -> Result<(), StoredJob> {
        self.used = true;
        let mut state = self.queue.state();
        state.reserved -= 1;
        if state.closed {
            return Err(job);
        }
        self.queue.append(state, job);
        Ok(())
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.used {
            self.queue.state().reserved -= 1;
        }
    }
}

impl Queue {
    pub fn new(capacity: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            capacity: AtomicUsize::new(capacity),
            ready: Notify::new(),
            waiting: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity, Ordering::Release);
    }

    /// A place, unless the queue is full or closed.
    pub fn try_reserve(&self) -> Option<Reservation<'_>> {
        let mut state = self.state();
        let capacity = self.capacity.load(Ordering::Acquire);
        if state.closed || state.jobs.len() + state.reserved + state.taken >= capacity {
            return None;
        }
        state.reserved += 1;
        Some(Reservation {
            queue: self,
            used: false,
        })
    }

    /// Adds a job the conductor already holds, past the capacity if need
    /// be; hands it back when the queue is closed.
    #[allow(clippy::result_large_err)]
    pub fn push(&self, job: StoredJob) -> Result<(), StoredJob> {
        let state = self.state();
        if state.closed {
            return Err(job);
        }
        self.append(state, job);
        Ok(())
    }

    /// Queues `job` at the back, wakes the popper, and says it has to wait
    /// if another is ahead of it (queued, or taken and not yet placed).
    fn append(&self, mut state: MutexGuard<'_, State>, job: StoredJob) {
        let behind = state.jobs.len() + state.taken > 0;
        state.jobs.push_back(job);
        drop(state);
        self.ready.notify_one();
        if behind {
            self.waiting.notify_one();
        }
    }

    /// Says a job at the front found no replica free.
    pub fn note_waiting(&self) {
        self.waiting.notify_one();
    }

    /// Resolves once a job has had to wait since the last call resolved
    /// (at once if one did meanwhile).
    pub async fn waited(&self) {
        self.waiting.notified().await;
    }

    /// The next job; `None` once the queue is closed.
    pub async fn pop(&self) -> Option<Taken<'_>> {
        super::wake::when(&self.ready, || self.try_pop()).await
    }

    /// The next job if there is one (`Some(None)`: closed).
    fn try_pop(&self) -> Option<Option<Taken<'_>>> {
        let mut state = self.state();
        if state.closed {
            return Some(None);
        }
        let job = state.jobs.pop_front()?;
        state.taken += 1;
        Some(Some(Taken {
            queue: self,
            job: Some(job),
        }))
    }

    /// Jobs waiting, the one taken to wait for a replica included.
    pub fn len(&self) -> usize {
        let state = self.state();
        state.jobs.len() + state.taken
    }

    /// Closes the queue and returns what was waiting in it.
    pub fn close(&self) -> Vec<StoredJob> {
        let mut state = self.state();
        state.closed = true;
        let jobs = state.jobs.drain(..).collect();
        drop(state);
        self.ready.notify_waiters();
        jobs
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn job(id: &str) -> StoredJob {
        StoredJob {
            id: id.into(),
            plugin: "p".into(),
            kind: String::new(),
            payload: Vec::new(),
            attributes: Default::default(),
            idempotency_key: None,
            deadline_ms: None,
            accepted_ms: 0,
            attempts: 0,
            trace: None,
            submitter: None,
        }
    }

    #[tokio::test]
    async fn reservations_count_against_a_capacity_that_can_change() {
        let queue = Queue::new(2);
        let a = queue.try_reserve().unwrap();
        let b = queue.try_reserve().unwrap();
        assert!(queue.try_reserve().is_none(), "two promised of two");
        drop(b);
        let c = queue.try_reserve().expect("an unused place comes back");
        a.fill(job("a")).unwrap();
        c.fill(job("c")).unwrap();
        assert!(queue.try_reserve().is_none());
        queue.set_capacity(4);
        queue.try_reserve().unwrap().fill(job("d")).unwrap();
        let late = queue.try_reserve().unwrap();
        assert!(
            queue.push(job("held")).is_ok(),
            "held jobs go past the bound"
        );
        assert_eq!(queue.len(), 4);
        let taken = queue.pop().await.unwrap();
        assert_eq!(taken.job().map(|j| j.id.as_str()), Some("a"));
        assert_eq!(queue.len(), 4, "taken, not yet handed over");
        assert!(
            queue.try_reserve().is_none(),
            "still counts against the bound"
        );
        drop(taken);
        let taken = queue.pop().await.unwrap();
        assert_eq!(
            taken.hand_over().map(|j| j.id),
            Some("a".into()),
            "back in front"
        );
        assert_eq!(queue.len(), 3);
        let left: Vec<String> = queue.close().into_iter().map(|j| j.id).collect();
        assert_eq!(left, ["c", "d", "held"]);
        assert!(late.fill(job("stored meanwhile")).is_err(), "handed back");
        assert!(queue.pop().await.is_none());
        assert!(queue.try_reserve().is_none() && queue.push(job("late")).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_pop_wakes_for_a_job_and_for_the_close() {
        let queue = std::sync::Arc::new(Queue::new(4));
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.pop().await.and_then(|t| t.hand_over()).map(|j| j.id) }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        queue.push(job("x")).unwrap();
        assert_eq!(waiter.await.unwrap().as_deref(), Some("x"));
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.pop().await.is_none() }
        });
        tokio::task::yield_now().await;
        queue.close();
        assert!(waiter.await.unwrap());
    }

    /// Whether `waited` resolves now, without waiting.
    async fn has_waited(queue: &Queue) -> bool {
        tokio::time::timeout(Duration::ZERO, queue.waited())
            .await
            .is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_that_waits_is_told_once_and_one_that_does_not_never() {
        let queue = Queue::new(8);
        queue.try_reserve().unwrap().fill(job("a")).unwrap();
        assert!(!has_waited(&queue).await, "the first job waits for no one");
        let taken = queue.pop().await.unwrap();
        queue.push(job("b")).unwrap();
        assert!(has_waited(&queue).await, "behind one taken for a replica");
        assert!(!has_waited(&queue).await, "told once");
        drop(taken.hand_over());
        queue.try_reserve().unwrap().fill(job("c")).unwrap();
        assert!(has_waited(&queue).await, "behind b");
        queue.note_waiting();
        assert!(has_waited(&queue).await, "the front found no replica");
    }
}
