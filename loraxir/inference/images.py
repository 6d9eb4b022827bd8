"""Reading and writing the user's images without losing what the restorer must keep.

Unlike :mod:`loraxir.data.images` (training data, normalised to 8-bit RGB), restoring a
user's file keeps its form: grayscale stays grayscale, an alpha channel is carried over
untouched, 16-bit files stay 16-bit, EXIF orientation is applied (the pixels are
written upright, so the orientation tag is dropped), and the colour profile (ICC) and the
other EXIF tags are written back. Pillow truncates 16-bit colour and 16-bit
grayscale-with-alpha to 8 bits, so 16-bit TIFFs are read and written with tifffile (any
layout: strips, tiles, planar), 16-bit colour PPMs are read from their raw samples, and
other 16-bit colour files (PNG) go through PyAV's codecs (interlaced ones are refused: FFmpeg's
decoder corrupts memory on them); orientation is applied here.
Floating-point, signed and 32-bit integer files are refused: their white level is not in
the file, so any scaling to the restorer's [0, 1] would be a guess. Only headers are read
by :func:`probe_image`, so a huge input can be planned and refused before it is decoded.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from loraxir.errors import DataError
from loraxir.validation import make_parent_folder

#: Suffixes of the image files read (training data and ``loraxir restore`` inputs).
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"}
)
#: Inputs above this many pixels are refused before decoding (Pillow's own bomb guard is
#: ~89 MP, too low for panoramas); :func:`set_pixel_limit` changes it.
DEFAULT_PIXEL_LIMIT = 1_000_000_000
#: File sample layouts (Pillow "raw modes") of 16-bit colour and grayscale-with-alpha, which
#: Pillow's own modes truncate to 8 bits; ``RGBX`` is colour with a padding sample.
_DEEP_RAW_MODES = frozenset(
    f"{form};16{order}" for form in ("RGB", "RGBA", "RGBX", "LA") for order in "BLN"
)
_DEEP_GRAY_RAW_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
#: Output suffixes that hold 16-bit samples, and those of them without alpha (PNM).
_PNM_SUFFIXES = frozenset({".ppm", ".pgm", ".pnm"})
_DEEP_SUFFIXES = frozenset({".png", ".tif", ".tiff"}) | _PNM_SUFFIXES
#: Output formats that carry EXIF as a block of its own (in TIFF, EXIF tags are the file's).
_EXIF_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
#: Lossy output formats and the quality they are written at.
_QUALITY = {"JPEG": 95, "WEBP": 95}
_EXIF_ORIENTATION = 0x0112
# TIFF tags read from the header: BitsPerSample, SampleFormat (1 unsigned, 2 signed).
_TIFF_BITS, _TIFF_SAMPLE_FORMAT = 258, 339
_TIFF_ICC_PROFILE = 34675
_TIFF_ASSOCIATED_ALPHA = 1  # ExtraSamples: colour premultiplied by this alpha
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
        icc_profile: the file's colour profile, written back so colours mean the same.
        exif: the file's EXIF block without its orientation (the pixels are upright), or
            ``None``; written back to JPEG, PNG and WebP outputs.
    """

    pixels: np.ndarray
    alpha: np.ndarray | None = None
    grayscale: bool = False
    icc_profile: bytes | None = None
    exif: bytes | None = None

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)``."""
        return self.pixels.shape[0], self.pixels.shape[1]


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an image file says, read without decoding pixels.

    ``mode`` is the form of the samples in the file (``LA`` for 16-bit grayscale with
    alpha, which Pillow opens as ``RGBA``); ``height`` and ``width`` are as stored, before
    ``orientation`` (EXIF, 1 = upright) is applied; ``format`` is Pillow's name for it;
    ``interlaced``: a PNG stored in Adam7 passes.
    """

    height: int
    width: int
    mode: str
    bits: int
    orientation: int = 1
    format: str = ""
    interlaced: bool = False

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
    a file that is not a readable image, holds floating-point, signed or 32-bit integer
    samples, or is over the pixel limit."""
    try:
        header = _pillow_header(path)
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        tiff_header = _tiff_header(path)
        if tiff_header is None:
            raise DataError(f"Cannot read image {str(path)!r}: {error}.") from None
        header = tiff_header
    if header.pixels > _pixel_limit:
        raise DataError(
            f"{str(path)!r} has {header.height}x{header.width} = {header.pixels:,} pixels, over "
            f"the limit of {_pixel_limit:,}. Raise it with --max-pixels if you have the memory "
            f"(about {header.pixels * 6 / 2**30:.1f} GiB for input and output at 8 bits)."
        )
    return header


def _pillow_header(path: str | Path) -> ImageHeader:
    with _open(path) as image:
        width, height = image.size
        raw = _raw_mode(image)
        deep = raw in _DEEP_RAW_MODES or raw in _DEEP_GRAY_RAW_MODES
        deep = deep or image.mode.startswith("I;16") or _deep_by_header(image)
        mode = "LA" if deep and raw is not None and raw.startswith("LA;") else image.mode
        # The base method: PNG's own getexif decodes the whole image to look for a late
        # eXIf chunk, which would defeat a header-only probe of a huge file.
        orientation = int(Image.Image.getexif(image).get(_EXIF_ORIENTATION, 1))
        image_format = image.format or ""
        signed = image_format == "TIFF" and 2 in _tiff_tag(image, _TIFF_SAMPLE_FORMAT)
        interlaced = bool(image.info.get("interlace"))
        _refuse_frames(path, _frames(path, image))
    if mode == "F" or signed or (mode == "I" and not deep):
        raise _unscalable(path, mode == "F", f"raw mode {raw}")
    bits = 16 if deep else 8
    return ImageHeader(height, width, mode, bits, orientation, image_format, interlaced)


def _unscalable(path: str | Path, floating: bool, detail: str) -> DataError:
    """The error for floating-point, signed or 32-bit samples, whose white level the file
    does not give (0-1 floats came out black, integers clipped)."""
    kind = "floating-point" if floating else "32-bit or signed integer"
    return DataError(
        f"{str(path)!r} holds {kind} samples ({detail}), whose white level the file does not "
        "say, so they cannot be scaled for restoring without guessing. Convert it to an 8- or "
        "16-bit PNG or TIFF first."
    )


def _tiff_header(path: str | Path) -> ImageHeader | None:
    """The header of a 16-bit unsigned TIFF that Pillow cannot open (gray with alpha,
    BigTIFF), read by tifffile; ``None`` for a file that is not a TIFF or one of other
    8/16-bit kinds. Floating-point, signed and 32-bit TIFFs (Pillow opens colour ones of
    these not at all) raise :class:`DataError` saying why they are refused."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages.first
            if int(page.sampleformat) in (2, 3) or page.bitspersample > 16:
                floating = int(page.sampleformat) == 3
                raise _unscalable(path, floating, f"{page.bitspersample}-bit, {page.dtype}")
            if page.bitspersample != 16 or int(page.sampleformat) != 1:
                return None
            _refuse_frames(path, _tiff_frames(tiff))
            mode = {1: "I;16", 2: "LA", 3: "RGB"}.get(page.samplesperpixel, "RGBA")
            orientation = int(page.tags.valueof(_EXIF_ORIENTATION, 1))
            return ImageHeader(page.imagelength, page.imagewidth, mode, 16, orientation, "TIFF")
    except DataError:
        raise
    except (tifffile.TiffFileError, OSError, ValueError, IndexError):
        return None


