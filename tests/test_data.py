"""Datasets: shapes, labels, determinism, the by-image split, image conversions, real pairs."""

from __future__ import annotations

import io
import itertools
import json
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from inference_helpers import png16
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader

from loraxir import degradations
from loraxir.data import (
    SKIMAGE_IMAGES,
    PairedFolder,
    SyntheticPairs,
    TaskBalancedSampler,
    read_image,
    skimage_image,
    split_by_image,
    task_labels,
)
from loraxir.errors import DataError, UnknownNameError
from loraxir.inference.images import Picture, write_picture

PATCH = 32


@pytest.fixture(scope="module")
def splits() -> tuple[SyntheticPairs, SyntheticPairs]:
    return SyntheticPairs.splits("skimage", suite="three_task", patch_size=PATCH)


def _save(path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


def _rgb(seed: int, height: int = 24, width: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ----------------------------------------------------------------- SyntheticPairs


def test_items_have_the_documented_shapes_ranges_and_labels(splits):
    train, _ = splits
    suite = degradations.suite("three_task")
    for index in range(len(suite)):
        item = train[index]
        assert set(item) == {"lq", "gt", "task", "task_name", "label", "name"}
        for key in ("lq", "gt"):
            assert item[key].shape == (3, PATCH, PATCH) and item[key].dtype == torch.float32
            assert 0 <= item[key].min() and item[key].max() <= 1
        assert item["task"] == index and item["task_name"] == suite.task_names[index]
        assert item["label"] == suite.label_index(index)
        assert item["name"] in SKIMAGE_IMAGES
        assert not torch.equal(item["lq"], item["gt"])


def test_every_task_gets_the_same_number_of_items(splits):
    train, _ = splits
    assert len(train) == len(train.image_ids) * 5
    assert train.task_labels[:12] == [train[i]["task"] for i in range(12)]
    assert set(Counter(train.task_labels).values()) == {len(train.image_ids)}


def test_split_by_image_leaks_no_image(splits):
    train, test = splits
    assert not set(train.image_ids) & set(test.image_ids)
    assert sorted(train.image_ids + test.image_ids) == sorted(SKIMAGE_IMAGES)
    assert len(test.image_ids) == round(0.2 * len(SKIMAGE_IMAGES))
    assert {test[i]["name"] for i in range(len(test))} == set(test.image_ids)
    again, _ = SyntheticPairs.splits("skimage", suite="five_task", patch_size=8)
    assert again.image_ids == train.image_ids  # the split depends on the images, not the suite


def test_split_by_image_keeps_repeated_ids_together():
    ids = ["a", "b", "a", "c", "d", "b"]
    test = split_by_image(ids, "test", 0.5, seed=3)
    train = split_by_image(ids, "train", 0.5, seed=3)
    assert sorted(test + train) == list(range(6))
    assert not {ids[i] for i in test} & {ids[i] for i in train}


def test_items_are_deterministic_and_change_with_the_epoch(splits):
    train, _ = splits
    other = SyntheticPairs("skimage", "three_task", PATCH, split="train")
    first, again = train[7], other[7]
    assert torch.equal(first["lq"], again["lq"]) and torch.equal(first["gt"], again["gt"])
    other.set_epoch(1)
    assert not torch.equal(other[7]["lq"], first["lq"])


def test_test_set_is_not_augmented_and_uses_another_seed(splits):
    train, test = splits
    assert train.augment and not test.augment and test.seed == train.seed + 1


def test_task_subset_keeps_the_suite_indices():
    rain_only = SyntheticPairs("skimage", "three_task", 16, tasks=["rain", "haze"])
    assert set(rain_only.task_labels) == {3, 4}
    assert rain_only[1]["task_name"] == "haze" and rain_only[1]["label"] == 2


def test_loader_batches_do_not_depend_on_the_number_of_workers(splits):
    train, _ = splits

    def batches(workers: int) -> list[torch.Tensor]:
        loader = DataLoader(
            train,
            batch_size=4,
            shuffle=True,
            num_workers=workers,
            generator=torch.Generator().manual_seed(0),
        )
        return [batch["lq"] for batch in itertools.islice(loader, 3)]

    for a, b in zip(batches(0), batches(2), strict=True):
        assert torch.equal(a, b)


def test_seeded_loader_resumes_bit_exactly(splits):
    train, _ = splits

    def loader() -> DataLoader:
        return DataLoader(
            train, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1)
        )

    full = [batch["lq"] for batch in itertools.islice(loader(), 4)]
    resumed = [batch["lq"] for batch in itertools.islice(loader(), 2, 4)]
    assert all(torch.equal(a, b) for a, b in zip(full[2:], resumed, strict=True))


def test_whole_images_without_patch_size():
    full = SyntheticPairs("skimage", "five_task", None, tasks=["noise"])
    item = full[0]
    assert item["gt"].shape == skimage_image(item["name"]).shape


def _motion_suite(tmp_path):
    """A suite with one fixed 7 px motion blur (reach 3 px), so that degrading is a pure
    function of the image."""
    path = tmp_path / "motion.yaml"
    path.write_text(
        "name: motion\ntasks:\n  - name: blur\n    steps:\n"
        "      - motion_blur: {length: 7, angle: 30}\n"
    )
    return degradations.load_suite(path)


def _find(patch: torch.Tensor, photo: torch.Tensor) -> tuple[int, int]:
    """Where the ``(3, p, p)`` patch lies in ``photo`` (random pixels: one place only)."""
    size = patch.shape[-1]
    for top, left in itertools.product(range(photo.shape[-2] - size + 1), repeat=2):
        if torch.equal(photo[:, top : top + size, left : left + size], patch):
            return top, left
    raise AssertionError("patch not found in the photo")


@pytest.mark.parametrize("context, same", [(8, True), (0, False)])
def test_patches_are_crops_of_the_degraded_photo_with_enough_context(tmp_path, context, same):
    _save(tmp_path / "photo" / "a.png", _rgb(4, 40, 40))
    suite = _motion_suite(tmp_path)
    data = SyntheticPairs(
        tmp_path / "photo", suite, 16, split="all", repeats=6, augment=False, context=context
    )
    photo = read_image(tmp_path / "photo" / "a.png").float()[None] / 255
    blurred_photo, _ = suite.degrade(photo, 0, torch.Generator())
    matches = []
    for index in range(len(data)):
        item = data[index]
        top, left = _find(item["gt"], photo[0])
        crop = blurred_photo[0, :, top : top + 16, left : left + 16]
        matches.append(torch.allclose(item["lq"], crop, atol=1 / 255 + 1e-6))
    assert all(matches) if same else not any(matches)


def test_context_keeps_the_crops_and_flips_of_bare_patches():
    bare = SyntheticPairs("skimage", "five_task", 24, split="train", context=0)
    wide = SyntheticPairs("skimage", "five_task", 24, split="train", context=32)
    assert bare.augment and wide.augment
    for index in range(10):
        assert torch.equal(bare[index]["gt"], wide[index]["gt"])
        assert wide[index]["lq"].shape == (3, 24, 24)


@pytest.mark.parametrize("context", [-1, 2.5, True])
def test_bad_context_raises(context):
    with pytest.raises(DataError, match="context must be a whole number"):
        SyntheticPairs("skimage", "five_task", 16, context=context)


@pytest.mark.parametrize(
    ("patch_size", "options", "match"),
    [
        (2.5, {}, "patch_size must be a whole number"),
        ("16", {}, "patch_size must be a whole number"),
        (True, {}, "patch_size must be a whole number"),
        (0, {}, "patch_size must be a whole number"),
        (16, {"seed": -1}, "seed must be an integer >= 0"),
        (16, {"repeats": 2.5}, "repeats must be an integer"),
        (16, {"tasks": []}, "tasks must be a non-empty list"),
        (16, {"tasks": "rain"}, "tasks must be a non-empty list"),
    ],
)
def test_bad_synthetic_arguments_raise_data_error(patch_size, options, match):
    with pytest.raises(DataError, match=match):
        SyntheticPairs("skimage", "three_task", patch_size, **options)


def test_splits_refuses_a_split_argument():
    with pytest.raises(DataError, match="builds both the 'train' and the 'test' side"):
        SyntheticPairs.splits("skimage", "three_task", 16, split="all")


# ----------------------------------------------------------------- folders of clean images


def test_folder_converts_grayscale_rgba_and_16_bit(tmp_path):
    gray = np.arange(24 * 20, dtype=np.uint8).reshape(24, 20)
    rgba = np.dstack([_rgb(1), np.full((24, 20), 7, np.uint8)])
    deep = (np.arange(24 * 20, dtype=np.uint16).reshape(24, 20) * 131).astype(np.uint16)
    _save(tmp_path / "gray.png", gray)
    _save(tmp_path / "rgba.png", rgba)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert torch.equal(read_image(tmp_path / "gray.png"), torch.from_numpy(gray).expand(3, -1, -1))
    assert torch.equal(
        read_image(tmp_path / "rgba.png"), torch.from_numpy(rgba[..., :3]).permute(2, 0, 1)
    )
    expected = torch.from_numpy(np.round(deep / 257).astype(np.uint8)).expand(3, -1, -1)
    assert torch.equal(read_image(tmp_path / "deep.png"), expected)
    # 16-bit colour, which Pillow cuts to its high byte (v >> 8), is rounded too.
    colour = np.random.default_rng(2).integers(0, 65536, (24, 20, 3), dtype=np.uint16)
    write_picture(tmp_path / "deep_rgb.png", Picture(colour))
    rounded = torch.from_numpy(np.round(colour / 257).astype(np.uint8)).permute(2, 0, 1)
    assert torch.equal(read_image(tmp_path / "deep_rgb.png"), rounded)
    data = SyntheticPairs(tmp_path, "five_task", 16, split="all")
    assert sorted(data.image_ids) == ["deep.png", "deep_rgb.png", "gray.png", "rgba.png"]
    assert data[0]["gt"].shape == (3, 16, 16)


def test_image_smaller_than_the_patch_is_reflect_padded(tmp_path):
    small = _rgb(2, 10, 6)
    _save(tmp_path / "small.png", small)
    data = SyntheticPairs(tmp_path, "five_task", 16, tasks=["noise"], augment=False)
    patch = (data[0]["gt"] * 255).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(patch, np.pad(small, ((0, 6), (0, 10), (0, 0)), mode="reflect"))


def test_corrupt_and_non_image_files_are_skipped_with_a_counting_warning(tmp_path):
    _save(tmp_path / "good.png", _rgb(3))
    _save(tmp_path / "nested" / "good2.png", _rgb(4))
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".hidden.png").write_bytes(b"ignored")
    _save(tmp_path / ".ipynb_checkpoints" / "good-checkpoint.png", _rgb(5))  # a hidden folder
    _save(tmp_path / "UPPER.PNG", _rgb(6))  # suffixes in any case
    with pytest.warns(
        UserWarning,
        match=r"2 file\(s\).*1 corrupt or unsupported .*, 1 without a supported image extension",
    ):
        data = SyntheticPairs(tmp_path, "five_task", 16)
    assert data.image_ids == ["UPPER.PNG", "good.png", "nested/good2.png"]
    with pytest.raises(DataError, match="strict=False"):
        SyntheticPairs(tmp_path, "five_task", 16, strict=True)


