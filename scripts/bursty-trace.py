#!/usr/bin/env python3
"""Writes a bursty load trace: Poisson arrivals per step around a slow
daily mean, plus heavy-tailed spikes (Pareto sizes, a few steps long, at
random times) that no forecast can see coming. Deterministic (seeded).

usage: scripts/bursty-trace.py [DAYS] [STEP_MINUTES] > trace.csv
"""
import datetime as dt
import math
import random
import sys

days = int(sys.argv[1]) if len(sys.argv) > 1 else 10
step = int(sys.argv[2]) if len(sys.argv) > 2 else 5
rng = random.Random(7)
start = dt.datetime(2026, 3, 2, tzinfo=dt.timezone.utc)


def poisson(lam):
    # Knuth's method is exact and fast enough for the means used here.
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


spikes = []  # (remaining steps, height)
print("timestamp,value")
for i in range(days * 24 * 60 // step):
    t = start + dt.timedelta(minutes=i * step)
    hour = t.hour + t.minute / 60
    mean = 30 + 25 * math.sin((hour - 9) / 24 * 2 * math.pi)
    if rng.random() < 0.02:
        # Pareto (alpha 1.5): most spikes small, a few several times the mean.
        height = min(mean * 0.5 * rng.paretovariate(1.5), 150)
        spikes.append([rng.randint(1, 4), height])
    burst = sum(h for _, h in spikes)
    for s in spikes:
        s[0] -= 1
        s[1] *= 0.6
    spikes = [s for s in spikes if s[0] > 0]
    print(f"{t.isoformat().replace('+00:00', 'Z')},{poisson(mean + burst)}")
