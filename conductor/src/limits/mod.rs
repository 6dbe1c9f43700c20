//! Limits the replicas of one plugin share, served by the conductor: a
//! plugin asks for its turn (`Acquire` on the plugin API) and waits
//! until it comes, first come first served across every replica.
//!
//! Each bucket grants at most one caller per spacing (`every`, or
//! `per / rate`), spread evenly rather than in bursts, so no window of the
//! limit's length ever holds more than its rate. An `every` limit is a
//! minimum gap: the next turn is measured from when the last grant really
//! went out, so two grants are never closer, however late a timer fired.
//! A `rate` limit keeps its schedule instead, so late timers do not wear
//! the rate down. A waiter that goes away (its replica killed mid-wait)
//! uses nothing up: its turn passes to the next in line. A limit's first
//! turn comes one spacing after it was made, so a conductor restart never
//! lets two grants come closer than the limit allows.

pub mod config;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use config::LimitConfig;

/// Every plugin's limits by name.
pub type Table = BTreeMap<String, BTreeMap<String, LimitConfig>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "plugin {plugin:?} declares no shared limit {limit:?} ([plugins.{plugin}.shared_limits])"
    )]
    Unknown { plugin: String, limit: String },
    #[error("bucket {bucket} is outside limit {limit:?}, which has buckets 0 to {}", .buckets - 1)]
    Bucket {
        limit: String,
        bucket: u32,
        buckets: u32,
    },
    #[error("the turn under {limit:?} comes in {}, after the call's deadline", humantime::format_duration(*wait))]
    Deadline { limit: String, wait: Duration },
}

/// A grant: when, and after how long a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub at: SystemTime,
    pub waited: Duration,
}

/// One bucket: the earliest instant of its next grant. The async mutex
/// is the line: tokio's is fair (FIFO), and a waiter dropped while in
/// line or at the front leaves without having moved `next`.
struct Bucket {
    next: tokio::sync::Mutex<Instant>,
}

struct Limit {
    spacing: Duration,
    /// `every`: measured from the real grant, not the schedule.
    gap: bool,
    buckets: Vec<Arc<Bucket>>,
}

impl Limit {
    /// A fresh limit's first turn is one spacing away: whatever was
    /// granted before it existed (before a conductor restart, or under the
    /// settings a reload replaced) it cannot know, and an `every` limit's
    /// gap must hold across that too.
    fn new(config: &LimitConfig) -> Option<Self> {
        let spacing = config.spacing().ok()?;
        let now = Instant::now() + spacing;
        Some(Self {
            spacing,
            gap: config.every.is_some(),
            buckets: (0..config.buckets)
                .map(|_| {
                    Arc::new(Bucket {
                        next: tokio::sync::Mutex::new(now),
                    })
                })
                .collect(),
        })
    }
}

/// (plugin, limit) → its state and the config it was built from.
type Served = HashMap<(String, String), (LimitConfig, Arc<Limit>)>;

/// Every plugin's shared limits.
#[derive(Default)]
pub struct Limits {
    table: Mutex<Served>,
}

impl Limits {
    pub fn new(table: Table) -> Self {
        let limits = Self::default();
        limits.configure(table);
        limits
    }

    /// Makes `table` the limits in force. A limit whose settings did not
    /// change keeps its state (a reload does not hand out a fresh burst);
    /// a changed one starts afresh.
    pub fn configure(&self, table: Table) {
        let mut current = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = HashMap::new();
        for (plugin, limits) in table {
            for (name, config) in limits {
                let key = (plugin.clone(), name);
                let kept = current.remove(&key).filter(|(old, _)| *old == config);
                let entry = match kept {
                    Some(entry) => entry,
                    None => match Limit::new(&config) {
                        Some(limit) => (config, Arc::new(limit)),
                        // Config checks refuse these; nothing to serve.
                        None => continue,
                    },
                };
                next.insert(key, entry);
            }
        }
        *current = next;
    }

