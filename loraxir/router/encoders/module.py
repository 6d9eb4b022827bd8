"""Any ``nn.Module`` as a router encoder (``"custom"`` in a spec)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from loraxir.errors import ConfigError
from loraxir.router.encoders.base import DegradationEncoder, register_encoder


@register_encoder("custom")
class ModuleEncoder(DegradationEncoder):
    """Wrap a user ``nn.Module`` mapping normalised ``(N, 3, S, S)`` pixels to ``(N, D)``.

    ``embed_dim`` is found with one dry run at ``image_size`` when not given. Its weights
    are always saved with the router (there is no reference to reload them from), and a
    saved router can only be rebuilt by passing the module again (:meth:`from_spec`).
    """

    def __init__(
        self,
        module: nn.Module,
        image_size: int = 224,
        embed_dim: int | None = None,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        if embed_dim is None:
            embed_dim = _probe_embed_dim(module, image_size)
        super().__init__(image_size, embed_dim, mean, std)
        self.module = module

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module(pixels)

    def spec(self) -> dict[str, Any]:
        cls = type(self.module)
        return self._spec(
            **{"class": f"{cls.__module__}.{cls.__qualname__}"},
            image_size=self.image_size,
            embed_dim=self.embed_dim,
            mean=self.mean.flatten().tolist(),
            std=self.std.flatten().tolist(),
        )

    @classmethod
    def from_spec(cls, spec: dict[str, Any], module: nn.Module | None = None) -> ModuleEncoder:
        if module is None:
            raise ConfigError(
                f"This router was built on a custom encoder module ({spec.get('class')}), "
                "which cannot be rebuilt from a config. Pass it explicitly: "
                "DegradationRouter.from_config(config, encoder=YourModule(...)) or "
                "from_pretrained(folder, encoder=...), or attach the router object itself."
            )
        return cls(module, spec["image_size"], spec["embed_dim"], spec["mean"], spec["std"])


def _probe_embed_dim(module: nn.Module, image_size: int) -> int:
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    with torch.no_grad():
        out = module(torch.zeros(1, 3, image_size, image_size, device=device))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError(
            f"A custom encoder must map (N, 3, {image_size}, {image_size}) to (N, D); "
            f"{type(module).__name__} returned {getattr(out, 'shape', type(out).__name__)}."
        )
    return int(out.shape[1])
