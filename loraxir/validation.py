"""Checks of configuration values, shared by every config dataclass.

Each check raises :class:`~loraxir.errors.ConfigError` naming the field, the value and
what is allowed, so that ``LoraIRConfig``, ``RouterConfig`` and recipe configs word their
errors the same way. Standard library only: configs must load without torch.
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraxir.errors import ConfigError


def read_yaml_file(path: str | Path, kind: str) -> Any:
    """The content of the YAML file ``path`` (safe loader), or a :class:`ConfigError` that
    names the file as a ``kind`` (``"Config file"``, ``"Suite file"``) when it is missing,
    not UTF-8 text, not valid YAML, or writes a key twice in one mapping (PyYAML keeps the
    last silently: a task written with two ``steps:`` would quietly lose the first)."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{kind} {str(path)!r} is a folder; pass a YAML file in it.")
    if not path.is_file():
        raise ConfigError(f"{kind} {str(path)!r} does not exist.")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader())
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"{kind} {str(path)!r} is not UTF-8 text ({error.reason} at byte {error.start}); "
            "save it with UTF-8 encoding."
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{kind} {str(path)!r} is not valid YAML: {error}") from None
    except ConfigError as error:
        raise ConfigError(f"{kind} {str(path)!r}: {error}") from None


@functools.cache
def _unique_key_loader() -> type:
    """PyYAML's safe loader, refusing a key repeated in one mapping and reading ``1e-3`` as
    a number (built on first use: PyYAML is imported only when a YAML file is read)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise ConfigError(
                        f"key {key!r} is written twice in one mapping (line "
                        f"{key_node.start_mark.line + 1}); keep one of them."
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    # YAML 1.1 (PyYAML) reads 1e-3 as a string: it wants a dot (1.0e-3). Read it as YAML
    # 1.2 and people do, a float.
    UniqueKeyLoader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return UniqueKeyLoader


def file_in_the_way(path: str | Path) -> Path | None:
    """The first folder of ``path`` that exists as a file (so ``path`` cannot be written),
    or ``None``: checked before long work, not when its results are saved."""
    return next((p for p in Path(path).parents if p.exists() and not p.is_dir()), None)


def far_outside_unit(low: float, high: float) -> bool:
    """Do image values spanning ``[low, high]`` lie beyond any network overshoot of [0, 1]
    (below -1 or above 2)? Such float images are 0-255 ones, refused rather than guessed
    at by the restorer, the router and the metrics (one rule for all three)."""
    return low < -1.0 or high > 2.0


def tensor_hint(images: Any) -> str:
    """How to turn ``images``, which is not a tensor, into a ``(B, C, H, W)`` batch: a list
    of tensors is stacked (one call per size), a NumPy array converted as its layout and
    dtype need. Shared by the model's and the router's input checks (which have imported
    torch already)."""
    import torch

    if (
        isinstance(images, list | tuple)
        and images
        and all(isinstance(i, torch.Tensor) for i in images)
    ):
        return (
            "stack images of one size into a batch with torch.stack(images); images of "
            "different sizes need one call each (or loraxir.inference.restorer.Restorer, "
            "one image at a time)."
        )
    array = images[0] if isinstance(images, list | tuple) and images else images
    shape, kind = getattr(array, "shape", ()), getattr(getattr(array, "dtype", None), "kind", "")
    batched = len(shape) == 4 and shape[1] in (1, 3, 4)  # (B, C, H, W) already
    convert = "torch.from_numpy(array)" + ("" if batched else ".permute(2, 0, 1)[None]")
    if kind == "u":  # 8 or 16 bits: to [0, 1] from the dtype's full range
        scale = f" / {2 ** (8 * array.dtype.itemsize) - 1}"
    else:  # a float array is taken to be in [0, 1] already
        scale = "" if kind == "f" else " / 255"
    how = f"convert with {convert}.float(){scale}"
    if isinstance(images, list | tuple):
        how += ", each image, then torch.cat the batch"
    return how + "."


def make_parent_folder(path: str | Path, error: type[Exception] = ConfigError) -> None:
    """Create the folder ``path`` is written in; raise ``error`` naming the file in the way
    when a part of that folder path is a file (``mkdir`` says only "File exists")."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = file_in_the_way(path)
        raise error(f"Cannot write {str(path)!r}: {str(blocking)!r} is a file.") from None


def full_match(pattern: str, text: str) -> bool:
    """Does the regex ``pattern`` match all of ``text``? A pattern that is not a valid
    regex raises :class:`ConfigError` quoting it (``re.error`` is no ``ValueError``)."""
    try:
        return re.fullmatch(pattern, text) is not None
    except re.error as error:
        raise ConfigError(f"{pattern!r} is not a valid regular expression: {error}.") from None


def is_number(value: Any) -> bool:
    """A finite ``int`` or ``float`` (``bool`` is not a number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise unless ``value`` is an integer (not a bool) ``>= minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    """Raise unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}.")


def check_names(name: str, names: Any, case_sensitive: bool = False) -> list[str]:
    """Return ``names`` as a list; raise unless it is a non-empty list of unique strings.

    Class names that differ only in case (``"Noise"`` beside ``"noise"``) are a likely typo
    and warned about (not refused: a saved adapter with such names still loads); module
    paths (``case_sensitive=True``) are Python names, where case is meaningful."""
    if isinstance(names, str | bytes) or not isinstance(names, list | tuple):
        raise ConfigError(f"{name} must be a list of names, got {names!r}.")
    names = list(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{name} must be non-empty strings, got {names!r}.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{name} must be unique; repeated: {duplicates}.")
    folded = [n.casefold() for n in names]
    alike = sorted({n for n, f in zip(names, folded, strict=True) if folded.count(f) > 1})
    if alike and not case_sensitive:
        warnings.warn(
            f"{name} {alike} differ only in case: they are different classes, and a name is "
            "matched exactly. Rename one if that is a typo.",
            stacklevel=3,
        )
    return names
