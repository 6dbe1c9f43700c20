//! One plugin's lane: its bounded queue, its bulkhead (a limit for the
//! plugin, a slot count per replica), the replicas that can take jobs, and
//! the settings in force, which a reload may change at any time.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use demi_proto::plugin::v1::plugin_client::PluginClient;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint as TonicEndpoint;

use super::bulkhead::Bulkhead;
use super::config::DispatchConfig;
use super::link::Link;
use super::queue::Queue;
use super::store::StoredJob;
use crate::events::{Bus, Event, JobEvent};
use crate::layout::Layout;

/// A SERVING replica jobs can go to.
#[derive(Clone)]
struct Replica {
    index: u32,
    pid: u32,
    link: Arc<Link>,
    in_flight: Arc<AtomicUsize>,
}

/// A slot on one replica, held for the length of one delivery.
pub struct Slot {
    pub index: u32,
    pub link: Arc<Link>,
    in_flight: Arc<AtomicUsize>,
    lane: Arc<Lane>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        // A waiting job may take this slot now.
        self.lane.changed.notify_waiters();
    }
}

pub struct Lane {
    pub plugin: Arc<str>,
    config: Mutex<Arc<DispatchConfig>>,
    pub queue: Queue,
    pub bulkhead: Arc<Bulkhead>,
    replicas: Mutex<Vec<Replica>>,
    /// `max_in_flight_per_replica`, read at every pick.
    per_replica: AtomicUsize,
    /// Fires when a replica joins or a slot frees up.
    changed: Notify,
    /// SERVING replicas, for whoever waits on there being one.
    live: watch::Sender<usize>,
    /// Fires when the plugin is removed (or stops taking jobs).
    closed: CancellationToken,
    /// What the autoscaler reads.
    pub load: LoadCounters,
}

/// Running totals for the autoscaler, which takes differences per bucket.
#[derive(Debug, Default)]
pub struct LoadCounters {
    /// Submissions that reached the lane, refused ones included: a full
    /// queue is demand the pool failed to meet, not demand that vanished.
    pub offered: AtomicU64,
    pub completed: AtomicU64,
    /// Time replicas spent on completed attempts, in microseconds.
    pub busy_micros: AtomicU64,
}

/// Why no slot was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// The caller's `give_up` came first.
    GaveUp,
    /// The lane closed.
    Closed,
}

impl Lane {
    pub fn new(plugin: &str, config: DispatchConfig) -> Arc<Self> {
        Arc::new(Self {
            plugin: Arc::from(plugin),
            queue: Queue::new(config.queue_capacity),
            bulkhead: Bulkhead::new(config.max_in_flight),
            per_replica: AtomicUsize::new(config.max_in_flight_per_replica),
            config: Mutex::new(Arc::new(config)),
            replicas: Mutex::new(Vec::new()),
            changed: Notify::new(),
            live: watch::Sender::new(0),
            closed: CancellationToken::new(),
            load: LoadCounters::default(),
        })
    }

