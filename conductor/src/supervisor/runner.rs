//! Runs one instance: carries out the state machine's actions and turns
//! what happens to the process into events. Everything waits on an event
//! (child exit via pidfd, a probe or check answering, a deadline, a
//! command): nothing polls, so a crash is noticed the moment it happens and
//! the next fork follows at once.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use demi_proto::handshake as hs;
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::breaker::Breaker;
use super::config::PoolConfig;
use super::instance::{Action, Event, ExitReason, Instance, State};
use super::report;
use crate::events::{Bus, CheckOutcome, Event as Published, InstanceEvent, Phase};
use crate::process::cgroup::{Cgroup, Usage};
use crate::process::output::{self, Origin};
use crate::process::{Child, Outlets, SpawnError, SpawnSpec, Spawner, signal_group, standby};
use crate::rpc::HealthError;
use crate::rpc::{ACCEPTED_PROTOCOLS, PluginConnection};

/// What an operator can ask of a running instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Start,
    Stop,
    Restart,
}

/// A snapshot of an instance for status queries.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceStatus {
    pub state: Phase,
    pub pid: Option<u32>,
    pub breaker: Breaker,
    pub restarts: u64,
    pub last_exit: Option<ExitReason>,
    /// Whether the instance runs in its own cgroup.
    pub confined: bool,
    /// Its usage, read when the status is looked at with usage (see
    /// `Supervisor::list_with_usage`); the runner itself leaves it empty.
    pub usage: Option<Usage>,
    /// The most recent exits, oldest first (at most [`HISTORY`]).
    pub history: Vec<ExitRecord>,
    /// Why the conductor last restarted it ("memory", "requested", or how
    /// the process before ended).
    pub last_restart: Option<String>,
    /// When the current process was spawned.
    pub spawned: Option<Instant>,
    /// Why the instance is failed, when it is.
    pub failure: Option<String>,
}

impl InstanceStatus {
    /// The status of an instance whose runner is about to start it.
    pub fn new(confined: bool) -> Self {
        Self {
            state: Phase::Starting,
            pid: None,
            breaker: Breaker::default(),
            restarts: 0,
            last_exit: None,
            confined,
            usage: None,
            history: Vec::new(),
            spawned: None,
            failure: None,
            last_restart: None,
        }
    }
}

/// One past exit of an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitRecord {
    pub at: SystemTime,
    pub pid: Option<u32>,
    pub reason: ExitReason,
    /// How long the process had run.
    pub ran: Duration,
}

/// Exits kept per instance: enough to see a crash loop's pattern.
pub const HISTORY: usize = 10;

/// Where the instance lives and how to start it.
pub struct InstanceSpec {
    pub plugin: Arc<str>,
    pub index: u32,
    pub config: Arc<PoolConfig>,
    pub spawn: SpawnSpec,
    pub socket: PathBuf,
    pub cgroup: Option<Arc<dyn Cgroup>>,
    /// Set when the instance must not be started (see [`Event::Unlaunchable`]).
    pub unlaunchable: Option<String>,
    pub usage_interval: Duration,
    pub bus: Bus,
    /// The pool's membership, which each new process is started with.
    pub members: watch::Receiver<super::pool::Members>,
    /// One memory restart of the pool at a time: its permit is held from
    /// the restart until the new process is SERVING.
    pub memory_restarts: Arc<tokio::sync::Semaphore>,
    /// Where usage comes from without a cgroup.
    pub machine: Arc<crate::machine::Machine>,
    /// The stand-in binary, when this instance keeps stand-ins.
    pub standin: Option<PathBuf>,
}

/// An instance's usage now: from its cgroup, or, unconfined, the main
/// process's own figures (what the machine can say without a cgroup to
/// count its children). `None` for an unconfined instance with no process.
pub fn read_usage(
    cgroup: Option<&dyn Cgroup>,
    pid: Option<u32>,
    machine: &crate::machine::Machine,
) -> Option<Usage> {
    match cgroup {
        Some(cgroup) => Some(cgroup.usage()),
        None => {
            let process = machine.process(pid?)?;
            Some(Usage {
                memory_bytes: process.rss,
                cpu: process.cpu,
                ..Usage::default()
            })
        }
    }
}

