//! `conductor plugin-check`: launches any plugin through the real
//! handshake, exactly the way the conductor does (its spawner, process
//! group and death signal, the same environment, its own cgroup when the
//! host allows), and checks it against the contract in proto/README.md,
//! one named check at a time. What it cannot judge by itself (whether an
//! answer is right) it says is unchecked, unless given a probe.

pub mod parent;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use demi_proto::handshake as hs;
use demi_proto::plugin::v1 as pb;
use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt as _;

use std::sync::{Arc, Mutex};

use crate::process::cgroup::{Cgroup, Cgroups};
use crate::process::privileges::Privileges;
use crate::process::{Child, SpawnSpec, Spawner, signal_group};
use crate::rpc::{ACCEPTED_PROTOCOLS, PluginConnection};

/// One check's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// Not run: an earlier check it needs failed, or it does not apply.
    Skip,
    /// Run, but nothing said what the right result is (a job's outcome
    /// without `--probe … --expect-ok`): neither pass nor fail.
    Unchecked,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub checks: Vec<Check>,
    /// How the plugin was confined (or why not).
    pub confinement: String,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.verdict != Verdict::Fail)
    }
}

/// A job to send and what its kind and payload are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub kind: String,
    pub payload: Vec<u8>,
}

/// What to check and how long to wait.
#[derive(Debug, Clone)]
pub struct Options {
    pub name: String,
    pub startup_timeout: Duration,
    pub grace: Duration,
    /// Jobs to send instead of the default echo job.
    pub probes: Vec<Probe>,
    /// Each probe must answer OUTCOME_OK.
    pub expect_ok: bool,
    /// Where the plugin starts, as `working_dir` in the config would say
    /// (the current folder when unset).
    pub working_dir: Option<PathBuf>,
    /// Who the plugin runs as, as the config's `user` and `group` say.
    pub privileges: Privileges,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            name: "plugin-check".into(),
            startup_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(2),
            probes: Vec::new(),
            expect_ok: false,
            working_dir: None,
            privileges: Privileges::default(),
        }
    }
}

struct Bench {
    spawner: Spawner,
    cgroups: Option<Cgroups>,
    dir: PathBuf,
    program: PathBuf,
    args: Vec<String>,
    options: Options,
    runs: u32,
    /// Every cgroup a launch made, emptied and removed at the end.
    made: Vec<Arc<dyn Cgroup>>,
}

struct Launched {
    child: Child,
    pid: u32,
    socket: PathBuf,
    /// What the process wrote to stderr so far (the last [`KEPT_STDERR`]
    /// bytes), to show beside a failure.
    stderr: Arc<Mutex<String>>,
}

/// Stderr kept per launch.
const KEPT_STDERR: usize = 4096;

impl Launched {
    /// `detail`, followed by the plugin's last stderr lines if it said
    /// anything.
    fn explained(&self, detail: String) -> String {
        let said = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        let lines: Vec<&str> = said.lines().rev().take(6).collect();
        if lines.is_empty() {
            return detail;
        }
        let shown: Vec<&str> = lines.into_iter().rev().collect();
        format!(
            "{detail}\n        plugin stderr: {}",
            shown.join("\n          ")
        )
    }
}

/// Drains the child's output so it never blocks on a full pipe, keeping
/// the end of its stderr.
fn capture(child: &mut Child) -> Arc<Mutex<String>> {
    let kept = Arc::new(Mutex::new(String::new()));
    if let Some(mut out) = child.stdout.take() {
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut out, &mut tokio::io::sink()).await;
        });
    }
    if let Some(mut err) = child.stderr.take() {
        let kept = kept.clone();
        tokio::spawn(async move {
            let mut chunk = [0u8; 1024];
            while let Ok(n) = err.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                let mut text = kept.lock().unwrap_or_else(|p| p.into_inner());
                text.push_str(&String::from_utf8_lossy(&chunk[..n]));
                if text.len() > KEPT_STDERR {
                    let cut = text.len() - KEPT_STDERR;
                    let cut = (cut..text.len())
                        .find(|i| text.is_char_boundary(*i))
                        .unwrap_or(text.len());
                    text.drain(..cut);
                }
            }
        });
    }
    kept
}

