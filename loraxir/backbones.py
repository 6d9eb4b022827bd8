"""Restoration backbones built through spandrel, by name.

The names cover the configurations the paper and our benchmarks use, plus ``*-tiny``
variants for tests (random init, CPU friendly). Restormer lives in
``spandrel_extra_arches`` under a non-commercial academic licence, installed by the
``loraxir[restormer]`` extra, and is imported only when asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from loraxir.errors import CheckpointError, ConfigError, unknown_name

# name -> (module, class, default hyper-parameters)
_BACKBONES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "nafnet": (
        "spandrel.architectures.NAFNet",
        "NAFNet",
        {
            "width": 32,
            "middle_blk_num": 1,
            "enc_blk_nums": [1, 1, 1, 28],
            "dec_blk_nums": [1, 1, 1, 1],
        },
    ),
    "nafnet-w64": (
        "spandrel.architectures.NAFNet",
        "NAFNet",
        {
            "width": 64,
            "middle_blk_num": 1,
            "enc_blk_nums": [1, 1, 1, 28],
            "dec_blk_nums": [1, 1, 1, 1],
        },
    ),
    "nafnet-tiny": (
        "spandrel.architectures.NAFNet",
        "NAFNet",
        {"width": 8, "middle_blk_num": 1, "enc_blk_nums": [1, 1], "dec_blk_nums": [1, 1]},
    ),
    "restormer": ("spandrel_extra_arches.architectures.Restormer", "Restormer", {}),
    "restormer-tiny": (
        "spandrel_extra_arches.architectures.Restormer",
        "Restormer",
        {"dim": 8, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1, "heads": [1, 1, 1, 1]},
    ),
    "swinir": (
        "spandrel.architectures.SwinIR",
        "SwinIR",
        {
            "img_size": 128,
            "window_size": 8,
            "embed_dim": 180,
            "depths": [6] * 6,
            "num_heads": [6] * 6,
            "mlp_ratio": 2.0,
            "upscale": 1,
            "upsampler": "",
            "resi_connection": "1conv",
        },
    ),
    "swinir-tiny": (
        "spandrel.architectures.SwinIR",
        "SwinIR",
        {
            "img_size": 32,
            "window_size": 8,
            "embed_dim": 16,
            "depths": [1, 1],
            "num_heads": [2, 2],
            "mlp_ratio": 2.0,
            "upscale": 1,
            "upsampler": "",
            "resi_connection": "1conv",
        },
    ),
    "scunet": ("spandrel.architectures.SCUNet", "SCUNet", {}),
    # SCUNet fixes head_dim=32, so dim cannot go below 64: its tiny variant is ~5.5 M params.
    "scunet-tiny": (
        "spandrel.architectures.SCUNet",
        "SCUNet",
        {"config": [1] * 7, "dim": 64, "input_resolution": 64},
    ),
}


def list_backbones() -> list[str]:
    """Names accepted by :func:`create_backbone`."""
    return sorted(_BACKBONES)


def create_backbone(name: str, **hyperparams: Any) -> nn.Module:
    """Build a randomly initialised backbone by name; ``hyperparams`` override the defaults.

    Load real weights afterwards with ``backbone.load_state_dict`` or bring a checkpoint
    through :func:`load_backbone`.
    """
    if name not in _BACKBONES:
        raise unknown_name("backbone", name, _BACKBONES)
    module_name, class_name, defaults = _BACKBONES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(
            f"Backbone {name!r} needs {module_name.split('.')[0]} ({error}). Install it with "
            "pip install 'loraxir[restormer]' (non-commercial academic licence)."
        ) from None
    try:
        model = getattr(module, class_name)(**{**defaults, **hyperparams})
    except TypeError as error:
        raise ConfigError(f"Invalid hyper-parameters for backbone {name!r}: {error}.") from None
    model._loraxir_architecture = class_name
    return model


def load_backbone(path: str) -> nn.Module:
    """Load a backbone checkpoint (``.pth``/``.safetensors``) through spandrel's detection.

    Returns the trainable ``nn.Module`` (``descriptor.model``), not spandrel's inference
    wrapper, with its architecture id remembered for preset detection.
    """
    from spandrel import ModelLoader, UnsupportedModelError

    try:
        import spandrel_extra_arches

        spandrel_extra_arches.install(ignore_duplicates=True)
    except ImportError:
        pass
    try:
        descriptor = ModelLoader().load_from_file(path)
    except UnsupportedModelError:
        raise CheckpointError(
            f"spandrel does not recognise the architecture of {path}. Build the network "
            "yourself, load its state dict, and pass the module to get_loraxir_model."
        ) from None
    except (OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"Could not read backbone checkpoint {path}: {error}") from None
    model = descriptor.model
    model._loraxir_architecture = descriptor.architecture.id
    return model
