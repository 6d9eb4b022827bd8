"""Many inputs, one run: expand files, folders and globs, restore each, report failures.

One bad input never stops the others: a corrupt or unsupported file, a missing path, or
an output that already exists (without ``overwrite``) is skipped and listed at the end,
and the caller exits non-zero. Outputs are written to a temporary name and renamed, so an
interrupted run leaves no half-written file under the final name.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loraxir.errors import LoraIRError
from loraxir.inference.images import Picture, read_picture, write_picture
from loraxir.inference.restorer import Restorer, Routing
from loraxir.inference.video import VIDEO_EXTENSIONS, probe_video, restore_video

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"}
)


@dataclass(frozen=True)
class Job:
    """Restore ``source`` into ``target``."""

    source: Path
    target: Path

    @property
    def is_video(self) -> bool:
        return self.source.suffix.lower() in VIDEO_EXTENSIONS


@dataclass
class Outcome:
    """What a run did: one line per restored input, and the inputs it skipped with why."""

    done: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def collect(inputs: Sequence[str], output: str | Path) -> tuple[list[Job], Outcome]:
    """Expand ``inputs`` (files, folders searched recursively, glob patterns) into jobs.

    ``output`` is the output file when there is exactly one input file and it has a file
    suffix; otherwise a folder: files keep their name, files found in a folder keep their
    path relative to it.
    """
    output = Path(output)
    outcome = Outcome()
    found: list[tuple[Path, Path]] = []  # (source, path relative to the output folder)
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                relative = child.relative_to(path)
                if child.is_file() and not any(p.startswith(".") for p in relative.parts):
                    found.append((child, relative))
        elif path.is_file():
            found.append((path, Path(path.name)))
        elif glob.has_magic(spec):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file())
            if not matches:
                outcome.failed.append((spec, "the pattern matches no file"))
            found += [(match, Path(match.name)) for match in matches]
        else:
            outcome.failed.append((spec, "no such file or folder"))
    single = len(inputs) == 1 and Path(inputs[0]).is_file() and output.suffix != ""
    jobs, targets = [], {}
    for source, relative in found:
        suffix = source.suffix.lower()
        if suffix not in IMAGE_SUFFIXES and suffix not in VIDEO_EXTENSIONS:
            outcome.failed.append((str(source), f"unsupported file type {suffix or '(none)'}"))
            continue
        target = output if single else output / relative
        if target in targets:
            outcome.failed.append((str(source), f"{targets[target]} also writes {target}"))
            continue
        targets[target] = source
        jobs.append(Job(source, target))
    return jobs, outcome


def run(
    restorer: Restorer,
    jobs: Sequence[Job],
    outcome: Outcome,
    overwrite: bool = False,
    smooth: float = 0.0,
    reference: str | Path | None = None,
    progress: bool = True,
) -> Outcome:
    """Restore every job, printing what the router detected per input."""
    from tqdm.auto import tqdm

    bar = tqdm(jobs, desc="inputs", unit="input", disable=not progress)
    for job in bar:
        if job.target.exists() and not overwrite:
            outcome.failed.append((str(job.source), f"{job.target} exists (pass --overwrite)"))
            continue
        try:
            if job.is_video:
                line = _restore_video(restorer, job, smooth, reference, progress)
            else:
                line = _restore_image(restorer, job, progress)
        except (LoraIRError, OSError) as error:
            outcome.failed.append((str(job.source), str(error)))
            continue
        outcome.done.append(line)
        bar.write(line, file=sys.stdout)
    return outcome


def _restore_image(restorer: Restorer, job: Job, progress: bool) -> str:
    from tqdm.auto import tqdm

    picture = read_picture(job.source)
    tiles = len(restorer.plan(*picture.size))
    with tqdm(total=tiles, desc="tiles", leave=False, disable=not progress or tiles < 2) as bar:
        restored, routing = restorer.restore(picture.pixels, on_tile=bar.update)
    _replace(
        job.target,
        lambda path: write_picture(path, Picture(restored, picture.alpha, picture.grayscale)),
    )
    return f"{job.source}: {_detected(restorer, routing)} -> {job.target}"


def _detected(restorer: Restorer, routing: Routing) -> str:
    """``rain (p=0.93)``; for an unsure image also the runner-up and what to do about it."""
    if restorer.degradation is not None:
        return f"{routing.label} (forced)"
    text = f"{routing.label} (p={routing.confidence:.2f})"
    runner_up = routing.runner_up()
    if not routing.unsure or runner_up is None:
        return text
    name, probability = runner_up
    return (
        f"{text}, UNSURE: {name} p={probability:.2f} next; if it is {name}, rerun it with "
        f"--degradation {name}"
    )


def _restore_video(
    restorer: Restorer, job: Job, smooth: float, reference: Any, progress: bool
) -> str:
    from tqdm.auto import tqdm

    frames = probe_video(job.source).frames
    with tqdm(total=frames, desc="frames", leave=False, disable=not progress) as bar:
        report = _replace(
            job.target,
            lambda path: restore_video(
                restorer, job.source, path, smooth, reference, lambda _: bar.update()
            ),
        )
    stem = job.target.with_suffix("")
    csv_path = report.write_csv(stem.with_name(f"{stem.name}.frames.csv"))
    plot_path = report.plot(stem.with_name(f"{stem.name}.frames.png"), title=job.source.name)
    labels, counts = np.unique([row["detected"] for row in report.rows], return_counts=True)
    detected = ", ".join(f"{label} {count}" for label, count in zip(labels, counts, strict=True))
    return (
        f"{job.source}: {len(report.rows)} frames, detected {detected} -> {job.target} "
        f"(report {csv_path.name}, {plot_path.name})"
    )


def _replace(target: Path, write: Any) -> Any:
    """Call ``write(temporary_path)`` and rename the result to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.stem}.partial{target.suffix}")
    try:
        result = write(partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return result
