//! The threads that fork plugin processes.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
//! not the process. Tokio's worker and blocking threads come and go, so a
//! child forked from one of them could be SIGKILLed while the conductor is
//! healthy. Every fork therefore happens on dedicated threads that live
//! exactly as long as the [`Spawner`], which the daemon keeps until every
//! instance has stopped.
//!
//! A spawn blocks its thread until the child has exec'd (that is how a
//! failed exec is reported), so after a crash storm one thread would start
//! a hundred children strictly one after another; a thread per core lets
//! those waits overlap.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use nix::sys::signal::Signal;
use tokio::process::Command;
use tokio::sync::oneshot;

use super::born;
use super::cgroup::Cgroup;
use super::child::{self, Child};
use super::privileges::{self, Privileges};

/// Everything needed to start one instance.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(OsString, OsString)>,
    pub working_dir: PathBuf,
    /// `cgroup.procs` files the child joins before exec (empty: unconfined).
    pub cgroup_procs: Vec<PathBuf>,
    /// A v2 cgroup the child is born in (`clone3` with
    /// `CLONE_INTO_CGROUP`), so it never migrates; where the kernel
    /// refuses that, it joins through `cgroup_procs` instead.
    pub cgroup_dir: Option<PathBuf>,
    /// A pipe for stdin instead of /dev/null (a stand-in reads its go there).
    pub stdin_piped: bool,
    /// Keep [`Outlets`](super::child::Outlets) for the child's output, so
    /// its death does not end the readers of its output before whoever
    /// restarts it lets them go.
    pub hold_outputs: bool,
    /// Who it runs as and which powers it keeps.
    pub privileges: Privileges,
}

impl SpawnSpec {
    /// Starts the child in `cgroup`: born there where the kernel allows,
    /// else joining it before exec. `None`: unconfined.
    pub fn confine_to(&mut self, cgroup: Option<&dyn Cgroup>) {
        self.cgroup_procs = cgroup.map(|c| c.procs_files()).unwrap_or_default();
        self.cgroup_dir = cgroup.and_then(|c| c.birthplace());
    }