impl Bench {
    fn socket(&self) -> PathBuf {
        self.dir
            .join(format!("{}-{}.sock", self.options.name, self.runs))
    }

    fn env(&self, socket: &Path, cookie: bool) -> Vec<(OsString, OsString)> {
        let versions = ACCEPTED_PROTOCOLS
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        // What the conductor sets (supervisor/pool.rs), with a plugin API
        // socket nobody serves: plugin-check is not a conductor.
        let mut env: Vec<(OsString, OsString)> = vec![
            (hs::PROTOCOL_VERSIONS_KEY.into(), versions.into()),
            (hs::SOCKET_KEY.into(), socket.into()),
            (hs::NAME_KEY.into(), self.options.name.clone().into()),
            (hs::INSTANCE_KEY.into(), "0".into()),
            (hs::REPLICAS_KEY.into(), "1".into()),
            (
                hs::CONDUCTOR_SOCKET_KEY.into(),
                self.dir.join("plugin-api.sock").into(),
            ),
            (
                hs::CONDUCTOR_TOKEN_KEY.into(),
                format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)).into(),
            ),
        ];
        if cookie {
            env.push((hs::MAGIC_COOKIE_KEY.into(), hs::MAGIC_COOKIE_VALUE.into()));
        }
        env
    }

    async fn launch(
        &mut self,
        program: PathBuf,
        args: Vec<String>,
        cookie: bool,
    ) -> Result<Launched, String> {
        self.runs += 1;
        let socket = self.socket();
        let cgroup = self.cgroups.as_ref().and_then(|c| {
            c.create(&self.options.name, self.runs, &Default::default())
                .ok()
        });
        let mut spec = SpawnSpec {
            program,
            args,
            env: self.env(&socket, cookie),
            working_dir: self
                .options
                .working_dir
                .clone()
                .or_else(|| std::env::current_dir().ok())
                .unwrap_or_else(|| "/".into()),
            cgroup_procs: Vec::new(),
            cgroup_dir: None,
            stdin_piped: false,
            hold_outputs: false,
            privileges: self.options.privileges,
        };
        spec.confine_to(cgroup.as_deref());
        self.made.extend(cgroup);
        let child = self.spawner.spawn(spec).await.map_err(|e| e.to_string())?;
        let pid = child.id().ok_or("exited before it could be observed")?;
        Ok(Launched {
            child,
            pid,
            socket,
            stderr: Arc::new(Mutex::new(String::new())),
        })
    }

    /// The plugin as the conductor runs it, its output drained.
    async fn launch_plugin(&mut self) -> Result<Launched, String> {
        let mut launched = self
            .launch(self.program.clone(), self.args.clone(), true)
            .await?;
        launched.stderr = capture(&mut launched.child);
        Ok(launched)
    }
}

/// Waits up to `within` for `child` to exit; `None` if it is still running.
async fn exit_within(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    tokio::time::timeout(within, child.wait())
        .await
        .ok()
        .and_then(Result::ok)
}

async fn kill(launched: &mut Launched) {
    signal_group(launched.pid, Signal::SIGKILL);
    signal_group(launched.pid, Signal::SIGCONT);
    let _ = launched.child.wait().await;
}

