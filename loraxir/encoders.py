"""Degradation encoders: image towers that turn a degraded image into an embedding.

A router needs a view of *how* an image is degraded, not of what it shows. LoRA-IR uses a
frozen CLIP image tower for that; we support four kinds behind one small contract:

* ``"cnn-tiny"`` — a small convolutional network, random-initialised and trained with the
  router. It is what runs on a CPU in seconds and what the tests use.
* open_clip image towers by model name (``"ViT-B-32"``, ``"ViT-L-14-336"``, ...), with a
  ``pretrained`` tag, a local weights file, or a ``"local-dir:/folder"`` model name. Only
  the image tower is kept in memory; the text tower is rebuilt on demand for text
  prototypes (:meth:`DegradationEncoder.encode_text`).
* 🤗 transformers CLIP vision towers (``CLIPVisionModelWithProjection``, the paper's choice)
  from a local folder holding a ``CLIPModel`` or ``CLIPVisionModelWithProjection``.
* any ``nn.Module`` mapping ``(N, 3, S, S)`` pixels in [0, 1] to ``(N, D)`` (custom).

Contract of every encoder (``forward``): images ``(N, C, H, W)``, float in [0, 1], any
``H, W`` (resized to the tower's square input, bilinear with antialiasing; smaller images
are upsampled), ``C`` = 3 (RGB), 1 (grayscale, repeated to RGB) or 4 (RGBA: the alpha
channel is dropped, since degradations live in the colour channels) → embeddings
``(N, embed_dim)``. The tower's own normalisation (mean/std) is applied inside.

Pretrained towers are frozen by default and kept in eval mode, so a router trained on top
of them cannot change them by accident; :meth:`DegradationEncoder.set_trainable` unfreezes.
An encoder's :meth:`~DegradationEncoder.spec` is a JSON-serialisable *reference* (name,
tag or path) from which :func:`encoder_from_spec` rebuilds it: pretrained weights are never
copied into a router checkpoint unless the tower was trained.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import logging
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraxir.errors import CheckpointError, ConfigError, RoutingError, unknown_name

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TINY_CNN_NAME = "cnn-tiny"
LOCAL_DIR_PREFIX = "local-dir:"
_INIT_SEED = 0
# Architectures added with register_open_clip_config, kept so that a saved spec carries them.
_REGISTERED_OPEN_CLIP: dict[str, dict[str, Any]] = {}
_REGISTRY_DIR: list[Path] = []


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """Return ``(N, 3, H, W)`` RGB images from RGB, grayscale or RGBA input.

    Grayscale is repeated over three channels; RGBA loses its alpha channel (the colour
    channels carry the degradation, and the restoration backbone sees them as they are).
    Integer images are refused rather than guessed: the contract is float in [0, 1].
    """
    if images.dim() != 4:
        raise RoutingError(
            f"Expected a batch of images (N, C, H, W), got shape {tuple(images.shape)}. "
            "Add a batch dimension with images.unsqueeze(0)."
        )
    if not images.is_floating_point():
        raise RoutingError(
            f"Expected float images in [0, 1], got dtype {images.dtype}. "
            "Convert with images.float() / 255."
        )
    channels = images.shape[1]
    if channels == 3:
        return images
    if channels == 1:
        return images.expand(-1, 3, -1, -1)
    if channels == 4:
        return images[:, :3]
    raise RoutingError(
        f"Expected 3 (RGB), 1 (grayscale) or 4 (RGBA) channels, got {channels} "
        f"(shape {tuple(images.shape)})."
    )


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` to ``(N, C, size, size)``: bilinear, antialiased, no-op if equal.

    Antialiasing keeps downscaled views faithful to the image's degradation statistics
    (aliasing would invent high-frequency content that looks like noise).
    """
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )


