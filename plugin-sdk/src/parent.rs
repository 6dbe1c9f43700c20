//! Noticing that the conductor is gone.
//!
//! The conductor asks the kernel to SIGKILL its children when it dies
//! (`PR_SET_PDEATHSIG`), but a plugin may sit behind a wrapper script or a
//! runtime that re-execs, and then the signal reaches the wrong process. A
//! pidfd on the parent becomes readable when the parent exits: an event, no
//! polling.

use std::os::fd::{FromRawFd, OwnedFd};

use nix::libc;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Resolves when the process that launched this one exits. Never resolves
/// if the parent cannot be watched (no pidfd support): the conductor's death
/// signal remains the first line of defence.
pub(crate) async fn exited() {
    let parent = nix::unistd::getppid().as_raw();
    if parent == 1 {
        // Already re-parented to init: the launcher is gone.
        return;
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, parent, 0) };
    if fd < 0 {
        tracing::warn!(
            parent,
            "cannot watch the parent process (pidfd_open failed)"
        );
        return std::future::pending().await;
    }
    // SAFETY: the syscall just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // The parent may have exited between getppid and pidfd_open, in which
    // case the pidfd names an unrelated process or fails; re-check.
    if nix::unistd::getppid().as_raw() != parent {
        return;
    }
    // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open and
    // unchanged until it is dropped.
    match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
        Ok(watch) => {
            let _ = watch.readable().await;
        }
        Err(error) => {
            let error = error.into_parts().1;
            tracing::warn!(parent, %error, "cannot watch the parent process");
            std::future::pending::<()>().await;
        }
    }
}
