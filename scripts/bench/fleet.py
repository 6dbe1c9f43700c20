#!/usr/bin/env python3
"""A fleet of N children (100 by default) under the conductor, s6 and
supervisord, side by side on the same static C child: time until all N
started, the supervisor's own memory and CPU over a steady window, and a
crash storm (all N SIGKILLed at once) until all N run again. The conductor
is also measured with the Rust echo plugin and gRPC health checks every
second, to SERVING.

Usage: scripts/bench/fleet [N] [STEADY_SECONDS]    (defaults: 100 10)
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import restart as common  # noqa: E402  (setup, starts, wait_for, paths)

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100
STEADY = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
TICKS = os.sysconf("SC_CLK_TCK")


def children_of(pid):
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    return [int(p) for p in out.split()]


def memory(pids):
    """(RSS, PSS) in MiB summed over `pids`."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except FileNotFoundError:
            pass
    return rss / 1024, pss / 1024


def cpu_seconds(pids):
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
        except FileNotFoundError:
            pass
    return total


def steady(supervisor_pids):
    """Memory, and CPU as % of one core, of the supervisor's own processes."""
    time.sleep(1)
    pids = supervisor_pids()
    cpu0, t0 = cpu_seconds(pids), time.monotonic()
    time.sleep(STEADY)
    cpu1, t1 = cpu_seconds(pids), time.monotonic()
    rss, pss = memory(pids)
    return {"rss_mib": rss, "pss_mib": pss, "cpu_percent": 100 * (cpu1 - cpu0) / (t1 - t0), "processes": len(pids)}


def fleet(record, launched, supervisor_pids):
    """Up time, steady cost and a crash storm, from the children's start records."""
    first = common.wait_for(lambda: len(common.starts(record)) >= N and common.starts(record), 60, "all started")
    up = max(ns for _, ns in first[:N]) / 1e9 - launched
    result = {"all_started_s": up, **steady(supervisor_pids)}
    pids = [pid for pid, _ in common.starts(record)[-N:]]
    known = len(common.starts(record))
    killed = time.time()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    again = common.wait_for(lambda: len(common.starts(record)) >= known + N and common.starts(record), 60, "all restarted")
    result["storm_all_started_s"] = max(ns for _, ns in again[known:known + N]) / 1e9 - killed
    return result


