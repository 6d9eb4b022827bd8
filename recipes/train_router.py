"""Train a degradation router (DG-Router) on whole photos of any size; test it on unseen ones.

    python recipes/train_router.py --config recipes/configs/train_router.yaml
    python recipes/train_router.py --config recipes/configs/train_router.yaml --set suite=three_task
    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        recipes/train_router.py --cpu --config recipes/configs/train_router.yaml

What it trains on (:class:`loraxir.router.data.RouterExamples`): photos, whole or cropped,
from ``min_side`` to ``max_side`` pixels and aspect ratios up to ``max_aspect``, degraded
at that size with the suite's tasks whose explicit parameters are widened by
``train_widen`` (:mod:`loraxir.degradations.widen`), plus an undegraded ``clean`` class
when ``clean_class`` is set.

How it is measured: the photos are split into ``folds`` groups; each fold trains a router
on the other groups' photos and tests it on its own, so every number is on photos the
router never saw. Per fold, whole test photos resized to each of ``eval_sizes`` (``0`` =
full size) are degraded with the suite's parameters (``suite``), with parameters outside
the training ranges up to ``test_widen`` beyond the suite's (``outside``), left clean,
and degraded by two things at once (``mixtures``). ``metrics.json`` holds accuracy per
class and size for each regime, calibration (accuracy per confidence bin), the unsure
rate, and the mean soft gates of the mixtures; ``router_evaluation.png`` draws them.

Objectives: ``classification`` (the paper's cross-entropy on a linear head) or
``contrastive`` (the head scores CLIP text prototypes of class prompts; classes in
``zero_shot_holdout`` are left out of training and added by name at the end).

Writes to ``output_dir``: ``router/`` (fold 0's router, ``DegradationRouter.from_pretrained``;
its test photos are listed in ``metrics.json``), ``folds/fold-<k>/`` (each fold's router
and checkpoints), ``metrics.json``, ``router_evaluation.png``, ``confusion_matrix.png``,
``router_choices.png``, tensorboard ``logs/`` and ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraxir.data.patches import seeded_generator
from loraxir.data.sources import open_source
from loraxir.degradations import Suite, compose
from loraxir.degradations import suite as load_suite
from loraxir.degradations.widen import widen
from loraxir.errors import ConfigError, unknown_name
from loraxir.router import DegradationRouter, RouterConfig
from loraxir.router.data import (
    Degrade,
    RouterExamples,
    Sizing,
    keep_clean,
    pipeline_degrade,
    resize_image,
)
from loraxir.router.encoders import register_open_clip_config
from loraxir.router.evaluation import (
    Predictions,
    accuracy_report,
    calibration,
    mean_gates,
    plot_evaluation,
)
from loraxir.router.views import multi_view
from loraxir.training import (
    RecipeConfig,
    confusion_matrix,
    fit,
    make_loader,
    make_optimizer_and_scheduler,
    parse_recipe_args,
    prepare_output_dir,
    resume,
    save_confusion_matrix,
    setup_accelerator,
    start_recording,
    write_json,
)
from loraxir.training.checkpoints import check_resumable
from loraxir.training.entry import run_script, script_description
from loraxir.validation import check_choice, check_int

OBJECTIVES = ("classification", "contrastive")
ROUTE_BY = ("label", "task")
CLEAN = "clean"
_REGIMES = ("suite", "outside", CLEAN)  # the evaluation's; mixtures must not take them


@dataclass
class TrainRouterConfig(RecipeConfig):
    """Settings of ``train_router.py`` (on top of :class:`loraxir.training.RecipeConfig`)."""

    output_dir: str = field(
        default="outputs/train_router", metadata={"help": "Results.", "run": True}
    )
    suite: str = field(default="five_task", metadata={"help": "Task suite name or YAML path."})
    source: str = field(
        default="skimage",
        metadata={"help": "Clean photos: 'skimage', a folder, or 'hf:<dataset>[@split]'."},
    )
    image_column: str = field(default="image", metadata={"help": "Image column (hf: source)."})
    folds: int = field(
        default=3, metadata={"help": "Photo folds: each fold's photos are held out once."}
    )
    run_folds: int | None = field(
        default=None, metadata={"help": "Train and test only the first N folds (None: all)."}
    )
    final_fit: bool = field(
        default=False,
        metadata={
            "help": "After the folds are tested, train one more router on every photo and save "
            "it as output_dir/router (the folds still give the held-out report)."
        },
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the photo folds."})
    train_images: int | None = field(
        default=None,
        metadata={"help": "Degraded images per fold (None: max_steps·batch_size / crops)."},
    )
    crops: int = field(
        default=4, metadata={"help": "Readings per degraded image: whole + crops-1 windows."}
    )
    min_side: int = field(default=64, metadata={"help": "Smallest training image side."})
    max_side: int = field(default=1024, metadata={"help": "Largest training image side."})
    max_aspect: float = field(default=2.0, metadata={"help": "Largest aspect ratio trained."})
    whole_fraction: float = field(
        default=0.3, metadata={"help": "Share of examples that are whole photos (else crops)."}
    )
    augment: bool = field(
        default=False,
        metadata={
            "help": "Re-shoot clean photos before degrading them: rotation, mirroring, "
            "exposure and tone jitter, night and pale scenes, some grayscale "
            "(loraxir.router.data.augment_photo)."
        },
    )
    train_widen: float = field(
        default=0.25,
        metadata={"help": "Widen the suite's explicit parameter ranges by this for training."},
    )
    test_widen: float = field(
        default=0.5,
        metadata={"help": "'outside' test: parameters beyond train_widen, up to this."},
    )
    clean_class: bool = field(
        default=False, metadata={"help": "Add a 'clean' class (undegraded photos)."}
    )
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
    router: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "RouterConfig settings (views, grid, hidden_dim, embed_dim, top_k, "
            "temperature, prompts, unsure_below); --set router=... replaces the whole mapping."
        },
    )
    objective: str = field(
        default="classification", metadata={"help": "'classification' or 'contrastive'."}
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
    eval_sizes: list[int] = field(
        default_factory=lambda: [64, 256, 512, 0],
        metadata={"help": "Test image sides (whole photo resized to N×N); 0: full size."},
    )
    eval_repeats: int = field(
        default=3, metadata={"help": "Test images per (photo, class, size) and regime."}
    )
    mixtures: dict[str, list[Any]] = field(
        default_factory=dict,
        metadata={"help": "Two-degradation tests: name → steps (compose() format)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("route_by", self.route_by, ROUTE_BY)
        check_choice("objective", self.objective, OBJECTIVES)
        if self.zero_shot_holdout and self.objective != "contrastive":
            raise ConfigError(
                "zero_shot_holdout needs objective='contrastive': only text prototypes can "
                "name a class that training never saw."
            )
        if self.folds < 2:
            raise ConfigError(
                f"folds must be >= 2 (one held out, the rest trained), got {self.folds}."
            )
        if self.run_folds is not None:
            check_int("run_folds", self.run_folds, 1)
        if self.train_images is not None:
            check_int("train_images", self.train_images, 1)
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}.")
        if self.encoder_learning_rate is not None and not self.encoder_learning_rate > 0:
            raise ConfigError(
                f"encoder_learning_rate must be > 0 (or null: learning_rate), got "
                f"{self.encoder_learning_rate}."
            )
        self.sizing()  # the photo sizes are checked now, not after --overwrite cleared
        check_int("eval_repeats", self.eval_repeats, 1)
        check_int("crops", self.crops, 1)
        if not self.eval_sizes:
            raise ConfigError(
                "eval_sizes must name at least one size (0 for full size): the held-out "
                "accuracy is measured at those sizes."
            )
        if not 0 <= self.train_widen < self.test_widen:
            raise ConfigError(
                f"Need 0 <= train_widen < test_widen (the 'outside' test draws between the "
                f"two), got {self.train_widen} and "
                f"{self.test_widen}."
            )
        allowed = {f.name for f in dataclasses.fields(RouterConfig)} - {"degradations"}
        if "degradations" in self.router:
            raise ConfigError(
                "router setting 'degradations' is not allowed: the suite gives the classes."
            )
        unknown = sorted(set(self.router) - allowed)
        if unknown:
            raise unknown_name("router setting", unknown[0], allowed)
        top_k = self.router.get("top_k", 1)
        placeholders = top_k if isinstance(top_k, int) and not isinstance(top_k, bool) else 1
        # Check the router settings now, on stand-in classes, not after minutes of data work.
        stand_ins = [f"class_{i}" for i in range(max(2, placeholders))]
        RouterConfig(degradations=stand_ins, **self.router)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.eval_sizes):
            raise ConfigError(
                f"eval_sizes must be image sides in pixels (>= 1), or 0 for full size; got "
                f"{self.eval_sizes}."
            )
        for name, steps in self.mixtures.items():
            compose(steps)  # fail now, with the step named, rather than after training
            if not isinstance(name, str):
                raise ConfigError(f"mixture names must be strings, got {name!r}.")
            if name in _REGIMES:  # its rows would be scored as that regime's
                raise ConfigError(
                    f"mixture name {name!r} is an evaluation regime's ({', '.join(_REGIMES)}); "
                    "rename the mixture, e.g. 'noise+jpeg'."
                )

    def sizing(self) -> Sizing:
        """How training images are cut from the photos."""
        return Sizing(self.min_side, self.max_side, self.max_aspect, self.whole_fraction)


@dataclass
class RouterData:
    """Photos, classes and degradations of a run, and the photo folds."""

    suite: Suite
    classes: list[str]
    """Every class the router ends up with (training classes, then zero-shot ones)."""
    trained: list[str]
    photo_ids: list[str]
    photos: list[torch.Tensor]
    folds: list[list[int]]
    """Photo indices held out by each fold."""
    tasks: dict[str, list[Any]]
    """Class → the suite tasks (their pipelines) of that class."""


class _LogitsModule(nn.Module):
    """What the optimizer trains: views → router class logits (through DDP's forward)."""

    def __init__(self, router: DegradationRouter) -> None:
        super().__init__()
        self.router = router

    def forward(self, views: torch.Tensor, cepstrum: torch.Tensor | None = None) -> torch.Tensor:
        return self.router.route_views(views, cepstrum).logits


def build_router(config: TrainRouterConfig, classes: Sequence[str]) -> DegradationRouter:
    """The router to train, on ``classes`` (the trained classes, before zero-shot ones)."""
    if config.open_clip_model_cfg is not None:
        register_open_clip_config(config.encoder, config.open_clip_model_cfg)
    settings = {
        "head": "text" if config.objective == "contrastive" else "linear",
        **config.router,
    }
    settings["top_k"] = min(settings.get("top_k", 1), len(classes))
    return DegradationRouter.from_encoder(
        config.encoder,
        classes,
        pretrained=config.pretrained,
        image_size=config.image_size,
        trainable_encoder=config.train_encoder,
        **settings,
    )


def build_data(config: TrainRouterConfig) -> RouterData:
    """Photos (as float RGB), classes, the tasks of each class, and the photo folds."""
    suite = load_suite(config.suite)
    key = "label" if config.route_by == "label" else "name"
    tasks: dict[str, list[Any]] = {}
    for task in suite.tasks:
        tasks.setdefault(getattr(task, key), []).append(task.pipeline)
    names = list(tasks) + ([CLEAN] if config.clean_class else [])
    unknown = sorted(set(config.zero_shot_holdout) - set(names))
    if unknown:
        raise ConfigError(f"zero_shot_holdout {unknown} are not classes of {suite.name}: {names}.")
    trained = [name for name in names if name not in config.zero_shot_holdout]
    if not trained:
        raise ConfigError("zero_shot_holdout leaves no class to train on.")
    if len(trained) < 2:
        raise ConfigError(
            f"A router learns to tell classes apart, but it would train on {trained} only "
            f"(suite {suite.name!r}); use a suite of two classes or more, or clean_class: true."
        )
    source = open_source(config.source, config.image_column)
    if len(source) < config.folds:
        raise ConfigError(
            f"{len(source)} photos cannot make {config.folds} folds; lower folds or add photos."
        )
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(config.split_seed))
    folds = [sorted(order[k :: config.folds].tolist()) for k in range(config.folds)]
    photos = [source.load(i).float() / 255 for i in range(len(source))]
    return RouterData(
        suite,
        trained + list(config.zero_shot_holdout),
        trained,
        list(source.ids),
        photos,
        folds,
        tasks,
    )


