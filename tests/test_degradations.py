"""Behaviour of the degradation registry, each degradation's physics, and task suites."""

from __future__ import annotations

import io
import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from kornia.filters import laplacian
from PIL import Image

from loraxir import degradations as D
from loraxir.data import skimage_image
from loraxir.errors import ConfigError, DataError, UnknownNameError

ALL = D.available()
# Degradations whose output depends on random patterns (not only on drawn parameters).
PATTERNED = ["noise", "shot_read_noise", "rain", "snow", "raindrop", "low_light"]


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """A textured 96×96 crop of the astronaut photo, float (1, 3, H, W) on the 8-bit grid."""
    return skimage_image("astronaut")[:, 100:196, 180:276][None].float() / 255


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _hf_energy(images: torch.Tensor) -> float:
    return laplacian(images, 3).pow(2).mean().item()


def test_available_lists_the_documented_degradations():
    assert ALL == sorted(
        [
            "defocus_blur",
            "downsample",
            "gaussian_blur",
            "haze",
            "jpeg",
            "low_light",
            "motion_blur",
            "noise",
            "rain",
            "raindrop",
            "shot_read_noise",
            "snow",
        ]
    )


@pytest.mark.parametrize("name", ALL)
def test_output_keeps_shape_and_lies_on_the_8bit_grid(name, photo):
    batch = photo.expand(2, -1, -1, -1)
    out, params = D.apply(name, batch, _gen(0))
    assert out.shape == batch.shape and out.dtype == batch.dtype
    assert 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, torch.round(out * 255) / 255)
    assert isinstance(params["seed"], int)


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_output_and_reported_params_reproduce_it(name, photo):
    first, params = D.apply(name, photo, _gen(3))
    second, params_again = D.apply(name, photo, _gen(3))
    replay, replay_params = D.apply(name, photo, **params)
    assert torch.equal(first, second) and params == params_again
    assert torch.equal(first, replay) and replay_params == params


@pytest.mark.parametrize("name", ALL)
def test_different_seed_draws_different_parameters(name, photo):
    _, a = D.apply(name, photo, _gen(0))
    _, b = D.apply(name, photo, _gen(1))
    assert a != b


@pytest.mark.parametrize("name", PATTERNED)
def test_different_seed_gives_a_different_pattern_for_fixed_parameters(name, photo):
    _, params = D.apply(name, photo, _gen(0))
    fixed = {key: value for key, value in params.items() if key != "seed"}
    a, _ = D.apply(name, photo, seed=1, **fixed)
    b, _ = D.apply(name, photo, seed=2, **fixed)
    assert not torch.equal(a, b)


def test_global_generator_is_used_when_none_is_given(photo):
    torch.manual_seed(5)
    a, pa = D.apply("rain", photo)
    torch.manual_seed(5)
    b, pb = D.apply("rain", photo)
    assert torch.equal(a, b) and pa == pb


def test_noise_residual_std_matches_sigma_on_flat_grey():
    grey = torch.full((1, 3, 128, 128), 128 / 255)
    noisy, _ = D.apply("noise", grey, _gen(0), sigma=25)
    assert abs((noisy - grey).std().item() - 25 / 255) < 0.05 * 25 / 255


def test_shot_noise_grows_with_brightness():
    levels = torch.tensor([0.1, 0.4, 0.8]).view(3, 1, 1, 1).expand(3, 3, 64, 64)
    noisy, _ = D.apply("shot_read_noise", levels, _gen(0), shot=0.01, read=0)
    stds = (noisy - levels).std(dim=(1, 2, 3))
    assert torch.allclose(stds, (0.01 * levels[:, 0, 0, 0]).sqrt(), rtol=0.1)


@pytest.mark.parametrize(
    ("name", "param", "strengths"),
    [
        ("gaussian_blur", "sigma", [0.5, 1.0, 2.0, 4.0]),
        ("motion_blur", "length", [3, 7, 15, 31]),
        ("defocus_blur", "radius", [1.0, 2.0, 4.0, 8.0]),
        ("downsample", "scale", [2, 4]),
    ],
)
def test_blur_lowers_high_frequency_energy_monotonically(name, param, strengths, photo):
    energies = [_hf_energy(photo)]
    for strength in strengths:
        energies.append(_hf_energy(D.apply(name, photo, _gen(0), **{param: strength})[0]))
    assert all(a > b for a, b in itertools.pairwise(energies)), energies


