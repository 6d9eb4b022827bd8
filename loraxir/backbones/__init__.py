"""Restoration backbone families: one module per family, plus the preset registry.

Each family module (``nafnet``, ``restormer``, ``swinir``, ``scunet``) holds, in one place,
its constructor defaults and named variants, the modules that get experts, the points where
DAM blocks go, and how to recognise the family (module class, spandrel architecture id).
Importing this package registers those four presets and imports no network code:
spandrel (and the non-commercial ``spandrel_extra_arches`` for Restormer) is imported
only when a backbone is built or loaded.
"""

from loraxir.backbones import nafnet, restormer, scunet, swinir  # noqa: F401 (registers them)
from loraxir.backbones._registry import (
    BACKBONE_CONFIG,
    BACKBONE_WEIGHTS,
    Preset,
    backbone_spec,
    check_input,
    create_backbone,
    detect_preset,
    from_descriptor,
    get_preset,
    input_channels,
    is_added_by_loraxir,
    list_backbones,
    list_presets,
    load_backbone,
    register_preset,
    save_backbone,
    write_backbone_files,
)

__all__ = [
    "BACKBONE_CONFIG",
    "BACKBONE_WEIGHTS",
    "Preset",
    "backbone_spec",
    "check_input",
    "create_backbone",
    "detect_preset",
    "from_descriptor",
    "get_preset",
    "input_channels",
    "is_added_by_loraxir",
    "list_backbones",
    "list_presets",
    "load_backbone",
    "register_preset",
    "save_backbone",
    "write_backbone_files",
]
