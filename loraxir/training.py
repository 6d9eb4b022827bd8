"""Machinery shared by the training recipes (``recipes/*.py``), so each recipe holds only
what is particular to its job.

A recipe reads top to bottom::

    config = parse_recipe_args(MyConfig, "what this trains")    # YAML + --set overrides
    accelerator = setup_accelerator(config, "my_recipe")         # seeds, trackers, gloo on CPU
    loader = make_loader(dataset, config, shuffle=True)
    model, optimizer, loader, scheduler = accelerator.prepare(...)
    state = resume(accelerator, config)                          # or a fresh TrainState
    for batch in train_batches(loader, state):                   # epochs, skip on resume
        ... step ...
        maybe_checkpoint(accelerator, config, state)

What the helpers guarantee:

* Configs are dataclasses loaded with ``yaml.safe_load``; unknown keys and values of the
  wrong type raise with the key named. ``--set key=value`` overrides parse the value as
  YAML (never ``eval``).
* The same seed gives the same numbers on the CPU, and a resumed run continues bit-exactly
  (seedable sampler, per-epoch ``set_epoch``, skipping consumed batches, RNG states in the
  checkpoint). ``batch_size`` is the *global* batch: the same config gives the same batches
  on 1 process or N (``split_batches``).
* ``--cpu`` (or ``cpu: true``) builds ``Accelerator(cpu=True)``, the only way torchrun
  runs several CPU processes as one job (gloo); without it each process trains alone.
* Progress bars draw on the main process only; tensorboard receives the flattened config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import types
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from loraxir.errors import CheckpointError, ConfigError, unknown_name

ConfigT = TypeVar("ConfigT", bound="RecipeConfig")
STATE_NAME = "trainer_state.json"
CHECKPOINTS_DIR = "checkpoints"


@dataclass
class RecipeConfig:
    """Settings every recipe shares. A recipe subclasses it with its own fields."""

    seed: int = field(default=0, metadata={"help": "Seed of everything random."})
    output_dir: str = field(
        default="outputs/run", metadata={"help": "Checkpoints, logs, figures and results."}
    )
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps in total."})
    batch_size: int = field(
        default=32, metadata={"help": "Global batch size, split over processes."}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    lr_schedule: str = field(
        default="cosine", metadata={"help": "'cosine' (to 0 at max_steps) or 'constant'."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping; 0: off."})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'bf16' or 'fp16'."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    log_every: int = field(default=10, metadata={"help": "Steps between tensorboard logs."})
    checkpoint_every: int = field(
        default=0, metadata={"help": "Steps between checkpoints; 0: only at the end."}
    )
    keep_checkpoints: int = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    resume: str | None = field(
        default=None,
        metadata={"help": "'latest' (in output_dir; fresh start if none) or a checkpoint path."},
    )
    cpu: bool = field(default=False, metadata={"help": "Train on the CPU (gloo under torchrun)."})

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "gradient_accumulation_steps", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(
                f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}."
            )
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(
                f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}."
            )


@dataclass
class TrainState:
    """Where training stands: optimizer ``step`` and ``batches`` consumed since the start."""

    step: int = 0
    batches: int = 0


def load_config(
    cls: type[ConfigT], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> ConfigT:
    """Load a recipe config from YAML (safe loader) plus ``key=value`` overrides.

    Unknown keys raise :class:`~loraxir.errors.UnknownNameError` listing the close ones;
    values are checked against the field types (an int is accepted for a float field, and
    a number written ``1e-3``, which YAML reads as text, is converted).
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {str(path)!r} does not exist.")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ConfigError(f"Config file {str(path)!r} is not valid YAML: {error}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"Config file {str(path)!r} must hold a mapping of settings.")
        data.update(loaded or {})
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Overrides are key=value, got {override!r}.")
        try:
            data[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(
                f"Override {override!r}: the value is not valid YAML: {error}"
            ) from None
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise unknown_name(f"setting of {cls.__name__}", key, names)
    values = {key: _coerce(key, value, hints[key]) for key, value in data.items()}
    return cls(**values)


def parse_recipe_args(
    cls: type[ConfigT], description: str, argv: Sequence[str] | None = None
) -> ConfigT:
    """The command line every recipe takes: ``--config``, ``--set``, ``--cpu``, ``--resume``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file of settings (recipes/configs/*.yaml).")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="Override settings; values are YAML (e.g. --set max_steps=50 grid=0).",
    )
    parser.add_argument("--output-dir", help="Shortcut for --set output_dir=...")
    parser.add_argument("--resume", help="Shortcut for --set resume=... ('latest' or a path).")
    parser.add_argument("--cpu", action="store_true", help="Train on the CPU (gloo).")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.resume:
        overrides.append(f"resume={args.resume}")
    if args.cpu:
        overrides.append("cpu=true")
    return load_config(cls, args.config, overrides)


def config_dict(config: Any) -> dict[str, Any]:
    """A recipe config as a plain dict (for YAML/JSON)."""
    return dataclasses.asdict(config)


def flatten_config(data: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """Flatten nested dicts to ``a/b`` keys and lists/None to text (tensorboard's hparams
    accept scalars only)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}/"))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def setup_accelerator(config: RecipeConfig, project_name: str) -> Any:
    """An ``Accelerator`` for ``config``: seeded, tensorboard under ``output_dir/logs``.

    Also writes the resolved config to ``output_dir/config.yaml`` on the main process.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        cpu=config.cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(
            split_batches=True, use_seedable_sampler=True, data_seed=config.seed
        ),
    )
    if config.batch_size % accelerator.num_processes:
        raise ConfigError(
            f"batch_size={config.batch_size} (global) must be divisible by the "
            f"{accelerator.num_processes} processes."
        )
    set_seed(config.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(config_dict(config), sort_keys=False)
        (output_dir / "config.yaml").write_text(text)
    accelerator.init_trackers(project_name, config=flatten_config(config_dict(config)))
    return accelerator


def make_loader(
    dataset: Dataset, config: RecipeConfig, *, shuffle: bool, batch_size: int | None = None
) -> DataLoader:
    """A DataLoader with a seeded generator (shuffle order and worker seeds).

    Pass it through ``accelerator.prepare``; training loaders drop the last partial batch.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size or config.batch_size,
        shuffle=shuffle,
        drop_last=shuffle,
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed),
    )


