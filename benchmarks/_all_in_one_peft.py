"""The benchmark's peft baseline: one plain peft LoRA on the pre-trained network, trained
like ``recipes/finetune.py`` trains experts (same machinery, data, loss and schedule).

peft's conv LoRA cannot take depthwise convolutions at ranks that are not multiples of
their groups (its ``lora_A`` is a grouped convolution of ``r`` outputs), so it targets the
dense convolutions only (``target_modules``); the table reports its own, slightly smaller,
trainable count. With a DAM base the network runs as a
:class:`~loraxir.guidance.GuidedBackbone`, its frozen router feeding the (frozen) DAM
blocks, exactly as in the base.

Writes ``output_dir/adapter/``: ``lora.safetensors`` (peft's adapter tensors),
``lora_config.json`` (the ``LoraConfig`` and the base folder); :func:`load` rebuilds the
network from it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from loraxir.training import format_table, parse_recipe_args, prepare_output_dir
from loraxir.training.models import has_dam, load_base
from loraxir.training.restoration import RestorationConfig, build_data, start_run

RESULT_DIR = "adapter"
WEIGHTS = "lora.safetensors"
CONFIG = "lora_config.json"
# NAFNet's dense convolutions (every conv but the depthwise ``conv2``).
NAFNET_DENSE = r"(intro|ending|downs\.\d+|ups\.\d+\.0|.*\.(conv[1345]|sca\.1))"


@dataclass
class PeftLoraConfig(RestorationConfig):
    """Settings of the peft LoRA baseline (on top of :class:`RestorationConfig`)."""

    output_dir: str = field(default="outputs/peft_lora", metadata={"help": "Results.", "run": True})
    base: str = field(
        default="outputs/pretrain/backbone", metadata={"help": "A pretrain.py output folder."}
    )
    router: str | None = field(
        default=None, metadata={"help": "Router folder (default: base/router when present)."}
    )
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator."})
    target_modules: str = field(
        default=NAFNET_DENSE, metadata={"help": "peft target_modules regex (dense convs)."}
    )


def _lora_config(settings: dict[str, Any]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings["r"], lora_alpha=settings["lora_alpha"], target_modules=settings["targets"]
    )


def build(base: str, settings: dict[str, Any], router: str | None = None) -> nn.Module:
    """The base network (guided by its router when it has DAM) with a fresh peft LoRA
    whose parameters alone train."""
    from peft import inject_adapter_in_model

    backbone, routing = load_base(base, router)
    inject_adapter_in_model(_lora_config(settings), backbone)
    if not has_dam(backbone):
        return backbone
    from loraxir.guidance import GuidedBackbone

    return GuidedBackbone(backbone, routing)


def _backbone(model: nn.Module) -> nn.Module:
    return getattr(model, "backbone", model)


def save(model: nn.Module, folder: Path, base: str, settings: dict[str, Any]) -> None:
    """Write the adapter tensors and what :func:`load` needs to rebuild the network."""
    from peft import get_peft_model_state_dict

    from loraxir import checkpoint

    tensors = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(_backbone(model)).items()}
    with checkpoint.staged_folder(folder) as staging:
        checkpoint.write_safetensors(staging / WEIGHTS, tensors)
        record = {"base": str(base), **settings}
        (staging / CONFIG).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def load(folder: str | Path) -> nn.Module:
    """The trained network :func:`save` wrote, in eval mode."""
    from peft import set_peft_model_state_dict

    from loraxir import checkpoint

    folder = Path(folder)
    settings = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    model = build(settings["base"], settings, settings.get("router"))
    set_peft_model_state_dict(_backbone(model), checkpoint.read_safetensors(folder, WEIGHTS))
    return model.eval()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the peft LoRA (``argv`` as a recipe's command line); returns its metrics."""
    config = parse_recipe_args(PeftLoraConfig, "peft LoRA baseline", argv)
    prepare_output_dir(config, (RESULT_DIR,))
    data = build_data(config)
    settings = {
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "targets": config.target_modules,
        "router": config.router,
    }
    run = start_run(config, data, "peft_lora", lambda: build(config.base, settings, config.router))
    unwrapped = run.unwrapped
    start_step = run.resume()
    run.fit(run.images_loss, run.restore_images, "peft LoRA")
    final = run.validate(run.restore_images, run.state.step)
    metrics = {
        "final": final,
        "steps": run.state.step,
        "resumed_from_step": start_step,
        "trainable_parameters": run.trainable_parameters,
    }
    folder = Path(config.output_dir) / RESULT_DIR
    run.finish(
        metrics,
        lambda: save(unwrapped, folder, config.base, settings),
        format_table(final, f"peft LoRA after {run.state.step} steps"),
    )
    return metrics
