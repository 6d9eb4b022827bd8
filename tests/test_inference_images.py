"""Image files in and out: grayscale, alpha, 16 bits, EXIF orientation, size limits."""

from __future__ import annotations

import dataclasses
import struct
import zlib

import numpy as np
import pytest
from inference_helpers import photo, png16
from PIL import Image

from loraxir.errors import DataError
from loraxir.inference.images import (
    Picture,
    check_output,
    probe_image,
    read_picture,
    set_pixel_limit,
    write_picture,
)


def test_grayscale_stays_grayscale(tmp_path):
    gray = photo(20, 30)[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    picture = read_picture(tmp_path / "g.png")
    assert picture.grayscale and picture.pixels.shape == (20, 30, 3) and picture.alpha is None
    write_picture(tmp_path / "out.png", picture)
    with Image.open(tmp_path / "out.png") as out:
        assert out.mode == "L"
        np.testing.assert_array_equal(np.asarray(out), gray)
    # A restored gray image whose channels came out apart: written as their rounded mean.
    colour = photo(20, 30)
    restored = dataclasses.replace(picture, pixels=colour)
    write_picture(tmp_path / "restored.png", restored)
    with Image.open(tmp_path / "restored.png") as out:
        expected = np.rint(colour.astype(np.float64).mean(axis=-1)).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(out), expected)


