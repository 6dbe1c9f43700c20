//! One conductor per folder: an exclusive `flock` on the folder itself,
//! held for the conductor's life and gone with it however it ends. Two
//! conductors sharing a job store would deliver every job twice; sharing
//! a cgroup root, the second would kill the first's instances as
//! leftovers of an earlier run.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// A folder held; released when dropped.
#[derive(Debug)]
pub struct Claim {
    _lock: Flock<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("cannot lock {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// Another process holds it; its pid when `/proc/locks` tells.
    #[error("{path} is held by another process{}", holder.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Held { path: PathBuf, holder: Option<u32> },
}

/// Takes `folder` for this process, or says who has it. Does not wait.
pub fn claim(folder: &Path) -> Result<Claim, ClaimError> {
    let io = |source| ClaimError::Io {
        path: folder.to_owned(),
        source,
    };
    let file = File::open(folder).map_err(io)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Claim { _lock: lock }),
        Err((file, nix::errno::Errno::EWOULDBLOCK)) => Err(ClaimError::Held {
            path: folder.to_owned(),
            holder: file.metadata().ok().and_then(|m| holder(m.dev(), m.ino())),
        }),
        Err((_, errno)) => Err(io(io::Error::from(errno))),
    }
}

/// The pid holding a `flock` on the file `(dev, ino)`, from `/proc/locks`.
fn holder(dev: u64, ino: u64) -> Option<u32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let id = format!(
        "{:02x}:{:02x}:{ino}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    );
    locks.lines().find_map(|line| {
        // "1: FLOCK  ADVISORY  WRITE 4242 00:1f:1234 0 EOF"; a waiter's
        // line has "->" after the number.
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, "FLOCK", _, _, pid, file, ..] if *file == id => pid.parse().ok(),
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_folder_is_refused_naming_its_holder_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let held = claim(dir.path()).unwrap();
        let refused = claim(dir.path()).unwrap_err();
        match &refused {
            ClaimError::Held { path, holder } => {
                assert_eq!(path, dir.path());
                assert_eq!(*holder, Some(std::process::id()));
            }
            other => panic!("{other:?}"),
        }
        assert!(
            refused
                .to_string()
                .contains(&format!("(pid {})", std::process::id())),
            "{refused}"
        );
        drop(held);
        assert!(claim(dir.path()).is_ok());
        let missing = claim(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(missing, ClaimError::Io { .. }), "{missing:?}");
    }
}
