"""Restoring one image (or video frame) with a loaded adapter: route once, then tile.

The router sees the whole image once; its gates (and its degradation embedding, read by
DAM blocks) are then pinned with :func:`loraxir.route` for every tile, so all tiles are
restored by the same mixture of experts (a tile alone could look like another
degradation). With a forced degradation
the experts are merged into the base weights for that class (``model.merge``): no
routing, no expert overhead; only DAM blocks without fitted class embeddings still need
the router's embedding, which is then taken from the whole image and pinned the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from loraxir.backbones import input_channels
from loraxir.errors import ConfigError, DataError, RoutingError
from loraxir.inference.tiling import TilePlan, check_tiling, plan_tiles, run_tiled
from loraxir.padding import size_multiple
from loraxir.routing import check_degradations
from loraxir.targeting import resolve_preset
from loraxir.validation import far_outside_unit

if TYPE_CHECKING:
    from loraxir.router import RouterOutput


@dataclass
class Routing:
    """The router's decision for one image: gates and (when routed) class probabilities."""

    degradations: list[str]
    gates: torch.Tensor
    """``(E,)`` mixture applied to every tile."""
    probabilities: torch.Tensor | None = None
    """``(E,)`` the router's belief per class, or ``None`` for a forced degradation."""
    embedding: torch.Tensor | None = None
    """``(D,)`` the router's degradation embedding (read by DAM blocks), or ``None``."""
    unsure_below: float = 0.0
    """The router's threshold: a top probability under it is flagged (:attr:`unsure`)."""

    @property
    def label(self) -> str:
        """The most likely class (the forced one without a router)."""
        scores = self.gates if self.probabilities is None else self.probabilities
        return self.degradations[int(scores.argmax())]

    @property
    def confidence(self) -> float:
        """Probability of :attr:`label` (1.0 for a forced degradation)."""
        if self.probabilities is None:
            return 1.0
        return float(self.probabilities.max())

    @property
    def unsure(self) -> bool:
        """The router's top probability is under its ``unsure_below``: the image may be
        another class (see :meth:`runner_up`), a mixture, or unlike its training images."""
        return self.probabilities is not None and self.confidence < self.unsure_below

    def runner_up(self) -> tuple[str, float] | None:
        """The second most likely class and its probability (``None`` when forced)."""
        if self.probabilities is None or len(self.degradations) < 2:
            return None
        values, indices = self.probabilities.topk(2)
        return self.degradations[int(indices[1])], float(values[1])

    def smoothed(self, previous: Routing | None, momentum: float) -> Routing:
        """Exponential moving average of the gates with ``previous`` (video smoothing):
        ``momentum * previous + (1 - momentum) * these``; probabilities stay per frame."""
        if previous is None or momentum <= 0:
            return self
        gates = momentum * previous.gates + (1 - momentum) * self.gates
        return dataclasses.replace(self, gates=gates)


