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
# TIFF tags locating a page's pixel data.
_STRIP_OFFSETS, _STRIP_BYTE_COUNTS, _TILE_OFFSETS, _TILE_BYTE_COUNTS = 273, 279, 324, 325
_PHOTOMETRIC, _ORIENTATION = 262, 274


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
    value, and training reads 8 bits. TIFFs of any depth go through ``read_picture`` too,
    which reads the stored samples of one that Pillow turns upright wrongly."""
    if isinstance(path, str | os.PathLike) and not Path(path).is_file():
        what = "is a folder" if Path(path).is_dir() else "does not exist"
        raise DataError(f"Image {str(path)!r} {what}; pass an image file.")
    header = probe_image(path)  # refuses float, signed and 32-bit samples, as restoring does
    try:
        if (header.bits == 16 and not header.interlaced) or header.format == "TIFF":
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
            f"{len(self.corrupt)} corrupt or unsupported (floating-point, signed or 32-bit "
            f"samples, several frames, too many pixels), {len(self.not_images)} without a "
            f"supported image extension (e.g. {', '.join(names[:3])})."
        )
        if strict:
            raise DataError(f"{message} Remove them, or pass strict=False to skip them.")
        warnings.warn(f"{message} Skipped them.", stacklevel=3)


def scan(folder: str | Path) -> FolderScan:
    """Sort the files under ``folder`` (recursive, hidden ones ignored, linked folders
    followed) into readable images, corrupt image files and files without an image
    extension. Only headers are read (and Pillow's integrity check run); pixels are decoded
    when the file is used."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"Image folder {str(root)!r} does not exist or is not a folder.")
    result = FolderScan(root, [])
    for path in _files_under(root):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            result.not_images.append(path)
            continue
        size = header_size(path)
        if size is None:
            result.corrupt.append(path)
        else:
            result.images.append(ImageFile(path, size))
    return result


def _files_under(root: Path) -> list[Path]:
    """The files under ``root``, sorted, hidden ones left out. Linked folders are followed
    (``Path.rglob`` skips them, dropping their photos without a word), each real folder
    once, so a link loop ends; a broken link is no file."""
    seen, files = set(), []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        # Real folders before links, by name: a folder reached both ways keeps the same
        # (real) path, and so the same image ids and split, on every machine.
        subfolders[:] = sorted(
            (name for name in subfolders if not name.startswith(".")),
            key=lambda name: (os.path.islink(os.path.join(folder, name)), name),
        )
        files += [Path(folder, n) for n in names if not n.startswith(".")]
    return sorted(path for path in files if path.is_file())


def scan_folder(folder: str | Path, strict: bool = False) -> list[ImageFile]:
    """The readable images under ``folder``; skipped files are reported by
    :meth:`FolderScan.report`. An empty result raises :class:`DataError`."""
    found = scan(folder)
    found.report(strict)
    if not found.images:
        skipped = (
            f" Its {len(found.corrupt)} image file(s) are corrupt or unsupported (e.g. "
            f"{found.corrupt[0].relative_to(found.root).as_posix()!r}): 8- or 16-bit files "
            "are read."
            if found.corrupt
            else ""
        )
        raise DataError(
            f"No images in {str(found.root)!r}. Expected files with one of the extensions "
            f"{sorted(IMAGE_EXTENSIONS)}.{skipped}"
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
    pass and stop training when its turn came. ``verify`` checks no TIFF, BMP or PNM data
    either: a TIFF's strips must lie inside the file, and the uncompressed BMP and PNM are
    read whole (a read of the file, no more). A TIFF :func:`read_image` would refuse
    (floating-point, signed or 32-bit samples; several pages) is None too.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = (
                image.format != "TIFF"
                and Image.Image.getexif(image).get(ExifTags.Base.Orientation, 1)
                in _SWAPPING_ORIENTATIONS
            )
            image_format = image.format
            complete = image_format != "TIFF" or _tiff_data_in_file(image, path)
            complete = complete and not _turned_tiff_of_other_colours(image)
            image.verify()
        if image_format in ("TIFF", "PNG", "WEBP"):  # samples, frames: what read_image refuses
            probe_image(path)
        if image_format in ("JPEG", "BMP", "PPM"):
            with Image.open(path) as image:
                if image_format == "JPEG":
                    image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, DataError):
        return None
    except Image.DecompressionBombError:  # not an OSError
        return None
    if not complete:
        return None
    return (width, height) if turned else (height, width)


def _turned_tiff_of_other_colours(image: Image.Image) -> bool:
    """A TIFF turned by 90° whose colours are neither gray nor RGB (palette, CMYK): Pillow
    decodes an uncompressed one wrongly, and the stored samples are read (and turned) only
    for gray and RGB."""
    if image.format != "TIFF":
        return False
    tags = image.tag_v2  # type: ignore[attr-defined]
    return tags.get(_ORIENTATION, 1) in _SWAPPING_ORIENTATIONS and tags.get(
        _PHOTOMETRIC, 1
    ) not in (1, 2)


def _tiff_data_in_file(image: Image.Image, path: Path) -> bool:
    """Whether every strip (or tile) of the TIFF's first page ends inside the file: a
    truncated TIFF opens and verifies, and fails only when decoded."""
    tags = image.tag_v2  # type: ignore[attr-defined]
    offsets = tags.get(_STRIP_OFFSETS) or tags.get(_TILE_OFFSETS) or ()
    counts = tags.get(_STRIP_BYTE_COUNTS) or tags.get(_TILE_BYTE_COUNTS) or ()
    offsets = offsets if isinstance(offsets, tuple) else (offsets,)
    counts = counts if isinstance(counts, tuple) else (counts,)
    size = path.stat().st_size
    return all(offset + count <= size for offset, count in zip(offsets, counts, strict=False))


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