    fn replicas(&self) -> MutexGuard<'_, Vec<Replica>> {
        self.replicas.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The settings in force: read at each step of a delivery, so a
    /// reload reaches jobs already on their way.
    pub fn config(&self) -> Arc<DispatchConfig> {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Applies new settings to the queue, the bulkhead and every delivery
    /// from its next step on.
    pub fn reconfigure(&self, config: DispatchConfig) {
        self.queue.set_capacity(config.queue_capacity);
        self.bulkhead.set_limit(config.max_in_flight);
        self.per_replica
            .store(config.max_in_flight_per_replica, Ordering::Release);
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        // A raised per-replica limit may free a slot for a waiting job.
        self.changed.notify_waiters();
    }

    /// Stops taking jobs: returns the queued ones; deliveries on their way
    /// see [`NoSlot::Closed`] at their next wait.
    pub fn close(&self) -> Vec<StoredJob> {
        self.closed.cancel();
        self.queue.close()
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    pub async fn closed(&self) {
        self.closed.cancelled().await;
    }

    /// Tells `bus` what happened to one of this lane's jobs.
    pub fn publish(&self, bus: &Bus, what: JobEvent) {
        bus.emit(Event::Job {
            plugin: self.plugin.clone(),
            what,
        });
    }

    /// Jobs waiting in the queue.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Jobs being delivered now.
    pub fn in_flight(&self) -> usize {
        self.bulkhead.delivering()
    }

    /// Resolves once the lane has had no SERVING replica for `patience`
    /// in a row.
    pub async fn without_replicas_for(&self, patience: Duration) {
        let mut live = self.live.subscribe();
        loop {
            // The sender lives as long as the lane: the waits cannot fail.
            let _ = live.wait_for(|n| *n == 0).await;
            tokio::select! {
                () = tokio::time::sleep(patience) => return,
                _ = live.wait_for(|n| *n > 0) => {}
            }
        }
    }

    /// Makes the replicas exactly `serving` (index, pid), each at its
    /// socket in `layout`: after missed events.
    pub fn sync(&self, serving: &[(u32, u32)], layout: &Layout) {
        let current: Vec<(u32, u32)> = self.replicas().iter().map(|r| (r.index, r.pid)).collect();
        for (index, pid) in current {
            if !serving.contains(&(index, pid)) {
                self.remove(index, Some(pid));
            }
        }
        for &(index, pid) in serving {
            if !self
                .replicas()
                .iter()
                .any(|r| r.index == index && r.pid == pid)
            {
                self.add(index, pid, &layout.plugin_socket(&self.plugin, index));
            }
        }
    }

    /// Replica `index` (process `pid`) serves on `socket` now.
    pub fn add(&self, index: u32, pid: u32, socket: &std::path::Path) {
        let Ok(endpoint) = TonicEndpoint::from_shared(format!("unix://{}", socket.display()))
        else {
            return;
        };
        // Lazy: the connection is made by the first job, and remade after
        // a failure, without holding anyone up here.
        // The limit bounds what a plugin's answer can make the conductor
        // hold; the plugin contract promises it.
        let client = PluginClient::new(crate::rpc::safe(endpoint.connect_lazy()))
            .max_decoding_message_size(demi_proto::MAX_MESSAGE);
        let link = Arc::new(Link::new(client));
        let mut replicas = self.replicas();
        replicas.retain(|r| r.index != index);
        replicas.push(Replica {
            index,
            pid,
            link,
            in_flight: Arc::new(AtomicUsize::new(0)),
        });
        self.live.send_replace(replicas.len());
        drop(replicas);
        self.changed.notify_waiters();
    }

    /// Replica `index` stopped serving (`pid` guards against removing a
    /// successor that already announced itself).
    pub fn remove(&self, index: u32, pid: Option<u32>) {
        let mut replicas = self.replicas();
        replicas.retain(|r| r.index != index || pid.is_some_and(|p| p != r.pid));
        self.live.send_replace(replicas.len());
    }

    /// The SERVING replica with the fewest jobs in flight and a free slot,
    /// preferring any but `avoid` (where the last attempt failed).
    fn pick(self: &Arc<Self>, avoid: Option<u32>) -> Option<Slot> {
        let limit = self.per_replica.load(Ordering::Acquire);
        let replicas = self.replicas();
        let open = replicas
            .iter()
            .filter(|r| r.in_flight.load(Ordering::Acquire) < limit);
        let best = open
            .min_by_key(|r| (Some(r.index) == avoid, r.in_flight.load(Ordering::Acquire)))?
            .clone();
        drop(replicas);
        best.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(Slot {
            index: best.index,
            link: best.link,
            in_flight: best.in_flight,
            lane: self.clone(),
        })
    }

    /// Waits for a slot, until `give_up` resolves or the lane closes. A
    /// free slot wins over giving up.
    pub async fn slot(
        self: &Arc<Self>,
        avoid: Option<u32>,
        give_up: impl std::future::Future<Output = ()>,
    ) -> Result<Slot, NoSlot> {
        let look = || match self.is_closed() {
            true => Some(Err(NoSlot::Closed)),
            false => self.pick(avoid).map(Ok),
        };
        if let Some(found) = look() {
            return found;
        }
        self.queue.note_waiting();
        tokio::select! {
            biased;
            found = super::wake::when(&self.changed, look) => found,
            () = give_up => Err(NoSlot::GaveUp),
            () = self.closed.cancelled() => Err(NoSlot::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane(per_replica: usize) -> Arc<Lane> {
        Lane::new(
            "echo",
            DispatchConfig {
                max_in_flight_per_replica: per_replica,
                ..DispatchConfig::default()
            },
        )
    }

    #[tokio::test]
    async fn least_in_flight_first_within_each_replicas_limit() {
        let lane = lane(2);
        let socket = std::path::Path::new("/nonexistent.sock");
        lane.add(0, 100, socket);
        lane.add(1, 101, socket);
        let a = lane.pick(None).unwrap();
        let b = lane.pick(None).unwrap();
        assert_ne!(a.index, b.index, "spread before stacking");
        let c = lane.pick(None).unwrap();
        let d = lane.pick(None).unwrap();
        assert!(lane.pick(None).is_none(), "both replicas full");
        let freed = c.index;
        drop(c);
        assert_eq!(lane.pick(None).unwrap().index, freed);
        drop((a, b, d));
    }

    #[tokio::test]
    async fn a_retry_avoids_the_replica_that_failed_when_it_can() {
        let lane = lane(8);
        let socket = std::path::Path::new("/nonexistent.sock");
        lane.add(0, 100, socket);
        lane.add(1, 101, socket);
        assert_eq!(lane.pick(Some(0)).unwrap().index, 1);
        lane.remove(1, Some(101));
        assert_eq!(lane.pick(Some(0)).unwrap().index, 0, "the only one left");
        lane.remove(0, Some(999));
        assert!(
            lane.pick(None).is_some(),
            "a stale pid does not remove a successor"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_job_gets_the_slot_a_replica_frees() {
        let lane = lane(1);
        lane.add(0, 100, std::path::Path::new("/nonexistent.sock"));
        let held = lane.pick(None).unwrap();
        let waiter = tokio::spawn({
            let lane = lane.clone();
            async move {
                lane.slot(None, std::future::pending())
                    .await
                    .map(|s| s.index)
                    .ok()
            }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        assert_eq!(waiter.await.unwrap(), Some(0));
        let gave_up = lane.slot(None, std::future::ready(())).await;
        assert!(gave_up.is_ok(), "a free slot wins over giving up");
        drop(gave_up);
        let held = lane.pick(None).unwrap();
        assert_eq!(
            lane.slot(None, std::future::ready(())).await.err(),
            Some(NoSlot::GaveUp)
        );
        // A raised per-replica limit frees a place for a waiting job.
        let waiter = tokio::spawn({
            let lane = lane.clone();
            async move { lane.slot(None, std::future::pending()).await.is_ok() }
        });
        tokio::task::yield_now().await;
        lane.reconfigure(DispatchConfig {
            max_in_flight_per_replica: 2,
            ..DispatchConfig::default()
        });
        assert!(waiter.await.unwrap());
        drop(held);
        lane.close();
        assert_eq!(
            lane.slot(None, std::future::pending()).await.err(),
            Some(NoSlot::Closed)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_replicas_counts_only_time_with_none_live() {
        let lane = lane(1);
        let socket = std::path::Path::new("/nonexistent.sock");
        lane.add(0, 100, socket);
        let start = tokio::time::Instant::now();
        let waited = tokio::spawn({
            let lane = lane.clone();
            async move { lane.without_replicas_for(Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!waited.is_finished(), "a replica is live");
        lane.remove(0, Some(100));
        tokio::time::sleep(Duration::from_secs(3)).await;
        lane.add(0, 101, socket);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!waited.is_finished(), "the replica came back within 5 s");
        lane.remove(0, None);
        waited.await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(21));
    }
}
