"""PSNR and SSIM in the BasicSR convention that restoration papers report.

The convention: images on the 0–255 scale; optionally only the luma channel Y of BT.601
*limited range* (16–235, as MATLAB's ``rgb2ycbcr``); ``crop_border`` pixels removed from
every side; SSIM with an 11×11 Gaussian window (σ = 1.5), constants ``(0.01·255)²`` and
``(0.03·255)²``, "valid" borders (no padding), computed per channel and averaged; both
metrics per image. Defaults of other libraries differ silently: kornia's YCbCr is full
range, torchmetrics pools PSNR over the batch and infers SSIM's data range from the
images unless ``data_range`` is given. These functions equal
scikit-image's ``peak_signal_noise_ratio(data_range=255)`` and
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=255)`` on the same 0–255 arrays.

Inputs are float ``(B, 3, H, W)`` in [0, 1]; values outside are clamped, as BasicSR's
``tensor2img`` does. Integer tensors (``uint8`` 0–255) and targets far outside [0, 1]
(beyond [-1, 2]) are refused rather than guessed at: clamped as [0, 1] values they would
give wrong numbers silently; convert with ``x.float() / 255``. ``quantize=True`` also
rounds to 8-bit levels first, which is what evaluating saved PNG files (BasicSR's
pipeline) measures. Results are float64 ``(B,)``;
identical images have infinite PSNR.
"""

from __future__ import annotations

from importlib import resources

import torch
from kornia.metrics import ssim as _kornia_ssim
from torch import Tensor

from loraxir.errors import DataError
from loraxir.validation import far_outside_unit

# BT.601 limited-range luma on 0–255 RGB: Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255.
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_WINDOW = 11


def psnr(
    pred: Tensor,
    target: Tensor,
    crop_border: int = 0,
    y_channel: bool = False,
    quantize: bool = False,
) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, peak 255, ``(B,)`` float64."""
    a, b = _prepare(pred, target, crop_border, y_channel, quantize, min_side=1)
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(255.0**2 / mse)


def ssim(
    pred: Tensor,
    target: Tensor,
    crop_border: int = 0,
    y_channel: bool = False,
    quantize: bool = False,
) -> Tensor:
    """Structural similarity per image (mean over valid pixels and channels), ``(B,)`` float64."""
    a, b = _prepare(pred, target, crop_border, y_channel, quantize, min_side=_WINDOW)
    ssim_map = _kornia_ssim(a, b, _WINDOW, max_val=255.0, padding="valid")
    return ssim_map.mean(dim=(1, 2, 3))


def _layout_fix(images: object) -> str:
    """How to turn what was given into ``(B, 3, H, W)``."""
    shape = tuple(images.shape) if isinstance(images, Tensor) else ()
    if len(shape) == 3 and shape[0] == 3:
        return "add a batch dimension with x[None]"
    if shape and shape[-1] == 3 and len(shape) in (3, 4):
        return "channels go second: x.permute(0, 3, 1, 2) (x[None].permute(0, 3, 1, 2) for one)"
    if len(shape) == 4 and shape[1] == 1:
        return "repeat grayscale to RGB with x.expand(-1, 3, -1, -1)"
    return "pass RGB images as a batch (B, 3, H, W)"


def _prepare(
    pred: Tensor, target: Tensor, crop_border: int, y_channel: bool, quantize: bool, min_side: int
) -> tuple[Tensor, Tensor]:
    """Check inputs; return both as float64 0–255 ``(B, C, H', W')`` after Y and cropping."""
    for name, images in (("pred", pred), ("target", target)):
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise DataError(
                f"{name} must be a float tensor (B, 3, H, W) in [0, 1], got {shape}; "
                f"{_layout_fix(images)}."
            )
        if not images.is_floating_point():
            raise DataError(
                f"{name} must be a float tensor in [0, 1], got dtype {images.dtype}; convert "
                "8-bit images with x.float() / 255."
            )
    low, high = torch.aminmax(target) if target.numel() else (0.0, 0.0)
    if far_outside_unit(float(low), float(high)):  # a prediction is clamped whatever it holds
        raise DataError(
            f"target has values in [{float(low):.4g}, {float(high):.4g}], far "
            "outside [0, 1]: a reference is an image, not guessed at as 0-255 values; divide "
            "0-255 images by 255 (a prediction's overshoot is clamped)."
        )
    for option, value in (("y_channel", y_channel), ("quantize", quantize)):
        if not isinstance(value, bool):
            raise DataError(f"{option} must be True or False, got {value!r}.")
    if pred.shape != target.shape:
        raise DataError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}."
        )
    if isinstance(crop_border, bool) or not isinstance(crop_border, int) or crop_border < 0:
        raise DataError(f"crop_border must be an integer >= 0, got {crop_border!r}.")
    height, width = pred.shape[-2:]
    if min(height, width) - 2 * crop_border < min_side:
        raise DataError(
            f"Images of {height}×{width} leave less than {min_side} pixel(s) per side after "
            f"crop_border={crop_border}; use a smaller crop_border or larger images."
        )
    prepared = []
    for images in (pred, target):
        scaled = images.detach().to(torch.float64).clamp(0, 1) * 255
        if quantize:
            scaled = scaled.round()
        if y_channel:
            weights = scaled.new_tensor(_Y_WEIGHTS).view(1, 3, 1, 1)
            scaled = (scaled * weights).sum(dim=1, keepdim=True) / 255 + 16
        if crop_border:
            scaled = scaled[..., crop_border:-crop_border, crop_border:-crop_border]
        prepared.append(scaled)
    return prepared[0], prepared[1]


def evaluate_module_path() -> str:
    """The folder of the local 🤗 ``evaluate`` module computing these metrics; load it with
    ``evaluate.load(evaluate_module_path())`` (offline; needs a writable ``HF_HOME``)."""
    return str(resources.files("loraxir") / "evaluate_metric" / "psnr_ssim")
