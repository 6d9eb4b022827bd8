"""Train a degradation router (DG-Router) on a task suite, then measure it on held-out images.

    python recipes/train_router.py --config recipes/configs/train_router.yaml
    python recipes/train_router.py --config recipes/configs/train_router.yaml --set suite=three_task
    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        recipes/train_router.py --cpu --config recipes/configs/train_router.yaml

Objectives:

* ``classification`` — the paper's: cross-entropy of a linear head on the class labels.
* ``contrastive`` — the image embedding is pulled towards the CLIP text embedding of its
  class prompt ("a photo degraded by rain streaks") and away from the other prompts
  (cross-entropy over scaled cosine similarities, as in CLIP). The class prototypes come
  from text, so classes listed in ``zero_shot_holdout`` are left out of training and added
  by name at the end: their accuracy is the router's zero-shot accuracy.

Writes to ``output_dir``: ``router/`` (``DegradationRouter.from_pretrained``),
``metrics.json``, ``confusion_matrix.png``, ``router_choices.png``, tensorboard ``logs/``
and ``checkpoints/``. The encoder of the default config is the tiny CNN, trained with the
router: no pretrained CLIP weights can be downloaded here (see ``docs/routing.md`` for
using real ones).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraxir.data.synthetic import SyntheticPairs
from loraxir.degradations import Suite
from loraxir.degradations import suite as load_suite
from loraxir.encoders import register_open_clip_config
from loraxir.errors import ConfigError
from loraxir.router import DegradationRouter
from loraxir.training import (
    RecipeConfig,
    confusion_matrix,
    make_loader,
    make_optimizer_and_scheduler,
    maybe_checkpoint,
    parse_recipe_args,
    progress_bar,
    resume,
    save_confusion_matrix,
    setup_accelerator,
    train_batches,
    write_json,
)

OBJECTIVES = ("classification", "contrastive")
ROUTE_BY = ("label", "task")


@dataclass
class TrainRouterConfig(RecipeConfig):
    """Settings of ``train_router.py`` (on top of :class:`loraxir.training.RecipeConfig`)."""

    output_dir: str = field(default="outputs/train_router", metadata={"help": "Results."})
    suite: str = field(default="five_task", metadata={"help": "Task suite name or YAML path."})
    source: str = field(
        default="skimage", metadata={"help": "Clean images: 'skimage' or a folder."}
    )
    patch_size: int = field(default=128, metadata={"help": "Side of the training patches."})
    train_repeats: int = field(default=8, metadata={"help": "Patches per (image, task) per epoch."})
    test_repeats: int = field(default=20, metadata={"help": "Test patches per (image, task)."})
    test_fraction: float = field(default=0.2, metadata={"help": "Share of images held out."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/test image split."})
    encoder: str = field(
        default="cnn-tiny", metadata={"help": "'cnn-tiny', an open_clip name or a folder."}
    )
    open_clip_model_cfg: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "An open_clip architecture (config dict) registered as `encoder`."},
    )
    pretrained: str | None = field(
        default=None, metadata={"help": "open_clip tag or local weights file."}
    )
    image_size: int | None = field(default=None, metadata={"help": "Encoder input size."})
    train_encoder: bool | None = field(
        default=None, metadata={"help": "Unfreeze the encoder (default: only cnn-tiny)."}
    )
    encoder_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the encoder (default: learning_rate)."}
    )
    grid: int = field(default=2, metadata={"help": "Local tiles per side; 0: global view only."})
    hidden_dim: int = field(default=512, metadata={"help": "MLP hidden size."})
    embed_dim: int = field(default=384, metadata={"help": "Size of e_deg."})
    top_k: int = field(default=1, metadata={"help": "Experts per image of the saved router."})
    temperature: float = field(default=1.0, metadata={"help": "Gate softmax temperature."})
    objective: str = field(
        default="classification", metadata={"help": "'classification' or 'contrastive'."}
    )
    prompts: dict[str, str] = field(
        default_factory=dict, metadata={"help": "Text prompt per class (contrastive)."}
    )
    zero_shot_holdout: list[str] = field(
        default_factory=list,
        metadata={"help": "Contrastive: classes left out of training, added by name after."},
    )
    route_by: str = field(
        default="label",
        metadata={
            "help": "'label': a class per degradation (noise σ15/25/50 share one); "
            "'task': a class per task of the suite (σ levels apart)."
        },
    )
    label_smoothing: float = field(default=0.0, metadata={"help": "Cross-entropy smoothing."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.route_by not in ROUTE_BY:
            raise ConfigError(f"route_by must be one of {ROUTE_BY}, got {self.route_by!r}.")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}.")
        if self.zero_shot_holdout and self.objective != "contrastive":
            raise ConfigError(
                "zero_shot_holdout needs objective='contrastive': only text prototypes can "
                "name a class that training never saw."
            )


class _LogitsModule(nn.Module):
    """What the optimizer trains: images → router class logits (through DDP's forward)."""

    def __init__(self, router: DegradationRouter) -> None:
        super().__init__()
        self.router = router

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.router.logits(images)


def build_router(config: TrainRouterConfig, classes: Sequence[str]) -> DegradationRouter:
    """The router to train, on ``classes`` (the suite's labels minus any held out)."""
    if config.open_clip_model_cfg is not None:
        register_open_clip_config(config.encoder, config.open_clip_model_cfg)
    return DegradationRouter.from_encoder(
        config.encoder,
        classes,
        pretrained=config.pretrained,
        image_size=config.image_size,
        trainable_encoder=config.train_encoder,
        grid=config.grid,
        hidden_dim=config.hidden_dim,
        embed_dim=config.embed_dim,
        head="text" if config.objective == "contrastive" else "linear",
        prompts=config.prompts or None,
        top_k=min(config.top_k, len(classes)),
        temperature=config.temperature,
    )


def suite_classes(suite: Suite, route_by: str) -> list[str]:
    """The suite's class names in the dataset's index order: labels or task names."""
    return suite.labels if route_by == "label" else suite.task_names


def build_data(config: TrainRouterConfig) -> tuple[SyntheticPairs, SyntheticPairs, list[str]]:
    """Train and test sets (split by image) and the classes trained on."""
    suite = load_suite(config.suite)
    names = suite_classes(suite, config.route_by)
    unknown = sorted(set(config.zero_shot_holdout) - set(names))
    if unknown:
        raise ConfigError(f"zero_shot_holdout {unknown} are not classes of {suite.name}: {names}.")
    trained = [name for name in names if name not in config.zero_shot_holdout]
    if not trained:
        raise ConfigError("zero_shot_holdout leaves no class to train on.")
    key = "label" if config.route_by == "label" else "name"
    tasks = [task.name for task in suite.tasks if getattr(task, key) in trained]
    common = {"test_fraction": config.test_fraction, "split_seed": config.split_seed}
    train = SyntheticPairs(
        config.source,
        suite,
        config.patch_size,
        tasks=tasks,
        split="train",
        seed=config.seed,
        repeats=config.train_repeats,
        **common,
    )
    test = SyntheticPairs(
        config.source,
        suite,
        config.patch_size,
        split="test",
        seed=config.seed + 1,
        repeats=config.test_repeats,
        **common,
    )
    return train, test, trained


def class_map(suite_names: Sequence[str], router_classes: Sequence[str]) -> torch.Tensor:
    """Suite class index → router class index (``-1`` for a class the router lacks)."""
    return torch.tensor(
        [list(router_classes).index(n) if n in router_classes else -1 for n in suite_names]
    )


@torch.no_grad()
def predict(accelerator: Any, router: DegradationRouter, loader: Any) -> dict[str, torch.Tensor]:
    """Predicted class, suite label and task of every test item, gathered from all processes."""
    router.eval()
    outputs: dict[str, list[torch.Tensor]] = {"pred": [], "label": [], "task": []}
    for batch in loader:
        with accelerator.autocast():
            pred = router.logits(batch["lq"]).argmax(dim=-1)
        gathered = accelerator.gather_for_metrics((pred, batch["label"], batch["task"]))
        for key, value in zip(outputs, gathered, strict=True):
            outputs[key].append(value.cpu())
    return {key: torch.cat(values) for key, values in outputs.items()}


def score(
    result: dict[str, torch.Tensor],
    suite: Suite,
    route_by: str,
    classes: Sequence[str],
    holdout: Sequence[str],
) -> dict[str, Any]:
    """Accuracy overall, per class, per task (e.g. per noise σ) and zero-shot."""
    truth = class_map(suite_classes(suite, route_by), classes)[result[route_by]]
    correct = result["pred"] == truth
    metrics: dict[str, Any] = {
        "accuracy": correct.float().mean().item(),
        "num_test_items": len(correct),
        "classes": list(classes),
        "per_class": {n: correct[truth == i].float().mean().item() for i, n in enumerate(classes)},
        "per_task": {
            name: correct[result["task"] == t].float().mean().item()
            for t, name in enumerate(suite.task_names)
            if (result["task"] == t).any()
        },
        "confusion_matrix": confusion_matrix(result["pred"], truth, len(classes)).tolist(),
    }
    if holdout:
        unseen = torch.isin(truth, torch.tensor([list(classes).index(n) for n in holdout]))
        metrics["zero_shot_accuracy"] = correct[unseen].float().mean().item()
        metrics["seen_accuracy"] = correct[~unseen].float().mean().item()
    return metrics


def save_router_choices(router: DegradationRouter, test: SyntheticPairs, path: Path) -> None:
    """A figure of the router's probabilities and choices on one test patch per task."""
    first = {}
    for index, task in enumerate(test.task_labels):
        first.setdefault(task, index)
    items = [test[i] for i in sorted(first.values())]
    explanation = router.explain(torch.stack([item["lq"] for item in items]))
    explanation.plot(path, labels=[item["task_name"] for item in items])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = parse_recipe_args(TrainRouterConfig, __doc__.splitlines()[0], argv)
    accelerator = setup_accelerator(config, "train_router")
    output_dir = Path(config.output_dir)

    train, test, classes = build_data(config)
    router = build_router(config, classes)
    model = _LogitsModule(router)
    encoder_lr = config.encoder_learning_rate or config.learning_rate
    optimizer, scheduler = make_optimizer_and_scheduler(
        [
            {"params": [*router.mlp.parameters(), *router.head.parameters()]},
            {"params": list(router.encoder.parameters()), "lr": encoder_lr},
        ],
        config,
    )
    train_loader = make_loader(train, config, shuffle=True)
    test_loader = make_loader(test, config, shuffle=False)
    model, optimizer, train_loader, test_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, test_loader, scheduler
    )
    targets = class_map(suite_classes(train.suite, config.route_by), classes)
    targets = targets.to(accelerator.device)
    state = resume(accelerator, config)
    start_step = state.step

    accelerator.print(
        f"Training a router on {len(classes)} classes {classes} of {train.suite.name}: "
        f"{len(train)} train / {len(test)} test patches, {accelerator.num_processes} process(es)."
    )
    bar = progress_bar(accelerator, config, state, "train_router")
    batches = train_batches(train_loader, state)
    model.train()
    while state.step < config.max_steps:
        batch = next(batches)
        with accelerator.accumulate(model):
            logits = model(batch["lq"])
            labels = targets[batch[config.route_by]]
            loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue
        state.step += 1
        bar.update(1)
        if state.step % config.log_every == 0 or state.step == config.max_steps:
            accuracy = (logits.argmax(-1) == labels).float().mean()
            logged = accelerator.reduce(torch.stack([loss.detach(), accuracy]), "mean")
            bar.set_postfix(loss=f"{logged[0]:.3f}", acc=f"{logged[1]:.2f}")
            accelerator.log(
                {
                    "train/loss": logged[0].item(),
                    "train/accuracy": logged[1].item(),
                    "train/lr": scheduler.get_last_lr()[0],
                },
                step=state.step,
            )
        maybe_checkpoint(accelerator, config, state)
    bar.close()

    router = accelerator.unwrap_model(model).router
    for name in config.zero_shot_holdout:
        router.add_degradation(name, config.prompts.get(name))
    result = predict(accelerator, router, test_loader)
    metrics = score(
        result, test.suite, config.route_by, router.degradations, config.zero_shot_holdout
    )
    metrics.update(
        steps=state.step,
        resumed_from_step=start_step,
        num_processes=accelerator.num_processes,
        suite=test.suite.name,
    )
    accelerator.log({"test/accuracy": metrics["accuracy"]}, step=state.step)
    if accelerator.is_main_process:
        router.save_pretrained(output_dir / "router")
        write_json(output_dir / "metrics.json", metrics)
        save_confusion_matrix(
            torch.tensor(metrics["confusion_matrix"]),
            router.degradations,
            output_dir / "confusion_matrix.png",
            f"{test.suite.name}: held-out accuracy {metrics['accuracy']:.1%}",
        )
        save_router_choices(router, test, output_dir / "router_choices.png")
        print(_summary(metrics))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _summary(metrics: dict[str, Any]) -> str:
    lines = [f"held-out accuracy {metrics['accuracy']:.2%} on {metrics['num_test_items']} patches"]
    lines += [f"  class {name:<12} {acc:.2%}" for name, acc in metrics["per_class"].items()]
    lines += [f"  task  {name:<12} {acc:.2%}" for name, acc in metrics["per_task"].items()]
    if "zero_shot_accuracy" in metrics:
        lines.append(f"  zero-shot (unseen classes) {metrics['zero_shot_accuracy']:.2%}")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
