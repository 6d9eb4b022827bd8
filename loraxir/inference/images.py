"""Reading and writing the user's images without losing what the restorer must keep.

Unlike :mod:`loraxir.data.images` (training data, normalised to 8-bit RGB), restoring a
user's file keeps its form: grayscale stays grayscale, an alpha channel is carried over
untouched, 16-bit files stay 16-bit, and EXIF orientation is applied (the pixels are
written upright, so the orientation tag is dropped). Pillow truncates 16-bit colour
(PNG and TIFF) and 16-bit grayscale-with-alpha (PNG) to 8 bits, so those are read and
written through PyAV's PNG and TIFF codecs, and their orientation is applied here.
Floating-point and 32-bit integer files are refused: their white level is not in the file,
so any scaling to the restorer's [0, 1] would be a guess. Only headers are read by
:func:`probe_image`, so a huge input can be planned and refused before it is decoded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from loraxir.errors import DataError

#: Inputs above this many pixels are refused before decoding (Pillow's own bomb guard is
#: ~89 MP, too low for panoramas); :func:`set_pixel_limit` changes it.
DEFAULT_PIXEL_LIMIT = 1_000_000_000
#: File sample layouts (Pillow "raw modes") of 16-bit colour and grayscale-with-alpha, which
#: Pillow's own modes truncate to 8 bits; ``RGBX`` is colour with a padding sample.
_DEEP_RAW_MODES = frozenset(
    f"{form};16{order}" for form in ("RGB", "RGBA", "RGBX", "LA") for order in "BLN"
)
_DEEP_GRAY_RAW_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
#: PyAV codec and byte order writing 16-bit colour, by output suffix.
_DEEP_CODECS = {".png": ("png", "be"), ".tif": ("tiff", "le"), ".tiff": ("tiff", "le")}
_EXIF_ORIENTATION = 0x0112
#: Array operations that make an image upright, by EXIF orientation (as ``exif_transpose``).
_UPRIGHT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


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
    """What the header of an image file says, read without decoding pixels.

    ``mode`` is the form of the samples in the file (``LA`` for 16-bit grayscale with
    alpha, which Pillow opens as ``RGBA``); ``height`` and ``width`` are as stored, before
    ``orientation`` (EXIF, 1 = upright) is applied.
    """

    height: int
    width: int
    mode: str
    bits: int
    orientation: int = 1

    @property
    def pixels(self) -> int:
        return self.height * self.width


_pixel_limit = DEFAULT_PIXEL_LIMIT


def set_pixel_limit(limit: int) -> None:
    """Refuse images with more than ``limit`` pixels (checked from the header)."""
    global _pixel_limit
    _pixel_limit = int(limit)


def probe_image(path: str | Path) -> ImageHeader:
    """Size, mode, bit depth and orientation from the header; raises :class:`DataError` for
    a file that is not a readable image, holds floating-point or 32-bit integer samples, or
    is over the pixel limit."""
    try:
        with _open(path) as image:
            width, height = image.size
            raw = _raw_mode(image)
            deep = raw in _DEEP_RAW_MODES or raw in _DEEP_GRAY_RAW_MODES
            deep = deep or image.mode.startswith("I;16")
            mode = "LA" if deep and raw is not None and raw.startswith("LA;") else image.mode
            orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"Cannot read image {str(path)!r}: {error}.") from None
    if mode == "F" or (mode == "I" and not deep):
        kind = "floating-point" if mode == "F" else "32-bit or signed integer"
        raise DataError(
            f"{str(path)!r} holds {kind} samples (raw mode {raw}), whose white level the file "
            "does not say, so they cannot be scaled for restoring without guessing. Convert "
            "it to an 8- or 16-bit PNG or TIFF first."
        )
    header = ImageHeader(height, width, mode, 16 if deep else 8, orientation)
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
    if header.bits == 16 and header.mode in ("RGB", "RGBA", "LA"):
        return _read_deep(path, header)
    try:
        with _open(path) as image:
            image = ImageOps.exif_transpose(image)
            return _from_pil(image)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"Cannot decode image {str(path)!r}: {error}.") from None


def check_output(path: str | Path, picture: Picture) -> None:
    """Raise :class:`DataError` naming ``path`` when its format cannot hold ``picture``'s
    form (alpha, bit depth), so a caller can refuse before restoring rather than after."""
    suffix = Path(path).suffix.lower()
    deep = picture.pixels.dtype == np.uint16
    if suffix not in Image.registered_extensions():
        problem = f"{suffix or 'no suffix'} is not an image format Pillow writes"
    elif deep and picture.grayscale and picture.alpha is not None and suffix != ".png":
        problem = "16-bit grayscale with alpha is written as PNG only"
    elif deep and suffix not in _DEEP_CODECS:
        problem = "16-bit images are written as PNG or TIFF only"
    elif picture.alpha is not None and suffix in (".jpg", ".jpeg"):
        problem = "JPEG has no alpha channel"
    else:
        return
    raise DataError(f"{str(path)!r}: {problem}; use a .png output name.")


def write_picture(path: str | Path, picture: Picture) -> None:
    """Write ``picture`` to ``path`` in the format its suffix names, keeping its form."""
    path = Path(path)
    check_output(path, picture)
    path.parent.mkdir(parents=True, exist_ok=True)
    deep = picture.pixels.dtype == np.uint16
    if deep and (not picture.grayscale or picture.alpha is not None):
        # Pillow writes 16 bits for single-channel images only.
        _write_deep(path, picture)
        return
    if picture.grayscale:
        # A restored grayscale image comes back with three (nearly) equal channels.
        image = Image.fromarray(_gray(picture))
        if picture.alpha is not None:  # 8 bits here: 16-bit gray with alpha went above
            image = Image.merge("LA", [image, Image.fromarray(picture.alpha)])
    else:
        image = Image.fromarray(picture.pixels)
        if picture.alpha is not None:
            image.putalpha(Image.fromarray(picture.alpha))
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


def _raw_mode(image: Image.Image) -> str | None:
    """How the file stores its samples (``RGB;16B``), which Pillow's mode may hide; PNG
    tiles carry it as a string, TIFF and others as the first of a tuple."""
    if not image.tile:
        return None
    args: Any = image.tile[0].args
    raw = args[0] if isinstance(args, tuple) and args else args
    return raw if isinstance(raw, str) else None


def _from_pil(image: Image.Image) -> Picture:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):  # "I" here holds 16-bit samples (PGM)
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


def _gray(picture: Picture) -> np.ndarray:
    return np.rint(picture.pixels.mean(axis=-1)).astype(picture.pixels.dtype)


def _read_deep(path: str | Path, header: ImageHeader) -> Picture:
    """16-bit colour or grayscale with alpha, decoded by FFmpeg, made upright here."""
    import av

    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
            if header.mode == "LA":
                array = _ya16_array(frame)
            else:
                array = frame.to_ndarray(format="rgba64le" if header.mode == "RGBA" else "rgb48le")
    except (av.FFmpegError, StopIteration, ValueError) as error:
        raise DataError(f"Cannot decode 16-bit image {str(path)!r}: {error}.") from None
    array = np.ascontiguousarray(_UPRIGHT.get(header.orientation, lambda a: a)(array))
    if header.mode == "LA":
        return Picture(np.repeat(array[..., :1], 3, axis=-1), array[..., 1].copy(), True)
    if header.mode == "RGBA":
        return Picture(np.ascontiguousarray(array[..., :3]), array[..., 3].copy())
    return Picture(array)


def _ya16_array(frame: Any) -> np.ndarray:
    """``(H, W, 2)`` gray and alpha of a ``ya16`` frame, read from its packed plane (PyAV
    converts gray to RGB with a colour matrix, which would change the values)."""
    name = frame.format.name
    if name not in ("ya16be", "ya16le"):
        raise ValueError(f"expected 16-bit gray with alpha, FFmpeg decoded {name}")
    plane = frame.planes[0]
    rows = np.frombuffer(plane, ">u2" if name.endswith("be") else "<u2")
    rows = rows.reshape(frame.height, plane.line_size // 2)[:, : 2 * frame.width]
    return rows.reshape(frame.height, frame.width, 2).astype(np.uint16)


def _write_deep(path: Path, picture: Picture) -> None:
    """16-bit colour as PNG or TIFF, or 16-bit grayscale with alpha as PNG, with PyAV."""
    import av

    height, width = picture.size
    codec, order = _DEEP_CODECS[path.suffix.lower()]
    if picture.grayscale:
        frame = av.VideoFrame(width, height, "ya16be")
        plane = frame.planes[0]
        rows = np.zeros((height, plane.line_size // 2), ">u2")
        rows[:, : 2 * width] = np.stack([_gray(picture), picture.alpha], -1).reshape(height, -1)
        plane.update(rows.tobytes())
        target = "ya16be"
    else:
        channels = [picture.pixels]
        if picture.alpha is not None:
            channels.append(picture.alpha[..., None])
        array = np.ascontiguousarray(np.concatenate(channels, axis=-1))
        layout = "rgba64" if picture.alpha is not None else "rgb48"
        frame = av.VideoFrame.from_ndarray(array, format=f"{layout}le")
        target = f"{layout}{order}"
    with av.open(str(path), "w", format="image2") as container:
        stream = container.add_stream(codec)
        stream.width, stream.height, stream.pix_fmt = width, height, target
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
