"""Timing shared by the benchmark scripts (run as ``python benchmarks/<name>.py``).

The machines are shared and noisy. Ratios are therefore measured in pairs: the candidate
and its reference run alternately, each pair gives one ratio, and the median of those
ratios is reported with their spread; slow drifts in the machine's load cancel within a
pair. A busy machine still makes nonsense of timings, so :func:`machine_busy` reads the
load average and :class:`Ratio` flags a reference whose own timings drift between pairs;
the scripts print those warnings beside the numbers instead of hiding them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraxir.validation import file_in_the_way


def positive_int(text: str) -> int:
    """An ``argparse`` type for counts and sizes: a bad value is refused with the usage line
    before anything runs, not by torch after minutes of work."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def seed_type(text: str) -> int:
    """An ``argparse`` type for ``--seed``: an integer every generator a script seeds takes."""
    from loraxir.errors import ConfigError
    from loraxir.training.config import check_seed_range

    try:
        value = int(text)
        check_seed_range("the seed", value)
    except (ValueError, ConfigError) as error:
        message = str(error) if isinstance(error, ConfigError) else f"{text!r} is not an integer"
        raise argparse.ArgumentTypeError(message) from None
    return value


def positive_float(text: str) -> float:
    """An ``argparse`` type for sizes in megapixels: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def output_file(text: str) -> Path:
    """An ``argparse`` type for ``--output``: a file that can be written, checked before
    the benchmark runs (not when its results are written, at the end): its folder is made
    and the file opened for appending (and removed again if it was not there)."""
    path = Path(text)
    try:
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text!r} is a folder; name a .json file")
        if path.suffix.lower() == ".png":  # the plots are written beside it, as .png
            raise argparse.ArgumentTypeError(f"{text!r} names a PNG; name a .json file")
        blocking = file_in_the_way(path)
        if blocking is not None:
            raise argparse.ArgumentTypeError(f"{str(blocking)!r} is a file, not a folder")
        existed = path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            pass
        if not existed:
            path.unlink()
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {error.strerror}") from None
    return path


# A reference timing whose spread (max - min) / median exceeds this drifted: the machine's
# load changed during the measure.
DRIFT_LIMIT = 0.25


def _no_sync() -> None:
    return None


def _timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def median_time(
    fn: Callable[[], object], repeats: int, sync: Callable[[], None] = _no_sync
) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls, after one warm-up call.

    ``sync`` waits for queued device work (``torch.cuda.synchronize`` on a GPU).
    """
    fn()
    return statistics.median(_timed(fn, sync) for _ in range(max(repeats, 1)))


@dataclass(frozen=True)
class Ratio:
    """Median of paired ratios ``fn / reference`` with their spread.

    ``low``/``high`` are the smallest and largest paired ratio; ``drift`` is the spread of
    the reference's own timings relative to their median.
    """

    median: float
    low: float
    high: float
    drift: float

    @property
    def drifted(self) -> bool:
        return self.drift > DRIFT_LIMIT


def paired_ratios(
    fn: Callable[[], object],
    reference: Callable[[], object],
    repeats: int,
    sync: Callable[[], None] = _no_sync,
) -> Ratio:
    """Call ``fn`` and ``reference`` alternately ``repeats`` times (after one warm-up each)
    and return the median of the per-pair ratios with their spread."""
    fn()
    reference()
    ratios, references = [], []
    for _ in range(max(repeats, 1)):
        ref = _timed(reference, sync)
        ratios.append(_timed(fn, sync) / ref)
        references.append(ref)
    middle = statistics.median(references)
    return Ratio(
        median=statistics.median(ratios),
        low=min(ratios),
        high=max(ratios),
        drift=(max(references) - min(references)) / middle,
    )


def paired_ratio(fn: Callable[[], object], reference: Callable[[], object], repeats: int) -> float:
    """The median of :func:`paired_ratios` alone."""
    return paired_ratios(fn, reference, repeats).median


def machine_busy(threads: int) -> str | None:
    """A warning when other processes load the CPU, else ``None``.

    The one-minute load average counts runnable threads; beyond the ``threads`` this
    benchmark uses, more than half a core's worth means the timings are shared.
    """
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    others = load - min(threads, cores)
    if others > 0.5:
        return (
            f"machine busy: load average {load:.1f} on {cores} cores while this benchmark "
            f"uses {threads} threads; ratios measured now are unreliable, rerun alone"
        )
    return None
