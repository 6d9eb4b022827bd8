"""Reading clean images into one form: ``uint8`` tensors ``(3, H, W)``, RGB.

Conversions (all documented in ``docs/degradations.md``):

- grayscale (``L``, ``1``, 2-D arrays) is replicated to three channels;
- an alpha channel (``RGBA``, ``LA``, palette transparency) is dropped, keeping the colour
  values as stored;
- 16-bit images (gray or colour files, ``uint16`` arrays) are rounded to 8 bits
  (value / 257), because the degradations and metrics follow the 8-bit convention of the
  benchmark sets;
- float images are taken to be in [0, 1]; boolean images map to 0 / 255;
- EXIF orientation is applied, so a photo is read the way viewers show it.

Scanning a folder skips non-image and corrupt files with one warning that counts them,
or raises :class:`~loraxir.errors.DataError` in ``strict`` mode.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from loraxir.errors import DataError
from loraxir.inference.images import IMAGE_EXTENSIONS, probe_image, read_picture

# EXIF orientations that turn the picture by 90° (transpose, rotate 270°, transverse,
# rotate 90°): what :func:`ImageOps.exif_transpose` does to them swaps height and width.
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def to_rgb8(image: Image.Image | np.ndarray) -> Tensor:
    """Convert a PIL image or a numpy array (H, W[, C]) to a ``uint8`` tensor ``(3, H, W)``."""
    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I") or image.mode == "F":
            return to_rgb8(np.asarray(image))
        return _hwc_to_tensor(np.asarray(image.convert("RGB")))
    if not isinstance(image, np.ndarray):
        raise DataError(f"Cannot read an image from {type(image).__name__}; pass a PIL image.")
    array = image
    if array.ndim == 3 and array.shape[-1] in (2, 4):
        array = array[..., :-1]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 1):
        array = np.repeat(array.reshape(*array.shape[:2], 1), 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise DataError(
            f"Expected an image array of shape (H, W), (H, W, 3) or (H, W, 4), got {image.shape}."
        )
    return _hwc_to_tensor(_to_uint8(array))


def read_image(path: str | Path) -> Tensor:
    """Decode the image file ``path`` to ``uint8`` ``(3, H, W)`` (see module docstring).

    16-bit colour files, which Pillow truncates to their high byte, are decoded at full
    depth by :func:`loraxir.inference.images.read_picture` and rounded like other 16-bit
    images; but an interlaced 16-bit PNG, which that refuses (FFmpeg's decoder corrupts
    memory on it), is read by Pillow: its high byte is within one level of the rounded
    value, and training reads 8 bits."""
    if isinstance(path, str | os.PathLike) and not Path(path).is_file():
        what = "is a folder" if Path(path).is_dir() else "does not exist"
        raise DataError(f"Image {str(path)!r} {what}; pass an image file.")
    try:
        header = probe_image(path)
        deep = header.bits == 16 and not header.interlaced
    except DataError:  # float or 32-bit files: Pillow's own reading below says what it can
        deep = False
    try:
        if deep:
            return to_rgb8(read_picture(path).pixels)
        with Image.open(path) as image:
            image.load()
            return to_rgb8(image)
    except DataError:
        raise  # read_picture's own, naming the file already
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(
            f"Cannot decode image {str(path)!r}: {error}. Remove or replace it."
        ) from None
    except Image.DecompressionBombError as error:
        raise DataError(
            f"Cannot read image {str(path)!r}: {error} Downscale it first (a restoration "
            "training photo needs no more than a few megapixels)."
        ) from None


@dataclass(frozen=True)
class ImageFile:
    """An image found by :func:`scan_folder`: its path and its size ``(height, width)``."""

    path: Path
    size: tuple[int, int]


@dataclass
class FolderScan:
    """What :func:`scan` found under ``root``: readable images, and skipped files."""

    root: Path
    images: list[ImageFile]
    corrupt: list[Path] = field(default_factory=list)
    not_images: list[Path] = field(default_factory=list)

    def report(self, strict: bool) -> None:
        """Warn once about skipped files, counting them; raise :class:`DataError` if ``strict``."""
        if not self.corrupt and not self.not_images:
            return
        names = [p.relative_to(self.root).as_posix() for p in [*self.corrupt, *self.not_images]]
        message = (
            f"{len(names)} file(s) in {str(self.root)!r} are not readable images: "
            f"{len(self.corrupt)} corrupt, {len(self.not_images)} without an image extension "
            f"(e.g. {', '.join(names[:3])})."
        )
        if strict:
            raise DataError(f"{message} Remove them, or pass strict=False to skip them.")
        warnings.warn(f"{message} Skipped them.", stacklevel=3)


def scan(folder: str | Path) -> FolderScan:
    """Sort the files under ``folder`` (recursive, hidden ones ignored) into readable images,
    corrupt image files and files without an image extension. Only headers are read (and
    Pillow's integrity check run); pixels are decoded when the file is used."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"Image folder {str(root)!r} does not exist or is not a folder.")
    result = FolderScan(root, [])
    for path in sorted(root.rglob("*")):
        if not path.is_file() or any(p.startswith(".") for p in path.relative_to(root).parts):
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            result.not_images.append(path)
            continue
        size = header_size(path)
        if size is None:
            result.corrupt.append(path)
        else:
            result.images.append(ImageFile(path, size))
    return result


def scan_folder(folder: str | Path, strict: bool = False) -> list[ImageFile]:
    """The readable images under ``folder``; skipped files are reported by
    :meth:`FolderScan.report`. An empty result raises :class:`DataError`."""
    found = scan(folder)
    found.report(strict)
    if not found.images:
        raise DataError(
            f"No images in {str(found.root)!r}. Expected files with one of the extensions "
            f"{sorted(IMAGE_EXTENSIONS)}."
        )
    return found.images


def header_size(path: Path) -> tuple[int, int] | None:
    """``(height, width)`` as displayed, if the file opens and passes Pillow's integrity
    check, else None.

    The size is the one :func:`read_image` returns: an EXIF orientation that turns the
    picture by 90° swaps the stored height and width, so pairs are compared as they will
    be read. The orientation is read from the header only (PNG places its ``eXIf`` chunk
    before the pixels), without decoding pixels: Pillow's ``PngImageFile.getexif`` would
    decode the whole image to look for a late chunk, so the base method is called.
    Pillow's TIFF reader already reports (and decodes) a TIFF turned upright.
    ``verify`` reads no JPEG pixel data, so a JPEG is also decoded at 1/8 scale (all its
    coded data, about a third of a full decode's time): a truncated one would otherwise
    pass and stop training when its turn came.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = (
                image.format != "TIFF"
                and Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
                in _SWAPPING_ORIENTATIONS
            )
            jpeg = image.format == "JPEG"
            image.verify()
        if jpeg:
            with Image.open(path) as image:
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return None
    return (width, height) if turned else (height, width)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        return np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)
    if array.dtype in (np.uint16, np.int32):  # int32: how Pillow hands out 16-bit PNGs
        return np.round(np.clip(array, 0, 65535) / 257).astype(np.uint8)
    raise DataError(
        f"Unsupported image dtype {array.dtype}; pass uint8, uint16, bool or float in [0, 1]."
    )


def _hwc_to_tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(array.transpose(2, 0, 1), order="C"))
