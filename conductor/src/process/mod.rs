//! Starting, watching and signalling plugin processes.

mod born;
pub mod cgroup;
mod child;
pub mod output;
pub mod privileges;
pub mod spawner;
pub mod standby;

pub use child::{Child, Outlets};
pub use spawner::{SpawnError, SpawnSpec, Spawner};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Sends `signal` to the process group led by `pid`. Every instance leads
/// its own group, so helpers it forked receive the signal too. A group
/// that is already gone is not an error.
pub fn signal_group(pid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    match killpg(Pid::from_raw(raw), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(error) => tracing::warn!(pid, %signal, %error, "cannot signal process group"),
    }
}