def _frames(path: str | Path, image: Image.Image) -> int:
    """Frames of an animation (PNG, WebP) or pages of a TIFF; 1 for anything else. A JPEG
    with a gain map or preview opens as a 2-frame MPO: one photo, not an animation."""
    if image.format == "TIFF":
        import tifffile

        try:
            with tifffile.TiffFile(path) as tiff:
                return _tiff_frames(tiff)
        except (tifffile.TiffFileError, OSError, ValueError, IndexError):
            return image.n_frames  # a file only Pillow reads: it counts every page
    if image.format in ("PNG", "WEBP") and getattr(image, "is_animated", False):
        return image.n_frames
    return 1


def _tiff_frames(tiff: Any) -> int:
    """A TIFF's full-resolution pages (reduced-resolution thumbnails and previews, bit 0 of
    NewSubfileType, are not frames)."""
    return sum(1 for page in tiff.pages if not page.subfiletype & 1)


def _refuse_frames(path: str | Path, frames: int) -> None:
    """An animation or a multi-page file would lose every frame but the first."""
    if frames > 1:
        raise DataError(
            f"{str(path)!r} holds {frames} frames (an animation or a multi-page file); only "
            "single images are restored. Save its frames as images (or the animation as a "
            "video: loraxir restores MP4, MKV, MOV, WebM and AVI) and restore those."
        )


