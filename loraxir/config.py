"""``LoraIRConfig``: the configuration of degradation-routed low-rank experts.

It is a ``peft.PeftConfig`` with a plain-string ``peft_type`` (``"LORAXIR"``), so that
peft's own ``get_peft_model``, ``save_pretrained`` and ``PeftModel.from_pretrained`` accept
it once ``loraxir`` is imported. Every field has a default and a ``help`` line; the
help lines are the field documentation; ``docs/api.md`` repeats them (a test keeps the two equal).

Like peft's configs, this module imports nothing of the method (no layers, no model): the
allowed values live here, and the router's settings are the light
:class:`~loraxir.router.config.RouterConfig`.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import InitVar, dataclass, field, fields
from typing import Any

from peft import PeftConfig

from loraxir import PEFT_TYPE, __version__
from loraxir.errors import ConfigError
from loraxir.router.config import RouterConfig
from loraxir.validation import check_choice, check_int, check_names, is_number

TRAINABLE_POLICIES = ("experts", "new_experts", "experts+router", "all")
INIT_SCHEMES = ("default", "gaussian")
CONFIG_NAME = "adapter_config.json"
COMPUTE_MODES = ("auto", "activation", "weight", "batched", "gathered")  # loraxir.compute
# Keys of older adapter_config.json files that are read and dropped (see from_dict).
_RETIRED_KEYS = ("temperature",)
_TEMPERATURE_MOVED = (
    "LoraIRConfig.temperature is gone: the gate temperature belongs to the router, the only "
    "place it ever acted. Set it there: DegradationRouter.from_encoder(..., temperature=t), "
    "router.temperature = t, or RouterConfig(temperature=t)."
)


@dataclass
class DAMConfig:
    """Degradation-aware modulation blocks (see :mod:`loraxir.guidance`): where they go and
    the size of the router embedding ``e_deg`` that drives them.

    Example::

        DAMConfig(embed_dim=384)                                  # the family's points
        DAMConfig(embed_dim=384, points=["encoders.0", "middle_blks"])
    """

    embed_dim: int = field(
        metadata={"help": "Size of the router's degradation embedding e_deg (router.embed_dim)."}
    )
    points: list[str] | dict[str, int] | str | None = field(
        default=None,
        metadata={
            "help": "Modules a DAM block goes in front of: exact dotted paths (or {path: "
            "channels}), a regex (full match), or None for the backbone family's default points."
        },
    )

    def __post_init__(self) -> None:
        check_int("dam.embed_dim", self.embed_dim, minimum=1)
        if isinstance(self.points, tuple):
            self.points = list(self.points)
        if isinstance(self.points, dict):
            check_names("dam.points", list(self.points), case_sensitive=True)
            for path, channels in self.points.items():
                check_int(f"dam.points[{path!r}]", channels, minimum=1)
        elif self.points is not None and not (
            (isinstance(self.points, str) and self.points)
            or (
                isinstance(self.points, list)
                and check_names("dam.points", self.points, case_sensitive=True)
            )
        ):
            raise ConfigError(
                f"dam.points must be None, a regex string or a list of module paths, got "
                f"{self.points!r}."
            )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DAMConfig:
        """Read :meth:`to_dict` output; unknown keys raise :class:`ConfigError`."""
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise ConfigError(f"A DAM config has the keys {sorted(known)}, got {data!r}.")
        return cls(**data)


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
            "help": "How expert layers compute: 'auto', 'activation', 'weight', 'batched' or "
            "'gathered' (all exact; see loraxir.compute and docs/api.md)."
        },
    )
    tuned: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "Compute form per phase ('inference', 'training') chosen by "
            "LoraIRModel.autotune and saved with the adapter, so a reload runs as tuned "
            "(None: the cost model's plan)."
        },
    )
    expert_chunks: list[int] | None = field(
        default=None,
        metadata={
            "help": "Experts per stored chunk (written by add_degradation; None = one chunk). "
            "Chunks let old experts stay frozen and bit-identical while new ones train."
        },
    )
    router: RouterConfig | None = field(
        default=None,
        metadata={
            "help": "RouterConfig of the attached router, gate temperature included (written "
            "by the model, not by users)."
        },
    )
    dam: DAMConfig | None = field(
        default=None,
        metadata={
            "help": "Degradation-aware modulation blocks (DAMConfig: embed_dim, points), "
            "inserted with the experts and saved with them; None for none."
        },
    )
    loraxir_version: str = field(
        default=__version__, metadata={"help": "loraxir version that wrote this config."}
    )
    temperature: InitVar[float | None] = None

    def __post_init__(self, temperature: float | None) -> None:
        if temperature is not None:
            raise ConfigError(_TEMPERATURE_MOVED)
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if isinstance(self.router, dict):
            self.router = RouterConfig.from_dict(self.router)
        if isinstance(self.dam, dict):
            self.dam = DAMConfig.from_dict(self.dam)
        self._validate()

    # ------------------------------------------------------------- validation
    def _validate(self) -> None:
        if self.task_type is not None:
            raise ConfigError(
                f"task_type must be None for a restoration backbone, got {self.task_type!r}."
            )
        check_int("r", self.r, minimum=1)
        if not is_number(self.lora_alpha) or self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}.")
        self.lora_alpha = float(self.lora_alpha)
        self._resolve_experts()
        check_int("top_k", self.top_k, minimum=1)
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"top_k={self.top_k} is larger than num_experts={self.num_experts}; "
                f"choose 1 <= top_k <= {self.num_experts}."
            )
        if not is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        check_choice("trainable", self.trainable, TRAINABLE_POLICIES)
        check_choice("init", self.init, INIT_SCHEMES)
        check_choice("compute", self.compute, COMPUTE_MODES)
        if self.tuned is not None:
            if not isinstance(self.tuned, dict) or set(self.tuned) - {"inference", "training"}:
                raise ConfigError(
                    "tuned must be None or a dict with the keys 'inference' and/or 'training', "
                    f"got {self.tuned!r}."
                )
            for phase, form in self.tuned.items():
                check_choice(f"tuned[{phase!r}]", form, COMPUTE_MODES)
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
        if self.router is not None and not isinstance(self.router, RouterConfig):
            raise ConfigError(
                f"router must be a RouterConfig (or its dict form) or None, got "
                f"{type(self.router).__name__}."
            )
        if self.dam is not None and not isinstance(self.dam, DAMConfig):
            raise ConfigError(
                f"dam must be a DAMConfig (or its dict form) or None, got "
                f"{type(self.dam).__name__}."
            )

    def _resolve_experts(self) -> None:
        if self.degradations is None:
            if self.num_experts is None:
                raise ConfigError(
                    "Give the degradation class names (degradations=['noise', 'rain', ...]) or "
                    "num_experts."
                )
            check_int("num_experts", self.num_experts, minimum=1)
            self.degradations = [f"expert_{i}" for i in range(self.num_experts)]
            return
        names = check_names("degradations", self.degradations)
        if self.num_experts is None:
            self.num_experts = len(names)
        check_int("num_experts", self.num_experts, minimum=1)
        if self.num_experts != len(names):
            raise ConfigError(
                f"num_experts={self.num_experts} does not match the {len(names)} degradations "
                f"{names}; drop num_experts or give one name per expert."
            )
        self.degradations = names

    # ------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict (the router as its ``to_dict`` form)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.router is not None:
            data["router"] = self.router.to_dict()
        if self.dam is not None:
            data["dam"] = self.dam.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = True) -> LoraIRConfig:
        """Build a config from a dict (e.g. a parsed ``adapter_config.json``).

        Keys this version does not know (also inside ``router`` and ``dam``) come from
        another loraxir version: with ``strict=True`` they raise :class:`ConfigError`
        naming them; with ``strict=False`` they are dropped with a warning.
        ``temperature``, written by loraxir 0.1 but never used (the router's own
        temperature drove the gates), is dropped silently, so old adapters load with the
        behaviour they had.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"A LoraIRConfig is built from a dict, got {type(data).__name__}.")
        data = {k: v for k, v in data.items() if k not in _RETIRED_KEYS}
        peft_type = data.get("peft_type", PEFT_TYPE)
        if str(peft_type) != PEFT_TYPE:
            raise ConfigError(
                f"This adapter config has peft_type={peft_type!r}, not {PEFT_TYPE!r}; load it with "
                "peft (PeftModel.from_pretrained) instead of loraxir."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        nested = {}  # the router's and DAM blocks' own configs, as dicts in the file
        for key, part, extra in (
            ("router", RouterConfig, {"format", "version"}),
            ("dam", DAMConfig, set()),
        ):
            if isinstance(data.get(key), dict):
                allowed = {f.name for f in fields(part)} | extra
                unknown += [f"{key}.{name}" for name in sorted(set(data[key]) - allowed)]
                nested[key] = {k: v for k, v in data[key].items() if k in allowed}
        unknown.sort()
        if unknown:
            version = data.get("loraxir_version", "unknown")
            message = (
                f"The adapter config has keys this loraxir ({__version__}) does not know: "
                f"{unknown} (written by loraxir {version})."
            )
            if strict:
                raise ConfigError(
                    message + " Install a newer loraxir (from its source), or pass strict=False "
                    "to ignore them."
                )
            warnings.warn(message + " They are ignored.", stacklevel=2)
        return cls(**{k: v for k, v in {**data, **nested}.items() if k in known})

    @classmethod
    def from_file(cls, path: str | os.PathLike, strict: bool = True) -> LoraIRConfig:
        """Read an ``adapter_config.json`` (see :meth:`from_dict` for ``strict``)."""
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON ({error}).") from None
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ConfigError(
                f"No adapter config file at {path}; an adapter folder holds "
                "adapter_config.json and adapter_model.safetensors (save_pretrained writes them)."
            ) from None
        return cls.from_dict(data, strict=strict)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes that do not exist: name the new home of a retired one.
        if name == "temperature":
            raise AttributeError(_TEMPERATURE_MOVED)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


# The InitVar's default would otherwise read as a class attribute `temperature = None`.
del LoraIRConfig.temperature
