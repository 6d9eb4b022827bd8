"""Recipe configs: typed dataclasses loaded from YAML plus ``key=value`` overrides.

A recipe subclasses :class:`RecipeConfig` with its own fields. Every field has a default
and a ``help`` line (its documentation). Fields marked ``run=True`` in their metadata say
*how* a run is carried out (where it writes, how often it logs or checkpoints, on which
device), not *what* it computes: they may change when a run is resumed; every other field
enters the checkpoint's fingerprint (see :mod:`loraxir.training.checkpoints`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from loraxir.errors import ConfigError, unknown_name
from loraxir.validation import read_yaml_file

ConfigT = TypeVar("ConfigT", bound="RecipeConfig")


def run_setting(default: Any, help: str) -> Any:
    """A field that may change between a run and its resumption."""
    return field(default=default, metadata={"help": help, "run": True})


def check_seed_range(name: str, seed: int) -> None:
    """Raise :class:`ConfigError` unless ``seed`` is in ``[0, 2**32 - 1]``, the range every
    generator a run seeds takes (NumPy's is the narrowest)."""
    if not 0 <= seed < 2**32:
        raise ConfigError(f"{name} must be in [0, 2**32 - 1], got {seed}.")


@dataclass
class RecipeConfig:
    """Settings every recipe shares. A recipe subclasses it with its own fields."""

    seed: int = field(default=0, metadata={"help": "Seed of everything random."})
    output_dir: str = run_setting("outputs/run", "Checkpoints, logs, figures and results.")
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps in total."})
    batch_size: int = field(
        default=32, metadata={"help": "Global batch size, split over processes."}
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    min_learning_rate: float = field(
        default=0.0, metadata={"help": "Floor of the cosine decay (the paper's eta_min)."}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    adam_betas: list[float] = field(
        default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW (beta1, beta2)."}
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    lr_schedule: str = field(
        default="cosine", metadata={"help": "'cosine' (to min_learning_rate) or 'constant'."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping; 0: off."})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'bf16' or 'fp16'."})
    num_workers: int = run_setting(0, "DataLoader worker processes.")
    log_every: int = run_setting(10, "Steps between tensorboard logs.")
    checkpoint_every: int = run_setting(0, "Steps between checkpoints; 0: only at the end.")
    keep_checkpoints: int = run_setting(2, "Checkpoints kept on disk.")
    resume: str | None = run_setting(
        None, "'latest' (in output_dir; fresh start if none) or a checkpoint path."
    )
    overwrite: bool = run_setting(
        False, "Start afresh in an output_dir that holds results or checkpoints (deletes them)."
    )
    cpu: bool = run_setting(False, "Train on the CPU (gloo under torchrun).")

    def __post_init__(self) -> None:
        positive = (
            "max_steps", "batch_size", "gradient_accumulation_steps", "log_every",
            "keep_checkpoints",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("warmup_steps", "max_grad_norm", "num_workers", "checkpoint_every"):
            if not getattr(self, name) >= 0:  # NaN too
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        check_seed_range("seed", self.seed)
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(
                f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}."
            )
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(
                f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}."
            )
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}.")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if not 0 <= self.weight_decay < math.inf:  # NaN fails both comparisons
            raise ConfigError(f"weight_decay must be finite and >= 0, got {self.weight_decay}.")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ConfigError(
                f"min_learning_rate must be in [0, learning_rate={self.learning_rate}], got "
                f"{self.min_learning_rate}."
            )


def load_config(
    cls: type[ConfigT], path: str | Path | None = None, overrides: Sequence[str] = ()
) -> ConfigT:
    """Load a recipe config from YAML (safe loader) plus ``key=value`` overrides.

    Unknown keys raise :class:`~loraxir.errors.UnknownNameError` naming the closest valid
    keys; values are checked against the field types (an int is accepted for a float
    field, and a number written ``1e-3``, which YAML reads as text, is converted). A dotted
    key sets one entry of a mapping setting and keeps the others (``router.max_steps=800``),
    so that changing one value of a section does not mean restating all of it.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = list(fields)
    data: dict[str, Any] = {}
    if path is not None:
        loaded = read_yaml_file(path, "Config file")
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"Config file {str(path)!r} must hold a mapping of settings.")
        data.update(loaded or {})
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Overrides are key=value, got {override!r}.")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(
                f"Override {override!r}: the value is not valid YAML: {error}"
            ) from None
        key = key.strip()
        section = key.split(".")[0]
        if section != key and section not in data and section in fields:
            default = _field_default(fields[section])
            if default is not None:
                data[section] = default
        _set_dotted(data, key, value, override)
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in names:
            raise unknown_name(f"{cls.__name__} setting", key, names)
    values = {key: _coerce(key, value, hints[key]) for key, value in data.items()}
    return cls(**values)


def _field_default(f: dataclasses.Field) -> Any:
    """A fresh copy of the field's default (``default_factory`` called), or ``None``."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else copy.deepcopy(f.default)


def _set_dotted(data: dict[str, Any], key: str, value: Any, override: str) -> None:
    """``data[a][b] = value`` for the key ``"a.b"`` (any depth), creating missing mappings."""
    *parents, leaf = key.split(".")
    if not all([*parents, leaf]):
        raise ConfigError(f"Override {override!r}: a key is names joined by dots, got {key!r}.")
    target = data
    for depth, part in enumerate(parents):
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: depth + 1])
            raise ConfigError(
                f"Override {override!r}: {where!r} is {child!r}, not a mapping of settings; "
                f"set it whole ({where}={{...}})."
            )
        target = child
    target[leaf] = value


def parse_recipe_args(
    cls: type[ConfigT], description: str, argv: Sequence[str] | None = None
) -> ConfigT:
    """The command line every recipe takes: ``--config``, ``--set``, ``--cpu``, ``--resume``,
    ``--overwrite``, ``--output-dir``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file of settings (recipes/configs/*.yaml).")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="*",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="Override settings; values are YAML (e.g. --set max_steps=50 learning_rate=5e-4).",
    )
    parser.add_argument("--output-dir", help="Shortcut for --set output_dir=...")
    parser.add_argument("--resume", help="Shortcut for --set resume=... ('latest' or a path).")
    parser.add_argument("--cpu", action="store_true", help="Train on the CPU (gloo).")
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace the results of an earlier run."
    )
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.resume:
        overrides.append(f"resume={args.resume}")
    if args.cpu:
        overrides.append("cpu=true")
    if args.overwrite:
        overrides.append("overwrite=true")
    return load_config(cls, args.config, overrides)


def config_dict(config: Any) -> dict[str, Any]:
    """A recipe config as a plain dict (for YAML/JSON)."""
    return dataclasses.asdict(config)


def fingerprint(config: RecipeConfig) -> dict[str, Any]:
    """The settings that decide what a run computes (every field not marked ``run``)."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if not f.metadata.get("run", False)
    }


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
    if key == "mixed_precision" and value is False:  # YAML reads a bare `no` as false
        return "no"
    if origin is list and isinstance(value, list | tuple):
        item = args[0] if args else Any
        return [_coerce(key, v, item) for v in value]
    if origin is dict and isinstance(value, dict):
        value_hint = args[1] if len(args) == 2 else Any
        return {k: _coerce(f"{key}.{k}", v, value_hint) for k, v in value.items()}
    quote = (
        " (YAML reads a bare yes/no/on/off as a boolean: quote it)"
        if hint is str and isinstance(value, bool)
        else ""
    )
    raise ConfigError(
        f"Setting {key!r} must be {_type_name(hint)}, got {value!r} ({type(value).__name__})"
        f"{quote}."
    )


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))
