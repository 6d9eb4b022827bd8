"""Router training data: widened parameter ranges, photo sampling, examples, evaluation maths."""

from __future__ import annotations

import pytest
import torch

from loraxir.degradations import compose
from loraxir.degradations import suite as load_suite
from loraxir.degradations.widen import widen
from loraxir.errors import ConfigError
from loraxir.router.data import (
    RouterExamples,
    Sizing,
    augment_photo,
    native_crop,
    pipeline_degrade,
    sample_image,
)
from loraxir.router.evaluation import accuracy_report, calibration, mean_gates


def test_widen_moves_each_explicit_bound_by_the_margin_and_clips() -> None:
    pipeline = compose(
        [("noise", {"sigma": 25}), ("haze", {"beta": [0.8, 2.0], "airlight": [0.8, 1.0]})]
    )
    steps = dict(widen(pipeline, 0.5).steps)
    assert steps["noise"] == {"sigma": [12.5, 37.5]}
    assert steps["haze"] == {"beta": [0.4, 3.0], "airlight": [0.4, 1.0]}, "airlight <= 1"
    assert dict(widen(pipeline, 0.0).steps)["noise"] == {"sigma": 25}, "margin 0: unchanged"
    assert dict(widen(pipeline, 1.5).steps)["noise"] == {"sigma": [0.0, 62.5]}, "sigma >= 0"


def test_widen_outside_draws_only_beyond_the_inner_band() -> None:
    blur = compose([("motion_blur", {"length": [9, 31]})])
    seen = set()
    for seed in range(40):
        ((_, params),) = widen(
            blur, 0.5, inside=0.25, generator=torch.Generator().manual_seed(seed)
        ).steps
        low, high = params["length"]
        assert (low, high) in {(5, 6), (39, 46)}, "integers in (4.5..6.75) or (38.75..46.5)"
        seen.add((low, high))
    assert len(seen) == 2, "both sides are drawn"
    noise = compose([("noise", {"sigma": 25})])
    sides = set()
    for seed in range(40):  # a float parameter: the two bands beyond the inner one
        ((_, params),) = widen(
            noise, 0.5, inside=0.25, generator=torch.Generator().manual_seed(seed)
        ).steps
        sides.add(tuple(params["sigma"]))
    assert sides == {(12.5, 18.75), (31.25, 37.5)}
    for inside in (0.3, 0.2):  # inside = margin drew the suite's own values as "outside"
        with pytest.raises(ConfigError, match="inside < margin"):
            widen(blur, 0.2, inside=inside)


def test_widen_warns_of_a_parameter_with_no_room_outside() -> None:
    """sigma: 0 (and a range at its limits) stayed inside without a word."""
    pipeline = compose([("noise", {"sigma": 0}), ("haze", {"beta": [0.8, 2.0]})])
    with pytest.warns(UserWarning, match=r"widen: .* = 0 has no room outside it"):
        steps = dict(widen(pipeline, 0.5, inside=0.25).steps)
    assert steps["noise"] == {"sigma": 0} and steps["haze"]["beta"] != [0.8, 2.0]


def test_widened_pipelines_pass_the_degradations_checks() -> None:
    images = torch.rand(1, 3, 24, 24)
    generator = torch.Generator().manual_seed(0)
    for task in load_suite("five_task").tasks:
        for inside in (0.0, 0.25):
            out, _ = widen(task.pipeline, 0.5, inside, generator)(images, generator)
            assert out.shape == images.shape


@pytest.mark.parametrize("seed", range(6))
def test_sampled_images_respect_the_sizing(seed: int) -> None:
    sizing = Sizing(min_side=40, max_side=300, max_aspect=2.0, whole_fraction=0.5)
    photo = torch.rand(3, 120, 200)
    image = sample_image(photo, sizing, torch.Generator().manual_seed(seed))
    h, w = image.shape[-2:]
    assert max(h, w) <= 300 and max(h, w) >= 39
    crop = native_crop(image, sizing, torch.Generator().manual_seed(seed))
    assert crop.shape[-2] <= h and crop.shape[-1] <= w


def test_native_crops_vary_in_size_and_sizing_is_checked() -> None:
    photo = torch.rand(3, 120, 200)
    sizing = Sizing(min_side=40, max_side=300)
    longs = {
        max(native_crop(photo, sizing, torch.Generator().manual_seed(s)).shape[-2:])
        for s in range(20)
    }
    assert len(longs) > 5 and min(longs) < 120 and max(longs) <= 200
    with pytest.raises(ConfigError, match="min_side <= max_side"):
        Sizing(min_side=200, max_side=100)


