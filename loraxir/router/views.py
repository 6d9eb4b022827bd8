"""Views: the fixed set of square crops of an image that the router's encoder reads.

Every view kind returns ``(B, 1 + grid², 3, size, size)``: view 0 is the *global* view
(the whole image resized to ``size``: layout, colour and contrast, where haze and low
light show), then ``grid × grid`` *local* views in row-major order. The number of views
is fixed, so the router's cost does not grow with the image.

* ``"native"`` (default): the global view is low-passed (the image at ``size / 4``,
  upsampled to ``size``): layout, colour and contrast only, alike at every image size, so
  a router cannot learn noise from the global view of small images and then miss it on
  large ones. Local views are ``size × size`` crops at the image's own resolution, on a
  ``grid × grid`` lattice spread over the image. Noise, JPEG
  blocks, thin rain streaks and blur keep the pixel statistics they have in the image, at
  any image size. An image smaller than ``size`` gives crops of its shorter side,
  resized up to ``size`` (the only rescale, bounded by ``size / min(H, W)``).
* ``"resize"``: the paper's views: the image resized to ``grid·size`` and cut into
  ``grid × grid`` tiles. Each tile sees the image at ``grid``× the global resolution,
  which is native only for images of about ``grid·size`` pixels; larger images are
  downscaled first, which averages fine noise away.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from loraxir.errors import ConfigError, RoutingError, unknown_name
from loraxir.validation import far_outside_unit, tensor_hint

ViewFn = Callable[[torch.Tensor, int, int], torch.Tensor]
# Native views: the global view keeps 1/_GLOBAL_LOW_PASS of the tower's resolution.
_GLOBAL_LOW_PASS = 4
VIEWS: dict[str, ViewFn] = {}


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """Return ``(N, 3, H, W)`` RGB images from RGB, grayscale or RGBA input.

    Grayscale is repeated over three channels; RGBA loses its alpha channel (the colour
    channels carry the degradation, and the restoration backbone sees them as they are).
    Integer images are refused rather than guessed: the contract is float in [0, 1].
    """
    check_image_batch(images)
    if not bool(torch.isfinite(images).all()):
        raise RoutingError(
            "The images hold NaN or infinite values; the router cannot read them. Check the "
            "decoding or the arithmetic that produced them (torch.nan_to_num clears them)."
        )
    low, high = torch.aminmax(images)
    if far_outside_unit(float(low), float(high)):
        raise RoutingError(
            f"The router reads images in [0, 1], got values in [{low.item():.4g}, "
            f"{high.item():.4g}]; divide 0-255 images by 255."
        )
    channels = images.shape[1]
    if channels == 3:
        return images
    if channels == 1:
        return images.expand(-1, 3, -1, -1)
    return images[:, :3]


def check_image_batch(images: torch.Tensor) -> None:
    """Raise :class:`RoutingError` unless ``images`` is a non-empty float ``(N, C, H, W)``
    batch of 1, 3 or 4 channels: the checks of :func:`as_rgb` that read no pixel, for
    statistics that crop before converting (the error must quote the caller's shape)."""
    if not isinstance(images, torch.Tensor):
        raise RoutingError(
            f"The router reads a torch.Tensor batch (N, C, H, W), got {type(images).__name__}; "
            + tensor_hint(images)
        )
    if images.dim() != 4:
        raise RoutingError(
            f"Expected a batch of images (N, C, H, W), got shape {tuple(images.shape)}. "
            "Add a batch dimension with images.unsqueeze(0)."
        )
    if not images.is_floating_point():
        raise RoutingError(
            f"Expected float images in [0, 1], got dtype {images.dtype}. "
            "Convert with images.float() / 255."
        )
    if images.shape[0] == 0:
        raise RoutingError("Got an empty batch (0 images); route at least one image.")
    if images.shape[-2] == 0 or images.shape[-1] == 0:
        raise RoutingError(
            f"Got images of size {images.shape[-2]}×{images.shape[-1]}: an image needs at "
            "least one pixel."
        )
    if images.shape[1] not in (1, 3, 4):
        raise RoutingError(
            f"Expected 3 (RGB), 1 (grayscale) or 4 (RGBA) channels, got {images.shape[1]} "
            f"(shape {tuple(images.shape)})."
        )


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` to ``(N, C, size, size)``: bilinear, antialiased, no-op if equal.

    Antialiasing keeps downscaled views faithful to the image's degradation statistics
    (aliasing would invent high-frequency content that looks like noise).
    """
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )


def _register(kind: str) -> Callable[[ViewFn], ViewFn]:
    def decorate(fn: ViewFn) -> ViewFn:
        VIEWS[kind] = fn
        return fn

    return decorate


@_register("resize")
def tiled_views(images: torch.Tensor, size: int, grid: int) -> torch.Tensor:
    """The paper's views: global + tiles of the image resized to ``grid·size`` (see module)."""
    views = [resize_square(images, size).unsqueeze(1)]
    if grid:
        big = resize_square(images, grid * size)
        b, c = big.shape[:2]
        tiles = big.reshape(b, c, grid, size, grid, size).permute(0, 2, 4, 1, 3, 5)
        views.append(tiles.reshape(b, grid * grid, c, size, size))
    return torch.cat(views, dim=1)


@_register("native")
def native_views(images: torch.Tensor, size: int, grid: int) -> torch.Tensor:
    """Global view + ``grid²`` crops at the image's own resolution (see module)."""
    coarse = resize_square(images, max(1, size // _GLOBAL_LOW_PASS))
    views = [F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)]
    height, width = images.shape[-2:]
    crop = min(size, height, width)
    for top in lattice_offsets(height, crop, grid):
        for left in lattice_offsets(width, crop, grid):
            views.append(resize_square(images[..., top : top + crop, left : left + crop], size))
    return torch.stack(views, dim=1)


def multi_view(images: torch.Tensor, size: int, grid: int, kind: str = "native") -> torch.Tensor:
    """The ``(B, 1 + grid², 3, size, size)`` views of ``kind`` (``"native"`` or ``"resize"``).

    Input is RGB, grayscale or RGBA float in [0, 1] (:func:`as_rgb`), any size.
    """
    if kind not in VIEWS:
        raise unknown_name("view kind", kind, VIEWS)
    if grid < 0:
        raise ConfigError(f"grid must be >= 0 (0 = global view only), got {grid}.")
    return VIEWS[kind](as_rgb(images), size, grid)


def lattice_offsets(length: int, crop: int, grid: int) -> list[int]:
    """Start of ``grid`` crops of ``crop`` spread evenly from edge to edge of ``length``."""
    if grid == 1:
        return [(length - crop) // 2]
    return [round(i * (length - crop) / (grid - 1)) for i in range(grid)]
