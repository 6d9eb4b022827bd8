"""Procedural dead-leaves training images (loraxir.data.dead_leaves) and how recipes use them."""

from __future__ import annotations

import pytest
import torch

from loraxir.data import DeadLeavesSource, SyntheticPairs, dead_leaves_image
from loraxir.errors import DataError


def test_an_image_is_drawn_from_its_seed_alone() -> None:
    image = dead_leaves_image(64, seed=3)
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert torch.equal(image, dead_leaves_image(64, seed=3))
    assert not torch.equal(image, dead_leaves_image(64, seed=4))


def test_images_have_flat_regions_and_sharp_edges_at_many_orientations() -> None:
    image = dead_leaves_image(256, seed=0).float() / 255
    dx = (image[:, :, 1:] - image[:, :, :-1]).abs().amax(0)[:-1]
    dy = (image[:, 1:] - image[:, :-1]).abs().amax(0)[:, :-1]
    strength = torch.maximum(dx, dy)
    flat, edge = (strength < 0.01).float().mean(), (strength > 0.1).float().mean()
    assert flat > 0.4, "most pixels lie inside a shape"
    assert 0.02 < edge < 0.4, "shapes meet along visible edges"
    orientation = torch.atan2(dy, dx)[strength > 0.1]
    histogram = torch.histc(orientation, bins=4, min=0, max=torch.pi / 2)
    assert (histogram > 0.1 * histogram.sum()).all(), "edges run in every direction"
    assert 0.05 < image.std() and image.mean().item() == pytest.approx(0.5, abs=0.2)


def test_a_source_of_them_is_split_apart_from_photos_and_degraded_like_them() -> None:
    source = DeadLeavesSource(3, size=96, seed=10)
    assert source.ids == ["dead_leaves/10", "dead_leaves/11", "dead_leaves/12"]
    assert torch.equal(source.load(1), dead_leaves_image(96, seed=11))
    pairs = SyntheticPairs(source, "three_task", 32, split="all", tasks=["rain"], context=8)
    item = pairs[0]
    assert item["lq"].shape == (3, 32, 32) and item["name"] == "dead_leaves/10"
    assert not torch.equal(item["lq"], item["gt"])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"count": 0}, "count must be"),
    ({"count": 2, "size": 4}, "pixels >= 8 as its side, got 4"),
    ({"count": 1, "size": 8.5}, "got 8.5"),
    ({"count": 1, "size": None}, "got None"),
    ({"count": 1, "seed": None}, "seed must be an integer >= 0, got None"),
    ({"count": 1, "seed": -1}, "seed must be"),
])  # fmt: skip
def test_bad_sizes_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        DeadLeavesSource(**kwargs)


def test_recipes_add_them_to_training_only() -> None:
    from loraxir.training import load_config
    from loraxir.training.restoration import RestorationConfig, build_data

    settings = ["patch_size=32", "batch_size=4", "train_repeats=1", "suite=three_task",
                "tasks=[rain, haze]"]  # fmt: skip
    photos = build_data(load_config(RestorationConfig, None, settings))
    mixed = build_data(load_config(RestorationConfig, None, [*settings, "dead_leaves=3"]))
    assert len(mixed.train) == len(photos.train) + 3 * 2
    assert len(mixed.val) == len(photos.val)
    names = {mixed.train[i]["name"] for i in range(len(mixed.train))}
    assert {"dead_leaves/0", "dead_leaves/1", "dead_leaves/2"} <= names
    assert not any(name.startswith("dead_leaves") for name in
                   (mixed.val[i]["name"] for i in range(len(mixed.val))))  # fmt: skip


def test_recipes_refuse_a_bad_count_and_real_pairs_with_them() -> None:
    from loraxir.errors import ConfigError
    from loraxir.training import load_config
    from loraxir.training.restoration import RestorationConfig

    for bad in ("-1", "true", "2.5"):
        with pytest.raises(ConfigError, match="dead_leaves"):
            load_config(RestorationConfig, None, [f"dead_leaves={bad}"])
    with pytest.raises(ConfigError, match=r"dead_leaves.*paired_train"):
        paired = ["paired_train={rain: a}", "paired_val={rain: b}"]
        load_config(RestorationConfig, None, [*paired, "dead_leaves=10"])


def test_drawing_many_shows_progress_only_when_asked(capsys: pytest.CaptureFixture) -> None:
    DeadLeavesSource(2, size=16, seed=50)
    assert "dead leaves" not in capsys.readouterr().err
    DeadLeavesSource(2, size=16, seed=60, progress=True)
    assert "dead leaves" in capsys.readouterr().err
