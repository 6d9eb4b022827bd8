"""A labelled contact sheet of degradations on one image, to see what a suite does."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from loraxir.degradations.registry import available, get
from loraxir.degradations.suites import Suite
from loraxir.errors import ConfigError
from loraxir.figures import check_figure_path, save_figure

# Cells show the images at about one screen pixel per image pixel.
_DPI = 100


def square(image: Tensor, size: int) -> Tensor:
    """Resize a ``uint8`` ``(3, H, W)`` image so its short side is ``size`` (bicubic,
    anti-aliased), centre-crop it square, and return float ``(1, 3, size, size)`` in [0, 1]."""
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    shape = (max(size, round(height * scale)), max(size, round(width * scale)))
    resized = F.interpolate(image[None].float() / 255, size=shape, mode="bicubic", antialias=True)
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    return resized[..., top : top + size, left : left + size].clamp(0, 1)


def render_gallery(
    image: Tensor, path: str | Path, suite: Suite | None = None, seed: int = 0, columns: int = 3
) -> Path:
    """Degrade ``image`` (float ``(1, 3, H, W)``) by every task of ``suite`` (every registered
    degradation with its default ranges when ``suite`` is None), and save a grid with the
    clean image first, each cell titled with the task and the parameters drawn.

    A cell is ``W + 20`` pixels wide for a ``W``-pixel-wide image, plus room for the
    longest title (wrapped to the cell width) above it. A ``path`` whose suffix is not a
    format matplotlib writes, that is a folder or lies under a file raises
    :class:`ConfigError` before anything is drawn.
    """
    from matplotlib.figure import Figure

    try:
        path = check_figure_path(path)
    except ConfigError as error:  # the command's option: which argument was wrong
        raise ConfigError(f"--output {error}") from None
    generator = torch.Generator().manual_seed(seed)
    cells: list[tuple[str, str, Tensor]] = [("clean", "", image)]
    if suite is None:
        for name in available():
            degraded, params = get(name)(image, generator)
            cells.append((name, _format_params(params), degraded))
    else:
        for task in suite.tasks:
            degraded, params = task.degrade(image, generator)
            steps = " + ".join(_format_step(step) for step in params["steps"])
            cells.append((task.name, steps, degraded))
    width = image.shape[-1] / _DPI + 0.2  # inches
    titles = [f"{name}\n{textwrap.fill(detail, int(width * 16))}" for name, detail, _ in cells]
    height = image.shape[-2] / _DPI + 0.3 + 0.14 * max(title.count("\n") + 1 for title in titles)
    rows = -(-len(cells) // columns)
    figure = Figure(figsize=(width * columns, height * rows), dpi=_DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, title, (_, _, pixels) in zip(axes, titles, cells, strict=False):
        axis.imshow(pixels[0].permute(1, 2, 0).cpu().numpy())
        axis.set_title(title, fontsize=8)
    for axis in axes:
        axis.axis("off")
    return save_figure(figure, path)


def _format_step(step: dict[str, Any]) -> str:
    params = {key: value for key, value in step.items() if key != "name"}
    return f"{step['name']}({_format_params(params)})"


def _format_params(params: dict[str, Any]) -> str:
    shown = [f"{k}={v:.3g}" for k, v in params.items() if k != "seed" and isinstance(v, float)]
    shown += [f"{k}={v}" for k, v in params.items() if k != "seed" and isinstance(v, int)]
    return ", ".join(shown)
