"""The adapter checkpoint format: reading, checking and atomically writing it.

A checkpoint is a folder (or a Hub repo) with ``adapter_config.json`` (the
:class:`~loraxir.config.LoraIRConfig`), ``adapter_model.safetensors`` (experts under peft's
key names, plus router weights) and a ``README.md`` model card. Loading never unpickles.
Key names follow peft (``base_model.model.<module path>.loraxir_experts.A.<chunk>``), so a
folder written here loads with ``peft.PeftModel.from_pretrained`` and the other way round.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from loraxir.config import CONFIG_NAME, LoraIRConfig
from loraxir.errors import CheckpointError, ConfigError
from loraxir.layers import LAYER_TYPES
from loraxir.targeting import resolve_targets

WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
ROUTER_PREFIX = "base_model.loraxir_router."
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

__all__ = ["CheckpointError", "expert_key", "read", "write"]


def expert_key(path: str, factor: str, chunk: int) -> str:
    """Saved name of one expert chunk's ``A`` or ``B`` for the module at ``path``."""
    return f"base_model.model.{path}.loraxir_experts.{factor}.{chunk}"


def split_router(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split saved tensors into expert tensors and router tensors (prefix removed)."""
    experts = {k: v for k, v in tensors.items() if not k.startswith(ROUTER_PREFIX)}
    router = {k[len(ROUTER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(ROUTER_PREFIX)}
    return experts, router


def expected_expert_shapes(backbone: nn.Module, config: LoraIRConfig) -> dict[str, tuple[int, ...]]:
    """The key and shape of every expert tensor ``config`` would create on ``backbone``."""
    shapes = {}
    for path in resolve_targets(
        backbone, config.target_modules, config.exclude_modules, config.preset
    ):
        base = backbone.get_submodule(path)
        a_shape, b_shape = LAYER_TYPES[type(base)].factor_shapes(base, config.r)
        for chunk, size in enumerate(config.expert_chunks):
            shapes[expert_key(path, "A", chunk)] = (size, *a_shape)
            shapes[expert_key(path, "B", chunk)] = (size, *b_shape)
    return shapes


def check_expert_shapes(
    backbone: nn.Module, config: LoraIRConfig, tensors: dict[str, torch.Tensor]
) -> None:
    """Raise :class:`CheckpointError` naming the first layer whose saved shape differs from
    what the backbone needs, or the first missing or unexpected tensor."""
    expected = expected_expert_shapes(backbone, config)
    for key, shape in expected.items():
        if key not in tensors:
            raise CheckpointError(
                f"The checkpoint has no tensor {key!r} that this backbone needs; it was saved "
                "for another backbone or another config."
            )
        if tuple(tensors[key].shape) != shape:
            layer = key.removeprefix("base_model.model.").split(".loraxir_experts.")[0]
            raise CheckpointError(
                f"Layer {layer!r} does not fit: the checkpoint has {key.rsplit('.', 3)[-3:]} of "
                f"shape {tuple(tensors[key].shape)}, this backbone needs {shape}. The adapter was "
                "saved for a backbone of other shapes (another width or variant)."
            )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"The checkpoint has {len(unexpected)} tensors this backbone has no layer for, e.g. "
            f"{unexpected[0]!r}; it was saved for another backbone."
        )


def read(
    model_id: str | os.PathLike, strict: bool = True, **hub_kwargs: Any
) -> tuple[LoraIRConfig, dict[str, torch.Tensor]]:
    """Read the config and tensors of a checkpoint folder or Hub repo, without unpickling."""
    folder = _resolve_folder(model_id, hub_kwargs)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}; is it a loraxir adapter folder?")
    config = LoraIRConfig.from_file(config_path, strict=strict)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{folder} holds pickle weights {pickles} and no {WEIGHTS_NAME}. loraxir loads "
                "safetensors only (a pickle can run arbitrary code); convert it with "
                "safetensors.torch.save_file in a trusted environment."
            )
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}.")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{weights} is truncated or corrupted ({error}); re-save or re-download it."
        ) from None
    return config, tensors


def write(
    directory: str | os.PathLike,
    config: LoraIRConfig,
    tensors: dict[str, torch.Tensor],
    backbone: str,
    metrics: dict[str, float] | None = None,
) -> None:
    """Write a checkpoint folder atomically.

    Everything is written to a temporary sibling folder first, then swapped in with
    renames; files of the old folder that are not ours (logs, images) are carried over.
    A crash before the swap leaves the previous checkpoint exactly as it was.
    """
    from loraxir.hub import render_model_card

    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        (staging / CONFIG_NAME).write_text(config.to_json_string(), encoding="utf-8")
        contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(contiguous, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        (staging / CARD_NAME).write_text(
            render_model_card(config, backbone, metrics), encoding="utf-8"
        )
        if target.exists():
            for item in target.iterdir():
                if not (staging / item.name).exists():
                    copy = shutil.copytree if item.is_dir() else shutil.copy2
                    copy(item, staging / item.name)
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _resolve_folder(model_id: str | os.PathLike, hub_kwargs: dict[str, Any]) -> Path:
    path = Path(model_id)
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix in _PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{path} is a pickle file; loraxir loads safetensors adapter folders only "
                "(a pickle can run arbitrary code)."
            )
        raise CheckpointError(f"{path} is a file; pass the adapter folder that contains it.")
    if str(model_id).count("/") != 1 or str(model_id).startswith((".", "/")):
        raise CheckpointError(
            f"{model_id} is neither a local folder nor a Hub repo id (owner/name)."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                str(model_id), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME], **hub_kwargs
            )
        )
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{model_id!r} is not a local folder and is not in the Hub cache, and the Hub cannot "
            "be reached (offline?). Download it where there is network, or pass a local folder."
        ) from None
    except HfHubHTTPError as error:
        raise CheckpointError(f"Could not fetch {model_id!r} from the Hub: {error}.") from None
    except ValueError as error:
        raise ConfigError(f"Invalid Hub repo id {model_id!r}: {error}.") from None
