//! Harness for end-to-end tests: runs the real `conductor` binary on a
//! config in a temporary folder, reads its JSON log as a stream of events,
//! and talks to plugin sockets over real gRPC.
//!
//! Every wait has a deadline; dropping a [`Conductor`] SIGKILLs it, and the
//! kernel's death signal takes its plugins along.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// Generous, because CI shares two cores between parallel tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// Folder holding the built binaries (`make test` builds them first).
pub fn bin_dir() -> PathBuf {
    std::env::var_os("DEMI_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"))
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins --examples` first (make test does)",
        path.display()
    );
    path
}

/// grpcurl as `make test` installs it (`GRPCURL` overrides).
pub fn grpcurl() -> PathBuf {
    let path = std::env::var_os("GRPCURL")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv/bin/grpcurl"));
    assert!(
        path.exists(),
        "{} is missing: `make test` installs it from PyPI",
        path.display()
    );
    path
}

fn expand(plugins: &str) -> String {
    plugins.replace("{echo}", &bin("demi-plugin-echo").display().to_string())
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The conductor's log so far, shared with the thread that reads it.
#[derive(Default)]
struct Log {
    events: Mutex<Vec<Value>>,
    grew: Condvar,
    /// While set, stdout is not read: its pipe fills as behind a stalled
    /// log collector.
    paused: Mutex<bool>,
    resumed: Condvar,
}

/// A running conductor.
pub struct Conductor {
    pid: u32,
    /// Behind a mutex so a conductor can be shared with helper threads.
    exit: Mutex<mpsc::Receiver<ExitStatus>>,
    log: Arc<Log>,
    dir: Arc<tempfile::TempDir>,
    config: PathBuf,
    wrapper: Vec<String>,
    cgroup_root: String,
    /// The `[conductor]` table, kept for config rewrites.
    preamble: String,
    /// `RUST_LOG`, kept for restarts.
    log_filter: String,
    /// Where stderr goes (appended), when not to the test's.
    stderr: Option<PathBuf>,
    exited: Option<ExitStatus>,
}

/// Options for [`Conductor`] beyond the plugins.
#[derive(Default)]
pub struct Builder {
    conductor: String,
    wrapper: Vec<String>,
    log: Option<String>,
    stderr: Option<PathBuf>,
}

impl Builder {
    /// Extra lines for the `[conductor]` table; a `state_dir` or
    /// `cgroup_root` among them replaces the test's own.
    pub fn conductor(mut self, lines: &str) -> Self {
        self.conductor = lines.to_owned();
        self
    }

    /// `RUST_LOG` for the conductor (debug by default, for the tests).
    pub fn log(mut self, filter: &str) -> Self {
        self.log = Some(filter.to_owned());
        self
    }

    /// Appends the conductor's stderr (panics end up there) to `path`,
    /// across restarts.
    pub fn stderr(mut self, path: &Path) -> Self {
        self.stderr = Some(path.to_owned());
        self
    }

    /// Runs the conductor through `wrapper` (e.g. `unshare -m …`), which
    /// must exec it in place so the pid stays the conductor's.
    pub fn wrap(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Starts the conductor on `plugins` (TOML); `{echo}` is replaced by
    /// the echo plugin's path. Runtime files go to `run/` in a fresh
    /// folder, cgroups under a root named after it.
    pub fn start(self, plugins: &str) -> Conductor {
        let dir = tempfile::Builder::new()
            .prefix("demi-e2e-")
            .tempdir()
            .expect("temp dir");
        // Passable, as /run is: plugins running as other users reach the
        // sockets and state folders below it.
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
                .expect("temp dir mode");
        }
        let cgroup_root = dir
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .expect("temp dir name")
            .to_owned();
        let has_root = self.conductor.contains("cgroup_root");
        let root_line = if has_root {
            String::new()
        } else {
            format!("cgroup_root = \"{cgroup_root}\"\n")
        };
        // Parallel tests cannot share the default metrics port.
        let metrics = if self.conductor.contains("[conductor.metrics]") {
            ""
        } else {
            "[conductor.metrics]\nlisten = \"127.0.0.1:0\"\n"
        };
        let state_line = if self.conductor.contains("state_dir") {
            ""
        } else {
            "state_dir = \"state\"\n"
        };
        let preamble = format!(
            "[conductor]\nruntime_dir = \"run\"\n{state_line}{root_line}{}\n{metrics}\n",
            self.conductor
        );
        let config = dir.path().join("conductor.toml");
        std::fs::write(&config, format!("{preamble}{}", expand(plugins))).expect("write config");
        let log = self
            .log
            .unwrap_or_else(|| "debug,h2=info,tower=info,hyper_util=info".into());
        Conductor::launch(
            Arc::new(dir),
            config,
            self.wrapper,
            cgroup_root,
            preamble,
            log,
            self.stderr,
        )
    }
}

impl Conductor {
    /// Starts `conductor run` on `plugins` with default options.
    pub fn start(plugins: &str) -> Self {
        Self::builder().start(plugins)
    }

    pub fn builder() -> Builder {
        Builder::default()
    }

    fn launch(
        dir: Arc<tempfile::TempDir>,
        config: PathBuf,
        wrapper: Vec<String>,
        cgroup_root: String,
        preamble: String,
        log_filter: String,
        stderr: Option<PathBuf>,
    ) -> Self {
        let conductor = bin("conductor");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&conductor);
                c
            }
            None => Command::new(&conductor),
        };
        let mut child = command
            .args(["run", "--log-format", "json", "--config"])
            .arg(&config)
            .env("RUST_LOG", &log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(match &stderr {
                Some(path) => std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map(Stdio::from)
                    .expect("open the stderr file"),
                None => Stdio::inherit(),
            })
            .spawn()
            .expect("spawn conductor");
        let stdout = child.stdout.take().expect("piped stdout");
        let log = Arc::new(Log::default());
        let reader_log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let mut paused = reader_log.paused.lock().unwrap();
                while *paused {
                    paused = reader_log.resumed.wait(paused).unwrap();
                }
                drop(paused);
                let event = serde_json::from_str(&line)
                    .unwrap_or_else(|_| Value::String(format!("NOT JSON: {line}")));
                reader_log.events.lock().unwrap().push(event);
                reader_log.grew.notify_all();
            }
        });
        let pid = child.id();
        let (exit_tx, exit) = mpsc::channel();
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                let _ = exit_tx.send(status);
            }
        });
        Self {
            pid,
            exit: Mutex::new(exit),
            log,
            dir,
            config,
            wrapper,
            cgroup_root,
            preamble,
            log_filter,
            stderr,
            exited: None,
        }
    }

    /// Stops reading the conductor's stdout (after the line under way)
    /// until [`Conductor::resume_log`].
    pub fn pause_log(&self) {
        *self.log.paused.lock().unwrap() = true;
    }

    pub fn resume_log(&self) {
        *self.log.paused.lock().unwrap() = false;
        self.log.resumed.notify_all();
    }

    /// Starts a new conductor on the same config and folders, after this
    /// one has exited (or been killed).
    pub fn restart(mut self) -> Self {
        if self.exited.is_none() {
            // The caller may have killed it already and the waiter thread
            // reaped it: ESRCH then only means there is nothing left to kill.
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
            self.wait_exit();
        }
        Self::launch(
            self.dir.clone(),
            self.config.clone(),
            std::mem::take(&mut self.wrapper),
            std::mem::take(&mut self.cgroup_root),
            std::mem::take(&mut self.preamble),
            std::mem::take(&mut self.log_filter),
            self.stderr.take(),
        )
    }

    /// Rewrites the config file with new plugins (same `[conductor]` table).
    pub fn write_plugins(&self, plugins: &str) {
        std::fs::write(
            &self.config,
            format!("{}{}", self.preamble, expand(plugins)),
        )
        .expect("rewrite config");
    }

    /// Writes `text` verbatim as the config file.
    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).expect("rewrite config");
    }

    /// Where `/metrics` listens, from the conductor's log.
    pub fn metrics_addr(&self) -> String {
        let (_, event) = self.wait_for(0, "metrics listening", |e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("metrics listening"))
        });
        event["addr"].as_str().expect("addr").to_owned()
    }

    /// One scrape of `/metrics`.
    pub fn scrape(&self) -> String {
        http_get(&self.metrics_addr(), "/metrics")
    }

    /// The admin API socket, once the conductor says it listens (it binds
    /// after starting the instances).
    pub fn api_socket(&self) -> PathBuf {
        self.wait_for(0, "admin API listening", |e| {
            e["message"] == "admin API listening"
        });
        self.runtime_dir().join("conductor.sock")
    }

    /// Runs the `conductor` CLI against this conductor.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin("conductor"))
            .arg("--socket")
            .arg(self.api_socket())
            .args(args)
            .output()
            .expect("run conductor CLI")
    }

    /// The pids of `plugin`'s live instances, as `conductor status` shows.
    pub fn pids_of(&self, plugin: &str) -> Vec<u64> {
        let status = json(self.cli(&["status", plugin, "--json"]));
        status[0]["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .filter_map(|i| i["pid"].as_u64())
            .collect()
    }

    /// Runs the `conductor` CLI the way an operator would: finding the
    /// socket through the config file, not `--socket`.
    pub fn cli_through_config(&self, args: &[&str]) -> std::process::Output {
        self.api_socket();
        Command::new(bin("conductor"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("run conductor CLI")
    }

    /// Runs grpcurl (from the project's venv) against the API socket.
    /// `-authority localhost`: grpcurl before 1.8.9 sends the socket path
    /// as `:authority`, which the HTTP/2 layer under tonic rejects.
    pub fn grpcurl(&self, flags: &[&str], command: &[&str]) -> std::process::Output {
        Command::new(grpcurl())
            .args(["-plaintext", "-authority", "localhost", "-unix"])
            .args(flags)
            .arg(self.api_socket())
            .args(command)
            .output()
            .expect("run grpcurl")
    }

    /// The cgroup root this conductor was given.
    pub fn cgroup_root(&self) -> &str {
        &self.cgroup_root
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn folder(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self, plugin: &str, instance: u32) -> PathBuf {
        self.runtime_dir()
            .join("plugins")
            .join(plugin)
            .join(format!("{instance}.sock"))
    }

    /// How many events were logged so far; a cursor for [`Self::wait_for`].
    pub fn cursor(&self) -> usize {
        self.log.events.lock().unwrap().len()
    }

    /// The events logged from cursor `from` on.
    pub fn events_since(&self, from: usize) -> Vec<Value> {
        let events = self.log.events.lock().unwrap();
        events.get(from..).unwrap_or_default().to_vec()
    }

    /// Every event logged so far.
    pub fn events(&self) -> Vec<Value> {
        self.log.events.lock().unwrap().clone()
    }

    /// Waits for the first event at or after `from` matching `pred`, and
    /// returns it with its index. Panics with the recent log on timeout.
    pub fn wait_for(
        &self,
        from: usize,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> (usize, Value) {
        let deadline = Instant::now() + WAIT;
        let mut events = self.log.events.lock().unwrap();
        let mut next = from;
        loop {
            while next < events.len() {
                if pred(&events[next]) {
                    return (next, events[next].clone());
                }
                next += 1;
            }
            let now = Instant::now();
            if now >= deadline {
                let tail: Vec<String> = events
                    .iter()
                    .rev()
                    .take(40)
                    .rev()
                    .map(Value::to_string)
                    .collect();
                panic!(
                    "timed out waiting for {what}; last events:\n{}",
                    tail.join("\n")
                );
            }
            events = self
                .log
                .grew
                .wait_timeout(events, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Waits for lifecycle event `message` of `plugin` at or after `from`.
    pub fn wait_event(&self, from: usize, plugin: &str, message: &str) -> (usize, Value) {
        self.wait_for(from, &format!("{plugin}: {message}"), |e| {
            e["message"] == message && e["span"]["plugin"] == plugin
        })
    }

    /// Waits until instance `index` of `plugin` is SERVING at or after
    /// `from`, and returns its pid and the event's index.
    pub fn wait_serving(&self, from: usize, plugin: &str, index: u32) -> (usize, u32) {
        let (at, event) = self.wait_for(from, &format!("{plugin}-{index} serving"), |e| {
            e["message"] == "instance serving"
                && e["span"]["plugin"] == plugin
                && e["span"]["instance"] == index
        });
        (at, event["pid"].as_u64().expect("pid") as u32)
    }

    /// `plugin`'s health checks logged from event `from` on, when the
    /// conductor logs them (`demi_conductor::telemetry::recorder=trace`):
    /// how many milliseconds each took, and those between one and the next.
    pub fn health_checks(&self, from: usize, plugin: &str) -> (Vec<f64>, Vec<f64>) {
        let checks: Vec<Value> = self
            .events_since(from)
            .into_iter()
            .filter(|e| e["message"] == "health checked" && e["span"]["plugin"] == plugin)
            .collect();
        let took = checks
            .iter()
            .filter_map(|e| e["took_us"].as_f64())
            .map(|us| us / 1000.0)
            .collect();
        let at: Vec<f64> = checks.iter().map(timestamp_ms).collect();
        (took, at.windows(2).map(|w| w[1] - w[0]).collect())
    }

    /// Every pid the conductor spawned so far.
    pub fn spawned_pids(&self) -> Vec<u32> {
        self.events()
            .iter()
            .filter(|e| e["message"] == "instance spawned")
            .filter_map(|e| e["pid"].as_u64())
            .map(|p| p as u32)
            .collect()
    }

    /// Events named `message` of `plugin`.
    pub fn count(&self, plugin: &str, message: &str) -> usize {
        self.events()
            .iter()
            .filter(|e| e["message"] == message && e["span"]["plugin"] == plugin)
            .count()
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid as i32), signal).expect("signal conductor");
    }

    /// Waits for the conductor to exit.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let status = self
            .exit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .recv_timeout(WAIT)
            .expect("conductor did not exit");
        self.exited = Some(status);
        status
    }
}

impl Drop for Conductor {
    fn drop(&mut self) {
        let exit = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if self.exited.is_none() && exit.try_recv().is_err() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
            let _ = exit.recv_timeout(WAIT);
        }
        drop(exit);
        // A failed test must not leave cgroups behind.
        if !self.cgroup_root.is_empty() {
            remove_cgroup_tree(&self.cgroup_root);
        }
    }
}

/// Every folder of cgroup `root` (and below it) in every mounted hierarchy,
/// deepest first.
pub fn cgroup_dirs(root: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&entry.path(), out);
                }
            }
        }
        out.push(dir.to_owned());
    }
    let mut out = Vec::new();
    let Ok(mounts) = std::fs::read_dir("/sys/fs/cgroup") else {
        return out;
    };
    let mut hierarchies: Vec<PathBuf> = mounts.flatten().map(|e| e.path()).collect();
    hierarchies.push(PathBuf::from("/sys/fs/cgroup"));
    for hierarchy in hierarchies {
        let top = hierarchy.join(root);
        if top.is_dir() {
            walk(&top, &mut out);
        }
    }
    out
}

/// Every live process in cgroup `root` or below it, in any hierarchy.
pub fn processes_under(root: &str) -> std::collections::BTreeSet<u32> {
    cgroup_dirs(root)
        .iter()
        .flat_map(|d| live_procs(d))
        .collect()
}

/// The live processes of one cgroup folder.
fn live_procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|pid| alive(*pid))
        .collect()
}

/// Processes of `plugin`'s instances under cgroup `root`, stand-ins left
/// out (read from the memory hierarchy, which every instance joins, so it
/// holds across conductor restarts and never reaches another test's
/// plugins).
pub fn pids_in_cgroup(root: &str, plugin: &str) -> Vec<u32> {
    let Ok(instances) =
        std::fs::read_dir(Path::new("/sys/fs/cgroup/memory").join(root).join(plugin))
    else {
        return Vec::new();
    };
    instances
        .flatten()
        .flat_map(|i| live_procs(&i.path()))
        .filter(|pid| !is_standin(*pid))
        .collect()
}

/// Whether `pid` is a stand-in still waiting (once told to go, it is the
/// plugin it exec'd).
pub fn is_standin(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "demi-standin")
}

/// Kills what is left in cgroup `root` and removes its folders.
pub fn remove_cgroup_tree(root: &str) {
    for dir in cgroup_dirs(root) {
        for _ in 0..100 {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The stdout of a command that must succeed; its stderr in the panic
/// when it did not.
pub fn ok(out: std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{:?} failed: {}{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The stdout of a command that must succeed, as JSON.
pub fn json(out: std::process::Output) -> Value {
    serde_json::from_str(&ok(out)).expect("JSON answer")
}

/// Waits until `done` holds, checking every 20 ms, for state that another
/// process changes and no event announces (a file a plugin writes). Use
/// sparingly: an event to wait on is better.
pub fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A plain HTTP/1.0 GET; returns the body. Panics on anything but 200.
pub fn http_get(addr: &str, path: &str) -> String {
    let (head, body) = http_fetch(addr, path);
    assert!(
        head.starts_with("HTTP/1.") && head.contains(" 200 "),
        "{head}"
    );
    body
}

/// A plain HTTP/1.0 GET whatever the status: the response's head and body,
/// for a server that answers 503 until it is ready (Prometheus does while
/// its storage opens).
pub fn http_fetch(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read as _, Write as _};
    let mut stream =
        std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    (head.to_owned(), body.to_owned())
}

/// The value of the series `name{labels}` in a Prometheus text scrape,
/// where every label in `labels` must match.
pub fn series(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let (metric, value) = line.rsplit_once(' ')?;
        let (series_name, rest) = metric.split_once('{').unwrap_or((metric, "}"));
        if series_name != name {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        all.then(|| value.parse().ok()).flatten()
    })
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Resident memory of `pid` in KiB, from /proc.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Lines of an echo `--journal`: (job id, attempt, outcome).
pub fn journal(path: &Path) -> Vec<(String, u32, String)> {
    journal_timed(path)
        .into_iter()
        .map(|(id, attempt, outcome, _)| (id, attempt, outcome))
        .collect()
}

/// Lines of an echo `--journal` with when each was written (µs since the
/// epoch).
pub fn journal_timed(path: &Path) -> Vec<(String, u32, String, u128)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut parts = l.split(' ');
            Some((
                parts.next()?.to_owned(),
                parts.next()?.parse().ok()?,
                parts.next()?.to_owned(),
                parts.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// Ids an echo `--journal` shows answered.
pub fn journal_completed(path: &Path) -> std::collections::BTreeSet<String> {
    journal(path)
        .into_iter()
        .filter(|(_, _, outcome)| outcome == "ok")
        .map(|(id, _, _)| id)
        .collect()
}

/// Live processes whose process group is `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // Fields after the command name: state ppid pgrp ...
                stat.rsplit_once(") ").is_some_and(|(_, rest)| {
                    let fields: Vec<&str> = rest.split(' ').collect();
                    fields.len() > 2
                        && fields[2] == pgid.to_string()
                        && !matches!(fields[0], "Z" | "X")
                })
            })
        })
        .collect()
}

