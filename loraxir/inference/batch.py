"""Many inputs, one run: expand files, folders and globs, restore each, report failures.

One bad input never stops the others: a corrupt or unsupported file, a missing path, or
an output that already exists (without ``overwrite``) is skipped and listed at the end,
and the caller exits non-zero. Outputs are written to a temporary name and renamed, so an
interrupted run leaves no half-written file under the final name. A video also writes its
per-frame report (``<name>.frames.csv`` and ``.png``) next to it: those files count as
outputs too, so two inputs never write the same report and an existing one is not
replaced without ``overwrite``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import secrets
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loraxir.errors import ConfigError, DataError, LoraIRError
from loraxir.inference.images import (
    IMAGE_EXTENSIONS,
    check_output,
    read_picture,
    write_picture,
)
from loraxir.inference.restorer import Restorer, Routing
from loraxir.inference.video import VIDEO_EXTENSIONS, probe_video, restore_video

_KNOWN = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS  # the suffixes restore reads


@dataclass(frozen=True)
class Job:
    """Restore ``source`` into ``target``."""

    source: Path
    target: Path

    @property
    def is_video(self) -> bool:
        return self.source.suffix.lower() in VIDEO_EXTENSIONS

    @property
    def reports(self) -> tuple[Path, ...]:
        """The per-frame report of a video (CSV, plot) beside its target; none for images."""
        if not self.is_video:
            return ()
        stem = self.target.with_suffix("")
        return tuple(stem.with_name(f"{stem.name}.frames{kind}") for kind in (".csv", ".png"))

    @property
    def outputs(self) -> tuple[Path, ...]:
        """Every file this job writes."""
        return (self.target, *self.reports)


@dataclass
class Outcome:
    """What a run did: one line per restored input, and the inputs it skipped with why."""

    done: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def collect(inputs: Sequence[str], output: str | Path) -> tuple[list[Job], Outcome]:
    """Expand ``inputs`` (files, folders searched recursively, glob patterns) into jobs.

    ``output`` is the output file when there is exactly one input file and it has a file
    suffix, does not end in a slash and is not an existing folder; otherwise a folder:
    files keep their name, files found in a folder keep their path relative to it. Files
    under an output folder inside a searched folder are not inputs, so running the same
    command twice does not restore the first run's results. A file named twice is one job;
    a job whose output would be its input is refused, ``--overwrite`` or not. A single
    output file whose suffix does not suit its input (an image suffix for a video) raises
    :class:`ConfigError`, before anything runs.

    An ``output`` with an image or video suffix (``-o out.png``) after a folder or a glob
    is that file when they find one file (the output file and a video's report left out,
    as results), and a :class:`ConfigError` when they find several: a folder named
    ``out.png`` is never what was meant.
    """
    single = len(inputs) == 1 and Path(inputs[0]).is_file()
    single = single and Path(output).suffix != "" and not _is_folder(output)
    file_named = _names_a_file(output)
    output = Path(output)
    outcome = Outcome()
    found: list[tuple[Path, Path]] = []  # (source, path relative to the output folder)
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            results = None if single else _nested(output, path)
            for child in sorted(path.rglob("*")):
                relative = child.relative_to(path)
                hidden = any(p.startswith(".") for p in relative.parts)
                if hidden or _under(child, results):
                    continue
                if child.is_file():
                    found.append((child, relative))
                elif child.is_symlink() and not child.exists():
                    outcome.failed.append((str(child), "a broken link: its target does not exist"))
                elif child.is_symlink() and child.is_dir():
                    outcome.failed.append(
                        (
                            str(child),
                            "a link to a folder is not followed (it may loop back); "
                            "give it as an input of its own",
                        )
                    )
        elif path.is_file():
            found.append((path, Path(path.name)))
        elif glob.has_magic(spec):
            results = None if single else _nested(output, _glob_root(spec))
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file())
            matches = [match for match in matches if not _under(match, results)]
            if not matches:
                outcome.failed.append((spec, "the pattern matches no file"))
            found += [(match, Path(match.name)) for match in matches]
        else:
            outcome.failed.append((spec, "no such file or folder"))
    if not single and file_named:  # the output file (and a video's report) are results
        results = {path.resolve() for path in Job(output, output).outputs}
        found = [(source, rel) for source, rel in found if source.resolve() not in results]
        distinct = {source.resolve() for source, _ in found if source.suffix.lower() in _KNOWN}
        if len(distinct) > 1:
            raise ConfigError(
                f"-o {str(output)!r} names one file, but the inputs hold {len(distinct)} "
                f"files. Name a folder for them (-o {str(output.with_suffix('')) + '/'!r}), or "
                "give one input file."
            )
        single = len(distinct) == 1
    if single and found:
        sole = next((source for source, _ in found if source.suffix.lower() in _KNOWN), None)
        _check_single_output(sole or found[0][0], output)
    jobs, writers, seen = [], {}, set()
    sources = {source.resolve() for source, _ in found}  # none may be written over
    for source, relative in found:
        if source.resolve() in seen:  # one file named twice (a folder and a glob, ./a, a)
            continue
        seen.add(source.resolve())
        suffix = source.suffix.lower()
        if suffix not in _KNOWN:
            outcome.failed.append((str(source), f"unsupported file type {suffix or '(none)'}"))
            continue
        job = Job(source, output if single else output / relative)
        replaced = next((path for path in job.outputs if path.resolve() in sources), None)
        if replaced is not None:
            whose = (
                "the input itself"
                if replaced.resolve() == source.resolve()
                else (f"the input {replaced}")
            )
            outcome.failed.append((str(source), f"its output would be {whose}; choose another -o"))
            continue
        clash = next((path for path in job.outputs if path in writers), None)
        if clash is not None:
            outcome.failed.append(
                (str(source), f"{writers[clash]} also writes {clash}; restore it on its own")
            )
            continue
        writers |= dict.fromkeys(job.outputs, source)
        jobs.append(job)
    return jobs, outcome


def _is_folder(output: str | Path) -> bool:
    """``-o`` names a folder: it ends in a slash or is an existing folder."""
    text = str(output)
    return text.endswith(("/", os.sep)) or Path(text).is_dir()


def _names_a_file(output: str | Path) -> bool:
    """``-o`` has an image or video suffix and does not name a folder."""
    return Path(output).suffix.lower() in _KNOWN and not _is_folder(output)


def _nested(output: Path, searched: Path) -> Path | None:
    """The output folder when it lies strictly inside ``searched`` (its files are results,
    not inputs), else ``None``."""
    output, searched = output.resolve(), searched.resolve()
    return output if output != searched and output.is_relative_to(searched) else None


def _under(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.resolve().is_relative_to(folder)


def _glob_root(pattern: str) -> Path:
    """The folder a glob pattern searches: its parts before the first wildcard."""
    parts = Path(pattern).parts
    index = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return Path(*parts[:index]) if index else Path()


def _check_single_output(source: Path, output: Path) -> None:
    """Refuse an output file of the wrong kind (an unsupported input is reported later)."""
    video = source.suffix.lower() in VIDEO_EXTENSIONS
    allowed = VIDEO_EXTENSIONS if video else IMAGE_EXTENSIONS
    if output.suffix.lower() in allowed or source.suffix.lower() not in allowed:
        return
    kind = "a video" if video else "an image"
    raise ConfigError(
        f"-o {str(output)!r}: {source.name} is {kind}, written as one of "
        f"{', '.join(sorted(allowed))}, not {output.suffix}. Name the output with one of "
        "those suffixes, or end -o with / to write into a folder."
    )


def pending(jobs: Sequence[Job], outcome: Outcome, overwrite: bool) -> list[Job]:
    """The jobs to run: without ``overwrite``, one whose output (or video report) exists
    is listed in ``outcome`` as skipped instead (a report may be another video's of the
    same name), and so is one whose output folder cannot be written (tried with a
    temporary file). Call it before loading a model, so that a run with nothing left to
    do, or nowhere to write, costs nothing."""
    todo, problems = [], {}
    for job in jobs:
        existing = next((path for path in job.outputs if path.exists()), None)
        folder = _existing_ancestor(job.target.parent)
        if folder not in problems:
            problems[folder] = _write_problem(folder)
        if existing is not None and not overwrite:
            outcome.failed.append((str(job.source), f"{existing} exists (pass --overwrite)"))
        elif problems[folder] is not None:
            outcome.failed.append(
                (str(job.source), f"cannot write into {folder}: {problems[folder]}")
            )
        else:
            todo.append(job)
    return todo


def _existing_ancestor(folder: Path) -> Path:
    """``folder``, or its nearest ancestor that exists (the one a run would create it in)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _write_problem(folder: Path) -> str | None:
    """Why nothing can be written into ``folder``, or ``None`` when a file can be."""
    if not folder.is_dir():
        return "it is a file, not a folder"
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".loraxir-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        return error.strerror or str(error)
    return None


