//! One plugin's lane: its bounded queue, its bulkhead (a semaphore for the
//! plugin, a slot count per replica) and the replicas that can take jobs.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use demi_proto::plugin::v1::plugin_client::PluginClient;
use tokio::sync::{Notify, Semaphore, mpsc};
use tonic::transport::Endpoint as TonicEndpoint;

use super::config::DispatchConfig;
use super::link::Link;
use super::store::StoredJob;

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
    pub config: DispatchConfig,
    pub queue: mpsc::Sender<StoredJob>,
    /// The plugin-wide in-flight limit.
    pub bulkhead: Arc<Semaphore>,
    replicas: Mutex<Vec<Replica>>,
    /// Fires when a replica joins or a slot frees up.
    changed: Notify,
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

impl Lane {
    pub fn new(plugin: &str, config: DispatchConfig) -> (Arc<Self>, mpsc::Receiver<StoredJob>) {
        let (queue, jobs) = mpsc::channel(config.queue_capacity);
        let plugin: Arc<str> = Arc::from(plugin);
        let lane = Arc::new(Self {
            plugin,
            bulkhead: Arc::new(Semaphore::new(config.max_in_flight)),
            config,
            queue,
            replicas: Mutex::new(Vec::new()),
            changed: Notify::new(),
            load: LoadCounters::default(),
        });
        (lane, jobs)
    }

    fn replicas(&self) -> MutexGuard<'_, Vec<Replica>> {
        self.replicas.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells `bus` what happened to one of this lane's jobs.
    pub fn publish(&self, bus: &crate::events::Bus, what: crate::events::JobEvent) {
        bus.emit(crate::events::Event::Job {
            plugin: self.plugin.clone(),
            what,
        });
    }

    /// Jobs waiting in the queue.
    pub fn queued(&self) -> usize {
        self.config.queue_capacity - self.queue.capacity()
    }

    /// Jobs being delivered now.
    pub fn in_flight(&self) -> usize {
        self.config.max_in_flight - self.bulkhead.available_permits()
    }

    /// Replica `index` (process `pid`) serves on `socket` now.
    pub fn add(&self, index: u32, pid: u32, socket: &std::path::Path) {
        let Ok(endpoint) = TonicEndpoint::from_shared(format!("unix://{}", socket.display()))
        else {
            return;
        };
        // Lazy: the connection is made by the first job, and remade after
        // a failure, without holding anyone up here.
        let link = Arc::new(Link::new(PluginClient::new(crate::rpc::safe(
            endpoint.connect_lazy(),
        ))));
        let mut replicas = self.replicas();
        replicas.retain(|r| r.index != index);
        replicas.push(Replica {
            index,
            pid,
            link,
            in_flight: Arc::new(AtomicUsize::new(0)),
        });
        drop(replicas);
        self.changed.notify_waiters();
    }

    /// Replica `index` stopped serving (`pid` guards against removing a
    /// successor that already announced itself).
    pub fn remove(&self, index: u32, pid: Option<u32>) {
        self.replicas()
            .retain(|r| r.index != index || pid.is_some_and(|p| p != r.pid));
    }

    /// The SERVING replica with the fewest jobs in flight and a free slot,
    /// preferring any but `avoid` (where the last attempt failed).
    fn pick(self: &Arc<Self>, avoid: Option<u32>) -> Option<Slot> {
        let replicas = self.replicas();
        let limit = self.config.max_in_flight_per_replica;
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

    /// Waits for a slot; `None` once `give_up` resolves first.
    pub async fn slot(
        self: &Arc<Self>,
        avoid: Option<u32>,
        give_up: impl std::future::Future<Output = ()>,
    ) -> Option<Slot> {
        tokio::pin!(give_up);
        loop {
            // Register interest before looking, so a change between the
            // look and the wait is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(slot) = self.pick(avoid) {
                return Some(slot);
            }
            tokio::select! {
                () = &mut changed => {}
                () = &mut give_up => return None,
            }
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
        .0
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
            }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        assert_eq!(waiter.await.unwrap(), Some(0));
        let gave_up = lane.slot(None, std::future::ready(())).await;
        assert!(gave_up.is_some(), "a free slot wins over giving up");
    }
}