def test_a_rotated_uncompressed_gray_tiff_is_read_upright(tmp_path):
    """Pillow decoded it as stripes of the stored shape, trained on without a word."""
    import tifffile

    upright = np.random.default_rng(0).integers(0, 256, (20, 12), dtype=np.uint8)
    stored = np.ascontiguousarray(np.rot90(upright, 1))  # orientation 6 turns it back
    tifffile.imwrite(tmp_path / "scan.tif", stored, extratags=[(274, "H", 1, 6, True)])
    assert SyntheticPairs(tmp_path, "five_task", 8, split="all").image_ids == ["scan.tif"]
    np.testing.assert_array_equal(read_image(tmp_path / "scan.tif")[0].numpy(), upright)


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.int32])
def test_float_signed_and_32_bit_files_are_skipped_as_restoring_refuses_them(tmp_path, dtype):
    """A float TIFF of 0-255 trained as white, a signed one dimmed, a 32-bit one clipped."""
    import tifffile

    _save(tmp_path / "good.png", _rgb(0))
    tifffile.imwrite(tmp_path / "odd.tif", (np.arange(480).reshape(24, 20) % 256).astype(dtype))
    with pytest.warns(UserWarning, match=r"1 file\(s\).*1 corrupt or unsupported"):
        assert SyntheticPairs(tmp_path, "five_task", 8, split="all").image_ids == ["good.png"]
    with pytest.raises(DataError, match="cannot be scaled"):
        read_image(tmp_path / "odd.tif")
    (tmp_path / "good.png").unlink()
    with pytest.raises(DataError, match=r"No images .* corrupt or unsupported .*'odd\.tif'"):
        SyntheticPairs(tmp_path, "five_task", 8)


