//! A started plugin process: its pid, its pipes, and how its exit is
//! observed, whichever way it was started.
//!
//! A process forked through tokio's `Command` is waited on by tokio; one
//! born into its cgroup by `clone3` (see [`super::born`]) comes with a
//! pidfd, which becomes readable when it exits and is then reaped here.
//! Either way the pipes are the conductor's own, made before the start.

use std::io;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::process::ExitStatus;

use nix::libc;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

/// One running (or exited, not yet waited for) plugin process.
#[derive(Debug)]
pub struct Child {
    pid: u32,
    exit: Exit,
    /// The write end of its stdin, when a pipe was asked for.
    pub stdin: Option<pipe::Sender>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    /// Copies of the process's own ends of stdout and stderr, when
    /// `SpawnSpec::hold_outputs` asked for them; see [`Outlets`].
    pub outlets: Option<Outlets>,
}

/// The conductor's copies of a child's stdout and stderr write ends.
/// While they are open the child's death does not close its pipes, so
/// the tasks reading them are not woken by end-of-file while it dies: on
/// a busy core each such wake-up preempted the exiting process, which
/// put off the moment its exit could be seen (and a restart begin) by
/// 0.1-0.3 ms. Dropped once the successor is on its way, they let the
/// readers finish.
#[derive(Debug)]
pub struct Outlets {
    _ends: [OwnedFd; 2],
}

#[derive(Debug)]
enum Exit {
    Forked(Box<tokio::process::Child>),
    Born(AsyncFd<OwnedFd>),
    Reaped,
}

/// The conductor's ends of a child's pipes.
#[derive(Debug, Default)]
pub(super) struct Pipes {
    pub stdin: Option<pipe::Sender>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    pub outlets: Option<Outlets>,
}

impl Child {
    pub(super) fn forked(child: tokio::process::Child, pipes: Pipes) -> io::Result<Self> {
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("exited before it could be observed"))?;
        Ok(Self::new(pid, Exit::Forked(Box::new(child)), pipes))
    }

    /// `pidfd` refers to `pid`, a child of this process not yet reaped.
    /// Should the pidfd not be watchable, the child is killed and reaped.
    pub(super) fn born(pid: u32, pidfd: OwnedFd, pipes: Pipes) -> io::Result<Self> {
        // SAFETY: the OwnedFd moves into the AsyncFd, which closes it
        // only when dropped.
        match unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) } {
            Ok(pidfd) => Ok(Self::new(pid, Exit::Born(pidfd), pipes)),
            Err(error) => {
                let (_, cause) = error.into_parts();
                let _ = nix::sys::signal::kill(pid_of(pid), nix::sys::signal::SIGKILL);
                let _ = reap(pid, true);
                Err(cause)
            }
        }
    }

    fn new(pid: u32, exit: Exit, pipes: Pipes) -> Self {
        Self {
            pid,
            exit,
            stdin: pipes.stdin,
            stdout: pipes.stdout,
            stderr: pipes.stderr,
            outlets: pipes.outlets,
        }
    }

    /// Its pid, until it has been waited for.
    pub fn id(&self) -> Option<u32> {
        match &self.exit {
            Exit::Forked(child) => child.id(),
            Exit::Born(_) => Some(self.pid),
            Exit::Reaped => None,
        }
    }

    /// Sends SIGKILL to the process itself (not its group).
    pub fn start_kill(&mut self) -> io::Result<()> {
        match &mut self.exit {
            Exit::Forked(child) => child.start_kill(),
            // Not yet reaped, so the pid is still this process's.
            Exit::Born(_) => nix::sys::signal::kill(pid_of(self.pid), nix::sys::signal::SIGKILL)
                .map_err(io::Error::from),
            Exit::Reaped => Ok(()),
        }
    }

    /// Waits for it to exit and reaps it. Cancel-safe; after the first
    /// answer, later calls fail.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = match &mut self.exit {
            Exit::Forked(child) => child.wait().await?,
            Exit::Born(pidfd) => loop {
                let mut ready = pidfd.readable().await?;
                match reap(self.pid, false)? {
                    Some(status) => break status,
                    None => ready.clear_ready(),
                }
            },
            Exit::Reaped => return Err(io::Error::other("already waited for")),
        };
        if matches!(self.exit, Exit::Born(_)) {
            self.exit = Exit::Reaped;
        }
        Ok(status)
    }
}

impl Drop for Child {
    /// Nobody waited: reap it when it exits, so that no zombie is left.
    /// (Tokio does the same for the processes it forked.)
    fn drop(&mut self) {
        let Exit::Born(pidfd) = std::mem::replace(&mut self.exit, Exit::Reaped) else {
            return;
        };
        let pid = self.pid;
        if let Ok(Some(_)) = reap(pid, false) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if pidfd.readable().await.is_ok() {
                        let _ = reap(pid, true);
                    }
                });
            }
            // No runtime left to wait on: the conductor is exiting, and
            // its own exit hands the child to init.
            Err(_) => drop(pidfd),
        }
    }
}

fn pid_of(pid: u32) -> nix::unistd::Pid {
    nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// `waitpid`, returning the raw status as std understands it; `None` when
/// `block` is false and it has not exited.
fn reap(pid: u32, block: bool) -> io::Result<Option<ExitStatus>> {
    use std::os::unix::process::ExitStatusExt as _;
    let mut status: libc::c_int = 0;
    let flags = if block { 0 } else { libc::WNOHANG };
    loop {
        // SAFETY: a plain system call writing one int we own.
        let result = unsafe { libc::waitpid(pid_of(pid).as_raw(), &mut status, flags) };
        match result {
            0 => return Ok(None),
            r if r > 0 => return Ok(Some(ExitStatus::from_raw(status))),
            _ => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
}

/// The child's ends of its standard streams, all close-on-exec until put
/// in place.
pub(super) struct Ends {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// Pipes for stdout and stderr, and for stdin a pipe or /dev/null; with
/// `hold`, the conductor keeps [`Outlets`]. Must run inside the runtime:
/// the conductor's ends are registered with it.
pub(super) fn pipes(stdin_piped: bool, hold: bool) -> io::Result<(Pipes, Ends)> {
    let (stdin, sender) = if stdin_piped {
        let (read, write) = pipe()?;
        (read, Some(pipe::Sender::from_owned_fd(write)?))
    } else {
        let null = std::fs::File::open("/dev/null")?;
        (OwnedFd::from(null), None)
    };
    let (out_read, out_write) = pipe()?;
    let (err_read, err_write) = pipe()?;
    let outlets = if hold {
        // try_clone keeps close-on-exec: no other child inherits them.
        Some(Outlets {
            _ends: [out_write.try_clone()?, err_write.try_clone()?],
        })
    } else {
        None
    };
    let ours = Pipes {
        stdin: sender,
        stdout: Some(pipe::Receiver::from_owned_fd(out_read)?),
        stderr: Some(pipe::Receiver::from_owned_fd(err_read)?),
        outlets,
    };
    let theirs = Ends {
        stdin: above_stdio(stdin)?,
        stdout: above_stdio(out_write)?,
        stderr: above_stdio(err_write)?,
    };
    Ok((ours, theirs))
}

/// A pipe whose ends are both close-on-exec: the child's end is given to
/// it by `dup2` onto 0, 1 or 2, which clears the flag on the copy only.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Moves `fd` above the standard descriptors if it landed on one (a
/// conductor started with 0, 1 or 2 closed), so that putting one pipe in
/// place cannot overwrite another before it is used.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    let moved = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: fcntl just returned this descriptor, owned by nobody else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(moved) })
}
