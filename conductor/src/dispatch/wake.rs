//! Waiting for something another task changes and announces on a
//! `Notify`: a place in the bulkhead, a job in the queue, a replica's slot.

use tokio::sync::Notify;

/// What `look` finds, once it finds something. The first look joins no
/// waiting list (most of the time there is something); later ones
/// register with `changed` before looking, so a change between a look and
/// the wait is not missed.
pub async fn when<T>(changed: &Notify, mut look: impl FnMut() -> Option<T>) -> T {
    if let Some(found) = look() {
        return found;
    }
    loop {
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(found) = look() {
            return found;
        }
        notified.await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_change_announced_between_look_and_wait_is_not_missed() {
        let changed = Arc::new(Notify::new());
        let value = Arc::new(AtomicU32::new(0));
        let waiter = tokio::spawn({
            let (changed, value) = (changed.clone(), value.clone());
            async move {
                when(&changed, || {
                    let seen = value.load(Ordering::Acquire);
                    (seen > 1).then_some(seen)
                })
                .await
            }
        });
        tokio::task::yield_now().await;
        value.store(1, Ordering::Release);
        changed.notify_waiters();
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "1 is not enough");
        value.store(2, Ordering::Release);
        changed.notify_waiters();
        assert_eq!(waiter.await.unwrap(), 2);
    }
}
