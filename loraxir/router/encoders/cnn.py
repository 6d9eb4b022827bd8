"""``"cnn-tiny"``: a small CNN trained with the router, for CPUs and tests."""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraxir.router.encoders.base import DegradationEncoder, register_encoder

TINY_CNN_NAME = "cnn-tiny"
# Added to the pooled variance: keeps the std finite with a finite gradient on a 1×1 map or
# a flat image (the std of a single value is undefined; its gradient at 0 is infinite).
_VARIANCE_EPS = 1e-6
# A fixed 3×3 Laplacian: the pixel minus the mean of its 4 neighbours (per channel).
_LAPLACIAN = torch.tensor([[0.0, -0.25, 0.0], [-0.25, 1.0, -0.25], [0.0, -0.25, 0.0]])


@register_encoder("cnn")
class TinyCNNEncoder(DegradationEncoder):
    """A small CNN for CPU training and tests (``"cnn-tiny"``), random-initialised.

    Four stages, the first at full input resolution, each later one halving it. Every
    stage's output is pooled by mean *and* standard deviation and the pooled statistics of
    all stages are concatenated: noise, blur and compression show up in the energy of fine
    detail (early, high-resolution stages) more than in the average deep response, and
    this gives the head direct access to it. On top, the log energy of a fixed Laplacian
    high-pass of the input (mean absolute value and std per colour channel) is pooled: a
    random-initialised network otherwise takes tens of steps to discover that noise and
    blur are a matter of fine-detail energy. Works at any ``image_size >= 1``.
    """

    def __init__(self, image_size: int = 64, width: int = 16, embed_dim: int = 128) -> None:
        super().__init__(image_size, embed_dim)
        self.width = int(width)
        widths = [self.width, 2 * self.width, 4 * self.width, 8 * self.width]
        stages = [nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1), nn.GELU())]
        for c_in, c_out in itertools.pairwise(widths):
            stages.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                    nn.GroupNorm(min(8, c_out), c_out),
                    nn.GELU(),
                )
            )
        self.stages = nn.ModuleList(stages)
        self.proj = nn.Linear(2 * sum(widths) + 6, self.embed_dim)
        self.register_buffer("laplacian", _LAPLACIAN.expand(3, 1, 3, 3).clone(), persistent=False)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        padded = F.pad(pixels, (1, 1, 1, 1), mode="replicate")
        detail = F.conv2d(padded, self.laplacian.to(pixels.dtype), groups=3).flatten(2)
        energy = torch.cat(
            [detail.abs().mean(-1), (detail.var(-1, correction=0) + _VARIANCE_EPS).sqrt()], -1
        )
        pooled = [torch.log(energy + 1e-3)]
        features = pixels
        for stage in self.stages:
            features = stage(features)
            flat = features.flatten(2)
            variance = flat.var(-1, correction=0)
            pooled += [flat.mean(-1), (variance + _VARIANCE_EPS).sqrt()]
        return self.proj(torch.cat(pooled, dim=-1))

    def spec(self) -> dict[str, Any]:
        return self._spec(
            name=TINY_CNN_NAME,
            image_size=self.image_size,
            width=self.width,
            embed_dim=self.embed_dim,
        )

    @classmethod
    def from_spec(cls, spec: dict[str, Any], module: nn.Module | None = None) -> TinyCNNEncoder:
        return cls(spec["image_size"], spec["width"], spec["embed_dim"])
