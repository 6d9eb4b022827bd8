"""Train/test splits by image, and a sampler that balances tasks.

The split is made on image ids, before any patch is cut or degradation drawn, so no test
image is ever seen in training, under any degradation. The sampler oversamples small tasks
so every task is seen equally often, as the paper's mixed-task training does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Sampler

from loraxir.data.patches import check_seed, seeded_generator
from loraxir.errors import DataError

SPLITS = ("train", "test", "all")


def split_by_image(
    ids: Sequence[str], split: str, test_fraction: float = 0.2, seed: int = 0
) -> list[int]:
    """Indices (into ``ids``) of the images in ``split`` (``"train"``, ``"test"`` or ``"all"``).

    Images are shuffled by ``seed`` after sorting their ids, so the split depends only on the
    set of ids and the seed; ``round(test_fraction * n)`` images (at least one) go to test.
    Repeated ids (the same image listed twice) always fall on the same side.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {list(SPLITS)}, got {split!r}.")
    if split == "all":
        return list(range(len(ids)))
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction!r}.")
    unique = sorted(set(ids))
    if len(unique) < 2:
        raise DataError(
            f"A train/test split needs at least 2 distinct images, got {len(unique)}; add "
            "images or use split='all'."
        )
    order = torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed)).tolist()
    num_test = min(len(unique) - 1, max(1, round(test_fraction * len(unique))))
    test = {unique[i] for i in order[:num_test]}
    return [i for i, image_id in enumerate(ids) if (image_id in test) == (split == "test")]


def task_labels(dataset: Any) -> list[int]:
    """The task index of every item of ``dataset`` without loading any image.

    Works for :class:`~loraxir.data.SyntheticPairs`, :class:`~loraxir.data.PairedFolder`
    (their ``task_labels``) and ``ConcatDataset`` of them. The parts of a ``ConcatDataset``
    must index the same task vocabulary: a ``PairedFolder`` built with ``task="rain"`` alone
    calls its only task 0, as one built with ``task="haze"`` does, and mixing them would
    balance nothing.
    """
    if isinstance(dataset, ConcatDataset):
        _check_same_tasks(dataset)
        return [label for part in dataset.datasets for label in task_labels(part)]
    labels = getattr(dataset, "task_labels", None)
    if labels is None:
        raise DataError(
            f"{type(dataset).__name__} does not expose task_labels; pass the labels list to "
            "TaskBalancedSampler directly."
        )
    return list(labels)


def _task_vocabularies(dataset: Any) -> list[tuple[str, ...]]:
    """The task names each leaf part of ``dataset`` indexes its labels into (where known)."""
    if isinstance(dataset, ConcatDataset):
        return [names for part in dataset.datasets for names in _task_vocabularies(part)]
    suite = getattr(dataset, "suite", None)
    names = getattr(dataset, "task_names", None) or getattr(suite, "task_names", None)
    return [tuple(names)] if names else []


def _check_same_tasks(dataset: ConcatDataset) -> None:
    vocabularies = list(dict.fromkeys(_task_vocabularies(dataset)))
    if len(vocabularies) > 1:
        raise DataError(
            "The parts of this ConcatDataset number their tasks differently "
            f"({' vs '.join(str(list(names)) for names in vocabularies)}), so their labels "
            "cannot be mixed; build every part with the same suite= (e.g. "
            'suite="five_task") or the same task_names=.'
        )


class TaskBalancedSampler(Sampler[int]):
    """Draws every task equally often per epoch, oversampling the small ones.

    Each task contributes ``samples_per_task`` indices per epoch (default: the size of the
    largest task), taken from fresh random permutations of its items, repeated as needed,
    so items of a small task repeat only after all of them were seen. The tasks' indices
    are then shuffled together. Deterministic for ``(seed, epoch)``: call
    :meth:`set_epoch` at the start of each epoch (as with ``DistributedSampler``).
    """

    def __init__(
        self, labels: Sequence[int], samples_per_task: int | None = None, seed: int = 0
    ) -> None:
        if not labels:
            raise DataError("TaskBalancedSampler needs at least one labelled item.")
        self._by_task: dict[int, list[int]] = {}
        for index, label in enumerate(labels):
            self._by_task.setdefault(int(label), []).append(index)
        largest = max(len(items) for items in self._by_task.values())
        if samples_per_task is not None and samples_per_task < 1:
            raise DataError(f"samples_per_task must be >= 1, got {samples_per_task}.")
        check_seed(seed)
        self.samples_per_task = samples_per_task or largest
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_task * len(self._by_task)

    def __iter__(self) -> Iterator[int]:
        generator = seeded_generator(self.seed, self.epoch)
        chosen: list[int] = []
        for task in sorted(self._by_task):
            items = torch.tensor(self._by_task[task])
            rounds = -(-self.samples_per_task // len(items))
            perms = [items[torch.randperm(len(items), generator=generator)] for _ in range(rounds)]
            chosen.extend(torch.cat(perms)[: self.samples_per_task].tolist())
        order = torch.randperm(len(chosen), generator=generator).tolist()
        return iter([chosen[i] for i in order])
