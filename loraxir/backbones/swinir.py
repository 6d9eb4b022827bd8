"""SwinIR (Liang et al., 2021; Apache-2.0), built by spandrel, as a denoiser (``upscale=1``).

Experts go on the attention and MLP linears of every Swin block. SwinIR is not a U-Net:
it has no encoder levels and no bottleneck, so DAM blocks go at the start of each residual
Swin group (``layers.i``), the one place per stage where the whole feature map passes; their
inputs are tokens ``(B, H·W, C)``.
"""

from __future__ import annotations

from loraxir.backbones._registry import Preset, register_preset

_DENOISER = {
    "window_size": 8,
    "mlp_ratio": 2.0,
    "upscale": 1,
    "upsampler": "",
    "resi_connection": "1conv",
}

register_preset(
    Preset(
        name="swinir",
        description="SwinIR (Liang et al., 2021), Apache-2.0. The attention and MLP linears of "
        "every Swin block.",
        module_classes=("SwinIR",),
        architectures=("SwinIR",),
        target_modules=r".*\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))",
        dam_points=r"layers\.\d+",
        builder="spandrel.architectures.SwinIR:SwinIR",
        # 2^14 pixels per CPU inference call: the bare default network ran four 128² images
        # one per call in 0.77× the time of one call (two per call 0.74×), and eight 64²
        # images four per call in 0.77× (two 0.79×, one 0.87×, eight in one call 1.00×).
        # System allocator, 2026-12-07.
        cpu_chunk_pixels=128 * 128,
        defaults={
            "img_size": 128,
            "embed_dim": 180,
            "depths": [6] * 6,
            "num_heads": [6] * 6,
            **_DENOISER,
        },
        variants={
            "tiny": {"img_size": 32, "embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2]},
        },
    )
)
