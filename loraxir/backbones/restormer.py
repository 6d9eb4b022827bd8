"""Restormer (Zamir et al., 2022) from ``spandrel_extra_arches``: NON-COMMERCIAL licence.

The network code is imported only when a Restormer is built (``pip install
'loraxir[restormer]'``). Experts go on the attention and feed-forward convolutions of every
transformer block, depthwise included. DAM blocks go at the start of each encoder level
(``encoder_level1..3``) and before the bottleneck (``latent``); their inputs are
``(B, C, H, W)`` (Restormer's blocks keep images in that layout between blocks).
"""

from __future__ import annotations

from loraxir.backbones._registry import Preset, register_preset

register_preset(
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
        # One 128² image per CPU inference call: the bare network ran four 128² images one
        # at a time in 0.79× the time of one call and eight in 0.45×; 2 per call took 0.85×
        # and 0.64×; sixteen 64² images, four per call 0.57× (the best, two per call, 0.55×).
        # Measured with the system allocator; with freed memory kept, one call was as fast.
        cpu_chunk_pixels=128 * 128,
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