def make_optimizer_and_scheduler(
    param_groups: list[dict[str, Any]], config: RecipeConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over ``param_groups`` (each may set its own ``lr``) and a warm-up + cosine (or
    constant) schedule over ``config.max_steps``."""
    trainable = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in param_groups]
    groups = [group for group in trainable if group["params"]]
    if not groups:
        raise ConfigError("Nothing to train: every parameter is frozen.")
    optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup, total, cosine = config.warmup_steps, config.max_steps, config.lr_schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_batches(loader: Any, state: TrainState) -> Iterator[Any]:
    """Yield training batches forever, epoch after epoch, resuming after ``state.batches``.

    Each epoch calls ``loader.set_epoch`` (new shuffle order and, for datasets with
    ``set_epoch``, new crops and degradations); on resume the consumed batches of the
    current epoch are skipped, not replayed. ``state.batches`` is advanced as batches go.
    """
    from accelerate import skip_first_batches

    per_epoch = len(loader)
    if per_epoch == 0:
        raise ConfigError(
            "The training set is smaller than one batch; lower batch_size or add data."
        )
    epoch, skip = divmod(state.batches, per_epoch)
    while True:
        loader.set_epoch(epoch)
        epoch_loader = skip_first_batches(loader, skip) if skip else loader
        for batch in epoch_loader:
            state.batches += 1
            yield batch
        epoch, skip = epoch + 1, 0


def progress_bar(accelerator: Any, config: RecipeConfig, state: TrainState, desc: str) -> Any:
    """A tqdm bar over optimizer steps, drawn by the main process only."""
    from tqdm.auto import tqdm

    return tqdm(
        total=config.max_steps,
        initial=state.step,
        desc=desc,
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )


def checkpoint_dir(config: RecipeConfig, step: int) -> Path:
    """Where the checkpoint of ``step`` lives: ``output_dir/checkpoints/step-0000100``."""
    return Path(config.output_dir) / CHECKPOINTS_DIR / f"step-{step:07d}"


def save_checkpoint(accelerator: Any, config: RecipeConfig, state: TrainState) -> Path:
    """Save model, optimizer, scheduler, RNG and sampler states; call on every process.

    ``trainer_state.json`` is written last, so a folder without it (an interrupted save)
    is never resumed from. Only the ``keep_checkpoints`` newest complete ones are kept.
    """
    folder = checkpoint_dir(config, state.step)
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / STATE_NAME).write_text(json.dumps(dataclasses.asdict(state)) + "\n")
        for old in _complete_checkpoints(config)[: -max(1, config.keep_checkpoints)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def maybe_checkpoint(accelerator: Any, config: RecipeConfig, state: TrainState) -> None:
    """Checkpoint every ``checkpoint_every`` steps and at ``max_steps``."""
    every = config.checkpoint_every
    if state.step == config.max_steps or (every and state.step % every == 0):
        save_checkpoint(accelerator, config, state)


def resume(accelerator: Any, config: RecipeConfig) -> TrainState:
    """Restore the checkpoint named by ``config.resume`` (after ``accelerator.prepare``).

    ``None``: a fresh start. ``"latest"``: the newest complete checkpoint in
    ``output_dir``, or a fresh start when there is none. A path: that checkpoint.
    """
    if config.resume is None:
        return TrainState()
    if config.resume == "latest":
        found = _complete_checkpoints(config)
        if not found:
            accelerator.print(f"No checkpoint in {config.output_dir}; starting from scratch.")
            return TrainState()
        folder = found[-1]
    else:
        folder = Path(config.resume)
        if not (folder / STATE_NAME).is_file():
            raise CheckpointError(
                f"{str(folder)!r} is not a complete checkpoint (no {STATE_NAME}); pass a "
                f"folder under {Path(config.output_dir) / CHECKPOINTS_DIR} or resume=latest."
            )
    state = TrainState(**json.loads((folder / STATE_NAME).read_text()))
    accelerator.load_state(str(folder))
    accelerator.print(f"Resumed from {folder} at step {state.step}.")
    return state


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """``(classes, classes)`` counts; row = true class, column = predicted class."""
    index = labels.long() * classes + predictions.long()
    return torch.bincount(index, minlength=classes * classes).view(classes, classes)


def save_confusion_matrix(
    matrix: torch.Tensor, names: Sequence[str], path: str | Path, title: str = ""
) -> None:
    """Draw a confusion matrix (row-normalised colours, counts written) to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = matrix.float()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    size = 1.6 + 0.75 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(rates, vmin=0, vmax=1, cmap="Blues")
    for (row, col), value in zip(
        torch.cartesian_prod(torch.arange(len(names)), torch.arange(len(names))).tolist(),
        counts.flatten().tolist(),
        strict=True,
    ):
        color = "white" if rates[row, col] > 0.5 else "black"
        ax.text(col, row, f"{int(value)}", ha="center", va="center", color=color)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON (results files that people and scripts read)."""
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def _complete_checkpoints(config: RecipeConfig) -> list[Path]:
    root = Path(config.output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_NAME).is_file())


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the type hint of field ``key``; convert the obvious cases."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, option)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if hint is Any:
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, str):
        return value
    if origin is list and isinstance(value, list | tuple):
        item = args[0] if args else Any
        return [_coerce(key, v, item) for v in value]
    if origin is dict and isinstance(value, dict):
        return dict(value)
    raise ConfigError(
        f"Setting {key!r} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})."
    )


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


__all__ = [
    "RecipeConfig",
    "TrainState",
    "checkpoint_dir",
    "config_dict",
    "confusion_matrix",
    "flatten_config",
    "load_config",
    "make_loader",
    "make_optimizer_and_scheduler",
    "maybe_checkpoint",
    "parse_recipe_args",
    "progress_bar",
    "resume",
    "save_checkpoint",
    "save_confusion_matrix",
    "setup_accelerator",
    "train_batches",
    "write_json",
]
