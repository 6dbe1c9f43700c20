#!/usr/bin/env python3
"""Restart latency: SIGKILL a supervised child KILLS times (20 by default)
and measure kill -> new process started, under the floor (a plain
fork/exec/wait loop in C), the conductor (with its defaults: own cgroup
and a stand-in; without the stand-in; without cgroups), runit, s6 and
supervisord, on the same static C child in one run; and, for the
conductor, kill -> SERVING again over gRPC for the Rust echo plugin.
Every kill comes after a quiet spell of 1.5-2.5 s (random): a crash comes
after a while, not right after the previous restart, and a cgroup join
after a quiet spell waits for an RCU grace period.

Usage: scripts/bench/restart [KILLS]    (run from the repository root)
"""

import contextlib
import datetime
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILLS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
# Between a start and the next kill: at least QUIET seconds, plus up to
# JITTER more at random. s6-supervise holds a second between two launches,
# and a cgroup join after a quiet spell pays an RCU grace period: spacing
# kills this far apart measures every supervisor in the state a real,
# occasional crash finds it in.
QUIET = float(os.environ.get("BENCH_QUIET_SECONDS", "1.5"))
JITTER = float(os.environ.get("BENCH_JITTER_SECONDS", "1.0"))
TARGET = os.path.join(ROOT, "target", "bench")
CHILD = os.path.join(TARGET, "child")
FLOOR = os.path.join(TARGET, "floor")
CONDUCTOR = os.path.join(ROOT, "target", "release", "conductor")
ECHO = os.path.join(ROOT, "target", "release", "demi-plugin-echo")
VENV = os.path.join(ROOT, ".venv")


def sh(*args, **kw):
    subprocess.run(args, check=True, **kw)


def setup():
    os.makedirs(TARGET, exist_ok=True)
    sh("cargo", "build", "--release", "--workspace", "--bins", cwd=ROOT)
    sh("gcc", "-O2", "-static", "-o", CHILD, os.path.join(ROOT, "scripts", "bench", "child.c"))
    sh("gcc", "-O2", "-static", "-o", FLOOR, os.path.join(ROOT, "scripts", "bench", "floor.c"))
    if not os.path.exists(os.path.join(VENV, "bin", "supervisord")):
        if not os.path.exists(VENV):
            sh(sys.executable, "-m", "venv", VENV)
        sh(os.path.join(VENV, "bin", "pip"), "install", "--quiet", "supervisor", "grpcio", "grpcio-health-checking")
    for command, package in (("s6-svscan", "s6"), ("runsvdir", "runit")):
        if shutil.which(command) is None:
            sh("apt-get", "update")
            sh("apt-get", "install", "-y", "--no-install-recommends", package, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def hot_code():
    """How much of conductor/hot-code.txt (the functions a release build
    places together, see conductor/build.rs) the built conductor still
    has: a list made before a dependency or compiler upgrade finds fewer."""
    with open(os.path.join(ROOT, "conductor", "hot-code.txt")) as f:
        listed = set(f.read().split())
    symbols = subprocess.run(["nm", "--defined-only", CONDUCTOR], capture_output=True, text=True, check=True)
    present = {line.split()[-1] for line in symbols.stdout.splitlines()}
    return f"{len(listed & present)} of the {len(listed)} functions in conductor/hot-code.txt are in the binary"


def starts(path):
    """(pid, start ns) for every start recorded so far."""
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) == 2:
            seconds, nanos = parts[1].split(".")
            out.append((int(parts[0]), int(seconds) * 1_000_000_000 + int(nanos)))
    return out


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.0002)
    raise TimeoutError(what)


def kill_loop(record):
    """Kills the newest recorded child KILLS times; latency = next start - kill."""
    latencies = []
    wait_for(lambda: starts(record), 30, "first start")
    time.sleep(0.2)
    for _ in range(KILLS):
        known = starts(record)
        pid = known[-1][0]
        killed = time.time_ns()
        os.kill(pid, signal.SIGKILL)
        new = wait_for(lambda: len(starts(record)) > len(known) and starts(record)[-1], 10, "restart")
        latencies.append((new[1] - killed) / 1e6)
        quiet()
    return latencies


def quiet():
    time.sleep(QUIET + random.uniform(0, JITTER))


