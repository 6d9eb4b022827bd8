"""Sensor noise: additive Gaussian (the denoising benchmarks) and signal-dependent noise.

σ values are on the 0–255 scale, as the papers quote them (σ=25 means a standard deviation
of 25/255 on [0, 1] images). Noise is drawn independently per pixel and channel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from loraxir.degradations.registry import Param, register


def shot_read(images: Tensor, shot: float, read: float, generator: torch.Generator) -> Tensor:
    """Add heteroscedastic Gaussian noise with variance ``shot * x + (read / 255) ** 2``.

    This is the Gaussian approximation of Poisson (photon shot) plus Gaussian (read) noise
    used to model raw sensors: brighter pixels get more noise. ``shot`` is the variance gain
    on the [0, 1] scale (the reciprocal of the number of photons at white), ``read`` a
    standard deviation on the 0–255 scale. Clipping is left to the caller.
    """
    variance = shot * images.clamp(min=0) + (read / 255) ** 2
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return images + variance.sqrt() * noise


@register(
    "noise",
    {"sigma": Param(0, 255, (5.0, 50.0), "Gaussian σ on the 0-255 scale")},
    "additive white Gaussian noise, clipped and rounded to 8 bits (BSD68/CBSD68 setting)",
)
def _noise(images: Tensor, generator: torch.Generator, sigma: float) -> Tensor:
    return shot_read(images, 0.0, sigma, generator)


@register(
    "shot_read_noise",
    {
        "shot": Param(0, 0.1, (0.001, 0.02), "shot-noise variance gain on the [0, 1] scale"),
        "read": Param(0, 255, (1.0, 10.0), "read-noise σ on the 0-255 scale"),
    },
    "signal-dependent sensor noise: variance shot·x + (read/255)²",
)
def _shot_read_noise(
    images: Tensor, generator: torch.Generator, shot: float, read: float
) -> Tensor:
    return shot_read(images, shot, read, generator)
