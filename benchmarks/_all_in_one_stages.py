"""Running the benchmark's stages so that nothing is lost: resumable, refusing to mix runs,
and writing every result atomically.

* A stage (a recipe run, an evaluation) lives in its own folder and is done when its
  marker ``STAGE_DONE.json`` exists; a rerun skips done stages and resumes the others from
  their latest recipe checkpoint (``--resume latest``), so Ctrl-C loses at most the steps
  since the last checkpoint.
* ``run.json`` records the benchmark's settings. A folder holding another run's settings
  (or anything that is not a benchmark output) is refused unless ``--overwrite`` is given.
* Results are written to a temporary file in the same folder and moved over the old one
  with ``os.replace``: a full disk or a crash mid-write leaves the previous file intact.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from loraxir.errors import ConfigError
from loraxir.training.entry import raise_if_interrupted
from loraxir.validation import file_in_the_way

ROOT = Path(__file__).resolve().parents[1]
RUN_FILE = "run.json"
DONE = "STAGE_DONE.json"
# Seconds a stage spent before it was interrupted; a resumed stage adds them to its time.
SPENT = "STAGE_SPENT.json"
CHECKPOINTS = "checkpoints"
RESUME_HINT = "Run the same command again to resume; finished stages are kept."


# ----------------------------------------------------------------- atomic writes
@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` to write to; moved onto ``path`` on success, deleted
    on failure (so ``path`` is either the old file or the complete new one). The result gets
    the permissions of a normally created file (``mkstemp`` makes it private)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        umask = os.umask(0)
        os.umask(umask)
        temporary.chmod(0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ------------------------------------------------------------------ run folder
def _run_settings(record: Path) -> dict[str, Any] | None:
    """The settings a benchmark's ``run.json`` records, or ``None`` when the file is
    missing or is not one (a folder holding some other ``run.json`` is not ours)."""
    try:
        data = read_json(record)
    except (OSError, ValueError):
        return None
    settings = data.get("settings") if isinstance(data, dict) else None
    return settings if isinstance(settings, dict) else None


def prepare_run(output_dir: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """Claim ``output_dir`` for a run with ``settings``; returns ``True`` when resuming.

    A missing or empty folder starts a fresh run. A folder of a run with the same settings
    resumes it. Another run's folder, or a folder that is no benchmark output, raises
    :class:`ConfigError` unless ``overwrite`` (then a benchmark folder is moved aside, kept
    until the new run completes (:func:`replaced_run`); a foreign folder is never touched).
    """
    record = output_dir / RUN_FILE
    blocking = output_dir if output_dir.is_file() else file_in_the_way(output_dir)
    if blocking is not None:
        raise ConfigError(
            f"--output-dir {str(output_dir)!r}: {str(blocking)!r} is a file; name a folder."
        )
    occupied = output_dir.is_dir() and any(output_dir.iterdir())
    earlier = _run_settings(record) if occupied else None
    if occupied and earlier is None:
        raise ConfigError(
            f"{str(output_dir)!r} is not empty and holds no benchmark {RUN_FILE}: it is not a "
            "benchmark output folder, and nothing in it is deleted. Choose another --output-dir."
        )
    if occupied:
        if overwrite:
            folder = output_dir.resolve()  # through a link: the run, not the link, goes
            kept = replaced_run(output_dir)
            # An unfinished replacement of the kept run goes; a finished run is kept instead.
            unfinished = kept.exists() and not (folder / "results.json").is_file()
            gone = folder if unfinished else kept
            if gone.exists():
                # Out of the way in one rename, then deleted: a Ctrl-C halfway through a
                # plain rmtree left a folder without run.json, which later runs refused.
                retired = tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent)
                os.replace(gone, Path(retired) / folder.name)  # into a fresh folder
                shutil.rmtree(retired, ignore_errors=True)
            if not unfinished:
                os.replace(folder, kept)
            print(f"The earlier run is kept in {kept} until this one completes.", flush=True)
        elif earlier == settings:
            return True
        else:
            changed = sorted(k for k in {*earlier, *settings} if earlier.get(k) != settings.get(k))
            raise ConfigError(
                f"{str(output_dir)!r} holds an earlier run with other settings (differences: "
                f"{changed}). Pass --overwrite to replace it, rerun with its settings to resume "
                "it, or choose another --output-dir."
            )
    output_dir.resolve().mkdir(parents=True, exist_ok=True)
    write_json(record, {"settings": settings})
    return False


def replaced_run(output_dir: Path) -> Path:
    """Where ``--overwrite`` keeps the run it replaces until the new one has written its
    results (:func:`discard_replaced_run`): a Ctrl-C, crash or full disk in the new run
    would otherwise leave neither."""
    folder = output_dir.resolve()
    return folder.with_name(f".{folder.name}.replaced")


def discard_replaced_run(output_dir: Path) -> None:
    """Delete the run ``--overwrite`` kept, once this run's results are written."""
    shutil.rmtree(replaced_run(output_dir), ignore_errors=True)


# ---------------------------------------------------------------------- stages
def stage_done(folder: Path) -> dict[str, Any] | None:
    """The record of a finished stage, or ``None``."""
    marker = folder / DONE
    return read_json(marker) if marker.is_file() else None


def run_stage(
    folder: Path, title: str, work: Callable[[], dict[str, Any]], log: Callable[[str], None]
) -> dict[str, Any]:
    """Run ``work`` once: skip it when ``folder`` holds its marker, else run it (timed),
    write the marker and delete the recipe checkpoints it no longer needs. Returns
    ``{"seconds": wall time, "result": what work returned}``. The time of a stage that was
    interrupted (Ctrl-C, an error) and resumed counts every attempt, work redone after the
    last checkpoint included: the table reports what the stage cost."""
    done = stage_done(folder)
    if done is not None:
        log(f"  ✓ {title} (done earlier, {done['seconds']:.0f} s)")
        return done
    spent_path = folder / SPENT
    spent = read_json(spent_path)["seconds"] if spent_path.is_file() else 0.0
    log(f"  → {title}" + (f" (resumed after {spent:.0f} s)" if spent else ""))
    start = time.perf_counter()
    try:
        result = work()
        raise_if_interrupted()  # a Ctrl-C that Python dropped must not mark the stage done
    except BaseException:
        # Best effort: on a full disk this write fails too, and must not hide the error
        # that stopped the stage.
        with suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
            write_json(spent_path, {"seconds": spent + time.perf_counter() - start})
        raise
    record = {"seconds": spent + time.perf_counter() - start, "result": result}
    write_json(folder / DONE, record)
    spent_path.unlink(missing_ok=True)
    for checkpoints in list(folder.rglob(CHECKPOINTS)):
        shutil.rmtree(checkpoints, ignore_errors=True)
    log(f"  ✓ {title} ({record['seconds']:.0f} s)")
    return record


@functools.cache
def recipe(name: str) -> Any:
    """Import ``recipes/<name>.py`` (a script, not a package module) once."""
    path = ROOT / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def recipe_argv(settings: dict[str, Any]) -> list[str]:
    """Command-line arguments for ``settings``: ``--resume latest --set k=v ...`` (values as
    JSON, which is YAML), so an interrupted recipe continues from its last checkpoint."""
    pairs = [f"{key}={json.dumps(value)}" for key, value in settings.items()]
    return ["--resume", "latest", "--set", *pairs]


def run_recipe(main: Callable[[list[str]], dict[str, Any]], settings: dict[str, Any]) -> dict:
    """Call a recipe's ``main(argv)`` in this process, then forget Accelerate's
    process-wide state so the next recipe starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    try:
        return main(recipe_argv(settings))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
