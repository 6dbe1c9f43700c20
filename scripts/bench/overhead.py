#!/usr/bin/env python3
"""The conductor's own cost at scale: N echo instances with gRPC health
checks every second. Measures the time from start until all N are
SERVING, then the conductor's resident memory and CPU (utime + stime from
/proc) over a steady-state window, and, in the same window against the
same instances, the floor: a bare HTTP/2 client (conductor/examples/
health_floor.rs) checking each instance once a second. Prints the CPU
per check of both.

Usage: scripts/bench/overhead [STEADY_SECONDS] [N ...]   (default: 30 100 1000)
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONDUCTOR = os.path.join(ROOT, "target", "release", "conductor")
ECHO = os.path.join(ROOT, "target", "release", "demi-plugin-echo")
FLOOR = os.path.join(ROOT, "target", "release", "examples", "health_floor")
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(") ", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run(n, steady):
    folder = tempfile.mkdtemp(prefix="demi-overhead-")
    config = os.path.join(folder, "conductor.toml")
    with open(config, "w") as f:
        f.write(f'''[conductor]
runtime_dir = "{folder}/run"
state_dir = "{folder}/state"
cgroup_root = "demi-overhead-{os.getpid()}-{n}"
[conductor.metrics]
listen = "127.0.0.1:0"

[plugins.echo]
command = "{ECHO}"
replicas = {n}
startup_timeout = "120s"
[plugins.echo.health]
interval = "1s"
timeout = "1s"
''')
    started = time.monotonic()
    daemon = subprocess.Popen([CONDUCTOR, "run", "--log-format", "json", "--config", config],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "RUST_LOG": "info"})
    serving = set()
    spawned_all = None
    try:
        for line in iter(daemon.stdout.readline, ""):
            event = json.loads(line)
            message = event.get("message")
            if message == "instance spawned" and spawned_all is None:
                pass
            if message == "instance serving":
                serving.add(event.get("span", {}).get("instance"))
                if len(serving) == n:
                    break
        all_serving = time.monotonic() - started
        # Drain the log in the background so the conductor never blocks on it.
        drain = subprocess.Popen(["cat"], stdin=daemon.stdout, stdout=subprocess.DEVNULL)
        time.sleep(2)
        sockets = [os.path.join(folder, "run", "plugins", "echo", f"{i}.sock") for i in range(n)]
        floor = subprocess.Popen([FLOOR, str(steady), *sockets], stdout=subprocess.PIPE, text=True)
        cpu0, t0 = cpu_seconds(daemon.pid), time.monotonic()
        time.sleep(steady)
        cpu1, t1 = cpu_seconds(daemon.pid), time.monotonic()
        floor_result = json.loads(floor.communicate(timeout=120)[0])
        result = {
            "instances": n,
            "all_serving_s": all_serving,
            "rss_mib": rss_mib(daemon.pid),
            "cpu_percent_of_one_core": 100 * (cpu1 - cpu0) / (t1 - t0),
            "health_checks_per_s": n,
            "conductor_us_per_check": 1e6 * (cpu1 - cpu0) / (n * (t1 - t0)),
            "floor_us_per_check": floor_result["us_per_check"],
            "floor_checks": floor_result["checks"],
            "floor_failed": floor_result["failed"],
        }
        return result
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=120)
        except subprocess.TimeoutExpired:
            daemon.kill()


def main():
    steady = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    sizes = [int(a) for a in sys.argv[2:]] or [100, 1000]
    subprocess.run(["cargo", "build", "--release", "--workspace", "--bins"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--release", "-p", "demi-conductor", "--example", "health_floor"], cwd=ROOT, check=True)
    results = [run(n, steady) for n in sizes]
    print(f"conductor overhead, health checks every 1 s, {steady} s steady state")
    print(f"{'instances':>10} {'all SERVING':>12} {'RSS MiB':>9} {'CPU % core':>11} {'µs/check':>9} {'floor µs/check':>15} {'ratio':>6}")
    for r in results:
        ratio = r["conductor_us_per_check"] / max(r["floor_us_per_check"], 1e-9)
        print(f"{r['instances']:>10} {r['all_serving_s']:>11.2f}s {r['rss_mib']:>9.1f} {r['cpu_percent_of_one_core']:>11.2f} "
              f"{r['conductor_us_per_check']:>9.1f} {r['floor_us_per_check']:>15.1f} {ratio:>5.2f}x")
    print("floor: a bare HTTP/2 client checking the same instances once a second, in the same window")
    out = os.path.join(ROOT, "target", "bench", "overhead.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"result written to {out}")


if __name__ == "__main__":
    main()
