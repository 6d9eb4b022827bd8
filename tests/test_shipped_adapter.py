"""The adapter that ships with loraxir (``adapters/nafnet-five-task``): it is installed, loads
by name with no argument, restores held-out photos better than the degraded input (every
class but the one its card names as not restored), and `loraxir restore photo.png` works with
nothing else on the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from recipe_helpers import recipe

import loraxir
from loraxir.cli import main
from loraxir.data import SyntheticPairs
from loraxir.data.sources import skimage_image
from loraxir.metrics import psnr
from loraxir.pretrained import DEFAULT_ADAPTER, find_adapter

# The photos the adapter never saw in training (its card says so): the all-in-one
# benchmark's test split, split_seed 0.
HELD_OUT = ("chelsea", "coffee", "grass", "gravel")


@pytest.fixture(scope="module")
def shipped():
    return loraxir.load_adapter()


@pytest.fixture(scope="module")
def held_out_photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("held_out")
    for name in HELD_OUT:
        Image.fromarray(skimage_image(name).permute(1, 2, 0).numpy()).save(folder / f"{name}.png")
    return folder


def test_the_default_adapter_is_installed_small_and_documented():
    assert DEFAULT_ADAPTER in loraxir.list_adapters()
    folder = find_adapter()
    size = sum(path.stat().st_size for path in folder.iterdir())
    assert size < 16 * 2**20
    card = (folder / "README.md").read_text()
    metrics = json.loads((folder / "metrics.json").read_text())
    for task, row in metrics["held_out"].items():
        assert f"| {task} |" in card
        assert f"| {row['input_psnr']:.2f} | {row['restored_psnr']:.2f} |" in card
    clean = metrics["clean_photos"]  # what it does to photos that need no restoring
    assert sorted(clean["routed_to"]) == sorted(HELD_OUT)
    assert f"came out at {clean['psnr']:.2f} dB PSNR" in card


# Classes the card names as not restored. Blur was one, level with its input (-0.001 dB),
# until its expert trained further on blur alone (recipes/configs/finetune_blur_further.yaml):
# now +0.11 dB in the card, which it calls a slight gain. Strict: an adapter that stops
# restoring a class fails, so that the card and this set are updated with it.
KNOWN_UNRESTORED: set[str] = set()


def _gains(shipped, held_out_photos, given: bool) -> dict[str, list[float]]:
    """PSNR gain over the input per class, whole held-out photos degraded with a seed of
    this test's own (not the card's); routed, or with the true class given."""
    items = SyntheticPairs(str(held_out_photos), "five_task", None, seed=1234, augment=False)
    found: dict[str, list[float]] = {task: [] for task in shipped.config.degradations}
    for index in range(len(items)):
        item = items[index]
        degradation = item["task_name"] if given else None
        with torch.no_grad():
            restored = shipped(item["lq"][None], degradation=degradation).clamp(0, 1)
        gain = psnr(restored, item["gt"][None], quantize=True) - psnr(
            item["lq"][None], item["gt"][None], quantize=True
        )
        found[item["task_name"]].append(gain.item())
    return found


@pytest.fixture(scope="module")
def gains(shipped, held_out_photos) -> dict[str, list[float]]:
    return _gains(shipped, held_out_photos, given=False)


@pytest.mark.parametrize(
    "task",
    [
        pytest.param(task, marks=pytest.mark.xfail(strict=True, reason="card: not restored"))
        if task in KNOWN_UNRESTORED
        else task
        for task in ("noise", "rain", "haze", "blur", "low_light")
    ],
)
def test_it_restores_held_out_photos_better_than_the_input(gains, task):
    values = gains[task]
    assert len(values) == len(HELD_OUT)
    level = recipe("ship_adapter").LEVEL_DB  # a smaller gain the card calls level
    assert sum(values) / len(values) >= level, f"{task}: {values} dB"


def test_with_the_class_given_every_class_gains(shipped, held_out_photos):
    """The card's "given" column: the class's experts and its fitted class embedding for
    the DAM blocks. Blur gains least (+0.14 dB on the card's photos, +0.12 on these draws;
    before its expert trained further, +0.04: level)."""
    assert shipped.loraxir_router.class_embeddings is not None
    given = {task: sum(v) / len(v) for task, v in _gains(shipped, held_out_photos, True).items()}
    assert given["blur"] >= recipe("ship_adapter").LEVEL_DB, given
    assert all(gain > 1.0 for task, gain in given.items() if task != "blur"), given


def test_the_card_names_what_it_does_not_restore():
    """The classes the card names as not restored are :data:`KNOWN_UNRESTORED`, each in
    the words its own table supports (recipes/ship_adapter.py's LEVEL_DB draws the line
    between level and worse), and a gain under SLIGHT_DB is called slight."""
    folder = find_adapter()
    card = (folder / "README.md").read_text()
    metrics = json.loads((folder / "metrics.json").read_text())
    level_db = recipe("ship_adapter").LEVEL_DB
    named = set()
    for task, row in metrics["held_out"].items():
        change = row["restored_psnr"] - row["input_psnr"]
        worse = f"It makes {task} images worse" in card
        level = f"It does not restore {task} images; they come out level" in card
        assert worse == (change <= -level_db), (task, change)
        assert level == (abs(change) < level_db), (task, change)
        slight = f"It restores {task} images only slightly" in card
        assert slight == (level_db <= change < recipe("ship_adapter").SLIGHT_DB), (task, change)
        if worse or level:
            named.add(task)
    assert named == KNOWN_UNRESTORED
    assert "It restores blur images only slightly (+0.11 dB on average above)" in card


def test_restore_needs_nothing_but_the_photo(held_out_photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    photo = held_out_photos / "chelsea.png"
    assert main(["restore", str(photo), "--quiet"]) == 0
    restored = np.asarray(Image.open(tmp_path / "restored" / "chelsea.png"))
    assert restored.shape == np.asarray(Image.open(photo)).shape
