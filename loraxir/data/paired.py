"""``PairedFolder``: real degraded/clean pairs (Rain100L, SOTS, GoPro, LOL, your own).

Two layouts are read, both offline:

1. **metadata.jsonl** (the 🤗 ``imagefolder`` convention): ``root/metadata.jsonl`` holds one
   JSON object per line with ``lq_file_name`` and ``gt_file_name`` (paths relative to
   ``root``, inside it) and optionally ``task``.
   ``datasets.load_dataset("imagefolder", data_dir=root)`` reads the same folder as image
   columns ``lq`` and ``gt``.
2. **folder names**: every image under ``root`` with a directory named ``lq`` (resp. ``gt``)
   in its path is a degraded (resp. clean) image; pairs match on the rest of the path and
   the file stem, optionally reduced by the ``key`` regular expression (e.g. ``r"(\\d+)"``
   pairs ``rainy/rain-001.png`` with ``norain/norain-001.png``). Several degraded images may
   share one clean image (SOTS indoor has ten hazy versions of each).

Pairs must have equal sizes as displayed (after EXIF orientation, as they are read); the
first mismatched size or unmatched name raises
:class:`~loraxir.errors.DataError`. Corrupt files are skipped with their partner, with a
warning (an error when ``strict``).
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from loraxir import degradations
from loraxir.data.images import FolderScan, header_size, read_image, scan
from loraxir.data.patches import (
    check_patch_size,
    check_seed,
    random_crop,
    random_dihedral,
    seeded_generator,
)
from loraxir.degradations import Suite
from loraxir.errors import DataError, unknown_name

METADATA = "metadata.jsonl"
_COLUMNS = ("lq_file_name", "gt_file_name")


@dataclass(frozen=True)
class _Pair:
    lq: Path
    gt: Path
    task: str
    lq_size: tuple[int, int]
    gt_size: tuple[int, int]


class PairedFolder(Dataset):
    """Degraded/clean pairs from a folder (layouts in the module docstring).

    Item ``i`` is a dict: ``"lq"``, ``"gt"`` float32 ``(3, H, W)`` in [0, 1] (``(3, P, P)``
    aligned patches with ``patch_size``), ``"task"`` (int, index into :attr:`task_names`),
    ``"task_name"``, ``"label"`` (= ``"task"``, or the suite's class index) and ``"name"``
    (the LQ path relative to ``root``). Whole images of different sizes do not batch: use
    ``batch_size=1`` then.

    Args:
        root: the dataset folder.
        lq, gt: directory names marking degraded and clean images (folder layout).
        key: a regular expression applied to file stems; its first group (or whole match)
            is the pairing key.
        task: the task name of every pair without a ``task`` column (default: the folder
            name of ``root``).
        task_names: the task vocabulary, e.g. a suite's ``task_names``, so that task
            indices agree across datasets (default: the task names found, sorted); each
            task is its own class (``label`` = ``task``).
        suite: instead of ``task_names``, a suite (or its name): tasks are its task names
            and ``label`` its class index (:meth:`~loraxir.degradations.Suite.label_index`),
            as :class:`SyntheticPairs` of that suite labels them, also where several tasks
            share a class (``three_task``'s noise levels).
        patch_size: crop aligned random patches of this side (reflect-padded if smaller).
        seed: seeds crops and augmentation, per ``(seed, epoch, index)``.
        augment: random flips and 90° rotations of both images.
        repeats: how many times each pair appears per epoch (each time its own crop and
            augmentation), as :class:`SyntheticPairs` lists each (image, task).
        strict: raise on corrupt or non-image files instead of skipping them.
    """

    def __init__(
        self,
        root: str | Path,
        lq: str = "lq",
        gt: str = "gt",
        *,
        key: str | None = None,
        task: str | None = None,
        task_names: Sequence[str] | None = None,
        suite: Suite | str | None = None,
        patch_size: int | None = None,
        seed: int = 0,
        augment: bool = False,
        strict: bool = False,
        repeats: int = 1,
    ) -> None:
        self.root = Path(root)
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise DataError(f"repeats must be an integer >= 1, got {repeats!r}.")
        if not self.root.is_dir():
            raise DataError(f"Paired dataset folder {str(self.root)!r} does not exist.")
        check_patch_size(patch_size)
        check_seed(seed)
        if isinstance(task_names, str):
            raise DataError(
                f"task_names must be a list of task names, got the string {task_names!r}; "
                f"write [{task_names!r}]."
            )
        if task_names and len(set(task_names)) != len(task_names):
            raise DataError(f"task_names must be unique, got {list(task_names)}.")
        if suite is not None and task_names is not None:
            raise DataError("Pass task_names= or suite=, not both (a suite names its tasks).")
        self.suite = degradations.suite(suite) if isinstance(suite, str) else suite
        if self.suite is not None:
            task_names = self.suite.task_names
        default_task = task or self.root.resolve().name
        if (self.root / METADATA).is_file():
            pairs = _pairs_from_metadata(self.root, default_task, strict)
        else:
            pairs = _pairs_from_folders(self.root, lq, gt, _key_pattern(key), default_task, strict)
        if not pairs:
            raise DataError(
                f"No LQ/GT pairs in {str(self.root)!r}: expected {METADATA} or images under "
                f"folders named {lq!r} and {gt!r}."
            )
        _check_sizes(self.root, pairs)
        self.task_names = list(task_names) if task_names else sorted({p.task for p in pairs})
        for pair in pairs:
            if pair.task not in self.task_names:
                if (self.root / METADATA).is_file():
                    whence = f"its {METADATA} row"
                else:
                    whence = "task=" if task else "the folder's name"
                raise unknown_name(
                    "task",
                    pair.task,
                    self.task_names,
                    f"{pair.lq.relative_to(self.root).as_posix()!r} in {str(self.root)!r} has "
                    f"it from {whence}.",
                )
        self.pairs = pairs
        self.patch_size = patch_size
        self.seed = seed
        self.augment = augment
        self.repeats = repeats
        self.epoch = 0

    @property
    def task_labels(self) -> list[int]:
        """The task index of every pair, without loading images."""
        return [self.task_names.index(pair.task) for pair in self.pairs] * self.repeats

    def set_epoch(self, epoch: int) -> None:
        """Draw new crops and augmentations for ``epoch`` (deterministically)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs) * self.repeats

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        pair = self.pairs[index % len(self.pairs)]
        images = [read_image(pair.lq), read_image(pair.gt)]
        if images[0].shape != images[1].shape:
            # The header check missed an orientation (a PNG with its eXIf after the pixels).
            raise DataError(
                f"LQ/GT sizes differ once read: {pair.lq.relative_to(self.root).as_posix()!r} "
                f"is {tuple(images[0].shape[1:])} (H, W) but "
                f"{pair.gt.relative_to(self.root).as_posix()!r} is {tuple(images[1].shape[1:])}. "
                "Pairs must be aligned and equally sized."
            )
        generator = seeded_generator(self.seed, self.epoch, index)
        if self.patch_size is not None:
            images = random_crop(images, self.patch_size, generator)
        if self.augment:
            images = random_dihedral(images, generator)
        task = self.task_names.index(pair.task)
        label = task if self.suite is None else self.suite.label_index(pair.task)
        return {
            "lq": images[0].float() / 255,
            "gt": images[1].float() / 255,
            "task": task,
            "task_name": pair.task,
            "label": label,
            "name": pair.lq.relative_to(self.root).as_posix(),
        }


def _pairs_from_metadata(root: Path, default_task: str, strict: bool) -> list[_Pair]:
    pairs, corrupt = [], []
    try:
        lines = (root / METADATA).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(
            f"{str(root / METADATA)!r} is not UTF-8 text ({error.reason} at byte "
            f"{error.start}); save it with UTF-8 encoding, as JSON Lines requires."
        ) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{METADATA} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where} is not valid JSON: {error}.") from None
        if not isinstance(row, dict) or "lq_file_name" not in row or "gt_file_name" not in row:
            raise DataError(
                f"{where} needs 'lq_file_name' and 'gt_file_name' (paths relative to "
                f"{str(root)!r}), got {line.strip()[:120]!r}."
            )
        paths = [_metadata_path(root, row[column], where) for column in _COLUMNS]
        for path in paths:
            if not path.is_file():
                raise DataError(f"{where} names {str(path)!r}, which does not exist.")
        sizes = [header_size(path) for path in paths]
        corrupt.extend(path for path, size in zip(paths, sizes, strict=True) if size is None)
        task = row.get("task", default_task)
        if task is None or not str(task).strip():
            raise DataError(
                f"{where}: 'task' is empty; write a task name or leave the column out to "
                f"use the default task {default_task!r}."
            )
        if None not in sizes:
            task = str(task)
            pairs.append(_Pair(paths[0], paths[1], task, sizes[0], sizes[1]))
    FolderScan(root, [], corrupt).report(strict)
    return pairs


