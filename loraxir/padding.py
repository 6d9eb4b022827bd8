"""Padding images to the side multiple a backbone needs, by mirror reflection.

Backbones with downsampling stages need sides that are a multiple of some unit. NAFNet pads
inside its own forward, with zeros: on a photo whose sides are not multiples of 16 the
network sees a black band it never saw in training, and the restored border (and, through
its global channel attention, the whole image) gets worse: 0.8–1.8 dB on a 300×400
photo (see docs/api.md). Reflecting the image instead continues its content, which is
what training crops look like. Both :class:`~loraxir.LoraIRModel` and tiled inference pad
this way.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from loraxir.backbones import Preset

_UNIT_ATTRIBUTES = ("padder_size", "window_size")


def backbone_unit(backbone: torch.nn.Module, preset: Preset | None = None) -> int | None:
    """The side multiple ``backbone`` needs: its family preset's ``side_multiple`` when it
    has one (SCUNet, Restormer), else what the network declares (NAFNet's ``padder_size``,
    a Swin transformer's ``window_size``), or ``None`` when neither says. ``preset`` is
    the one a model's config names (default: the one detected from the backbone)."""
    from loraxir.backbones import detect_preset

    # A named preset's own side_multiple first (1: no padding), else the family's: a
    # preset naming only targets must not drop the padding Restormer or SCUNet need.
    for candidate in (preset, detect_preset(backbone)):
        if candidate is not None and candidate.side_multiple is not None:
            return candidate.side_multiple
    for name in _UNIT_ATTRIBUTES:
        value = getattr(backbone, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def size_multiple(backbone: torch.nn.Module, preset: Preset | None = None) -> int:
    """The side multiple tiles use: the backbone's unit, at least 8 (and a multiple of 8) so
    tiles stay aligned with common downsampling."""
    return math.lcm(8, backbone_unit(backbone, preset) or 1)


def reflect_indices(indices: np.ndarray, size: int) -> np.ndarray:
    """Map indices past the end of an axis of ``size`` back inside by mirror reflection
    (as ``np.pad(mode="reflect")``, repeated for pads longer than the axis)."""
    if size == 1:
        return np.zeros_like(indices)
    period = 2 * (size - 1)
    folded = np.mod(indices, period)
    return np.where(folded >= size, period - folded, folded)


def reflect_pad(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """``images`` ``(..., H, W)`` padded at the bottom and right to sides that are multiples
    of ``multiple``, by reflection (any pad length, even past a 1-pixel side)."""
    height, width = images.shape[-2:]
    padded = images
    for dim, size in ((-2, height), (-1, width)):
        target = -(-size // multiple) * multiple
        if target != size:
            index = torch.from_numpy(reflect_indices(np.arange(target), size))
            padded = padded.index_select(dim, index.to(images.device))
    return padded


def run_padded(
    network: torch.nn.Module,
    x: torch.Tensor,
    preset: Preset | None = None,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """``network(x)`` at any size: when the network declares a side unit (see
    :func:`backbone_unit`) and a side of ``x`` is not a multiple of it, ``x`` is
    reflect-padded to :func:`size_multiple` and the output cropped back (scaled for a
    network that changes the size). Without a unit, or for other than ``(B, C, H, W)``
    inputs, the network runs on ``x`` as given."""
    if backbone_unit(network, preset) in (None, 1) or x.dim() != 4:  # 1: no padding
        return network(x, *args, **kwargs)
    unit = size_multiple(network, preset)
    if x.shape[-2] % unit == 0 and x.shape[-1] % unit == 0:
        return network(x, *args, **kwargs)
    padded = reflect_pad(x, unit)
    out = network(padded, *args, **kwargs)
    height = x.shape[-2] * out.shape[-2] // padded.shape[-2]
    width = x.shape[-1] * out.shape[-1] // padded.shape[-1]
    return out[..., :height, :width]
