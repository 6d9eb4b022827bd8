"""Blur: Gaussian (optical), linear motion (camera shake) and disk (defocus).

Sizes are in pixels. Borders are replicated, which keeps a flat image flat and works for
kernels larger than the image. A strength of zero (σ, length or radius) is the identity.
"""

from __future__ import annotations

import math

import torch
from kornia.filters import fft_conv, filter2d, gaussian_blur2d, get_motion_kernel2d
from torch import Tensor

from loraxir.degradations.registry import Param, register

_BORDER = "replicate"
# Above this kernel side an FFT convolution is faster on a CPU (measured at 256², batch 16).
_FFT_FROM = 13


def motion_kernel(length: int, angle: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A ``(1, k, k)`` line kernel of ``length`` pixels at ``angle`` degrees (0 = horizontal,
    counter-clockwise), summing to 1. Even lengths use the next odd kernel size, because a
    centred line kernel needs a centre pixel."""
    size = max(3, length + 1 - length % 2)
    kernel = get_motion_kernel2d(size, float(angle), 0.0, mode="bilinear")
    return kernel.to(device=device, dtype=dtype)


def convolve(images: Tensor, kernel: Tensor, border: str = _BORDER) -> Tensor:
    """Correlate every channel with ``kernel`` ``(1, k, k)`` ("same" size); large kernels
    go through kornia's FFT convolution, which equals the direct one up to float roundoff."""
    if kernel.shape[-1] > _FFT_FROM:
        return fft_conv(images, kernel, border_type=border)
    return filter2d(images, kernel, border_type=border)


def gaussian(images: Tensor, sigma: float) -> Tensor:
    """Gaussian blur with standard deviation ``sigma`` pixels (truncated at 3σ)."""
    if sigma <= 0:
        return images
    size = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur2d(images, (size, size), (sigma, sigma), border_type=_BORDER)


def _disk_kernel(radius: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A ``(1, k, k)`` disk of ``radius`` pixels, anti-aliased by 8×8 supersampling."""
    half = math.ceil(radius)
    supersample = 8
    steps = (torch.arange((2 * half + 1) * supersample, dtype=torch.float64) + 0.5) / supersample
    coords = steps - (half + 0.5)
    inside = (coords[None, :] ** 2 + coords[:, None] ** 2 <= radius**2).to(torch.float64)
    size = 2 * half + 1
    kernel = inside.reshape(size, supersample, size, supersample).mean(dim=(1, 3))
    kernel = kernel / kernel.sum()
    return kernel[None].to(device=device, dtype=dtype)


@register(
    "gaussian_blur",
    {"sigma": Param(0, 20, (0.5, 3.0), "Gaussian σ in pixels")},
    "isotropic Gaussian blur",
)
def _gaussian_blur(images: Tensor, generator: torch.Generator, sigma: float) -> Tensor:
    return gaussian(images, sigma)


@register(
    "motion_blur",
    {
        "length": Param(0, 99, (5, 25), "streak length in pixels (even lengths round up)", True),
        "angle": Param(-180, 180, (-180.0, 180.0), "direction in degrees, 0 = horizontal"),
    },
    "linear camera-shake blur of a given length and angle (GoPro-like)",
)
def _motion_blur(images: Tensor, generator: torch.Generator, length: int, angle: float) -> Tensor:
    if length <= 1:
        return images
    return convolve(images, motion_kernel(length, angle, images.device, images.dtype))


@register(
    "defocus_blur",
    {"radius": Param(0, 30, (1.0, 6.0), "radius of the disk (circle of confusion) in pixels")},
    "out-of-focus blur with a uniform disk kernel",
)
def _defocus_blur(images: Tensor, generator: torch.Generator, radius: float) -> Tensor:
    if radius <= 0:
        return images
    return convolve(images, _disk_kernel(radius, images.device, images.dtype))