def test_augmented_photos_keep_pixels_in_range_and_include_night_and_pale_scenes() -> None:
    photo = torch.rand(3, 40, 60)
    shapes, peaks, floors = set(), [], []
    for seed in range(30):
        image = augment_photo(photo, torch.Generator().manual_seed(seed))
        shapes.add(tuple(image.shape))
        peaks.append(image.amax().item())
        floors.append(image.amin().item())
        assert 0 <= image.min() and image.max() <= 1
    assert shapes == {(3, 40, 60), (3, 60, 40)}, "rotated either way"
    assert min(peaks) >= 0.08 and max(peaks) <= 1
    assert 0 < sum(peak < 0.35 for peak in peaks) < len(peaks) / 2, "some night scenes"
    assert 0 < sum(floor > 0.05 for floor in floors) < len(floors) / 2, "some pale scenes"
    gray = [
        bool((image[0] == image[1]).all() and (image[1] == image[2]).all())
        for image in (augment_photo(photo, torch.Generator().manual_seed(s)) for s in range(60))
    ]
    assert 0 < sum(gray) < len(gray) / 3, "some grayscale photos"
    seeded = [augment_photo(photo, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(*seeded)


def test_examples_are_deterministic_balanced_views() -> None:
    photos = [torch.rand(3, 90, 70), torch.rand(3, 60, 100)]
    pipelines = [t.pipeline for t in load_suite("five_task").tasks[:2]]
    dataset = RouterExamples(
        photos,
        [[pipeline_degrade(p)] for p in pipelines],
        length=4,
        size=16,
        grid=2,
        views="native",
        crops=3,
        sizing=Sizing(min_side=32, max_side=96),
        seed=5,
    )
    item = dataset[1]
    assert item["views"].shape == (3, 5, 3, 16, 16) and item["label"] == 1
    assert [dataset[i]["label"] for i in range(4)] == [0, 1, 0, 1]
    assert torch.equal(dataset[1]["views"], item["views"])


def test_calibration_and_accuracy_match_a_hand_count() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1, 0])
    report = accuracy_report(probs, labels, ["a", "b"])
    assert report["accuracy"] == 0.5 and report["per_class"] == {"a": 0.5, "b": 0.5}
    result = calibration(probs, labels, edges=(0.0, 0.6, 0.85, 1.0))
    counts = [b["items"] for b in result["bins"]]
    assert counts == [1, 2, 1]
    assert result["bins"][1]["accuracy"] == 0.5 and result["bins"][1][
        "confidence"
    ] == pytest.approx(0.75)
    expected = (1 * abs(0 - 0.55) + 2 * abs(0.5 - 0.75) + 1 * abs(1 - 0.9)) / 4
    assert result["ece"] == pytest.approx(expected)
    assert mean_gates(probs, ["a", "b"]) == pytest.approx({"a": 0.4875, "b": 0.5125})


def test_the_calibration_panel_draws_every_bin_that_holds_items(tmp_path, monkeypatch) -> None:
    """The bin below 0.5 (most items of an unsure router) was drawn off the axis."""
    from matplotlib.figure import Figure

    from loraxir.router.evaluation import plot_evaluation

    probs = torch.tensor([[0.4, 0.35, 0.25], [0.45, 0.3, 0.25], [0.95, 0.03, 0.02]])
    table = {"accuracy": 1.0, "per_size": {"64": {"per_class": {"a": 1.0, "b": None, "c": None}}}}
    metrics = {
        "classes": ["a", "b", "c"],
        "whole_image": {"suite": table},
        "calibration": calibration(probs, torch.tensor([0, 0, 0])),
    }
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, *a, **k: saved.append(figure))
    plot_evaluation(metrics, tmp_path / "evaluation.png")
    axis = saved[0].axes[1]
    low, high = axis.get_xlim()
    bars = [(bar.get_x(), bar.get_x() + bar.get_width()) for bar in axis.patches]
    filled = [tuple(b["range"]) for b in metrics["calibration"]["bins"] if b["items"]]
    assert filled[0] == (0.0, 0.5) and len(bars) == len(filled)
    assert all(bar == pytest.approx(edges) for bar, edges in zip(bars, filled, strict=True))
    assert low <= 0.0 and high >= 1.0


def test_labelled_batches_stack_degraded_images_with_their_class_names() -> None:
    from loraxir.data import SyntheticPairs
    from loraxir.router import labelled_batches

    pairs = SyntheticPairs("skimage", "three_task", 24, repeats=1, augment=False)
    batches = list(labelled_batches(pairs, batch_size=4))
    assert [len(names) for _, names in batches[:-1]] == [4] * (len(batches) - 1)
    assert sum(len(names) for _, names in batches) == len(pairs)
    images, names = batches[-1]
    assert images.shape == (len(names), 3, 24, 24)
    last = pairs[len(pairs) - 1]
    assert torch.equal(images[-1], last["lq"]) and names[-1] == last["task_name"]
    with pytest.raises(ConfigError, match="batch_size"):
        next(labelled_batches(pairs, batch_size=0))
