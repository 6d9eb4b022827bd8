"""loraxir: degradation-routed mixtures of low-rank experts for any restoration network.

Importing loraxir registers it with peft (see :mod:`loraxir.peft_integration`).
"""

__version__ = "0.1.0"

from loraxir.backbones import create_backbone, list_backbones, load_backbone
from loraxir.config import LoraIRConfig
from loraxir.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    LoraIRError,
    RoutingError,
    TargetModulesError,
    UnknownNameError,
)
from loraxir.model import LoraIRModel, get_loraxir_model, route
from loraxir.peft_integration import register_with_peft
from loraxir.registry import Preset, get_preset, list_presets, register_preset

register_with_peft()

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "LoraIRConfig",
    "LoraIRError",
    "LoraIRModel",
    "Preset",
    "RoutingError",
    "TargetModulesError",
    "UnknownNameError",
    "__version__",
    "create_backbone",
    "get_loraxir_model",
    "get_preset",
    "list_backbones",
    "list_presets",
    "load_backbone",
    "register_preset",
    "route",
]
