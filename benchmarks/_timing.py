"""Timing for every benchmark: one call timed, and two sides timed in alternation.

Benchmarks report ratios against a baseline measured in the same run (DESIGN.md); on a
shared machine load drifts over a run, so the two sides alternate and each keeps its best.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def timer(fn: Callable[[], object]) -> Callable[[], float]:
    """``fn`` as a callable returning the seconds one call of it took."""
    def run() -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    return run


def best_alternating(a: Callable[[], float], b: Callable[[], float], repeats: int
                     ) -> tuple[float, float]:
    """Each side's best time, the two run alternately: timings on a shared machine drift."""
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(a())
        times_b.append(b())
    return min(times_a), min(times_b)