@pytest.mark.parametrize("name", ["a.tif", "a.bmp", "a.ppm"])
def test_a_truncated_tiff_bmp_or_pnm_is_skipped_at_the_scan(tmp_path, name):
    """It passed the scan and stopped training at its turn (or at validation)."""
    _save(tmp_path / "good.png", _rgb(0))
    _save(tmp_path / name, _rgb(1, 64, 64))
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) * 2 // 3])
    with pytest.warns(UserWarning, match="1 corrupt or unsupported"):
        assert SyntheticPairs(tmp_path, "five_task", 8, split="all").image_ids == ["good.png"]


def test_a_decompression_bomb_header_is_skipped_not_a_traceback(tmp_path):
    import struct
    import zlib

    _save(tmp_path / "good.png", _rgb(0))
    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    bomb = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk
    bomb += struct.pack(">I", zlib.crc32(chunk)) + struct.pack(">I", 0) + b"IEND"
    (tmp_path / "bomb.png").write_bytes(bomb + struct.pack(">I", zlib.crc32(b"IEND")))
    with pytest.warns(UserWarning, match="1 corrupt or unsupported"):
        assert SyntheticPairs(tmp_path, "five_task", 8, split="all").image_ids == ["good.png"]


def test_linked_folders_are_read_and_a_linked_photo_is_used_once(tmp_path):
    """rglob skipped a linked folder's photos; a link to a listed photo put it on both
    sides of the train/test split."""
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    for index in range(4):
        _save(photos / f"p{index}.png", _rgb(index))
    _save(elsewhere / "e.png", _rgb(9))
    (photos / "set").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(photos, target_is_directory=True)  # ends
    (photos / "again.png").symlink_to(photos / "p0.png")
    for index in range(8):  # the walk's own order put some links first
        _save(photos / f"real{index}" / "z.png", _rgb(10 + index))
        (photos / f"link{index}").symlink_to(photos / f"real{index}", target_is_directory=True)
    with pytest.warns(UserWarning, match=r"1 file\(s\) .* are links to photos listed already"):
        data = SyntheticPairs(photos, "five_task", 8, split="all")
    # A folder reached as itself and through a link keeps its own path, on every machine.
    reals = [f"real{index}/z.png" for index in range(8)]
    assert data.image_ids == ["p0.png", "p1.png", "p2.png", "p3.png", *reals, "set/e.png"]


