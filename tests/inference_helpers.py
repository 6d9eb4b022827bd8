"""Tiny adapters and images for the CLI, inference and pretrained-loading tests."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

import loraxir
from loraxir.backbones import save_backbone
from loraxir.router import DegradationRouter

CLASSES = ["noise", "blur", "compression"]


def tiny_model(seed: int = 0, backbone: nn.Module | None = None) -> loraxir.LoraIRModel:
    """nafnet-tiny with random experts (r=2) and a tiny CNN router over :data:`CLASSES`."""
    torch.manual_seed(seed)
    backbone = backbone or loraxir.create_backbone("nafnet-tiny")
    router = DegradationRouter.from_encoder(
        "cnn-tiny", CLASSES, image_size=16, grid=1, hidden_dim=16, embed_dim=8
    )
    config = loraxir.LoraIRConfig(degradations=list(CLASSES), r=2, lora_alpha=2)
    model = loraxir.get_loraxir_model(backbone, config, router=router)
    _randomize_experts(model, 0.2)
    return model.eval()


def write_adapter(folder: Path, seed: int = 0) -> Path:
    """A self-contained adapter folder (TEAM contract 7): adapter files, ``backbone.json``
    and ``backbone.safetensors``."""
    torch.manual_seed(seed + 1)
    backbone = loraxir.create_backbone("nafnet-tiny")
    save_backbone(backbone, folder)
    tiny_model(seed, backbone).save_pretrained(str(folder), metrics={"psnr_noise": 30.0})
    return folder


def _randomize_experts(model: nn.Module, scale: float) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".loraxir_experts." in name:
                param.normal_(0.0, scale)


def local_conv_model(seed: int = 0) -> loraxir.LoraIRModel:
    """Two 3x3 convolutions (receptive radius 2) with routed experts: a network that tiling
    must reproduce exactly."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)
    )
    config = loraxir.LoraIRConfig(degradations=list(CLASSES), r=2, target_modules=["0", "2"])
    router = DegradationRouter.from_encoder("cnn-tiny", CLASSES, image_size=16, grid=1)
    model = loraxir.get_loraxir_model(backbone, config, router=router)
    _randomize_experts(model, 0.3)
    return model.eval()


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A ``(H, W, 3)`` uint8 crop of the astronaut photo plus a little noise."""
    from skimage import data

    base = np.resize(data.astronaut(), (max(height, 1), max(width, 1), 3)).astype(np.float32)
    noise = np.random.default_rng(seed).normal(0, 8, base.shape)
    return np.clip(base[:height, :width] + noise, 0, 255).astype(np.uint8)


def png16(path, values, exif=None, transparent=None, interlaced=False):
    """A 16-bit PNG written byte by byte (gray, gray+alpha, RGB or RGBA by channel count),
    so the reader is tested against files it did not write; ``exif``: an eXIf chunk;
    ``transparent``: the sample value(s) a tRNS chunk makes transparent; ``interlaced``:
    the seven Adam7 passes."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    height, width, channels = values.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    samples = values.astype(">u2")
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2)]
    passes = [*passes, (0, 1, 1, 2)] if interlaced else [(0, 0, 1, 1)]
    images = [samples[y::dy, x::dx] for x, y, dx, dy in passes]
    rows = [row for image in images if image.size for row in image.reshape(len(image), -1)]
    data = zlib.compress(b"".join(b"\0" + row.tobytes() for row in rows))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, int(interlaced))
    extra = chunk(b"eXIf", exif.tobytes()[6:]) if exif is not None else b""  # no "Exif\0\0"
    if transparent is not None:
        extra += chunk(b"tRNS", struct.pack(f">{len(transparent)}H", *transparent))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + extra
        + chunk(b"IDAT", data)
        + chunk(b"IEND", b"")
    )
