#!/usr/bin/env python3
"""A fleet of N children (100 by default) under the floor (a plain
fork/exec/wait loop in C), the conductor, s6, runit and supervisord, side
by side on the same static C child: time until all N started, the
supervisor's own memory and CPU over an idle window, and a crash storm
(all N SIGKILLed at once) until all N run again. The conductor is also
measured with the Rust echo plugin and gRPC health checks every second,
to SERVING.

A start takes a few hundred milliseconds and one start of the same
supervisor varies by tens of per cent from the next on this host, so
every supervisor is started STARTS times (5 by default), the supervisors
taking turns, and "all started" is the median; each start is printed.

Usage: scripts/bench/fleet [N] [IDLE_SECONDS] [STARTS]    (defaults: 100 30 5)
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import restart as common  # noqa: E402  (setup, starts, wait_for, paths)

N = int(sys.argv[1]) if len(sys.argv) > 1 else 100
STEADY = float(sys.argv[2]) if len(sys.argv) > 2 else 30.0
STARTS = int(sys.argv[3]) if len(sys.argv) > 3 else 5


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


def steady(supervisor_pids, probe):
    """Memory of the supervisor's own processes, and its CPU over the idle
    window (ms, and % of one core), after the stand-ins, prepared a second
    after their instance started, are in place."""
    time.sleep(3)
    cpu0, t0 = probe.seconds(), time.monotonic()
    time.sleep(STEADY)
    cpu1, t1 = probe.seconds(), time.monotonic()
    pids = supervisor_pids()
    rss, pss = memory(pids)
    main_rss, _ = memory(pids[:1])
    _, helpers_pss = memory(pids[1:])
    return {"rss_mib": rss, "pss_mib": pss, "cpu_ms": 1e3 * (cpu1 - cpu0),
            "cpu_percent": 100 * (cpu1 - cpu0) / (t1 - t0), "processes": len(pids),
            # The supervisor's main process alone, and each of its helpers
            # (the conductor's stand-ins, s6-supervise, runsv) on average.
            "main_rss_mib": main_rss,
            "helper_pss_kib": 1024 * helpers_pss / max(1, len(pids) - 1)}


def all_started(record, launched):
    """Seconds from `launched` until the first N children had started."""
    first = common.wait_for(lambda: len(common.starts(record)) >= N and common.starts(record), 60, "all started")
    return max(ns for _, ns in first[:N]) / 1e9 - launched


def fleet(record, launched, supervisor_pids, probe):
    """Up time, idle cost and a crash storm, from the children's start records."""
    result = {"all_started_s": all_started(record, launched), **steady(supervisor_pids, probe)}
    pids = [pid for pid, _ in common.starts(record)[-N:]]
    known = len(common.starts(record))
    killed = time.time()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    again = common.wait_for(lambda: len(common.starts(record)) >= known + N and common.starts(record), 60, "all restarted")
    result["storm_all_started_s"] = max(ns for _, ns in again[known:known + N]) / 1e9 - killed
    return result