def test_rgba_alpha_is_kept(tmp_path):
    rgba = np.dstack([photo(20, 30), np.arange(600, dtype=np.uint8).reshape(20, 30)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    picture = read_picture(tmp_path / "a.png")
    np.testing.assert_array_equal(picture.alpha, rgba[..., 3])
    write_picture(tmp_path / "out.png", Picture(255 - picture.pixels, picture.alpha))
    with Image.open(tmp_path / "out.png") as out:
        assert out.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(out)[..., 3], rgba[..., 3])


@pytest.mark.parametrize(
    ("channels", "transparent"), [(1, None), (1, (7,)), (2, None), (3, None), (4, None)]
)
def test_an_interlaced_16_bit_png_is_read_by_pillow_or_refused(tmp_path, channels, transparent):
    """FFmpeg's decoder corrupts memory on interlaced 16-bit PNGs: those it would decode are
    refused naming the fix; plain 16-bit gray (Pillow's own decoder) is read exactly."""
    values = np.random.default_rng(3).integers(0, 65536, (13, 10, channels), dtype=np.uint16)
    png16(tmp_path / "i.png", values, transparent=transparent, interlaced=True)
    if channels == 1 and transparent is None:
        np.testing.assert_array_equal(read_picture(tmp_path / "i.png").pixels, values.repeat(3, -1))
    else:
        with pytest.raises(DataError, match=r"interlaced \(Adam7\) 16-bit PNG.*-interlace none"):
            read_picture(tmp_path / "i.png")


@pytest.mark.parametrize("keep", [0.3, 0.95])
def test_a_truncated_16_bit_png_is_named_as_such(tmp_path, keep):
    """FFmpeg's own words ('avcodec_send_packet()') were passed on."""
    values = np.random.default_rng(0).integers(0, 65536, (40, 50, 3), dtype=np.uint16)
    png16(tmp_path / "deep.png", values)
    data = (tmp_path / "deep.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DataError, match=r"'.*cut\.png'.* corrupt or truncated\.$"):
        read_picture(tmp_path / "cut.png")


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_png_keeps_its_bit_depth(tmp_path, channels):
    values = np.random.default_rng(0).integers(0, 65536, (9, 11, channels), dtype=np.uint16)
    png16(tmp_path / "deep.png", values)
    picture = read_picture(tmp_path / "deep.png")
    assert picture.grayscale == (channels < 3)
    assert picture.pixels.dtype == np.uint16 and probe_image(tmp_path / "deep.png").bits == 16
    expected = np.repeat(values[..., :1], 3, -1) if channels < 3 else values[..., :3]
    np.testing.assert_array_equal(picture.pixels, expected)
    alpha = values[..., -1] if channels in (2, 4) else None
    np.testing.assert_array_equal(picture.alpha, alpha)
    write_picture(tmp_path / "out.png", picture)
    again = read_picture(tmp_path / "out.png")
    assert again.grayscale == picture.grayscale
    np.testing.assert_array_equal(again.pixels, picture.pixels)
    np.testing.assert_array_equal(again.alpha, alpha)


@pytest.mark.parametrize("channels", [3, 4])
def test_16_bit_colour_tiff_keeps_its_bit_depth(tmp_path, channels):
    """Pillow reads 16-bit colour TIFFs as 8-bit RGB; they are read through FFmpeg and
    written back as 16-bit TIFF."""
    import tifffile

    values = np.random.default_rng(1).integers(0, 65536, (9, 11, channels), dtype=np.uint16)
    extra = {"extrasamples": ["unassalpha"]} if channels == 4 else {}
    tifffile.imwrite(tmp_path / "deep.tif", values, photometric="rgb", **extra)
    picture = read_picture(tmp_path / "deep.tif")
    assert picture.pixels.dtype == np.uint16 and probe_image(tmp_path / "deep.tif").bits == 16
    np.testing.assert_array_equal(picture.pixels, values[..., :3])
    write_picture(tmp_path / "out.tif", picture)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out.tif"), values)


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_oriented_16_bit_colour_png_is_read_upright_as_pillow_turns_8_bits(
    tmp_path, orientation
):
    """Pillow turns 8-bit images only; our 16-bit path must agree with it, mirrors included."""
    from PIL import ImageOps

    values = np.random.default_rng(2).integers(0, 65536, (6, 10, 3), dtype=np.uint16)
    exif = Image.Exif()
    exif[0x0112] = orientation
    png16(tmp_path / "r.png", values, exif)
    picture = read_picture(tmp_path / "r.png")
    assert picture.pixels.dtype == np.uint16
    eight = Image.fromarray((values >> 8).astype(np.uint8))
    eight.info["exif"] = exif.tobytes()
    eight.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(eight))
    assert expected.shape != values.shape or orientation < 5  # the sides swap from 5 on
    np.testing.assert_array_equal(picture.pixels >> 8, expected)


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("channels", [1, 3])
def test_exif_rotated_16_bit_tiff_is_read_upright(tmp_path, orientation, channels):
    """Pillow reports such a TIFF's sides already swapped; the samples were reshaped to
    them and came out scrambled."""
    import tifffile

    values = np.random.default_rng(3).integers(0, 65536, (6, 10, channels), dtype=np.uint16)
    photometric = "rgb" if channels == 3 else "minisblack"
    tag = (274, 3, 1, orientation, True)
    tifffile.imwrite(tmp_path / "r.tif", values.squeeze(), photometric=photometric, extratags=[tag])
    turn = {3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1), 8: np.rot90}[orientation]
    picture = read_picture(tmp_path / "r.tif")
    np.testing.assert_array_equal(picture.pixels[..., :channels], turn(values))


@pytest.mark.parametrize("name", ["anim.webp", "anim.png", "pages.tif", "deep.tif"])
def test_animations_and_multi_page_files_are_refused_not_cut_to_their_first_frame(tmp_path, name):
    import tifffile

    if name == "deep.tif":
        with tifffile.TiffWriter(tmp_path / name) as tiff:
            for _ in range(3):
                tiff.write(np.zeros((8, 8, 3), dtype=np.uint16), photometric="rgb")
    else:
        frames = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(3)]
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match=r"holds 3 frames.*video"):
        read_picture(tmp_path / name)


