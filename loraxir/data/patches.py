"""Per-item randomness, patch cropping and augmentation shared by the datasets.

Every random choice an item makes (crop, flip, degradation) comes from a generator seeded
by ``(seed, epoch, index)`` alone, never from worker state: an item is the same whatever
the number of DataLoader workers or the order they run in, which makes resuming bit-exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


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
    height, width = padded[0].shape[-2:]
    top = int(torch.randint(0, height - size + 1, (), generator=generator))
    left = int(torch.randint(0, width - size + 1, (), generator=generator))
    return [image[:, top : top + size, left : left + size] for image in padded]


def random_dihedral(images: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """Apply one of the 8 flips/rotations by 90°, the same to every image."""
    choice = int(torch.randint(0, 8, (), generator=generator))
    out = [image.flip(-1) if choice & 4 else image for image in images]
    return [torch.rot90(image, choice % 4, dims=(-2, -1)) for image in out]