def test_animations_and_turned_palette_tiffs_are_skipped_at_the_scan(tmp_path):
    """The scan listed them and reading them stopped training at their turn."""
    import tifffile

    _save(tmp_path / "good.png", _rgb(0))
    frames = [Image.fromarray(_rgb(seed)) for seed in (1, 2)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    palette = np.zeros((256, 3), np.uint16)
    tifffile.imwrite(
        tmp_path / "pal.tif",
        np.zeros((12, 20), np.uint8),
        photometric="palette",
        colormap=palette.T,
        extratags=[(274, "H", 1, 6, True)],
    )
    with pytest.warns(UserWarning, match="2 corrupt or unsupported"):
        assert SyntheticPairs(tmp_path, "five_task", 8, split="all").image_ids == ["good.png"]


def test_a_name_written_in_two_unicode_forms_pairs(tmp_path):
    """lq/café.png from a Mac (e + accent) found no gt/café.png (one character)."""
    import unicodedata

    for side, form in (("lq", "NFD"), ("gt", "NFC")):
        _save(tmp_path / side / unicodedata.normalize(form, "café.png"), _rgb(0))
    assert len(PairedFolder(tmp_path, task="noise")) == 1


def test_empty_folder_raises(tmp_path):
    with pytest.raises(DataError, match="No images"):
        SyntheticPairs(tmp_path, "five_task", 16)


def test_missing_folder_raises(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        SyntheticPairs(tmp_path / "nowhere", "five_task", 16)
    for path, message in ((tmp_path / "nope.png", "does not exist"), (tmp_path, "is a folder")):
        with pytest.raises(DataError, match=f"{message}; pass an image file"):
            read_image(path)
    buffer = io.BytesIO()
    Image.fromarray(_rgb(3)).save(buffer, format="PNG")
    assert read_image(buffer).shape == (3, *_rgb(3).shape[:2])  # file objects read as before


def test_a_split_needs_two_images(tmp_path):
    _save(tmp_path / "only.png", _rgb(5))
    with pytest.raises(DataError, match="at least 2"):
        SyntheticPairs(tmp_path, "five_task", 16, split="train")


def test_hf_dataset_source():
    import datasets

    images = [Image.fromarray(_rgb(seed)) for seed in range(4)]
    table = datasets.Dataset.from_dict({"picture": images}).cast_column("picture", datasets.Image())
    data = SyntheticPairs(table, "five_task", 16, image_column="picture", split="train")
    assert len(data.image_ids) == 3 and data[0]["gt"].shape == (3, 16, 16)
    with pytest.raises(DataError, match="image_column"):
        SyntheticPairs(table, "five_task", 16)
    with pytest.raises(DataError, match="one split"):
        SyntheticPairs(datasets.DatasetDict({"train": table}), "five_task", 16)
    with pytest.raises(DataError, match=r"streams its rows.*map-style"):
        SyntheticPairs(table.to_iterable_dataset(), "five_task", 16, image_column="picture")


def test_unknown_source_type_raises():
    with pytest.raises(DataError, match="skimage"):
        SyntheticPairs(42, "five_task", 16)


# ----------------------------------------------------------------- PairedFolder


def _metadata_folder(root, count: int = 3) -> None:
    rows = []
    for index in range(count):
        _save(root / "lq" / f"{index}.png", _rgb(10 + index))
        _save(root / "gt" / f"{index}.png", _rgb(20 + index))
        task = "rain" if index % 2 else "haze"
        rows.append(
            {"lq_file_name": f"lq/{index}.png", "gt_file_name": f"gt/{index}.png", "task": task}
        )
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")


def test_paired_folder_reads_a_metadata_jsonl_imagefolder_offline(tmp_path):
    _metadata_folder(tmp_path)
    pairs = PairedFolder(tmp_path, task_names=["noise", "rain", "haze"])
    assert len(pairs) == 3 and pairs.task_labels == [2, 1, 2]
    item = pairs[1]
    assert item["task"] == 1 and item["task_name"] == "rain" and item["name"] == "lq/1.png"
    assert torch.equal(
        (item["lq"] * 255).round().byte(), torch.from_numpy(_rgb(11)).permute(2, 0, 1)
    )
    assert torch.equal(
        (item["gt"] * 255).round().byte(), torch.from_numpy(_rgb(21)).permute(2, 0, 1)
    )

    import datasets

    table = datasets.load_dataset(
        "imagefolder", data_dir=str(tmp_path), split="train", cache_dir=str(tmp_path / ".cache")
    )
    assert table.column_names == ["lq", "gt", "task"]
    assert np.array_equal(np.asarray(table[1]["lq"]), _rgb(11))
    repeated = PairedFolder(tmp_path, task_names=["noise", "rain", "haze"], repeats=3)
    assert len(repeated.task_labels) == len(repeated) == 9  # the sampler reads them by index
    assert [repeated[i]["task"] for i in range(9)] == repeated.task_labels
    assert [repeated[i]["name"] for i in range(3)] == [pairs[i]["name"] for i in range(3)]


def test_paired_folder_pairs_differing_names_with_a_key(tmp_path):
    for index in (1, 2):
        _save(tmp_path / "rainy" / f"rain-{index:03d}.png", _rgb(index))
        _save(tmp_path / "norain" / f"norain-{index:03d}.png", _rgb(index))
    pairs = PairedFolder(tmp_path, "rainy", "norain", key=r"(\d+)", task="rain")
    assert len(pairs) == 2 and pairs.task_names == ["rain"]
    assert torch.equal(pairs[0]["lq"], pairs[0]["gt"])
    for index in (1, 2):  # the key is the group, not the whole match
        _save(tmp_path / "lq" / f"img_{index}.png", _rgb(index))
        _save(tmp_path / "gt" / f"{index}.png", _rgb(index))
    named = PairedFolder(tmp_path, "lq", "gt", key=r"(?:img_)?(\d+)", task="rain")
    assert len(named) == 2 and torch.equal(named[1]["lq"], named[1]["gt"])


def test_paired_folder_reads_nested_sequences_and_many_to_one(tmp_path):
    for sequence in ("seq_a", "seq_b"):
        _save(tmp_path / sequence / "blur" / "000001.png", _rgb(1))
        _save(tmp_path / sequence / "sharp" / "000001.png", _rgb(1))
    _save(tmp_path / "hazy_set" / "hazy" / "0001_0.8_0.2.png", _rgb(2))
    _save(tmp_path / "hazy_set" / "hazy" / "0001_0.9_0.1.png", _rgb(2))
    _save(tmp_path / "hazy_set" / "clear" / "0001.png", _rgb(2))
    gopro = PairedFolder(tmp_path, "blur", "sharp", task="blur")
    assert [gopro[i]["name"] for i in range(2)] == [
        "seq_a/blur/000001.png",
        "seq_b/blur/000001.png",
    ]
    sots = PairedFolder(tmp_path / "hazy_set", "hazy", "clear", key=r"^(\d+)")
    assert len(sots) == 2 and sots.task_names == ["hazy_set"]


def test_paired_patches_stay_aligned(tmp_path):
    image = _rgb(5, 40, 40)
    _save(tmp_path / "lq" / "a.png", image)
    _save(tmp_path / "gt" / "a.png", image)
    pairs = PairedFolder(tmp_path, patch_size=16, augment=True, seed=3)
    item = pairs[0]
    assert item["lq"].shape == (3, 16, 16) and torch.equal(item["lq"], item["gt"])
    pairs.set_epoch(1)
    assert not torch.equal(pairs[0]["gt"], item["gt"])


def test_unmatched_names_raise_naming_the_first(tmp_path):
    _save(tmp_path / "lq" / "a.png", _rgb(1))
    _save(tmp_path / "lq" / "b.png", _rgb(1))
    _save(tmp_path / "gt" / "a.png", _rgb(1))
    with pytest.raises(DataError, match=r"'lq/b\.png'"):
        PairedFolder(tmp_path)
    _save(tmp_path / "gt" / "b.png", _rgb(1))
    _save(tmp_path / "gt" / "c.png", _rgb(1))
    with pytest.raises(DataError, match=r"'gt/c\.png'"):
        PairedFolder(tmp_path)


@pytest.mark.parametrize("key", [None, r"(\w+)"])
def test_two_degraded_images_of_one_key_are_refused_naming_both(tmp_path, key):
    """A stray lq/a.jpg beside lq/a.png paired with gt/a.png: another photo would train
    as the degraded astronaut. Several degraded images per clean one need a key."""
    _save(tmp_path / "lq" / "a.png", _rgb(1))
    _save(tmp_path / "lq" / "a.jpg", _rgb(2))
    _save(tmp_path / "gt" / "a.png", _rgb(1))
    with pytest.raises(DataError, match=r"'.*lq/a\.jpg' and '.*lq/a\.png' share the pairing key"):
        PairedFolder(tmp_path, key=key)
    (tmp_path / "lq" / "a.jpg").unlink()
    _save(tmp_path / "lq" / "a_2.png", _rgb(2))  # two versions of "a", told apart by a key
    assert len(PairedFolder(tmp_path, key=r"^([a-z])")) == 2


def test_an_interlaced_16_bit_png_trains_from_pillows_high_byte(tmp_path):
    """Restoring refuses it (FFmpeg's decoder corrupts memory on it); training reads 8
    bits, so Pillow's high byte serves, within one level of the rounded value."""
    values = np.random.default_rng(4).integers(0, 65536, (13, 10, 3), dtype=np.uint16)
    for side in ("lq", "gt"):
        png16(tmp_path / side / "a.png", values, interlaced=True)
    pairs = PairedFolder(tmp_path)
    expected = torch.from_numpy(np.round(values / 257)).permute(2, 0, 1)
    assert (pairs[0]["gt"] * 255 - expected).abs().max() <= 1


def test_pairs_of_different_sizes_raise_naming_the_first(tmp_path):
    _save(tmp_path / "lq" / "a.png", _rgb(1, 24, 20))
    _save(tmp_path / "gt" / "a.png", _rgb(1, 20, 24))
    with pytest.raises(
        DataError, match=rf"in '{tmp_path}': 'lq/a.png' is \(24, 20\).*'gt/a.png' is \(20, 24\)"
    ):
        PairedFolder(tmp_path)


def test_a_suite_labels_paired_items_as_synthetic_ones(tmp_path):
    """With three_task's noise levels sharing a class, a paired rain item was labelled by its
    task index (3) where SyntheticPairs says class 1: a mixed set trained a router wrongly."""
    _save(tmp_path / "lq" / "a.png", _rgb(1))
    _save(tmp_path / "gt" / "a.png", _rgb(1))
    suite = degradations.suite("three_task")
    paired = PairedFolder(tmp_path, task="rain", suite="three_task")
    synthetic = SyntheticPairs("skimage", suite, 16, tasks=["rain"], split="all")
    assert (paired[0]["task"], paired[0]["task_name"]) == (3, "rain")
    assert paired[0]["label"] == synthetic[0]["label"] == suite.labels.index("rain") == 1
    with pytest.raises(DataError, match="not both"):
        PairedFolder(tmp_path, task="rain", suite=suite, task_names=suite.task_names)


def test_corrupt_pair_members_are_skipped_with_their_partner(tmp_path):
    _save(tmp_path / "lq" / "a.png", _rgb(1))
    _save(tmp_path / "gt" / "a.png", _rgb(1))
    (tmp_path / "lq" / "b.png").write_bytes(b"broken")
    _save(tmp_path / "gt" / "b.png", _rgb(1))
    # A truncated JPEG passes Pillow's verify() (it reads no JPEG pixel data).
    Image.fromarray(np.tile(_rgb(2), (4, 4, 1))).save(tmp_path / "lq" / "c.jpg", quality=95)
    whole = (tmp_path / "lq" / "c.jpg").read_bytes()
    (tmp_path / "lq" / "c.jpg").write_bytes(whole[: len(whole) // 2])
    _save(tmp_path / "gt" / "c.png", np.tile(_rgb(2), (4, 4, 1)))
    with pytest.warns(UserWarning, match="2 corrupt"):
        pairs = PairedFolder(tmp_path)
    assert len(pairs) == 1
    with pytest.raises(DataError, match="corrupt"):
        PairedFolder(tmp_path, strict=True)


def test_metadata_naming_a_missing_file_raises(tmp_path):
    _metadata_folder(tmp_path, 1)
    (tmp_path / "gt" / "0.png").unlink()
    with pytest.raises(DataError, match=r"line 1.*does not exist"):
        PairedFolder(tmp_path)


def test_unknown_task_in_metadata_lists_the_vocabulary(tmp_path):
    _metadata_folder(tmp_path, 2)
    with pytest.raises(UnknownNameError, match="noise"):
        PairedFolder(tmp_path, task_names=["noise", "rain"])


def _save_oriented(path, array: np.ndarray, orientation: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif)


def test_pairs_are_compared_as_displayed_after_exif_orientation(tmp_path):
    # Stored 24x32 with orientation 6 displays (and is read) as 32x24.
    _save_oriented(tmp_path / "turned" / "lq" / "a.jpg", _rgb(1, 24, 32), 6)
    _save(tmp_path / "turned" / "gt" / "a.png", _rgb(1, 24, 32))
    with pytest.raises(DataError, match=r"'lq/a.jpg' is \(32, 24\).*'gt/a.png' is \(24, 32\)"):
        PairedFolder(tmp_path / "turned")
    _save_oriented(tmp_path / "upright" / "lq" / "a.jpg", _rgb(1, 24, 32), 6)
    _save(tmp_path / "upright" / "gt" / "a.png", _rgb(1, 32, 24))
    _save_oriented(tmp_path / "upright" / "gt" / "b.png", _rgb(2, 24, 32), 8)
    _save(tmp_path / "upright" / "lq" / "b.png", _rgb(2, 32, 24))
    pairs = PairedFolder(tmp_path / "upright")
    for index in range(2):
        item = pairs[index]
        assert item["lq"].shape == item["gt"].shape == (3, 32, 24)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"patch_size": 0}, "patch_size must be a whole number"),
        ({"patch_size": -5}, "patch_size must be a whole number"),
        ({"patch_size": 2.5}, "patch_size must be a whole number"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"key": "(\\d+"}, "not a valid regular expression"),
        ({"gt": "lq"}, "pair every image with itself"),
        ({"task": "rain", "task_names": "rain"}, r"write \['rain'\]"),
        ({"task": "rain", "task_names": ["rain", "rain"]}, "unique"),
    ],
)
def test_bad_paired_arguments_raise_data_error_when_built(tmp_path, options, match):
    _save(tmp_path / "lq" / "a.png", _rgb(1))
    _save(tmp_path / "gt" / "a.png", _rgb(1))
    with pytest.raises(DataError, match=match):
        PairedFolder(tmp_path, **options)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("{outside}", "not inside"),
        ("../outside/x.png", "not inside"),
        (5, "must be non-empty strings"),
        ("", "must be non-empty strings"),
    ],
)
def test_metadata_file_names_must_be_paths_inside_the_folder(tmp_path, name, match):
    root = tmp_path / "set"
    _metadata_folder(root, 1)
    _save(tmp_path / "outside" / "x.png", _rgb(10))
    if name == "{outside}":
        name = str(tmp_path / "outside" / "x.png")
    row = {"lq_file_name": name, "gt_file_name": "gt/0.png"}
    (root / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"line 1.*{match}"):
        PairedFolder(root)


