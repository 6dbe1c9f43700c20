//! Stand-ins: a process started ahead of need in an instance's cgroup,
//! which becomes the instance's next process when the current one dies.
//!
//! Joining a cgroup takes the kernel's cgroup-wide threadgroup lock for
//! writing, and without `favordynmods` (which a cgroup v1 hierarchy cannot
//! gain by remount) that first waits for an RCU grace period: ~6 ms here,
//! three to four times the rest of a restart. A stand-in pays it while the
//! instance is healthy. It is `demi-standin` (the `standin` crate), a
//! small binary installed beside the conductor's, run as `demi-standin
//! PROGRAM ARGS…` with the instance's environment, folder, death signal
//! and cgroup; told to go, it execs the plugin: same pid, same output
//! pipes, nothing left to set up. The go carries the variables that
//! changed since it started.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

/// The stand-in's file name, beside the conductor's binary.
pub const BINARY: &str = "demi-standin";

/// The stand-in binary installed beside `conductor` (the running
/// executable), or why there is none.
pub fn beside(conductor: &Path) -> Result<PathBuf, String> {
    let path = conductor
        .parent()
        .ok_or_else(|| format!("{} has no folder", conductor.display()))?
        .join(BINARY);
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_file() => Ok(path),
        Ok(_) => Err(format!("{} is not a file", path.display())),
        Err(error) => Err(format!("{}: {error}", path.display())),
    }
}

/// The go for a stand-in: each changed variable as a `KEY=VALUE` line,
/// then an empty line. A variable whose name holds `=` or whose name or
/// value holds a newline cannot be carried and is left out (the
/// conductor's own variables never do).
pub fn go(changed: &[(OsString, OsString)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in changed {
        let (key, value) = (key.as_bytes(), value.as_bytes());
        if key.is_empty() || key.contains(&b'=') || key.contains(&b'\n') || value.contains(&b'\n') {
            continue;
        }
        out.extend_from_slice(key);
        out.push(b'=');
        out.extend_from_slice(value);
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_go_is_lines_of_variables_then_an_empty_line() {
        let changed = [
            ("DEMI_REPLICAS".into(), "3".into()),
            ("BAD\nKEY".into(), "x".into()),
            ("A".into(), "b=c".into()),
        ];
        assert_eq!(go(&changed), b"DEMI_REPLICAS=3\nA=b=c\n\n");
        assert_eq!(go(&[]), b"\n");
    }

    #[test]
    fn the_stand_in_is_found_beside_the_conductor_or_its_absence_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let conductor = dir.path().join("conductor");
        let missing = beside(&conductor).unwrap_err();
        assert!(missing.contains(BINARY), "{missing}");
        std::fs::write(dir.path().join(BINARY), b"").unwrap();
        assert_eq!(beside(&conductor).unwrap(), dir.path().join(BINARY));
    }
}
