"""Dead-leaves images: procedural clean images with the statistics that restoration priors
need (edges at every orientation and scale, flat regions, occlusions).

Why: the packaged photos are a dozen images. A network that learns to *undo* a degradation
from so few photos learns those photos; deblurring in particular needs sharp edges of every
orientation, contrast and curvature, which a few photos do not cover. The dead-leaves model
(opaque shapes falling on each other, sizes drawn from a power law so that the image looks
the same at every scale) is the classic stand-in for natural images in that role (Achddou,
Gousseau and Ladjal, "Synthetic images as a regularity prior for image restoration neural
networks", SSVM 2021). Each image is drawn from its seed, so a source of them is as
reproducible as a folder of photos.
"""

from __future__ import annotations

import functools
import math
from numbers import Integral

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from loraxir.data.patches import check_seed
from loraxir.data.sources import ImageSource
from loraxir.errors import DataError

# Smallest and largest shape radius relative to the image side, the power-law exponent of the
# radius density (3: scale invariance in 2-D) and how many shapes cover an image: enough that
# the first-drawn (background) shapes are almost all hidden.
_MIN_RADIUS = 4 / 256
_MAX_RADIUS = 0.4
_EXPONENT = 3.0
_SHAPES_PER_IMAGE = 1500
# Shapes are drawn at twice the resolution and averaged down: edges are anti-aliased as a
# camera's are, not staircases.
_SUPERSAMPLE = 2
# How far a shape's colour strays from grey: photos are mostly unsaturated.
_CHROMA = 0.5


def dead_leaves_image(size: int, seed: int) -> Tensor:
    """One ``uint8`` ``(3, size, size)`` dead-leaves image drawn from ``seed``.

    Shapes are disks and rotated rectangles with radii ``r`` of density ``∝ r^-3``, each of
    one mostly unsaturated colour with a faint linear shading (so that flat regions are not
    perfectly flat), painted one over the other. NumPy, not torch: the work is thousands of
    operations on small arrays, where torch's per-call overhead would dominate.
    """
    if isinstance(size, bool) or not isinstance(size, Integral) or size < 8:
        raise DataError(
            f"A dead-leaves image needs a whole number of pixels >= 8 as its side, got {size!r}."
        )
    check_seed(seed)
    rng = np.random.default_rng(seed)
    side = size * _SUPERSAMPLE
    count = _SHAPES_PER_IMAGE
    low, high = _MIN_RADIUS ** (1 - _EXPONENT), _MAX_RADIUS ** (1 - _EXPONENT)
    radius = (low + rng.random(count) * (high - low)) ** (1 / (1 - _EXPONENT)) * side
    centre = rng.random((count, 2)) * side
    grey = rng.random((count, 1))
    colour = np.clip(grey + _CHROMA * (rng.random((count, 3)) - 0.5), 0, 1)
    shading = (rng.random((count, 2)) - 0.5) * 0.2 / radius[:, None]
    angle = rng.random(count) * math.pi
    aspect = 0.3 + 0.7 * rng.random(count)
    is_disk = rng.random(count) < 0.5

    canvas = np.empty((side, side, 3), dtype=np.float32)
    canvas[:] = rng.random(3)
    grid = np.arange(side, dtype=np.float64) + 0.5
    half = math.sqrt(0.5)
    for i in range(count):
        r, (x0, y0) = radius[i], centre[i]
        left, right = max(0, int(x0 - r)), min(side, int(x0 + r) + 1)
        top, bottom = max(0, int(y0 - r)), min(side, int(y0 + r) + 1)
        if left >= right or top >= bottom:
            continue
        dx = grid[None, left:right] - x0
        dy = grid[top:bottom, None] - y0
        if is_disk[i]:
            inside = dx * dx + dy * dy <= r * r
        else:
            cos, sin = math.cos(angle[i]), math.sin(angle[i])
            inside = (np.abs(dx * cos + dy * sin) <= r * half) & (
                np.abs(dy * cos - dx * sin) <= r * half * aspect[i]
            )
        tone = colour[i] + (shading[i, 0] * dx + shading[i, 1] * dy)[..., None]
        patch = canvas[top:bottom, left:right]
        patch[inside] = np.clip(np.broadcast_to(tone, patch.shape)[inside], 0, 1)
    small = canvas.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return torch.from_numpy(np.round(small * 255).astype(np.uint8)).permute(2, 0, 1).contiguous()


# Every recipe run of a benchmark process builds its training set anew: draw each image once
# per process (1024 images of 256²: 200 MB at most).
_drawn = functools.lru_cache(maxsize=1024)(dead_leaves_image)


class DeadLeavesSource(ImageSource):
    """``count`` dead-leaves images of side ``size``, image ``i`` drawn from ``seed + i``.

    Images are drawn when the source is made (about 0.2 s each at the default size, once per
    process) and kept (0.2 MB each), so that data-loader workers share them instead of drawing
    them again. Treat what :meth:`load` returns as read-only: it is the kept image. Ids are
    ``dead_leaves/<seed + i>``, distinct from any photo's, so a split by image never mixes
    them with photos. ``progress`` draws a bar while they are drawn (hundreds take minutes).
    """

    def __init__(self, count: int, size: int = 256, seed: int = 0, progress: bool = False) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise DataError(f"count must be a whole number of images >= 1, got {count!r}.")
        check_seed(seed)
        self.size = size
        self.seed = seed
        self.ids = [f"dead_leaves/{seed + i}" for i in range(count)]
        drawing = tqdm(range(count), desc="dead leaves", disable=not progress, leave=False)
        self._images = [_drawn(size, seed + i) for i in drawing]

    def load(self, index: int) -> Tensor:
        return self._images[index]
