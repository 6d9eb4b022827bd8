"""Where clean images come from: scikit-image's bundled photos, a folder, or a 🤗 dataset.

Each source is an indexed list of images with stable string ids; the id is what the
train/test split is made on, so one image never lands on both sides.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from loraxir.data.images import read_image, scan_folder, to_rgb8
from loraxir.errors import DataError, unknown_name

# Photos that ship inside scikit-image (no download), used as *clean* references. Grayscale
# ones are replicated to RGB; `motorcycle` is the left view of `stereo_motorcycle` (the right
# view would duplicate it). Left out: `clock`, which scikit-image documents as a photo taken
# while moving the camera (motion-blurred, for deconvolution demos): as a reference it
# rewards leaving blur in, and a router learns its blur as "clean" content.
SKIMAGE_IMAGES = (
    "astronaut",
    "brick",
    "camera",
    "chelsea",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "motorcycle",
    "retina",
    "rocket",
)


def skimage_image(name: str) -> Tensor:
    """One of :data:`SKIMAGE_IMAGES` as ``uint8`` ``(3, H, W)``."""
    import skimage.data

    if name not in SKIMAGE_IMAGES:
        raise unknown_name("scikit-image photo", name, SKIMAGE_IMAGES)
    if name == "motorcycle":
        return to_rgb8(skimage.data.stereo_motorcycle()[0])
    return to_rgb8(getattr(skimage.data, name)())


class ImageSource(ABC):
    """An indexed list of clean images: ``ids[i]`` names image ``i``, ``load(i)`` decodes it
    to ``uint8`` ``(3, H, W)``."""

    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    @abstractmethod
    def load(self, index: int) -> Tensor:
        """Decode image ``index``."""


class SkimageSource(ImageSource):
    """scikit-image's photos, decoded once and kept in memory (about 10 MB)."""

    def __init__(self, names: Sequence[str] = SKIMAGE_IMAGES) -> None:
        self.ids = list(names)
        self._images = [skimage_image(name) for name in self.ids]

    def load(self, index: int) -> Tensor:
        return self._images[index]


class FolderSource(ImageSource):
    """Every image under a folder (see :func:`~loraxir.data.images.scan_folder`); the id is
    the path relative to the folder."""

    def __init__(self, folder: str | Path, strict: bool = False) -> None:
        self.root = Path(folder)
        found = [image.path for image in scan_folder(self.root, strict)]
        kept, seen, links = set(), set(), []
        for path in sorted(found, key=lambda p: (p.is_symlink(), p)):  # the file over a link
            real = path.resolve()
            if real in seen:
                links.append(path)
            else:
                kept.add(path)
                seen.add(real)
        self._files = [path for path in found if path in kept]
        if links:  # one photo under two names would land on both sides of a split
            warnings.warn(
                f"{len(links)} file(s) in {str(self.root)!r} are links to photos listed "
                f"already (e.g. {links[0].relative_to(self.root).as_posix()!r}); each photo "
                "is used once.",
                stacklevel=2,
            )
        self.ids = [path.relative_to(self.root).as_posix() for path in self._files]

    def load(self, index: int) -> Tensor:
        return read_image(self._files[index])


class DatasetSource(ImageSource):
    """A 🤗 ``datasets.Dataset`` with an image column; the id is the row number."""

    def __init__(self, dataset: Any, image_column: str = "image") -> None:
        columns = list(getattr(dataset, "column_names", []))
        if image_column not in columns:
            raise DataError(
                f"The dataset has no column {image_column!r} (columns: {columns}); pass "
                "image_column= naming the column that holds the clean images."
            )
        if len(dataset) == 0:
            raise DataError("The dataset is empty; it must hold at least one image.")
        self._dataset = dataset
        self._column = image_column
        self.ids = [str(index) for index in range(len(dataset))]

    def load(self, index: int) -> Tensor:
        return to_rgb8(self._dataset[index][self._column])


def open_source(source: Any, image_column: str = "image", strict: bool = False) -> ImageSource:
    """Turn ``"skimage"``, a folder path, a 🤗 ``Dataset``, ``"hf:<name>[@split]"`` (a Hub
    dataset, a folder ``load_dataset`` reads, or one written by ``save_to_disk``; split
    ``train`` by default) or an :class:`ImageSource` into an :class:`ImageSource`."""
    if isinstance(source, ImageSource):
        return source
    if isinstance(source, str) and source.startswith("hf:"):
        source = _load_hf_dataset(source[3:])
    if isinstance(source, str) and source == "skimage":
        return SkimageSource()
    if isinstance(source, str | Path):
        return FolderSource(source, strict)
    if hasattr(source, "column_names") and hasattr(source, "__getitem__"):
        if isinstance(source.column_names, dict):
            raise DataError(
                f"Got a DatasetDict with splits {list(source.column_names)}; pass one split, "
                "e.g. dataset['train']."
            )
        if not hasattr(source, "__len__"):
            raise DataError(
                f"Got a {type(source).__name__}, which streams its rows; splits by image and "
                "repeated epochs need a map-style datasets.Dataset (load it without "
                "streaming=True, or build one with Dataset.from_generator)."
            )
        return DatasetSource(source, image_column)
    raise DataError(
        f"Cannot take clean images from {type(source).__name__}; pass 'skimage', a folder "
        "path or a datasets.Dataset."
    )


def _load_hf_dataset(spec: str) -> Any:
    """The split named by ``"<name or folder>[@split]"`` of a 🤗 dataset."""
    import datasets

    name, _, named_split = spec.partition("@")
    split = named_split or "train"
    saved = Path(name)
    if (saved / "state.json").is_file() or (saved / "dataset_dict.json").is_file():
        # A folder written by save_to_disk, which load_dataset refuses.
        loaded = datasets.load_from_disk(name)
        if not isinstance(loaded, datasets.DatasetDict):
            if named_split and named_split != str(loaded.split):  # saved from that split
                raise DataError(
                    f"The 🤗 dataset saved in {name!r} is one Dataset (of split "
                    f"{str(loaded.split)!r}), so @{named_split} names nothing in it; write "
                    f"hf:{name} to use all its rows."
                )
            return loaded
        if split not in loaded:
            raise DataError(
                f"The 🤗 dataset saved in {name!r} has splits {sorted(loaded)}, not {split!r}; "
                f"name one as hf:{name}@<split>."
            )
        return loaded[split]
    try:
        return datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        raise DataError(f"Cannot load the 🤗 dataset {name!r}: {error}") from None
