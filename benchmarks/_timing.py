"""Timing shared by the benchmark scripts (run as ``python benchmarks/<name>.py``).

The machines are shared and noisy, so ratios are measured in pairs: the candidate and
its reference are called alternately and the ratio of their medians is reported, which
cancels slow drifts in the machine's load.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    return statistics.median(_timed(fn) for _ in range(repeats))


def paired_ratio(fn: Callable[[], object], reference: Callable[[], object], repeats: int) -> float:
    """Median time of ``fn`` over median time of ``reference``, called alternately."""
    fn()
    reference()
    pairs = [(_timed(reference), _timed(fn)) for _ in range(repeats)]
    return statistics.median(t for _, t in pairs) / statistics.median(r for r, _ in pairs)
