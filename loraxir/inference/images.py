"""Reading and writing the user's images without losing what the restorer must keep.

Unlike :mod:`loraxir.data.images` (training data, normalised to 8-bit RGB), restoring a
user's file keeps its form: grayscale stays grayscale, an alpha channel is carried over
untouched, 16-bit files stay 16-bit, and EXIF orientation is applied (the pixels are
written upright, so the orientation tag is dropped). Pillow cannot decode 16-bit colour
PNGs (it truncates them to 8 bits), so those are read and written through PyAV's PNG
codec. Only headers are read by :func:`probe_image`, so a huge input can be planned and
refused before it is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from loraxir.errors import DataError

#: Inputs above this many pixels are refused before decoding (Pillow's own bomb guard is
#: ~89 MP, too low for panoramas); :func:`set_pixel_limit` changes it.
DEFAULT_PIXEL_LIMIT = 1_000_000_000
_DEEP_RAW_MODES = ("RGB;16B", "RGBA;16B")


@dataclass
class Picture:
    """A decoded image: colour to restore, alpha to keep, and how to write it back.

    Attributes:
        pixels: ``(H, W, 3)`` colour, ``uint8`` or ``uint16`` (grayscale is replicated).
        alpha: ``(H, W)`` alpha in the same dtype, or ``None``.
        grayscale: the file had one colour channel; the result is written as such.
    """

    pixels: np.ndarray
    alpha: np.ndarray | None = None
    grayscale: bool = False

    @property
    def max_value(self) -> int:
        return 65535 if self.pixels.dtype == np.uint16 else 255

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.pixels.shape[0], self.pixels.shape[1]


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an image file says, read without decoding pixels."""

    height: int
    width: int
    mode: str
    bits: int

    @property
    def pixels(self) -> int:
        return self.height * self.width


_pixel_limit = DEFAULT_PIXEL_LIMIT


def set_pixel_limit(limit: int) -> None:
    """Refuse images with more than ``limit`` pixels (checked from the header)."""
    global _pixel_limit
    _pixel_limit = int(limit)


def probe_image(path: str | Path) -> ImageHeader:
    """Size, mode and bit depth from the header; raises :class:`DataError` for a file that is
    not a readable image or is over the pixel limit."""
    try:
        with _open(path) as image:
            width, height = image.size
            raw = image.tile[0].args if image.tile else None
            deep = raw in _DEEP_RAW_MODES or image.mode in ("I;16", "I;16B", "I", "I;16L")
            header = ImageHeader(height, width, image.mode, 16 if deep else 8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"Cannot read image {str(path)!r}: {error}.") from None
    if header.pixels > _pixel_limit:
        raise DataError(
            f"{str(path)!r} has {height}x{width} = {header.pixels:,} pixels, over the limit of "
            f"{_pixel_limit:,}. Raise it with --max-pixels if you have the memory "
            f"(about {header.pixels * 6 / 2**30:.1f} GiB for input and output at 8 bits)."
        )
    return header


def read_picture(path: str | Path) -> Picture:
    """Decode ``path`` (orientation applied, alpha and bit depth kept)."""
    header = probe_image(path)
    if header.bits == 16 and header.mode in ("RGB", "RGBA"):
        return _read_deep_colour(path, header.mode == "RGBA")
    try:
        with _open(path) as image:
            image = ImageOps.exif_transpose(image)
            return _from_pil(image)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"Cannot decode image {str(path)!r}: {error}.") from None


def write_picture(path: str | Path, picture: Picture) -> None:
    """Write ``picture`` to ``path`` in the format its suffix names, keeping its form."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deep = picture.pixels.dtype == np.uint16
    if deep and (not picture.grayscale or picture.alpha is not None):
        # Pillow writes 16 bits for single-channel images only.
        if path.suffix.lower() != ".png":
            raise DataError(
                f"{str(path)!r}: 16-bit colour is written as PNG only; use a .png output name."
            )
        _write_deep_colour(path, picture)
        return
    if picture.grayscale:
        # A restored grayscale image comes back with three (nearly) equal channels.
        image = Image.fromarray(np.rint(picture.pixels.mean(axis=-1)).astype(picture.pixels.dtype))
        if picture.alpha is not None:  # 8 bits here: 16-bit gray with alpha went above
            image = Image.merge("LA", [image, Image.fromarray(picture.alpha)])
    else:
        image = Image.fromarray(picture.pixels)
        if picture.alpha is not None:
            image.putalpha(Image.fromarray(picture.alpha))
    if image.mode in ("RGBA", "LA") and path.suffix.lower() in (".jpg", ".jpeg"):
        raise DataError(f"{str(path)!r}: JPEG has no alpha channel; use a .png output name.")
    options = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    try:
        image.save(path, **options)
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"Cannot write {str(path)!r}: {error}.") from None


def _open(path: str | Path) -> Image.Image:
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit is checked from the header
    try:
        return Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _from_pil(image: Image.Image) -> Picture:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
        return Picture(np.repeat(gray[..., None], 3, axis=-1), grayscale=True)
    if mode in ("L", "1", "LA") or (mode == "P" and _palette_is_gray(image)):
        la = np.asarray(image.convert("LA"))
        alpha = la[..., 1] if mode == "LA" or "transparency" in image.info else None
        return Picture(np.repeat(la[..., :1], 3, axis=-1), alpha, grayscale=True)
    has_alpha = mode in ("RGBA", "PA") or "transparency" in image.info
    rgba = np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
    return Picture(np.ascontiguousarray(rgba[..., :3]), rgba[..., 3].copy() if has_alpha else None)


def _palette_is_gray(image: Image.Image) -> bool:
    palette = np.asarray(image.getpalette() or [], dtype=np.int32).reshape(-1, 3)
    return bool(len(palette)) and bool((palette == palette[:, :1]).all())


def _read_deep_colour(path: str | Path, alpha: bool) -> Picture:
    import av

    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
            array = frame.to_ndarray(format="rgba64le" if alpha else "rgb48le")
    except (av.FFmpegError, StopIteration) as error:
        raise DataError(f"Cannot decode 16-bit image {str(path)!r}: {error}.") from None
    if alpha:
        return Picture(np.ascontiguousarray(array[..., :3]), array[..., 3].copy())
    return Picture(array)


def _write_deep_colour(path: Path, picture: Picture) -> None:
    import av

    height, width = picture.size
    channels = [picture.pixels]
    if picture.alpha is not None:
        channels.append(picture.alpha[..., None])
    array = np.ascontiguousarray(np.concatenate(channels, axis=-1))
    source, target = (
        ("rgba64le", "rgba64be") if picture.alpha is not None else ("rgb48le", "rgb48be")
    )
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = width, height, target
        for packet in stream.encode(av.VideoFrame.from_ndarray(array, format=source)):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