def _metadata_path(root: Path, name: Any, where: str) -> Path:
    """``root / name`` for a file name of a metadata line, which must be a relative path
    inside ``root``: items are named by their path relative to ``root``, and 🤗
    ``imagefolder`` reads only files under its ``data_dir``."""
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: file names must be non-empty strings, got {name!r}.")
    normal = os.path.normpath(name)
    if os.path.isabs(normal) or normal == ".." or normal.startswith(".." + os.sep):
        raise DataError(
            f"{where} names {name!r}, which is not inside {str(root)!r}; file names are "
            "paths relative to the dataset folder. Move the file into it."
        )
    return root / name


def _key_pattern(key: str | None) -> re.Pattern | None:
    """The compiled ``key`` expression, checked when the dataset is built."""
    if not key:
        return None
    try:
        return re.compile(key)
    except (re.error, TypeError) as error:
        raise DataError(
            f"key={key!r} is not a valid regular expression ({error}); e.g. key=r'(\\d+)' "
            "pairs files on their first number."
        ) from None


def _pairs_from_folders(
    root: Path, lq: str, gt: str, pattern: re.Pattern | None, default_task: str, strict: bool
) -> list[_Pair]:
    if lq == gt:
        raise DataError(
            f"lq and gt name the same folder {lq!r}, which would pair every image with "
            "itself; pass the folder names of the degraded and the clean images."
        )
    found = scan(root)
    found.report(strict)
    sides: dict[str, dict[str, list[Path]]] = {lq: {}, gt: {}}
    for path in [image.path for image in found.images] + found.corrupt:
        parts = path.relative_to(root).parts[:-1]
        side = next((name for name in (lq, gt) if name in parts), None)
        if side is not None:
            sides[side].setdefault(_pair_key(path, parts, side, pattern), []).append(path)
    for pair_key, paths in sides[gt].items():
        if len(paths) > 1:
            raise DataError(
                f"Clean images {str(paths[0])!r} and {str(paths[1])!r} share the pairing key "
                f"{pair_key!r}; adjust key= (or list the pairs in {METADATA}) so that each "
                "clean image has its own."
            )
    for pair_key, paths in sides[lq].items():
        # Several degraded images of one clean image come through a key= pattern only;
        # without one (or for one name in two formats) a stray file would pair with it.
        stems = [path.with_suffix("") for path in paths]
        twins = [p for p, stem in zip(paths, stems, strict=True) if stems.count(stem) > 1]
        clash = paths[:2] if pattern is None and len(paths) > 1 else twins[:2]
        if clash:
            raise DataError(
                f"Degraded images {str(clash[0])!r} and {str(clash[1])!r} share the pairing "
                f"key {pair_key!r}, so both would pair with one clean image. Remove or rename "
                f"the stray one; several degraded versions of one clean image need a key= "
                f"pattern or a {METADATA}."
            )
    _check_matched(root, sides[lq], sides[gt], lq, gt)
    sizes = {image.path: image.size for image in found.images}
    pairs = []
    for pair_key, paths in sorted(sides[lq].items()):
        clean = sides[gt][pair_key][0]
        pairs.extend(
            _Pair(path, clean, default_task, sizes[path], sizes[clean])
            for path in paths
            if path in sizes and clean in sizes
        )
    return pairs