@pytest.mark.parametrize(
    ("name", "param"), [("gaussian_blur", "sigma"), ("defocus_blur", "radius")]
)
def test_zero_blur_is_the_identity(name, param, photo):
    assert torch.equal(D.apply(name, photo, **{param: 0})[0], photo)


def test_jpeg_error_falls_as_quality_rises(photo):
    errors = [(D.apply("jpeg", photo, quality=q)[0] - photo).pow(2).mean() for q in (5, 20, 50, 90)]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors


def test_jpeg_is_a_real_jpeg_file_roundtrip(photo):
    pixels = (photo[0].permute(1, 2, 0) * 255).round().byte().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=30)
    expected = np.asarray(Image.open(buffer).convert("RGB"))
    out, _ = D.apply("jpeg", photo, quality=30)
    assert np.array_equal((out[0].permute(1, 2, 0) * 255).round().byte().numpy(), expected)


def test_haze_with_zero_beta_is_the_identity(photo):
    assert torch.equal(D.apply("haze", photo, _gen(0), beta=0.0)[0], photo)


def test_haze_gives_farther_pixels_less_transmission():
    clean = torch.full((1, 3, 32, 64), 0.2)
    depth = torch.linspace(0, 1, 64).expand(32, 64)
    hazy, _ = D.apply("haze", clean, beta=2.0, airlight=1.0, depth=depth)
    transmission = ((hazy - 1.0) / (clean - 1.0))[0, 0, 16]
    assert torch.all(transmission[1:] <= transmission[:-1])
    assert torch.allclose(transmission, torch.exp(-2.0 * depth[0]), atol=2 / 255)


def test_estimated_depth_makes_darker_regions_farther():
    clean = torch.cat([torch.full((1, 3, 64, 32), 0.1), torch.full((1, 3, 64, 32), 0.7)], dim=3)
    depth = D.estimate_depth(clean)
    assert depth.shape == (1, 1, 64, 64) and 0 <= depth.min() and depth.max() <= 1
    hazy, _ = D.apply("haze", clean, beta=1.5, airlight=1.0)
    transmission = (hazy - 1.0) / (clean - 1.0)
    assert transmission[..., :8].mean() < transmission[..., -8:].mean()


def test_haze_rejects_a_depth_map_of_the_wrong_size(photo):
    with pytest.raises(DataError, match="depth"):
        D.apply("haze", photo, depth=torch.ones(10, 10))


def test_low_light_lowers_mean_brightness_by_the_factor(photo):
    dark, _ = D.apply("low_light", photo, factor=0.25, gamma=1.0, shot=0.0, read=0.0)
    assert dark.mean().item() == pytest.approx(0.25 * photo.mean().item(), rel=0.02)
    darker, _ = D.apply("low_light", photo, factor=0.25, gamma=2.0, shot=0.0, read=0.0)
    assert darker.mean().item() == pytest.approx(0.25 * photo.square().mean().item(), rel=0.02)


@pytest.mark.parametrize("name", ["rain", "snow"])
def test_rain_and_snow_only_brighten(name, photo):
    out, _ = D.apply(name, photo, _gen(0))
    assert torch.all(out >= photo - 1 / 255)
    assert (out > photo + 0.1).float().mean() > 0.001


@pytest.mark.parametrize("name", ["rain", "snow"])
def test_rain_and_snow_place_the_same_particles_in_every_dtype(name):
    """Half-precision uniform draws are too coarse for densities of a few per thousand."""
    black = torch.zeros(1, 3, 256, 256)
    params = {"density": 0.001, "length": 1, "angle": 0.0, "brightness": 1.0}
    params |= {"width": 0.2} if name == "rain" else {"size": 0.2}
    lit = {
        dtype: D.apply(name, black.to(dtype), _gen(3), **params)[0][:, 0].float() > 0.2
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
    }
    assert 30 < lit[torch.float32].sum() < 110
    assert torch.equal(lit[torch.bfloat16], lit[torch.float32])
    assert torch.equal(lit[torch.float16], lit[torch.float32])


@pytest.mark.parametrize("name", ["rain", "snow"])
def test_particles_of_length_one_are_dots(name):
    black = torch.zeros(1, 3, 256, 256)
    lit = {}
    for length in (1, 3):
        params = {"density": 0.001, "length": length, "angle": 0.0, "brightness": 1.0}
        params |= {"width": 0.2} if name == "rain" else {"size": 0.2}
        lit[length] = (D.apply(name, black, _gen(3), **params)[0][:, 0] > 0.2).sum().item()
    assert 30 < lit[1] < 110 and lit[3] > 2.5 * lit[1]