    /// Waits for the caller's turn under `limit` of `plugin`, in `bucket`,
    /// if it comes before `deadline`.
    pub async fn acquire(
        &self,
        plugin: &str,
        limit: &str,
        bucket: u32,
        deadline: Option<Instant>,
    ) -> Result<Grant, LimitError> {
        let found = {
            let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
            table
                .get(&(plugin.to_owned(), limit.to_owned()))
                .map(|(_, l)| l.clone())
        };
        let Some(state) = found else {
            return Err(LimitError::Unknown {
                plugin: plugin.to_owned(),
                limit: limit.to_owned(),
            });
        };
        let Some(slot) = state.buckets.get(bucket as usize) else {
            return Err(LimitError::Bucket {
                limit: limit.to_owned(),
                bucket,
                buckets: state.buckets.len() as u32,
            });
        };
        let asked = Instant::now();
        let in_line = slot.next.lock();
        let mut next =
            match deadline {
                Some(at) => tokio::time::timeout_at(at, in_line).await.map_err(|_| {
                    LimitError::Deadline {
                        limit: limit.to_owned(),
                        wait: at.saturating_duration_since(asked),
                    }
                })?,
                None => in_line.await,
            };
        let turn = (*next).max(Instant::now());
        if let Some(at) = deadline
            && turn > at
        {
            return Err(LimitError::Deadline {
                limit: limit.to_owned(),
                wait: turn.saturating_duration_since(asked),
            });
        }
        tokio::time::sleep_until(turn).await;
        // Only now is the turn used: a caller dropped during the sleep
        // leaves `next` as it was for the one behind it.
        let (granted, at) = (Instant::now(), SystemTime::now());
        *next = match state.gap {
            true => granted.max(turn) + state.spacing,
            false => turn + state.spacing,
        };
        Ok(Grant {
            at,
            waited: granted.saturating_duration_since(asked),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(limit: &str, config: &str) -> Table {
        let config: LimitConfig = toml::from_str(config).unwrap();
        BTreeMap::from([(
            "bot".to_owned(),
            BTreeMap::from([(limit.to_owned(), config)]),
        )])
    }

    #[tokio::test(start_paused = true)]
    async fn grants_are_spaced_and_first_come_first_served() {
        let limits = Arc::new(Limits::new(table("rest", "rate = 50\nper = \"1s\"")));
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for caller in 0..4u32 {
            let limits = limits.clone();
            tasks.spawn(async move {
                let mut grants = Vec::new();
                while Instant::now() < start + Duration::from_secs(10) {
                    limits.acquire("bot", "rest", 0, None).await.unwrap();
                    grants.push(Instant::now());
                }
                (caller, grants)
            });
        }
        let mut all = Vec::new();
        let mut per_caller = Vec::new();
        while let Some(done) = tasks.join_next().await {
            let (_, grants) = done.unwrap();
            per_caller.push(grants.len());
            all.extend(grants);
        }
        all.sort();
        let within: Vec<_> = all
            .iter()
            .filter(|t| **t <= start + Duration::from_secs(10))
            .collect();
        assert_eq!(within.len(), 500, "50/s for 10 s");
        for pair in all.windows(2) {
            assert!(pair[1] - pair[0] >= Duration::from_millis(20));
        }
        // Fair: every caller within 2 % of its share.
        for n in &per_caller {
            assert!(
                n.abs_diff(all.len() / 4) <= all.len() / 200,
                "{per_caller:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_leaves_uses_nothing_up_and_buckets_are_separate() {
        let limits = Arc::new(Limits::new(table(
            "identify",
            "every = \"5s\"\nbuckets = 2",
        )));
        limits.acquire("bot", "identify", 0, None).await.unwrap();
        let t0 = Instant::now();
        // Bucket 1 is free at once.
        limits.acquire("bot", "identify", 1, None).await.unwrap();
        assert_eq!(Instant::now(), t0);
        // A waiter for bucket 0 goes away two seconds into its wait…
        let leaving = limits.clone();
        let gone = tokio::spawn(async move { leaving.acquire("bot", "identify", 0, None).await });
        tokio::time::sleep(Duration::from_secs(2)).await;
        gone.abort();
        // …and the next one is granted when that turn would have come.
        limits.acquire("bot", "identify", 0, None).await.unwrap();
        assert_eq!(Instant::now() - t0, Duration::from_secs(5));
        // A deadline before the turn refuses at once, using nothing.
        let soon = Some(Instant::now() + Duration::from_secs(1));
        let refused = limits.acquire("bot", "identify", 0, soon).await;
        assert!(matches!(refused, Err(LimitError::Deadline { .. })));
        assert_eq!(Instant::now() - t0, Duration::from_secs(5));
        assert!(matches!(
            limits.acquire("bot", "identify", 2, None).await,
            Err(LimitError::Bucket { buckets: 2, .. })
        ));
        assert!(matches!(
            limits.acquire("bot", "nope", 0, None).await,
            Err(LimitError::Unknown { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_an_unchanged_limits_state() {
        let limits = Limits::new(table("identify", "every = \"5s\""));
        limits.acquire("bot", "identify", 0, None).await.unwrap();
        let t0 = Instant::now();
        limits.configure(table("identify", "every = \"5s\""));
        limits.acquire("bot", "identify", 0, None).await.unwrap();
        assert_eq!(Instant::now() - t0, Duration::from_secs(5));
        limits.configure(table("identify", "every = \"1s\""));
        limits.acquire("bot", "identify", 0, None).await.unwrap();
        assert_eq!(
            Instant::now() - t0,
            Duration::from_secs(6),
            "changed: afresh, its first turn one new spacing away"
        );
    }
}
