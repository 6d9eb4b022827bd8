"""Degradation encoders: image towers that turn a degraded image into an embedding.

A router needs a view of *how* an image is degraded, not of what it shows. LoRA-IR uses a
frozen CLIP image tower for that; four kinds share one contract
(:class:`~loraxir.router.encoders.base.DegradationEncoder`), one module each:

* ``cnn`` — ``"cnn-tiny"``, a small CNN random-initialised and trained with the router:
  what runs on a CPU in seconds and what the tests use.
* ``open_clip`` — open_clip image towers by model name (``"ViT-B-32"``,
  ``"ViT-L-14-336"``, ...), with a ``pretrained`` tag, a local weights file, or a
  ``"local-dir:/folder"`` model name.
* ``hf_clip`` — 🤗 transformers CLIP vision towers from a local folder.
* ``custom`` — any ``nn.Module`` mapping ``(N, 3, S, S)`` pixels in [0, 1] to ``(N, D)``.

Each kind registers itself by its spec ``type`` (:data:`ENCODER_KINDS`), so
:func:`encoder_from_spec` dispatches through the registry; :func:`create_encoder` turns a
user's name, folder or module into an encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from loraxir.errors import ConfigError, unknown_name
from loraxir.router.encoders.base import (
    ENCODER_KINDS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    DegradationEncoder,
    register_encoder,
)
from loraxir.router.encoders.cnn import TINY_CNN_NAME, TinyCNNEncoder
from loraxir.router.encoders.hf_clip import HFCLIPEncoder
from loraxir.router.encoders.module import ModuleEncoder
from loraxir.router.encoders.open_clip import (
    LOCAL_DIR_PREFIX,
    OpenCLIPEncoder,
    open_clip_names,
    register_open_clip_config,
)


def available_encoders() -> list[str]:
    """Names accepted by :func:`create_encoder` besides folders and modules."""
    return [TINY_CNN_NAME, *open_clip_names()]


def create_encoder(
    encoder: str | Path | nn.Module,
    *,
    pretrained: str | None = None,
    image_size: int | None = None,
    trainable: bool | None = None,
) -> DegradationEncoder:
    """Build a :class:`DegradationEncoder` from a name, a folder or a module.

    Args:
        encoder: ``"cnn-tiny"``; an open_clip model name such as ``"ViT-B-32"`` or
            ``"local-dir:/folder"``; a folder holding a 🤗 CLIP model (``config.json``) or
            an open_clip export (``open_clip_config.json``); a :class:`DegradationEncoder`
            (used as is); or any ``nn.Module`` (wrapped by :class:`ModuleEncoder`).
        pretrained: open_clip tag or local weights file; ``None`` builds random weights.
        image_size: override of the tower's input size (open_clip interpolates its
            positional embedding when weights load; the CNN simply runs at this size).
        trainable: unfreeze the tower. Default: ``True`` for ``"cnn-tiny"`` (it has no
            pretrained weights and exists to be trained), ``False`` for everything else.
    """
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8
    ):
        raise ConfigError(
            f"image_size must be a whole number of pixels >= 8 (or None: the tower's own), "
            f"got {image_size!r}."
        )
    if isinstance(encoder, DegradationEncoder):
        built = encoder
    elif isinstance(encoder, nn.Module):
        built = ModuleEncoder(encoder, image_size=image_size or 224)
    elif not isinstance(encoder, str | Path):
        raise ConfigError(
            f"encoder must be a name, a folder or an nn.Module, got {type(encoder).__name__}."
        )
    else:
        built = _encoder_from_name(str(encoder), pretrained, image_size)
    if pretrained is not None and not isinstance(built, OpenCLIPEncoder):
        raise ConfigError(
            f"pretrained={pretrained!r} only applies to open_clip model names; the "
            f"{type(built).__name__} for {encoder!r} takes its weights from elsewhere."
        )
    if trainable is None:
        if built is encoder:
            return built
        trainable = isinstance(built, TinyCNNEncoder)
    if not isinstance(trainable, bool):  # bool("no") would unfreeze the tower
        raise ConfigError(f"trainable_encoder must be True, False or None, got {trainable!r}.")
    return built.set_trainable(trainable)


def encoder_from_spec(spec: dict[str, Any], module: nn.Module | None = None) -> DegradationEncoder:
    """Rebuild an encoder from :meth:`DegradationEncoder.spec`, reloading referenced weights.

    A ``"custom"`` encoder cannot be rebuilt from a reference: pass ``module`` (an instance
    of the same class; its weights are then loaded from the router checkpoint). Weights of
    a trained tower are not restored here; they come with the router's adapter tensors.
    """
    kind = spec.get("type")
    if kind not in ENCODER_KINDS:
        raise unknown_name("encoder type", kind, ENCODER_KINDS, where="in the router config")
    encoder = ENCODER_KINDS[kind].from_spec(spec, module=module)
    encoder.trained = bool(spec.get("trained", False))
    return encoder.set_trainable(bool(spec.get("trainable", False)))


def _encoder_from_name(
    name: str, pretrained: str | None, image_size: int | None
) -> DegradationEncoder:
    if name == TINY_CNN_NAME:
        return TinyCNNEncoder(image_size or 64)
    if name.startswith(LOCAL_DIR_PREFIX):
        return OpenCLIPEncoder(name, pretrained, image_size)
    folder = Path(name).expanduser()
    if folder.is_dir():
        if (folder / "open_clip_config.json").is_file():
            return OpenCLIPEncoder(LOCAL_DIR_PREFIX + str(folder.resolve()), pretrained, image_size)
        if (folder / "config.json").is_file():
            if image_size is not None:
                raise ConfigError("image_size cannot be overridden for a 🤗 CLIP folder.")
            return HFCLIPEncoder(folder)
        raise ConfigError(
            f"Folder {folder} holds neither a 🤗 CLIP model (config.json) nor an open_clip "
            "export (open_clip_config.json)."
        )
    if folder.is_file():
        raise ConfigError(
            f"encoder={name!r} is a file; pass the open_clip model name it was saved from as "
            "encoder= and the file as pretrained= (a 🤗 CLIP model is given by its folder)."
        )
    if "/" in name or "\\" in name or name.startswith(("~", ".")):
        # open_clip model names have no path separators: this was meant as a folder.
        raise ConfigError(
            f"encoder={name!r} looks like a folder, but there is none at {folder.resolve()}; "
            "pass the folder of a 🤗 CLIP model or an open_clip export, or a model name."
        )
    return OpenCLIPEncoder(name, pretrained, image_size)


__all__ = [
    "ENCODER_KINDS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "DegradationEncoder",
    "HFCLIPEncoder",
    "ModuleEncoder",
    "OpenCLIPEncoder",
    "TinyCNNEncoder",
    "available_encoders",
    "create_encoder",
    "encoder_from_spec",
    "register_encoder",
    "register_open_clip_config",
]
