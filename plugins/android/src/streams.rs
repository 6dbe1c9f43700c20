//! The device streams this replica holds: one per device, the newest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// This replica's hold on one device's stream.
#[derive(Clone)]
pub struct Live {
    pub generation: i64,
    /// Rung when answers for the device are stored.
    pub wake: Arc<Notify>,
    /// Cancelled to end the stream; `why` says with what status.
    pub end: CancellationToken,
    why: Arc<Mutex<Option<Status>>>,
}

impl Live {
    /// Ends the stream with `status` (the first reason given wins).
    pub fn ended(&self, status: Status) {
        let mut why = self.why.lock().unwrap_or_else(|p| p.into_inner());
        if why.is_none() {
            *why = Some(status);
        }
        self.end.cancel();
    }

    /// Why the stream was ended, if it was.
    pub fn why(&self) -> Option<Status> {
        self.why.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[derive(Default)]
pub struct Streams {
    live: Mutex<HashMap<String, Live>>,
}

impl Streams {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds `device`'s stream of `generation`; an older stream of the
    /// device here is ended (the newer wins).
    pub fn open(&self, device: &str, generation: i64) -> Live {
        let live = Live {
            generation,
            wake: Arc::new(Notify::new()),
            end: CancellationToken::new(),
            why: Arc::default(),
        };
        let older = self.map().insert(device.to_owned(), live.clone());
        if let Some(older) = older {
            if older.generation < generation {
                older.ended(newer_wins());
            } else {
                // A newer one got here first (its generation was handed
                // out later but it registered sooner): this one loses.
                self.map().insert(device.to_owned(), older);
                live.ended(newer_wins());
            }
        }
        live
    }

    /// Forgets `device`'s stream of `generation` once it has ended.
    pub fn close(&self, device: &str, generation: i64) {
        let mut map = self.map();
        if map.get(device).is_some_and(|l| l.generation == generation) {
            map.remove(device);
        }
    }

    /// Rings `device`'s stream: true when this replica holds it.
    pub fn wake(&self, device: &str) -> bool {
        match self.map().get(device) {
            Some(live) => {
                live.wake.notify_one();
                true
            }
            None => false,
        }
    }

    /// A stream of `generation` holds `device` on another replica: an
    /// older one here ends.
    pub fn taken(&self, device: &str, generation: i64) {
        if let Some(live) = self.map().get(device)
            && live.generation < generation
        {
            live.ended(newer_wins());
        }
    }

    /// Ends `device`'s stream here, if any.
    pub fn end(&self, device: &str, status: Status) {
        if let Some(live) = self.map().get(device) {
            live.ended(status);
        }
    }

    /// Ends every stream (the bridge is stopping).
    pub fn end_all(&self, status: &Status) {
        for live in self.map().values() {
            live.ended(status.clone());
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map().len()
    }
}

fn newer_wins() -> Status {
    Status::aborted("another stream of this device connected; the newer one wins")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newer_stream_of_a_device_wins_wherever_it_connected() {
        let streams = Streams::default();
        let first = streams.open("pixel", 1);
        let second = streams.open("pixel", 2);
        assert!(first.end.is_cancelled() && !second.end.is_cancelled());
        assert_eq!(first.why().unwrap().code(), tonic::Code::Aborted);
        // Generation 3 registered late, after 4 (on this replica).
        let fourth = streams.open("pixel", 4);
        let third = streams.open("pixel", 3);
        assert!(third.end.is_cancelled() && !fourth.end.is_cancelled());
        streams.close("pixel", 3);
        assert!(streams.wake("pixel"), "4 still holds it");
        streams.taken("pixel", 5);
        assert!(fourth.end.is_cancelled());
        streams.close("pixel", 4);
        assert!(!streams.wake("pixel"));
        assert_eq!(streams.len(), 0);
    }
}
