"""Expert fine-tuning (stage 3 of LoRA-IR): routed low-rank experts on a pre-trained network.

    python recipes/finetune.py --config recipes/configs/finetune_tiny.yaml --cpu

Loads the output of ``recipes/pretrain.py`` (``base``: a folder with ``backbone.json``,
``backbone.safetensors``, and ``dam.safetensors`` and ``router/`` when it was pre-trained
with DAM; or any checkpoint spandrel loads), attaches one expert per degradation class to
every targeted layer (a :class:`~loraxir.LoraIRConfig` built from the settings below),
and trains them per ``trainable``: ``experts`` (everything else frozen, the paper's PEFT
stage), ``experts+router`` or ``all``. Each image is routed by the router
(``route_by: router``) or by its degradation label (``route_by: label``; needs no router).

``adapter`` (a self-contained adapter folder, a shipped adapter's name or a Hub repo id)
trains an existing adapter further instead, e.g. one class it restores poorly
(``tasks: [blur]``): its network, DAM blocks, router and experts load as they are, and its
own policy says what trains. Routed by label with ``weight_decay: 0``, the experts of the
classes absent from the data stay bit for bit as they were. Validation covers every class
of the adapter (``val_tasks`` narrows it), so that what one class's training does to the
others shows.

Writes to ``output_dir``: ``adapter/`` (a self-contained adapter folder: config, experts,
DAM blocks and router weights, model card with the metrics, and the base network as
``backbone.json`` + ``backbone.safetensors``), ``metrics.json`` (validation PSNR/SSIM per
task before and after, and of the degraded input), ``figures/``, tensorboard ``logs/`` and
``checkpoints/``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from loraxir.config import LoraIRConfig
from loraxir.degradations import suite as load_suite
from loraxir.errors import ConfigError
from loraxir.pretrained import find_adapter
from loraxir.router import labelled_batches
from loraxir.training import format_table, parse_recipe_args, prepare_output_dir
from loraxir.training.entry import run_script, script_description
from loraxir.training.models import (
    attach_experts,
    has_dam,
    load_base,
    routing_arguments,
    save_adapter,
)
from loraxir.training.restoration import (
    RestorationConfig,
    RestorationData,
    build_data,
    pixel_loss,
    start_run,
)
from loraxir.validation import check_choice, check_int

ROUTE_BY = ("router", "label")
# At most this many training patches (evenly spaced) fit the router's class embeddings.
_CLASS_EMBEDDING_PATCHES = 2048
# The settings that are LoraIRConfig fields, passed on when experts are attached.
_EXPERT_SETTINGS = (
    "r",
    "lora_alpha",
    "top_k",
    "target_modules",
    "exclude_modules",
    "preset",
    "lora_dropout",
    "init",
    "compute",
    "trainable",
)
# What an adapter given as ``adapter`` decides for itself (its config and folder).
_ADAPTER_OWN = ("base", "router", "experts", *_EXPERT_SETTINGS, "class_embeddings")


@dataclass
class FinetuneConfig(RestorationConfig):
    """Settings of ``finetune.py`` (on top of :class:`RestorationConfig`)."""

    output_dir: str = field(default="outputs/finetune", metadata={"help": "Results.", "run": True})
    base: str = field(
        default="outputs/pretrain/backbone",
        metadata={"help": "Pre-trained network: a pretrain.py output folder or a checkpoint."},
    )
    router: str | None = field(
        default=None,
        metadata={"help": "Router folder (default: base/router when present; 'none': no router)."},
    )
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "Train this adapter further instead of attaching new experts to base: a "
            "self-contained adapter folder, a shipped adapter's name or a Hub repo id. Its "
            "backbone, DAM blocks, router and experts are loaded as they are."
        },
    )
    route_by: str = field(
        default="router", metadata={"help": "'router' (the router's gates) or 'label'."}
    )
    experts: list[str] | None = field(
        default=None,
        metadata={"help": "Expert classes (default: the router's, else those trained on)."},
    )
    r: int = field(default=8, metadata={"help": "Rank of each expert."})
    lora_alpha: float = field(default=16.0, metadata={"help": "Experts scale by lora_alpha / r."})
    top_k: int = field(default=1, metadata={"help": "Experts mixed per image."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules that get experts (default: the preset's)."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules never to target."}
    )
    preset: str | None = field(default=None, metadata={"help": "Backbone preset (detected)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the experts' input."})
    init: str = field(default="default", metadata={"help": "'default' or 'gaussian'."})
    compute: str = field(
        default="auto",
        metadata={"help": "'auto', 'activation', 'weight', 'batched' or 'gathered'."},
    )
    trainable: str = field(
        default="experts", metadata={"help": "'experts', 'experts+router' or 'all'."}
    )
    class_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Before training, fit the router's class embeddings on training patches "
            "(up to 2048): a given class (labels, --degradation) then drives the DAM blocks "
            "with its class's mean embedding. Needs DAM blocks and trainable='experts'."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r, 1)
        if self.adapter is not None:
            self._check_adapter_settings()
        check_choice("route_by", self.route_by, ROUTE_BY)
        check_choice("trainable", self.trainable, ("experts", "experts+router", "all"))
        if self.experts == []:
            raise ConfigError(
                "experts is empty; list the expert classes, or null for the router's (else the "
                "trained) classes."
            )
        _check_policy(self.trainable, self.route_by, self.class_embeddings)
        if self.lora_dropout > 0 and self.compute not in ("auto", "activation"):
            raise ConfigError(  # the tiny config pins compute: batched
                f"compute={self.compute!r} cannot apply lora_dropout={self.lora_dropout}; set "
                "compute=activation (or auto) with it."
            )

    def _check_adapter_settings(self) -> None:
        """With ``adapter``, the experts' shape and policy are the adapter's own: a setting
        that would change them is a mistake to report, not to ignore."""
        defaults = {f.name: f.default for f in fields(FinetuneConfig)}
        clashing = [
            f"{name}={getattr(self, name)!r}"
            for name in _ADAPTER_OWN
            if getattr(self, name) != defaults[name]
        ]
        if clashing:
            raise ConfigError(
                f"adapter={self.adapter!r} brings its own experts, router and policy, so "
                f"{', '.join(clashing)} cannot apply; drop {'them' if len(clashing) > 1 else 'it'}"
                " (or attach new experts to base= without adapter=)."
            )


def _check_policy(trainable: str, route_by: str, class_embeddings: bool) -> None:
    """Refuse a training policy that would not train what it names: the config's, or an
    adapter's own (``adapter=``)."""
    if class_embeddings and trainable != "experts":
        raise ConfigError(
            "class_embeddings are fitted once, before training, on a frozen router; "
            f"trainable={trainable!r} trains the router. Use trainable='experts'."
        )
    if trainable == "experts+router" and route_by == "label":
        raise ConfigError(
            "trainable='experts+router' trains the router through its gates, but "
            "route_by='label' bypasses them; use route_by='router' or trainable='experts'."
        )


