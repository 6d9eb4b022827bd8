"""Tiled inference with overlap and smooth blending, streamed so memory stays flat.

The image is padded (by reflection) to a multiple of the backbone's size unit, cut into
tiles of at most ``tile`` pixels per side whose neighbours share at least ``overlap``
pixels, and each tile is restored on its own. Tiles are spaced evenly, so every overlap
is about the same size. Inside each overlap a band of ``overlap`` pixels blends the two
tiles: the first and last quarter of the band are "guard" pixels where only the inner
tile counts, the middle half a raised-cosine cross-fade. The weights of all tiles sum to
exactly one at every pixel, and a tile never contributes within ``overlap // 4`` pixels
of an inner edge, so a network whose receptive field is no wider than that gives the
same result tiled and untiled (NAFNet's and Restormer's attention pool over the whole
tile and SCUNet's windows reach far past the band, so they are only close, not equal;
see ``docs/cli.md``).

Memory: padding is never materialised (tiles read reflected indices); tiles are processed
one row of tiles at a time, and only a float32 strip of one tile row (plus the overlap
carried to the next row) is held, written out to the caller's array as soon as no later
tile touches it. Working memory thus grows with the image width, not its area.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from loraxir.errors import ConfigError
from loraxir.padding import reflect_indices

Process = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TilePlan:
    """Where the tiles of one image go (all sizes in pixels)."""

    height: int
    width: int
    padded_height: int
    padded_width: int
    tile_height: int
    tile_width: int
    overlap: int
    rows: tuple[int, ...]
    """Top edge of each row of tiles, in padded coordinates."""
    cols: tuple[int, ...]
    """Left edge of each column of tiles."""

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def tiles(self) -> Iterator[tuple[int, int]]:
        """``(top, left)`` of every tile, row by row."""
        for top in self.rows:
            for left in self.cols:
                yield top, left


def plan_tiles(
    height: int, width: int, tile: int | None = 512, overlap: int = 32, multiple: int = 8
) -> TilePlan:
    """Plan the tiles of a ``height`` x ``width`` image (``tile=None``: one tile).

    ``tile`` is rounded down to a multiple of ``multiple``; unless one tile covers the
    image, it must be at least three times ``overlap`` so that the blend bands of a tile's
    two sides never meet (see :func:`check_tiling`).
    """
    if height < 1 or width < 1:
        raise ConfigError(f"Cannot tile an image of {height}x{width} pixels.")
    if multiple < 1:
        raise ConfigError(f"multiple must be >= 1, got {multiple}.")
    padded_height, padded_width = _round_up(height, multiple), _round_up(width, multiple)
    given = tile
    if tile is None:
        tile = max(padded_height, padded_width)
    tile = tile // multiple * multiple
    check_tiling(given, overlap, multiple, whole=tile >= max(padded_height, padded_width))
    tile_height, tile_width = min(tile, padded_height), min(tile, padded_width)
    return TilePlan(
        height,
        width,
        padded_height,
        padded_width,
        tile_height,
        tile_width,
        overlap,
        _starts(padded_height, tile_height, overlap),
        _starts(padded_width, tile_width, overlap),
    )


def check_tiling(tile: int | None, overlap: int, multiple: int, whole: bool = False) -> None:
    """Raise :class:`ConfigError`, quoting the values as given, unless tiles of ``tile``
    pixels (rounded down to ``multiple``, the network's size unit) with ``overlap`` can
    tile any image; ``whole``: one tile covers this image, so the overlap is not used.
    ``tile=None`` (no tiling) always can. Callers check once before a run, not per image.
    """
    for name, value in (("overlap", overlap), ("tile", tile)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(
                f"{name} (--{name} on the command line) must be a whole number of pixels, "
                f"got {value!r}."
            )
    if overlap < 0:
        raise ConfigError(f"overlap (--overlap) must be >= 0, got {overlap}.")
    if tile is None:
        return
    if tile < 1:
        raise ConfigError(f"tile (--tile) must be a positive number of pixels, got {tile}.")
    rounded = tile // multiple * multiple
    if rounded < multiple:
        smallest = max(multiple, _round_up(3 * overlap, multiple))
        raise ConfigError(
            f"tile={tile} is under this network's size unit of {multiple} pixels; tiles are "
            f"whole multiples of it. Use tile={smallest} (--tile {smallest}) or more."
        )
    if rounded < 3 * overlap and not whole:
        shown = f"tile={tile}" + (f" (rounded down to {rounded})" if rounded != tile else "")
        raise ConfigError(
            f"{shown} must be at least 3 x overlap={overlap} = {3 * overlap}, so the blend "
            "bands of a tile's two sides never meet. Raise the tile (--tile) or lower the "
            "overlap (--overlap)."
        )


def run_tiled(
    process: Process,
    source: np.ndarray,
    plan: TilePlan,
    out: np.ndarray,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_tile: Callable[[], None] | None = None,
) -> np.ndarray:
    """Restore ``source`` ``(H, W, C)`` tile by tile into ``out`` (same shape) and return it.

    Integer arrays are scaled to [0, 1] (``uint8`` by 255, ``uint16`` by 65535) and the
    result is rounded back into ``out``'s dtype; float arrays pass as they are. ``process``
    maps a ``(1, C, h, w)`` tensor on ``device`` to one of the same shape.
    """
    if source.shape[:2] != (plan.height, plan.width) or out.shape != source.shape:
        raise ConfigError(
            f"Plan for {plan.height}x{plan.width} does not fit input {source.shape} / output "
            f"{out.shape}."
        )
    channels = source.shape[2]
    scale = _scale(source.dtype)
    row_weights = _axis_weights(plan.rows, plan.tile_height, plan.overlap)
    col_weights = _axis_weights(plan.cols, plan.tile_width, plan.overlap)
    col_index = [reflect_indices(np.arange(c, c + plan.tile_width), plan.width) for c in plan.cols]
    carry = np.zeros((0, plan.padded_width, channels), np.float32)
    carry_top = 0
    for row, top in enumerate(plan.rows):
        rows = reflect_indices(np.arange(top, top + plan.tile_height), plan.height)
        band = source[rows]
        strip = np.zeros((plan.tile_height, plan.padded_width, channels), np.float32)
        for left, cols, weights in zip(plan.cols, col_index, col_weights, strict=True):
            tile = torch.from_numpy(np.ascontiguousarray(band[:, cols], dtype=np.float32))
            tile = tile.permute(2, 0, 1).unsqueeze(0).to(device=device, dtype=dtype) / scale
            with torch.inference_mode():
                restored = process(tile)
            if restored.shape != tile.shape:
                raise ConfigError(
                    f"The network maps a {tuple(tile.shape[1:])} (C, H, W) tile to "
                    f"{tuple(restored.shape[1:])}: tiled restoration keeps an image's size and "
                    "channels (super-resolution networks are not supported here); call the "
                    "model on the image directly: model(x)."
                )
            restored = restored[0].permute(1, 2, 0).float().cpu().numpy()
            strip[:, left : left + plan.tile_width] += restored * weights[None, :, None]
            if on_tile is not None:
                on_tile()
        strip *= row_weights[row][:, None, None]
        strip[: len(carry)] += carry
        done = plan.rows[row + 1] - top if row + 1 < len(plan.rows) else plan.tile_height
        _store(out, strip[:done], carry_top, scale)
        carry, carry_top = strip[done:].copy(), top + done
    return out


def _store(out: np.ndarray, rows: np.ndarray, top: int, scale: float) -> None:
    """Write finished padded rows ``rows`` starting at padded row ``top`` into ``out``."""
    stop = min(top + len(rows), out.shape[0])
    if stop <= top:
        return
    values = rows[: stop - top, : out.shape[1]]
    if np.issubdtype(out.dtype, np.integer):
        values = np.rint(np.clip(values, 0.0, 1.0) * scale)
    out[top:stop] = values.astype(out.dtype, copy=False)


def _scale(dtype: np.dtype) -> float:
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return 65535.0
    if np.issubdtype(dtype, np.floating):
        return 1.0
    raise ConfigError(f"Tiles take uint8, uint16 or float arrays, got {dtype}.")


def _round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


def _starts(extent: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Evenly spaced tile starts covering ``extent`` with overlaps of at least ``overlap``."""
    if tile >= extent:
        return (0,)
    count = math.ceil((extent - overlap) / (tile - overlap))
    return tuple(round(i * (extent - tile) / (count - 1)) for i in range(count))


def _axis_weights(starts: tuple[int, ...], tile: int, overlap: int) -> list[np.ndarray]:
    """Per tile, its weights along one axis; they sum to one at every position."""
    weights = [np.ones(tile, np.float32) for _ in starts]
    for index in range(1, len(starts)):
        shared = starts[index - 1] + tile - starts[index]
        band = min(overlap, shared)
        offset = starts[index] - starts[index - 1] + (shared - band) // 2
        fade_in = _fade(band)
        before, after = weights[index - 1], weights[index]
        after[: (shared - band) // 2] = 0.0
        after[(shared - band) // 2 : (shared - band) // 2 + band] *= fade_in
        before[offset : offset + band] *= 1.0 - fade_in
        before[offset + band :] = 0.0
    return weights


def _fade(band: int) -> np.ndarray:
    """0 over the first quarter, a raised cosine over the middle half, 1 over the last."""
    guard = band // 4
    ramp = band - 2 * guard
    position = (np.arange(band) - guard + 0.5) / max(ramp, 1)
    return (0.5 - 0.5 * np.cos(np.pi * np.clip(position, 0.0, 1.0))).astype(np.float32)
