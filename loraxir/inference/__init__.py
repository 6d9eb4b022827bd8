"""Inference on user files: tiled images, videos, many inputs at once (``loraxir restore``).

* :mod:`~loraxir.inference.tiling` — tile plans, overlap blending, streamed tiled runs.
* :mod:`~loraxir.inference.restorer` — :class:`Restorer`: route once, pin, tile.
* :mod:`~loraxir.inference.images` — reading/writing images keeping alpha and bit depth.
* :mod:`~loraxir.inference.video` — frames in and out with PyAV, per-frame reports.
* :mod:`~loraxir.inference.batch` — files, folders and globs; failures reported at the end.
"""
