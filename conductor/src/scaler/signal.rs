//! A plugin's load per bucket, from running totals: jobs offered to its
//! dispatch lane (with the capacity per replica its completed jobs show),
//! or CPU time its instances' cgroups used.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Running totals of one plugin's jobs, as its dispatch lane counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JobTotals {
    /// Submissions, accepted or refused because the queue was full.
    pub offered: u64,
    pub completed: u64,
    /// Time replicas spent on completed attempts.
    pub busy: Duration,
    /// Jobs waiting now.
    pub queued: usize,
    /// Jobs one replica takes at once.
    pub slots_per_replica: usize,
}

/// One bucket's measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bucket {
    /// Jobs/s offered, or cores used.
    pub load: f64,
    /// Work waiting, in the load's unit × seconds (jobs).
    pub queued: f64,
    /// Capacity per replica that completed jobs showed in this bucket.
    pub capacity: Option<f64>,
}

/// Differences of the dispatch lane's totals.
#[derive(Debug, Default)]
pub struct JobsSignal {
    last: Option<(Instant, JobTotals)>,
    /// Jobs offered by the last glance, and when.
    glanced: Option<(Instant, u64)>,
}

impl JobsSignal {
    /// The bucket that ended at `now`; `None` for the first reading, which
    /// only sets the baseline.
    pub fn bucket(&mut self, now: Instant, totals: JobTotals) -> Option<Bucket> {
        let previous = self.last.replace((now, totals));
        let (then, before) = previous?;
        let secs = now.duration_since(then).as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        let offered = totals.offered.saturating_sub(before.offered);
        let completed = totals.completed.saturating_sub(before.completed);
        let busy = totals.busy.saturating_sub(before.busy).as_secs_f64();
        // Little's law: a replica with `slots` jobs in flight, each taking
        // `busy / completed`, completes slots / that per second.
        let capacity = (completed > 0 && busy > 0.0)
            .then(|| totals.slots_per_replica as f64 * completed as f64 / busy);
        Some(Bucket {
            load: offered as f64 / secs,
            queued: totals.queued as f64,
            capacity,
        })
    }

    /// Jobs/s offered since the last glance or the last bucket's end,
    /// whichever came later, once at least `least` has passed (a rate
    /// over a few milliseconds is noise). Counted jobs vary by about
    /// their square root (±20 % of 20 in a second), so this is the count
    /// less two of those: a glance acts on a load its count shows beyond
    /// doubt and leaves the rest to the bucket's end.
    pub fn glance(&mut self, now: Instant, totals: &JobTotals, least: Duration) -> Option<f64> {
        let (ended, at_end) = self.last.as_ref().map(|(t, b)| (*t, b.offered))?;
        let (then, before) = match self.glanced {
            Some((t, offered)) if t > ended => (t, offered),
            _ => (ended, at_end),
        };
        let span = now.checked_duration_since(then).filter(|s| *s >= least)?;
        self.glanced = Some((now, totals.offered));
        let n = totals.offered.saturating_sub(before) as f64;
        Some((n - 2.0 * n.sqrt()).max(0.0) / span.as_secs_f64())
    }
}

/// Differences of each instance's cgroup CPU time.
#[derive(Debug, Default)]
pub struct CpuSignal {
    last: Option<Instant>,
    /// CPU time by (instance, pid): a restarted instance starts over.
    seen: HashMap<(u32, u32), Duration>,
}

impl CpuSignal {
    /// `instances` as (index, pid, CPU time so far).
    pub fn bucket(&mut self, now: Instant, instances: &[(u32, u32, Duration)]) -> Option<Bucket> {
        let then = self.last.replace(now);
        let mut used = Duration::ZERO;
        let mut seen = HashMap::with_capacity(instances.len());
        for &(index, pid, cpu) in instances {
            let before = self
                .seen
                .get(&(index, pid))
                .copied()
                .unwrap_or(Duration::ZERO);
            used += cpu.saturating_sub(before);
            seen.insert((index, pid), cpu);
        }
        self.seen = seen;
        let secs = now.duration_since(then?).as_secs_f64();
        (secs > 0.0).then(|| Bucket {
            load: used.as_secs_f64() / secs,
            queued: 0.0,
            capacity: None,
        })
    }
}

/// A smoothed capacity estimate: one bucket's figure is noisy, and an idle
/// bucket says nothing.
#[derive(Debug, Default)]
pub struct CapacityEstimate {
    value: Option<f64>,
}

impl CapacityEstimate {
    const WEIGHT: f64 = 0.2;

    pub fn get(&self) -> Option<f64> {
        self.value
    }

    pub fn update(&mut self, measured: Option<f64>) -> Option<f64> {
        if let Some(m) = measured.filter(|m| m.is_finite() && *m > 0.0) {
            self.value = Some(match self.value {
                Some(v) => v + Self::WEIGHT * (m - v),
                None => m,
            });
        }
        self.value
    }
}