def class_degrades(data: RouterData, name: str, margin: float) -> list[Degrade]:
    """How to make an example of class ``name``: its tasks widened by ``margin``."""
    if name == CLEAN:
        return [keep_clean]
    return [pipeline_degrade(widen(pipeline, margin)) for pipeline in data.tasks[name]]


def train_fold(
    accelerator: Any, config: TrainRouterConfig, data: RouterData, fold: int
) -> DegradationRouter:
    """Train one router on every photo outside fold ``fold`` (on every photo when ``fold``
    is ``len(data.folds)``, the final fit); returns it unwrapped."""
    fold_config = dataclasses.replace(config, output_dir=str(_fold_dir(config, fold)))
    held_out = data.folds[fold] if fold < len(data.folds) else []
    train_photos = [p for i, p in enumerate(data.photos) if i not in held_out]
    examples_per_image = config.crops
    images = config.train_images or -(-config.max_steps * config.batch_size // examples_per_image)
    router = build_router(config, data.trained)
    dataset = RouterExamples(
        train_photos,
        [class_degrades(data, name, config.train_widen) for name in data.trained],
        length=images,
        size=router.encoder.image_size,
        grid=router.grid,
        views=router.views,
        cepstrum=router.cepstrum,
        crops=config.crops,
        sizing=config.sizing(),
        seed=config.seed * 1000 + fold,
        augment=config.augment,
    )
    model = _LogitsModule(router)
    encoder_lr = config.encoder_learning_rate or config.learning_rate
    optimizer, scheduler = make_optimizer_and_scheduler(
        [
            {"params": [*router.mlp.parameters(), *router.head.parameters()]},
            {"params": list(router.encoder.parameters()), "lr": encoder_lr},
        ],
        config,
    )
    loader = make_loader(dataset, config, shuffle=True, batch_size=_images_per_batch(config))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    state = resume(accelerator, fold_config)
    accelerator.print(
        f"{_fold_label(config, fold)}: training on {len(train_photos)} photos, "
        f"classes {data.trained}, {len(dataset)} degraded images × {config.crops} readings."
    )

    def compute_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        views = batch["views"].flatten(0, 1)
        cepstrum = batch["cepstrum"].flatten(0, 1) if "cepstrum" in batch else None
        labels = batch["label"].repeat_interleave(config.crops)
        logits = model(views, cepstrum)
        return F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)

    fit(
        accelerator,
        fold_config,
        state,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        compute_loss=compute_loss,
        desc=f"train_router {_fold_label(config, fold)}",
    )
    trained = accelerator.unwrap_model(model).router
    accelerator.free_memory()
    prompts = config.router.get("prompts") or {}
    for name in config.zero_shot_holdout:
        trained.add_degradation(name, prompts.get(name))
    return trained.eval()


