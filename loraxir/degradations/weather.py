"""Weather: rain streaks, snow, raindrops on the lens and haze.

Rain and snow are particle layers: sparse random impulses, spread by a kernel (a rotated
line for rain, a blob with a short trail for snow), screen-blended over the image so they
brighten it as light scattered by water does. Haze follows the atmospheric scattering
model ``I = J·t + A·(1 − t)`` with transmission ``t = exp(−β·d)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from kornia.color import rgb_to_grayscale
from kornia.filters import get_gaussian_kernel2d
from torch import Tensor

from loraxir.degradations.blur import convolve, gaussian, motion_kernel
from loraxir.degradations.registry import Param, register
from loraxir.errors import DataError

_DEPTH_GRID = 64


def _particle_kernel(
    length: int, angle: float, size: float, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """The shape one particle leaves: a line of ``length`` px at ``angle`` (0 = falling
    straight down) blurred by a Gaussian of σ ``size`` px, scaled to a peak of 1 so that a
    particle's brightness does not depend on its shape."""
    if length > 1:
        line = motion_kernel(length, 90.0 + angle, device, dtype)
    else:
        line = torch.ones((1, 1, 1), device=device, dtype=dtype)
    radius = math.ceil(3 * size)
    blob = get_gaussian_kernel2d((2 * radius + 1, 2 * radius + 1), (size, size))
    blob = blob.to(device=device, dtype=dtype)
    kernel = F.conv2d(line[None], blob[None].flip(-1, -2), padding=2 * radius)[0]
    return kernel / kernel.max()


def _particles(
    images: Tensor,
    generator: torch.Generator,
    density: float,
    length: int,
    angle: float,
    size: float,
) -> Tensor:
    """A ``(B, 1, H, W)`` layer in [0, 1]: impulses with probability ``density`` per pixel,
    random strength in [0.5, 1], spread by :func:`_particle_kernel`.

    The draws are float32 whatever the images' dtype: uniform draws in half precision are
    too coarse for densities of a few per thousand (bfloat16 started 2.5× as many streaks),
    and the same seed then places the same particles in every dtype."""
    batch, _, height, width = images.shape
    shape = (batch, 1, height, width)
    options = {"generator": generator, "device": images.device, "dtype": torch.float32}
    seeds = torch.rand(shape, **options) < density
    strength = 0.5 + 0.5 * torch.rand(shape, **options)
    kernel = _particle_kernel(length, angle, size, images.device, images.dtype)
    layer = convolve((seeds * strength).to(images.dtype), kernel, border="constant")
    return layer.clamp(0, 1)


def _screen(images: Tensor, layer: Tensor) -> Tensor:
    """Screen blend: brightens like added light, never exceeds 1."""
    return 1 - (1 - images) * (1 - layer)


@register(
    "rain",
    {
        "density": Param(0, 0.2, (0.002, 0.01), "probability that a pixel starts a streak"),
        "length": Param(1, 99, (10, 40), "streak length in pixels (even lengths round up)", True),
        "angle": Param(-80, 80, (-30.0, 30.0), "streak angle in degrees from vertical"),
        "width": Param(0.2, 5, (0.4, 0.9), "streak thickness (Gaussian σ in pixels)"),
        "brightness": Param(0, 1, (0.4, 0.8), "streak opacity"),
    },
    "rain streaks: sparse impulses, rotated motion blur, screen blend (Rain100L-like)",
)
def _rain(
    images: Tensor,
    generator: torch.Generator,
    density: float,
    length: int,
    angle: float,
    width: float,
    brightness: float,
) -> Tensor:
    layer = _particles(images, generator, density, length, angle, width)
    return _screen(images, brightness * layer)


@register(
    "snow",
    {
        "density": Param(0, 0.05, (0.001, 0.004), "probability that a pixel holds a flake"),
        "size": Param(0.2, 8, (0.6, 1.8), "flake radius (Gaussian σ in pixels)"),
        "length": Param(
            1,
            31,
            (1, 6),
            "motion trail of a flake in pixels (1: none; even lengths round up)",
            True,
        ),
        "angle": Param(-80, 80, (-30.0, 30.0), "falling angle in degrees from vertical"),
        "brightness": Param(0, 1, (0.7, 1.0), "flake opacity"),
    },
    "snowflakes: soft blobs with short trails, screen blend (Snow100K-like)",
)
def _snow(
    images: Tensor,
    generator: torch.Generator,
    density: float,
    size: float,
    length: int,
    angle: float,
    brightness: float,
) -> Tensor:
    layer = _particles(images, generator, density, length, angle, size)
    return _screen(images, brightness * layer)


@register(
    "raindrop",
    {
        "count": Param(0, 500, (10, 30), "number of drops on the lens", True),
        "radius": Param(1, 200, (5.0, 14.0), "mean drop radius in pixels (each 0.5-1.5x)"),
        "blur": Param(0, 20, (3.0, 8.0), "defocus of the scene seen through a drop (σ px)"),
    },
    "raindrops on the lens: soft elliptical blobs showing a blurred, brighter scene",
)
def _raindrop(
    images: Tensor, generator: torch.Generator, count: int, radius: float, blur: float
) -> Tensor:
    mask = _drop_mask(images, generator, count, radius)
    seen = (gaussian(images, blur) * 1.05 + 0.04).clamp(0, 1)
    return images * (1 - mask) + seen * mask


