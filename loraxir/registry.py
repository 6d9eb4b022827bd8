"""Backbone presets: which modules of a known backbone family get experts.

Presets are data (``adapters/*.json``, shipped as ``loraxir.adapters``), read on first use;
importing this module registers nothing and reads no file. Users add their own with
:func:`register_preset`. A preset is found by name, or detected from a backbone's class
name or spandrel architecture id.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from importlib import resources

from torch import nn

from loraxir.errors import ConfigError, unknown_name


@dataclass(frozen=True)
class Preset:
    """Targets of one backbone family.

    Attributes:
        name: registry name, e.g. ``"nafnet"``.
        target_modules: regex (full match on dotted module paths) or list of names.
        exclude_modules: regex or names never targeted, or ``None``.
        module_classes: class names of the backbone's top module, for detection.
        architectures: spandrel architecture ids, for detection.
        description: one line shown by :func:`list_presets` users.
    """

    name: str
    target_modules: str | list[str]
    exclude_modules: str | list[str] | None = None
    module_classes: tuple[str, ...] = field(default_factory=tuple)
    architectures: tuple[str, ...] = field(default_factory=tuple)
    description: str = ""


_PRESETS: dict[str, Preset] = {}
_BUILTINS_LOADED = False


def register_preset(preset: Preset, overwrite: bool = False) -> Preset:
    """Add a preset to the registry (``overwrite=True`` to replace one of the same name)."""
    _load_builtin_presets()
    if preset.name in _PRESETS and not overwrite:
        raise ConfigError(
            f"A preset named {preset.name!r} is already registered; "
            "pass overwrite=True to replace it."
        )
    _PRESETS[preset.name] = preset
    return preset


def list_presets(pattern: str = "*") -> list[str]:
    """Names of the registered presets matching a shell-style ``pattern`` (``"swin*"``)."""
    _load_builtin_presets()
    return sorted(name for name in _PRESETS if fnmatch.fnmatch(name, pattern))


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (an unknown name's error lists the known ones)."""
    _load_builtin_presets()
    if name not in _PRESETS:
        raise unknown_name(
            "preset", name, _PRESETS, "Register your own with loraxir.register_preset."
        )
    return _PRESETS[name]


def detect_preset(backbone: nn.Module, architecture: str | None = None) -> Preset | None:
    """The preset whose module class or spandrel architecture id matches ``backbone``."""
    _load_builtin_presets()
    class_name = type(backbone).__name__
    for preset in _PRESETS.values():
        if class_name in preset.module_classes or (
            architecture is not None and architecture in preset.architectures
        ):
            return preset
    return None


def _load_builtin_presets() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    for entry in sorted(resources.files("loraxir.adapters").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text(encoding="utf-8"))
            preset = Preset(
                name=data["name"],
                target_modules=data["target_modules"],
                exclude_modules=data.get("exclude_modules"),
                module_classes=tuple(data.get("module_classes", ())),
                architectures=tuple(data.get("architectures", ())),
                description=data.get("description", ""),
            )
            _PRESETS.setdefault(preset.name, preset)
