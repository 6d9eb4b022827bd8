"""Hand-made image statistics fed to the router's MLP next to the encoder features.

A small randomly initialised CNN pools its features by mean and standard deviation, which
says little about *how* brightness is distributed over the image, about the darkest
channel of each region, or about the direction of fine detail. Haze lifts the dark channel
and lowers saturation and contrast everywhere; under-exposure squeezes the brightness
histogram towards black; motion blur removes fine detail along one direction (and more at
the finest scale than at the next), where haze scales detail down evenly. These numbers
are cheap (a few reductions of the views, whatever the image size) and work for every
encoder. They are computed on the views, so the global ones mean the same at every image
size (the global view is a low-pass copy of the whole image) and the local ones read
native pixels like the encoder does.

:func:`cepstrum_statistics` (the router's ``cepstrum`` setting) reads the image itself:
the router's 32-pixel views are shorter than the streaks of a camera shake, and the cue
that tells a blurred photo from a hazy or pale one needs the streak's whole length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loraxir.router.config import CEPSTRUM_MIN_SIZE
from loraxir.router.views import as_rgb, check_image_batch, lattice_offsets

# Brightness histogram bins over [0, 1]; eight bins separate under-exposure from dark scenes.
HISTOGRAM_BINS = 8
# Neighbourhood of the dark channel (min over colours, then over a window), in global-view pixels.
_DARK_WINDOW = 3
# Keeps logs of the gradient energy finite on flat views (8-bit step² ≈ 1.5e-5).
_ENERGY_EPS = 1e-5
# Global: per-channel mean and std (6), dark channel mean and std (2), saturation (1), histogram.
GLOBAL_DIM = 9 + HISTOGRAM_BINS
# Local, per view: log gradient energy, its drop from the finest scale to the next, coherence;
# each pooled by mean and max over the local views.
LOCAL_DIM = 6
STATISTICS_DIM = GLOBAL_DIM + LOCAL_DIM
# Cepstrum: the strength of its deepest off-centre trough, mean and min over the crops.
CEPSTRUM_DIM = 2
# Native crops whose cepstrum is read: a _CEPSTRUM_GRID × _CEPSTRUM_GRID lattice.
_CEPSTRUM_GRID = 3
# Troughs nearer the centre than this are the photo's own smoothness, not a streak.
_CEPSTRUM_MIN_RADIUS = 3


def view_statistics(views: torch.Tensor) -> torch.Tensor:
    """``(B, STATISTICS_DIM)`` statistics of router views ``(B, V, 3, S, S)`` in [0, 1].

    :func:`global_statistics` of view 0, then :func:`sharpness_statistics` of the local
    views (of the global view when there are none), pooled by mean and max over views.
    """
    local = views[:, 1:] if views.shape[1] > 1 else views[:, :1]
    batch, count = local.shape[:2]
    sharpness = sharpness_statistics(local.flatten(0, 1)).view(batch, count, -1)
    pooled = [sharpness.mean(dim=1), sharpness.amax(dim=1)]
    return torch.cat([global_statistics(views[:, 0]), *pooled], dim=-1).to(views.dtype)


def global_statistics(view: torch.Tensor) -> torch.Tensor:
    """``(B, GLOBAL_DIM)`` statistics of global views ``(B, 3, S, S)`` in [0, 1].

    Per-channel mean and std, the mean and std of a dark channel (He et al.'s haze prior:
    haze-free regions have a colour near 0), the mean saturation, and the share of pixels
    in each of :data:`HISTOGRAM_BINS` brightness bins.
    """
    pixels = view.float().clamp(0, 1)
    flat = pixels.flatten(2)
    dark = -F.max_pool2d(-pixels.amin(dim=1, keepdim=True), _DARK_WINDOW, 1, _DARK_WINDOW // 2)
    brightest = pixels.amax(dim=1)
    saturation = (brightest - pixels.amin(dim=1)) / (brightest + 1e-3)
    luminance = pixels.mean(dim=1).flatten(1)
    bins = (luminance * HISTOGRAM_BINS).long().clamp(max=HISTOGRAM_BINS - 1)
    histogram = F.one_hot(bins, HISTOGRAM_BINS).float().mean(dim=1)
    parts = [
        flat.mean(-1),
        flat.std(-1, correction=0),
        dark.flatten(1).mean(-1, keepdim=True),
        dark.flatten(1).std(-1, correction=0, keepdim=True),
        saturation.flatten(1).mean(-1, keepdim=True),
        histogram,
    ]
    return torch.cat(parts, dim=-1)


def sharpness_statistics(views: torch.Tensor) -> torch.Tensor:
    """``(N, 3)`` fine-detail statistics of views ``(N, 3, S, S)``.

    The log mean gradient energy of the luminance; how much larger it is than at half
    resolution (low after blur, which removes the finest scale first; high for noise);
    and the coherence of the structure tensor, ``|λ1 - λ2| / (λ1 + λ2)`` over the view (near
    1 when the gradients share one direction, as motion blur leaves them).
    """
    gray = views.float().mean(dim=1, keepdim=True)
    fine = _gradients(gray)
    coarse = _gradients(F.avg_pool2d(gray, 2)) if min(gray.shape[-2:]) >= 4 else fine
    energy = [
        torch.log(g[0].square().mean((1, 2, 3)) + g[1].square().mean((1, 2, 3)) + _ENERGY_EPS)
        for g in (fine, coarse)
    ]
    gx, gy = fine
    jxx, jyy, jxy = (gx * gx).mean((1, 2, 3)), (gy * gy).mean((1, 2, 3)), (gx * gy).mean((1, 2, 3))
    coherence = torch.sqrt((jxx - jyy).square() + 4 * jxy.square() + _ENERGY_EPS**2) / (
        jxx + jyy + _ENERGY_EPS
    )
    return torch.stack([energy[0], energy[0] - energy[1], coherence], dim=-1)


def cepstrum_statistics(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, CEPSTRUM_DIM)`` motion-blur evidence of images ``(B, C, H, W)`` in [0, 1].

    A linear blur of length ``L`` multiplies the spectrum by a sinc whose zeros repeat
    every ``1/L`` cycles along the motion; the cepstrum (inverse FFT of the log power
    spectrum) turns that comb into one deep trough at distance ``L`` from the centre. Sharp
    photos, haze (an affine change of intensity) and low light have no such trough, whatever
    the photo's contrast or paleness. Each of ``3 × 3`` luminance crops of ``size`` pixels
    at the image's own resolution (of its shorter side when smaller; no rescale, which
    would change ``L``) is Hann-windowed; its cepstrum's deepest value between 3 pixels
    and the crop's half side, as a z-score over that annulus, is pooled by mean and min
    over the crops. Streaks up to about ``size / 4`` pixels show clearly (the window
    fades the longer ones); images shorter than
    :data:`CEPSTRUM_MIN_SIZE` give zeros.
    """
    check_image_batch(images)
    height, width = images.shape[-2:]
    crop = min(size, height, width)
    if crop < CEPSTRUM_MIN_SIZE:
        return as_rgb(images).new_zeros(images.shape[0], CEPSTRUM_DIM).float()
    # Crops first, then luminance: the statistic reads 9 crops, and converting a
    # 12-megapixel photo whole cost more than the rest of it.
    pieces = torch.stack(
        [
            images[..., top : top + crop, left : left + crop]
            for top in lattice_offsets(height, crop, _CEPSTRUM_GRID)
            for left in lattice_offsets(width, crop, _CEPSTRUM_GRID)
        ],
        dim=1,
    )
    crops = as_rgb(pieces.flatten(0, 1)).float().mean(dim=1).unflatten(0, pieces.shape[:2])
    window = torch.hann_window(crop, periodic=False, dtype=crops.dtype, device=crops.device)
    crops = (crops - crops.mean((-2, -1), keepdim=True)) * window[:, None] * window
    # Real input: the half spectrum (rfft2) and irfft2 give the full cepstrum; complex FFTs
    # made the whole statistic four times slower on a CPU. The floor is 1e-6 of the mean
    # power (Parseval: the sum of squares of the crop).
    power = torch.fft.rfft2(crops).abs().square()
    floor = 1e-6 * crops.square().sum((-2, -1), keepdim=True) + 1e-12
    cepstrum = torch.fft.irfft2(torch.log(power + floor), s=(crop, crop))
    offset = torch.fft.fftfreq(crop, 1 / crop, device=crops.device).abs()
    radius = torch.sqrt(offset[:, None].square() + offset.square())
    annulus = cepstrum[..., (radius >= _CEPSTRUM_MIN_RADIUS) & (radius <= crop / 2 - 2)]
    trough = (annulus.amin(-1) - annulus.mean(-1)) / (annulus.std(-1) + 1e-6)
    return torch.stack([trough.mean(dim=1), trough.amin(dim=1)], dim=-1)


def _gradients(gray: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal and vertical forward differences of ``(N, 1, H, W)``, both ``(H-1, W-1)``."""
    gx = gray[..., :-1, 1:] - gray[..., :-1, :-1]
    gy = gray[..., 1:, :-1] - gray[..., :-1, :-1]
    return gx, gy