def stand_ins():
    """Pids of the conductor's stand-in processes (their memory is the
    conductor's too)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if b"\0__standby\0" in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def conductor_child(cgroups, standby=False):
    folder = tempfile.mkdtemp(prefix="demi-fleet-")
    record = os.path.join(folder, "starts")
    extra = f'cgroup_root = "demi-fleet-{os.getpid()}"' if cgroups else common.no_cgroup_extra()
    config = common.conductor_config(folder, common.CHILD, [record], extra, replicas=N, standby=standby)
    launched = time.time()
    with common.supervised([common.CONDUCTOR, "run", "--config", config], folder, env={**os.environ, "RUST_LOG": "warn"}) as daemon:
        return fleet(record, launched, lambda: [daemon.pid] + stand_ins())


def supervisord():
    folder = tempfile.mkdtemp(prefix="demi-fleet-sv-")
    record = os.path.join(folder, "starts")
    config = common.supervisord_config(folder, record, N)
    launched = time.time()
    with common.supervised([os.path.join(common.VENV, "bin", "supervisord"), "-c", config], folder) as daemon:
        return fleet(record, launched, lambda: [daemon.pid])


def s6():
    folder = tempfile.mkdtemp(prefix="demi-fleet-s6-")
    record = os.path.join(folder, "starts")
    scan = common.s6_scan(folder, record, N)
    launched = time.time()
    stop = lambda: subprocess.run(["s6-svscanctl", "-t", scan], check=False)  # noqa: E731
    with common.supervised(["s6-svscan", scan], folder, stop=stop) as daemon:
        # s6-svscan and its s6-supervise processes (the children's parents).
        return fleet(record, launched, lambda: [daemon.pid] + children_of(daemon.pid))


def runit():
    folder = tempfile.mkdtemp(prefix="demi-fleet-runit-")
    record = os.path.join(folder, "starts")
    scan = common.runit_dir(folder, record, N)
    launched = time.time()
    with common.supervised(["runsvdir", "-P", scan], folder, stop=signal.SIGHUP) as daemon:
        # runsvdir and its runsv processes (the children's parents).
        return fleet(record, launched, lambda: [daemon.pid] + children_of(daemon.pid))


def conductor_grpc():
    """The Rust echo plugin with gRPC health checks every second: to SERVING."""
    folder = tempfile.mkdtemp(prefix="demi-fleet-grpc-")
    health = '[plugins.child.health]\ninterval = "1s"\ntimeout = "1s"\n'
    config = common.conductor_config(folder, common.ECHO, [], f'cgroup_root = "demi-fleet-grpc-{os.getpid()}"', replicas=N, tables=health)
    serving = []
    lock = threading.Condition()
    launched = time.monotonic()
    command = [common.CONDUCTOR, "run", "--log-format", "json", "--config", config]
    with common.supervised(command, folder, stdout=subprocess.PIPE, env={**os.environ, "RUST_LOG": "info"}, text=True) as daemon:
        def follow():
            for line in iter(daemon.stdout.readline, ""):
                event = json.loads(line)
                if event.get("message") == "instance serving":
                    with lock:
                        serving.append((time.monotonic(), event["pid"]))
                        lock.notify_all()

        threading.Thread(target=follow, daemon=True).start()

        def wait_serving(count):
            with lock:
                if not lock.wait_for(lambda: len(serving) >= count, timeout=60):
                    raise TimeoutError(f"{count} SERVING")
                return serving[count - 1][0]

        result = {"all_serving_s": wait_serving(N) - launched}
        result.update(steady(lambda: [daemon.pid]))
        with lock:
            pids = [pid for _, pid in serving[-N:]]
        killed = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        result["storm_all_serving_s"] = wait_serving(2 * N) - killed
        return result


def main():
    common.setup()
    results = {
        "conductor (cgroups, stand-ins)": conductor_child(True, standby=True),
        "conductor (own cgroups)": conductor_child(True),
        "conductor (no cgroups)": conductor_child(False),
        "s6 (readiness notification)": s6(),
        "runit": runit(),
        "supervisord": supervisord(),
    }
    grpc = conductor_grpc()
    print(f"fleet of {N} static C children; supervisor's own memory and CPU over {STEADY:.0f} s")
    print(f"{'':30} {'all started':>12} {'RSS MiB':>8} {'PSS MiB':>8} {'CPU %':>7} {'storm: all back':>16}")
    for name, r in results.items():
        print(f"{name:30} {r['all_started_s']:11.3f}s {r['rss_mib']:8.1f} {r['pss_mib']:8.1f} {r['cpu_percent']:7.2f} {r['storm_all_started_s']:15.3f}s")
    print(f"{'conductor, echo over gRPC':30} {grpc['all_serving_s']:11.3f}s {grpc['rss_mib']:8.1f} {grpc['pss_mib']:8.1f} {grpc['cpu_percent']:7.2f} {grpc['storm_all_serving_s']:15.3f}s  (to SERVING, 1 s health checks)")
    ours = results["conductor (own cgroups)"]
    for peer in ("runit", "s6 (readiness notification)", "supervisord"):
        p = results[peer]
        print(f"conductor / {peer}: all started {ours['all_started_s'] / p['all_started_s']:.2f}x, "
              f"storm {ours['storm_all_started_s'] / p['storm_all_started_s']:.2f}x, "
              f"RSS (gRPC echo) {grpc['rss_mib'] / p['rss_mib']:.2f}x, PSS {grpc['pss_mib'] / p['pss_mib']:.2f}x")
    out = os.path.join(common.TARGET, "fleet.json")
    with open(out, "w") as f:
        json.dump({"n": N, "steady_s": STEADY, "results": results, "conductor_grpc": grpc}, f, indent=2)
    print(f"result written to {out}")


if __name__ == "__main__":
    main()
