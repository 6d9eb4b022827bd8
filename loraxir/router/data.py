"""Router training and test examples: degraded photos at many sizes, read as router views.

A router is used on whole photos of any size, so it is trained on them: each example is a
photo, whole or cropped, at a random size between ``min_side`` and ``max_side`` pixels
and a random aspect ratio, degraded *at that size* (degradation parameters are in pixels,
like those of a real camera), then turned into the router's fixed set of views
(:func:`~loraxir.router.views.multi_view`). Items are views, not images, so batches of
different image sizes stack; the encoder then sees exactly what it sees in use.

Everything random in item ``i`` is drawn from ``(seed, i)``: the same item in every
process and worker, and on every run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from loraxir.data.patches import seeded_generator
from loraxir.degradations import Compose, quantize
from loraxir.errors import ConfigError
from loraxir.router.statistics import cepstrum_statistics
from loraxir.router.views import multi_view

# A class's degradation for one example: the clean image (1, 3, H, W) and a generator in,
# the degraded image out. A task's pipeline, a widened one (loraxir.degradations.widen), or
# the identity for the "clean" class.
Degrade = Callable[[Tensor, torch.Generator], Tensor]


@dataclass(frozen=True)
class Sizing:
    """How an example is cut from a photo: sizes, aspect ratios, and how much it may zoom."""

    min_side: int = 64
    max_side: int = 1024
    max_aspect: float = 2.0
    whole_fraction: float = 0.3
    max_upscale: float = 2.0
    max_downscale: float = 3.0

    def __post_init__(self) -> None:
        if not 8 <= self.min_side <= self.max_side:
            raise ConfigError(
                f"Image sides must satisfy 8 <= min_side <= max_side, got {self.min_side} "
                f"and {self.max_side}."
            )
        if self.max_aspect < 1 or self.max_upscale < 1 or self.max_downscale < 1:
            raise ConfigError("max_aspect, max_upscale and max_downscale must be >= 1.")
        if not 0 <= self.whole_fraction <= 1:
            raise ConfigError(f"whole_fraction must be in [0, 1], got {self.whole_fraction}.")


def pipeline_degrade(pipeline: Compose) -> Degrade:
    """A :data:`Degrade` that applies ``pipeline`` (drawing its parameters each call)."""

    def degrade(image: Tensor, generator: torch.Generator) -> Tensor:
        return pipeline(image, generator)[0]

    return degrade


def keep_clean(image: Tensor, generator: torch.Generator) -> Tensor:
    """The ``clean`` class: the image as an 8-bit file would hold it, nothing else."""
    return quantize(image)


def resize_image(image: Tensor, height: int, width: int) -> Tensor:
    """Bilinear, antialiased resize of ``(..., H, W)`` in [0, 1]; a no-op at the same size."""
    if tuple(image.shape[-2:]) == (height, width):
        return image
    batch = image if image.dim() == 4 else image.unsqueeze(0)
    out = F.interpolate(
        batch, size=(height, width), mode="bilinear", align_corners=False, antialias=True
    ).clamp(0, 1)
    return out if image.dim() == 4 else out[0]


def sample_image(photo: Tensor, sizing: Sizing, generator: torch.Generator) -> Tensor:
    """A whole photo or a crop of it ``(3, h, w)``, at a random size and aspect ratio.

    The long side of the result is log-uniform in ``[min_side, max_side]``. With
    probability ``whole_fraction`` it is the whole photo resized (keeping its aspect ratio,
    at most ``max_upscale``× the photo). Otherwise it is a window of random aspect ratio
    (up to ``max_aspect``, either orientation) cut at a zoom between ``1/max_downscale``
    and native, or up to ``max_upscale``× when the photo is too small for the window.
    """
    height, width = photo.shape[-2:]
    top_side = min(sizing.max_side, sizing.max_upscale * max(height, width))
    long_side = _log_uniform(generator, min(sizing.min_side, top_side), top_side)
    if _uniform(generator, 0, 1) < sizing.whole_fraction:
        scale = long_side / max(height, width)
        return resize_image(photo, max(1, round(height * scale)), max(1, round(width * scale)))
    out_h, out_w = _oriented(long_side, sizing, generator)
    fit = max(out_h / height, out_w / width)  # the zoom at which the window fills the photo
    if fit > sizing.max_upscale:
        shrink = sizing.max_upscale / fit
        out_h, out_w, fit = out_h * shrink, out_w * shrink, sizing.max_upscale
    zoom = max(fit, 1 / _log_uniform(generator, 1.0, sizing.max_downscale))
    win_h, win_w = min(height, round(out_h / zoom)), min(width, round(out_w / zoom))
    window = _cut(photo, win_h, win_w, generator)
    return resize_image(window, max(1, round(out_h)), max(1, round(out_w)))


def native_crop(image: Tensor, sizing: Sizing, generator: torch.Generator) -> Tensor:
    """A window of ``image`` ``(..., H, W)`` at its own resolution, long side log-uniform in
    ``[min(min_side, long side), long side]`` and a random aspect ratio up to ``max_aspect``."""
    height, width = image.shape[-2:]
    long_side = _log_uniform(
        generator, min(sizing.min_side, max(height, width)), max(height, width)
    )
    win_h, win_w = _oriented(long_side, sizing, generator)
    win_h, win_w = max(1, min(height, round(win_h))), max(1, min(width, round(win_w)))
    return _cut(image, win_h, win_w, generator)


# Photometric jitter of clean photos (augment=True): gain and gamma ranges, grayscale share.
# A share of photos become night scenes, as dark as under-exposed ones: a dark photo that
# is also blurred or rainy must go to that expert, so darkness alone cannot mean low_light.
# Likewise a share become pale scenes (black point lifted towards a light gray, as mist,
# a pale stain or a washed-out scan look): paleness alone cannot mean haze.
_GAIN = (0.35, 1.2)
_NIGHT_GAIN = (0.08, 0.35)
_NIGHT = 0.2
_GAMMA = (0.8, 1.25)
_PALE = 0.2
_PALE_LIFT = (0.1, 0.5)
_PALE_LEVEL = (0.6, 1.0)
_GRAYSCALE = 0.15


def augment_photo(image: Tensor, generator: torch.Generator) -> Tensor:
    """A clean image ``(..., 3, H, W)`` re-shot: rotated, mirrored, re-exposed, maybe pale
    or gray.

    With a dozen photos a router learns their content (dark skies, gray scans, pale
    microscopy) along with the degradations (a blurred night sky read as low light, a
    blurred pale scan or gray texture read as haze); these variations of orientation,
    exposure, black point, tone curve and colour make such content appear under every
    class, so only the degradation predicts the class. The degradation is drawn
    afterwards, so rain still falls from the top.
    """
    image = torch.rot90(image, int(torch.randint(4, (), generator=generator)), dims=(-2, -1))
    if _uniform(generator, 0, 1) < 0.5:
        image = image.flip(-1)
    night = _uniform(generator, 0, 1) < _NIGHT
    gain = _log_uniform(generator, *(_NIGHT_GAIN if night else _GAIN))
    gamma = _log_uniform(generator, *_GAMMA)
    image = (gain * image.clamp(min=0) ** gamma).clamp(0, 1)
    if _uniform(generator, 0, 1) < _PALE:
        lift = _uniform(generator, *_PALE_LIFT)
        image = image * (1 - lift) + lift * _uniform(generator, *_PALE_LEVEL)
    if _uniform(generator, 0, 1) < _GRAYSCALE:
        image = image.mean(dim=-3, keepdim=True).expand_as(image)
    return image.contiguous()


class RouterExamples(Dataset):
    """Degraded photos at random sizes, as router views with their class.

    Item ``i`` is one degraded image read ``crops`` ways: ``{"views": (crops, 1 + grid²,
    3, size, size) float, "label": int}``, and ``"cepstrum": (crops, 2)`` with
    ``cepstrum`` (:func:`~loraxir.router.statistics.cepstrum_statistics`). The first
    reading is the whole image (see
    :func:`sample_image`), the others are native windows of it (:func:`native_crop`): a
    crop of a degraded photo is itself a degraded photo, and degrading once for several
    examples divides the cost of degradation (the bulk of the data time) by ``crops``.
    Classes take turns (item ``i`` has class ``i % len(degrades)``), so every class gets
    the same number of examples; everything else is drawn from ``(seed, i)``.

    Args:
        photos: clean photos, float ``(3, H, W)`` in [0, 1].
        degrades: one list of :data:`Degrade` per class (a class with several tasks, such
            as noise at σ 15/25/50, draws one of them per example).
        length: number of items (degraded images).
        size, grid, views, cepstrum: the router's view settings (tower input, local views,
            kind, cepstrum crop side or 0).
        crops: readings per degraded image (the whole image, then ``crops - 1`` windows).
        sizing: how images are cut from photos.
        seed: seeds every random choice.
        augment: re-shoot each clean image first (:func:`augment_photo`).
    """

    def __init__(
        self,
        photos: Sequence[Tensor],
        degrades: Sequence[Sequence[Degrade]],
        length: int,
        size: int,
        grid: int,
        views: str,
        crops: int = 1,
        sizing: Sizing | None = None,
        seed: int = 0,
        augment: bool = False,
        cepstrum: int = 0,
    ) -> None:
        if not photos or not degrades or not all(degrades):
            raise ConfigError("RouterExamples needs photos and at least one degradation per class.")
        if crops < 1:
            raise ConfigError(f"crops must be >= 1, got {crops}.")
        self.photos = list(photos)
        self.degrades = [list(options) for options in degrades]
        self.length, self.crops = int(length), int(crops)
        self.size, self.grid, self.views = int(size), int(grid), views
        self.cepstrum = int(cepstrum)
        self.sizing = sizing or Sizing()
        self.seed = int(seed)
        self.augment = bool(augment)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        generator = seeded_generator(self.seed, index)
        label = index % len(self.degrades)
        photo = self.photos[int(torch.randint(len(self.photos), (), generator=generator))]
        image = sample_image(photo, self.sizing, generator)
        if self.augment:
            image = augment_photo(image, generator)
        options = self.degrades[label]
        degrade = options[int(torch.randint(len(options), (), generator=generator))]
        degraded = degrade(image.unsqueeze(0), generator)
        readings = [degraded] + [
            native_crop(degraded, self.sizing, generator) for _ in range(self.crops - 1)
        ]
        views = [multi_view(x, self.size, self.grid, self.views)[0] for x in readings]
        item = {"views": torch.stack(views), "label": label}
        if self.cepstrum:
            item["cepstrum"] = torch.cat([cepstrum_statistics(x, self.cepstrum) for x in readings])
        return item


def labelled_batches(
    items: Dataset, batch_size: int = 16, class_names: Sequence[str] | None = None
) -> Iterator[tuple[Tensor, list[str]]]:
    """``(images, class names)`` batches of a restoration dataset's degraded images, for
    :meth:`DegradationRouter.fit_class_embeddings
    <loraxir.router.DegradationRouter.fit_class_embeddings>`.

    ``items`` yields dicts with ``"lq"`` ``(3, H, W)`` (one size for the whole dataset) and
    ``"task_name"``, as :class:`~loraxir.data.SyntheticPairs` with a ``patch_size`` does.
    With ``class_names``, an item's class is ``class_names[item["label"]]`` instead (suites
    whose tasks share classes, as the recipes' data names them).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}.")
    for start in range(0, len(items), batch_size):
        batch = [items[index] for index in range(start, min(start + batch_size, len(items)))]
        names = [
            item["task_name"] if class_names is None else class_names[int(item["label"])]
            for item in batch
        ]
        yield torch.stack([item["lq"] for item in batch]), names


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _log_uniform(generator: torch.Generator, low: float, high: float) -> float:
    return math.exp(_uniform(generator, math.log(low), math.log(high)))


def _oriented(long_side: float, sizing: Sizing, generator: torch.Generator) -> tuple[float, float]:
    """``(height, width)`` with this long side, a random aspect ratio and orientation."""
    short_side = long_side / _log_uniform(generator, 1.0, sizing.max_aspect)
    if _uniform(generator, 0, 1) < 0.5:
        return long_side, short_side
    return short_side, long_side


def _cut(image: Tensor, height: int, width: int, generator: torch.Generator) -> Tensor:
    """A ``height × width`` window of ``image`` at a random position."""
    top = int(torch.randint(image.shape[-2] - height + 1, (), generator=generator))
    left = int(torch.randint(image.shape[-1] - width + 1, (), generator=generator))
    return image[..., top : top + height, left : left + width]