class DegradationEncoder(nn.Module, ABC):
    """Base class: resize, normalise, encode. Subclasses implement :meth:`encode_pixels`.

    Attributes:
        image_size: side of the square input of the tower, in pixels.
        embed_dim: size of the embedding returned by :meth:`forward`.
        text_dim: size of text embeddings (:meth:`encode_text`), or ``None`` if the encoder
            has no text tower.
        has_reference_weights: ``True`` when the weights come from a reference (pretrained
            tag, file or folder) that :func:`encoder_from_spec` reloads; such weights are
            not saved with a router unless the tower was trained.
        trained: ``True`` once the tower has been made trainable (sticky), so that its
            weights are saved with the router from then on.
    """

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
        """A JSON-serialisable reference from which :func:`encoder_from_spec` rebuilds this."""

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

    def _common_spec(self) -> dict[str, Any]:
        return {"trainable": self.trainable, "trained": self.trained}


class TinyCNNEncoder(DegradationEncoder):
    """A small CNN for CPU training and tests (``"cnn-tiny"``), random-initialised.

    Four stages, the first at full input resolution, each later one halving it. Every
    stage's output is pooled by mean *and* standard deviation and the pooled statistics of
    all stages are concatenated: noise, blur and compression show up in the energy of fine
    detail (early, high-resolution stages) more than in the average deep response, and
    this gives the head direct access to it.
    """

    def __init__(self, image_size: int = 64, width: int = 16, embed_dim: int = 128) -> None:
        super().__init__(image_size, embed_dim)
        self.width = int(width)
        widths = [self.width, 2 * self.width, 4 * self.width, 8 * self.width]
        stages = [nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1), nn.GELU())]
        for c_in, c_out in itertools.pairwise(widths):
            stages.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                    nn.GroupNorm(min(8, c_out), c_out),
                    nn.GELU(),
                )
            )
        self.stages = nn.ModuleList(stages)
        self.proj = nn.Linear(2 * sum(widths), self.embed_dim)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = []
        features = pixels
        for stage in self.stages:
            features = stage(features)
            flat = features.flatten(2)
            pooled += [flat.mean(-1), flat.std(-1)]
        return self.proj(torch.cat(pooled, dim=-1))

    def spec(self) -> dict[str, Any]:
        return {
            "type": "cnn",
            "name": TINY_CNN_NAME,
            "image_size": self.image_size,
            "width": self.width,
            "embed_dim": self.embed_dim,
            **self._common_spec(),
        }


class OpenCLIPEncoder(DegradationEncoder):
    """An open_clip image tower, by model name and ``pretrained`` tag or local file.

    ``name`` is a built-in open_clip model name (``open_clip.list_models()``) or
    ``"local-dir:/folder"`` (a folder with ``open_clip_config.json`` and weights).
    ``pretrained`` is an open_clip tag (downloaded into the 🤗 cache the first time; offline
    it must already be there), a local weights file, or ``None`` for random weights
    (timing, or training the tower from scratch). Both go through open_clip's own loader.
    Random initialisation is seeded, so a random tower is the same on every build.
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
        spec = {
            "type": "open_clip",
            "name": self.name,
            "pretrained": self.pretrained,
            "image_size": self.image_size_override,
            **self._common_spec(),
        }
        if self.name in _REGISTERED_OPEN_CLIP:
            spec["model_cfg"] = _REGISTERED_OPEN_CLIP[self.name]
        return spec


class HFCLIPEncoder(DegradationEncoder):
    """A 🤗 transformers CLIP vision tower with projection, from a local folder.

    The folder holds either a full ``CLIPModel`` (e.g. a download of
    ``openai/clip-vit-large-patch14-336``, the paper's tower) or a
    ``CLIPVisionModelWithProjection``. The normalisation comes from its
    ``preprocessor_config.json`` when present, else the OpenAI CLIP statistics.
    """

    def __init__(self, path: str | Path) -> None:
        folder = Path(path).expanduser().resolve()
        model, config = _load_hf_clip_tower(folder, "vision")
        mean, std = _hf_normalisation(folder)
        super().__init__(config.image_size, config.projection_dim, mean, std)
        self.path = str(folder)
        self.has_reference_weights = True
        self.text_dim = _hf_text_dim(folder)
        self.model = model

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).image_embeds

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embed prompts with the folder's ``CLIPTextModelWithProjection`` and tokenizer."""
        if self.text_dim is None:
            return super().encode_text(prompts)
        from transformers import AutoTokenizer

        model, _ = _load_hf_clip_tower(Path(self.path), "text")
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"No tokenizer in {self.path} ({error}); save the CLIP tokenizer there "
                "(tokenizer.save_pretrained(folder)) to use text prototypes."
            ) from error
        tokens = tokenizer(list(prompts), padding=True, return_tensors="pt")
        with torch.no_grad():
            return model.eval()(**tokens).text_embeds.to(self.mean.device)

    def spec(self) -> dict[str, Any]:
        return {"type": "hf_clip", "path": self.path, **self._common_spec()}


