"""Building and saving the networks of the restoration recipes.

The pre-training output folder (``recipes/pretrain.py``): ``backbone.json`` +
``backbone.safetensors`` (the plain network), ``dam.safetensors`` (the DAM blocks, when
pre-trained with them) and ``router/`` (the frozen router that drove them). An adapter
folder written by :func:`save_adapter` is self-contained: the adapter files of
:meth:`~loraxir.LoraIRModel.save_pretrained` plus the base network's two backbone files.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn

from loraxir.checkpoint import plain_state_dict
from loraxir.errors import CheckpointError
from loraxir.training.restoration import RestorationData

DAM_WEIGHTS = "dam.safetensors"
DAM_ATTRIBUTE = "loraxir_dam"
ROUTER_DIR = "router"


def load_base(base: str | Path, router: str | None = None) -> tuple[nn.Module, Any]:
    """``(backbone, router)`` of a pre-training output folder or a checkpoint file.

    The backbone carries the pre-trained DAM blocks when the folder has
    ``dam.safetensors``. ``router`` is loaded from ``router`` (a folder), else from
    ``base/router/`` when present; ``"none"`` means no router.
    """
    from loraxir.backbones import load_backbone

    base = Path(base)
    if not base.exists():
        raise CheckpointError(
            f"base {str(base)!r} does not exist; pass the output folder of recipes/pretrain.py "
            "(output_dir/backbone) or a checkpoint file spandrel loads."
        )
    backbone = load_backbone(base)
    if (base / DAM_WEIGHTS).is_file():
        from loraxir.guidance import load_dam

        load_dam(backbone, base / DAM_WEIGHTS)
    return backbone, load_router(base, router)


def has_dam(backbone: nn.Module) -> bool:
    """Does ``backbone`` carry DAM blocks?"""
    return hasattr(backbone, DAM_ATTRIBUTE)


def load_router(base: Path, router: str | None) -> Any:
    """The router named by ``router`` (a folder), or the one in ``base/router/``."""
    from loraxir.router import DegradationRouter

    if router == "none":
        return None
    folder = Path(router) if router is not None else base / ROUTER_DIR
    if router is None and not folder.is_dir():
        return None
    return DegradationRouter.from_pretrained(folder)


def attach_experts(
    backbone: nn.Module, classes: list[str], settings: dict[str, Any], router: Any = None
) -> Any:
    """A :class:`~loraxir.LoraIRModel`: one expert per class of ``classes`` on ``backbone``
    (``settings`` are :class:`~loraxir.LoraIRConfig` fields), routed by ``router``; the
    backbone's DAM blocks, if any, are kept and named in the config (saved with it)."""
    from loraxir import LoraIRConfig, get_loraxir_model

    options = dict(settings)
    if has_dam(backbone):
        from loraxir.guidance import dam_config

        options["dam"] = dam_config(backbone)
    return get_loraxir_model(backbone, LoraIRConfig(degradations=classes, **options), router)


def routing_arguments(
    route_by: str, batch: dict[str, Any], data: RestorationData
) -> dict[str, Any]:
    """Keyword arguments routing a :class:`~loraxir.LoraIRModel` call on ``batch``:
    none for the router, the class names of the labels for ``"label"``."""
    if route_by == "router":
        return {}
    return {"degradation": [data.class_names[i] for i in batch["label"].tolist()]}


def save_adapter(model: Any, folder: str | Path, base: str | Path, metrics: dict[str, Any]) -> None:
    """Write a self-contained adapter folder: ``save_pretrained`` (metrics in the card)
    and the base network (as trained: ``trainable='all'`` changes it) as backbone files."""
    from loraxir.backbones import backbone_spec, load_backbone, save_backbone

    plain = load_backbone(base)
    plain.load_state_dict(plain_state_dict(model.model))
    spec = (backbone_spec(plain) or {}).get("name", type(plain).__name__)
    with warnings.catch_warnings():  # the base network is saved below (an earlier one too)
        warnings.filterwarnings("ignore", message="trainable='all'")
        warnings.filterwarnings("ignore", message="Saving into .* drops its")
        model.save_pretrained(str(folder), metrics=card_metrics(metrics), base_model=spec)
    save_backbone(plain, folder)


def card_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The model card's table: validation PSNR/SSIM on average and PSNR per task."""
    card = {"val PSNR (dB)": metrics["psnr"], "val SSIM": metrics["ssim"]}
    for task, numbers in metrics["per_task"].items():
        card[f"val PSNR {task} (dB)"] = numbers["psnr"]
    return card
