"""Training checkpoints: save every N steps, resume bit-exactly, refuse what does not fit.

A checkpoint is ``output_dir/checkpoints/step-0000100/``: Accelerate's ``save_state``
(model, optimizer, scheduler, RNG and sampler states, registered objects such as the EMA)
plus ``trainer_state.json``, written last. A folder without that file is an interrupted
save and is never resumed from; older checkpoints are deleted only after a newer one is
complete, so a run killed while writing leaves the previous checkpoint loadable.

``trainer_state.json`` also holds the run's fingerprint: the settings that decide what it
computes (:func:`~loraxir.training.config.fingerprint`) and the names and shapes of the
trained model's tensors. Resuming from a checkpoint of another config or another backbone
raises :class:`~loraxir.errors.CheckpointError` naming the difference, before anything is
loaded. Checkpoints hold pickled optimizer states (Accelerate's format): resume only from
checkpoints your own runs wrote. Results meant for sharing are the safetensors folders a
recipe writes at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraxir.errors import CheckpointError, ConfigError
from loraxir.training.config import RecipeConfig, fingerprint

STATE_NAME = "trainer_state.json"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"
FIGURES_DIR = "figures"


@dataclass
class TrainState:
    """Where training stands: optimizer ``step`` and ``batches`` consumed since the start,
    and a digest of the training ``data`` (``None``: not recorded)."""

    step: int = 0
    batches: int = 0
    data: str | None = None


def checkpoint_dir(config: RecipeConfig, step: int) -> Path:
    """Where the checkpoint of ``step`` lives: ``output_dir/checkpoints/step-0000100``."""
    return Path(config.output_dir) / CHECKPOINTS_DIR / f"step-{step:07d}"


def complete_checkpoints(config: RecipeConfig) -> list[Path]:
    """Complete checkpoints of ``config.output_dir`` (a readable ``trainer_state.json``),
    oldest first."""
    root = Path(config.output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if _read_state(p) is not None)


def _any_checkpoint(output_dir: Path) -> bool:
    """Whether a complete checkpoint lies anywhere under ``output_dir`` (recipes that run
    several trainings keep theirs in subfolders)."""
    return output_dir.is_dir() and any(
        _read_state(state.parent) is not None for state in output_dir.rglob(STATE_NAME)
    )


def _holds_results(path: Path) -> bool:
    """Whether ``path`` holds anything of a finished run: a file outside checkpoint
    folders (a run stopped while writing its first checkpoint, say on a full disk, leaves
    only an incomplete one, from which the same command must start again)."""
    if not path.is_dir():
        return True
    return any(
        item.is_file() and CHECKPOINTS_DIR not in item.relative_to(path).parts
        for item in path.rglob("*")
    )


def _read_state(folder: Path) -> dict[str, Any] | None:
    """``folder``'s ``trainer_state.json``, or ``None`` when it is missing or unreadable."""
    try:
        record = json.loads((folder / STATE_NAME).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def prepare_output_dir(
    config: RecipeConfig,
    results: tuple[str, ...] = (),
    reads: dict[str, str | os.PathLike | None] | None = None,
) -> None:
    """Refuse to start a fresh run over an earlier one, unless ``overwrite`` is set.

    An ``output_dir`` holding checkpoints, ``metrics.json`` or one of the ``results``
    folders belongs to another run: starting afresh there would mix their checkpoints and
    replace their results. ``resume`` continues it instead; ``overwrite`` replaces it. Call
    it on every process before anything is built. It deletes nothing: the earlier run's
    checkpoints and logs go only when the new run has been built
    (:func:`~loraxir.training.start_recording`), so that a setting refused on the way (a
    bad value, a missing router) costs nothing.

    ``reads`` maps settings to the files or folders the run reads (``{"adapter": ...}``):
    one that is ``output_dir`` itself or lies in what the run writes there is refused
    whatever the flags, since ``overwrite`` would replace the run's own input.
    """
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir {str(output_dir)!r} is a file; name a folder.")
    for name in (CHECKPOINTS_DIR, LOGS_DIR, FIGURES_DIR, *results):
        if (output_dir / name).exists() and not (output_dir / name).is_dir():
            raise ConfigError(
                f"{str(output_dir / name)!r} is a file, where the run writes its {name}/ "
                "folder; move it, or choose another output_dir."
            )
    _refuse_writing_over_inputs(output_dir, results, reads or {})
    found = [
        name for name in (CHECKPOINTS_DIR, "metrics.json", *results) if (output_dir / name).exists()
    ]
    if config.resume == "latest" and not config.overwrite and not _any_checkpoint(output_dir):
        finished = [
            name for name in found if name != CHECKPOINTS_DIR and _holds_results(output_dir / name)
        ]
        if finished:
            raise ConfigError(
                f"Nothing to resume in {str(output_dir)!r}: it has no complete checkpoint, but "
                f"holds {finished} of an earlier run, which starting from scratch would "
                "replace. Pass --overwrite to replace it, or choose another output_dir."
            )
    if config.resume is not None:
        return
    if found and not config.overwrite:
        raise ConfigError(
            f"output_dir {str(output_dir)!r} already holds {found} of an earlier run. Pass "
            "--overwrite to replace it, --resume latest to continue it, or choose another "
            "output_dir."
        )


def _refuse_writing_over_inputs(
    output_dir: Path, results: tuple[str, ...], reads: dict[str, str | os.PathLike | None]
) -> None:
    """Raise :class:`ConfigError` when a setting in ``reads`` names ``output_dir`` or a
    path inside the folders a run writes there (its ``results``, checkpoints, logs and
    figures)."""
    out = output_dir.resolve()
    # Resolved one by one: a run writes through a link at one of them (staged_folder).
    written = {
        (out / name).resolve(): name for name in (*results, CHECKPOINTS_DIR, LOGS_DIR, FIGURES_DIR)
    }
    for name, value in reads.items():
        if value is None or not Path(value).exists():  # a name (a Hub id, a variant)
            continue
        path = Path(value).resolve()
        hit = next((w for w in written if path == w or w in path.parents), None)
        if path == out or hit is not None:
            where = "is output_dir itself" if path == out else f"lies in its {written[hit]}/"
            raise ConfigError(
                f"{name}={str(value)!r} is read by this run but {where} "
                f"(output_dir={str(output_dir)!r}), which the run writes over, --overwrite or "
                "not. Choose another output_dir."
            )


def clear_earlier_run(config: RecipeConfig) -> None:
    """With ``overwrite`` (and no ``resume``), delete the earlier run's checkpoints, logs
    and step figures (grids of steps the new run may never reach would pass for its own);
    its results are replaced when the new run saves. Main process only."""
    if config.overwrite and config.resume is None:
        for name in (CHECKPOINTS_DIR, LOGS_DIR, FIGURES_DIR):
            shutil.rmtree(Path(config.output_dir) / name, ignore_errors=True)


def check_resumable(config: RecipeConfig) -> None:
    """Before anything is written: the checkpoint ``config.resume`` names (if any yet) was
    written with this run's settings (:class:`CheckpointError` otherwise), so that a refused
    resume leaves the run's ``config.yaml`` and logs as they were."""
    folder = _resume_folder(config)
    if folder is not None:
        _check_settings(folder, _read_state(folder) or {}, config)


def model_signature(accelerator: Any) -> str:
    """A digest of the names and shapes of every prepared model's tensors."""
    digest = hashlib.sha256()
    for model in getattr(accelerator, "_models", []):
        for name, tensor in accelerator.unwrap_model(model).state_dict().items():
            digest.update(f"{name}:{tuple(tensor.shape)};".encode())
    return digest.hexdigest()[:16]


def save_checkpoint(accelerator: Any, config: RecipeConfig, state: TrainState) -> Path:
    """Save model, optimizer, scheduler, RNG and sampler states; call on every process.

    ``trainer_state.json`` (with the fingerprint) is written last, so a folder without it
    is never resumed from. Only the ``keep_checkpoints`` newest complete ones are kept.
    """
    folder = checkpoint_dir(config, state.step)
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        record = {
            **dataclasses.asdict(state),
            "config": fingerprint(config),
            "model": model_signature(accelerator),
            "processes": accelerator.num_processes,
        }
        partial = folder / f".{STATE_NAME}.partial"
        partial.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(partial, folder / STATE_NAME)
        for old in complete_checkpoints(config)[: -max(1, config.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def maybe_checkpoint(accelerator: Any, config: RecipeConfig, state: TrainState) -> None:
    """Checkpoint every ``checkpoint_every`` steps and at ``max_steps``."""
    every = config.checkpoint_every
    if state.step == config.max_steps or (every and state.step % every == 0):
        save_checkpoint(accelerator, config, state)


def last_checkpoint(config: RecipeConfig) -> Path | None:
    """The newest complete checkpoint of the run, or ``None``."""
    found = complete_checkpoints(config)
    return found[-1] if found else None


def resume(accelerator: Any, config: RecipeConfig, data: str | None = None) -> TrainState:
    """Restore the checkpoint named by ``config.resume`` (after ``accelerator.prepare``).

    ``None``: a fresh start. ``"latest"``: the newest complete checkpoint in
    ``output_dir`` that loads (a damaged one, say a truncated weights file, is reported and
    the one before it tried), or a fresh start when there is none. A path: that
    checkpoint. The checkpoint's fingerprint must match this run's
    (:class:`CheckpointError` otherwise), and so must its ``data`` digest when both
    record one: settings name a data folder, not what it holds, and a run resumed on other
    files would not be the run it continues. Each load restores every state the checkpoint
    holds, so one that loads after a damaged one leaves nothing of it behind.
    """
    folder = _resume_folder(config)
    if folder is None:
        if config.resume is not None:
            accelerator.print(f"No checkpoint in {config.output_dir}; starting from scratch.")
        return TrainState(data=data)
    candidates = complete_checkpoints(config)[::-1] if config.resume == "latest" else [folder]
    problems = []
    for candidate in candidates:
        record = _read_state(candidate) or {}
        _check_settings(candidate, record, config)
        if record.get("model") not in (None, model_signature(accelerator)):
            raise CheckpointError(
                f"Cannot resume from {str(candidate)!r}: its model has other tensors (names "
                "or shapes) than the one this run built, although the settings match (was the "
                "base network or the router replaced on disk?). Start a new run (another "
                "output_dir, or --overwrite)."
            )
        if None not in (data, record.get("data")) and record["data"] != data:
            raise CheckpointError(
                f"Cannot resume from {str(candidate)!r}: it trained on other data than this "
                "run finds (files of a data folder were added, removed or replaced since), "
                "although the settings match. Put the data back as it was, or start a new "
                "run (another output_dir, or --overwrite)."
            )
        readable = _random_states_load(candidate, accelerator.process_index)
        if not bool(accelerator.gather(torch.tensor([readable], device=accelerator.device)).all()):
            # Decided by every process together: they must all resume from one checkpoint.
            problems.append(f"{candidate.name}: a process's random states do not load")
            accelerator.print(f"Cannot load checkpoint {candidate} ({problems[-1]}).")
            continue
        try:
            accelerator.load_state(str(candidate))
        except torch.OutOfMemoryError:
            raise  # not a damaged file
        except Exception as error:  # safetensors, pickle and torch each raise their own
            problems.append(f"{candidate.name}: {type(error).__name__}: {error}")
            accelerator.print(f"Cannot load checkpoint {candidate} ({problems[-1]}).")
            continue
        state = TrainState(step=record["step"], batches=record["batches"], data=data)
        accelerator.print(f"Resumed from {candidate} at step {state.step}.")
        saved_by, now = record.get("processes"), accelerator.num_processes
        if saved_by not in (None, now):
            accelerator.print(
                f"The checkpoint was saved by {saved_by} process(es), and {now} resume it: the "
                "run goes on with the same global batches, equal to an uninterrupted run to "
                "float rounding, not bit for bit (per-process random states do not carry over)."
            )
        return state
    raise CheckpointError(
        f"No checkpoint could be loaded ({'; '.join(problems)}). Their files are damaged; "
        "start a new run (another output_dir, or --overwrite), or resume from a copy."
    )


def _random_states_load(folder: Path, process: int) -> bool:
    """Whether this process's random states in ``folder`` load: Accelerate logs a failure
    to read them and goes on, and the resumed run then draws other numbers (no longer the
    uninterrupted run's, bit for bit). A missing file (a run resumed on more processes than
    saved it) is Accelerate's to handle, as before."""
    path = folder / f"random_states_{process}.pkl"
    if not path.is_file():
        return True
    try:
        torch.load(path, weights_only=False)  # Accelerate's own pickle, of this run
    except Exception:  # pickle, EOF and torch each raise their own
        return False
    return True


def _resume_folder(config: RecipeConfig) -> Path | None:
    """The checkpoint ``config.resume`` names: ``None`` for a fresh start (no resume, or
    ``"latest"`` with no checkpoint yet)."""
    if config.resume is None:
        return None
    if config.resume == "latest":
        return last_checkpoint(config)
    folder = Path(config.resume)
    if _read_state(folder) is None:
        raise CheckpointError(
            f"{str(folder)!r} is not a complete checkpoint (no readable {STATE_NAME}); pass "
            f"a folder under {Path(config.output_dir) / CHECKPOINTS_DIR} or resume=latest."
        )
    return folder


def _check_settings(folder: Path, record: dict[str, Any], config: RecipeConfig) -> None:
    saved = record.get("config")
    if saved is None:
        return
    current = json.loads(json.dumps(fingerprint(config)))
    differences = [
        f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if differences:
        raise CheckpointError(
            f"Cannot resume from {str(folder)!r}: it was written by a run with other settings "
            f"({'; '.join(differences)}). Resume with the settings it was written with, or "
            "start a new run (another output_dir, or --overwrite)."
        )