def test_images(
    config: TrainRouterConfig, data: RouterData, fold: int
) -> list[tuple[torch.Tensor, int, str, str]]:
    """``(image, label, size, regime)`` of every test image of fold ``fold``.

    Regimes: ``suite`` (the suite's own parameters), ``outside`` (each explicit parameter
    beyond the training ranges, up to ``test_widen`` outside the suite's), ``clean`` (no
    degradation; label ``-1`` without a clean class) and one per mixture (label ``-1``).
    """
    items = []
    for photo_index in data.folds[fold]:
        photo = data.photos[photo_index]
        for size in config.eval_sizes:
            image = photo if size == 0 else resize_image(photo, size, size)
            name = "full" if size == 0 else f"{size}"
            for repeat in range(config.eval_repeats):
                generator = seeded_generator(config.seed + 7, fold, photo_index, size, repeat)
                for label, cls in enumerate(data.classes):
                    if cls == CLEAN:
                        continue
                    for regime, margin, inside in (
                        ("suite", 0.0, 0.0),
                        ("outside", config.test_widen, config.train_widen),
                    ):
                        pipelines = data.tasks[cls]
                        pipeline = pipelines[repeat % len(pipelines)]
                        if margin:
                            pipeline = widen(pipeline, margin, inside, generator)
                        degraded = pipeline(image[None], generator)[0][0]
                        items.append((degraded, label, name, regime))
                clean_label = data.classes.index(CLEAN) if CLEAN in data.classes else -1
                items.append((keep_clean(image, generator), clean_label, name, "clean"))
                for mixture, steps in config.mixtures.items():
                    degraded = compose(steps)(image[None], generator)[0][0]
                    items.append((degraded, -1, name, mixture))
    return items


