//! What changed between two configurations, for a reload to apply.

use super::Config;

/// Plugins by what a reload does to them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
    /// Settings that take effect only at the next start.
    pub ignored: Vec<String>,
    /// Broken manifests of the new configuration, skipped.
    pub warnings: Vec<String>,
}

pub fn diff(old: &Config, new: &Config) -> Diff {
    let mut diff = Diff {
        warnings: new.warnings.iter().map(ToString::to_string).collect(),
        ..Diff::default()
    };
    if old.conductor != new.conductor {
        diff.ignored
            .push("[conductor] (takes effect at the next start)".into());
    }
    for name in old.plugins.keys() {
        if !new.plugins.contains_key(name) {
            diff.removed.push(name.clone());
        }
    }
    for (name, plugin) in &new.plugins {
        match old.plugins.get(name) {
            None => diff.added.push(name.clone()),
            Some(before) if before == plugin => diff.unchanged.push(name.clone()),
            Some(_) => diff.changed.push(name.clone()),
        }
    }
    diff
}
