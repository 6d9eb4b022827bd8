"""``SyntheticPairs``: clean images degraded on the fly into labelled patch pairs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor
from torch.utils.data import Dataset

from loraxir import degradations
from loraxir.data.patches import (
    check_patch_size,
    check_seed,
    cut_marked,
    random_crop_in_context,
    random_dihedral,
    seeded_generator,
)
from loraxir.data.sampling import split_by_image
from loraxir.data.sources import open_source
from loraxir.degradations import Suite
from loraxir.errors import DataError


class SyntheticPairs(Dataset):
    """Clean images, each degraded by every task of a suite, as ``(lq, gt)`` patch pairs.

    Item ``i`` is a dict:

    - ``"lq"``, ``"gt"``: float32 ``(3, P, P)`` in [0, 1] (whole images when
      ``patch_size=None``); ``lq`` is rounded to 8-bit levels like a saved file;
    - ``"task"``: int, the task index in the suite (``suite.task_names[task]``);
    - ``"task_name"``: str, that task's name;
    - ``"label"``: int, the degradation class index (``suite.labels``); tasks that differ
      only in strength (noise σ15/25/50) share a class. Train the router on this;
    - ``"name"``: str, the id of the clean image the patch comes from (the same key as
      :class:`~loraxir.data.PairedFolder` items, so both mix in one ``ConcatDataset``).

    Items cycle through tasks fastest, then images, then ``repeats``, so every task has
    the same number of items (no sampler is needed to balance them). Everything random
    (crop, flip/rotation, degradation parameters and patterns) is drawn from
    ``(seed, epoch, i)``: the same item every time, in any worker. Call :meth:`set_epoch` at
    each epoch for fresh crops and degradations; keep the default
    ``persistent_workers=False`` so workers see the new epoch.

    Args:
        source: ``"skimage"`` (photos bundled with scikit-image), a folder of images or a
            🤗 ``datasets.Dataset`` with an ``image_column``.
        suite: a suite name, a suite YAML path or a :class:`~loraxir.degradations.Suite`.
        patch_size: side of the square patches; smaller images are reflect-padded.
        context: pixels of the photo around each patch that are degraded with it and then
            cut away (fewer at the photo's edges), so that a patch is a crop of a degraded
            photo, as a crop of a user's photo is: motion blur and rain streaks cross its
            borders, haze depth is estimated over the larger window, and no border padding
            of the degradation shows. The default covers the shipped suites' reach
            (motion blur and streaks up to about 31 px); 0 degrades the bare patch.
        tasks: restrict to these task names (labels stay the suite's indices); None
            keeps every task.
        split: ``"train"``, ``"test"`` or ``"all"``; the split is by image (see
            :func:`~loraxir.data.split_by_image`): ``test_fraction`` of the images, chosen
            by ``split_seed``, are test images.
        seed: seeds every random choice of an item, with the epoch and the index.
        repeats: how many times each (image, task) appears per epoch.
        augment: random flips and 90° rotations; default on for ``split="train"`` only.
        image_column: the column of a 🤗 dataset that holds the clean images.
        strict: fail on non-image or corrupt files in a folder instead of skipping them.
    """

    def __init__(
        self,
        source: str | Path | Any = "skimage",
        suite: str | Path | Suite = "three_task",
        patch_size: int | None = 128,
        *,
        tasks: list[str] | None = None,
        split: str = "all",
        test_fraction: float = 0.2,
        split_seed: int = 0,
        seed: int = 0,
        repeats: int = 1,
        augment: bool | None = None,
        context: int = 32,
        image_column: str = "image",
        strict: bool = False,
    ) -> None:
        check_patch_size(patch_size)
        check_seed(seed)
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise DataError(f"repeats must be an integer >= 1, got {repeats!r}.")
        if isinstance(context, bool) or not isinstance(context, int) or context < 0:
            raise DataError(f"context must be a whole number of pixels >= 0, got {context!r}.")
        if tasks is not None and (isinstance(tasks, str) or not tasks):
            raise DataError(
                f"tasks must be a non-empty list of task names (or None for every task), got "
                f"{tasks!r}."
            )
        self.suite = suite if isinstance(suite, Suite) else degradations.suite(suite)
        self.tasks = [self.suite.index(name) for name in tasks or self.suite.task_names]
        self.source = open_source(source, image_column, strict)
        self.images = split_by_image(self.source.ids, split, test_fraction, split_seed)
        self.patch_size = patch_size
        self.seed = seed
        self.repeats = repeats
        self.context = context
        self.augment = split == "train" if augment is None else augment
        self.epoch = 0

    @classmethod
    def splits(
        cls,
        source: str | Path | Any = "skimage",
        suite: str | Path | Suite = "three_task",
        patch_size: int | None = 128,
        **kwargs: Any,
    ) -> tuple[SyntheticPairs, SyntheticPairs]:
        """``(train, test)`` over the same images, split by image; ``kwargs`` go to both
        (e.g. ``test_fraction``, ``split_seed``, ``repeats``). The test set uses
        ``seed + 1`` so its degradations differ from any training draw."""
        if "split" in kwargs:
            raise DataError(
                f"splits() builds both the 'train' and the 'test' side; drop "
                f"split={kwargs['split']!r}, or build one side with SyntheticPairs(split=...)."
            )
        train = cls(source, suite, patch_size, split="train", **kwargs)
        seed = kwargs.pop("seed", 0) + 1
        test = cls(train.source, train.suite, patch_size, split="test", seed=seed, **kwargs)
        return train, test

    @property
    def image_ids(self) -> list[str]:
        """Ids of the clean images in this split."""
        return [self.source.ids[i] for i in self.images]

    @property
    def task_labels(self) -> list[int]:
        """The task index of every item, computed without loading images."""
        return [self.tasks[i % len(self.tasks)] for i in range(len(self))]

    def set_epoch(self, epoch: int) -> None:
        """Draw new crops and degradations for ``epoch`` (deterministically)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images) * len(self.tasks) * self.repeats

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        task = self.tasks[index % len(self.tasks)]
        image = self.images[(index // len(self.tasks)) % len(self.images)]
        generator = seeded_generator(self.seed, self.epoch, index)
        gt, marker = self._clean_window(image, generator)
        lq, _ = self.suite.degrade(gt[None], task, generator)
        lq = lq[0]
        if marker is not None:
            gt, lq = cut_marked([gt, lq], marker)
        return {
            "lq": lq,
            "gt": gt,
            "task": task,
            "task_name": self.suite.task_names[task],
            "label": self.suite.label_index(task),
            "name": self.source.ids[image],
        }

    def _clean_window(self, image: int, generator: Any) -> tuple[Tensor, Tensor | None]:
        """The clean patch with its context (the whole image without patches), flipped or
        rotated when augmenting, and the marker of the patch in it (None: keep it all)."""
        pixels = self.source.load(image)
        marker = None
        if self.patch_size is not None:
            pixels, marker = random_crop_in_context(
                pixels, self.patch_size, self.context, generator
            )
        if self.augment:
            if marker is None:
                (pixels,) = random_dihedral([pixels], generator)
            else:
                pixels, marker = random_dihedral([pixels, marker], generator)
        return pixels.float() / 255, marker