/// Runs every check against `program args`.
pub async fn run(program: PathBuf, args: Vec<String>, options: Options) -> Report {
    let dir = std::env::temp_dir().join(format!("demi-plugin-check-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    {
        use std::os::unix::fs::PermissionsExt as _;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        // The plugin makes its socket here.
        if let Some((uid, gid)) = options.privileges.user {
            let _ = nix::unistd::chown(&dir, Some(uid), Some(gid));
        }
    }
    let cgroups = Cgroups::open(&format!("demi-plugin-check-{}", std::process::id()));
    let confinement = match cgroups.unavailable() {
        None => format!("own cgroup ({})", cgroups.setup()),
        Some(why) => format!("unconfined: {why}"),
    };
    let cgroups = cgroups.unavailable().is_none().then_some(cgroups);
    let spawner = match Spawner::start(tokio::runtime::Handle::current()) {
        Ok(spawner) => spawner,
        Err(error) => {
            return Report {
                checks: vec![Check {
                    name: "launch",
                    verdict: Verdict::Fail,
                    detail: format!("cannot start the spawner thread: {error}"),
                }],
                confinement,
            };
        }
    };
    let mut bench = Bench {
        spawner,
        cgroups,
        dir: dir.clone(),
        program,
        args,
        options,
        runs: 0,
        made: Vec::new(),
    };
    let checks = checks(&mut bench).await;
    for cgroup in &bench.made {
        let _ = cgroup.kill_all().and_then(|()| cgroup.remove());
    }
    if let Some(cgroups) = &bench.cgroups {
        cgroups.remove_root();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Report {
        checks,
        confinement,
    }
}

async fn checks(bench: &mut Bench) -> Vec<Check> {
    let mut out = Vec::new();
    let mut record = |name, verdict, detail: String| {
        out.push(Check {
            name,
            verdict,
            detail,
        })
    };

    // 1. Run without the cookie: one line on stderr, exit 78.
    match bench
        .launch(bench.program.clone(), bench.args.clone(), false)
        .await
    {
        Err(error) => record(
            "refuses-without-cookie",
            Verdict::Fail,
            format!("cannot launch: {error}"),
        ),
        Ok(mut launched) => {
            let mut stderr = launched.child.stderr.take();
            match exit_within(&mut launched.child, Duration::from_secs(5)).await {
                Some(status) if status.code() == Some(i32::from(hs::EXIT_CONFIG)) => {
                    let mut said = String::new();
                    if let Some(stderr) = stderr.as_mut() {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            stderr.read_to_string(&mut said),
                        )
                        .await;
                    }
                    let line = said.lines().next().unwrap_or("").trim().to_owned();
                    if line.is_empty() {
                        record(
                            "refuses-without-cookie",
                            Verdict::Fail,
                            "exited 78 but said nothing on stderr".into(),
                        );
                    } else {
                        record(
                            "refuses-without-cookie",
                            Verdict::Pass,
                            format!("exit 78: {line}"),
                        );
                    }
                }
                Some(status) => record(
                    "refuses-without-cookie",
                    Verdict::Fail,
                    format!("exited with {status}, not 78"),
                ),
                None => {
                    kill(&mut launched).await;
                    record(
                        "refuses-without-cookie",
                        Verdict::Fail,
                        "kept running without the magic cookie".into(),
                    );
                }
            }
        }
    }

    // 2. The real launch: SERVING within the startup timeout.
    let timeout = bench.options.startup_timeout;
    let mut launched = match bench.launch_plugin().await {
        Ok(launched) => launched,
        Err(error) => {
            record("serving", Verdict::Fail, format!("cannot launch: {error}"));
            return out;
        }
    };
    let started = Instant::now();
    let connection = tokio::select! {
        connection = PluginConnection::await_serving(&launched.socket) => Some(connection),
        _ = tokio::time::sleep(timeout) => None,
        exit = launched.child.wait() => {
            let status = exit.map(|s| s.to_string()).unwrap_or_default();
            // Its last words reach the pipe before the exit is seen.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let detail = launched.explained(format!("exited ({status}) before it was SERVING"));
            record("serving", Verdict::Fail, detail);
            for name in ["health-for-name", "describe", "handle", "handle-stream", "deadline", "shutdown"] {
                record(name, Verdict::Skip, "not serving".into());
            }
            return finish(bench, out).await;
        }
    };
    let Some(connection) = connection else {
        let seen = if launched.socket.exists() {
            "the socket exists but health never answered SERVING"
        } else {
            "nothing listens on DEMI_PLUGIN_SOCKET"
        };
        record(
            "serving",
            Verdict::Fail,
            launched.explained(format!("not SERVING within {timeout:?}: {seen}")),
        );
        for name in [
            "health-for-name",
            "describe",
            "handle",
            "handle-stream",
            "deadline",
            "shutdown",
        ] {
            record(name, Verdict::Skip, "not serving".into());
        }
        kill(&mut launched).await;
        return finish(bench, out).await;
    };
    record(
        "serving",
        Verdict::Pass,
        format!(
            "health \"\" SERVING after {} ms",
            started.elapsed().as_millis()
        ),
    );

    // 3. Health for its own name.
    let name = bench.options.name.clone();
    match connection.check(&name, Duration::from_secs(2)).await {
        Ok(()) => record(
            "health-for-name",
            Verdict::Pass,
            format!("health {name:?} SERVING"),
        ),
        Err(error) => record(
            "health-for-name",
            Verdict::Fail,
            launched.explained(format!("health {name:?}: {error}")),
        ),
    }

    // 4. Describe is consistent with the handshake.
    let mut takes_jobs = false;
    match connection.describe(Duration::from_secs(2)).await {
        Ok(d) => {
            takes_jobs = d.capabilities.iter().any(|c| c == "jobs");
            let mut problems = Vec::new();
            if d.name != name {
                problems.push(format!("name {:?}, not {name:?}", d.name));
            }
            if !ACCEPTED_PROTOCOLS.contains(&d.protocol_version) {
                problems.push(format!(
                    "protocol {} is not one offered ({ACCEPTED_PROTOCOLS:?})",
                    d.protocol_version
                ));
            }
            if d.version.is_empty() {
                problems.push("no version".into());
            }
            if problems.is_empty() {
                record(
                    "describe",
                    Verdict::Pass,
                    format!(
                        "{} {} protocol {} capabilities {:?}",
                        d.name, d.version, d.protocol_version, d.capabilities
                    ),
                );
            } else {
                record("describe", Verdict::Fail, problems.join("; "));
            }
        }
        Err(status) => record(
            "describe",
            Verdict::Fail,
            launched.explained(format!("{}: {}", status.code(), status.message())),
        ),
    }

    // 5. A job round trip, where the plugin says it takes jobs. Whether
    // the answer is right only a probe with --expect-ok can say.
    if takes_jobs {
        let probed = !bench.options.probes.is_empty();
        let probes = match probed {
            true => bench.options.probes.clone(),
            false => vec![Probe {
                kind: "echo".into(),
                payload: b"demi plugin-check".to_vec(),
            }],
        };
        let expect_ok = bench.options.expect_ok;
        for (n, probe) in probes.iter().enumerate() {
            let id = format!("plugin-check-{}", n + 1);
            let job = pb::Job {
                id: id.clone(),
                kind: probe.kind.clone(),
                payload: probe.payload.clone(),
                attempt: 1,
                ..Default::default()
            };
            let (verdict, detail) = match connection.handle(job, Duration::from_secs(5)).await {
                Ok(result) => judge(&id, &result, probed && expect_ok),
                Err(status) => (
                    Verdict::Fail,
                    format!("{}: {}", status.code(), status.message()),
                ),
            };
            let detail = format!("{:?}: {detail}", probe.kind);
            let detail = match verdict {
                Verdict::Fail => launched.explained(detail),
                _ => detail,
            };
            record("handle", verdict, detail);
        }
        // 6. The optional job stream: absent is fine, broken is not.
        let probe = &probes[0];
        let job = pb::Job {
            id: "plugin-check-stream".into(),
            kind: probe.kind.clone(),
            payload: probe.payload.clone(),
            attempt: 1,
            ..Default::default()
        };
        match connection
            .handle_on_stream(7, job, Duration::from_secs(5))
            .await
        {
            Err(status) if status.code() == tonic::Code::Unimplemented => record(
                "handle-stream",
                Verdict::Skip,
                "not served: the conductor will make one Handle call per job".into(),
            ),
            Err(status) => record(
                "handle-stream",
                Verdict::Fail,
                launched.explained(format!("{}: {}", status.code(), status.message())),
            ),
            Ok(answer) if answer.tag != 7 => record(
                "handle-stream",
                Verdict::Fail,
                format!("answered tag {} for tag 7", answer.tag),
            ),
            Ok(answer) => {
                let result = answer.result.unwrap_or_default();
                let (verdict, detail) = judge("plugin-check-stream", &result, probed && expect_ok);
                record("handle-stream", verdict, format!("{detail}; tag kept"));
            }
        }
        // 7. A job with a deadline a moment away gets an answer (or an
        // error) by then, not long after.
        let deadline = std::time::SystemTime::now() + Duration::from_millis(300);
        let job = pb::Job {
            id: "plugin-check-2".into(),
            kind: "echo".into(),
            payload: b"deadline".to_vec(),
            attempt: 1,
            deadline: Some(prost_types::Timestamp::from(deadline)),
            ..Default::default()
        };
        let started = Instant::now();
        let answered = connection.handle(job, Duration::from_millis(300)).await;
        let took = started.elapsed();
        if took <= Duration::from_millis(1500) {
            let how = match answered {
                Ok(_) => "answered".to_owned(),
                Err(status) => format!("{}", status.code()),
            };
            record(
                "deadline",
                Verdict::Pass,
                format!("{how} in {} ms with a 300 ms deadline", took.as_millis()),
            );
        } else {
            record(
                "deadline",
                Verdict::Fail,
                format!("took {} ms with a 300 ms deadline", took.as_millis()),
            );
        }
    } else {
        for name in ["handle", "handle-stream"] {
            record(
                name,
                Verdict::Skip,
                "the plugin does not list the \"jobs\" capability".into(),
            );
        }
        record(
            "deadline",
            Verdict::Skip,
            "the plugin does not list the \"jobs\" capability".into(),
        );
    }

    // 8. Shutdown: gone within the grace.
    let grace = bench.options.grace;
    let _ = connection.shutdown(grace, Duration::from_secs(2)).await;
    match exit_within(&mut launched.child, grace + Duration::from_secs(1)).await {
        Some(status) => record(
            "shutdown",
            Verdict::Pass,
            format!("exited ({status}) after Shutdown({grace:?})"),
        ),
        None => {
            record(
                "shutdown",
                Verdict::Fail,
                launched.explained(format!(
                    "still running {:?} after Shutdown({grace:?})",
                    grace + Duration::from_secs(1)
                )),
            );
            kill(&mut launched).await;
        }
    }
    finish(bench, out).await
}

/// A job's result as the contract names it, and whether it passes: a
/// result for another job or without an outcome fails; the outcome itself
/// is checked only when `expect_ok` says what it must be.
fn judge(id: &str, result: &pb::JobResult, expect_ok: bool) -> (Verdict, String) {
    use pb::job_result::Outcome as O;
    if result.job_id != id {
        return (
            Verdict::Fail,
            format!("answered for job {:?}, not {id:?}", result.job_id),
        );
    }
    let said = match O::try_from(result.outcome) {
        Ok(O::Ok) => format!(
            "OUTCOME_OK, {} bytes: {}",
            result.payload.len(),
            preview(&result.payload)
        ),
        Ok(O::Retryable) => format!("OUTCOME_RETRYABLE: {}", result.error),
        Ok(O::Permanent) => format!("OUTCOME_PERMANENT: {}", result.error),
        _ => return (Verdict::Fail, format!("no outcome ({})", result.outcome)),
    };
    match (expect_ok, result.outcome == O::Ok as i32) {
        (true, true) => (Verdict::Pass, said),
        (true, false) => (Verdict::Fail, format!("{said} (expected OUTCOME_OK)")),
        (false, _) => (
            Verdict::Unchecked,
            format!("outcome unchecked: {said}; --probe KIND=PAYLOAD --expect-ok checks it"),
        ),
    }
}

/// A payload for a one-line report: text as it is (cut), else its size.
fn preview(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(text) if text.chars().count() <= 60 => format!("{text:?}"),
        Ok(text) => format!("{:?}…", text.chars().take(60).collect::<String>()),
        Err(_) => "(binary)".into(),
    }
}

