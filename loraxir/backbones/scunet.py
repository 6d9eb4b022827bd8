"""SCUNet (Zhang et al., 2022; Apache-2.0), built by spandrel.

Experts go on the window-attention and MLP linears of every Swin-Conv block and on the
transposed-convolution upsamplers. SCUNet is a U-Net: DAM blocks go at the start of each
encoder level (``m_down1..3``) and before the bottleneck (``m_body``); their inputs are
``(B, C, H, W)``.
"""

from __future__ import annotations

from loraxir.backbones._registry import Preset, register_preset

register_preset(
    Preset(
        name="scunet",
        description="SCUNet (Zhang et al., 2022), Apache-2.0. The window-attention and MLP "
        "linears of every Swin-Conv block, and the transposed-convolution upsamplers.",
        module_classes=("SCUNet",),
        architectures=("SCUNet",),
        target_modules=r"(.*\.(msa\.(embedding_layer|linear)|mlp\.[02])|m_up\d\.0)",
        dam_points=r"m_down[123]|m_body",
        # A Swin-Conv block splits its input between a conv and a Swin branch: the 1×1
        # conv that reads the whole input (conv1_1), not the first layer, gives the width.
        dam_channel_layer=r"(0\.)?conv1_1",
        builder="spandrel.architectures.SCUNet:SCUNet",
        # Three 2× downsamplings under 8² windows: SCUNet reflect-pads its input to a
        # multiple of 64 itself, which fails on any side of 32 or less.
        side_multiple=64,
        defaults={},
        variants={
            # SCUNet fixes head_dim=32, so dim cannot go below 64: ~5.5 M parameters.
            "tiny": {"config": [1] * 7, "dim": 64, "input_resolution": 64},
        },
    )
)
