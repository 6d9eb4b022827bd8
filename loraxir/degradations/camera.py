"""Camera pipeline degradations: JPEG compression, resolution loss and low light."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from loraxir.degradations.noise import shot_read
from loraxir.degradations.registry import Param, register


def jpeg_roundtrip(images: Tensor, quality: int) -> Tensor:
    """Encode every image as a real JPEG file with Pillow (libjpeg, 4:2:0 chroma
    subsampling, as OpenCV and most papers' scripts do) and decode it again.

    Not a differentiable approximation: blocking and ringing are exactly those of a file.
    Runs on the CPU; the result returns to the input's device and dtype.
    """
    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
    decoded = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        decoded.append(np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    out = torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2)
    return out.to(device=images.device, dtype=images.dtype) / 255


@register(
    "jpeg",
    {"quality": Param(1, 100, (10, 50), "JPEG quality factor (libjpeg scale)", True)},
    "real JPEG compression (Pillow/libjpeg encode then decode)",
)
def _jpeg(images: Tensor, generator: torch.Generator, quality: int) -> Tensor:
    return jpeg_roundtrip(images, quality)


@register(
    "downsample",
    {"scale": Param(2, 4, (2, 4), "down-sampling factor", True, choices=(2, 4))},
    "bicubic down-sampling by the factor (anti-aliased) then bicubic up-sampling back",
)
def _downsample(images: Tensor, generator: torch.Generator, scale: int) -> Tensor:
    height, width = images.shape[-2:]
    small = (max(1, height // scale), max(1, width // scale))
    # PyTorch's CPU kernel for anti-aliased bicubic has no half-precision version: compute
    # those in float32 there (other dtypes and devices are resampled as they come).
    work = images
    if images.device.type == "cpu" and images.dtype in (torch.float16, torch.bfloat16):
        work = images.float()
    low = F.interpolate(work, size=small, mode="bicubic", align_corners=False, antialias=True)
    out = F.interpolate(low, size=(height, width), mode="bicubic", align_corners=False)
    return out.to(images.dtype)


@register(
    "low_light",
    {
        "factor": Param(0.01, 1, (0.05, 0.3), "brightness multiplier (1 = unchanged)"),
        "gamma": Param(0.2, 5, (1.0, 2.0), "gamma applied before darkening (>1 darkens more)"),
        "shot": Param(0, 0.1, (0.0, 0.005), "shot-noise variance gain on the [0, 1] scale"),
        "read": Param(0, 255, (0.5, 4.0), "read-noise σ on the 0-255 scale"),
    },
    "under-exposure: factor · x^gamma, then shot and read noise (LOL-like)",
)
def _low_light(
    images: Tensor,
    generator: torch.Generator,
    factor: float,
    gamma: float,
    shot: float,
    read: float,
) -> Tensor:
    dark = factor * images.clamp(min=0) ** gamma
    return shot_read(dark, shot, read, generator)