/// The checks that launch the plugin afresh: SIGTERM and parent death.
async fn finish(bench: &mut Bench, mut out: Vec<Check>) -> Vec<Check> {
    let serving_failed = out
        .iter()
        .any(|c| c.name == "serving" && c.verdict == Verdict::Fail);
    if serving_failed {
        for name in ["sigterm", "parent-death"] {
            out.push(Check {
                name,
                verdict: Verdict::Skip,
                detail: "not serving".into(),
            });
        }
        return out;
    }
    let timeout = bench.options.startup_timeout;
    // 9. SIGTERM: a graceful exit.
    match bench.launch_plugin().await {
        Err(error) => out.push(Check {
            name: "sigterm",
            verdict: Verdict::Fail,
            detail: format!("cannot launch: {error}"),
        }),
        Ok(mut launched) => {
            let ready =
                tokio::time::timeout(timeout, PluginConnection::await_serving(&launched.socket))
                    .await
                    .is_ok();
            signal_group(launched.pid, Signal::SIGTERM);
            let check = match exit_within(&mut launched.child, Duration::from_secs(5)).await {
                Some(status) if ready => Check {
                    name: "sigterm",
                    verdict: Verdict::Pass,
                    detail: format!("exited ({status})"),
                },
                Some(status) => Check {
                    name: "sigterm",
                    verdict: Verdict::Fail,
                    detail: format!("exited ({status}) but never served"),
                },
                None => {
                    kill(&mut launched).await;
                    Check {
                        name: "sigterm",
                        verdict: Verdict::Fail,
                        detail: "still running 5 s after SIGTERM".into(),
                    }
                }
            };
            out.push(check);
        }
    }
    // 10. Parent death: the plugin is started by a launcher that does what
    // the conductor does (its spawner, hence its death signal), and the
    // launcher is then SIGKILLed, as a conductor can be.
    out.push(parent_death(bench, timeout).await);
    out
}