@torch.no_grad()
def predict(
    router: DegradationRouter, items: Sequence[tuple[torch.Tensor, int, str, str]]
) -> Predictions:
    """Route every test image (one at a time: their sizes differ)."""
    predictions = Predictions()
    for start in range(0, len(items), 32):
        chunk = items[start : start + 32]
        views = torch.stack(
            [
                multi_view(image[None], router.encoder.image_size, router.grid, router.views)[0]
                for image, *_ in chunk
            ]
        )
        cepstrum = None
        if router.cepstrum:
            cepstrum = torch.cat([router.read_cepstrum(image[None]) for image, *_ in chunk])
        probabilities = router.route_views(views, cepstrum).probabilities
        predictions.add(probabilities, *zip(*[rest for _, *rest in chunk], strict=True))
    return predictions


def score(predictions: Predictions, config: TrainRouterConfig, data: RouterData) -> dict[str, Any]:
    """The metrics of ``metrics.json`` from pooled test predictions of every fold run."""
    classes = data.classes
    sizes = ["full" if s == 0 else f"{s}" for s in config.eval_sizes]
    whole: dict[str, Any] = {}
    for regime in ("suite", "outside") + ((CLEAN,) if CLEAN in classes else ()):
        probabilities, labels = predictions.select(regime)
        whole[regime] = {
            **accuracy_report(probabilities, labels, classes),
            "per_size": {
                size: accuracy_report(*predictions.select(regime, size), classes) for size in sizes
            },
        }
    labelled = [predictions.select(r) for r in whole]
    probabilities = torch.cat([p for p, _ in labelled])
    labels = torch.cat([truth for _, truth in labelled])
    unsure_below = config.router.get("unsure_below", RouterConfig.unsure_below)
    clean_probs, _ = predictions.select(CLEAN)
    metrics: dict[str, Any] = {
        "classes": classes,
        "whole_image": whole,
        "calibration": calibration(probabilities, labels),
        "unsure_below": unsure_below,
        "unsure_rate": {
            regime: _unsure_rate(predictions.select(regime)[0], unsure_below) for regime in _REGIMES
        },
        "confusion_matrix": confusion_matrix(
            probabilities.argmax(1), labels, len(classes)
        ).tolist(),
    }
    if CLEAN not in classes:
        picks = clean_probs.argmax(1)
        metrics["clean_photos"] = {
            "routed_to": {c: (picks == i).float().mean().item() for i, c in enumerate(classes)},
            "mean_top_probability": clean_probs.max(1).values.mean().item(),
        }
    metrics["mixtures"] = {
        name: {
            "steps": [s if isinstance(s, str) else dict(s) for s in config.mixtures[name]],
            "mean_gates": mean_gates(predictions.select(name)[0], classes),
        }
        for name in config.mixtures
    }
    if config.zero_shot_holdout:
        unseen = torch.isin(
            labels, torch.tensor([classes.index(n) for n in config.zero_shot_holdout])
        )
        correct = probabilities.argmax(1) == labels
        metrics["zero_shot_accuracy"] = correct[unseen].float().mean().item()
        metrics["seen_accuracy"] = correct[~unseen].float().mean().item()
    return metrics


