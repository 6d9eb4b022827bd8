"""``LoraIRConfig``: the configuration of degradation-routed low-rank experts.

It is a ``peft.PeftConfig`` with a plain-string ``peft_type`` (``"LORAXIR"``), so that
peft's own ``get_peft_model``, ``save_pretrained`` and ``PeftModel.from_pretrained`` accept
it once ``loraxir`` is imported. Every field has a default and a ``help`` line; the
help lines are the field documentation; ``docs/api.md`` repeats them (a test keeps the two equal).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from peft import PeftConfig

from loraxir import __version__
from loraxir.errors import ConfigError
from loraxir.layers import COMPUTE_MODES

PEFT_TYPE = "LORAXIR"
CONFIG_NAME = "adapter_config.json"
TRAINABLE_POLICIES = ("experts", "new_experts", "experts+router", "all")
INIT_SCHEMES = ("default", "gaussian")


@dataclass
class LoraIRConfig(PeftConfig):
    """Configuration of routed low-rank experts (LoRA-IR) for a restoration backbone.

    Example::

        config = LoraIRConfig(degradations=["noise", "rain", "haze"], r=8, preset="nafnet")
    """

    r: int = field(default=8, metadata={"help": "Rank of each expert (r >= 1)."})
    lora_alpha: float = field(
        default=16.0,
        metadata={"help": "Scaling numerator: each expert is scaled by lora_alpha / r."},
    )
    degradations: list[str] | None = field(
        default=None,
        metadata={
            "help": "Degradation class names, one expert each, in router-logit order. "
            "Defaults to expert_0..expert_{num_experts-1}."
        },
    )
    num_experts: int | None = field(
        default=None, metadata={"help": "Number of experts E; defaults to len(degradations)."}
    )
    top_k: int = field(
        default=1, metadata={"help": "Experts mixed per image by the router (1 = hard pick)."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature of the router's top-k gating (> 0)."}
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules that get experts: a list of names (a name matches itself and any "
            "module whose dotted path ends with it), a regex string (full match on the dotted "
            "path), or a preset name. None uses the preset's targets."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or regex of modules never to target."}
    )
    preset: str | None = field(
        default=None,
        metadata={
            "help": "Backbone preset (see loraxir.list_presets()); detected from the module "
            "class or spandrel architecture when None."
        },
    )
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the experts' input while training, in [0, 1)."}
    )
    trainable: str = field(
        default="experts",
        metadata={
            "help": "What trains: 'experts' (base and router frozen), 'new_experts' (only the "
            "experts of the last add_degradation), 'experts+router', or 'all' (base weights "
            "too, as in the paper's code)."
        },
    )
    init: str = field(
        default="default",
        metadata={
            "help": "Expert initialisation: 'default' (Kaiming-uniform A, zero B) or "
            "'gaussian' (A ~ N(0, 1/r), zero B). B = 0 keeps the backbone unchanged."
        },
    )
    compute: str = field(
        default="auto",
        metadata={
            "help": "How expert layers compute: 'auto', 'activation', 'weight' or 'batched' "
            "(all exact; see docs/api.md)."
        },
    )
    expert_chunks: list[int] | None = field(
        default=None,
        metadata={
            "help": "Experts per stored chunk (written by add_degradation; None = one chunk). "
            "Chunks let old experts stay frozen and bit-identical while new ones train."
        },
    )
    router: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Spec of the attached router (written by the model, not by users)."},
    )
    loraxir_version: str = field(
        default=__version__, metadata={"help": "loraxir version that wrote this config."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        self._validate()

    # ------------------------------------------------------------- validation
    def _validate(self) -> None:
        if self.task_type is not None:
            raise ConfigError(
                f"task_type must be None for a restoration backbone, got {self.task_type!r}."
            )
        _check_int("r", self.r, minimum=1)
        if (
            not _is_number(self.lora_alpha)
            or not math.isfinite(self.lora_alpha)
            or self.lora_alpha <= 0
        ):
            raise ConfigError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}.")
        self.lora_alpha = float(self.lora_alpha)
        self._resolve_experts()
        _check_int("top_k", self.top_k, minimum=1)
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"top_k={self.top_k} is larger than num_experts={self.num_experts}; "
                f"choose 1 <= top_k <= {self.num_experts}."
            )
        if not _is_number(self.temperature) or not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}.")
        if not _is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        _check_choice("trainable", self.trainable, TRAINABLE_POLICIES)
        _check_choice("init", self.init, INIT_SCHEMES)
        _check_choice("compute", self.compute, COMPUTE_MODES)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                value = sorted(value)
                setattr(self, name, value)
            if value is not None and not (
                isinstance(value, str)
                or (
                    isinstance(value, list)
                    and value
                    and all(isinstance(v, str) and v for v in value)
                )
            ):
                raise ConfigError(
                    f"{name} must be None, a regex string or a non-empty list of module names, "
                    f"got {value!r}."
                )
        if self.preset is not None and not isinstance(self.preset, str):
            raise ConfigError(f"preset must be a preset name (str) or None, got {self.preset!r}.")
        if self.expert_chunks is None:
            self.expert_chunks = [self.num_experts]
        if (
            not isinstance(self.expert_chunks, list)
            or not all(isinstance(c, int) and c >= 1 for c in self.expert_chunks)
            or sum(self.expert_chunks) != self.num_experts
        ):
            raise ConfigError(
                f"expert_chunks must be positive integers summing to num_experts="
                f"{self.num_experts}, got {self.expert_chunks!r}."
            )
        if self.router is not None and not isinstance(self.router, dict):
            raise ConfigError(
                f"router must be a dict spec or None, got {type(self.router).__name__}."
            )

    def _resolve_experts(self) -> None:
        if self.degradations is None:
            if self.num_experts is None:
                raise ConfigError(
                    "Give the degradation class names (degradations=['noise', 'rain', ...]) or "
                    "num_experts."
                )
            _check_int("num_experts", self.num_experts, minimum=1)
            self.degradations = [f"expert_{i}" for i in range(self.num_experts)]
            return
        names = self.degradations
        if isinstance(names, (str, bytes)) or not isinstance(names, (list, tuple)):
            raise ConfigError(f"degradations must be a list of names, got {names!r}.")
        names = list(names)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"degradations must be non-empty strings, got {names!r}.")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"degradations must be unique; repeated: {duplicates}.")
        if self.num_experts is None:
            self.num_experts = len(names)
        _check_int("num_experts", self.num_experts, minimum=1)
        if self.num_experts != len(names):
            raise ConfigError(
                f"num_experts={self.num_experts} does not match the {len(names)} degradations "
                f"{names}; drop num_experts or give one name per expert."
            )
        self.degradations = names

    # ------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = True) -> LoraIRConfig:
        """Build a config from a dict (e.g. a parsed ``adapter_config.json``).

        Keys this version does not know come from another loraxir version: with
        ``strict=True`` they raise :class:`ConfigError` naming them; with ``strict=False``
        they are dropped with a warning.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"A LoraIRConfig is built from a dict, got {type(data).__name__}.")
        peft_type = data.get("peft_type", PEFT_TYPE)
        if str(peft_type) != PEFT_TYPE:
            raise ConfigError(
                f"This adapter config has peft_type={peft_type!r}, not {PEFT_TYPE!r}; load it with "
                "peft (PeftModel.from_pretrained) instead of loraxir."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            version = data.get("loraxir_version", "unknown")
            message = (
                f"The adapter config has keys this loraxir ({__version__}) does not know: "
                f"{unknown} (written by loraxir {version})."
            )
            if strict:
                raise ConfigError(
                    message + " Upgrade loraxir (pip install -U loraxir), or pass strict=False "
                    "to ignore them."
                )
            warnings.warn(message + " They are ignored.", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_file(cls, path: str | os.PathLike, strict: bool = True) -> LoraIRConfig:
        """Read an ``adapter_config.json`` (see :meth:`from_dict` for ``strict``)."""
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON ({error}).") from None
        return cls.from_dict(data, strict=strict)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}.")
