"""Image files in and out: grayscale, alpha, 16 bits, EXIF orientation, size limits."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from inference_helpers import photo
from PIL import Image

from loraxir.errors import DataError
from loraxir.inference.images import (
    Picture,
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


def test_rgba_alpha_is_kept(tmp_path):
    rgba = np.dstack([photo(20, 30), np.arange(600, dtype=np.uint8).reshape(20, 30)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    picture = read_picture(tmp_path / "a.png")
    np.testing.assert_array_equal(picture.alpha, rgba[..., 3])
    write_picture(tmp_path / "out.png", Picture(255 - picture.pixels, picture.alpha))
    with Image.open(tmp_path / "out.png") as out:
        assert out.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(out)[..., 3], rgba[..., 3])


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_16_bit_png_keeps_its_bit_depth(tmp_path, channels):
    values = np.random.default_rng(0).integers(0, 65536, (9, 11, channels), dtype=np.uint16)
    if channels == 1:
        Image.fromarray(values[..., 0]).save(tmp_path / "deep.png")
    else:
        from loraxir.inference.images import _write_deep_colour

        alpha = values[..., 3] if channels == 4 else None
        _write_deep_colour(tmp_path / "deep.png", Picture(values[..., :3], alpha))
    picture = read_picture(tmp_path / "deep.png")
    assert picture.pixels.dtype == np.uint16 and probe_image(tmp_path / "deep.png").bits == 16
    expected = np.repeat(values[..., :1], 3, -1) if channels == 1 else values[..., :3]
    np.testing.assert_array_equal(picture.pixels, expected)
    write_picture(tmp_path / "out.png", picture)
    again = read_picture(tmp_path / "out.png")
    np.testing.assert_array_equal(again.pixels, picture.pixels)
    if channels == 4:
        np.testing.assert_array_equal(again.alpha, values[..., 3])


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