def conductor_config(folder, command, args, extra, replicas=1, tables="", standby=None):
    """`tables`: more `[plugins.child.*]` tables, appended. `standby`: keep a
    stand-in waiting in each instance's cgroup (None: the default)."""
    health = 'health = "none"' if command == CHILD else ""
    text = f'''[conductor]
runtime_dir = "{folder}/run"
state_dir = "{folder}/state"
{extra}
[conductor.metrics]
enabled = false

[plugins.child]
command = "{command}"
args = {json.dumps(args)}
replicas = {replicas}
{health}
[plugins.child.restart]
initial_delay = "0ms"
start_limit_burst = 100000
{"" if standby is None else f"standby = {'true' if standby else 'false'}"}
{tables}'''
    path = os.path.join(folder, "conductor.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def supervisord_config(folder, record, n=1):
    """supervisord running `n` children, its fastest settings."""
    many = f"process_name=%(program_name)s-%(process_num)d\nnumprocs={n}\n" if n > 1 else ""
    path = os.path.join(folder, "supervisord.conf")
    with open(path, "w") as f:
        f.write(f"""[supervisord]
nodaemon=true
logfile={folder}/supervisord.log
pidfile={folder}/supervisord.pid
[program:child]
command={CHILD} {record}
{many}startsecs=0
autorestart=true
startretries=1000000
""")
    return path


def service_dirs(scan, n, run_args, files=None):
    """`n` service folders `child-I` under `scan`, each with a `run` script
    that execs the child with `run_args`, and `files` beside it."""
    for i in range(n):
        service = os.path.join(scan, f"child-{i}")
        os.makedirs(service)
        with open(os.path.join(service, "run"), "w") as f:
            f.write(f"#!/bin/sh\nexec {CHILD} {run_args}\n")
        os.chmod(os.path.join(service, "run"), 0o755)
        for name, text in (files or {}).items():
            with open(os.path.join(service, name), "w") as f:
                f.write(text)
    return scan


def s6_scan(folder, record, n=1):
    """An s6 scan directory of `n` children that notify readiness on fd 3
    (without it s6 waits a second between starts)."""
    return service_dirs(os.path.join(folder, "scan"), n, f"{record} 3", {"notification-fd": "3\n"})


def runit_dir(folder, record, n=1):
    """A runsvdir service directory of `n` children."""
    return service_dirs(os.path.join(folder, "runit"), n, record)


class CpuProbe:
    """A cpuacct cgroup the supervisor starts in: its CPU time to the
    nanosecond, threads that ended included (/proc's ticks are 10 ms, the
    size of what an idle supervisor may spend in 30 s). Processes the
    supervisor moves to cgroups of their own leave it; the others (its
    children, idle in pause()) add nothing while they wait."""

    def __init__(self, name):
        v2 = os.path.exists("/sys/fs/cgroup/cgroup.controllers")
        base = "/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/cpuacct"
        self.dir = os.path.join(base, f"demi-bench-probe-{os.getpid()}-{name}")
        self.v2 = v2
        os.makedirs(self.dir, exist_ok=True)

    def join(self):
        with open(os.path.join(self.dir, "cgroup.procs"), "w") as f:
            f.write("0")

    def seconds(self):
        if self.v2:
            with open(os.path.join(self.dir, "cpu.stat")) as f:
                usec = next(int(line.split()[1]) for line in f if line.startswith("usage_usec"))
            return usec / 1e6
        with open(os.path.join(self.dir, "cpuacct.usage")) as f:
            return int(f.read()) / 1e9

    def remove(self):
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)


@contextlib.contextmanager
def supervised(command, folder, stop=None, probe=None, **popen):
    """Runs a supervisor (in `probe`'s cgroup, if given); afterwards stops
    it (SIGTERM, the signal `stop`, or by calling `stop`), waits for it and
    removes `folder`."""
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    if probe is not None:
        popen["preexec_fn"] = probe.join
    daemon = subprocess.Popen(command, **popen)
    try:
        yield daemon
    finally:
        if stop is None:
            daemon.send_signal(signal.SIGTERM)
        elif isinstance(stop, signal.Signals):
            daemon.send_signal(stop)
        else:
            stop()
        daemon.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def run_floor():
    folder = tempfile.mkdtemp(prefix="demi-bench-floor-")
    record = os.path.join(folder, "starts")
    with supervised([FLOOR, "1", CHILD, record], folder):
        return kill_loop(record)


# A cgroup2 hierarchy beside v1's (a hybrid host), bound over
# /sys/fs/cgroup in a private mount namespace: the conductor's v2 path,
# measured on this host. Its controllers are v1's, so none is free for
# it, but joining (cgroup.procs) and cgroup.kill work.
UNIFIED = "/sys/fs/cgroup/unified"
IN_V2 = ["unshare", "-m", "sh", "-c", f"mount --bind {UNIFIED} /sys/fs/cgroup && exec \"$@\"", "sh"]


