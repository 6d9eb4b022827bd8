"""A new degradation for a trained adapter: one new expert per layer, one new router class.

    python recipes/add_degradation.py --config recipes/configs/add_degradation_tiny.yaml --cpu

Loads a self-contained adapter folder (``adapter``, e.g. the ``adapter/`` written by
``recipes/finetune.py``), adds the class ``new_degradation``
(:meth:`loraxir.LoraIRModel.add_degradation`: a fresh expert in every layer, ``B = 0``),
and trains only the new parts: the new expert, and the new row of the router's linear
head (its old rows receive no gradient and no weight decay, so the old classes' logits
stay exactly as they were). Training data: the new degradation (``new_tasks`` of
``new_suite``, all labelled ``new_degradation``) plus a replay sample of the old tasks
(``replay_repeats`` patches per photo and task): images routed by their labels train the
new expert, and the router's new row learns to tell the new class from the old ones. With
real pairs, ``paired_train`` / ``paired_val`` map the new class and the old classes to
replay to their folders (``train_repeats`` crops per pair; no suite is read).

Everything old is frozen, so routed to their own experts the old tasks' outputs are
unchanged: bit for bit in a batch of old classes; to float rounding (~1e-7) in a batch
that also holds images routed to the new expert, as the validation batches here do.
``metrics.json`` reports every task's validation PSNR/SSIM before (the new expert still
zero) and after training, and the change per task.

Writes to ``output_dir``: ``adapter/`` (the grown adapter, self-contained),
``metrics.json``, ``figures/``, tensorboard ``logs/`` and ``checkpoints/``.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraxir.degradations import Suite, Task
from loraxir.degradations import suite as load_suite
from loraxir.errors import ConfigError
from loraxir.pretrained import find_adapter
from loraxir.training import format_table, parse_recipe_args, prepare_output_dir
from loraxir.training.entry import run_script, script_description
from loraxir.training.models import routing_arguments, save_adapter
from loraxir.training.restoration import (
    RestorationConfig,
    RestorationData,
    build_data,
    pixel_loss,
    start_run,
)
from loraxir.validation import check_choice

ROUTE_BY = ("label", "router")


@dataclass
class AddDegradationConfig(RestorationConfig):
    """Settings of ``add_degradation.py`` (on top of :class:`RestorationConfig`)."""

    output_dir: str = field(
        default="outputs/add_degradation", metadata={"help": "Results.", "run": True}
    )
    adapter: str = field(
        default="outputs/finetune/adapter",
        metadata={
            "help": "The adapter to grow: a self-contained adapter folder (finetune.py's "
            "adapter/), a shipped adapter's name or a Hub repo id. The grown adapter keeps "
            "its trainable policy."
        },
    )
    new_degradation: str = field(default="snow", metadata={"help": "Name of the new class."})
    new_suite: str = field(
        default="all_weather", metadata={"help": "Suite (name or YAML) holding the new tasks."}
    )
    new_tasks: list[str] | None = field(
        default=None, metadata={"help": "Its tasks forming the new class (default: the name)."}
    )
    replay_repeats: int = field(
        default=1, metadata={"help": "Replay patches per (photo, old task) per epoch."}
    )
    train_router: bool = field(
        default=True, metadata={"help": "Train the router's new class (linear heads)."}
    )
    router_loss_weight: float = field(
        default=0.1, metadata={"help": "Weight of the router's cross-entropy."}
    )
    route_by: str = field(
        default="label", metadata={"help": "Validation routing: 'label' or 'router'."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("route_by", self.route_by, ROUTE_BY)
        if self.replay_repeats < 1:
            raise ConfigError(f"replay_repeats must be >= 1, got {self.replay_repeats}.")


def grown_suite(config: AddDegradationConfig, old_classes: list[str]) -> tuple[Suite, list[str]]:
    """The old tasks (those of the adapter's classes) plus the new tasks, relabelled
    ``new_degradation``, as one suite; and the names of the old tasks."""
    old = load_suite(config.suite)
    new = load_suite(config.new_suite)
    old_tasks = [
        task
        for task in old.tasks
        if task.label in old_classes and (not config.tasks or task.name in config.tasks)
    ]
    if not old_tasks:
        raise ConfigError(
            f"No task of suite {old.name!r} has one of the adapter's classes {old_classes}; "
            "set suite= to the suite the adapter was trained on (for the replay)."
        )
    uncovered = [c for c in old_classes if c not in {t.label for t in old.tasks}]
    if uncovered and not config.tasks:
        raise ConfigError(
            f"Suite {old.name!r} has no task for the adapter's classes {uncovered}: they would "
            "be neither replayed nor reported. Set suite= to a suite (a YAML file) with tasks "
            "for every class, or list the old tasks to replay in tasks=."
        )
    new_tasks = [new.task(name) for name in config.new_tasks or [config.new_degradation]]
    clash = sorted({t.name for t in new_tasks} & {t.name for t in old_tasks})
    if clash:
        raise ConfigError(f"New tasks {clash} have the names of old tasks; rename them.")
    relabelled = [
        Task(t.name, config.new_degradation, t.pipeline, t.description) for t in new_tasks
    ]
    grown = Suite(f"{old.name}+{config.new_degradation}", "", (*old_tasks, *relabelled))
    outside = [name for name in config.val_tasks or [] if name not in grown.task_names]
    if outside:
        raise ConfigError(
            f"val_tasks names {outside}, which this run neither replays nor adds (its tasks: "
            f"{grown.task_names}); validate replayed old tasks (tasks=) or new ones (new_tasks=)."
        )
    return grown, [t.name for t in old_tasks]


def paired_old_classes(config: AddDegradationConfig, old_classes: list[str]) -> list[str]:
    """With real pairs (``paired_train``), the old classes they replay: every key but the
    new class, each one of the adapter's. No suite is read (the pairs are the data)."""
    new = config.new_degradation
    for setting in ("paired_train", "paired_val"):
        if new not in getattr(config, setting):
            raise ConfigError(
                f"{setting} has no folder for the new class {new!r}: add {{{new}: <folder of "
                f"its pairs>}} beside the old classes' replay folders."
            )
    unknown = [name for name in config.paired_train if name not in (*old_classes, new)]
    if unknown:
        raise ConfigError(
            f"paired_train has classes {unknown} that are neither the adapter's {old_classes} "
            f"nor the new {new!r}; name each folder by its class."
        )
    return [name for name in config.paired_train if name != new]


class _GrowthModule(nn.Module):
    """What the optimizer trains, in one forward (for DDP): restored images, and the
    router's logits when its new class trains."""

    def __init__(self, model: nn.Module, train_router: bool) -> None:
        super().__init__()
        self.model = model
        self.train_router = train_router

    def forward(
        self, images: torch.Tensor, **routing: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        restored = self.model(images, **routing)
        logits = self.model.loraxir_router.route(images).logits if self.train_router else None
        return restored, logits


def build_model(config: AddDegradationConfig, data: RestorationData, folder: Path) -> _GrowthModule:
    """The adapter in ``folder`` with the new class added and only the new parts trainable."""
    from loraxir import LoraIRModel
    from loraxir.backbones import load_backbone

    model = LoraIRModel.from_pretrained(load_backbone(folder), str(folder), is_trainable=True)
    if config.new_degradation in model.degradations:
        raise ConfigError(
            f"The adapter already has the class {config.new_degradation!r}: {model.degradations}."
        )
    if config.route_by == "router" and model.loraxir_router is None:
        raise ConfigError(
            "route_by='router' validates with the adapter's router, but this adapter has none; "
            "set route_by='label'."
        )
    router = model.loraxir_router
    fitted = getattr(router, "class_embeddings", None)
    model.add_degradation(config.new_degradation, trainable="new_experts")
    missing = sorted(set(data.classes) - set(model.degradations))
    if missing:
        raise ConfigError(f"The data has classes {missing} the adapter lacks.")
    if fitted is not None:  # real pairs name the new class by its folder, not by tasks
        paired = config.paired_train is not None
        new_tasks = [config.new_degradation] if paired else config.new_tasks
        new_tasks = new_tasks or [config.new_degradation]
        router.class_embeddings = _grown_class_embeddings(router, fitted, data, new_tasks)
    train_router = config.train_router and router is not None
    if train_router:
        if not isinstance(router.head, nn.Linear):
            raise ConfigError(
                "train_router needs a linear router head; a text-prototype head knows the new "
                "class from its name already (set train_router=false)."
            )
        _train_last_row(router.head)
    return _GrowthModule(model, train_router)


def _grown_class_embeddings(
    router: nn.Module,
    fitted: torch.Tensor,
    data: RestorationData,
    new_tasks: list[str],
    crops: int = 64,
) -> torch.Tensor:
    """The adapter's fitted class embeddings with a row for the new class: the old rows as
    they were (a class given by name drives DAM blocks with its row, so its outputs stay
    the same; the router's MLP is not trained here), the new one the mean embedding of the
    new class's first ``crops`` training patches (deterministic, so every process gets it)."""
    names = set(new_tasks)
    picked = [i for i, t in enumerate(data.train.task_labels) if data.task_names[t] in names]
    patches = torch.stack([data.train[i]["lq"] for i in picked[:crops]])
    was_training = router.training
    router.eval()
    with torch.no_grad():
        row = router.embed(patches.to(fitted.device)).mean(0, keepdim=True)
    router.train(was_training)
    return torch.cat([fitted, row.to(fitted)])


def _train_last_row(head: nn.Linear) -> None:
    """Let only the last row (the new class) of ``head`` learn: the others get no
    gradient (and, in a group without weight decay, no update at all)."""
    mask = torch.zeros(head.out_features, 1)
    mask[-1] = 1
    head.weight.requires_grad = True
    head.weight.register_hook(lambda grad: grad * mask.to(grad))
    if head.bias is not None:
        head.bias.requires_grad = True
        head.bias.register_hook(lambda grad: grad * mask[:, 0].to(grad))


def _param_groups(module: nn.Module) -> list[dict[str, Any]]:
    router = module.model.loraxir_router
    head = list(router.head.parameters()) if module.train_router else []
    others = [p for p in module.parameters() if all(p is not h for h in head)]
    return [{"params": others}, {"params": head, "weight_decay": 0.0}]


def per_task_change(before: dict[str, Any], after: dict[str, Any]) -> dict[str, dict[str, float]]:
    """PSNR before, after and the change, per task."""
    return {
        task: {
            "before": before["per_task"][task]["psnr"],
            "after": numbers["psnr"],
            "change": numbers["psnr"] - before["per_task"][task]["psnr"],
        }
        for task, numbers in after["per_task"].items()
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the recipe (``argv`` as on the command line); returns the metrics it wrote."""
    from loraxir import LoraIRConfig

    config = parse_recipe_args(AddDegradationConfig, script_description(__doc__), argv)
    hint = (
        "point it at an adapter folder, such as the adapter/ that recipes/finetune.py writes "
        "in its output_dir (or name a shipped adapter or a Hub repo id)."
    )
    path = Path(config.adapter).expanduser()
    if not path.exists() and (len(path.parts) > 2 or config.adapter.startswith((".", "~"))):
        raise ConfigError(f"adapter={config.adapter!r} does not exist; {hint}")  # not a name
    folder = find_adapter(config.adapter)
    adapter_config = folder / "adapter_config.json"
    if not adapter_config.is_file():
        raise ConfigError(f"adapter={config.adapter!r} holds no adapter_config.json; {hint}")
    prepare_output_dir(config, ("adapter",), {"adapter": folder})
    saved = LoraIRConfig.from_file(adapter_config)
    old_classes = saved.degradations
    if config.paired_train is not None:
        old_tasks = paired_old_classes(config, old_classes)
        data = build_data(config)
    else:
        suite, old_tasks = grown_suite(config, old_classes)
        replay = dict.fromkeys(old_tasks, config.replay_repeats)
        data = build_data(config, suite, [t.name for t in suite.tasks], replay)
    run = start_run(
        config,
        data,
        "add_degradation",
        lambda: build_model(config, data, folder),
        param_groups=_param_groups,
        find_unused_parameters=True,
    )
    module, unwrapped = run.model, run.unwrapped
    lora_model = unwrapped.model
    class_index = torch.tensor([lora_model.degradations.index(n) for n in data.class_names])

    def restore(batch: dict[str, Any]) -> torch.Tensor:
        # lora_model is inside the prepared module, whose autocast it would not get: the
        # metrics are measured in the precision training runs in, as finetune.py's are.
        lora_model.eval()
        with run.accelerator.autocast():
            restored = lora_model(batch["lq"], **routing_arguments(config.route_by, batch, data))
        return restored.float()

    def compute_loss(batch: dict[str, Any]) -> torch.Tensor:
        restored, logits = module(batch["lq"], **routing_arguments("label", batch, data))
        loss = pixel_loss(restored, batch["gt"], config.loss, config.fft_weight)
        if logits is not None:
            targets = class_index.to(logits.device)[batch["label"]]
            loss = loss + config.router_loss_weight * F.cross_entropy(logits.float(), targets)
        return loss

    before = run.validate(restore, 0, "before")
    run.resume()
    run.accelerator.print(
        f"Adding {config.new_degradation!r} to {old_classes}: training "
        f"{run.trainable_parameters:,} parameters on {len(data.train)} patches (new tasks and "
        f"a replay of {old_tasks}), {run.accelerator.num_processes} process(es)."
    )
    run.fit(compute_loss, restore, "add_degradation")
    after = run.validate(restore, run.state.step)
    metrics = run.record(
        before=before,
        after=after,
        per_task=per_task_change(before, after),
        old_tasks=old_tasks,
        train_patches=dict(Counter(data.task_names[t] for t in data.train.task_labels)),
        new_degradation=config.new_degradation,
        experts=lora_model.degradations,
    )
    # The grown adapter keeps the policy it came with: 'new_experts' is how this run
    # trains, and saved it would let a later finetune.py train the new class only.
    lora_model.config.trainable = saved.trainable
    run.finish(
        metrics,
        lambda: save_adapter(lora_model, Path(config.output_dir) / "adapter", folder, after),
        format_table(before, f"before (new expert at zero), routed by {config.route_by}")
        + "\n"
        + format_table(after, f"after {run.state.step} steps"),
    )
    return metrics


if __name__ == "__main__":
    run_script(lambda: main(sys.argv[1:]))
