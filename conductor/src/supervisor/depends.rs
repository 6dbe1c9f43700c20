//! Start order on readiness: a plugin that `depends_on` others starts
//! only once each has `min_serving` instances SERVING, hears when one
//! drops below it (or, with `binds_to`, is stopped and started again
//! with it), and stops before them at shutdown.

use std::collections::{BTreeMap, BTreeSet};

use super::pool::Pool;

/// What the pools' dependencies call for now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Held pools whose dependencies are all ready: start them.
    pub start: Vec<String>,
    /// Running pools that `binds_to` a dependency that is not ready.
    pub hold: Vec<String>,
    /// (plugin, dependency, ready) whose readiness changed for the plugin.
    pub changed: Vec<(String, String, bool)>,
}

/// Whether `name` is ready as a dependency: running (not held) with at
/// least its `min_serving` instances SERVING.
fn ready(pools: &BTreeMap<String, Pool>, name: &str) -> bool {
    pools
        .get(name)
        .is_some_and(|p| !p.held && p.serving() >= p.spec.config.health.config().min_serving.max(1))
}

/// Compares each pool's dependencies with what is ready, records what is
/// missing on the pool, and says what must change.
pub fn settle(pools: &mut BTreeMap<String, Pool>) -> Settled {
    let mut out = Settled::default();
    let readiness: BTreeMap<String, BTreeSet<String>> = pools
        .iter()
        .map(|(name, pool)| {
            let missing = pool
                .spec
                .config
                .depends_on
                .iter()
                .filter(|d| !ready(pools, d))
                .cloned()
                .collect();
            (name.clone(), missing)
        })
        .collect();
    for (name, missing) in readiness {
        let Some(pool) = pools.get_mut(&name) else {
            continue;
        };
        let before: BTreeSet<String> = pool.missing.iter().cloned().collect();
        // A held pool has not started on them yet: nothing to tell.
        if !pool.held {
            for lost in missing.difference(&before) {
                out.changed.push((name.clone(), lost.clone(), false));
            }
            for back in before.difference(&missing) {
                out.changed.push((name.clone(), back.clone(), true));
            }
        }
        match (pool.held, missing.is_empty()) {
            (true, true) => out.start.push(name.clone()),
            (false, false) if pool.spec.config.binds_to => out.hold.push(name.clone()),
            _ => {}
        }
        pool.missing = missing.into_iter().collect();
    }
    out
}

/// The pools in stop order: every plugin before the plugins it depends
/// on (the reverse of start order). Config checks refuse cycles; were
/// one left, its members go last, in name order.
pub fn stop_order(pools: &BTreeMap<String, Pool>) -> Vec<Vec<String>> {
    let mut left: BTreeSet<&str> = pools.keys().map(String::as_str).collect();
    let mut layers = Vec::new();
    while !left.is_empty() {
        // Those no remaining plugin depends on.
        let layer: Vec<String> = left
            .iter()
            .filter(|name| {
                !left.iter().any(|other| {
                    pools[*other]
                        .spec
                        .config
                        .depends_on
                        .iter()
                        .any(|d| d == *name)
                })
            })
            .map(|name| name.to_string())
            .collect();
        let layer = match layer.is_empty() {
            true => left.iter().map(|n| n.to_string()).collect(),
            false => layer,
        };
        for name in &layer {
            left.remove(name.as_str());
        }
        layers.push(layer);
    }
    layers
}
