"""open_clip image towers: by model name with a ``pretrained`` tag or file, or a folder."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraxir.errors import CheckpointError, ConfigError, unknown_name
from loraxir.router.encoders.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    DegradationEncoder,
    first_lines,
    quiet_logging,
    register_encoder,
    seeded_init,
)

LOCAL_DIR_PREFIX = "local-dir:"
# Architectures added with register_open_clip_config, kept so that a saved spec carries them.
_REGISTERED_OPEN_CLIP: dict[str, dict[str, Any]] = {}


@register_encoder("open_clip")
class OpenCLIPEncoder(DegradationEncoder):
    """An open_clip image tower, by model name and ``pretrained`` tag or local file.

    ``name`` is a built-in open_clip model name (``open_clip.list_models()``) or
    ``"local-dir:/folder"`` (a folder with ``open_clip_config.json`` and weights).
    ``pretrained`` is an open_clip tag (downloaded into the 🤗 cache the first time; offline
    it must already be there), a local weights file, or ``None`` for random weights
    (timing, or training the tower from scratch). Both go through open_clip's own loader.
    Random initialisation is seeded, so a random tower is the same on every build. Only
    the image tower is kept in memory; the text tower is rebuilt on demand
    (:meth:`encode_text`).
    """

    def __init__(
        self, name: str, pretrained: str | None = None, image_size: int | None = None
    ) -> None:
        name, pretrained = _check_open_clip_reference(name, pretrained)
        clip = _build_open_clip(name, pretrained, image_size)
        cfg = _open_clip_preprocess(clip)
        size = cfg["size"]
        super().__init__(
            size if isinstance(size, int) else size[0],
            clip.visual.output_dim,
            cfg.get("mean", OPENAI_CLIP_MEAN),
            cfg.get("std", OPENAI_CLIP_STD),
        )
        self.name = name
        self.pretrained = pretrained
        self.image_size_override = image_size
        self.has_reference_weights = pretrained is not None or _local_dir_has_weights(name)
        self.text_dim = int(clip.text_projection.shape[-1]) if _has_text(clip) else None
        self.visual = clip.visual

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embed prompts with the tower's text encoder, rebuilt from the same reference."""
        import open_clip

        clip = _build_open_clip(self.name, self.pretrained, self.image_size_override)
        tokens = open_clip.get_tokenizer(self.name)(list(prompts))
        with torch.no_grad():
            return clip.eval().encode_text(tokens).to(self.mean.device)

    def spec(self) -> dict[str, Any]:
        extra = {}
        if self.name in _REGISTERED_OPEN_CLIP:
            extra["model_cfg"] = _REGISTERED_OPEN_CLIP[self.name]
        spec = self._spec(
            name=self.name, pretrained=self.pretrained, image_size=self.image_size_override
        )
        return {**spec, **extra}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], module: nn.Module | None = None) -> OpenCLIPEncoder:
        if "model_cfg" in spec:
            register_open_clip_config(spec["name"], spec["model_cfg"])
        return cls(spec["name"], spec.get("pretrained"), spec.get("image_size"))


def register_open_clip_config(name: str, model_cfg: dict[str, Any]) -> str:
    """Make an open_clip architecture given as a config dict available under ``name``.

    ``model_cfg`` has open_clip's model-config keys (``embed_dim``, ``vision_cfg``,
    ``text_cfg``, ...). Routers built on it record the config in their spec, so they can be
    rebuilt in another process without registering it again. Returns ``name``.
    """
    import open_clip

    from loraxir.router.encoders.cnn import TINY_CNN_NAME

    if name == TINY_CNN_NAME or name.startswith(LOCAL_DIR_PREFIX) or "/" in name:
        raise ConfigError(f"{name!r} cannot name an open_clip config; pick a plain name.")
    model_cfg = json.loads(json.dumps(model_cfg))
    if _REGISTERED_OPEN_CLIP.get(name) == model_cfg:
        return name
    # open_clip reads architectures from files only, and keeps what it read: the file can go
    # as soon as it has been read, so that no process leaves a folder behind in /tmp.
    with tempfile.TemporaryDirectory(prefix="loraxir-open-clip-config-") as folder:
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(model_cfg))
        open_clip.add_model_config(path)
    _REGISTERED_OPEN_CLIP[name] = model_cfg
    return name


def open_clip_names() -> list[str]:
    """Model names open_clip knows (built in and registered)."""
    import open_clip

    return list(open_clip.list_models())