def read_picture(path: str | Path) -> Picture:
    """Decode ``path`` (orientation applied; alpha, bit depth and colour profile kept)."""
    header = probe_image(path)
    try:
        if header.format == "TIFF" and header.bits == 16:
            return _read_tiff(path, header)
        with _open(path) as image:
            if header.bits == 16 and header.format == "PPM" and image.mode == "RGB":
                picture = _read_ppm(path, image)
            elif header.bits == 16 and (
                header.mode in ("RGB", "RGBA", "LA") or "transparency" in image.info
            ):
                if header.interlaced:
                    raise DataError(
                        f"Cannot read {str(path)!r}: an interlaced (Adam7) 16-bit PNG. FFmpeg's "
                        "PNG decoder, which reads 16-bit colour here, corrupts memory on those. "
                        "Save it without interlacing (e.g. ImageMagick: magick IN.png "
                        "-interlace none OUT.png) and restore that."
                    )
                picture = _read_deep(path, header)
            else:
                picture = _from_pil(ImageOps.exif_transpose(image))
                upright = (header.height, header.width)  # Pillow's size of a TIFF is upright
                if header.format == "TIFF" and picture.pixels.shape[:2] != upright:
                    # Pillow 13 turns an uncompressed TIFF oriented 5-8 into stripes of the
                    # wrong shape: read its stored samples and turn them upright here.
                    picture = _read_tiff(path, header)
            # CMYK comes out RGB (Pillow's conversion), which a CMYK profile does not describe.
            cmyk = image.mode == "CMYK"
            picture.icc_profile = None if cmyk else image.info.get("icc_profile") or None
            picture.exif = _exif_block(image)
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise DataError(f"Cannot decode image {str(path)!r}: {error}.") from None
    return picture