def test_metadata_with_an_empty_task_raises(tmp_path):
    _metadata_folder(tmp_path, 1)
    row = {"lq_file_name": "lq/0.png", "gt_file_name": "gt/0.png", "task": None}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="'task' is empty"):
        PairedFolder(tmp_path)


def test_empty_paired_folder_raises(tmp_path):
    with pytest.raises(DataError, match="No LQ/GT pairs"):
        PairedFolder(tmp_path)


# ----------------------------------------------------------------- sampling


def test_task_balanced_sampler_oversamples_small_tasks():
    labels = [0] * 10 + [1] * 2 + [2] * 5
    sampler = TaskBalancedSampler(labels, seed=0)
    drawn = list(sampler)
    assert len(drawn) == len(sampler) == 30
    assert Counter(labels[i] for i in drawn) == {0: 10, 1: 10, 2: 10}
    assert Counter(i for i in drawn if labels[i] == 1) == {10: 5, 11: 5}
    assert sorted(i for i in drawn if labels[i] == 0) == list(range(10))


def test_task_balanced_sampler_is_seeded_per_epoch():
    labels = [0] * 6 + [1] * 3
    a, b = TaskBalancedSampler(labels, seed=4), TaskBalancedSampler(labels, seed=4)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_task_balanced_sampler_refuses_a_negative_seed():
    with pytest.raises(DataError, match="seed must be an integer >= 0"):
        TaskBalancedSampler([0, 1], seed=-1)