async fn parent_death(bench: &mut Bench, timeout: Duration) -> Check {
    let fail = |detail: String| Check {
        name: "parent-death",
        verdict: Verdict::Fail,
        detail,
    };
    let launcher = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(error) => return fail(format!("cannot find the conductor binary: {error}")),
    };
    let mut args = vec![parent::ARG.to_owned(), bench.program.display().to_string()];
    args.extend(bench.args.clone());
    let mut parent = match bench.launch(launcher, args, true).await {
        Ok(parent) => parent,
        Err(error) => return fail(format!("cannot launch: {error}")),
    };
    let mut first = String::new();
    if let Some(stdout) = parent.child.stdout.as_mut() {
        let mut byte = [0u8; 1];
        while tokio::time::timeout(Duration::from_secs(5), stdout.read_exact(&mut byte))
            .await
            .is_ok_and(|r| r.is_ok())
            && byte[0] != b'\n'
        {
            first.push(byte[0] as char);
        }
    }
    parent.stderr = capture(&mut parent.child);
    let Some(plugin) = first.trim().parse::<u32>().ok().filter(|pid| *pid > 0) else {
        kill(&mut parent).await;
        return fail(parent.explained("could not learn the plugin's pid from its launcher".into()));
    };
    if tokio::time::timeout(timeout, PluginConnection::await_serving(&parent.socket))
        .await
        .is_err()
    {
        kill(&mut parent).await;
        signal_group(plugin, Signal::SIGKILL);
        return fail(parent.explained("not SERVING".into()));
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(parent.pid as i32),
        Signal::SIGKILL,
    );
    let _ = parent.child.wait().await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        if nix::sys::signal::kill(nix::unistd::Pid::from_raw(plugin as i32), None).is_err()
            || zombie(plugin)
        {
            return Check {
                name: "parent-death",
                verdict: Verdict::Pass,
                detail: format!(
                    "exited {} ms after the process that launched it",
                    started.elapsed().as_millis()
                ),
            };
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal_group(plugin, Signal::SIGKILL);
    fail("still running 3 s after the process that launched it died".into())
}