def check_output(path: str | Path, picture: Picture) -> None:
    """Raise :class:`DataError` naming ``path`` when its format cannot hold ``picture``'s
    form (alpha, bit depth), so a caller can refuse before restoring rather than after."""
    if not isinstance(picture, Picture):
        raise DataError(
            f"write_picture takes a Picture, got {type(picture).__name__}; wrap an array "
            "with Picture(pixels) ((H, W, 3) uint8 or uint16)."
        )
    pixels, alpha = picture.pixels, picture.alpha
    if (
        not isinstance(pixels, np.ndarray)
        or pixels.dtype not in (np.uint8, np.uint16)
        or pixels.ndim != 3
        or pixels.shape[-1] != 3
        or (
            alpha is not None
            and (
                getattr(alpha, "dtype", None) != pixels.dtype
                or getattr(alpha, "shape", None) != pixels.shape[:2]
            )
        )
    ):
        raise DataError(
            f"write_picture takes (H, W, 3) uint8 or uint16 pixels (and an (H, W) alpha of the "
            f"same dtype), got {_described(pixels)}"
            + ("" if alpha is None else f" with alpha {_described(alpha)}")
            + "; convert floats with np.rint(x * 255).clip(0, 255).astype(np.uint8)."
        )
    suffix = Path(path).suffix.lower()
    deep = picture.pixels.dtype == np.uint16
    if suffix not in IMAGE_EXTENSIONS:  # others (GIF: a 256-colour palette) lose colour
        problem = (
            f"{suffix or 'no suffix'} is not an image format restored images are written as "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    elif deep and suffix not in _DEEP_SUFFIXES:
        problem = "16-bit images are written as PNG, TIFF or PPM/PGM only"
    elif deep and suffix in _PNM_SUFFIXES and picture.alpha is not None:
        problem = "PPM keeps no alpha channel"
    else:
        problem = None if deep else _format_problem(suffix, picture.alpha is not None)
    if problem is not None:
        raise DataError(f"{str(path)!r}: {problem}; use a .png output name.")


def _described(array: Any) -> str:
    if isinstance(array, np.ndarray):
        return f"{array.dtype} of shape {array.shape}"
    return type(array).__name__


def write_picture(path: str | Path, picture: Picture) -> None:
    """Write ``picture`` to ``path`` in the format its suffix names, keeping its form and
    its colour profile (and EXIF, where the format has a block for it)."""
    path = Path(path)
    check_output(path, picture)
    make_parent_folder(path, DataError)
    deep = picture.pixels.dtype == np.uint16
    if deep and path.suffix.lower() in _PNM_SUFFIXES:
        _write_pnm(path, picture)
        return
    if deep and path.suffix.lower() != ".png":
        _write_tiff(path, picture)
        return
    if deep and (not picture.grayscale or picture.alpha is not None):
        # Pillow writes 16 bits for single-channel images only.
        _write_png(path, picture)
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
    image_format = Image.registered_extensions()[path.suffix.lower()]
    options: dict[str, Any] = (
        {"quality": _QUALITY[image_format]} if image_format in _QUALITY else {}
    )
    if picture.icc_profile:
        options["icc_profile"] = picture.icc_profile
    if picture.exif and image_format in _EXIF_FORMATS:
        options["exif"] = picture.exif
    try:
        image.save(path, **options)
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"Cannot write {str(path)!r}: {error}.") from None


@functools.cache
def _format_problem(suffix: str, alpha: bool) -> str | None:
    """What keeps an 8-bit image (with ``alpha``) from being written as ``suffix``, found by
    writing and reading back a 2x2 one: some formats drop alpha without a word (PPM, BMP,
    JPEG)."""
    if not alpha:
        return None
    image_format = Image.registered_extensions()[suffix]
    probe = np.zeros((2, 2, 4), np.uint8)
    probe[..., 3] = [[0, 77], [200, 255]]
    buffer = io.BytesIO()
    try:
        Image.fromarray(probe).save(buffer, format=image_format)
        buffer.seek(0)
        with Image.open(buffer) as back:
            kept = np.array_equal(np.asarray(back.convert("RGBA"))[..., 3], probe[..., 3])
    except (OSError, ValueError, KeyError):  # JPEG refuses RGBA outright
        kept = False
    return None if kept else f"{image_format} keeps no alpha channel"


def _open(path: str | Path) -> Image.Image:
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own limit is checked from the header
    try:
        return Image.open(path)
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _tiff_tag(image: Image.Image, tag: int) -> tuple[int, ...]:
    value = image.tag_v2.get(tag, ())  # type: ignore[attr-defined]
    return tuple(value) if isinstance(value, tuple) else (value,)


def _deep_by_header(image: Image.Image) -> bool:
    """16-bit samples that Pillow's mode hides: a TIFF's BitsPerSample (a planar or tiled
    16-bit TIFF may open as 8-bit RGB) or a PNM's maximum value above 255."""
    if image.format == "TIFF":
        return 16 in _tiff_tag(image, _TIFF_BITS)
    if image.format == "PPM" and image.tile:
        args = image.tile[0].args
        return isinstance(args, tuple) and len(args) > 1 and int(args[1]) > 255
    return False


def _exif_block(image: Image.Image) -> bytes | None:
    """The EXIF block of a JPEG, PNG or WebP without its orientation, or ``None``."""
    if "exif" not in image.info:
        return None
    exif = Image.Exif()
    exif.load(image.info["exif"])
    exif.pop(_EXIF_ORIENTATION, None)
    return exif.tobytes() if len(exif) else None


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