def test_a_jpeg_with_a_preview_and_a_tiff_with_a_thumbnail_are_one_image(tmp_path):
    """Pillow opens such a JPEG (phones' gain maps, cameras' previews) as a 2-frame MPO."""
    import tifffile

    photo = Image.new("RGB", (16, 12), (200, 30, 30))
    photo.save(tmp_path / "phone.jpg", format="MPO", save_all=True,
               append_images=[Image.new("RGB", (8, 6))])  # fmt: skip
    with tifffile.TiffWriter(tmp_path / "thumb.tif") as tiff:
        tiff.write(np.full((12, 16, 3), 200, dtype=np.uint8), photometric="rgb")
        tiff.write(np.zeros((6, 8, 3), dtype=np.uint8), photometric="rgb", subfiletype=1)
    for name in ("phone.jpg", "thumb.tif"):
        assert read_picture(tmp_path / name).pixels.shape == (12, 16, 3)


def test_a_tiff_only_pillow_can_parse_is_still_read(tmp_path, monkeypatch):
    import tifffile

    Image.new("RGB", (16, 12), (1, 2, 3)).save(tmp_path / "old.tif")

    def unreadable(*args, **kwargs):
        raise tifffile.TiffFileError("not a TIFF tifffile knows")

    monkeypatch.setattr(tifffile, "TiffFile", unreadable)
    assert read_picture(tmp_path / "old.tif").pixels.shape == (12, 16, 3)


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        (np.linspace(0, 1, 80, dtype=np.float32).reshape(8, 10), "floating-point"),
        (np.arange(80, dtype=np.int32).reshape(8, 10) * 3000, "32-bit or signed integer"),
    ],
)
def test_float_and_32_bit_integer_images_are_refused(tmp_path, values, kind):
    """Their white level is not in the file: scaled either way, a wrong image would be
    written without a word (0-1 floats came out black, integers were clipped)."""
    Image.fromarray(values).save(tmp_path / "x.tif")
    with pytest.raises(DataError, match=f"holds {kind} samples"):
        read_picture(tmp_path / "x.tif")


@pytest.mark.parametrize(
    ("name", "alpha", "dtype", "problem"),
    [
        ("x.jpg", True, np.uint8, "JPEG keeps no alpha channel"),
        ("x.ppm", True, np.uint8, "PPM keeps no alpha channel"),
        ("x.bmp", True, np.uint8, "BMP keeps no alpha channel"),
        ("x.gif", False, np.uint8, r"\.gif is not an image format restored images are"),
        ("x.psd", False, np.uint8, r"\.psd is not an image format"),
        ("x.webp", True, np.uint8, None),
        ("x.jpg", False, np.uint16, "16-bit images are written as PNG, TIFF or PPM/PGM only"),
        ("x.pgm", True, np.uint16, "PPM keeps no alpha channel"),
        ("x.tif", True, np.uint16, None),
        ("x.v2", False, np.uint8, ".v2 is not an image format"),
    ],
)
def test_output_form_is_checked_before_writing(tmp_path, name, alpha, dtype, problem):
    pixels = np.zeros((4, 5, 3), dtype)
    picture = Picture(pixels, pixels[..., 0].copy() if alpha else None)
    if problem is None:
        check_output(tmp_path / name, picture)
        return
    with pytest.raises(DataError, match=problem):
        check_output(tmp_path / name, picture)


def test_write_picture_refuses_an_array_and_a_file_in_its_path(tmp_path):
    pixels = np.zeros((4, 5, 3), np.uint8)
    with pytest.raises(DataError, match=r"takes a Picture, got ndarray.*Picture\(pixels\)"):
        write_picture(tmp_path / "a.png", pixels)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"Cannot write .*: .*file. is a file"):
        write_picture(tmp_path / "file" / "a.png", Picture(pixels))


