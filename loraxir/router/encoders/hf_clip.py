"""🤗 transformers CLIP vision towers (the paper's ``CLIPVisionModelWithProjection``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from loraxir.errors import CheckpointError, ConfigError
from loraxir.router.encoders.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    DegradationEncoder,
    first_lines,
    quiet_logging,
    register_encoder,
    seeded_init,
)


@register_encoder("hf_clip")
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

        folder = Path(self.path)
        # Without its files, AutoTokenizer may build an empty CLIP tokenizer (no error): every
        # prompt would then embed the same and every class would get the same prototype.
        has_files = (folder / "tokenizer.json").is_file() or all(
            (folder / name).is_file() for name in ("vocab.json", "merges.txt")
        )
        try:
            if not has_files:
                raise OSError("no tokenizer.json, nor vocab.json with merges.txt")
            tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ConfigError(
                f"No tokenizer in {self.path} ({error}); save the CLIP tokenizer there "
                "(tokenizer.save_pretrained(folder)) to use text prototypes."
            ) from error
        model, _ = _load_hf_clip_tower(folder, "text")
        tokens = tokenizer(list(prompts), padding=True, return_tensors="pt")
        with torch.no_grad():
            return model.eval()(**tokens).text_embeds.to(self.mean.device)

    def spec(self) -> dict[str, Any]:
        return self._spec(path=self.path)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], module: nn.Module | None = None) -> HFCLIPEncoder:
        return cls(spec["path"])


def _load_hf_clip_tower(folder: Path, tower: str) -> tuple[nn.Module, Any]:
    """Load the vision or text tower (with projection) of a local 🤗 CLIP folder."""
    from transformers import (
        AutoConfig,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
    )

    if not (folder / "config.json").is_file():
        raise ConfigError(f"No 🤗 model config.json in {folder}.")
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"Could not read the 🤗 config.json in {folder}: {first_lines(str(error))}"
        ) from error
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
        with seeded_init(), quiet_logging(transformers=True):
            model, info = cls.from_pretrained(
                folder, config=sub, local_files_only=True, output_loading_info=True
            )
    except (RuntimeError, OSError, ValueError, SafetensorError) as error:
        raise CheckpointError(
            f"Could not load the CLIP {tower} tower from {folder}: {first_lines(str(error))}"
        ) from error
    # transformers fills weights missing from the file with random ones (and we silence its
    # report): a tower with any of them would embed every image through noise.
    missing = sorted(info["missing_keys"])
    if missing:
        hint = (
            " A CLIPVisionModel folder has no projection: save a CLIPModel or a "
            "CLIPVisionModelWithProjection."
            if any("projection" in key for key in missing)
            else ""
        )
        raise CheckpointError(
            f"The weights in {folder} lack {len(missing)} tensors of the CLIP {tower} tower its "
            f"config.json describes ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}"
            f"); they would be random.{hint}"
        )
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