class Restorer:
    """Restores ``(H, W, 3)`` arrays (``uint8``, ``uint16`` or float in [0, 1]).

    Args:
        model: a :class:`~loraxir.LoraIRModel` (e.g. from :func:`loraxir.load_adapter`).
        degradation: force this class and merge its experts (fast path); ``None`` routes
            each image with the adapter's router.
        tile: largest tile side in pixels (``None``: the whole image at once).
        overlap: pixels shared by neighbouring tiles (blend band; see :mod:`.tiling`).
        multiple: pad sizes to a multiple of this (default: the backbone's own unit).
        route_pixels: images larger than this are area-downscaled to it for routing only,
            so routing a huge image does not need a float copy of it.
        dtype: compute dtype (``torch.float16`` on GPUs for half precision). The router's
            views and cepstrum are always computed in float32 (their anti-aliased
            resampling and FFT have no half-precision CPU kernels), then cast to it.

    Raises :class:`~loraxir.errors.ConfigError` for a ``tile`` and ``overlap`` that cannot
    tile every image with this network, once here rather than for each image. The model is
    put in eval mode and converted to ``dtype``; with ``degradation`` it is merged for that
    class and stays merged (a routed restorer on it then refuses images it routes to another
    class, and a restorer forced to this class refuses to run once another has merged the
    model for its own): give each restorer a model of its own, as ``loraxir restore`` does.
    Any attached router works: a :class:`~loraxir.router.DegradationRouter`, or a module
    whose ``router(x)`` gives gates (then also read as the class probabilities).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        degradation: str | None = None,
        tile: int | None = 512,
        overlap: int = 32,
        multiple: int | None = None,
        route_pixels: int = 16_000_000,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(route_pixels, bool) or not isinstance(route_pixels, int) or route_pixels < 1:
            raise ConfigError(f"route_pixels must be a whole number >= 1, got {route_pixels!r}.")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError(
                f"dtype must be a float torch dtype (torch.float32, torch.float16 or "
                f"torch.bfloat16), got {dtype!r}."
            )
        self.model = model.eval()
        self.degradation = degradation
        self.tile, self.overlap, self.route_pixels = tile, overlap, route_pixels
        channels = input_channels(model.model)
        if channels not in (None, 3):
            raise ConfigError(
                f"This backbone takes {channels}-channel images, but the restorer (and loraxir "
                "restore) feeds RGB images (H, W, 3); call the model on your "
                f"{channels}-channel tensors directly: model(x)."
            )
        config = model.config
        preset = resolve_preset(model.model, config.preset, config.target_modules)
        self.multiple = multiple or size_multiple(model.model, preset)
        check_tiling(tile, overlap, self.multiple)
        self.device = next(model.parameters()).device
        self.dtype = dtype
        router = getattr(model, "loraxir_router", None)
        # A forced class's DAM blocks still read the router's embedding when it has no fitted
        # class embeddings: take it from the whole image (float32 views), as routing does,
        # rather than let the model run the router on each tile in the compute dtype.
        self._embeds_forced = (
            degradation is not None
            and router is not None
            and getattr(model.config, "dam", None) is not None
            and getattr(router, "class_embeddings", None) is None
        )
        if degradation is not None:
            model.merge(degradation=degradation)
        elif router is None:
            raise RoutingError(
                "This adapter has no router, so it cannot pick experts by itself. Pass "
                f"--degradation NAME (one of {model.degradations})."
            )
        self.model.to(dtype=dtype)

    @property
    def degradations(self) -> list[str]:
        return list(self.model.degradations)

    def plan(self, height: int, width: int) -> TilePlan:
        """The tile plan for an image of this size."""
        return plan_tiles(height, width, self.tile, self.overlap, self.multiple)

    @torch.inference_mode()
    def route(self, pixels: np.ndarray) -> Routing:
        """Route the whole image once (or report the forced degradation)."""
        _check_pixels(pixels)
        names = self.degradations
        if self.degradation is not None:
            gates = torch.zeros(len(names))
            gates[names.index(self.degradation)] = 1.0
            embedding = self._run_router(pixels)[2] if self._embeds_forced else None
            return Routing(names, gates, embedding=embedding)
        gates, probabilities, embedding = self._run_router(pixels)
        return Routing(
            names,
            gates,
            probabilities,
            embedding,
            float(getattr(self.model.loraxir_router, "unsure_below", 0.0)),
        )

    def _run_router(
        self, pixels: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Gates, class probabilities and embedding of the whole image, on the CPU in
        float32. A :class:`~loraxir.router.DegradationRouter` computes its views in float32
        and casts them to its dtype; any other router (``router(x) -> gates``, see
        :meth:`~loraxir.LoraIRModel.attach_router`) gives gates only, read as the
        probabilities too."""
        router = self.model.loraxir_router
        # Gate i drives expert i: a router of other classes (the model switched to another
        # adapter, or the router grew) would restore with the wrong experts, silently.
        classes = getattr(router, "degradations", None)
        if classes is not None:
            check_degradations(classes, self.degradations)
        view = _routing_view(pixels, self.route_pixels).to(self.device)
        if not hasattr(router, "route"):
            gates = router(view)[0].float().cpu()
            return gates, gates, None
        output: RouterOutput = router.route(view)
        probabilities = torch.softmax(output.logits[0].float(), dim=-1).cpu()
        return output.gates[0].float().cpu(), probabilities, output.embedding[0].float().cpu()

    def restore(
        self,
        pixels: np.ndarray,
        routing: Routing | None = None,
        on_tile: Callable[[], None] | None = None,
    ) -> tuple[np.ndarray, Routing]:
        """Restore ``pixels`` ``(H, W, 3)`` into a new array of the same dtype; returns it
        and the routing used (computed here when not given)."""
        if routing is None:
            routing = self.route(pixels)  # which checks the pixels
        elif isinstance(routing, Routing):
            if list(routing.degradations) != self.degradations:
                raise RoutingError(
                    f"routing is for the classes {list(routing.degradations)}, but this "
                    f"restorer's adapter has {self.degradations}: gate i drives expert i. "
                    "Route the image with this restorer (restorer.route(pixels))."
                )
            _check_pixels(pixels)
        else:
            raise ConfigError(
                f"routing must be a Routing (from Restorer.route), got {type(routing).__name__}; "
                "to force a class, build the restorer with Restorer(model, degradation=NAME)."
            )
        plan = self.plan(*pixels.shape[:2])
        out = np.empty_like(pixels)
        with self._pinned(routing):
            run_tiled(self.model, pixels, plan, out, self.device, self.dtype, on_tile)
        return out, routing

    @contextlib.contextmanager
    def _pinned(self, routing: Routing) -> Iterator[None]:
        # Pinned even when forced: the model then refuses to run if another restorer has
        # merged it for another class since (it would restore as that class).
        from loraxir import route

        gates = routing.gates.to(self.device, self.dtype).unsqueeze(0)
        embedding = routing.embedding
        if embedding is not None:
            embedding = embedding.to(self.device, self.dtype).unsqueeze(0)
        with route(self.model, gates=gates, embedding=embedding):
            yield


