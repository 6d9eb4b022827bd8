"""``RouterConfig``: every setting of a :class:`~loraxir.router.DegradationRouter`, typed.

One dataclass is the single list of router settings: the router is built from it
(:meth:`DegradationRouter.from_encoder` takes its fields as keywords), saves it as
``router_config.json``, and :class:`~loraxir.config.LoraIRConfig` stores it in its
``router`` field. It imports nothing but the standard library, so a config can be read
without torch or an encoder.

The encoder appears by *reference* (``encoder``: the spec written by the encoder itself,
e.g. ``{"type": "open_clip", "name": "ViT-L-14-336", "pretrained": "/path/w.safetensors"}``);
the router fills it in when it writes its config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from loraxir.errors import ConfigError
from loraxir.validation import check_choice, check_int, check_names, is_number

CONFIG_FORMAT = "loraxir-router"
CONFIG_VERSION = 3
VIEW_KINDS = ("native", "resize")
POOLINGS = ("mean", "mean_max")
HEAD_KINDS = ("linear", "text")
# Shortest native crop with a usable cepstrum (the `cepstrum` setting).
CEPSTRUM_MIN_SIZE = 16
# Version 1 routers (before `views` existed) all used the paper's resize-and-tile views.
_V1_DEFAULTS = {"views": "resize"}


@dataclass
class RouterConfig:
    """Settings of a degradation router (DG-Router); every field has a default but the classes.

    Example::

        RouterConfig(degradations=["noise", "rain", "haze"], views="native", grid=2)
    """

    degradations: list[str] = field(
        default_factory=list,
        metadata={"help": "Class names, one per expert, in expert (gate) order."},
    )
    encoder: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Reference to the encoder tower (its spec: type, name, pretrained tag or "
            "path, sizes); written by the router, not by users."
        },
    )
    views: str = field(
        default="native",
        metadata={
            "help": "'native': a global view of the whole image plus grid×grid crops at the "
            "image's own resolution (noise, JPEG blocks and thin streaks survive at any size); "
            "'resize': the paper's global view plus tiles of a grid×-resized copy."
        },
    )
    grid: int = field(
        default=2, metadata={"help": "Local views per side (grid² views); 0: global view only."}
    )
    pooling: str = field(
        default="mean",
        metadata={
            "help": "How the local views' features are pooled: 'mean', or 'mean_max' (mean "
            "and element-wise max concatenated: sparse cues such as a few rain streaks show "
            "in some crops only, and a mean dilutes them)."
        },
    )
    image_stats: bool = field(
        default=False,
        metadata={
            "help": "Feed the MLP hand-made statistics next to the encoder features: the "
            "global view's colour, dark channel, saturation and brightness histogram, and "
            "the local views' gradient energy, its drop with scale and its coherence "
            "(loraxir.router.statistics)."
        },
    )
    cepstrum: int = field(
        default=0,
        metadata={
            "help": "Side in pixels of the native crops whose cepstrum the MLP also reads "
            "(loraxir.router.statistics.cepstrum_statistics): linear motion blur leaves a "
            "trough at its streak length there, which tells blur from haze on textured and "
            "pale photos. 0: off; at least 16; streaks up to about a quarter of it show "
            "(128: up to 32 pixels)."
        },
    )
    hidden_dim: int = field(default=512, metadata={"help": "Hidden size of the MLP."})
    embed_dim: int = field(
        default=384, metadata={"help": "Size of the degradation embedding e_deg (MLP output)."}
    )
    head: str = field(
        default="linear",
        metadata={"help": "'linear' (classifier) or 'text' (cosine to CLIP text prototypes)."},
    )
    text_dim: int | None = field(
        default=None, metadata={"help": "Size of the text prototypes (head='text'); written."}
    )
    prompts: dict[str, str] | None = field(
        default=None, metadata={"help": "Text prompt per class for head='text'."}
    )
    top_k: int = field(default=1, metadata={"help": "Experts mixed per image (1 = hard pick)."})
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Softmax temperature of the top-k gates (> 0); the only temperature that "
            "drives the gates."
        },
    )
    noise_std: float = field(
        default=0.0, metadata={"help": "Std of the logit noise added in training mode (>= 0)."}
    )
    unsure_below: float = field(
        default=0.6,
        metadata={
            "help": "explain() flags an image as unsure when its top class probability is "
            "below this, in [0, 1]."
        },
    )

    def __post_init__(self) -> None:
        self.degradations = check_names("degradations", self.degradations)
        check_choice("views", self.views, VIEW_KINDS)
        check_choice("head", self.head, HEAD_KINDS)
        check_choice("pooling", self.pooling, POOLINGS)
        if not isinstance(self.image_stats, bool):
            raise ConfigError(f"image_stats must be true or false, got {self.image_stats!r}.")
        for name in ("grid", "cepstrum", "hidden_dim", "embed_dim", "top_k"):
            check_int(name, getattr(self, name), minimum=0 if name in ("grid", "cepstrum") else 1)
        if 0 < self.cepstrum < CEPSTRUM_MIN_SIZE:
            raise ConfigError(
                f"cepstrum must be 0 (off) or at least {CEPSTRUM_MIN_SIZE} pixels, got "
                f"{self.cepstrum}."
            )
        if self.top_k > len(self.degradations):
            raise ConfigError(
                f"top_k must be an integer in [1, {len(self.degradations)}] (the number of "
                f"degradation classes), got {self.top_k!r}."
            )
        if not is_number(self.temperature) or not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}.")
        if not is_number(self.noise_std) or not self.noise_std >= 0:
            raise ConfigError(f"noise_std must be >= 0, got {self.noise_std!r}.")
        if not is_number(self.unsure_below) or not 0 <= self.unsure_below <= 1:
            raise ConfigError(f"unsure_below must be in [0, 1], got {self.unsure_below!r}.")
        if self.encoder is not None and not isinstance(self.encoder, dict):
            raise ConfigError(f"encoder must be an encoder spec (dict), got {self.encoder!r}.")
        self.temperature = float(self.temperature)
        self.noise_std = float(self.noise_std)
        self.unsure_below = float(self.unsure_below)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: ``format``, ``version`` and every field."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, **json.loads(json.dumps(data))}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouterConfig:
        """Read :meth:`to_dict` output (or a version-1 router config); unknown keys raise."""
        if not isinstance(data, dict) or data.get("format") != CONFIG_FORMAT:
            raise ConfigError(
                f"Not a loraxir router config (expected format {CONFIG_FORMAT!r}): "
                f"{str(data)[:200]}"
            )
        version = data.get("version", 1)
        if isinstance(version, float) and version.is_integer():
            version = int(version)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ConfigError(f"Router config version must be a whole number, got {version!r}.")
        if version > CONFIG_VERSION:
            raise ConfigError(
                f"Router config version {version} is newer than this loraxir understands "
                f"({CONFIG_VERSION}); upgrade loraxir."
            )
        values = {k: v for k, v in data.items() if k not in ("format", "version")}
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"Unknown keys in router config: {unknown}. Known: {field_names()}.")
        if version < 2:
            values = {**_V1_DEFAULTS, **values}
        return cls(**values)

    @classmethod
    def coerce(cls, value: RouterConfig | dict[str, Any]) -> RouterConfig:
        """A :class:`RouterConfig` from itself or from its :meth:`to_dict` form."""
        return value if isinstance(value, RouterConfig) else cls.from_dict(value)


def field_names() -> list[str]:
    """The settings a router takes as keywords (every field but the written ones)."""
    return [f.name for f in fields(RouterConfig) if f.name not in ("encoder", "text_dim")]