def cgroup2_beside():
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == UNIFIED and " - cgroup2 " in line for line in f)


def run_conductor(cgroups, standby=None, v2=False):
    folder = tempfile.mkdtemp(prefix="demi-bench-")
    record = os.path.join(folder, "starts")
    extra = f'cgroup_root = "demi-bench-{os.getpid()}"' if cgroups else no_cgroup_extra()
    config = conductor_config(folder, CHILD, [record], extra, standby=standby)
    command = (IN_V2 if v2 else []) + [CONDUCTOR, "run", "--config", config]
    with supervised(command, folder, env={**os.environ, "RUST_LOG": "warn"}):
        return kill_loop(record)


def run_supervisord():
    folder = tempfile.mkdtemp(prefix="demi-bench-sv-")
    record = os.path.join(folder, "starts")
    config = supervisord_config(folder, record)
    with supervised([os.path.join(VENV, "bin", "supervisord"), "-c", config], folder):
        return kill_loop(record)


def run_s6():
    folder = tempfile.mkdtemp(prefix="demi-bench-s6-")
    record = os.path.join(folder, "starts")
    scan = s6_scan(folder, record)
    stop = lambda: subprocess.run(["s6-svscanctl", "-t", scan], check=False)  # noqa: E731
    with supervised(["s6-svscan", scan], folder, stop=stop):
        return kill_loop(record)


def run_runit():
    folder = tempfile.mkdtemp(prefix="demi-bench-runit-")
    record = os.path.join(folder, "starts")
    # SIGHUP: runsvdir stops every runsv (which stop their child) and exits.
    with supervised(["runsvdir", "-P", runit_dir(folder, record)], folder, stop=signal.SIGHUP):
        return kill_loop(record)


def no_cgroup_extra():
    """`[conductor]` lines that run every instance without a cgroup."""
    return 'cgroup_policy = "off"'


def health_probe(socket):
    """A check of `socket`: True once a fresh gRPC client gets SERVING."""
    sys.path.insert(0, os.path.join(VENV, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "site-packages"))
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def serving():
        try:
            with grpc.insecure_channel("unix:" + socket, options=[("grpc.default_authority", "localhost")]) as channel:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=0.05)
                return answer.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    return serving


def run_conductor_grpc(cgroups, standby=None):
    """Kill -> SERVING again over gRPC, for the Rust SDK echo plugin, two
    ways: when the conductor reports it (its own health check answered
    SERVING: the event's timestamp), and when a fresh client of ours then
    sees SERVING too (which adds this Python client's own connection)."""
    folder = tempfile.mkdtemp(prefix="demi-bench-grpc-")
    extra = f'cgroup_root = "demi-bench-grpc-{os.getpid()}"' if cgroups else no_cgroup_extra()
    config = conductor_config(folder, ECHO, [], extra, standby=standby)
    command = [CONDUCTOR, "run", "--log-format", "json", "--config", config]
    serving = health_probe(os.path.join(folder, "run", "plugins", "child", "0.sock"))

    def realtime_ns(stamp):
        # "2026-11-28T01:34:59.424980Z": the log's wall clock, in µs.
        whole, fraction = stamp.rstrip("Z").split(".")
        seconds = datetime.datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc).timestamp()
        return int(seconds) * 10**9 + int(fraction.ljust(9, "0")[:9])

    with supervised(command, folder, stdout=subprocess.PIPE, env={**os.environ, "RUST_LOG": "info"}, text=True) as daemon:
        def serving_event():
            for line in iter(daemon.stdout.readline, ""):
                event = json.loads(line)
                if event.get("message") == "instance serving":
                    return event
            raise RuntimeError("conductor stopped")

        reported, confirmed = [], []
        current = serving_event()["pid"]
        wait_for(serving, 30, "first SERVING")
        for _ in range(KILLS):
            killed, killed_wall = time.monotonic_ns(), time.time_ns()
            os.kill(current, signal.SIGKILL)
            event = serving_event()
            current = event["pid"]
            reported.append((realtime_ns(event["timestamp"]) - killed_wall) / 1e6)
            wait_for(serving, 10, "SERVING again")
            confirmed.append((time.monotonic_ns() - killed) / 1e6)
            quiet()
        return reported, confirmed