    /// The same launch as a stand-in: `standin PROGRAM ARGS…`, which execs
    /// the program once told to (see [`super::standby`]).
    pub fn standby(&self, standin: PathBuf) -> SpawnSpec {
        let mut args = vec![self.program.to_string_lossy().into_owned()];
        args.extend(self.args.iter().cloned());
        SpawnSpec {
            program: standin,
            args,
            stdin_piped: true,
            ..self.clone()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start {program}: {source}")]
    Exec {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {program}: {step}: {source}")]
    Setup {
        program: PathBuf,
        step: &'static str,
        source: std::io::Error,
    },
    #[error("cannot open {path} to join the cgroup: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the spawner thread is gone (the conductor is shutting down)")]
    SpawnerGone,
}

struct Request {
    spec: SpawnSpec,
    reply: oneshot::Sender<Result<Child, SpawnError>>,
}

/// Handle to the spawner thread. Dropping the last handle ends the thread,
/// which kills (by death signal) any child still running.
pub struct Spawner {
    requests: Vec<mpsc::Sender<Request>>,
    threads: Vec<JoinHandle<()>>,
    next: AtomicUsize,
    births: Births,
}

/// Whether children can be born in their cgroup: probed once at start,
/// and given up for good should a spawn be refused after all.
#[derive(Clone)]
struct Births {
    probed: Result<(), String>,
    refused: Arc<AtomicBool>,
}

impl Spawner {
    /// Starts a spawner thread per core (at most [`MAX_THREADS`]).
    /// `runtime` receives the children, so that their exit is observed
    /// through tokio's pidfd-based reaper.
    pub fn start(runtime: tokio::runtime::Handle) -> std::io::Result<Self> {
        let count = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, MAX_THREADS);
        let host = privileges::Host::probe();
        let probed = born::probe();
        let births = Births {
            refused: Arc::new(AtomicBool::new(probed.is_err())),
            probed,
        };
        let mut spawner = Self {
            requests: Vec::with_capacity(count),
            threads: Vec::with_capacity(count),
            next: AtomicUsize::new(0),
            births: births.clone(),
        };
        for i in 0..count {
            let (tx, rx) = mpsc::channel::<Request>();
            let runtime = runtime.clone();
            let births = births.clone();
            let thread = std::thread::Builder::new()
                .name(format!("demi-spawner-{i}"))
                .spawn(move || {
                    let _runtime = runtime.enter();
                    while let Ok(request) = rx.recv() {
                        let _ = request.reply.send(spawn(request.spec, host, &births));
                    }
                })?;
            spawner.requests.push(tx);
            spawner.threads.push(thread);
        }
        Ok(spawner)
    }

    /// Whether children with a [`SpawnSpec::cgroup_dir`] are born in it,
    /// or why they join it by migration instead.
    pub fn births_in_cgroup(&self) -> Result<(), &str> {
        match &self.births.probed {
            Err(why) => Err(why),
            Ok(()) if self.births.refused.load(Ordering::Relaxed) => {
                Err("a spawn was refused (see the warning logged then)")
            }
            Ok(()) => Ok(()),
        }
    }

    /// Forks and execs `spec` on a spawner thread (round robin).
    pub async fn spawn(&self, spec: SpawnSpec) -> Result<Child, SpawnError> {
        let (reply, answer) = oneshot::channel();
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.requests.len().max(1);
        self.requests
            .get(index)
            .ok_or(SpawnError::SpawnerGone)?
            .send(Request { spec, reply })
            .map_err(|_| SpawnError::SpawnerGone)?;
        answer.await.map_err(|_| SpawnError::SpawnerGone)?
    }
}

/// More threads than this only contend for the process's memory map,
/// which every fork locks.
const MAX_THREADS: usize = 4;

impl Drop for Spawner {
    fn drop(&mut self) {
        self.requests.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn spawn(spec: SpawnSpec, host: privileges::Host, births: &Births) -> Result<Child, SpawnError> {
    if let Some(dir) = &spec.cgroup_dir
        && !births.refused.load(Ordering::Relaxed)
    {
        match born::spawn(&spec, dir, host) {
            Ok(child) => return Ok(child),
            Err(born::Failure::Spawn(error)) => return Err(error),
            Err(born::Failure::Refused(why)) => {
                births.refused.store(true, Ordering::Relaxed);
                tracing::warn!(
                    %why,
                    "children can no longer be born in their cgroup; they join it after the fork"
                );
            }
        }
    }
    fork(spec, host)
}

/// Starts `spec` through std's fork and exec; the child joins its cgroup
/// by writing to `cgroup.procs` before the exec.
fn fork(spec: SpawnSpec, host: privileges::Host) -> Result<Child, SpawnError> {
    let conductor = nix::unistd::getpid();
    // Opened before the fork: opening allocates, which a forked child of a
    // multi-threaded process must not do.
    let cgroup_procs = spec
        .cgroup_procs
        .iter()
        .map(|path| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|source| SpawnError::Cgroup {
                    path: path.clone(),
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let failed = |step, source| SpawnError::Setup {
        program: spec.program.clone(),
        step,
        source,
    };
    let (pipes, ends) =
        child::pipes(spec.stdin_piped, spec.hold_outputs).map_err(|e| failed("pipes", e))?;
    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.working_dir)
        .stdin(Stdio::from(ends.stdin))
        .stdout(Stdio::from(ends.stdout))
        .stderr(Stdio::from(ends.stderr))
        // Its own group, so one signal reaches the helpers it forks too.
        // Not setsid(): that fails with EPERM once the child leads a group.
        .process_group(0);
    let privileges = spec.privileges;
    // SAFETY: between fork and exec only async-signal-safe calls are made:
    // write, prctl, the credential calls, capset and getppid are plain
    // system calls that allocate nothing.
    unsafe {
        command.pre_exec(move || {
            // Join the cgroup first, so not one instruction of plugin code
            // runs unconfined; and while still privileged. "0" means the
            // writing process itself.
            for procs in &cgroup_procs {
                nix::unistd::write(procs, b"0")?;
            }
            privileges::apply(&privileges, host)?;
            // After the credentials change, which clears a death signal.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The conductor may have died between fork and prctl; then the
            // death signal will never come, so leave now.
            if nix::unistd::getppid() != conductor {
                return Err(std::io::Error::other("conductor exited during spawn"));
            }
            Ok(())
        });
    }
    let forked = command.spawn().map_err(|source| SpawnError::Exec {
        program: spec.program.clone(),
        source,
    })?;
    // The command holds the child's ends until dropped.
    drop(command);
    Child::forked(forked, pipes).map_err(|e| failed("watching the child", e))
}