/// Waits until none of `pids` is running; returns how long that took, or
/// the pids still running at the deadline. Uses a pidfd per process, which
/// becomes readable when the process exits: no polling.
pub fn wait_all_gone(pids: &[u32], within: Duration) -> Result<Duration, Vec<u32>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::{BorrowedFd, FromRawFd as _, OwnedFd};

    let start = Instant::now();
    let deadline = start + within;
    let mut left = Vec::new();
    for &pid in pids {
        // SAFETY: pidfd_open reads only its integer arguments.
        let raw = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid as i32, 0) };
        if raw < 0 {
            continue; // ESRCH: already reaped.
        }
        // SAFETY: the descriptor was just returned to us and is owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let remaining = deadline.saturating_duration_since(Instant::now());
        let timeout = PollTimeout::try_from(remaining.as_millis().min(60_000) as i32)
            .unwrap_or(PollTimeout::ZERO);
        let borrowed: BorrowedFd<'_> = std::os::fd::AsFd::as_fd(&fd);
        let mut fds = [PollFd::new(borrowed, PollFlags::POLLIN)];
        if poll(&mut fds, timeout).unwrap_or(0) == 0 && alive(pid) {
            left.push(pid);
        }
    }
    if left.is_empty() {
        Ok(start.elapsed())
    } else {
        Err(left)
    }
}