/// How long a process serves before a stand-in is prepared for its
/// successor: a fleet starting, or coming back from a mass crash, forks
/// its processes first and their stand-ins a second later, off the path
/// of the starts. A crash sooner than this restarts by a plain fork.
const STANDBY_AFTER: Duration = Duration::from_secs(1);

/// Pause between `Describe` attempts of an instance that fails them.
const DESCRIBE_RETRY: Duration = Duration::from_millis(100);
/// How long a failed process's last stderr line may take to arrive.
const LAST_WORDS_WAIT: Duration = Duration::from_millis(500);
/// The most of that line a Failed reason carries.
const MAX_WORDS: usize = 500;

/// Periodic work of every instance lands on this grid, so a thousand
/// instances checked once a second wake the conductor 20 times a second
/// with 50 checks each, not a thousand times with one: each wakeup is a
/// context switch that costs more than the check it serves.
const TICK_GRID: Duration = Duration::from_millis(50);

/// An interval whose ticks fall on [`TICK_GRID`] (or a tenth of a short
/// period), starting one period from now.
fn aligned_interval(period: Duration) -> tokio::time::Interval {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    let first = Instant::now() + period;
    // Short periods (tests, tight checks) keep their precision.
    let grid = TICK_GRID.min(period / 10).as_nanos().max(1);
    let offset = first.saturating_duration_since(epoch).as_nanos();
    let up = (grid - offset % grid) % grid;
    let start = first + Duration::from_nanos(up as u64);
    let mut interval = tokio::time::interval_at(start.into(), period);
    // Skip, not Delay: a late tick must not move the rest off the grid.
    interval.set_missed_tick_behavior(MissedTickBehavior::Skip);
    interval
}

type Pending<T> = Option<Pin<Box<dyn Future<Output = T> + Send>>>;

