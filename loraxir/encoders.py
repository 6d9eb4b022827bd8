"""Moved: the degradation encoders live in :mod:`loraxir.router.encoders`.

Importing this module raises an error that names the new path, rather than keeping a
second spelling of the same API alive.
"""

raise ImportError(
    "loraxir.encoders moved to loraxir.router.encoders (one module per encoder kind: cnn, "
    "open_clip, hf_clip, module). Replace `from loraxir.encoders import X` with "
    "`from loraxir.router.encoders import X`; as_rgb and resize_square are in "
    "loraxir.router.views."
)