pub fn signal_pid(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).expect("signal plugin");
}

/// Milliseconds since the epoch of a log event's timestamp.
pub fn timestamp_ms(event: &Value) -> f64 {
    let text = event["timestamp"].as_str().expect("timestamp");
    // 2026-11-27T20:33:18.021249Z: only the time of day matters here.
    let time = text.split('T').nth(1).expect("time").trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next().and_then(|s| s.parse().ok()).expect("hour");
    let m: f64 = parts.next().and_then(|s| s.parse().ok()).expect("minute");
    let s: f64 = parts.next().and_then(|s| s.parse().ok()).expect("second");
    ((h * 60.0 + m) * 60.0 + s) * 1000.0
}

pub mod bench;
pub mod device;
pub mod fake_discord;
pub mod fake_fcm;

pub mod grpc {
    //! Real gRPC clients for plugin sockets.

    use std::path::Path;
    use std::time::Duration;

    pub use demi_proto::conductor::v1 as admin_pb;
    pub use demi_proto::plugin::v1 as pb;
    pub use prost_types::Duration as ProstDuration;
    use tonic::Status;
    use tonic::transport::{Channel, Endpoint};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    pub async fn connect(socket: &Path) -> Channel {
        Endpoint::from_shared(format!("unix://{}", socket.display()))
            .expect("endpoint")
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()))
    }

    /// The health status of `service`, as the numeric enum.
    pub async fn health(channel: &Channel, service: &str) -> Result<i32, tonic::Status> {
        let mut client = HealthClient::new(channel.clone());
        let request = HealthCheckRequest {
            service: service.into(),
        };
        tokio::time::timeout(Duration::from_secs(5), client.check(request))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("health check"))?
            .map(|r| r.into_inner().status)
    }

    /// A client of the conductor's admin API.
    pub async fn admin(
        socket: &Path,
    ) -> demi_proto::conductor::v1::conductor_client::ConductorClient<Channel> {
        demi_proto::conductor::v1::conductor_client::ConductorClient::new(connect(socket).await)
    }

    /// Messages as raw bytes, for what no well-behaved client would send.
    #[derive(Clone, Copy, Default)]
    pub struct Raw;

    impl tonic::codec::Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = Raw;
        type Decoder = Raw;

        fn encoder(&mut self) -> Raw {
            Raw
        }

        fn decoder(&mut self) -> Raw {
            Raw
        }
    }

    impl tonic::codec::Encoder for Raw {
        type Item = Vec<u8>;
        type Error = Status;

        fn encode(
            &mut self,
            item: Vec<u8>,
            buf: &mut tonic::codec::EncodeBuf<'_>,
        ) -> Result<(), Status> {
            bytes::BufMut::put_slice(buf, &item);
            Ok(())
        }
    }

    impl tonic::codec::Decoder for Raw {
        type Item = Vec<u8>;
        type Error = Status;

        fn decode(
            &mut self,
            buf: &mut tonic::codec::DecodeBuf<'_>,
        ) -> Result<Option<Vec<u8>>, Status> {
            let n = bytes::Buf::remaining(buf);
            Ok(Some(bytes::Buf::copy_to_bytes(buf, n).to_vec()))
        }
    }

    /// One unary call of `path` with `request` as it is: the answer's
    /// bytes, or the status.
    pub async fn raw_unary(
        channel: Channel,
        path: &'static str,
        request: Vec<u8>,
    ) -> Result<Vec<u8>, tonic::Status> {
        raw_unary_request(channel, path, tonic::Request::new(request)).await
    }

    /// [`raw_unary`] with metadata (a token, say) on the request.
    pub async fn raw_unary_request(
        channel: Channel,
        path: &'static str,
        request: tonic::Request<Vec<u8>>,
    ) -> Result<Vec<u8>, tonic::Status> {
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let path = http::uri::PathAndQuery::from_static(path);
        grpc.unary(request, path, Raw)
            .await
            .map(tonic::Response::into_inner)
    }

    pub fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }
}