def test_compose_reports_every_step_and_reproduces(photo):
    pipeline = D.compose(["rain", ("haze", {"beta": 1.0})])
    out, params = pipeline(photo, _gen(0))
    assert [step["name"] for step in params["steps"]] == ["rain", "haze"]
    assert params["steps"][1]["beta"] == 1.0
    assert torch.equal(D.compose(params["steps"])(photo)[0], out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", ALL)
def test_gpu_output_is_seeded_and_reproducible(name, photo):
    images = photo.cuda()
    out, params = D.apply(name, images, torch.Generator(device="cuda").manual_seed(0))
    assert out.device.type == "cuda"
    assert torch.equal(D.apply(name, images, **params)[0], out)


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize("generator", [0, "0"])
def test_a_seed_given_for_the_generator_is_refused_by_name(generator, photo):
    with pytest.raises(ConfigError, match=r"noise: the generator must be a torch\.Generator"):
        D.apply("noise", photo, generator)


def test_unknown_degradation_lists_the_known_ones(photo):
    with pytest.raises(UnknownNameError, match=r"Did you mean 'noise'.*Known degradations"):
        D.apply("noize", photo)


def test_images_passed_for_the_name_are_named_as_such_not_printed(photo):
    with pytest.raises(UnknownNameError, match=r"must be a string, got Tensor") as caught:
        D.apply(photo, "noise")
    assert len(str(caught.value)) < 300


def test_numpy_scalars_are_read_as_numbers_and_reported_as_python_numbers(photo):
    fixed = D.apply("noise", photo, sigma=np.float32(5), seed=np.int64(7))
    assert fixed[1] == {"sigma": 5.0, "seed": 7}
    assert torch.equal(fixed[0], D.apply("noise", photo, sigma=5.0, seed=7)[0])
    steps = D.compose([("motion_blur", {"length": [np.int64(9), np.int64(11)]})])(photo)[1]
    assert type(steps["steps"][0]["length"]) is int
    with pytest.raises(ConfigError, match="sigma"):
        D.apply("noise", photo, sigma=np.float32(-1))


def test_integer_ranges_and_choices_draw_every_value_ends_included():
    length = D.Param(1, 50, (3, 4), "streak length", integer=True)
    scale = D.Param(2, 4, (2, 4), "scale", integer=True, choices=(2, 4))
    draws = {length.draw((3, 4), _gen(seed)) for seed in range(40)}
    assert draws == {3, 4}
    assert {scale.draw((2, 4), _gen(seed)) for seed in range(40)} == {2, 4}
    assert {length.draw((3, 7), _gen(seed)) for seed in range(200)} == set(range(3, 8))


def test_quantize_rounds_to_the_nearest_8_bit_level():
    values = torch.tensor([0.6, 1.4, 254.4, 254.6, 300.0, -3.0]) / 255
    expected = torch.tensor([1.0, 1.0, 254.0, 255.0, 255.0, 0.0]) / 255
    assert torch.equal(D.quantize(values), expected)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("noise", {"sigma": -1}),
        ("jpeg", {"quality": 0}),
        ("jpeg", {"quality": 101}),
        ("jpeg", {"quality": 50.5}),
        ("motion_blur", {"length": -3}),
        ("gaussian_blur", {"sigma": [3.0, 1.0]}),
        ("downsample", {"scale": 3}),
        ("noise", {"sigma": "high"}),
        ("noise", {"seed": -1}),
    ],
)
def test_out_of_range_parameters_raise_config_error(name, params, photo):
    with pytest.raises(ConfigError, match=name):
        D.apply(name, photo, **params)


def test_unknown_parameter_names_the_known_ones(photo):
    """The message once read "Known parameter of 'noise's"."""
    with pytest.raises(
        UnknownNameError,
        match=r"Unknown parameter 'sigmaa' of 'noise'\. Did you mean 'sigma'\? Known parameters "
        r"of 'noise': seed, sigma\.",
    ):
        D.apply("noise", photo, sigmaa=3)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.rand(3, 8, 8), "shape"),
        (torch.rand(1, 1, 8, 8), "grayscale"),
        (torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8), "float"),
        (torch.rand(1, 3, 8, 8) * 255, r"\[0, 1\]"),
        (np.zeros((1, 3, 8, 8)), "torch.Tensor"),
    ],
)
def test_bad_images_raise_data_error(images, match):
    with pytest.raises(DataError, match=match):
        D.apply("noise", images, sigma=5)


