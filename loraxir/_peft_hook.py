"""Register loraxir with peft when peft is imported, without importing peft ourselves.

``import loraxir`` must stay cheap (peft costs seconds) yet ``import loraxir`` followed by
``peft.PeftModel.from_pretrained(...)`` must find our method. So :func:`install` registers
at once when peft is already imported, and otherwise puts a finder on ``sys.meta_path``
that watches the imports of ``peft`` and of ``loraxir.*`` modules. Registration needs
``loraxir.model``, which itself imports peft: registering while any loraxir module is half
imported would hit a circular import, so it waits until peft is loaded and no loraxir
module is mid-import, then runs once and removes the finder.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loaders of ``peft`` and ``loraxir.*`` to run a check after each import."""

    def __init__(self) -> None:
        self.importing = 0  # loraxir modules whose code is running

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != "peft" and not name.startswith("loraxir."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        tracked = name.startswith("loraxir.")
        original = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            self.importing += tracked
            try:
                original(module)
            finally:
                self.importing -= tracked
            # peft still counts as initialising until this returns: trust its own import.
            if self.importing == 0 and (name == "peft" or _peft_loaded()):
                _register()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_FINDER = _Finder()


def _peft_loaded() -> bool:
    peft = sys.modules.get("peft")
    spec = getattr(peft, "__spec__", None)
    return peft is not None and not getattr(spec, "_initializing", False)


def _register() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    from loraxir.peft_integration import register_with_peft

    register_with_peft()


def install() -> None:
    """Register with peft now if it is loaded, else when it gets imported (idempotent)."""
    if "peft" in sys.modules:
        _register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