def run(
    restorer: Restorer,
    jobs: Sequence[Job],
    outcome: Outcome,
    smooth: float = 0.0,
    reference: str | Path | None = None,
    progress: bool = True,
) -> Outcome:
    """Restore every job, printing what the router detected per input. ``jobs`` are those
    :func:`pending` left: an output that exists is replaced."""
    from tqdm.auto import tqdm

    bar = tqdm(jobs, desc="inputs", unit="input", disable=not progress)
    for job in bar:
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
    check_output(job.target, picture)
    tiles = len(restorer.plan(*picture.size))
    with tqdm(total=tiles, desc="tiles", leave=False, disable=not progress or tiles < 2) as bar:
        restored, routing = restorer.restore(picture.pixels, on_tile=bar.update)
    _replace(
        job.target,
        lambda path: write_picture(path, dataclasses.replace(picture, pixels=restored)),
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
    csv_path, plot_path = job.reports
    with tqdm(total=frames, desc="frames", leave=False, disable=not progress) as bar:

        def write_all(csv: Path, plot: Path, video: Path) -> Any:
            report = restore_video(
                restorer, job.source, video, smooth, reference, lambda _: bar.update()
            )
            report.write_csv(csv)
            report.plot(plot, title=job.source.name)
            return report

        # All three are written before any is placed: a failure places none.
        report = _replace((csv_path, plot_path, job.target), write_all)
    if restorer.degradation is not None:
        detected = f"{restorer.degradation} (forced)"
    else:
        labels, counts = np.unique([row["detected"] for row in report.rows], return_counts=True)
        pairs = zip(labels, counts, strict=True)
        detected = "detected " + ", ".join(f"{label} {count}" for label, count in pairs)
    return (
        f"{job.source}: {len(report.rows)} frames, {detected} -> {job.target} "
        f"(report {csv_path.name}, {plot_path.name})"
    )


def _replace(targets: Path | tuple[Path, ...], write: Any) -> Any:
    """Call ``write(*temporary_paths)`` and, once it has written every one, rename them to
    ``targets`` in order, so that a failure leaves none of them half-made or placed; an
    error names the files the user asked for, not the temporary ones."""
    targets = (targets,) if isinstance(targets, Path) else targets
    # A name no input or output can have (a fixed one was another job's output, or a
    # user's file), ending in the target's suffix, from which the format is chosen.
    tag = secrets.token_hex(4)
    partials = [t.with_name(f".{_short(t.stem)}.{tag}.partial{t.suffix}") for t in targets]
    targets[0].parent.mkdir(parents=True, exist_ok=True)
    try:
        result = write(*partials)
        for partial, target in zip(partials, targets, strict=True):
            os.replace(partial, target)
    except (LoraIRError, OSError) as error:
        message = str(error)
        for partial, target in zip(partials, targets, strict=True):
            message = message.replace(str(partial), str(target))
        if isinstance(error, OSError) and not any(str(t) in message for t in targets):
            message = f"Cannot write {targets[-1]}: {message}"
        raise DataError(message) from error
    finally:
        for partial in partials:
            with contextlib.suppress(OSError):  # the error raised above says what went wrong
                partial.unlink(missing_ok=True)
    return result


def _short(stem: str) -> str:
    """``stem`` cut to at most 64 bytes (whole characters): a name near the 255-byte limit
    must still have a temporary twin."""
    while len(os.fsencode(stem)) > 64:
        stem = stem[:-1]
    return stem
