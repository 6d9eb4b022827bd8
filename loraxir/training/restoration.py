"""What the restoration recipes (pre-training, fine-tuning, new degradations) share:
their data settings and datasets, the pixel loss, validation, and the backbone folder.

Data: synthetic pairs (a task suite applied to clean photos, split into train and
validation BY PHOTO so no validation photo is ever trained on), or real paired folders
(:class:`~loraxir.data.PairedFolder`, one per degradation class), or clean images from a
🤗 dataset (``source: "hf:<name or folder>[@split]"``). Datasets are built, and missing or
empty folders reported, before any model is built.

Base networks travel as backbone folders (``backbone.json`` + ``backbone.safetensors``,
written by :func:`loraxir.backbones.save_backbone`, read by
:func:`loraxir.backbones.load_backbone`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset

from loraxir.degradations import Suite
from loraxir.degradations import suite as load_suite
from loraxir.errors import ConfigError, DataError
from loraxir.padding import run_padded
from loraxir.training.checkpoints import FIGURES_DIR, TrainState, resume
from loraxir.training.config import RecipeConfig, run_setting
from loraxir.training.engine import (
    ExponentialMovingAverage,
    ema_applied,
    enable_activation_checkpointing,
    fit,
    make_loader,
    make_optimizer_and_scheduler,
    maybe_ema,
    setup_accelerator,
    start_recording,
)
from loraxir.training.evaluation import (
    evaluate_restoration,
    first_item_per_task,
    save_image_grid,
    scalars,
    write_json,
)
from loraxir.validation import check_choice, check_int

LOSSES = ("psnr", "l1", "l1_fft")
# Default weight of the spectral term of "l1_fft" (MIMO-UNet's).
FFT_WEIGHT = 0.1
Restore = Callable[[dict[str, Any]], Tensor]


@dataclass
class RestorationConfig(RecipeConfig):
    """Settings shared by the restoration recipes (on top of :class:`RecipeConfig`)."""

    suite: str = field(
        default="five_task", metadata={"help": "Task suite (name or YAML) of synthetic pairs."}
    )
    tasks: list[str] | None = field(
        default=None, metadata={"help": "Train and validate on these tasks of the suite only."}
    )
    val_tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Validate on these tasks of the suite instead (default: tasks): wider than "
            "tasks, validation shows what training some tasks does to the others."
        },
    )
    source: str = field(
        default="skimage",
        metadata={"help": "Clean images: 'skimage', a folder, or 'hf:<dataset>[@split]'."},
    )
    image_column: str = field(default="image", metadata={"help": "Image column (hf: source)."})
    paired_train: dict[str, str] | None = field(
        default=None,
        metadata={"help": "Real pairs instead of synthetic: {class name: folder} for training."},
    )
    paired_val: dict[str, str] | None = field(
        default=None, metadata={"help": "Real pairs for validation: {class name: folder}."}
    )
    patch_size: int = field(default=128, metadata={"help": "Side of the training patches."})
    val_patch_size: int | None = field(
        default=128, metadata={"help": "Side of validation patches; null: whole images."}
    )
    patch_context: int = field(
        default=32,
        metadata={
            "help": "Pixels around each synthetic patch degraded with it, then cut away, so "
            "that patches are crops of degraded photos (0: degrade the bare patch)."
        },
    )
    train_repeats: int = field(
        default=8,
        metadata={"help": "Patches per (image, task) per epoch; with paired_train, per pair."},
    )
    val_repeats: int = field(
        default=2,
        metadata={
            "help": "Validation patches per (image, task); with paired_val, per pair (a whole "
            "pair, val_patch_size null, is read once)."
        },
    )
    dead_leaves: int = field(
        default=0,
        metadata={
            "help": "Procedural dead-leaves images (256², drawn from the seed) added to the "
            "synthetic training pairs, one patch per image and task per epoch, never "
            "validated on: edges of every orientation and scale that a few photos lack "
            "(the shipped adapter's blur expert generalised with them); 0: photos only."
        },
    )
    test_fraction: float = field(default=0.2, metadata={"help": "Share of photos held out."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the train/val photo split."})
    loss: str = field(
        default="psnr",
        metadata={"help": "'psnr' (PSNR loss), 'l1', or 'l1_fft' (L1 plus L1 of the spectra)."},
    )
    fft_weight: float = field(
        default=FFT_WEIGHT,
        metadata={"help": "Weight of the spectral term of loss 'l1_fft' (MIMO-UNet's 0.1)."},
    )
    ema_decay: float = field(
        default=0.0, metadata={"help": "EMA of the trained weights (validated, saved); 0: off."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute block activations in backward."}
    )
    validate_every: int = run_setting(0, "Steps between validations; 0: only at the end.")
    val_batch_size: int | None = run_setting(
        None,
        "Global validation batch (default batch_size; whole images, which differ in size, "
        "go one per process).",
    )
    val_y_channel: bool = field(
        default=False, metadata={"help": "Validate on the Y channel (BT.601), as BasicSR."}
    )
    val_crop_border: int = field(default=0, metadata={"help": "Pixels cropped before metrics."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("loss", self.loss, LOSSES)
        if (self.paired_train is None) != (self.paired_val is None):
            raise ConfigError(
                "Give both paired_train and paired_val (real pairs need held-out pairs to "
                "validate on), or neither (synthetic pairs from `source`)."
            )
        if self.paired_train is not None and self.tasks is not None:
            raise ConfigError(
                "tasks picks tasks of a synthetic suite, but paired_train gives real pairs; "
                "list only the classes to train in paired_train / paired_val instead."
            )
        if self.paired_train is not None and self.val_tasks is not None:
            raise ConfigError(
                "val_tasks picks tasks of a synthetic suite, but paired_val gives real pairs; "
                "list the classes to validate in paired_val instead."
            )
        for name, use, default in (
            ("tasks", "train", "all"),
            ("val_tasks", "validate", "the training tasks"),
        ):
            names = getattr(self, name)
            if names == []:
                raise ConfigError(f"{name} is empty; list the tasks to {use}, or null: {default}.")
            if names is not None and len(set(names)) != len(names):
                raise ConfigError(f"{name} names a task twice: {names}; list each once.")
        if self.paired_train is not None:
            _check_paired_folders(self.paired_train, self.paired_val)
        check_int("dead_leaves", self.dead_leaves, 0)
        if self.dead_leaves and self.paired_train is not None:
            raise ConfigError(
                "dead_leaves adds synthetic pairs degraded by a suite; paired_train gives real "
                "pairs. Set dead_leaves: 0, or train on synthetic pairs (no paired_*)."
            )
        for name in ("train_repeats", "val_repeats"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.validate_every < 0:
            raise ConfigError(f"validate_every must be >= 0, got {self.validate_every}.")
        if self.val_batch_size is not None and self.val_batch_size < 1:
            raise ConfigError(
                f"val_batch_size must be >= 1 (or unset: batch_size), got {self.val_batch_size}."
            )
        if self.val_patch_size is None and (self.val_batch_size or 1) > 1:
            raise ConfigError(
                f"val_batch_size={self.val_batch_size} with whole-image validation "
                "(val_patch_size: null): images of different sizes cannot share a batch. Leave "
                "val_batch_size unset (whole images go one at a time) or set val_patch_size."
            )
        if self.val_crop_border < 0:
            raise ConfigError(f"val_crop_border must be >= 0 pixels, got {self.val_crop_border}.")
        if not 0 <= self.fft_weight < math.inf:  # NaN fails both comparisons
            raise ConfigError(f"fft_weight must be finite and >= 0, got {self.fft_weight}.")
        if self.patch_context < 0:
            raise ConfigError(f"patch_context must be >= 0 pixels, got {self.patch_context}.")
        if self.ema_decay and not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be 0 (off) or in (0, 1), got {self.ema_decay}.")


def _check_paired_folders(train: dict[str, str], val: dict[str, str]) -> None:
    """Refuse empty mappings, class names that are not text, and a validation folder that
    is a training folder or lies inside one (or holds one): ``PairedFolder`` reads
    subfolders, so training would read the held-out pairs and validation score pairs the
    network trained on."""
    for setting, mapping in (("paired_train", train), ("paired_val", val)):
        if not mapping:
            raise ConfigError(
                f"{setting} is empty; map each class to its folder, e.g. {{noise: data/noise}}."
            )
        odd = [name for name in mapping if not isinstance(name, str)]
        if odd:
            raise ConfigError(
                f"{setting} has class names that are not text: {odd}; quote them in YAML "
                "(a bare yes, no, on or 1 is not a string)."
            )
    for val_name, val_folder in val.items():
        held_out = Path(val_folder).resolve()
        for train_name, train_folder in train.items():
            trained = Path(train_folder).resolve()
            if held_out == trained:
                where = "the same folder"
            elif trained in held_out.parents or held_out in trained.parents:
                where = "folders inside one another"
            else:
                continue
            raise ConfigError(
                f"paired_train[{train_name!r}] ({train_folder}) and paired_val[{val_name!r}] "
                f"({val_folder}) are {where}: folders are read with their subfolders, so "
                "validation would score pairs the network trained on. Keep the held-out pairs "
                "in a folder of their own, beside the training folder."
            )


@dataclass
class RestorationData:
    """Training and validation sets and the names their integer fields index.

    ``task_names[item["task"]]`` names an item's task (metrics are per task);
    ``class_names[item["label"]]`` its degradation class (routing by label); ``classes``
    are the classes present in the data (training or validation), ``train_classes`` those
    the training set holds, both in ``class_names`` order.
    """

    train: Dataset
    val: Dataset
    task_names: list[str]
    class_names: list[str]
    classes: list[str]
    train_classes: list[str]


class EpochConcat(ConcatDataset):
    """A ``ConcatDataset`` that passes ``set_epoch`` on (fresh crops each epoch) and
    exposes ``task_labels``."""

    def set_epoch(self, epoch: int) -> None:
        for part in self.datasets:
            part.set_epoch(epoch)

    @property
    def task_labels(self) -> list[int]:
        return [label for part in self.datasets for label in part.task_labels]


class FixedDraws(Dataset):
    """A dataset that always draws its epoch-0 items, whatever ``set_epoch`` calls the
    loader makes (Accelerate's loaders set a new epoch on every pass): the validation set
    must be the same images at every validation, on every number of processes."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    @property
    def task_labels(self) -> list[int]:
        return list(self.dataset.task_labels)


def _validation_batch(config: RestorationConfig, processes: int) -> int:
    """The validation loader's global batch. Accelerate hands each process its share of a
    batch (``split_batches``), so it must divide by the processes; whole images, which
    differ in size, go one per process. Checked before anything is written."""
    if config.val_patch_size is None:
        return processes
    batch = config.val_batch_size or config.batch_size
    if batch % processes:
        raise ConfigError(
            f"val_batch_size={batch} (global, like batch_size) must be divisible by the "
            f"{processes} processes; set a multiple of {processes}."
        )
    return batch


def build_data(
    config: RestorationConfig,
    suite: Suite | None = None,
    tasks: list[str] | None = None,
    repeats: dict[str, int] | None = None,
) -> RestorationData:
    """The datasets of ``config``; raises :class:`DataError` on missing or empty data.

    Synthetic data uses ``suite`` (default: ``config.suite``) restricted to ``tasks``
    (default: ``config.tasks``, else all), validated on ``config.val_tasks`` (default:
    the same tasks); ``repeats`` gives some tasks their own number of training patches per
    photo (default ``config.train_repeats``), e.g. a replay sample of old tasks. The
    data's ``classes`` are those of the training and validation tasks.
    """
    if config.paired_train is not None:
        data = _paired_data(config)
    else:
        suite = suite or load_suite(config.suite)
        tasks = tasks or config.tasks or suite.task_names
        data = _synthetic_data(config, suite, tasks, repeats or {}, config.val_tasks or tasks)
    if len(data.train) < config.batch_size:
        raise DataError(
            f"The training set has {len(data.train)} items, fewer than one batch of "
            f"{config.batch_size}; add data, raise train_repeats (patches per photo or pair "
            "per epoch) or lower batch_size."
        )
    if len(data.val) == 0:
        raise DataError("The validation set is empty; add held-out images or pairs.")
    data.val = FixedDraws(data.val)
    return data


def _synthetic_data(
    config: RestorationConfig,
    suite: Suite,
    tasks: list[str],
    repeats: dict[str, int],
    val_tasks: list[str],
) -> RestorationData:
    from loraxir.data import DeadLeavesSource, SyntheticPairs, open_source

    tasks = [suite.task_names[suite.index(t)] for t in tasks]
    val_tasks = [suite.task_names[suite.index(t)] for t in val_tasks]
    source = open_source(_checked_source(config.source), config.image_column)
    split = {"test_fraction": config.test_fraction, "split_seed": config.split_seed}
    groups: dict[int, list[str]] = {}
    for task in tasks:
        groups.setdefault(repeats.get(task, config.train_repeats), []).append(task)
    parts = [
        SyntheticPairs(
            source,
            suite,
            config.patch_size,
            tasks=names,
            split="train",
            seed=config.seed,
            repeats=count,
            context=config.patch_context,
            **split,
        )
        for count, names in groups.items()
    ]
    val = SyntheticPairs(
        source,
        suite,
        config.val_patch_size,
        tasks=val_tasks,
        split="test",
        seed=config.seed + 1,
        repeats=config.val_repeats,
        context=config.patch_context,
        **split,
    )
    if config.dead_leaves:
        parts.append(
            SyntheticPairs(
                # Drawn before the Accelerator exists: the launcher's LOCAL_RANK says which
                # process is the main one of its machine, the one that shows progress.
                DeadLeavesSource(
                    config.dead_leaves,
                    seed=config.seed,
                    progress=os.environ.get("LOCAL_RANK", "0") == "0",
                ),
                suite,
                config.patch_size,
                tasks=tasks,
                split="all",
                augment=True,
                seed=config.seed,
                context=config.patch_context,
            )
        )
    train = parts[0] if len(parts) == 1 else EpochConcat(parts)
    trained = {suite.task(t).label for t in tasks}
    present = trained | {suite.task(t).label for t in val_tasks}
    classes = [name for name in suite.labels if name in present]
    train_classes = [name for name in suite.labels if name in trained]
    return RestorationData(train, val, suite.task_names, suite.labels, classes, train_classes)


def _checked_source(source: str) -> str:
    """``source`` as :func:`~loraxir.data.open_source` takes it, checked first so that a
    typo names every form it may take."""
    if not source.startswith("hf:") and source != "skimage" and not Path(source).is_dir():
        raise DataError(
            f"source {source!r} is neither 'skimage', a folder of images, nor "
            "'hf:<dataset>[@split]'."
        )
    return source


def _paired_data(config: RestorationConfig) -> RestorationData:
    from loraxir.data import PairedFolder
    from loraxir.data.paired import METADATA

    names = list(config.paired_train or {})
    if set(config.paired_val or {}) - set(names):
        extra = sorted(set(config.paired_val or {}) - set(names))
        raise ConfigError(f"paired_val has classes {extra} that paired_train lacks: {names}.")

    def folders(mapping: dict[str, str], train: bool) -> EpochConcat:
        # Crops per pair, as patches per photo; a whole held-out pair reads the same each time.
        repeats = config.train_repeats if train else config.val_repeats
        if not train and config.val_patch_size is None:
            repeats = 1
        parts = {
            name: PairedFolder(
                folder,
                task=name,
                task_names=names,
                patch_size=config.patch_size if train else config.val_patch_size,
                seed=config.seed if train else config.seed + 1,
                augment=train,
                repeats=repeats,
            )
            for name, folder in mapping.items()
        }
        for name, part in parts.items():
            # A metadata.jsonl 'task' column would send this folder's pairs to another class.
            other = sorted({pair.task for pair in part.pairs} - {name})
            if other:
                raise DataError(
                    f"{str(part.root / METADATA)!r} gives the task(s) {other}, but "
                    f"{'paired_train' if train else 'paired_val'} names this folder {name!r}: "
                    f"its pairs would train another class. Make its 'task' column {name!r} "
                    "or leave the column out."
                )
        return EpochConcat(list(parts.values()))

    train, val = folders(config.paired_train, True), folders(config.paired_val, False)
    return RestorationData(train, val, names, names, names, names)


def pixel_loss(
    restored: Tensor, target: Tensor, kind: str, fft_weight: float = FFT_WEIGHT
) -> Tensor:
    """``"l1"``: mean absolute error. ``"psnr"``: the PSNR loss of NAFNet and LoRA-IR,
    ``mean_b 10·log10(MSE_b + 1e-8)`` (minus the PSNR of each image in [0, 1], up to a
    constant), so that every image's error counts in decibels whatever its level.
    ``"l1_fft"``: L1 plus ``fft_weight`` × the L1 distance of the 2-D spectra (real and
    imaginary parts, unnormalised as in MIMO-UNet): a pixel loss barely notices a missing
    high frequency spread thinly over a patch, while its spectral coefficient is large. A
    uniform offset counts about ``fft_weight`` times its L1 there, so brightness errors
    weigh relatively less (low light trains slower; see docs/recipes.md)."""
    restored, target = restored.float(), target.float()
    if kind in ("l1", "l1_fft"):
        loss = (restored - target).abs().mean()
        if kind == "l1_fft":
            spectrum = torch.view_as_real(torch.fft.rfft2(restored - target))
            loss = loss + fft_weight * spectrum.abs().mean()
        return loss
    mse = (restored - target).pow(2).mean(dim=(1, 2, 3))
    return (10 / math.log(10)) * torch.log(mse + 1e-8).mean()


def validation_items(data: RestorationData) -> list[dict[str, Any]]:
    """The items drawn in image grids: the first validation item of each task."""
    return first_item_per_task(data.val, data.task_names)


def validate(
    accelerator: Any,
    config: RestorationConfig,
    restore: Restore,
    val_loader: Any,
    data: RestorationData,
    step: int,
    ema: ExponentialMovingAverage | None = None,
    prefix: str = "val",
) -> dict[str, Any]:
    """Evaluate (with the EMA weights when there is an EMA), log the scalars and an image
    grid (``output_dir/figures/<prefix>_step-N.png`` and tensorboard). Returns the summary
    of :func:`~loraxir.training.evaluation.evaluate_restoration`."""
    with ema_applied(ema):
        metrics = evaluate_restoration(
            accelerator,
            restore,
            val_loader,
            data.task_names,
            y_channel=config.val_y_channel,
            crop_border=config.val_crop_border,
        )
        if accelerator.is_main_process:
            path = Path(config.output_dir) / FIGURES_DIR / f"{prefix}_step-{step:07d}.png"
            save_image_grid(
                accelerator, restore, validation_items(data), path, step, f"{prefix}/restored"
            )
    accelerator.log(scalars(prefix, metrics), step=step)
    accelerator.print(
        f"step {step} {prefix}: PSNR {metrics['psnr']:.2f} dB (input {metrics['input_psnr']:.2f}), "
        f"SSIM {metrics['ssim']:.4f}"
    )
    return metrics


def data_signature(dataset: Dataset) -> str:
    """A digest of what a training set holds: its length and, for paired folders, every
    pair's files (relative to their folder), pixel size and byte sizes (a file replaced
    under its name). Checkpoints record it, so a run is not resumed on a folder whose
    files changed (see :func:`resume`)."""
    digest = hashlib.sha256(f"{len(dataset)};".encode())
    for part in dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]:
        for pair in getattr(part, "pairs", ()):
            files = [
                (path.relative_to(part.root).as_posix(), path.stat().st_size)
                for path in (pair.lq, pair.gt)
            ]
            digest.update(f"{files}:{pair.lq_size};".encode())
    return digest.hexdigest()[:16]


