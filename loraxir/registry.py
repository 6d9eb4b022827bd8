"""Moved: presets and their registry live in :mod:`loraxir.backbones`.

Importing this module raises an error that names the new path, rather than keeping a
second spelling of the same API alive.
"""

raise ImportError(
    "loraxir.registry moved to loraxir.backbones (one module per backbone family plus the "
    "preset registry). Replace `from loraxir.registry import X` with "
    "`from loraxir.backbones import X`; Preset, register_preset, list_presets and get_preset "
    "are also importable from loraxir itself."
)
