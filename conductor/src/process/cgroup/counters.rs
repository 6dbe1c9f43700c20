//! Reading the few counter files usage needs. cgroups-rs's `memory_stat()`
//! reads a dozen files (NUMA statistics included) per call; sampling a
//! thousand instances that way would cost more than the conductor itself.

use std::path::Path;

/// A file holding one number.
pub fn number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file such as `cpu.stat` or
/// `memory.events` (`key value` per line).
pub fn keyed(path: &Path, key: &str) -> Option<u64> {
    keyed_in(&std::fs::read_to_string(path).ok()?, key)
}

pub fn keyed_in(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The pids in a `cgroup.procs` file.
pub fn pids(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files_find_their_key_exactly() {
        let text = "nr_periods 10\nnr_throttled 4\nthrottled_time 123456\n";
        assert_eq!(keyed_in(text, "nr_throttled"), Some(4));
        assert_eq!(keyed_in(text, "throttled_time"), Some(123_456));
        assert_eq!(keyed_in(text, "throttled"), None);
        assert_eq!(
            keyed_in("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n", "oom_kill"),
            Some(2)
        );
    }

    #[test]
    fn numbers_and_pids_from_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pids.current"), "7\n").unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "12\n13\n").unwrap();
        assert_eq!(number(&dir.path().join("pids.current")), Some(7));
        assert_eq!(number(&dir.path().join("missing")), None);
        assert_eq!(pids(&dir.path().join("cgroup.procs")), [12, 13]);
    }
}