@dataclass
class RestorationRun:
    """One restoration recipe's run after ``accelerator.prepare``: what every recipe's
    ``main`` holds, and the steps they share (validate, train, finish)."""

    config: RestorationConfig
    data: RestorationData
    accelerator: Any
    model: nn.Module
    unwrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Any
    val_loader: Any
    ema: ExponentialMovingAverage | None
    state: TrainState = field(default_factory=TrainState)

    def validate(self, restore: Restore, step: int, prefix: str = "val") -> dict[str, Any]:
        """:func:`validate` on this run's validation set."""
        return validate(
            self.accelerator,
            self.config,
            restore,
            self.val_loader,
            self.data,
            step,
            self.ema,
            prefix,
        )

    start_step: int = 0

    def restore_images(self, batch: dict[str, Any]) -> Tensor:
        """Validation call of a network that takes only the degraded images (no routing
        arguments): pre-training, or a network routed inside its own forward."""
        self.unwrapped.eval()
        # Whole validation images come at any size; a bare network may need a side unit
        # (a GuidedBackbone or LoraIRModel pads by itself, and has no unit of its own).
        return run_padded(self.unwrapped, batch["lq"])

    def images_loss(self, batch: dict[str, Any]) -> Tensor:
        """Training loss of such a network: ``config.loss`` between output and target."""
        config = self.config
        return pixel_loss(self.model(batch["lq"]), batch["gt"], config.loss, config.fft_weight)

    def resume(self) -> int:
        """Restore ``config.resume`` (if any); returns the step training resumes from."""
        self.state = resume(self.accelerator, self.config, data_signature(self.data.train))
        self.start_step = self.state.step
        return self.start_step

    @property
    def trainable_parameters(self) -> int:
        """How many parameters train."""
        return sum(p.numel() for p in self.unwrapped.parameters() if p.requires_grad)

    def record(self, **results: Any) -> dict[str, Any]:
        """``results`` plus what every recipe reports about its run (``metrics.json``)."""
        return {
            **results,
            "steps": self.state.step,
            "resumed_from_step": self.start_step,
            "num_processes": self.accelerator.num_processes,
            "trainable_parameters": self.trainable_parameters,
        }

    def fit(self, compute_loss: Callable[[Any], Tensor], restore: Restore, desc: str) -> None:
        """Train to ``max_steps``, validating every ``validate_every`` steps."""
        fit(
            self.accelerator,
            self.config,
            self.state,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            loader=self.train_loader,
            compute_loss=compute_loss,
            ema=self.ema,
            validate=lambda step: self.validate(restore, step),
            validate_every=self.config.validate_every,
            desc=desc,
        )

    def finish(self, metrics: dict[str, Any], save: Callable[[], None], report: str) -> None:
        """On the main process, ``save()`` the result (with the EMA weights in place),
        write ``metrics.json`` and print ``report``; then close the run on every process."""
        if self.accelerator.is_main_process:
            with ema_applied(self.ema):
                save()
            write_json(Path(self.config.output_dir) / "metrics.json", metrics)
            print(report)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def start_run(
    config: RestorationConfig,
    data: RestorationData,
    project: str,
    build_model: Callable[[], nn.Module],
    param_groups: Callable[[nn.Module], list[dict[str, Any]]] | None = None,
    find_unused_parameters: bool = False,
) -> RestorationRun:
    """Set up the Accelerator (seeding it first), build the model, activation
    checkpointing, optimizer and schedule, loaders and EMA, and ``prepare`` them.

    ``param_groups(model)`` gives the optimizer's groups (default: one group of every
    trainable parameter); ``find_unused_parameters`` goes to DDP.
    """
    accelerator = setup_accelerator(config, find_unused_parameters)
    val_batch = _validation_batch(config, accelerator.num_processes)
    model = build_model()
    if config.gradient_checkpointing:  # may refuse the network: before an earlier run is cleared
        enable_activation_checkpointing(model)
    start_recording(accelerator, config, project)
    groups = param_groups(model) if param_groups else [{"params": list(model.parameters())}]
    optimizer, scheduler = make_optimizer_and_scheduler(groups, config)
    train_loader = make_loader(data.train, config, shuffle=True)
    val_loader = make_loader(data.val, config, shuffle=False, batch_size=val_batch)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler
    )
    unwrapped = accelerator.unwrap_model(model)
    ema = maybe_ema(accelerator, unwrapped, config.ema_decay)
    return RestorationRun(
        config,
        data,
        accelerator,
        model,
        unwrapped,
        optimizer,
        scheduler,
        train_loader,
        val_loader,
        ema,
    )