class ModuleEncoder(DegradationEncoder):
    """Wrap a user ``nn.Module`` mapping normalised ``(N, 3, S, S)`` pixels to ``(N, D)``.

    ``embed_dim`` is found with one dry run at ``image_size`` when not given. Its weights
    are always saved with the router (there is no reference to reload them from), and a
    saved router can only be rebuilt by passing the module again (see
    :func:`encoder_from_spec`).
    """

    def __init__(
        self,
        module: nn.Module,
        image_size: int = 224,
        embed_dim: int | None = None,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        if embed_dim is None:
            embed_dim = _probe_embed_dim(module, image_size)
        super().__init__(image_size, embed_dim, mean, std)
        self.module = module

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module(pixels)

    def spec(self) -> dict[str, Any]:
        cls = type(self.module)
        return {
            "type": "custom",
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "image_size": self.image_size,
            "embed_dim": self.embed_dim,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            **self._common_spec(),
        }


def register_open_clip_config(name: str, model_cfg: dict[str, Any]) -> str:
    """Make an open_clip architecture given as a config dict available under ``name``.

    ``model_cfg`` has open_clip's model-config keys (``embed_dim``, ``vision_cfg``,
    ``text_cfg``, ...). Routers built on it record the config in their spec, so they can be
    rebuilt in another process without registering it again. Returns ``name``.
    """
    import open_clip

    if name == TINY_CNN_NAME or name.startswith(LOCAL_DIR_PREFIX) or "/" in name:
        raise ConfigError(f"{name!r} cannot name an open_clip config; pick a plain name.")
    model_cfg = json.loads(json.dumps(model_cfg))
    if _REGISTERED_OPEN_CLIP.get(name) == model_cfg:
        return name
    if not _REGISTRY_DIR:
        _REGISTRY_DIR.append(Path(tempfile.mkdtemp(prefix="loraxir-open-clip-configs-")))
    path = _REGISTRY_DIR[0] / f"{name}.json"
    path.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(path)
    _REGISTERED_OPEN_CLIP[name] = model_cfg
    return name


def available_encoders() -> list[str]:
    """Names accepted by :func:`create_encoder` besides folders and modules."""
    import open_clip

    return [TINY_CNN_NAME, *open_clip.list_models()]


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
    return built.set_trainable(trainable)


def encoder_from_spec(spec: dict[str, Any], module: nn.Module | None = None) -> DegradationEncoder:
    """Rebuild an encoder from :meth:`DegradationEncoder.spec`, reloading referenced weights.

    A ``"custom"`` encoder cannot be rebuilt from a reference: pass ``module`` (an instance
    of the same class; its weights are then loaded from the router checkpoint). Weights of
    a trained tower are not restored here; they come with the router's adapter tensors.
    """
    kind = spec.get("type")
    if kind == "cnn":
        encoder: DegradationEncoder = TinyCNNEncoder(
            spec["image_size"], spec["width"], spec["embed_dim"]
        )
    elif kind == "open_clip":
        if "model_cfg" in spec:
            register_open_clip_config(spec["name"], spec["model_cfg"])
        encoder = OpenCLIPEncoder(spec["name"], spec.get("pretrained"), spec.get("image_size"))
    elif kind == "hf_clip":
        encoder = HFCLIPEncoder(spec["path"])
    elif kind == "custom":
        if module is None:
            raise ConfigError(
                f"This router was built on a custom encoder module ({spec.get('class')}), "
                "which cannot be rebuilt from a config. Pass it explicitly: "
                "DegradationRouter.from_config(config, encoder=YourModule(...)) or "
                "from_pretrained(folder, encoder=...), or attach the router object itself."
            )
        encoder = ModuleEncoder(
            module, spec["image_size"], spec["embed_dim"], spec["mean"], spec["std"]
        )
    else:
        raise ConfigError(
            f"Unknown encoder type {kind!r} in router config; expected one of "
            "'cnn', 'open_clip', 'hf_clip', 'custom'."
        )
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
    return OpenCLIPEncoder(name, pretrained, image_size)


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
        with _seeded(_INIT_SEED), _quiet_logging():
            return open_clip.create_model(name, force_image_size=image_size)
    is_tag = pretrained is not None and bool(open_clip.get_pretrained_cfg(name, pretrained))
    try:
        with _seeded(_INIT_SEED), _quiet_logging():
            return open_clip.create_model(
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
            f"another model or image size, or not a weights file?): {_first_lines(str(error))}"
        ) from error


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


def _load_hf_clip_tower(folder: Path, tower: str) -> tuple[nn.Module, Any]:
    """Load the vision or text tower (with projection) of a local 🤗 CLIP folder."""
    from transformers import (
        AutoConfig,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
    )

    if not (folder / "config.json").is_file():
        raise ConfigError(f"No 🤗 model config.json in {folder}.")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type == "clip":
        sub = config.vision_config if tower == "vision" else config.text_config
        sub.projection_dim = config.projection_dim
    elif config.model_type == f"clip_{tower}_model":
        sub = config
    else:
        raise ConfigError(
            f"{folder} holds a {config.model_type!r} model; expected a CLIP model "
            f"('clip' or 'clip_{tower}_model')."
        )
    cls = CLIPVisionModelWithProjection if tower == "vision" else CLIPTextModelWithProjection
    try:
        with _seeded(_INIT_SEED), _quiet_logging(transformers=True):
            model = cls.from_pretrained(folder, config=sub, local_files_only=True)
    except (RuntimeError, OSError) as error:
        raise CheckpointError(
            f"Could not load the CLIP {tower} tower from {folder}: {_first_lines(str(error))}"
        ) from error
    return model, sub


def _hf_text_dim(folder: Path) -> int | None:
    config = json.loads((folder / "config.json").read_text())
    return int(config["projection_dim"]) if config.get("model_type") == "clip" else None


def _hf_normalisation(folder: Path) -> tuple[Sequence[float], Sequence[float]]:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    cfg = json.loads(path.read_text())
    return cfg.get("image_mean", OPENAI_CLIP_MEAN), cfg.get("image_std", OPENAI_CLIP_STD)


def _probe_embed_dim(module: nn.Module, image_size: int) -> int:
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    with torch.no_grad():
        out = module(torch.zeros(1, 3, image_size, image_size, device=device))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError(
            f"A custom encoder must map (N, 3, {image_size}, {image_size}) to (N, D); "
            f"{type(module).__name__} returned {getattr(out, 'shape', type(out).__name__)}."
        )
    return int(out.shape[1])


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Random initialisation that is the same on every build, without touching global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet_logging(transformers: bool = False) -> Iterator[None]:
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


def _first_lines(text: str, lines: int = 3) -> str:
    all_lines = text.strip().splitlines()
    kept = " ".join(line.strip() for line in all_lines[:lines])
    return kept + (" ..." if len(all_lines) > lines else "")


__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "DegradationEncoder",
    "HFCLIPEncoder",
    "ModuleEncoder",
    "OpenCLIPEncoder",
    "TinyCNNEncoder",
    "as_rgb",
    "available_encoders",
    "create_encoder",
    "encoder_from_spec",
    "register_open_clip_config",
    "resize_square",
]