def _check_pixels(pixels: object) -> None:
    """Refuse what the tiles and the router would reject from deep inside NumPy or torch:
    the restorer takes one ``(H, W, 3)`` image as a NumPy array, as image files decode."""
    if not isinstance(pixels, np.ndarray):
        raise DataError(
            f"The restorer takes one image as a NumPy array (H, W, 3), got "
            f"{type(pixels).__name__}; for a torch batch (B, 3, H, W) call the model: model(x)."
        )
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise DataError(
            f"The restorer takes one RGB image (H, W, 3), got shape {pixels.shape}; repeat a "
            "grayscale image (np.repeat(gray[..., None], 3, axis=2)), drop alpha "
            "(pixels[..., :3]), or restore a batch's images one at a time."
        )
    if not (pixels.dtype in (np.uint8, np.uint16) or np.issubdtype(pixels.dtype, np.floating)):
        raise DataError(
            f"The restorer takes uint8, uint16 or float pixels (float in [0, 1]), got "
            f"{pixels.dtype}."
        )
    if np.issubdtype(pixels.dtype, np.floating) and pixels.size:
        low, high = float(pixels.min()), float(pixels.max())
        if not (np.isfinite(low) and np.isfinite(high)):
            raise DataError(
                "The float pixels hold NaN or infinite values; check the decoding or the "
                "arithmetic that produced them (np.nan_to_num clears them)."
            )
        if far_outside_unit(low, high):
            raise DataError(
                f"Float pixels are in [0, 1], got values in [{low:.4g}, {high:.4g}]; divide "
                "0-255 values by 255."
            )


def _routing_view(pixels: np.ndarray, max_pixels: int) -> torch.Tensor:
    """``(1, 3, h, w)`` float view in [0, 1] of the whole image for the router, shrunk by
    area averaging (done in bands, never as a full float copy) above ``max_pixels``."""
    height, width = pixels.shape[:2]
    scale = 255.0 if pixels.dtype == np.uint8 else 65535.0 if pixels.dtype == np.uint16 else 1.0
    factor = max(1, int(np.ceil(np.sqrt(height * width / max_pixels))))
    if factor == 1:
        tensor = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        return tensor.permute(2, 0, 1).unsqueeze(0) / scale
    bands = []
    band = factor * 64
    for top in range(0, height, band):
        chunk = torch.from_numpy(np.ascontiguousarray(pixels[top : top + band], np.float32))
        chunk = chunk.permute(2, 0, 1).unsqueeze(0) / scale
        bands.append(F.avg_pool2d(chunk, factor, ceil_mode=True))
    return torch.cat(bands, dim=2)