def _pair_key(path: Path, parts: tuple[str, ...], side: str, pattern: re.Pattern | None) -> str:
    stem = path.stem
    if pattern is not None:
        match = pattern.search(stem)
        if match is None:
            raise DataError(
                f"The key pattern {pattern.pattern!r} does not match the file name {path.name!r}."
            )
        stem = match.group(1) if match.groups() else match.group(0)
    folders = list(parts)
    folders.remove(side)
    # One name typed on two systems: macOS writes "é" as e + accent (NFD), others as one
    # character (NFC), so files copied from a Mac would not find their partners.
    return unicodedata.normalize("NFC", "/".join([*folders, stem]))


def _check_matched(
    root: Path, lq: dict[str, list[Path]], gt: dict[str, list[Path]], lq_name: str, gt_name: str
) -> None:
    missing_gt = sorted(set(lq) - set(gt))
    missing_lq = sorted(set(gt) - set(lq))
    if missing_gt:
        first = lq[missing_gt[0]][0].relative_to(root)
        raise DataError(
            f"{len(missing_gt)} degraded image(s) in {str(root)!r} have no clean partner in a "
            f"{gt_name!r} folder; the first is {first.as_posix()!r} (key {missing_gt[0]!r}). "
            f"Check the file names, or pair differing names with key= or a {METADATA}."
        )
    if missing_lq:
        first = gt[missing_lq[0]][0].relative_to(root)
        raise DataError(
            f"{len(missing_lq)} clean image(s) in {str(root)!r} have no degraded partner in a "
            f"{lq_name!r} folder; the first is {first.as_posix()!r} (key {missing_lq[0]!r}). "
            f"Check the file names, or pair differing names with key= or a {METADATA}."
        )


def _check_sizes(root: Path, pairs: list[_Pair]) -> None:
    for pair in pairs:
        if pair.lq_size != pair.gt_size:
            raise DataError(
                f"LQ/GT sizes differ in {str(root)!r}: {pair.lq.relative_to(root).as_posix()!r} "
                f"is {pair.lq_size} (H, W) but {pair.gt.relative_to(root).as_posix()!r} is "
                f"{pair.gt_size}. Pairs must be aligned and equally sized."
            )
