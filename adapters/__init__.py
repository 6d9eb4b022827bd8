"""Adapters shipped with loraxir (``loraxir.adapters``): one self-contained folder each.

Every sub-folder with an ``adapter_config.json`` is listed by ``loraxir.list_adapters()``
and loads by its folder name (``loraxir.load_adapter(name)``, ``loraxir restore --adapter
NAME``). See ``docs/sharing.md`` for what a folder holds.
"""
