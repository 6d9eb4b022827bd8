"""Restormer (Zamir et al., 2022) from ``spandrel_extra_arches``: NON-COMMERCIAL licence.

The network code is imported only when a Restormer is built (``pip install
'loraxir[restormer]'``). Experts go on the attention and feed-forward convolutions of every
transformer block, depthwise included. DAM blocks go at the start of each encoder level
(``encoder_level1..3``) and before the bottleneck (``latent``); their inputs are
``(B, C, H, W)`` (Restormer's blocks keep images in that layout between blocks).
"""

from __future__ import annotations

from loraxir.backbones._registry import Preset, register_preset

PRESET = register_preset(
    Preset(
        name="restormer",
        description="Restormer (Zamir et al., 2022) from spandrel_extra_arches (NON-COMMERCIAL "
        "licence). The attention and feed-forward convolutions of every transformer block, "
        "depthwise included.",
        module_classes=("Restormer",),
        architectures=("Restormer",),
        target_modules=r".*\.(attn\.(qkv|qkv_dwconv|project_out)|ffn\.(project_in|dwconv|project_out))",
        dam_points=r"encoder_level[123]|latent",
        builder="spandrel_extra_arches.architectures.Restormer:Restormer",
        extra="restormer",
        # Three pixel-unshuffle downsamplings and no padding of its own.
        side_multiple=8,
        defaults={},
        variants={
            "tiny": {
                "dim": 8,
                "num_blocks": [1, 1, 1, 1],
                "num_refinement_blocks": 1,
                "heads": [1, 1, 1, 1],
            },
        },
    )
)
