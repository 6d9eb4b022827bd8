"""PSNR/SSIM follow the BasicSR convention: checked against scikit-image and by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from loraxir import metrics
from loraxir.errors import DataError

Y_WEIGHTS = np.array([65.481, 128.553, 24.966])


def _pair(seed: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(3, 3, 40, 36, generator=generator, dtype=dtype)
    noise = torch.randn(target.shape, generator=generator, dtype=dtype)
    return (target + 0.08 * noise).clamp(0, 1), target


def _skimage(pred, target, crop_border, y_channel, quantize=False):
    """scikit-image's PSNR/SSIM per image on the 0-255 arrays the convention prescribes."""
    psnrs, ssims = [], []
    for a, b in zip(pred, target, strict=True):
        arrays = []
        for image in (a, b):
            array = image.double().numpy().transpose(1, 2, 0) * 255
            array = array.round() if quantize else array
            array = array @ Y_WEIGHTS / 255 + 16 if y_channel else array
            arrays.append(
                array[crop_border:-crop_border, crop_border:-crop_border] if crop_border else array
            )
        psnrs.append(peak_signal_noise_ratio(arrays[1], arrays[0], data_range=255))
        ssims.append(
            structural_similarity(
                arrays[0],
                arrays[1],
                data_range=255,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                channel_axis=None if y_channel else 2,
            )
        )
    return torch.tensor(psnrs, dtype=torch.float64), torch.tensor(ssims, dtype=torch.float64)


@pytest.mark.parametrize("y_channel", [False, True])
@pytest.mark.parametrize("crop_border", [0, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_psnr_and_ssim_equal_scikit_image(y_channel, crop_border, dtype):
    pred, target = _pair(0, dtype)
    ref_psnr, ref_ssim = _skimage(pred, target, crop_border, y_channel)
    psnr = metrics.psnr(pred, target, crop_border=crop_border, y_channel=y_channel)
    ssim = metrics.ssim(pred, target, crop_border=crop_border, y_channel=y_channel)
    assert psnr.shape == ssim.shape == (3,) and psnr.dtype == torch.float64
    assert torch.allclose(psnr, ref_psnr, atol=1e-4, rtol=0)
    assert torch.allclose(ssim, ref_ssim, atol=1e-4, rtol=0)


def test_ssim_on_y_of_a_dark_shifted_pair_equals_scikit_image():
    """Y's +16 offset cancels in PSNR but not in SSIM's constants, where it matters on dark
    images (without it SSIM here would read 0.86 instead of 0.98)."""
    generator = torch.Generator().manual_seed(5)
    target = torch.rand(2, 3, 40, 36, generator=generator, dtype=torch.float64) * 0.05
    pred = target + 0.02
    _, ref_ssim = _skimage(pred, target, 0, True)
    assert torch.allclose(metrics.ssim(pred, target, y_channel=True), ref_ssim, atol=1e-4, rtol=0)


def test_quantize_rounds_to_8_bits_first():
    pred, target = _pair(1)
    ref_psnr, ref_ssim = _skimage(pred, target, 0, True, quantize=True)
    assert torch.allclose(
        metrics.psnr(pred, target, y_channel=True, quantize=True), ref_psnr, atol=1e-4
    )
    assert torch.allclose(
        metrics.ssim(pred, target, y_channel=True, quantize=True), ref_ssim, atol=1e-4
    )
    assert not torch.allclose(metrics.psnr(pred, target, y_channel=True), ref_psnr, atol=1e-4)


def test_one_value_per_image_independent_of_the_batch():
    pred, target = _pair(2)
    batched = metrics.ssim(pred, target)
    single = torch.cat([metrics.ssim(pred[i : i + 1], target[i : i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-12)


def test_y_channel_is_bt601_limited_range():
    black, white = torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16)
    assert metrics.psnr(black, white, y_channel=True).item() == pytest.approx(
        20 * math.log10(255 / 219)
    )
    assert metrics.psnr(black, white).item() == pytest.approx(0.0)


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    _, target = _pair(3)
    assert torch.isinf(metrics.psnr(target, target)).all()
    assert torch.allclose(metrics.ssim(target, target), torch.ones(3, dtype=torch.float64))


def test_values_outside_0_1_are_clamped_like_tensor2img():
    _, target = _pair(4)
    for overshoot in (target * 1.5 - 0.25, target * 40):  # a diverged network is scored, too
        clamped = overshoot.clamp(0, 1)
        assert torch.equal(metrics.psnr(overshoot, target), metrics.psnr(clamped, target))


@pytest.mark.parametrize(
    ("pred", "target", "options", "match"),
    [
        (torch.rand(3, 16, 16), torch.rand(3, 16, 16), {}, r"\(B, 3, H, W\)"),
        (torch.rand(2, 16, 16, 3), torch.rand(2, 16, 16, 3), {}, r"x\.permute\(0, 3, 1, 2\)"),
        (torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16), {}, r"expand\(-1, 3, -1, -1\)"),
        (torch.rand(1, 3, 16, 16) * 255, torch.rand(1, 3, 16, 16) * 255, {}, "divide 0-255"),
        (torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 18), {}, "shapes differ"),
        (torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), {"crop_border": -1}, "crop_border"),
        (torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), {"crop_border": 3}, "crop_border=3"),
    ],
)
def test_bad_inputs_raise_data_error(pred, target, options, match):
    with pytest.raises(DataError, match=match):
        metrics.ssim(pred, target, **options)


@pytest.mark.parametrize("metric", [metrics.psnr, metrics.ssim])
def test_integer_images_are_refused_not_clamped_to_0_1(metric):
    # uint8 0-255 clamped as [0, 1] values gave 16 dB for a 26 dB pair, without a word.
    pred, target = (image.mul(255).round().to(torch.uint8) for image in _pair(6, torch.float32))
    with pytest.raises(DataError, match=r"uint8.*x\.float\(\) / 255"):
        metric(pred, target)
    with pytest.raises(DataError, match="target must be a float"):
        metric(pred.float() / 255, target)


@pytest.mark.parametrize("option", ["y_channel", "quantize"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_flags_must_be_booleans(option, value):
    pred, target = _pair(7)
    with pytest.raises(DataError, match=f"{option} must be True or False"):
        metrics.psnr(pred, target, **{option: value})


def test_evaluate_module_loads_offline_and_agrees(tmp_path, monkeypatch):
    import evaluate

    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", tmp_path / "modules")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    metric = evaluate.load(metrics.evaluate_module_path(), cache_dir=str(tmp_path / "cache"))
    pred, target = _pair(5, torch.float32)
    options = {"crop_border": 2, "y_channel": True}
    values = metric.compute(
        predictions=list(pred.numpy()), references=list(target.numpy()), **options
    )
    assert values["psnr"] == pytest.approx(
        metrics.psnr(pred, target, **options).mean().item(), abs=1e-6
    )
    assert values["ssim"] == pytest.approx(
        metrics.ssim(pred, target, **options).mean().item(), abs=1e-6
    )
    assert (tmp_path / "modules").is_dir()
    # 8-bit images arrive as 0-255 floats (the module's features are float32): refused,
    # where they were clamped to [0, 1] and scored without a word.
    eight_bit = [(image * 255).round().astype("uint8") for image in target.numpy()]
    with pytest.raises(DataError, match="values up to 2"):
        metric.compute(predictions=eight_bit, references=eight_bit)
