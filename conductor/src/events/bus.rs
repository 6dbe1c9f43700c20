//! Fan-out of events: sinks hear every event synchronously, where it
//! happened (so a log line keeps the emitter's span and a counter is never
//! dropped); the stream carries lifecycle events to async subscribers,
//! which may fall behind and are told so, but never slow a publisher.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::broadcast;

use super::Event;

/// Hears every event, inline, on the publisher's thread: keep it cheap.
pub trait Sink: Send + Sync {
    fn record(&self, event: &Event);
}

/// An event as the stream carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct Stamped {
    pub at: SystemTime,
    pub event: Event,
}

/// Events kept for slow stream subscribers.
const STREAM_CAPACITY: usize = 4096;

/// Where components publish. Cloning shares it.
#[derive(Clone)]
pub struct Bus(Arc<Inner>);

struct Inner {
    sinks: Vec<Arc<dyn Sink>>,
    stream: broadcast::Sender<Arc<Stamped>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("sinks", &self.0.sinks.len())
            .field("subscribers", &self.0.stream.receiver_count())
            .finish()
    }
}

impl Default for Bus {
    /// A bus with no sinks: events reach stream subscribers only.
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl Bus {
    pub fn new(sinks: Vec<Arc<dyn Sink>>) -> Self {
        Self(Arc::new(Inner {
            sinks,
            stream: broadcast::channel(STREAM_CAPACITY).0,
        }))
    }

    pub fn emit(&self, event: Event) {
        self.record(&event);
        self.stream(event);
    }

    /// The first half of [`Bus::emit`]: the sinks hear it. A publisher
    /// whose own state must change between the log and the stream (so a
    /// stream subscriber reads fresh state, and nobody sees the state
    /// before the log says how it came about) calls the halves itself.
    pub fn record(&self, event: &Event) {
        for sink in &self.0.sinks {
            sink.record(event);
        }
    }

    /// The second half of [`Bus::emit`]: stream subscribers get it.
    pub fn stream(&self, event: Event) {
        // Nobody listening is fine: the sinks have it.
        if event.streamed() && self.0.stream.receiver_count() > 0 {
            let _ = self.0.stream.send(Arc::new(Stamped {
                at: SystemTime::now(),
                event,
            }));
        }
    }

    /// Lifecycle events from now on. A subscriber that falls more than
    /// 4096 events behind loses the oldest and is told how many.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Stamped>> {
        self.0.stream.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::events::{InstanceEvent, JobEvent};

    #[derive(Default)]
    struct Recording(Mutex<Vec<Event>>);

    impl Sink for Recording {
        fn record(&self, event: &Event) {
            self.0.lock().unwrap().push(event.clone());
        }
    }

    #[tokio::test]
    async fn sinks_hear_everything_and_the_stream_only_lifecycle() {
        let recording = Arc::new(Recording::default());
        let bus = Bus::new(vec![recording.clone()]);
        let mut stream = bus.subscribe();
        let plugin: Arc<str> = Arc::from("echo");
        bus.emit(Event::Job {
            plugin: plugin.clone(),
            what: JobEvent::Submitted,
        });
        bus.emit(Event::instance(
            &plugin,
            0,
            Some(7),
            InstanceEvent::HealthChecked {
                outcome: crate::events::CheckOutcome::Serving,
                took: Duration::from_millis(1),
            },
        ));
        bus.emit(Event::instance(&plugin, 0, Some(7), InstanceEvent::Spawned));
        assert_eq!(recording.0.lock().unwrap().len(), 3);
        let first = stream.recv().await.unwrap();
        assert!(matches!(
            first.event,
            Event::Instance {
                what: InstanceEvent::Spawned,
                ..
            }
        ));
        assert!(
            stream.try_recv().is_err(),
            "jobs and checks stay off the stream"
        );
    }
}