def _upright(array: np.ndarray, header: ImageHeader) -> np.ndarray:
    return np.ascontiguousarray(_UPRIGHT.get(header.orientation, lambda a: a)(array))


def _from_samples(array: np.ndarray, header: ImageHeader, alpha: bool) -> Picture:
    """A :class:`Picture` of ``(H, W, S)`` 16-bit samples: gray, gray + alpha, RGB or RGBA."""
    array = _upright(array, header)
    colour = array[..., :3] if array.shape[-1] >= 3 else np.repeat(array[..., :1], 3, axis=-1)
    kept = array[..., -1].copy() if alpha else None
    return Picture(np.ascontiguousarray(colour), kept, grayscale=array.shape[-1] < 3)


def _read_tiff(path: str | Path, header: ImageHeader) -> Picture:
    """An 8- or 16-bit gray or RGB TIFF (with alpha) of any layout (strips, tiles, planar),
    through tifffile."""
    import tifffile

    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages.first
        array = page.asarray()
        axes, photometric = page.axes, int(page.photometric)
        premultiplied = tuple(page.extrasamples)[:1] == (_TIFF_ASSOCIATED_ALPHA,)
        icc_profile = page.tags.valueof(_TIFF_ICC_PROFILE)
        stored = (page.imagelength, page.imagewidth)
    if "S" in axes and axes.index("S") < axes.index("Y"):  # planar: samples first
        array = np.moveaxis(array, axes.index("S"), -1)
    # The stored size: Pillow reports a TIFF oriented 5-8 with its sides already swapped,
    # and _from_samples turns the stored pixels upright.
    array = array.reshape(*stored, -1)
    channels = array.shape[-1]
    # Photometric 1 is gray ("min is black"), 2 is RGB; extra samples beyond are alpha.
    layouts = {(1, 1), (1, 2), (2, 3), (2, 4)}
    if array.dtype not in (np.uint8, np.uint16) or (photometric, channels) not in layouts:
        raise ValueError(
            f"a TIFF of {channels} samples ({array.dtype}) with photometric interpretation "
            f"{photometric} is not gray or RGB (with alpha) of 8 or 16 bits; convert it to "
            "a PNG"
        )
    if premultiplied and channels in (2, 4):
        array = _straight_alpha(array)
    picture = _from_samples(array, header, alpha=channels in (2, 4))
    picture.icc_profile = bytes(icc_profile) if icc_profile is not None else None
    return picture


def _straight_alpha(array: np.ndarray) -> np.ndarray:
    """Samples with premultiplied ("associated") alpha, last, made straight: the colour
    divided by the alpha (zero where fully transparent), as restored images keep colour
    and alpha apart and are written with straight alpha."""
    top = float(np.iinfo(array.dtype).max)
    alpha = array[..., -1:].astype(np.float64)
    colour = array[..., :-1] * np.divide(top, alpha, out=np.zeros_like(alpha), where=alpha > 0)
    straight = np.rint(colour).clip(0, top).astype(array.dtype)
    return np.concatenate([straight, array[..., -1:]], axis=-1)


def _read_ppm(path: str | Path, image: Image.Image) -> Picture:
    """A 16-bit colour PPM from its raw big-endian samples, scaled from its maximum value
    to 65535 as Pillow scales 16-bit gray PGMs."""
    tile = image.tile[0]
    if tile.codec_name != "ppm":
        raise ValueError("a 16-bit plain-text (P3) PPM is not read; save it as binary (P6)")
    maxval, count = int(tile.args[1]), image.width * image.height * 3
    with open(path, "rb") as file:
        file.seek(tile.offset)
        samples = np.fromfile(file, ">u2", count)
    if samples.size < count:
        raise ValueError(f"the file ends after {samples.size} of {count} samples")
    scaled = np.rint(samples.astype(np.float64) * (65535 / maxval)).clip(0, 65535)
    return Picture(scaled.astype(np.uint16).reshape(image.height, image.width, 3))