def save_router_choices(router: DegradationRouter, items: Sequence[Any], path: Path) -> None:
    """A figure of the router's probabilities and choices on one full-size test image per
    class, as the test read them: the classes' images of the first full-size shape (one
    photo's draws), never resampled (that would change noise grain and streak widths)."""
    first: dict[int, torch.Tensor] = {}
    shape = None
    for image, label, size, regime in items:
        if regime == "suite" and size == "full":
            shape = shape or image.shape
            if image.shape == shape:
                first.setdefault(label, image)
    if not first:
        return
    shown = sorted(first)
    batch = torch.stack([first[i] for i in shown])
    router.explain(batch).plot(path, labels=[router.degradations[i] for i in shown])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = parse_recipe_args(TrainRouterConfig, script_description(__doc__), argv)
    prepare_output_dir(config, ("router", "folds"))
    output_dir = Path(config.output_dir)
    run_folds = min(config.run_folds or config.folds, config.folds)  # None: every fold
    if config.resume not in (None, "latest") and (run_folds > 1 or config.final_fit):
        raise ConfigError(
            "A checkpoint path resumes one training; with several folds or a final fit use "
            "resume=latest (each training continues from its own latest checkpoint)."
        )
    data = build_data(config)
    accelerator = setup_accelerator(config)
    _check_router_settings(config, data.trained)
    for fold in range(run_folds):  # a refused resume must not rewrite config.yaml
        check_resumable(dataclasses.replace(config, output_dir=str(_fold_dir(config, fold))))
    start_recording(accelerator, config, "train_router")
    if config.overwrite and config.resume is None and accelerator.is_main_process:
        shutil.rmtree(output_dir / "folds", ignore_errors=True)
        # Written only when a full-size image was tested: an earlier run's must not stay.
        (output_dir / "router_choices.png").unlink(missing_ok=True)
    accelerator.wait_for_everyone()

    predictions, per_fold, routers = Predictions(), [], []
    for fold in range(run_folds):
        router = train_fold(accelerator, config, data, fold)
        routers.append(router)
        if accelerator.is_main_process:
            items = test_images(config, data, fold)
            fold_predictions = predict(router, items)
            predictions.extend(fold_predictions)
            suite_probs, suite_labels = fold_predictions.select("suite")
            per_fold.append(
                {
                    "test_photos": [data.photo_ids[i] for i in data.folds[fold]],
                    "suite_accuracy": accuracy_report(suite_probs, suite_labels, data.classes)[
                        "accuracy"
                    ],
                }
            )
            router.save_pretrained(_fold_dir(config, fold) / "router")
            if fold == 0:
                save_router_choices(router, items, output_dir / "router_choices.png")
        accelerator.wait_for_everyone()

    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        metrics = score(predictions, config, data)
        metrics.update(
            suite=data.suite.name,
            folds=config.folds,
            folds_run=run_folds,
            per_fold=per_fold,
            steps=config.max_steps,
            num_processes=accelerator.num_processes,
            photos=data.photo_ids,
            saved_router="final fit on every photo" if config.final_fit else "fold 0",
        )
    if config.final_fit:
        routers[0] = train_fold(accelerator, config, data, len(data.folds))
    if accelerator.is_main_process:
        if config.final_fit:
            routers[0].save_pretrained(_fold_dir(config, len(data.folds)) / "router")
        routers[0].save_pretrained(output_dir / "router")
        write_json(output_dir / "metrics.json", metrics)
        plot_evaluation(metrics, output_dir / "router_evaluation.png")
        save_confusion_matrix(
            torch.tensor(metrics["confusion_matrix"]),
            data.classes,
            output_dir / "confusion_matrix.png",
            f"{data.suite.name}: held-out whole images, every regime pooled "
            f"({_pooled_accuracy(metrics['confusion_matrix']):.1%} right)",
        )
        print(_summary(metrics))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _pooled_accuracy(matrix: list[list[int]]) -> float:
    """The share of the confusion matrix on its diagonal (the images it counts)."""
    counts = torch.tensor(matrix, dtype=torch.float64)
    return float(counts.diagonal().sum() / counts.sum().clamp(min=1))