/// Recent start-to-SERVING times of one plugin's instances.
#[derive(Debug, Default, Clone)]
pub struct StartTimes {
    samples: VecDeque<Duration>,
}

impl StartTimes {
    const KEEP: usize = 50;

    pub fn record(&mut self, took: Duration) {
        if self.samples.len() == Self::KEEP {
            self.samples.pop_front();
        }
        self.samples.push_back(took);
    }

    /// The 90th percentile, once anything was measured.
    pub fn p90(&self) -> Option<Duration> {
        if self.samples.is_empty() {
            return None;
        }
        let mut sorted: Vec<Duration> = self.samples.iter().copied().collect();
        sorted.sort_unstable();
        let index = ((sorted.len() as f64 * 0.9).ceil() as usize).clamp(1, sorted.len()) - 1;
        Some(sorted[index])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(offered: u64, completed: u64, busy_ms: u64, queued: usize) -> JobTotals {
        JobTotals {
            offered,
            completed,
            busy: Duration::from_millis(busy_ms),
            queued,
            slots_per_replica: 4,
        }
    }

    #[test]
    fn job_rate_and_capacity_come_from_differences() {
        let mut signal = JobsSignal::default();
        let t0 = Instant::now();
        assert_eq!(signal.bucket(t0, totals(100, 90, 9_000, 3)), None);
        let b = signal
            .bucket(t0 + Duration::from_secs(2), totals(140, 130, 13_000, 5))
            .unwrap_or_else(|| panic!("a bucket"));
        assert_eq!(b.load, 20.0);
        assert_eq!(b.queued, 5.0);
        // 40 jobs took 4 s of replica time: 100 ms each, 4 slots → 40/s.
        assert_eq!(b.capacity, Some(40.0));
        // Nothing completed: no capacity figure.
        let b = signal
            .bucket(t0 + Duration::from_secs(3), totals(150, 130, 13_000, 15))
            .unwrap_or_else(|| panic!("a bucket"));
        assert_eq!((b.load, b.capacity), (10.0, None));
    }

    #[test]
    fn a_glance_counts_from_the_last_glance_less_the_counting_noise() {
        let mut signal = JobsSignal::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let least = s(1);
        // No bucket yet: nothing to count from.
        assert_eq!(signal.glance(t0, &totals(0, 0, 0, 0), least), None);
        assert_eq!(signal.bucket(t0, totals(100, 0, 0, 0)), None);
        let early = t0 + Duration::from_millis(300);
        assert_eq!(signal.glance(early, &totals(160, 0, 0, 0), least), None);
        // 400 since the bucket's end, in 4 s: (400 - 2 * 20) / 4.
        assert_eq!(
            signal.glance(t0 + s(4), &totals(500, 0, 0, 80), least),
            Some(90.0)
        );
        // The next counts from that glance: 100 in 2 s, less 2 * 10.
        assert_eq!(
            signal.glance(t0 + s(6), &totals(600, 0, 0, 0), least),
            Some(40.0)
        );
        // A count within its own noise is no load at all.
        assert_eq!(
            signal.glance(t0 + s(7), &totals(603, 0, 0, 0), least),
            Some(0.0)
        );
        // Glances move nothing of the bucket, which still spans from t0;
        // the next glance counts from its end.
        let b = signal
            .bucket(t0 + s(10), totals(700, 0, 0, 0))
            .unwrap_or_else(|| panic!("a bucket"));
        assert_eq!(b.load, 60.0);
        assert_eq!(
            signal.glance(t0 + s(11), &totals(736, 0, 0, 0), least),
            Some(24.0)
        );
    }

    #[test]
    fn cpu_load_survives_restarts() {
        let mut signal = CpuSignal::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(signal.bucket(t0, &[(0, 10, s(5)), (1, 11, s(7))]), None);
        // Instance 1 restarted as pid 12: its counter began again.
        let b = signal
            .bucket(t0 + s(2), &[(0, 10, s(7)), (1, 12, s(1))])
            .unwrap_or_else(|| panic!("a bucket"));
        assert_eq!(b.load, 1.5);
    }

    #[test]
    fn capacity_is_smoothed_and_kept_through_idle_buckets() {
        let mut c = CapacityEstimate::default();
        assert_eq!(c.update(None), None);
        assert_eq!(c.update(Some(100.0)), Some(100.0));
        assert_eq!(c.update(Some(200.0)), Some(120.0));
        assert_eq!(c.update(None), Some(120.0));
        assert_eq!(c.update(Some(f64::NAN)), Some(120.0));
    }

    #[test]
    fn start_times_report_a_high_percentile() {
        let mut t = StartTimes::default();
        assert_eq!(t.p90(), None);
        for ms in 1..=10 {
            t.record(Duration::from_millis(ms * 100));
        }
        assert_eq!(t.p90(), Some(Duration::from_millis(900)));
        for _ in 0..60 {
            t.record(Duration::from_millis(50));
        }
        assert_eq!(t.p90(), Some(Duration::from_millis(50)));
    }
}