def test_exif_rotated_jpeg_is_read_upright(tmp_path):
    stored = photo(20, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=100)
    picture = read_picture(tmp_path / "r.jpg")
    assert picture.size == (40, 20)
    with Image.open(tmp_path / "r.jpg") as raw:
        upright = np.asarray(raw.transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(picture.pixels, upright)


def test_one_pixel_image_round_trips(tmp_path):
    Image.fromarray(np.full((1, 1, 3), 7, np.uint8)).save(tmp_path / "one.png")
    picture = read_picture(tmp_path / "one.png")
    assert picture.size == (1, 1)


def test_corrupt_file_is_a_data_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(DataError, match=r"bad\.png"):
        read_picture(tmp_path / "bad.png")


def _huge_png(path, side):
    """A valid PNG header announcing side x side grayscale pixels, streamed through zlib
    in rows (the pixels are never held in memory)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    compressor, row = zlib.compressobj(9), b"\0" * (side + 1)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def test_the_pixel_limit_is_checked_from_the_header_without_decoding(tmp_path):
    """A PNG announcing 100000 x 100000 pixels with no pixel data behind it: refused for
    its size (decoding it first failed on the missing data, or took gigabytes)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = chunk(b"IDAT", zlib.compress(b"\0" * 100))
    (tmp_path / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + data)
    with pytest.raises(DataError, match="10,000,000,000 pixels, over the limit"):
        probe_image(tmp_path / "huge.png")


def test_20000_pixel_image_is_probed_from_its_header_and_limited(tmp_path):
    _huge_png(tmp_path / "huge.png", 20000)
    header = probe_image(tmp_path / "huge.png")
    assert (header.height, header.width, header.bits) == (20000, 20000, 8)
    set_pixel_limit(100_000_000)
    try:
        with pytest.raises(DataError, match="400,000,000 pixels"):
            probe_image(tmp_path / "huge.png")
    finally:
        set_pixel_limit(1_000_000_000)


@pytest.mark.parametrize(
    "layout",
    [
        {"tile": (16, 16)},
        {"planarconfig": "separate"},
        {"rowsperstrip": 3, "compression": "zlib"},
        {"bigtiff": True},
    ],
)
def test_16_bit_tiff_of_any_layout_is_read_exactly(tmp_path, layout):
    """Tiled TIFFs came back black and planar ones as scrambled 8 bits from decoders that
    do not read every layout."""
    import tifffile

    values = np.random.default_rng(3).integers(0, 65536, (20, 37, 3), dtype=np.uint16)
    data = np.moveaxis(values, -1, 0) if layout.get("planarconfig") else values
    tifffile.imwrite(tmp_path / "in.tif", data, photometric="rgb", **layout)
    assert probe_image(tmp_path / "in.tif").bits == 16
    np.testing.assert_array_equal(read_picture(tmp_path / "in.tif").pixels, values)


def test_16_bit_gray_with_alpha_tiff_round_trips(tmp_path):
    import tifffile

    values = np.random.default_rng(4).integers(0, 65536, (9, 11, 2), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "la.tif", values, photometric="minisblack", extrasamples=[2])
    picture = read_picture(tmp_path / "la.tif")
    assert picture.grayscale
    np.testing.assert_array_equal(picture.pixels[..., 0], values[..., 0])
    np.testing.assert_array_equal(picture.alpha, values[..., 1])
    write_picture(tmp_path / "out.tif", picture)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out.tif"), values)


@pytest.mark.parametrize(
    ("dtype", "kind"),
    [
        (np.float32, "floating-point"),
        (np.float64, "floating-point"),
        (np.int32, "32-bit or signed"),
    ],
)
def test_colour_tiffs_pillow_cannot_open_say_why_they_are_refused(tmp_path, dtype, kind):
    import tifffile

    tifffile.imwrite(tmp_path / "c.tif", np.zeros((4, 5, 3), dtype), photometric="rgb")
    with pytest.raises(DataError, match=f"holds {kind}"):
        read_picture(tmp_path / "c.tif")


def test_signed_16_bit_tiff_is_refused(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "s.tif", np.full((4, 5), -3, np.int16))
    with pytest.raises(DataError, match="signed integer samples"):
        read_picture(tmp_path / "s.tif")


def test_16_bit_png_name_with_a_percent_pattern_is_written(tmp_path):
    """An FFmpeg image muxer reads ``%d`` in a name as a frame number."""
    values = np.random.default_rng(5).integers(0, 65536, (6, 7, 3), dtype=np.uint16)
    write_picture(tmp_path / "frame%d.png", Picture(values))
    assert [p.name for p in tmp_path.iterdir()] == ["frame%d.png"]
    np.testing.assert_array_equal(read_picture(tmp_path / "frame%d.png").pixels, values)


def test_16_bit_png_names_ffmpeg_would_misread_are_read_as_named(tmp_path, monkeypatch):
    """FFmpeg's file reader took ``scan%d.png`` for a sequence and returned ``scan1.png``'s
    pixels, and ``10:30.png`` for a ``10:`` protocol (an error)."""
    rng = np.random.default_rng(8)
    own, other = (rng.integers(0, 65536, (6, 7, 3), dtype=np.uint16) for _ in range(2))
    png16(tmp_path / "scan%d.png", own)
    png16(tmp_path / "scan1.png", other)
    png16(tmp_path / "10:30.png", own)
    np.testing.assert_array_equal(read_picture(tmp_path / "scan%d.png").pixels, own)
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(read_picture("10:30.png").pixels, own)


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_png_transparent_value_is_read_as_alpha(tmp_path, channels):
    """A tRNS value made 8-bit PNGs transparent but was dropped from 16-bit ones."""
    values = np.random.default_rng(9).integers(0, 65536, (6, 7, channels), dtype=np.uint16)
    values[4, 1] = values[2, 3]
    key = tuple(int(v) for v in values[2, 3])
    png16(tmp_path / "t.png", values, transparent=key)
    picture = read_picture(tmp_path / "t.png")
    assert picture.grayscale == (channels == 1)
    np.testing.assert_array_equal(picture.pixels[..., :channels], values)
    expected = np.where((values == key).all(-1), 0, 65535)
    assert (expected == 0).sum() == 2
    np.testing.assert_array_equal(picture.alpha, expected)


def test_16_bit_tiff_with_premultiplied_alpha_is_read_straight(tmp_path):
    """Colour premultiplied by alpha ("associated") was written back as straight alpha:
    darker wherever the image is partly transparent."""
    import tifffile

    rng = np.random.default_rng(10)
    straight = rng.integers(0, 65536, (6, 7, 3))
    alpha = rng.integers(8192, 65536, (6, 7))
    alpha[0, 0] = 0
    premultiplied = np.rint(straight * (alpha[..., None] / 65535))
    samples = np.dstack([premultiplied, alpha]).astype(np.uint16)
    tifffile.imwrite(tmp_path / "p.tif", samples, photometric="rgb", extrasamples=["assocalpha"])
    picture = read_picture(tmp_path / "p.tif")
    np.testing.assert_array_equal(picture.alpha, alpha)
    error = np.abs(picture.pixels.astype(np.int64) - straight)
    assert error[alpha > 0].max() <= 4 and not picture.pixels[0, 0].any()


def test_cmyk_is_read_as_rgb_without_its_cmyk_profile(tmp_path):
    """The CMYK profile was written onto the RGB result, which colour-managed readers then
    refuse."""
    from PIL import ImageCms

    srgb = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    srgb[16:20] = b"CMYK"  # a profile declared for CMYK (the data colour space field)
    cmyk = Image.fromarray(photo(12, 10)).convert("CMYK")
    cmyk.save(tmp_path / "c.tif", icc_profile=bytes(srgb))
    picture = read_picture(tmp_path / "c.tif")
    assert picture.icc_profile is None
    np.testing.assert_array_equal(picture.pixels, np.asarray(cmyk.convert("RGB")))


def test_write_picture_refuses_pixels_it_cannot_write_by_name(tmp_path):
    """Float pixels raised Pillow's untyped TypeError."""
    floats = np.zeros((4, 5, 3))
    with pytest.raises(DataError, match=r"uint8 or uint16 pixels.*got float64 of shape"):
        write_picture(tmp_path / "a.png", Picture(floats))
    pixels = np.zeros((4, 5, 3), np.uint8)
    with pytest.raises(DataError, match=r"with alpha uint16 of shape \(4, 5\)"):
        write_picture(tmp_path / "a.png", Picture(pixels, np.zeros((4, 5), np.uint16)))
    assert not (tmp_path / "a.png").exists()


def _pnm(path, magic, values, maxval):
    height, width = values.shape[:2]
    path.write_bytes(
        b"%s %d %d %d\n" % (magic, width, height, maxval) + values.astype(">u2").tobytes()
    )


def test_16_bit_pnm_keeps_its_precision(tmp_path):
    """A 16-bit PPM was cut to 8 bits; a 10-bit PGM was refused as 32-bit. Both are
    written back as 16-bit PNM."""
    colour = np.random.default_rng(6).integers(0, 65536, (5, 6, 3), dtype=np.uint16)
    _pnm(tmp_path / "c.ppm", b"P6", colour, 65535)
    np.testing.assert_array_equal(read_picture(tmp_path / "c.ppm").pixels, colour)
    gray = np.arange(30, dtype=np.uint16).reshape(5, 6) * 30
    _pnm(tmp_path / "g.pgm", b"P5", gray, 1023)
    picture = read_picture(tmp_path / "g.pgm")
    assert picture.grayscale and picture.pixels.dtype == np.uint16
    np.testing.assert_array_equal(picture.pixels[..., 0], np.rint(gray * (65535 / 1023)))
    for name, written in [("c2.ppm", read_picture(tmp_path / "c.ppm")), ("g2.pgm", picture)]:
        write_picture(tmp_path / name, written)
        again = read_picture(tmp_path / name)
        assert again.grayscale == written.grayscale
        np.testing.assert_array_equal(again.pixels, written.pixels)


def _icc() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()


@pytest.mark.parametrize(
    ("name", "deep"), [("p.png", False), ("p.jpg", False), ("p.png", True), ("p.tif", True)]
)
def test_colour_profile_and_exif_are_written_back(tmp_path, name, deep):
    """A restored photo keeps what says how to show its colours, and its camera tags."""
    pixels = photo(12, 10).astype(np.uint16) * 257 if deep else photo(12, 10)
    exif = Image.Exif()
    exif[0x010F] = "Camera maker"
    picture = Picture(pixels, icc_profile=_icc(), exif=exif.tobytes())
    write_picture(tmp_path / name, picture)
    with Image.open(tmp_path / name) as out:
        assert out.info.get("icc_profile") == _icc()
        tags = out.getexif()
        if name.endswith((".png", ".jpg")):
            assert tags[0x010F] == "Camera maker"
    again = read_picture(tmp_path / name)
    assert again.icc_profile == _icc()
    if name.endswith((".png", ".jpg")):
        kept = Image.Exif()
        kept.load(again.exif)
        assert kept[0x010F] == "Camera maker"


def test_reading_drops_the_orientation_tag_only(tmp_path):
    exif = Image.Exif()
    exif[0x010F] = "Camera maker"
    exif[0x0112] = 6
    Image.fromarray(photo(12, 10)).save(tmp_path / "r.jpg", exif=exif, icc_profile=_icc())
    picture = read_picture(tmp_path / "r.jpg")
    kept = Image.Exif()
    kept.load(picture.exif)
    assert kept[0x010F] == "Camera maker" and 0x0112 not in kept
    assert picture.icc_profile == _icc() and picture.size == (10, 12)