def _unsure_rate(probabilities: torch.Tensor, threshold: float) -> float | None:
    if not len(probabilities):
        return None
    return (probabilities.max(dim=1).values < threshold).float().mean().item()


def _fold_dir(config: TrainRouterConfig, fold: int) -> Path:
    name = "final" if fold == config.folds else f"fold-{fold}"
    return Path(config.output_dir) / "folds" / name


def _fold_label(config: TrainRouterConfig, fold: int) -> str:
    return "final fit" if fold == config.folds else f"fold {fold + 1}/{config.folds}"


def _check_router_settings(config: TrainRouterConfig, classes: Sequence[str]) -> None:
    """Build the router once (random weights, the global RNG left as it was) and check the
    batch, so that a setting they refuse (encoder, image size, head) is refused before
    ``--overwrite`` clears the earlier run, not when the first fold starts."""
    _images_per_batch(config)
    with torch.random.fork_rng(devices=[]):
        build_router(dataclasses.replace(config, pretrained=None), classes)


def _images_per_batch(config: TrainRouterConfig) -> int:
    if config.batch_size % config.crops:
        raise ConfigError(
            f"batch_size={config.batch_size} must be a multiple of crops={config.crops} "
            "(a batch holds whole degraded images, each read crops ways)."
        )
    return config.batch_size // config.crops


def _summary(metrics: dict[str, Any]) -> str:
    lines = []
    for regime, table in metrics["whole_image"].items():
        sizes = ", ".join(
            f"{size} {row['accuracy']:.1%}"
            for size, row in table["per_size"].items()
            if row["items"]
        )
        lines.append(
            f"held-out {regime:<8} {table['accuracy']:.2%} ({table['items']} images): {sizes}"
        )
        lines += [
            f"    {name:<12} {acc:.2%}"
            for name, acc in table["per_class"].items()
            if acc is not None
        ]
    lines.append(
        f"calibration ECE {metrics['calibration']['ece']:.3f}; unsure {metrics['unsure_rate']}"
    )
    for name, row in metrics["mixtures"].items():
        gates = ", ".join(f"{c} {g:.2f}" for c, g in row["mean_gates"].items())
        lines.append(f"mixture {name}: {gates}")
    if "zero_shot_accuracy" in metrics:
        lines.append(f"zero-shot (unseen classes) {metrics['zero_shot_accuracy']:.2%}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_script(lambda: main(sys.argv[1:]))