def _read_deep(path: str | Path, header: ImageHeader) -> Picture:
    """A 16-bit PNG in colour, or gray with alpha or a transparent value (``tRNS``, decoded
    as alpha), decoded by FFmpeg's PNG codec from the file's bytes and made upright here.
    The bytes, not the path: FFmpeg's file reader would read ``%d`` in a name as a frame
    number (and restore another file) and ``10:30.png`` as a ``10:`` protocol."""
    import av

    try:
        codec = av.CodecContext.create("png", "r")
        frame = codec.decode(av.Packet(Path(path).read_bytes()))[0]
        name = frame.format.name
        if name.startswith("ya16"):
            array = _ya16_array(frame)
        elif name.startswith(("rgba64", "rgb48")):
            array = frame.to_ndarray(format="rgba64le" if name.startswith("rgba") else "rgb48le")
        else:
            raise ValueError(f"expected 16-bit samples, FFmpeg decoded {name}")
    except (av.error.InvalidDataError, IndexError):
        raise DataError(
            f"Cannot decode 16-bit image {str(path)!r}: its PNG data is corrupt or truncated."
        ) from None
    except (av.FFmpegError, ValueError) as error:
        raise DataError(f"Cannot decode 16-bit image {str(path)!r}: {error}.") from None
    return _from_samples(array, header, alpha=array.shape[-1] in (2, 4))


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


def _deep_samples(picture: Picture) -> np.ndarray:
    """``(H, W, S)`` 16-bit samples to write: gray or RGB, then alpha if any."""
    channels = [_gray(picture)[..., None] if picture.grayscale else picture.pixels]
    if picture.alpha is not None:
        channels.append(picture.alpha[..., None])
    return np.ascontiguousarray(np.concatenate(channels, axis=-1))


def _write_tiff(path: Path, picture: Picture) -> None:
    """16 bits as a deflate-compressed TIFF with tifffile, colour profile included."""
    import tifffile

    samples = _deep_samples(picture)
    tifffile.imwrite(
        path,
        samples if samples.shape[-1] > 1 else samples[..., 0],
        photometric="minisblack" if picture.grayscale else "rgb",
        extrasamples=["unassalpha"] if picture.alpha is not None else None,
        compression="zlib",
        iccprofile=picture.icc_profile,
    )


def _write_pnm(path: Path, picture: Picture) -> None:
    """16 bits as a binary PGM (gray) or PPM (colour) with maximum value 65535."""
    samples = _deep_samples(picture)
    height, width = picture.size
    magic = b"P5" if picture.grayscale else b"P6"
    path.write_bytes(
        b"%s\n%d %d\n65535\n" % (magic, width, height) + samples.astype(">u2").tobytes()
    )


def _write_png(path: Path, picture: Picture) -> None:
    """16-bit colour, or grayscale with alpha, as PNG: encoded by FFmpeg's PNG codec, with
    the colour profile and EXIF added as chunks. The file is written by us, not by an FFmpeg
    muxer, which would read ``%d`` in a file name as a frame number."""
    import av

    height, width = picture.size
    samples = _deep_samples(picture)
    target = {2: "ya16be", 3: "rgb48be", 4: "rgba64be"}[samples.shape[-1]]
    if picture.grayscale:
        frame = av.VideoFrame(width, height, "ya16be")
        plane = frame.planes[0]
        rows = np.zeros((height, plane.line_size // 2), ">u2")
        rows[:, : 2 * width] = samples.reshape(height, -1)
        plane.update(rows.tobytes())
    else:
        source = "rgba64le" if picture.alpha is not None else "rgb48le"
        frame = av.VideoFrame.from_ndarray(samples, format=source)
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, target
    png = b"".join(bytes(packet) for packet in [*codec.encode(frame), *codec.encode(None)])
    extra = b""
    if picture.icc_profile:
        extra += _png_chunk(b"iCCP", b"ICC profile\0\0" + zlib.compress(picture.icc_profile))
    if picture.exif:
        extra += _png_chunk(b"eXIf", picture.exif.removeprefix(b"Exif\0\0"))
    header_end = 8 + 25  # the signature, then IHDR (4 length + 4 type + 13 data + 4 CRC)
    path.write_bytes(png[:header_end] + extra + png[header_end:])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data)
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
