"""Backbone presets shipped as package data (``loraxir.adapters``): one JSON file per family.

Each file names the backbone family, how to recognise it (module class names and spandrel
architecture ids) and which modules get experts. See ``loraxir.registry``.
"""