def test_task_labels_of_concatenated_datasets(tmp_path):
    _metadata_folder(tmp_path, 3)
    pairs = PairedFolder(tmp_path, suite="five_task", patch_size=8)
    synthetic = SyntheticPairs("skimage", "five_task", 8, tasks=["rain"])
    combined = ConcatDataset([pairs, synthetic])
    labels = task_labels(combined)
    assert labels == [2, 1, 2] + [1] * len(synthetic)
    sampler = TaskBalancedSampler(labels, samples_per_task=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = next(iter(DataLoader(combined, batch_size=8, sampler=sampler)))
    assert batch["lq"].shape[0] == 8


def test_task_labels_refuses_parts_that_number_their_tasks_differently(tmp_path):
    """Folders of one task each, built without a suite, all call their task 0."""
    for task in ("rain", "haze"):
        _save(tmp_path / task / "lq" / "0.png", _rgb(1))
        _save(tmp_path / task / "gt" / "0.png", _rgb(2))
    rain = PairedFolder(tmp_path / "rain", task="rain")
    haze = PairedFolder(tmp_path / "haze", task="haze")
    assert rain.task_labels == haze.task_labels == [0]
    with pytest.raises(DataError, match=r"\['rain'\] vs \['haze'\].*suite="):
        task_labels(ConcatDataset([rain, ConcatDataset([haze])]))
    suited = [PairedFolder(tmp_path / t, task=t, suite="five_task") for t in ("rain", "haze")]
    assert task_labels(ConcatDataset(suited)) == [1, 2]


def test_task_labels_needs_labelled_datasets():
    with pytest.raises(DataError, match="task_labels"):
        task_labels([1, 2, 3])
