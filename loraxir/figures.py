"""Writing figures to paths users give: the path is checked before anything is written.

matplotlib answers a folder, an unknown suffix or a parent path that is a file with its
own errors from deep inside its backends (or, for an existing folder, writes
``folder.png`` beside it); these checks name the problem and the fix instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loraxir.errors import ConfigError
from loraxir.validation import file_in_the_way


def check_figure_path(path: str | Path) -> Path:
    """``path`` as a :class:`~pathlib.Path` if a figure can be written there; else
    :class:`~loraxir.errors.ConfigError` (a folder, a suffix matplotlib does not write, a
    parent path that is a file)."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{str(path)!r} is a folder; name an image file in it.")
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lower().removeprefix(".") not in formats:
        problem = f"{path.suffix} is not a format matplotlib writes" if path.suffix else "no suffix"
        raise ConfigError(
            f"{str(path)!r}: {problem}; end it with one of "
            f"{', '.join(f'.{f}' for f in formats)} (e.g. figure.png)."
        )
    blocking = file_in_the_way(path)
    if blocking is not None:
        raise ConfigError(f"{str(path)!r}: {str(blocking)!r} is a file.")
    return path


def save_figure(figure: Any, path: str | Path | Any, dpi: int | None = None) -> Any:
    """Save a matplotlib ``figure`` to ``path`` (checked by :func:`check_figure_path`, its
    folder made if needed; a file-like object is written as matplotlib writes it); return
    the path. A file matplotlib cannot write (``.pgf`` without LaTeX, a full disk) raises
    :class:`~loraxir.errors.ConfigError` too."""
    if not isinstance(path, str | os.PathLike):
        figure.savefig(path, dpi=dpi)
        return path
    path = check_figure_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        figure.savefig(path, dpi=dpi)
    except (OSError, RuntimeError, ValueError) as error:
        raise ConfigError(f"Cannot write {str(path)!r}: {error}") from None
    return path
