#!/usr/bin/env python3
"""Writes a daily-seasonal load trace: a quiet night, a steep morning ramp,
an evening peak, lower weekends, multiplicative noise. Deterministic (seeded).

usage: scripts/synthetic-trace.py [DAYS] [STEP_MINUTES] > trace.csv
"""
import datetime as dt
import math
import random
import sys

days = int(sys.argv[1]) if len(sys.argv) > 1 else 14
step = int(sys.argv[2]) if len(sys.argv) > 2 else 15
rng = random.Random(42)
start = dt.datetime(2026, 3, 2, tzinfo=dt.timezone.utc)  # a Monday
print("timestamp,value")
for i in range(days * 24 * 60 // step):
    t = start + dt.timedelta(minutes=i * step)
    hour = t.hour + t.minute / 60
    # Night floor, a ramp from 06:00 to 09:00, a lunch plateau, an evening peak.
    morning = 1 / (1 + math.exp(-(hour - 7.5) * 2.2))
    evening = math.exp(-((hour - 19.5) ** 2) / 3.0) * 0.6
    late = 1 / (1 + math.exp((hour - 22.5) * 2.0))
    level = 20 + 160 * morning * late + 110 * evening
    if t.weekday() >= 5:
        level *= 0.7
    level *= 1 + rng.gauss(0, 0.05)
    print(f"{t.isoformat().replace('+00:00', 'Z')},{max(level, 0):.3f}")
