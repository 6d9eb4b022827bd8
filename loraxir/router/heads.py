"""Heads: from the degradation embedding ``e_deg`` to one logit per class.

``"linear"`` is the paper's classifier. ``"text"`` scores ``e_deg`` against fixed *text
prototypes*, the CLIP text embeddings of prompts such as "a photo degraded by rain
streaks", so a class can be added by name before any image of it has been seen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Short descriptions for prompts of common degradation class names; others use the name.
_PROMPT_PHRASES = {
    "noise": "Gaussian noise",
    "rain": "rain streaks",
    "haze": "haze",
    "blur": "motion blur",
    "motion_blur": "motion blur",
    "gaussian_blur": "Gaussian blur",
    "low_light": "low light and under-exposure",
    "jpeg": "JPEG compression artifacts",
    "snow": "snow",
    "raindrop": "raindrops on the lens",
}


def degradation_prompt(name: str) -> str:
    """The default text prompt of a degradation class, e.g. ``"a photo degraded by haze"``."""
    if name == "clean":
        return "a clean, sharp, well-exposed photo"
    return f"a photo degraded by {_PROMPT_PHRASES.get(name, name.replace('_', ' '))}"


class TextPrototypeHead(nn.Module):
    """Logits as scaled cosine similarity between projected ``e_deg`` and text prototypes.

    The prototypes (``(E, text_dim)``, unit norm) are fixed; only the projection and the
    logit scale learn, so the image side is pulled towards the text side, as in CLIP.
    """

    def __init__(self, embed_dim: int, prototypes: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_dim, prototypes.shape[1])
        self.register_buffer("prototypes", F.normalize(prototypes.float(), dim=-1))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.proj(embedding), dim=-1)
        prototypes = self.prototypes.to(image.dtype)
        return self.logit_scale.exp().clamp(max=100) * image @ prototypes.T

    def add_class(self, prototype: torch.Tensor) -> None:
        """Append one class whose prototype is ``prototype`` (normalised here)."""
        row = F.normalize(prototype.float().to(self.prototypes.device), dim=-1).view(1, -1)
        self.prototypes = torch.cat([self.prototypes, row])


def grow_linear(old: nn.Linear) -> nn.Linear:
    """A copy of ``old`` with one more (freshly initialised) output row."""
    new = nn.Linear(old.in_features, old.out_features + 1).to(old.weight)
    with torch.no_grad():
        new.weight[:-1].copy_(old.weight)
        new.bias[:-1].copy_(old.bias)
    return new