/// Whether `pid` exited and awaits reaping (by init, now).
fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
        .unwrap_or(true)
}

/// The report as a table, one check a line.
pub fn table(report: &Report) -> String {
    let mut out = format!("plugin-check ({})\n", report.confinement);
    for check in &report.checks {
        let verdict = match check.verdict {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
            Verdict::Unchecked => "----",
        };
        out.push_str(&format!("{verdict}  {:<24} {}\n", check.name, check.detail));
    }
    let failed = report
        .checks
        .iter()
        .filter(|c| c.verdict == Verdict::Fail)
        .count();
    out.push_str(&format!(
        "{} passed, {failed} failed\n",
        report
            .checks
            .iter()
            .filter(|c| c.verdict == Verdict::Pass)
            .count()
    ));
    out
}

pub fn json(report: &Report) -> serde_json::Value {
    serde_json::json!({
        "confinement": report.confinement,
        "passed": report.passed(),
        "checks": report.checks.iter().map(|c| serde_json::json!({
            "name": c.name,
            "verdict": match c.verdict {
                Verdict::Pass => "pass",
                Verdict::Fail => "fail",
                Verdict::Skip => "skip",
                Verdict::Unchecked => "unchecked",
            },
            "detail": c.detail,
        })).collect::<Vec<_>>(),
    })
}
