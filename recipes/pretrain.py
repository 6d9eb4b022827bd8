"""Degradation-guided pre-training (stage 2 of LoRA-IR): the backbone and its DAM blocks.

    python recipes/pretrain.py --config recipes/configs/pretrain_tiny.yaml --cpu

Trains a restoration network on every task of a suite at once (synthetic pairs from clean
photos split into train and validation by photo, real paired folders, or clean images
from a 🤗 dataset). With ``router`` (a folder written by ``recipes/train_router.py``), the
frozen router's degradation embedding steers the network through DAM blocks placed at the
family's points (``dam_points`` to choose others); without it, the plain network trains
("no-DAM base"). The network starts from scratch (``backbone`` + ``backbone_args``, see
``loraxir.list_backbones()``) or from ``init_checkpoint`` (any checkpoint spandrel loads).
Loss: the PSNR loss (``loss: psnr``) or L1.

Writes to ``output_dir``: ``backbone/`` (``backbone.json``, ``backbone.safetensors``, and
with a router ``dam.safetensors`` and ``router/``: the ``base`` of ``recipes/finetune.py``),
``metrics.json`` (validation PSNR/SSIM per task, and of the degraded input), ``figures/``,
tensorboard ``logs/`` and ``checkpoints/``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from loraxir.errors import ConfigError
from loraxir.training import format_table, parse_recipe_args, prepare_output_dir
from loraxir.training.entry import run_script, script_description
from loraxir.training.restoration import RestorationConfig, build_data, start_run

RESULT_DIR = "backbone"


@dataclass
class PretrainConfig(RestorationConfig):
    """Settings of ``pretrain.py`` (on top of :class:`RestorationConfig`)."""

    output_dir: str = field(default="outputs/pretrain", metadata={"help": "Results.", "run": True})
    backbone: str = field(
        default="nafnet", metadata={"help": "Network to build (loraxir.list_backbones())."}
    )
    backbone_args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Hyper-parameters overriding the defaults."}
    )
    init_checkpoint: str | None = field(
        default=None,
        metadata={"help": "Start from this checkpoint (spandrel-loadable) instead of scratch."},
    )
    router: str | None = field(
        default=None,
        metadata={"help": "Trained router folder (frozen) driving DAM blocks; null: no DAM."},
    )
    dam_points: list[str] | str | None = field(
        default=None, metadata={"help": "Modules DAM blocks precede (default: the family's)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dam_points is not None and self.router is None:
            raise ConfigError(
                "dam_points places DAM blocks, which only a router drives; give router=<folder "
                "written by recipes/train_router.py>, or drop dam_points for a plain network."
            )


def build_model(config: PretrainConfig) -> nn.Module:
    """The network to train: a backbone, wrapped with DAM and its frozen router if any."""
    from loraxir.backbones import create_backbone, load_backbone

    if config.init_checkpoint is not None:
        backbone = load_backbone(config.init_checkpoint)
        dam = Path(config.init_checkpoint) / "dam.safetensors"
        if config.router is not None and dam.is_file():  # continue a guided pre-training
            from loraxir.guidance import load_dam

            load_dam(backbone, dam)
    else:
        backbone = create_backbone(config.backbone, **config.backbone_args)
    if config.router is None:  # a GuidedBackbone pads what its network cannot take
        _check_patch_side(backbone, config.patch_size)
        return backbone
    from loraxir.guidance import GuidedBackbone
    from loraxir.router import DegradationRouter

    router = DegradationRouter.from_pretrained(config.router)
    return GuidedBackbone(backbone, router, points=config.dam_points)


def _check_patch_side(backbone: nn.Module, patch_size: int) -> None:
    """Refuse training patches a bare network cannot take (Restormer halves the image
    without padding it, SCUNet's own padding fails on sides of 32 or less): torch would
    fail at the first step, after --overwrite had cleared the earlier run. One forward of a
    blank patch tells. Whole validation images are padded (``run_padded``)."""
    import torch

    from loraxir.backbones import input_channels
    from loraxir.padding import size_multiple

    blank = torch.zeros(1, input_channels(backbone) or 3, patch_size, patch_size)
    try:
        with torch.no_grad():
            backbone.eval()(blank)
    except RuntimeError as error:
        unit = size_multiple(backbone)
        raise ConfigError(
            f"patch_size={patch_size}: this network cannot take {patch_size}x{patch_size} "
            f"patches ({str(error).splitlines()[0]}); use a multiple of {unit} (at least "
            f"{unit})."
        ) from None
    finally:
        backbone.train()


def save_result(model: nn.Module, folder: Path) -> None:
    """Write the pre-trained network folder (with DAM blocks and router when guided).

    The folder is replaced whole: after ``--overwrite``, a run without DAM must not leave
    the earlier run's ``dam.safetensors`` and ``router/`` beside its weights, where
    ``finetune.py`` would load them as this network's."""
    from loraxir.backbones import save_backbone
    from loraxir.checkpoint import staged_folder

    with staged_folder(folder, carry_over=False) as staging:
        if hasattr(model, "router"):
            model.save_pretrained(staging)
        else:
            save_backbone(model, staging)


def _warn_of_router_classes(model: nn.Module, classes: Sequence[str]) -> None:
    """A router of other classes still drives DAM, but its embeddings describe other
    degradations, and ``finetune.py`` with ``route_by: router`` refuses it: say so before
    the hours of pre-training, not after."""
    router = getattr(model, "router", None)
    unknown = sorted(set(classes) - set(router.degradations)) if router is not None else []
    if unknown:
        warnings.warn(
            f"The router knows {router.degradations}, not the data's classes {unknown}: DAM "
            "will be steered by embeddings of other degradations, and recipes/finetune.py "
            "with route_by=router will refuse this router. Train one on this data's suite "
            "(recipes/train_router.py --set suite=...).",
            stacklevel=2,
        )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the recipe (``argv`` as on the command line); returns the metrics it wrote."""
    config = parse_recipe_args(PretrainConfig, script_description(__doc__), argv)
    reads = {"init_checkpoint": config.init_checkpoint, "router": config.router}
    prepare_output_dir(config, (RESULT_DIR,), reads)
    data = build_data(config)
    run = start_run(config, data, "pretrain", lambda: build_model(config))
    run.resume()
    _warn_of_router_classes(run.unwrapped, data.classes)
    guidance = f"DAM driven by {config.router}" if config.router else "no DAM"
    run.accelerator.print(
        f"Pre-training {run.trainable_parameters:,} parameters ({guidance}) on "
        f"{len(data.train)} patches of {data.train_classes}, "
        f"{run.accelerator.num_processes} process(es)."
    )
    run.fit(run.images_loss, run.restore_images, "pretrain")
    final = run.validate(run.restore_images, run.state.step)
    metrics = run.record(final=final, dam=config.router is not None)
    run.finish(
        metrics,
        lambda: save_result(run.unwrapped, Path(config.output_dir) / RESULT_DIR),
        format_table(final, f"pre-trained for {run.state.step} steps"),
    )
    return metrics


if __name__ == "__main__":
    run_script(lambda: main(sys.argv[1:]))
