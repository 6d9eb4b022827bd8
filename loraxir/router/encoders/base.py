"""The encoder contract, the registry of encoder kinds, and helpers to load towers quietly.

Every encoder maps images ``(N, C, H, W)``, float in [0, 1], any ``H, W`` (resized to the
tower's square input, bilinear with antialiasing; smaller images are upsampled), ``C`` = 3
(RGB), 1 (grayscale, repeated to RGB) or 4 (RGBA: alpha dropped) to embeddings
``(N, embed_dim)``. The tower's own normalisation (mean/std) is applied inside.

Pretrained towers are frozen by default and kept in eval mode, so a router trained on top
of them cannot change them by accident; :meth:`DegradationEncoder.set_trainable` unfreezes.
An encoder's :meth:`~DegradationEncoder.spec` is a JSON-serialisable *reference* (kind,
name, tag or path) from which the registered kind rebuilds it (:meth:`from_spec`):
pretrained weights are never copied into a router checkpoint unless the tower was trained.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from loraxir.errors import ConfigError
from loraxir.router.views import as_rgb, resize_square

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_INIT_SEED = 0

# Spec "type" → encoder class; filled by @register_encoder in each kind's module.
ENCODER_KINDS: dict[str, type[DegradationEncoder]] = {}
_E = TypeVar("_E", bound="type[DegradationEncoder]")


def register_encoder(kind: str) -> Callable[[_E], _E]:
    """Class decorator: make ``kind`` (the spec's ``"type"``) rebuild with this class."""

    def decorate(cls: _E) -> _E:
        ENCODER_KINDS[kind] = cls
        cls.kind = kind
        return cls

    return decorate


class DegradationEncoder(nn.Module, ABC):
    """Base class: resize, normalise, encode. Subclasses implement :meth:`encode_pixels`.

    Attributes:
        image_size: side of the square input of the tower, in pixels.
        embed_dim: size of the embedding returned by :meth:`forward`.
        text_dim: size of text embeddings (:meth:`encode_text`), or ``None`` if the encoder
            has no text tower.
        has_reference_weights: ``True`` when the weights come from a reference (pretrained
            tag, file or folder) that :meth:`from_spec` reloads; such weights are not
            saved with a router unless the tower was trained.
        trained: ``True`` once the tower has been made trainable (sticky), so that its
            weights are saved with the router from then on.
    """

    kind = "abstract"

    def __init__(
        self,
        image_size: int,
        embed_dim: int,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        super().__init__()
        self.image_size = int(image_size)
        self.embed_dim = int(embed_dim)
        self.text_dim: int | None = None
        self.has_reference_weights = False
        self.trained = False
        self.trainable = True
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed ``(N, C, H, W)`` images in [0, 1] (any size, RGB/gray/RGBA) → ``(N, D)``."""
        pixels = resize_square(as_rgb(images), self.image_size)
        pixels = (pixels - self.mean.to(pixels.dtype)) / self.std.to(pixels.dtype)
        return self.encode_pixels(pixels)

    @abstractmethod
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embed normalised ``(N, 3, image_size, image_size)`` pixels → ``(N, embed_dim)``."""

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embed text prompts → ``(P, text_dim)`` in the tower's joint image-text space."""
        raise ConfigError(
            f"The {type(self).__name__} has no text tower, so text prototypes (head='text', "
            "objective 'contrastive') are not available. Use an open_clip or 🤗 CLIP encoder."
        )

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable reference from which :meth:`from_spec` rebuilds this."""

    @classmethod
    @abstractmethod
    def from_spec(cls, spec: dict[str, Any], module: nn.Module | None = None) -> DegradationEncoder:
        """Rebuild an encoder of this kind from its :meth:`spec` (weights by reference)."""

    @property
    def saves_weights(self) -> bool:
        """Whether a router checkpoint must carry this encoder's tensors."""
        return self.trained or not self.has_reference_weights

    def set_trainable(self, trainable: bool) -> DegradationEncoder:
        """Freeze (eval mode, no gradients) or unfreeze the tower; returns ``self``."""
        self.trainable = bool(trainable)
        self.trained = self.trained or self.trainable
        for parameter in self.parameters():
            parameter.requires_grad_(self.trainable)
        return self.train(self.training)

    def train(self, mode: bool = True) -> DegradationEncoder:
        """Follow ``mode`` when trainable; a frozen tower always stays in eval mode."""
        super().train(mode)
        if not self.trainable:
            for module in self.children():
                module.train(False)
        return self

    def _spec(self, **fields: Any) -> dict[str, Any]:
        """The spec of this kind: ``type``, ``fields``, and the trainable state."""
        return {"type": self.kind, **fields, "trainable": self.trainable, "trained": self.trained}


@contextlib.contextmanager
def seeded_init(seed: int = _INIT_SEED) -> Iterator[None]:
    """Random initialisation that is the same on every build, without touching global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def quiet_logging(transformers: bool = False) -> Iterator[None]:
    """Silence open_clip's log lines (we raise better errors) and 🤗's load report.

    The report lists the text-tower weights of a full ``CLIPModel`` folder as "unexpected"
    when only the vision tower is loaded, which is what we want, not a problem.
    """
    root = logging.getLogger()
    level = root.level
    hf_logging = importlib.import_module("transformers.utils.logging") if transformers else None
    hf_level = hf_logging.get_verbosity() if hf_logging else None
    root.setLevel(logging.CRITICAL)
    if hf_logging:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        root.setLevel(level)
        if hf_logging:
            hf_logging.set_verbosity(hf_level)


def first_lines(text: str, lines: int = 3) -> str:
    """The first ``lines`` lines of an error text, on one line (long tracebacks say little)."""
    all_lines = text.strip().splitlines()
    kept = " ".join(line.strip() for line in all_lines[:lines])
    return kept + (" ..." if len(all_lines) > lines else "")
