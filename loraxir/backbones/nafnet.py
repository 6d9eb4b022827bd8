"""NAFNet (Chen et al., 2022; MIT), built by spandrel: the LoRA-IR paper's backbone.

Experts go on every convolution, depthwise included, as in the paper's code. DAM blocks go
at the start of each encoder level (``encoders.i``) and before the bottleneck
(``middle_blks``), where the paper puts them; their inputs are ``(B, C, H, W)``.
"""

from __future__ import annotations

from loraxir.backbones._registry import Preset, register_preset

_LEVELS_W32 = {"middle_blk_num": 1, "enc_blk_nums": [1, 1, 1, 28], "dec_blk_nums": [1, 1, 1, 1]}

register_preset(
    Preset(
        name="nafnet",
        description="NAFNet (Chen et al., 2022), MIT. Every convolution, depthwise included, "
        "as in the LoRA-IR paper's code.",
        module_classes=("NAFNet",),
        architectures=("NAFNet",),
        target_modules=r"(intro|ending|downs\.\d+|ups\.\d+\.0|.*\.(conv[1-5]|sca\.1))",
        dam_points=r"encoders\.\d+|middle_blks",
        builder="spandrel.architectures.NAFNet:NAFNet",
        defaults={"width": 32, **_LEVELS_W32},
        variants={
            # The GoPro configuration at two widths; w64 is the LoRA-IR paper's backbone.
            "w32": {},
            "w64": {"width": 64},
            # The network CPU training uses (5.0 M parameters; see the field notes): few
            # encoder blocks, so a step on 64² crops takes a fraction of a second.
            "small": {"enc_blk_nums": [1, 1, 1, 2]},
            # Tests: random init, a few thousand parameters.
            "tiny": {"width": 8, "enc_blk_nums": [1, 1], "dec_blk_nums": [1, 1]},
        },
    )
)
