"""loraxir: degradation-routed mixtures of low-rank experts for any restoration network.

Importing loraxir is cheap: the public names below are imported on first use (PEP 562
module ``__getattr__``), so ``loraxir --help`` does not pay for torch and peft. peft still
finds our method: loraxir registers itself with peft as soon as peft is imported (at once
if it already is), see :mod:`loraxir._peft_hook`.
"""

from __future__ import annotations

import importlib
from typing import Any

from loraxir import _peft_hook

__version__ = "0.1.0"
#: ``peft_type`` of a loraxir ``adapter_config.json`` (peft's registry key for the method).
PEFT_TYPE = "LORAXIR"

# public name -> module that defines it
_EXPORTS = {
    "BackboneMismatchError": "loraxir.errors",
    "CheckpointError": "loraxir.errors",
    "ConfigError": "loraxir.errors",
    "DAMConfig": "loraxir.config",
    "DataError": "loraxir.errors",
    "LoraIRConfig": "loraxir.config",
    "LoraIRError": "loraxir.errors",
    "LoraIRModel": "loraxir.model",
    "Preset": "loraxir.backbones",
    "RoutingError": "loraxir.errors",
    "TargetModulesError": "loraxir.errors",
    "TrainingError": "loraxir.errors",
    "UnknownNameError": "loraxir.errors",
    "create_backbone": "loraxir.backbones",
    "GuidedBackbone": "loraxir.guidance",
    "get_loraxir_model": "loraxir.model",
    "get_preset": "loraxir.backbones",
    "list_adapters": "loraxir.pretrained",
    "list_backbones": "loraxir.backbones",
    "list_presets": "loraxir.backbones",
    "load_adapter": "loraxir.pretrained",
    "load_backbone": "loraxir.backbones",
    "register_preset": "loraxir.backbones",
    "route": "loraxir.model",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule such as ``loraxir.hub``) on first access."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


_peft_hook.install()