def _check_classes(classes: list[str], data: RestorationData, route_by: str, fix: str) -> None:
    """Every class the data trains on needs an expert routed by label, and routed by the
    router as well (else its images train other classes' experts), unless one expert (a
    plain LoRA) takes every image; a class that is only validated (``val_tasks``) needs one
    when routed by label, its validation images being sent to it by name."""
    trained = sorted(set(data.train_classes) - set(classes))
    if trained and route_by == "label":
        raise ConfigError(
            f"route_by='label' but the data's classes {trained} have no expert among "
            f"{classes}; {fix}."
        )
    if trained and len(classes) > 1:
        raise ConfigError(
            f"route_by='router' but the router knows only {classes}, not the data's classes "
            f"{trained}: their images would train the experts of other classes. Use a router "
            "trained on this data's suite, or keep to its classes with tasks=[...]."
        )
    validated = sorted(set(data.classes) - set(data.train_classes) - set(classes))
    if validated and route_by == "label":
        raise ConfigError(
            f"val_tasks validates the classes {validated}, which have no expert among "
            f"{classes}, and route_by='label' sends each image to its class's expert; drop "
            "them from val_tasks, or validate with route_by='router'."
        )


def build_model(
    config: FinetuneConfig, data: RestorationData, adapter: Path | None = None
) -> nn.Module:
    """The pre-trained network with experts attached, per ``config`` (or the adapter
    ``config.adapter`` names, to train further; ``adapter``: its folder, when the caller
    has found it already)."""
    if config.adapter is not None:
        return _continued_adapter(config, data, adapter or find_adapter(config.adapter))
    backbone, router = load_base(config.base, config.router)
    if router is None and (config.route_by == "router" or has_dam(backbone)):
        raise ConfigError(
            f"{config.base!r} has no router/ and no router= was given, but "
            f"{'its DAM blocks need' if has_dam(backbone) else 'route_by=router needs'} one; "
            "pass router=<folder written by recipes/train_router.py>."
        )
    classes = config.experts or (router.degradations if router else data.train_classes)
    _check_classes(classes, data, config.route_by, "set experts= to cover every class of the data")
    settings = {name: getattr(config, name) for name in _EXPERT_SETTINGS}
    model = attach_experts(backbone, classes, settings, router=router)
    if config.class_embeddings:
        if not has_dam(backbone):
            raise ConfigError(
                f"class_embeddings drive DAM blocks, and {config.base!r} has none; "
                "pre-train with router=... to add them, or drop class_embeddings."
            )
        step = max(1, len(data.train) // _CLASS_EMBEDDING_PATCHES)
        patches = Subset(data.train, range(0, len(data.train), step))
        model.loraxir_router.fit_class_embeddings(
            labelled_batches(patches, class_names=data.class_names)
        )
    return model


def _continued_adapter(config: FinetuneConfig, data: RestorationData, folder: Path) -> nn.Module:
    """The adapter ``config.adapter`` names, trainable per its own policy. Its experts
    stay as they were where no training image reaches them: routed by label (or by a router
    that sends no image there) and with ``weight_decay: 0``, bit for bit."""
    from loraxir import LoraIRModel
    from loraxir.backbones import load_backbone

    model = LoraIRModel.from_pretrained(load_backbone(folder), str(folder), is_trainable=True)
    _check_policy(model.config.trainable, config.route_by, class_embeddings=False)
    fix = "keep to its classes with tasks=[...], or add a class with recipes/add_degradation.py"
    _check_classes(model.degradations, data, config.route_by, fix)
    last = model.degradations[-1]
    if model.config.trainable == "new_experts" and last not in data.train_classes:
        raise ConfigError(
            f"The adapter {config.adapter!r} trains by its own policy, trainable='new_experts': "
            f"the experts of its last class {last!r} only, and the data has no {last!r} "
            f'images, so nothing would train. To train its other classes, set "trainable": '
            f'"experts" in {str(folder / "adapter_config.json")!r}.'
        )
    if config.route_by == "router" and model.loraxir_router is None:
        raise ConfigError(f"The adapter {config.adapter!r} has no router; set route_by='label'.")
    return model


def _validating_every_class(config: FinetuneConfig, folder: Path) -> FinetuneConfig:
    """``config`` validating, unless ``val_tasks`` says otherwise, every task of the suite
    whose class the adapter ``folder`` restores, not only the ``tasks`` it trains further:
    training one class can move the others (routed by the router, a rare misrouted image
    trains another expert), and validation is where a user sees it."""
    if config.val_tasks is not None or config.tasks is None or config.paired_train is not None:
        return config
    classes = set(LoraIRConfig.from_file(folder / "adapter_config.json").degradations)
    suite = load_suite(config.suite)
    trained = {suite.task_names[suite.index(task)] for task in config.tasks}
    val_tasks = [t for t in suite.task_names if t in trained or suite.task(t).label in classes]
    return replace(config, val_tasks=val_tasks)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the recipe (``argv`` as on the command line); returns the metrics it wrote."""
    config = parse_recipe_args(FinetuneConfig, script_description(__doc__), argv)
    adapter = None if config.adapter is None else find_adapter(config.adapter)
    if adapter is not None:
        config = _validating_every_class(config, adapter)
    reads = {"adapter": adapter} if adapter is not None else {"base": config.base}
    prepare_output_dir(config, ("adapter",), {**reads, "router": config.router})
    data = build_data(config)
    run = start_run(config, data, "finetune", lambda: build_model(config, data, adapter))
    model, unwrapped = run.model, run.unwrapped

    def restore(batch: dict[str, Any]) -> torch.Tensor:
        unwrapped.eval()
        return unwrapped(batch["lq"], **routing_arguments(config.route_by, batch, data))

    def compute_loss(batch: dict[str, Any]) -> torch.Tensor:
        restored = model(batch["lq"], **routing_arguments(config.route_by, batch, data))
        return pixel_loss(restored, batch["gt"], config.loss, config.fft_weight)

    started_from = "the pre-trained network" if adapter is None else "the adapter as given"
    initial = run.validate(restore, 0, "initial")
    run.resume()
    total = sum(p.numel() for p in unwrapped.parameters())
    run.accelerator.print(
        f"Fine-tuning {run.trainable_parameters:,} of {total:,} parameters "
        f"({unwrapped.config.trainable}) "
        f"on {len(data.train)} patches of {data.train_classes}, routed by {config.route_by}, "
        f"{run.accelerator.num_processes} process(es)."
    )
    run.fit(compute_loss, restore, "finetune")
    final = run.validate(restore, run.state.step)
    metrics = run.record(
        final=final, initial=initial, route_by=config.route_by, experts=unwrapped.degradations
    )
    run.finish(
        metrics,
        lambda: save_adapter(
            unwrapped, Path(config.output_dir) / "adapter", adapter or config.base, final
        ),
        format_table(initial, "before fine-tuning (" + started_from + ")")
        + "\n"
        + format_table(final, f"after {run.state.step} steps"),
    )
    return metrics


if __name__ == "__main__":
    run_script(lambda: main(sys.argv[1:]))