/// Awaits an optional future; never resolves when there is none.
async fn maybe<T>(slot: &mut Pending<T>) -> T {
    match slot {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// The next tick of an optional timer; never without one.
async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn wait_exit(child: &mut Option<Child>) -> std::io::Result<std::process::ExitStatus> {
    match child {
        Some(child) => child.wait().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Drives one instance until `cancel` fires and the instance has stopped.
pub async fn run(
    spec: InstanceSpec,
    spawner: Arc<Spawner>,
    mut commands: mpsc::Receiver<Command>,
    status: watch::Sender<InstanceStatus>,
    cancel: CancellationToken,
) {
    let span = tracing::info_span!("instance", plugin = %spec.plugin, instance = spec.index);
    Runner {
        machine: Instance::new(spec.config.clone(), Arc::from(ACCEPTED_PROTOCOLS)),
        spec,
        spawner,
        status,
        child: None,
        connection: None,
        outputs: JoinSet::new(),
        last_line: Default::default(),
        oom_kills_at_spawn: 0,
        ended: None,
        history: VecDeque::with_capacity(HISTORY),
        life: tracing::Span::none(),
        standby: None,
        standby_exe: None,
        memory_above_since: None,
        memory_permit: None,
    }
    .drive(&mut commands, &cancel)
    .instrument(span)
    .await
}

/// What the runner waits for besides the process, and how it is leaving.
struct Waits {
    /// SERVING, then `Describe`, while starting.
    probe: Pending<(PluginConnection, u32)>,
    /// A periodic health check in flight.
    check: Pending<(Result<(), HealthError>, Duration)>,
    /// `Shutdown`, then SIGTERM, while stopping.
    terminate: Pending<()>,
    /// The next process, being prepared in the cgroup (a stand-in).
    preparing: Pending<Result<Child, SpawnError>>,
    /// When to start preparing a stand-in for the process serving now.
    standby_at: Option<Instant>,
    check_interval: Duration,
    check_tick: tokio::time::Interval,
    /// Reads the instance's memory, for `restart.on_memory_above` only:
    /// usage nobody acts on is read when someone looks, so an idle
    /// conductor does not wake for it.
    memory_tick: Option<tokio::time::Interval>,
    /// `health = "none"`: no gRPC, so no probe and no checks.
    plain: bool,
    /// The instance stops for good once it is down.
    shutting_down: bool,
    /// The pool still holds the command channel.
    commands_open: bool,
}

impl Waits {
    fn new(spec: &InstanceSpec) -> Self {
        let check_interval = spec.config.health.config().interval;
        Self {
            probe: None,
            check: None,
            terminate: None,
            preparing: None,
            standby_at: None,
            check_interval,
            check_tick: aligned_interval(check_interval),
            memory_tick: spec
                .config
                .restart
                .on_memory_above
                .map(|_| aligned_interval(spec.usage_interval)),
            plain: spec.config.health.is_none(),
            shutting_down: false,
            commands_open: true,
        }
    }
}

/// Why the runner woke up.
enum Wake {
    Exited(std::io::Result<std::process::ExitStatus>),
    Ready(PluginConnection, u32),
    Checked(Result<(), HealthError>, Duration),
    Terminated,
    Prepared(Result<Child, SpawnError>),
    Deadline,
    StandbyDue,
    CheckDue,
    MemoryDue,
    Command(Option<Command>),
    Cancelled,
}

/// Left by an exit for the start that may follow it at once: nothing of
/// it is read again on the restart's path.
struct Ended {
    /// The process's output ends: its readers end once these are dropped,
    /// after the successor is on its way (see `process::Outlets`).
    outlets: Option<Outlets>,
    /// The cgroup's OOM kill count, read at the exit.
    oom_kills: Option<u64>,
}

struct Runner {
    spec: InstanceSpec,
    machine: Instance,
    spawner: Arc<Spawner>,
    status: watch::Sender<InstanceStatus>,
    child: Option<Child>,
    connection: Option<PluginConnection>,
    /// Tasks forwarding the child's stdout and stderr; they end with the pipes.
    outputs: JoinSet<()>,
    /// The last line the current process wrote to stderr.
    last_line: output::LastLine,
    /// The cgroup's OOM kill count when the current process was spawned.
    oom_kills_at_spawn: u64,
    /// What the exit being handled leaves to a successor started in the
    /// same step; cleared once the step is over.
    ended: Option<Ended>,
    history: VecDeque<ExitRecord>,
    /// The span of the current process life: plugin, instance and the
    /// `lifecycle` id that is on every event of that life and every line
    /// the process prints. A new span per life (recording a new value on
    /// one long-lived span would append, not replace).
    life: tracing::Span,
    /// A stand-in waiting in the cgroup to become the next process (see
    /// `process::standby`).
    standby: Option<Child>,
    /// What a stand-in runs; `None` when stand-ins are off or failed.
    standby_exe: Option<PathBuf>,
    /// Since when the current process's memory is above
    /// `restart.on_memory_above`.
    memory_above_since: Option<Instant>,
    /// The pool's memory-restart permit while this instance restarts for
    /// memory, with the pid it restarts.
    memory_permit: Option<(tokio::sync::OwnedSemaphorePermit, Option<u32>)>,
}

impl Runner {
    /// The runner's loop: arrange what to wait for in the current state,
    /// wait for the first thing to happen, turn it into a machine event
    /// (or handle it on the side), step the machine, carry out its actions.
    async fn drive(&mut self, commands: &mut mpsc::Receiver<Command>, cancel: &CancellationToken) {
        let mut waits = Waits::new(&self.spec);
        self.standby_exe = self.spec.standin.clone();
        self.apply(Event::StartRequested).await;
        while !(waits.shutting_down && self.machine.state().phase().is_down()) {
            self.arrange(&mut waits);
            let wake = self.wait(&mut waits, commands, cancel).await;
            let Some(event) = self.on(wake, &mut waits).await else {
                continue;
            };
            for action in self.apply(event).await {
                if let Some(future) = self.execute(action) {
                    waits.terminate = Some(future);
                }
            }
        }
        self.wind_down(waits).await;
    }

    /// Starts or drops what the current state waits for: the readiness
    /// probe while starting, health checks while live, a stand-in while
    /// serving (so the next process pays the cgroup join off the restart's
    /// path).
    fn arrange(&mut self, waits: &mut Waits) {
        // A memory restart is over once a new process serves, or the
        // instance is down: the pool's next one may go.
        if let Some((_, old)) = &self.memory_permit {
            let phase = self.machine.state().phase();
            let over = phase.is_down()
                || phase == Phase::Backoff
                || (phase == Phase::Serving && self.machine.pid() != *old);
            if over {
                self.memory_permit = None;
            }
        }
        let plain = self.spec.config.health.is_none();
        if !self.machine.awaits_readiness() {
            waits.probe = None;
        } else if waits.probe.is_none() && !plain {
            waits.probe = Some(Box::pin(ready(
                self.spec.socket.clone(),
                self.spec.config.startup_timeout,
            )));
        }
        if !self.machine.checks_health() {
            waits.check = None;
        }
        let wants_standby = self.standby_exe.is_some()
            && self.standby.is_none()
            && waits.preparing.is_none()
            && !waits.shutting_down
            && matches!(self.machine.state(), State::Serving { .. });
        if !wants_standby {
            waits.standby_at = None;
        } else if waits.standby_at.is_none() {
            waits.standby_at = Some(Instant::now() + STANDBY_AFTER);
        }
    }

    /// Starts preparing a stand-in, if one is still wanted.
    fn prepare_standby(&mut self, waits: &mut Waits) {
        if let Some(exe) = &self.standby_exe
            && waits.standby_at.take().is_some()
        {
            let spawner = self.spawner.clone();
            let spec = self.spec.spawn.standby(exe.clone());
            waits.preparing = Some(Box::pin(async move { spawner.spawn(spec).await }));
        }
    }

    /// The first thing to happen, of everything the runner waits for.
    async fn wait(
        &mut self,
        waits: &mut Waits,
        commands: &mut mpsc::Receiver<Command>,
        cancel: &CancellationToken,
    ) -> Wake {
        let deadline = self.machine.deadline();
        let checks = self.machine.checks_health() && waits.check.is_none() && !waits.plain;
        tokio::select! {
            exit = wait_exit(&mut self.child) => Wake::Exited(exit),
            (connection, version) = maybe(&mut waits.probe) => Wake::Ready(connection, version),
            (result, took) = maybe(&mut waits.check) => Wake::Checked(result, took),
            () = maybe(&mut waits.terminate) => Wake::Terminated,
            prepared = maybe(&mut waits.preparing) => Wake::Prepared(prepared),
            () = sleep_until(deadline) => Wake::Deadline,
            () = sleep_until(waits.standby_at), if waits.standby_at.is_some() => Wake::StandbyDue,
            _ = waits.check_tick.tick(), if checks => Wake::CheckDue,
            () = tick(&mut waits.memory_tick), if self.spec.cgroup.is_some() || self.machine.pid().is_some() => Wake::MemoryDue,
            command = commands.recv(), if waits.commands_open => Wake::Command(command),
            () = cancel.cancelled(), if !waits.shutting_down => Wake::Cancelled,
        }
    }

    /// What a wake-up means to the machine, if anything.
    async fn on(&mut self, wake: Wake, waits: &mut Waits) -> Option<Event> {
        match wake {
            Wake::Exited(exit) => {
                waits.terminate = None;
                Some(self.on_exit(exit).await)
            }
            Wake::Ready(connection, protocol_version) => {
                waits.probe = None;
                self.connection = Some(connection);
                // The first periodic check comes an interval after ready.
                waits.check_tick = aligned_interval(waits.check_interval);
                Some(Event::Ready { protocol_version })
            }
            Wake::Checked(result, took) => {
                waits.check = None;
                Some(self.on_check(result, took))
            }
            Wake::Terminated => {
                waits.terminate = None;
                None
            }
            Wake::Prepared(prepared) => {
                waits.preparing = None;
                self.on_prepared(prepared);
                None
            }
            Wake::Deadline => Some(Event::Deadline),
            Wake::StandbyDue => {
                self.prepare_standby(waits);
                None
            }
            Wake::CheckDue => {
                waits.check = self.check();
                None
            }
            Wake::MemoryDue => self.check_memory(),
            Wake::Command(Some(Command::Start)) => Some(Event::StartRequested),
            Wake::Command(Some(Command::Stop)) => Some(Event::StopRequested),
            Wake::Command(Some(Command::Restart)) => Some(Event::RestartRequested),
            // The pool is gone: nobody can start us again, so stop.
            Wake::Command(None) => {
                waits.commands_open = false;
                waits.shutting_down = true;
                Some(Event::StopRequested)
            }
            Wake::Cancelled => {
                waits.shutting_down = true;
                Some(Event::StopRequested)
            }
        }
    }

    async fn on_exit(&mut self, exit: std::io::Result<std::process::ExitStatus>) -> Event {
        let outlets = self.child.take().and_then(|mut child| child.outlets.take());
        // Helpers the plugin forked into its group die with it.
        if let Some(pid) = self.machine.pid() {
            signal_group(pid, Signal::SIGKILL);
        }
        self.connection = None;
        let oom_kills = self.spec.cgroup.as_ref().map(|c| c.oom_kills());
        let reason = match exit {
            Ok(status) => self.exit_reason(status, oom_kills),
            Err(error) => ExitReason::SpawnFailed(format!("wait failed: {error}")),
        };
        self.ended = Some(Ended { outlets, oom_kills });
        // Whatever escaped the process group (a double-forked daemon) dies
        // before a successor starts.
        self.empty_cgroup().await;
        // A plugin killed (OOM, SIGKILL) cannot unlink its socket; left,
        // it would outlast the conductor's stop.
        let _ = std::fs::remove_file(&self.spec.socket);
        let said = match reason {
            ExitReason::Code(code)
                if self
                    .spec
                    .config
                    .restart
                    .never_restart_exit_codes
                    .contains(&code) =>
            {
                self.last_words().await
            }
            _ => None,
        };
        Event::Exited { reason, said }
    }

    fn on_check(&mut self, result: Result<(), HealthError>, took: Duration) -> Event {
        let outcome = match &result {
            Ok(()) => CheckOutcome::Serving,
            Err(HealthError::NotServing(_)) => CheckOutcome::NotServing,
            Err(HealthError::Timeout(_)) => CheckOutcome::Timeout,
            Err(HealthError::Rpc(_)) => CheckOutcome::Error,
        };
        self.publish_event(
            self.machine.pid(),
            InstanceEvent::HealthChecked { outcome, took },
        );
        match result {
            Ok(()) => Event::HealthPassed,
            Err(why) => Event::HealthFailed {
                why: why.to_string(),
            },
        }
    }

    /// One health check, timed, on the live connection.
    fn check(&self) -> Pending<(Result<(), HealthError>, Duration)> {
        let connection = self.connection.clone()?;
        let service = self.spec.plugin.to_string();
        let timeout = self.spec.config.health.config().timeout;
        Some(Box::pin(async move {
            let started = Instant::now();
            let result = connection.check(&service, timeout).await;
            (result, started.elapsed())
        }))
    }

    fn on_prepared(&mut self, prepared: Result<Child, SpawnError>) {
        match prepared {
            Ok(standby) => {
                tracing::debug!(pid = standby.id(), "stand-in ready");
                self.standby = Some(standby);
            }
            Err(error) => {
                tracing::warn!(%error, "cannot start a stand-in; restarts will fork as usual");
                self.standby_exe = None;
            }
        }
    }

    /// After the last stop: no stand-in, no output left unlogged, no cgroup.
    async fn wind_down(&mut self, mut waits: Waits) {
        if let Some(prepared) = waits.preparing.take()
            && let Ok(standby) = prepared.await
        {
            self.standby = Some(standby);
        }
        if let Some(mut standby) = self.standby.take() {
            let _ = standby.start_kill();
            let _ = standby.wait().await;
        }
        // Whatever the plugin left in its pipes is still worth logging.
        while self.outputs.join_next().await.is_some() {}
        if let Some(cgroup) = self.spec.cgroup.clone() {
            let removed = tokio::task::spawn_blocking(move || {
                cgroup.kill_all()?;
                cgroup.remove()
            })
            .await;
            match removed {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "cannot remove the instance's cgroup"),
                Err(error) => tracing::error!(%error, "cgroup removal panicked"),
            }
        }
    }

    /// Kills every process left in the instance's cgroup.
    async fn empty_cgroup(&self) {
        let Some(cgroup) = self.spec.cgroup.clone() else {
            return;
        };
        let keep = self.standby.as_ref().and_then(Child::id);
        if cgroup.procs().iter().all(|&pid| Some(pid) == keep) {
            return;
        }
        let emptied = tokio::task::spawn_blocking(move || cgroup.kill_all_but(keep));
        match emptied.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "cannot empty the instance's cgroup"),
            Err(error) => tracing::error!(%error, "emptying the cgroup panicked"),
        }
    }

    fn publish_event(&self, pid: Option<u32>, what: InstanceEvent) {
        self.spec.bus.emit(Published::instance(
            &self.spec.plugin,
            self.spec.index,
            pid,
            what,
        ));
    }

    fn record_exit(&mut self, before: &State, reason: ExitReason) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(ExitRecord {
            at: SystemTime::now(),
            pid: before.pid(),
            reason,
            ran: before.since().map_or(Duration::ZERO, |s| s.elapsed()),
        });
    }

    /// Reads the instance's memory; a memory restart when the process has
    /// stayed above `restart.on_memory_above` long enough and no other
    /// instance of the pool is restarting for memory.
    fn check_memory(&mut self) -> Option<Event> {
        let usage = read_usage(
            self.spec.cgroup.as_deref(),
            self.machine.pid(),
            &self.spec.machine,
        )?;
        tracing::debug!(
            pid = self.machine.pid(),
            memory_bytes = usage.memory_bytes,
            memory_peak_bytes = usage.memory_peak_bytes,
            "instance memory"
        );
        let restart = &self.spec.config.restart;
        let ceiling = restart.on_memory_above?;
        let serving = matches!(
            self.machine.state(),
            State::Serving { .. } | State::Unhealthy { .. }
        );
        if !serving || usage.memory_bytes <= ceiling.as_u64() {
            self.memory_above_since = None;
            return None;
        }
        let since = *self.memory_above_since.get_or_insert_with(Instant::now);
        if since.elapsed() < restart.memory_restart_after || self.memory_permit.is_some() {
            return None;
        }
        let permit = self.spec.memory_restarts.clone().try_acquire_owned().ok()?;
        tracing::warn!(
            pid = self.machine.pid(),
            memory_bytes = usage.memory_bytes,
            ceiling = ceiling.as_u64(),
            above_ms = since.elapsed().as_millis() as u64,
            "memory above its ceiling; restarting gracefully"
        );
        self.memory_permit = Some((permit, self.machine.pid()));
        self.memory_above_since = None;
        Some(Event::MemoryAbove)
    }

    /// The last line the process wrote to stderr: its explanation of an
    /// exit that fails it. The pipes close with the process group once
    /// the conductor lets go of its outlets, so the forwarders end at
    /// once; the wait is bounded all the same.
    async fn last_words(&mut self) -> Option<String> {
        if let Some(ended) = &mut self.ended {
            drop(ended.outlets.take());
        }
        let drained = async { while self.outputs.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(LAST_WORDS_WAIT, drained).await;
        let last = self
            .last_line
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        last.map(|line| line.chars().take(MAX_WORDS).collect())
    }

    /// How the process ended. A SIGKILL counts as an OOM kill only if the
    /// cgroup's OOM counter (`oom_kills`, read at the exit) moved while the
    /// process lived.
    fn exit_reason(&self, status: std::process::ExitStatus, oom_kills: Option<u64>) -> ExitReason {
        let reason = exit_reason(status);
        let oom = reason == ExitReason::Signal(Signal::SIGKILL as i32)
            && oom_kills.is_some_and(|kills| kills > self.oom_kills_at_spawn);
        if oom { ExitReason::Oom } else { reason }
    }

    /// Steps the machine, spawning right away when asked (the spawn's
    /// outcome is the next event), and returns the remaining actions.
    async fn apply(&mut self, event: Event) -> Vec<Action> {
        let pending = self.step(event).await;
        // A successor, if any, has started: what the exit left goes.
        self.ended = None;
        pending
    }

    /// `event` and the events it leads to, one machine step each.
    async fn step(&mut self, event: Event) -> Vec<Action> {
        let mut event = Some(event);
        let mut pending = Vec::new();
        while let Some(next) = event.take() {
            let before = self.machine.state().clone();
            let breaker_before = self.machine.breaker();
            let actions = match self
                .machine
                .step(next.clone(), Instant::now(), fastrand::f64())
            {
                Ok(actions) => actions,
                Err(illegal) => {
                    self.publish_event(
                        self.machine.pid(),
                        InstanceEvent::IllegalTransition {
                            from: illegal.from,
                            event: format!("{:?}", illegal.event),
                        },
                    );
                    return pending;
                }
            };
            if let Event::Exited { reason, .. } = &next {
                self.record_exit(&before, reason.clone());
            }
            let happened: Vec<Published> = report::describe(
                &before,
                &next,
                &self.machine,
                breaker_before,
                Instant::now(),
            )
            .into_iter()
            .map(|(pid, what)| Published::instance(&self.spec.plugin, self.spec.index, pid, what))
            .collect();
            // A successor is started before what led to it is told: on a
            // restart the stand-in execs while the exit's lines are
            // written, instead of after them. They stay in the life that
            // ended, and come before the new process's own.
            let life = self.life.clone();
            for action in actions {
                if action == Action::Spawn {
                    event = Some(self.spawn().await);
                } else {
                    pending.push(action);
                }
            }
            // The status and the log change together (see `publish_with`), and
            // only then the stream: whoever reacts to an event reads fresh
            // status.
            self.publish_with(&happened, &life);
            for event in happened {
                self.spec.bus.stream(event);
            }
            // A plain process (health = "none") is ready once it runs.
            if event.is_none()
                && self.spec.config.health.is_none()
                && self.machine.awaits_readiness()
            {
                event = Some(Event::Ready {
                    protocol_version: ACCEPTED_PROTOCOLS[0],
                });
            }
        }
        pending
    }

    fn execute(&mut self, action: Action) -> Pending<()> {
        match action {
            Action::Spawn => None,
            Action::Terminate { pid, grace } => {
                let connection = self.connection.clone();
                let timeout = self.spec.config.health.config().timeout;
                Some(Box::pin(async move {
                    if let Some(connection) = connection
                        && let Err(status) = connection.shutdown(grace, timeout.min(grace)).await
                    {
                        tracing::debug!(pid, %status, "Shutdown call failed; signalling");
                    }
                    signal_group(pid, Signal::SIGTERM);
                }))
            }
            Action::Kill { pid } => {
                tracing::warn!(pid, "grace expired, sending SIGKILL");
                signal_group(pid, Signal::SIGKILL);
                // A stopped process must run to die.
                signal_group(pid, Signal::SIGCONT);
                None
            }
        }
    }

    async fn spawn(&mut self) -> Event {
        if let Some(reason) = &self.spec.unlaunchable {
            return Event::Unlaunchable {
                reason: reason.clone(),
            };
        }
        // A socket left by the previous instance would answer nothing, or
        // worse, pass a probe before the new process has bound. An exit
        // in this step has removed it already.
        if self.ended.is_none() {
            let _ = std::fs::remove_file(&self.spec.socket);
        }
        if let Some(cgroup) = &self.spec.cgroup {
            let read = self.ended.as_ref().and_then(|ended| ended.oom_kills);
            self.oom_kills_at_spawn = read.unwrap_or_else(|| cgroup.oom_kills());
        }
        // The pool's size as it is now: a stand-in started before the
        // last scale learns it with its go.
        let replicas = self.spec.members.borrow().replicas;
        let changed = [(hs::REPLICAS_KEY.into(), replicas.to_string().into())];
        let adopted = match self.standby.take() {
            Some(standby) => adopt(standby, &changed).await,
            None => None,
        };
        let spawned = match adopted {
            Some(child) => Ok(child),
            None => {
                let mut spawn = self.spec.spawn.clone();
                super::pool::set_env(&mut spawn.env, hs::REPLICAS_KEY, replicas.to_string());
                self.spawner.spawn(spawn).await
            }
        };
        // The new life's span is made once the process is on its way.
        let lifecycle: Arc<str> = Arc::from(format!("{:016x}", fastrand::u64(..)));
        self.life = tracing::info_span!(
            parent: None,
            "instance",
            plugin = %self.spec.plugin,
            instance = self.spec.index,
            lifecycle = %lifecycle
        );
        match spawned {
            Ok(mut child) => {
                let Some(pid) = child.id() else {
                    return Event::SpawnFailed {
                        error: "child exited before it could be observed".into(),
                    };
                };
                let origin = Origin {
                    plugin: self.spec.plugin.clone(),
                    instance: self.spec.index,
                    pid,
                    lifecycle,
                    budget: Default::default(),
                };
                if let Some(stdout) = child.stdout.take() {
                    self.outputs
                        .spawn(output::forward(stdout, "stdout", origin.clone(), None));
                }
                self.last_line = Default::default();
                if let Some(stderr) = child.stderr.take() {
                    let last = Some(self.last_line.clone());
                    self.outputs
                        .spawn(output::forward(stderr, "stderr", origin, last));
                }
                self.child = Some(child);
                Event::Spawned { pid }
            }
            Err(error) => Event::SpawnFailed {
                error: error.to_string(),
            },
        }
    }

    /// Publishes the status and logs `happened` as one change: the lines
    /// are written while the status is locked for writing, so whoever
    /// reads the new status finds what led to it logged (a rolling
    /// restart's next step never precedes the previous instance's
    /// "serving" line), and whoever saw a line reads at least that status.
    fn publish_with(&self, happened: &[Published], life: &tracing::Span) {
        let restarted = happened.iter().rev().find_map(|event| match event {
            Published::Instance {
                what: InstanceEvent::Restarting { cause },
                ..
            } => Some(cause.label().to_owned()),
            _ => None,
        });
        let mut status = InstanceStatus {
            state: self.machine.state().phase(),
            pid: self.machine.pid(),
            breaker: self.machine.breaker(),
            restarts: self.machine.restarts(),
            last_exit: self.machine.last_exit().cloned(),
            confined: self.spec.cgroup.is_some(),
            usage: None,
            history: self.history.iter().cloned().collect(),
            spawned: self.machine.state().since(),
            failure: match self.machine.state() {
                State::Failed { reason } => Some(reason.to_string()),
                _ => None,
            },
            last_restart: None,
        };
        self.status.send_if_modified(|current| {
            status.last_restart = restarted.or_else(|| current.last_restart.take());
            // In the life's span, so every line carries its lifecycle id.
            life.in_scope(|| {
                for event in happened {
                    self.spec.bus.record(event);
                }
            });
            let changed = *current != status;
            *current = status;
            changed
        });
    }
}

/// Tells a stand-in to exec the plugin; `None` (and the stand-in reaped)
/// when it is no longer there to be told.
async fn adopt(mut standby: Child, changed: &[(OsString, OsString)]) -> Option<Child> {
    use tokio::io::AsyncWriteExt as _;
    let told = match standby.stdin.take() {
        // Dropped after the write: the stand-in's stdin closes with it.
        Some(mut go) => go.write_all(&standby::go(changed)).await.is_ok(),
        None => false,
    };
    if told && standby.id().is_some() {
        return Some(standby);
    }
    let _ = standby.start_kill();
    let _ = standby.wait().await;
    None
}

/// Waits for SERVING, then asks `Describe` for the protocol version. A
/// plugin that serves health but not the Plugin service is retried (and
/// said so once) until the startup timeout gives up on it.
async fn ready(socket: PathBuf, timeout: Duration) -> (PluginConnection, u32) {
    let mut warned = false;
    loop {
        let connection = PluginConnection::await_serving(&socket).await;
        match connection.describe(timeout).await {
            Ok(description) => return (connection, description.protocol_version),
            Err(status) if !warned => {
                warned = true;
                tracing::warn!(code = %status.code(), message = status.message(), "instance answers health but not Describe");
            }
            Err(_) => {}
        }
        tokio::time::sleep(DESCRIBE_RETRY).await;
    }
}

fn exit_reason(status: std::process::ExitStatus) -> ExitReason {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitReason::Code(code),
        (None, Some(signal)) => ExitReason::Signal(signal),
        (None, None) => ExitReason::Code(-1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One check per interval per instance, whatever else the runtime
    /// does: ticks come a period apart, start a period from now (on the
    /// grid), and one missed while the runner was busy is skipped, not
    /// made up for with a burst.
    #[tokio::test(start_paused = true)]
    async fn periodic_work_ticks_once_per_period_and_skips_what_it_missed() {
        let period = Duration::from_millis(200);
        let start = tokio::time::Instant::now();
        let mut ticks = aligned_interval(period);
        let mut at = Vec::new();
        for _ in 0..5 {
            ticks.tick().await;
            at.push(start.elapsed());
        }
        let grid = TICK_GRID.min(period / 10);
        assert!(
            at[0] >= period && at[0] <= period + grid + Duration::from_millis(5),
            "{at:?}"
        );
        for pair in at.windows(2) {
            assert_eq!(pair[1] - pair[0], period, "{at:?}");
        }
        // Busy for two and a half periods: one late tick, then the grid.
        tokio::time::advance(period * 5 / 2).await;
        ticks.tick().await;
        let late = start.elapsed();
        ticks.tick().await;
        let next = start.elapsed();
        assert!(next > late, "no burst of missed ticks");
        assert_eq!(
            (next - at[0]).as_nanos() % period.as_nanos(),
            0,
            "back on the grid"
        );
    }
}