def stand_ins():
    """Pids of the conductor's stand-in processes."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if os.path.basename(f.read().split(b"\0")[0]) == b"demi-standin":
                        found.append(int(entry))
            except OSError:
                pass
    return found


def run(name, command, folder, record, supervisor_pids, full, **kw):
    """The whole fleet measurement, or (`full` false) only the time until
    all N started."""
    probe = common.CpuProbe(name)
    launched = time.time()
    with common.supervised(command, folder, probe=probe, **kw) as daemon:
        if full:
            result = fleet(record, launched, lambda: supervisor_pids(daemon), probe)
        else:
            result = {"all_started_s": all_started(record, launched)}
    probe.remove()
    # The next supervisor starts on a machine the last one has left.
    time.sleep(1)
    return result


def floor(full=True):
    folder = tempfile.mkdtemp(prefix="demi-fleet-floor-")
    record = os.path.join(folder, "starts")
    return run("floor", [common.FLOOR, str(N), common.CHILD, record], folder, record, lambda d: [d.pid], full)


def conductor_child(cgroups, standby=None, full=True):
    folder = tempfile.mkdtemp(prefix="demi-fleet-")
    record = os.path.join(folder, "starts")
    extra = f'cgroup_root = "demi-fleet-{os.getpid()}"' if cgroups else common.no_cgroup_extra()
    config = common.conductor_config(folder, common.CHILD, [record], extra, replicas=N, standby=standby)
    result = run("conductor", [common.CONDUCTOR, "run", "--config", config], folder, record,
                 lambda d: [d.pid] + stand_ins(), full, env={**os.environ, "RUST_LOG": "warn"})
    return result


def supervisord(full=True):
    folder = tempfile.mkdtemp(prefix="demi-fleet-sv-")
    record = os.path.join(folder, "starts")
    config = common.supervisord_config(folder, record, N)
    command = [os.path.join(common.VENV, "bin", "supervisord"), "-c", config]
    return run("supervisord", command, folder, record, lambda d: [d.pid], full)


def s6(full=True):
    folder = tempfile.mkdtemp(prefix="demi-fleet-s6-")
    record = os.path.join(folder, "starts")
    scan = common.s6_scan(folder, record, N)
    stop = lambda: subprocess.run(["s6-svscanctl", "-t", scan], check=False)  # noqa: E731
    # s6-svscan and its s6-supervise processes (the children's parents).
    return run("s6", ["s6-svscan", scan], folder, record, lambda d: [d.pid] + children_of(d.pid), full, stop=stop)


def runit(full=True):
    folder = tempfile.mkdtemp(prefix="demi-fleet-runit-")
    record = os.path.join(folder, "starts")
    scan = common.runit_dir(folder, record, N)
    # runsvdir and its runsv processes (the children's parents).
    return run("runit", ["runsvdir", "-P", scan], folder, record, lambda d: [d.pid] + children_of(d.pid), full, stop=signal.SIGHUP)


def conductor_grpc():
    """The Rust echo plugin with gRPC health checks every second: to SERVING."""
    folder = tempfile.mkdtemp(prefix="demi-fleet-grpc-")
    health = '[plugins.child.health]\ninterval = "1s"\ntimeout = "1s"\n'
    config = common.conductor_config(folder, common.ECHO, [], f'cgroup_root = "demi-fleet-grpc-{os.getpid()}"', replicas=N, tables=health)
    serving = []
    lock = threading.Condition()
    launched = time.monotonic()
    probe = common.CpuProbe("grpc")
    command = [common.CONDUCTOR, "run", "--log-format", "json", "--config", config]
    with common.supervised(command, folder, stdout=subprocess.PIPE, env={**os.environ, "RUST_LOG": "info"}, text=True, probe=probe) as daemon:
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
        result.update(steady(lambda: [daemon.pid] + stand_ins(), probe))
        with lock:
            pids = [pid for _, pid in serving[-N:]]
        killed = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        result["storm_all_serving_s"] = wait_serving(2 * N) - killed
    probe.remove()
    return result


def main():
    common.setup()
    supervisors = {
        "floor (fork/exec/wait loop in C)": floor,
        "conductor (defaults)": lambda full: conductor_child(True, full=full),
        "conductor (cgroups, no stand-ins)": lambda full: conductor_child(True, standby=False, full=full),
        "conductor (no cgroups)": lambda full: conductor_child(False, full=full),
        "s6 (readiness notification)": s6,
        "runit": runit,
        "supervisord": supervisord,
    }
    results = {name: measure(True) for name, measure in supervisors.items()}
    for result in results.values():
        result["all_started_samples_s"] = [result["all_started_s"]]
    for _ in range(STARTS - 1):
        for name, measure in supervisors.items():
            results[name]["all_started_samples_s"].append(measure(False)["all_started_s"])
    for result in results.values():
        result["all_started_s"] = statistics.median(result["all_started_samples_s"])
    grpc = conductor_grpc()
    print(f"fleet of {N} static C children; supervisor's own memory, and CPU over {STEADY:.0f} s idle; "
          f"all started: the median of {STARTS} starts each, taken in turns")
    print(f"{'':34} {'all started':>12} {'RSS MiB':>8} {'PSS MiB':>8} {'procs':>5} {'main RSS':>8} {'helper PSS KiB':>14} {'idle CPU ms':>11} {'storm: all back':>16}")
    for name, r in [*results.items(), ("conductor, echo over gRPC", grpc)]:
        up, back = r.get("all_started_s", r.get("all_serving_s")), r.get("storm_all_started_s", r.get("storm_all_serving_s"))
        print(f"{name:34} {up:11.3f}s {r['rss_mib']:8.1f} {r['pss_mib']:8.1f} {r['processes']:5d} {r['main_rss_mib']:8.1f} {r['helper_pss_kib']:14.0f} {r['cpu_ms']:11.1f} {back:15.3f}s")
    print("(echo over gRPC: to SERVING, health checks every second)")
    print("each start, all started (s):")
    for name, r in results.items():
        print(f"  {name:34} " + " ".join(f"{x:.3f}" for x in r["all_started_samples_s"]))
    print(common.hot_code())
    ours = results["conductor (defaults)"]
    for peer in ("floor (fork/exec/wait loop in C)", "s6 (readiness notification)", "runit", "supervisord"):
        p = results[peer]
        print(f"conductor (defaults) / {peer}: all started {ours['all_started_s'] / p['all_started_s']:.2f}x, "
              f"storm {ours['storm_all_started_s'] / p['storm_all_started_s']:.2f}x")
    out = os.path.join(common.TARGET, "fleet.json")
    with open(out, "w") as f:
        json.dump({"n": N, "steady_s": STEADY, "results": results, "conductor_grpc": grpc}, f, indent=2)
    print(f"result written to {out}")


if __name__ == "__main__":
    main()
