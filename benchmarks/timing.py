"""Timing one call at a time on this host, shared by the benchmark scripts."""
from __future__ import annotations

import statistics
import time


def interleaved_ms(fns: dict, n: int = 200, warm: int = 5) -> dict[str, float]:
    """Median ms of each ``fns[name](i)`` on pairs i = 0 … n−1, the methods taking turns on
    each pair (after ``warm`` warm-up rounds), so that every method meets the same machine:
    single-pair times here drift by 2× over minutes (other tenants of the host), which made
    methods timed one after another in separate loops incomparable."""
    for i in range(warm):
        for fn in fns.values():
            fn(i)
    times = {k: [] for k in fns}
    for i in range(n):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(i)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}