def run_echo_alone():
    """The echo plugin's own start: started by this script (a Python
    fork/exec, no supervisor, no cgroup) with the handshake's variables,
    until the same client as above sees SERVING; KILLS times, each after
    the quiet spell."""
    folder = tempfile.mkdtemp(prefix="demi-bench-echo-")
    socket = os.path.join(folder, "echo.sock")
    serving = health_probe(socket)
    env = {
        **os.environ,
        "DEMI_PLUGIN_MAGIC_COOKIE": "7d3c0a91-demi-conductor-plugin",
        "DEMI_PLUGIN_PROTOCOL_VERSIONS": "1",
        "DEMI_PLUGIN_SOCKET": socket,
        "DEMI_PLUGIN_NAME": "child",
        "DEMI_PLUGIN_INSTANCE": "0",
        "DEMI_PLUGIN_REPLICAS": "1",
        "DEMI_STATE_DIRECTORY": folder,
    }

    latencies = []
    try:
        for _ in range(KILLS):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(socket)
            started = time.monotonic_ns()
            echo = subprocess.Popen([ECHO], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_for(serving, 10, "echo SERVING")
                latencies.append((time.monotonic_ns() - started) / 1e6)
            finally:
                echo.kill()
                echo.wait()
            quiet()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return latencies


def stats(latencies):
    s = sorted(latencies)
    pick = lambda p: s[min(len(s) - 1, round((len(s) - 1) * p))]
    return {"min": s[0], "p50": pick(0.5), "p90": pick(0.9), "max": s[-1], "n": len(s)}


def favordynmods():
    with open("/proc/self/mountinfo") as f:
        return any("cgroup" in line and "favordynmods" in line for line in f)


def main():
    setup()
    results = {
        "floor (fork/exec/wait loop in C)": stats(run_floor()),
        "conductor (defaults: cgroup, stand-in)": stats(run_conductor(True)),
        "conductor (own cgroup, no stand-in)": stats(run_conductor(True, standby=False)),
        "conductor (no cgroup)": stats(run_conductor(False)),
        # On v2 every process, stand-ins too, is born in its cgroup (clone3).
        **({
            "conductor (v2 namespace, defaults)": stats(run_conductor(True, v2=True)),
            "conductor (v2 namespace, no stand-in)": stats(run_conductor(True, standby=False, v2=True)),
        } if cgroup2_beside() else {}),
        "s6 (readiness notification)": stats(run_s6()),
        "runit": stats(run_runit()),
        "supervisord": stats(run_supervisord()),
    }
    for cgroups, standby, label in ((True, None, "defaults"), (True, False, "cgroup, no stand-in"), (False, None, "no cgroup")):
        reported, confirmed = run_conductor_grpc(cgroups, standby)
        results[f"-> SERVING, reported ({label})"] = stats(reported)
        results[f"-> SERVING, client sees ({label})"] = stats(confirmed)
    results["echo alone: started -> client sees SERVING"] = stats(run_echo_alone())
    print(f"restart latency, {KILLS} kills each after {QUIET}-{QUIET + JITTER} s quiet, kill -> new process started (ms); favordynmods: {favordynmods()}")
    floor = results["floor (fork/exec/wait loop in C)"]["p50"]
    print(f"{'':44} {'min':>8} {'p50':>8} {'p90':>8} {'max':>8} {'p50/floor':>10}")
    for name, r in results.items():
        print(f"{name:44} {r['min']:8.2f} {r['p50']:8.2f} {r['p90']:8.2f} {r['max']:8.2f} {r['p50'] / floor:9.2f}x")
    for name in ("conductor (defaults: cgroup, stand-in)", "conductor (own cgroup, no stand-in)", "conductor (no cgroup)"):
        for peer in ("runit", "s6 (readiness notification)", "supervisord"):
            ratio = results[name]["p50"] / results[peer]["p50"]
            print(f"p50 {name} / {peer}: {ratio:.3f}")
    # Kill -> SERVING may cost twice the fork/exec floor plus what the
    # plugin itself takes to serve (measured alone, by the same client).
    budget = 2 * floor + results["echo alone: started -> client sees SERVING"]["p50"]
    for label in ("defaults", "cgroup, no stand-in", "no cgroup"):
        seen = results[f"-> SERVING, client sees ({label})"]["p50"]
        print(f"p50 kill -> client sees SERVING ({label}) / (2 x floor + echo alone): {seen:.2f} / {budget:.2f} ms = {seen / budget:.2f}")
    out = os.path.join(TARGET, "restart.json")
    with open(out, "w") as f:
        json.dump({"kills": KILLS, "quiet_s": [QUIET, QUIET + JITTER], "favordynmods": favordynmods(), "results": results}, f, indent=2)
    print(f"result written to {out}")


if __name__ == "__main__":
    main()