def _drop_mask(images: Tensor, generator: torch.Generator, count: int, radius: float) -> Tensor:
    """``(B, 1, H, W)`` coverage in [0, 1] of ``count`` elliptical drops per image, each of
    radius 0.5–1.5 × ``radius`` with a 1.5-pixel soft edge.

    Each drop is drawn inside its bounding box only, with numpy on the CPU: hundreds of
    tiny windows cost far less there than as device kernels, whatever the image size.
    """
    batch, _, height, width = images.shape
    draws = torch.rand(
        4, count, batch, generator=generator, device=images.device, dtype=torch.float64
    )
    mask = np.zeros((batch, height, width), dtype=np.float64)
    for index, (y, x, size, aspect) in enumerate(draws.permute(1, 2, 0).reshape(-1, 4).tolist()):
        y, x, size, aspect = y * height, x * width, radius * (0.5 + size), 0.75 + 0.5 * aspect
        top, bottom = max(0, int(y - size / aspect)), min(height, int(y + size / aspect) + 2)
        left, right = max(0, int(x - size * aspect)), min(width, int(x + size * aspect) + 2)
        rows = (np.arange(top, bottom)[:, None] - y) * aspect
        cols = (np.arange(left, right)[None, :] - x) / aspect
        drop = np.clip((size - np.sqrt(rows**2 + cols**2)) / 1.5, 0, 1)
        window = mask[index % batch, top:bottom, left:right]
        np.maximum(window, drop, out=window)
    return torch.from_numpy(mask).to(device=images.device, dtype=images.dtype)[:, None]


def estimate_depth(images: Tensor) -> Tensor:
    """A smooth stand-in depth map ``(B, 1, H, W)`` in [0, 1] (1 = farthest) for images
    without one.

    Half a vertical prior (the top of an outdoor photo is usually farther) and half the
    image's darkness, smoothed on a coarse grid so that the haze varies slowly, not with
    texture: darker, higher regions count as farther and get less transmission.
    """
    height, width = images.shape[-2:]
    luminance = rgb_to_grayscale(images)
    coarse = F.interpolate(luminance, size=(_DEPTH_GRID, _DEPTH_GRID), mode="area")
    coarse = gaussian(coarse, _DEPTH_GRID / 12)
    darkness = 1 - F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    low = darkness.amin(dim=(2, 3), keepdim=True)
    high = darkness.amax(dim=(2, 3), keepdim=True)
    darkness = (darkness - low) / (high - low).clamp(min=1e-6)
    rows = torch.linspace(1, 0, height, device=images.device, dtype=images.dtype)
    return 0.5 * darkness + 0.5 * rows[None, None, :, None]


def _depth_batch(depth: Tensor, images: Tensor) -> Tensor:
    """Check a user depth map and broadcast it to ``(B, 1, H, W)``."""
    height, width = images.shape[-2:]
    if not isinstance(depth, Tensor) or depth.shape[-2:] != (height, width) or depth.ndim > 4:
        shape = tuple(depth.shape) if isinstance(depth, Tensor) else type(depth).__name__
        raise DataError(
            f"haze: depth must be a tensor of shape (H, W), (1, H, W) or (B, 1, H, W) with "
            f"H, W = {height}, {width}, got {shape}."
        )
    depth = depth.to(device=images.device, dtype=images.dtype).reshape(-1, 1, height, width)
    if depth.shape[0] not in (1, images.shape[0]):
        raise DataError(
            f"haze: depth holds {depth.shape[0]} maps for a batch of {images.shape[0]}; pass "
            "one map for the whole batch or one per image."
        )
    if not torch.isfinite(depth).all():
        raise DataError(
            "haze: depth holds NaN or infinite values, which give NaN pixels; give the sky "
            "and other far regions a large finite depth instead."
        )
    if depth.min() < 0:
        raise DataError("haze: depth must be non-negative (a distance; larger = farther).")
    return depth.expand(images.shape[0], 1, height, width)


@register(
    "haze",
    {
        "beta": Param(0, 10, (0.8, 2.5), "scattering coefficient β (per unit of depth)"),
        "airlight": Param(0, 1, (0.7, 1.0), "atmospheric light A (grey)"),
    },
    "atmospheric scattering I = J·t + A(1-t), t = exp(-β·d), d given or estimated (SOTS-like)",
    extras=("depth",),
)
def _haze(
    images: Tensor,
    generator: torch.Generator,
    beta: float,
    airlight: float,
    depth: Tensor | None = None,
) -> Tensor:
    distance = estimate_depth(images) if depth is None else _depth_batch(depth, images)
    transmission = torch.exp(-beta * distance)
    return images * transmission + airlight * (1 - transmission)
