"""Per-item randomness, patch cropping and augmentation shared by the datasets.

Every random choice an item makes (crop, flip, degradation) comes from a generator seeded
by ``(seed, epoch, index)`` alone, never from worker state: an item is the same whatever
the number of DataLoader workers or the order they run in, which makes resuming bit-exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

import numpy as np
import torch
from torch import Tensor

from loraxir.errors import DataError


def check_seed(seed: Any) -> None:
    """Raise :class:`DataError` unless ``seed`` is an integer >= 0: checked when a dataset
    or sampler is built, since :func:`seeded_generator` would only refuse it at the first
    item."""
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise DataError(f"seed must be an integer >= 0, got {seed!r}.")


def check_patch_size(patch_size: Any) -> None:
    """Raise :class:`DataError` unless ``patch_size`` is None (whole images) or a whole
    number of pixels >= 1; a zero or negative side would give empty patches."""
    if patch_size is None:
        return
    if isinstance(patch_size, bool) or not isinstance(patch_size, Integral) or patch_size < 1:
        raise DataError(
            f"patch_size must be a whole number of pixels >= 1 (or None for whole images), "
            f"got {patch_size!r}."
        )


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from non-negative integer ``keys`` (e.g. seed, epoch, index)
    through ``numpy.random.SeedSequence``, so that neighbouring keys get unrelated streams."""
    state = np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def pad_to(image: Tensor, size: int) -> Tensor:
    """Reflect-pad ``image`` ``(C, H, W)`` at the bottom and right to at least ``size``×``size``.

    Reflection repeats as needed, so even an image much smaller than the patch is padded
    (a 1-pixel side is repeated).
    """
    height, width = image.shape[-2:]
    if height >= size and width >= size:
        return image
    pad = ((0, 0), (0, max(0, size - height)), (0, max(0, size - width)))
    return torch.from_numpy(np.pad(image.numpy(), pad, mode="reflect"))


def random_crop(images: Sequence[Tensor], size: int, generator: torch.Generator) -> list[Tensor]:
    """The same random ``size``×``size`` window of each image ``(C, H, W)`` (padded first if
    smaller), so that LQ and GT stay aligned."""
    padded = [pad_to(image, size) for image in images]
    top, left = _random_corner(padded[0], size, generator)
    return [image[:, top : top + size, left : left + size] for image in padded]


def random_crop_in_context(
    image: Tensor, size: int, context: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The window :func:`random_crop` would draw (same random draws), with up to ``context``
    pixels of ``image`` around it on every side (fewer where the image ends).

    Returns ``(window, marker)``: the window ``(C, h, w)`` and a ``(1, h, w)`` mask that is 1
    on the ``size``×``size`` patch, so that the patch can be found again after the window
    is flipped or rotated (:func:`random_dihedral` on both) and cut out with
    :func:`cut_marked`. Degrading the window before cutting makes the patch a crop of a
    degraded photo: blur and streaks cross its borders and no border padding shows.
    """
    padded = pad_to(image, size)
    top, left = _random_corner(padded, size, generator)
    height, width = padded.shape[-2:]
    y0, x0 = max(0, top - context), max(0, left - context)
    y1, x1 = min(height, top + size + context), min(width, left + size + context)
    marker = torch.zeros(1, y1 - y0, x1 - x0, dtype=image.dtype)
    marker[:, top - y0 : top - y0 + size, left - x0 : left - x0 + size] = 1
    return padded[:, y0:y1, x0:x1], marker


def cut_marked(images: Sequence[Tensor], marker: Tensor) -> list[Tensor]:
    """The part of each image ``(..., h, w)`` where ``marker`` ``(1, h, w)`` is set (a
    rectangle, see :func:`random_crop_in_context`)."""
    rows = marker[0].any(dim=1).nonzero()
    cols = marker[0].any(dim=0).nonzero()
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return [image[..., top:bottom, left:right] for image in images]


def _random_corner(image: Tensor, size: int, generator: torch.Generator) -> tuple[int, int]:
    """Top-left corner of a uniformly drawn ``size``×``size`` window of ``image``."""
    height, width = image.shape[-2:]
    top = int(torch.randint(0, height - size + 1, (), generator=generator))
    left = int(torch.randint(0, width - size + 1, (), generator=generator))
    return top, left


def random_dihedral(images: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """Apply one of the 8 flips/rotations by 90°, the same to every image."""
    choice = int(torch.randint(0, 8, (), generator=generator))
    out = [image.flip(-1) if choice & 4 else image for image in images]
    return [torch.rot90(image, choice % 4, dims=(-2, -1)) for image in out]