def _check_open_clip_reference(name: str, pretrained: str | None) -> tuple[str, str | None]:
    """Validate an open_clip name/tag pair early, with errors that say what to do."""
    import open_clip

    if name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(name[len(LOCAL_DIR_PREFIX) :]).expanduser().resolve()
        if not (folder / "open_clip_config.json").is_file():
            raise ConfigError(
                f"{name!r}: no open_clip_config.json in {folder}. A 'local-dir:' folder holds "
                "the model config and its weights (as written by open_clip's push_to_hf_hub)."
            )
        if pretrained is not None:
            raise ConfigError(
                f"pretrained={pretrained!r} is ignored for {name!r}: the weights are in the folder."
            )
        return LOCAL_DIR_PREFIX + str(folder), None
    if name not in open_clip.list_models():
        from loraxir.router.encoders import available_encoders

        raise unknown_name(
            "encoder",
            name,
            available_encoders(),
            hint="Pass 'cnn-tiny', an open_clip model name, a 'local-dir:' folder, a 🤗 CLIP "
            "folder, or an nn.Module.",
        )
    if pretrained is None:
        return name, None
    if open_clip.get_pretrained_cfg(name, pretrained):
        return name, pretrained
    path = Path(pretrained).expanduser()
    if path.is_file():
        return name, str(path.resolve())
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise ConfigError(
        f"pretrained={pretrained!r} for open_clip {name!r} is neither a known tag nor an "
        f"existing file. Tags: {', '.join(tags) if tags else '(none)'}."
    )


def _build_open_clip(name: str, pretrained: str | None, image_size: int | None) -> nn.Module:
    """Build a full open_clip model; seeded, and with errors that explain the fix."""
    import open_clip

    if pretrained is None and not _local_dir_has_weights(name):
        with seeded_init(), quiet_logging():
            return open_clip.create_model(name, force_image_size=image_size)
    is_tag = pretrained is not None and bool(open_clip.get_pretrained_cfg(name, pretrained))
    try:
        with seeded_init(), quiet_logging():
            clip = open_clip.create_model(
                name, pretrained=pretrained, force_image_size=image_size, weights_only=True
            )
    except Exception as error:
        if is_tag and "download" in str(error).lower():
            raise CheckpointError(
                f"open_clip weights {name!r} / pretrained={pretrained!r} are not on this machine "
                "and could not be downloaded (offline, or HF_HUB_OFFLINE=1). Download them where "
                "there is network (they land in the 🤗 cache), or pass a local file: "
                f"pretrained='/path/to/open_clip_model.safetensors' with encoder={name!r}, or "
                "encoder='local-dir:/folder' for a folder with open_clip_config.json."
            ) from error
        raise CheckpointError(
            f"Weights {pretrained or name!r} do not fit open_clip model {name!r} (a file of "
            f"another model or image size, or not a weights file?): {first_lines(str(error))}"
        ) from error
    if pretrained is not None and not is_tag and image_size is None:
        _check_file_image_size(clip, pretrained, name)
    return clip


def _check_file_image_size(clip: nn.Module, path: str, name: str) -> None:
    """Refuse a weights file made for another image size: open_clip interpolates its
    positional embedding to the model's without a word (a 224 px ViT-L/14 file would run
    as the paper's 336 px tower). ``image_size=`` asks for that resize on purpose."""
    built = getattr(clip.visual, "positional_embedding", None)
    found = _file_positions(path)
    if built is None or found is None or tuple(built.shape) == found:
        return
    raise CheckpointError(
        f"Weights {path!r} are for another image size than open_clip model {name!r}: their "
        f"visual positional embedding is {found}, the model's {tuple(built.shape)} (image "
        f"size {clip.visual.image_size}). Name the model of the file's size (e.g. ViT-L-14 for "
        "224 px, ViT-L-14-336 for 336 px), or pass image_size= to resize it on purpose."
    )


def _file_positions(path: str) -> tuple[int, ...] | None:
    """The shape of a weights file's visual positional embedding, read without loading the
    other weights (``None`` when the file has none, e.g. a ResNet tower)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, "pt") as weights:
            for key in weights.keys():
                if key.endswith("visual.positional_embedding"):
                    return tuple(weights.get_slice(key).get_shape())
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (not zip) torch file cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    for key, value in state.items() if isinstance(state, dict) else ():
        if key.endswith("visual.positional_embedding"):
            return tuple(value.shape)
    return None


def _local_dir_has_weights(name: str) -> bool:
    """Whether a ``local-dir:`` folder holds weights (without them open_clip builds random ones)."""
    if not name.startswith(LOCAL_DIR_PREFIX):
        return False
    folder = Path(name[len(LOCAL_DIR_PREFIX) :])
    return any(any(folder.glob(f"*{suffix}")) for suffix in (".safetensors", ".bin", ".pth"))


def _has_text(clip: nn.Module) -> bool:
    return getattr(clip, "text_projection", None) is not None


def _open_clip_preprocess(clip: nn.Module) -> dict[str, Any]:
    import open_clip

    cfg = dict(open_clip.get_model_preprocess_cfg(clip))
    cfg.setdefault("size", clip.visual.image_size)
    return cfg