@pytest.mark.parametrize("name", ["noise", "haze"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_images_raise_data_error(name, value, photo):
    # NaN passes every comparison with 0 and 1; it used to come out as NaN pixels.
    images = photo.clone()
    images[0, 1, 3, 4] = value
    with pytest.raises(DataError, match="1 NaN or infinite"):
        D.apply(name, images, _gen(0))


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_haze_refuses_a_non_finite_depth_map(value, photo):
    depth = torch.rand(photo.shape[-2:])
    depth[5, 5] = value
    with pytest.raises(DataError, match="depth holds NaN or infinite"):
        D.apply("haze", photo, _gen(0), beta=0.0, depth=depth)


@pytest.mark.parametrize("name", ALL)
def test_an_empty_batch_comes_back_empty_with_its_parameters(name, photo):
    empty = photo[:0]
    out, params = D.apply(name, empty, _gen(0))
    assert out.shape == empty.shape and out.dtype == empty.dtype
    assert params == D.get(name).sample(_gen(0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_downsample_keeps_half_precision_on_the_cpu(dtype, photo):
    out, params = D.apply("downsample", photo.to(dtype), _gen(0))
    reference, _ = D.apply("downsample", photo, **params)
    assert out.dtype == dtype
    assert (out.float() - reference).abs().max() <= 3 / 255


# ----------------------------------------------------------------- registration


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        (5, {}, "non-empty string"),
        ("", {}, "non-empty string"),
        ("noise", {}, "already registered"),
        ("custom", {"seed": D.Param(0, 1, 0.5, "s")}, "'seed'"),
        ("custom", {"a": (0, 1)}, "must be a Param"),
        ("custom", {"images": D.Param(0, 1, 0.5, "s")}, "'images' and 'generator'"),
        ("custom", {"generator": D.Param(0, 1, 0.5, "s")}, "'images' and 'generator'"),
    ],
)
def test_register_refuses_bad_names_and_params_at_once(name, params, match):
    """A parameter named images failed every apply with "got multiple values"."""
    before = D.available()
    with pytest.raises(ConfigError, match=match):
        D.register(name, params, "a summary")(lambda images, generator, **kwargs: images)
    assert D.available() == before  # --list keeps working


def test_register_refuses_extras_that_are_not_a_tuple_of_names():
    """extras='depth' passed d=1 through (membership by substring)."""
    with pytest.raises(ConfigError, match=r"extras must be a tuple of names, got 'depth'"):
        D.register("custom", {}, "a summary", extras="depth")
    with pytest.raises(ConfigError, match="both a parameter and an extra"):
        D.register("custom", {"depth": D.Param(0, 1, 0.5, "d")}, "s", extras=("depth",))


@pytest.mark.parametrize(
    ("returned", "error", "match"),
    [
        (lambda x: x * torch.nan, DataError, r"'custom_out' returned NaN or infinite"),
        (lambda x: x[:, :1], DataError, r"returned \(2, 1, 8, 8\), not a tensor of its input"),
        (lambda x: x.numpy(), DataError, "returned ndarray"),
    ],
)
def test_a_registered_function_that_breaks_the_contract_is_named(returned, error, match):
    """A NaN, a channel or a NumPy array came back unchecked into the training data."""
    D.register("custom_out", {}, "breaks the contract")(lambda images, generator: returned(images))
    try:
        with pytest.raises(error, match=match):
            D.apply("custom_out", torch.rand(2, 3, 8, 8))
    finally:
        D.registry._REGISTRY.pop("custom_out")


def test_a_registered_function_gets_its_output_in_the_input_dtype():
    """The docs' own vignette (a float32 mask) turned float16 images into float32."""
    D.register("custom_dtype", {}, "computes in float32")(
        lambda images, generator: images.float() * 0.5
    )
    try:
        out, _ = D.apply("custom_dtype", torch.rand(1, 3, 8, 8, dtype=torch.float16))
        assert out.dtype == torch.float16
    finally:
        D.registry._REGISTRY.pop("custom_dtype")


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((0, 1, (2, 3), "h"), {}, "out of range"),
        ((0, 1, 2, "h"), {}, "out of range"),
        ((0, 10, 2.5, "h"), {"integer": True}, "integer"),
        ((5, 1, 2, "h"), {}, "low <= high"),
        ((0, math.nan, 0.5, "h"), {}, "finite"),
        ((2, 4, (2, 4), "h"), {"integer": True, "choices": (2, 8)}, "choices"),
        ((2, 4, (2, 3), "h"), {"integer": True, "choices": (2, 4)}, "not one of"),
        # drawn as int(0.25) = 0, then refused on replay
        ((0, 1, (0.25, 0.75), "h"), {"choices": (0.25, 0.5, 0.75)}, "whole numbers"),
    ],
)
def test_param_checks_itself_when_built(args, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        D.Param(*args, **kwargs)


def test_compose_refuses_a_step_whose_params_are_not_a_mapping():
    with pytest.raises(ConfigError, match=r"cannot read step \('haze', None\)"):
        D.compose([("haze", None)])


# ----------------------------------------------------------------- suites


def test_builtin_suites_name_the_papers_settings():
    assert D.available_suites() == ["all_weather", "five_task", "three_task", "time_varying"]
    three = D.suite("three_task")
    assert three.task_names == ["noise_15", "noise_25", "noise_50", "rain", "haze"]
    assert three.labels == ["noise", "rain", "haze"]
    assert [three.label_index(t) for t in three.task_names] == [0, 0, 0, 1, 2]
    assert D.suite("five_task").task_names == ["noise", "rain", "haze", "blur", "low_light"]
    assert D.suite("all_weather").task("rain_haze").pipeline.names == ["rain", "haze"]


def test_suite_task_fixes_the_documented_parameters(photo):
    _, params = D.suite("three_task").degrade(photo, "noise_50", _gen(0))
    assert params["steps"][0]["name"] == "noise" and params["steps"][0]["sigma"] == 50


def test_suite_degrade_is_seeded(photo):
    five = D.suite("five_task")
    for task in five.task_names:
        a, pa = five.degrade(photo, task, _gen(7))
        b, pb = five.degrade(photo, task, _gen(7))
        assert torch.equal(a, b) and pa == pb


def test_time_varying_switches_task_every_period_frames():
    video = D.suite("time_varying")
    assert video.frame_tasks(35) == [0] * 10 + [1] * 10 + [2] * 10 + [0] * 5
    assert video.frame_tasks(6, period=2) == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize("period", [2.5, 0, True])
def test_frame_tasks_refuses_a_period_that_is_not_a_whole_number(period):
    with pytest.raises(ConfigError, match="whole number of frames"):
        D.suite("time_varying").frame_tasks(5, period=period)


def test_degrade_video_holds_parameters_per_segment_but_not_noise():
    frames = torch.full((12, 3, 16, 16), 128 / 255)
    out, labels, segments = D.suite("time_varying").degrade_video(frames, _gen(0), period=4)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert [s["frames"] for s in segments] == [[0, 4], [4, 8], [8, 12]]
    assert [s["task"] for s in segments] == ["noise", "blur", "compression"]
    assert not torch.equal(out[0], out[1])  # independent noise per frame
    assert torch.equal(out[4], frames[4])  # blur leaves a flat frame flat


USER_SUITE = """
name: mine
description: two tasks
tasks:
  - name: light_noise
    label: noise
    steps:
      - noise: {sigma: [5, 10]}
  - name: foggy_rain
    steps: [rain, {haze: {beta: 0.5}}]
"""


def test_user_suite_loads_from_yaml(tmp_path, photo):
    path = tmp_path / "mine.yaml"
    path.write_text(USER_SUITE)
    for mine in (D.suite(str(path)), D.load_suite(path)):
        assert mine.name == "mine" and mine.task_names == ["light_noise", "foggy_rain"]
        _, params = mine.degrade(photo, 0, _gen(0))
        assert 5 <= params["steps"][0]["sigma"] <= 10
        _, params = mine.degrade(photo, "foggy_rain", _gen(0))
        assert [s["name"] for s in params["steps"]] == ["rain", "haze"]


def test_a_suite_yaml_may_write_numbers_with_an_exponent(tmp_path, photo):
    """PyYAML alone reads 1e-3 as the string '1e-3' (it wants 1.0e-3)."""
    path = tmp_path / "sparse.yaml"
    path.write_text("tasks:\n  - {name: drizzle, steps: [{rain: {density: 1e-3}}]}\n")
    _, params = D.load_suite(path).degrade(photo, 0, _gen(0))
    assert params["steps"][0]["density"] == 0.001


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("tasks: []", ConfigError, "non-empty"),
        ("tasks:\n  - {name: a, steps: [fog]}", UnknownNameError, "degradation"),
        ("tasks:\n  - {name: a, steps: [{noise: {sigma: 300}}]}", ConfigError, "out of range"),
        ("tasks:\n  - {name: a, step: [noise]}", ConfigError, "unknown key"),
        (
            "tasks:\n  - {name: a, steps: [noise]}\n  - {name: a, steps: [rain]}",
            ConfigError,
            "unique",
        ),
        ("tasks: [{name: a, steps: [noise]}]\nschedule: {period: 0}", ConfigError, "period"),
        (
            "tasks: [{name: a, steps: [noise]}]\nschedule: {period: 2, order: [b]}",
            UnknownNameError,
            "b",
        ),
        (
            "tasks: [{name: a, steps: [noise]}]\nschedule: {period: 2, order: [1]}",
            UnknownNameError,
            r"Unknown task '1' in .*bad\.yaml's schedule\. Known tasks in .*: a\.",
        ),
        (
            "tasks: [{name: a, steps: [{haze: {depth: 3}}]}]",
            ConfigError,
            r"task 0 \(a\): haze's \['depth'\] are inputs given in code",
        ),
        (
            "tasks: [{name: a, steps: [{noise: {on: 3}}]}]",
            ConfigError,
            r"task 0 \(a\): step 'noise' has a parameter key read as a boolean.*quote the key",
        ),
        ("tasks: [", ConfigError, "not valid YAML"),
        (
            "tasks:\n  - name: a\n    steps: [noise]\n    steps: [rain]",
            ConfigError,
            "'steps'.*twice",
        ),
        ("name: s\nname: t\ntasks: [{name: a, steps: [noise]}]", ConfigError, "'name'.*twice"),
        ("tasks:\n  - name:\n    steps: [noise]", ConfigError, "task 0: 'name' is empty"),
        ("tasks:\n  - {name: a, label: , steps: [noise]}", ConfigError, "'label' is empty"),
        ("tasks:\n  - {name: [a], steps: [noise]}", ConfigError, "must be text"),
        (
            "tasks:\n  - {name: a, steps: [noise]}\n  - {name: b, steps: [{noise: {sigma: 300}}]}",
            ConfigError,
            r"bad\.yaml: task 1 \(b\): noise: sigma=300",
        ),
        (
            "tasks:\n  - {name: a, steps: [nosie]}",
            UnknownNameError,
            r"bad\.yaml: task 0 \(a\): Unknown degradation 'nosie'",
        ),
    ],
)
def test_bad_suite_files_raise_typed_errors(tmp_path, text, error, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(error, match=match):
        D.suite(path)


def test_suite_file_that_is_not_utf8_raises_config_error(tmp_path):
    path = tmp_path / "latin.yaml"
    path.write_bytes("tasks: [{name: bruit, steps: [noise]}]  # é\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin\.yaml' is not UTF-8"):
        D.suite(path)


def test_unknown_suite_lists_the_builtin_ones():
    with pytest.raises(UnknownNameError, match="three_task"):
        D.suite("three_tasks")


def test_load_suite_given_a_builtin_name_points_to_suite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"suite\('five_task'\)"):
        D.load_suite("five_task")
    with pytest.raises(ConfigError, match="does not exist"):
        D.load_suite("five_tasks")


def test_unknown_task_of_a_suite_lists_its_tasks(photo):
    with pytest.raises(UnknownNameError, match="noise_25"):
        D.suite("three_task").degrade(photo, "noise_20")


def test_docs_seed_example_reports_what_the_code_draws():
    text = (Path(__file__).parents[1] / "docs" / "degradations.md").read_text(encoding="utf-8")
    documented = re.search(r'# params == \{"sigma": 25\.0, "seed": (\d+)\}', text)
    images = torch.rand(4, 3, 256, 256)
    _, params = D.apply("noise", images, torch.Generator().manual_seed(0), sigma=25)
    assert documented is not None and params == {"sigma": 25.0, "seed": int(documented[1])}


def test_docs_describe_every_degradation_parameter_and_suite():
    docs = Path(__file__).parents[1] / "docs"
    text = (docs / "degradations.md").read_text(encoding="utf-8")
    for name in ALL:
        assert f"| `{name}` |" in text, name
        for param in D.get(name).params:
            assert f"`{param}`" in text, (name, param)
    for name in D.available_suites():
        assert (docs / "suites" / f"{name}.md").is_file()
        assert (docs / "images" / f"gallery_{name}.png").is_file()
