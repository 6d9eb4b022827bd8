"""The registry of backbone families: presets, named variants, building and loading.

A :class:`Preset` describes one family (which modules get experts, where DAM blocks go, how
to recognise it, how to build it and its named variants). Each family module of this
package registers its preset on import; users register their own with
:func:`register_preset`. Building imports the family's network code only then, so the
non-commercial Restormer code is imported only when a Restormer is asked for.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraxir.errors import CheckpointError, ConfigError, DataError, unknown_name
from loraxir.pretrained import BACKBONE_CONFIG, BACKBONE_WEIGHTS  # a torch-free module
from loraxir.validation import far_outside_unit, tensor_hint


@dataclass(frozen=True)
class Preset:
    """One backbone family.

    Attributes:
        name: registry name, e.g. ``"nafnet"``; also the name of its default variant.
        target_modules: regex (full match on dotted module paths) or list of names.
        exclude_modules: regex or names never targeted, or ``None``.
        module_classes: class names of the backbone's top module, for detection.
        architectures: spandrel architecture ids, for detection.
        description: one line shown to users.
        dam_points: regex (full match) or list of module paths in front of which DAM
            blocks go by default (see :mod:`loraxir.guidance`), or ``None``.
        dam_channel_layer: regex (full match, relative to a DAM point) of the layer whose
            input size is the point's channel count, where the first layer below the point
            is not (``None``: the first Conv2d, Linear or norm layer).
        builder: ``"module:Class"`` that builds the network, or ``None`` (detection only).
        defaults: keyword arguments of the default variant.
        variants: ``{suffix: overrides}``; ``create_backbone(f"{name}-{suffix}")``.
        extra: pip extra that provides ``builder``'s package when it is optional.
        side_multiple: the multiple that input sides must be, where the network does not
            declare it itself (``padder_size``, ``window_size``) or declares less than it
            needs; inputs are reflect-padded to it (see :mod:`loraxir.padding`). ``None``:
            what the network declares.
        cpu_chunk_pixels: the most pixels (batch × height × width) per backbone call in
            CPU inference of a :class:`~loraxir.LoraIRModel` under the system allocator
            (``model.inference_chunk_pixels``), where the family wants other than
            :data:`loraxir.model.CPU_CHUNK_PIXELS`. ``None``: that default. Found from the
            preset a config names, else the one detected.
    """

    name: str
    target_modules: str | list[str]
    exclude_modules: str | list[str] | None = None
    module_classes: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    description: str = ""
    dam_points: str | list[str] | None = None
    dam_channel_layer: str | None = None
    builder: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: str | None = None
    side_multiple: int | None = None
    cpu_chunk_pixels: int | None = None

    def __post_init__(self) -> None:
        side = self.side_multiple
        if side is not None and (isinstance(side, bool) or not isinstance(side, int) or side < 1):
            raise ConfigError(
                f"Preset {self.name!r}: side_multiple must be a positive int (the side "
                f"multiple inputs are reflect-padded to; 1: none) or None, got {side!r}."
            )
        if self.builder is not None and len(str(self.builder).split(":")) != 2:
            raise ConfigError(
                f"Preset {self.name!r}: builder must be 'module:Class' (e.g. "
                f"'mypackage.nets:MyNet'), got {self.builder!r}."
            )
        chunk = self.cpu_chunk_pixels
        if chunk is not None and (
            isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1
        ):
            raise ConfigError(
                f"Preset {self.name!r}: cpu_chunk_pixels must be a positive int (pixels per "
                f"CPU inference call) or None for the default, got {chunk!r}."
            )

    def backbone_names(self) -> list[str]:
        """Names :func:`create_backbone` accepts for this family (none without a builder)."""
        if self.builder is None:
            return []
        return [self.name, *(f"{self.name}-{suffix}" for suffix in self.variants)]


_PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset, overwrite: bool = False) -> Preset:
    """Add a preset to the registry (``overwrite=True`` to replace one of the same name)."""
    if not isinstance(preset, Preset):
        raise ConfigError(
            f"register_preset takes a Preset(name=..., target_modules=..., ...), got "
            f"{type(preset).__name__}."
        )
    if preset.name in _PRESETS and not overwrite:
        raise ConfigError(
            f"A preset named {preset.name!r} is already registered; "
            "pass overwrite=True to replace it."
        )
    others = {n for p in _PRESETS.values() if p.name != preset.name for n in p.backbone_names()}
    taken = sorted(set(preset.backbone_names()) & others)
    if taken:  # create_backbone would build the other family's network by that name
        raise ConfigError(
            f"Preset {preset.name!r} would name backbones {taken} that another family "
            "already builds; choose other names."
        )
    _PRESETS[preset.name] = preset
    return preset


def list_presets(pattern: str = "*") -> list[str]:
    """Names of the registered presets matching a shell-style ``pattern`` (``"swin*"``)."""
    _check_pattern(pattern)
    return sorted(name for name in _PRESETS if fnmatch.fnmatch(name, pattern))


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (an unknown name's error lists the known ones)."""
    if name not in _PRESETS:
        raise unknown_name(
            "preset", name, _PRESETS, "Register your own with loraxir.register_preset."
        )
    return _PRESETS[name]


def detect_preset(backbone: nn.Module, architecture: str | None = None) -> Preset | None:
    """The preset whose module class or spandrel architecture id matches ``backbone``.

    ``architecture`` defaults to the id remembered by :func:`create_backbone` or
    :func:`load_backbone`.
    """
    class_name = type(backbone).__name__
    architecture = architecture or getattr(backbone, "_loraxir_architecture", None)
    for preset in _PRESETS.values():
        if class_name in preset.module_classes or (
            architecture is not None and architecture in preset.architectures
        ):
            return preset
    return None


def input_channels(backbone: nn.Module) -> int | None:
    """The channels a built-in family's network takes (its first convolution, which each
    of them applies first); ``None`` for other networks (a user's preset included), whose
    first registered layer need not be the first one run."""
    preset = detect_preset(backbone)
    if preset is None or preset.builder is None:  # a user's preset: detection only
        return None
    first = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first is None else first.in_channels


def check_input(backbone: nn.Module, x: Any) -> None:
    """Refuse images ``x`` that ``backbone`` would reject from deep inside torch: a
    non-tensor, an integer tensor, one image without its batch dimension, a built-in
    family's network given other than a 4-D batch of its channel count, or a float dtype
    other than the weights' (outside autocast); and, in inference calls of a built-in
    family's network, NaN or infinite values and values far outside [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise DataError(
            f"Expected images as a torch.Tensor (B, C, H, W), got {type(x).__name__}; "
            + tensor_hint(x)
        )
    if not x.is_floating_point():
        raise DataError(
            f"Expected float images in [0, 1], got dtype {x.dtype}; convert 8-bit images "
            "with x.float() / 255."
        )
    if x.ndim == 3:
        raise DataError(
            f"Expected a batch of images (B, C, H, W), got one image of shape "
            f"{tuple(x.shape)}; pass x[None] (and take [0] of the output)."
        )
    channels = input_channels(backbone)
    if channels is not None and x.ndim != 4:
        raise DataError(
            f"Expected a batch of images (B, C, H, W), got shape {tuple(x.shape)}; pass "
            "the frames of clips (N, T, C, H, W) as one batch: x.flatten(0, 1)."
        )
    if channels is not None and x.ndim == 4 and x.shape[1] != channels:
        how = (
            "repeat a grayscale image (x.expand(-1, 3, -1, -1)) or drop alpha (x[:, :3]), "
            "as loraxir restore does"
            if channels == 3
            else f"convert the images to {channels} channels"
        )
        raise DataError(
            f"The backbone takes {channels}-channel images, got {x.shape[1]} channels; {how}."
        )
    weight = next((p for p in backbone.parameters() if p.is_floating_point()), None)
    if (
        weight is not None
        and x.dtype != weight.dtype
        and not torch.is_autocast_enabled(x.device.type)
    ):
        raise DataError(
            f"The images are {x.dtype} but the model's weights are {weight.dtype}; pass "
            f"x.to({weight.dtype}), convert the model with model.to({x.dtype}), or run "
            "under torch.autocast."
        )
    if channels is not None and x.numel() and not torch.is_grad_enabled():
        _check_unit_range(x)


def _check_unit_range(x: torch.Tensor) -> None:
    """A built-in family's network restores images in [0, 1]: a NaN spreads through its
    global pooling to every output pixel, and 0-255 values come out as garbage, both
    silently (the router refuses them, but a given class or gates skip it). Inference
    calls only: one pass over the input, and no device sync in a training step."""
    if torch.compiler.is_compiling():
        return
    low, high = (float(value) for value in torch.aminmax(x.detach()))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise DataError(
            "The images hold NaN or infinite values, which spread to every output pixel; "
            "check the decoding or the arithmetic that produced them (torch.nan_to_num "
            "clears them)."
        )
    if far_outside_unit(low, high):
        raise DataError(
            f"The network restores images in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
            "divide 0-255 images by 255."
        )


def _check_pattern(pattern: Any) -> None:
    if not isinstance(pattern, str):
        raise ConfigError(
            f"pattern must be a shell-style string such as 'nafnet*', got {pattern!r}."
        )


def list_backbones(pattern: str = "*") -> list[str]:
    """Names accepted by :func:`create_backbone` matching a shell-style ``pattern``."""
    _check_pattern(pattern)
    names = (name for preset in _PRESETS.values() for name in preset.backbone_names())
    return sorted(name for name in names if fnmatch.fnmatch(name, pattern))


def create_backbone(name: str, **hyperparams: Any) -> nn.Module:
    """Build a randomly initialised backbone by name; ``hyperparams`` override the defaults.

    Load real weights afterwards with ``backbone.load_state_dict`` or bring a checkpoint
    through :func:`load_backbone`. The network remembers its name and full constructor
    arguments, so :func:`save_backbone` can write a folder that rebuilds it.
    """
    if not isinstance(name, str):
        raise ConfigError(
            f"create_backbone takes a backbone name (one of list_backbones()), got {name!r}."
        )
    preset, variant = _find_variant(name)
    module_name, class_name = preset.builder.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        hint = f" Install it with pip install 'loraxir[{preset.extra}]'." if preset.extra else ""
        raise ConfigError(
            f"Backbone {name!r} needs {module_name.split('.')[0]} ({error}).{hint} "
            f"{preset.description}"
        ) from None
    arguments = {**preset.defaults, **variant, **hyperparams}
    if not hasattr(module, class_name):
        raise ConfigError(
            f"Backbone {name!r}: its preset's builder {preset.builder!r} names no class "
            f"{class_name!r} in {module_name}."
        )
    try:
        model = getattr(module, class_name)(**arguments)
    except torch.OutOfMemoryError:
        raise  # the values were fine; the machine was not
    except (TypeError, ValueError, RuntimeError, IndexError, ZeroDivisionError) as error:
        # The architectures' own constructors check little: a float width, a negative size
        # or lists of the wrong length fail anywhere inside them.
        given = ", ".join(f"{k}={v!r}" for k, v in hyperparams.items()) or "none"
        defaults = {**preset.defaults, **variant} or "the network's own"
        raise ConfigError(
            f"Backbone {name!r} cannot be built from its hyper-parameters (given: {given}; "
            f"defaults: {defaults}): {type(error).__name__}: {error}. Check the names, types "
            "and sizes of the values given."
        ) from None
    model._loraxir_architecture = class_name
    model._loraxir_backbone = {"name": name, "hyperparameters": arguments}
    return model


def load_backbone(path: str | os.PathLike) -> nn.Module:
    """Load a backbone: a checkpoint file (``.pth``/``.safetensors``, detected by spandrel)
    or a folder written by :func:`save_backbone`.

    Returns the trainable ``nn.Module`` (spandrel's ``descriptor.model``, not its inference
    wrapper), with its architecture id remembered for preset detection. A file that is not
    a checkpoint at all raises :class:`CheckpointError`: torch's unpickler and safetensors
    report one with their own exception types, which name no file.
    """
    if not isinstance(path, str | os.PathLike):
        raise ConfigError(
            f"load_backbone takes a checkpoint file or a backbone folder path, got {path!r}."
        )
    folder = Path(path)
    if folder.is_dir():
        return _load_backbone_folder(folder)
    if not folder.exists():
        raise CheckpointError(
            f"No backbone at {path}: pass a .pth/.safetensors checkpoint file or a folder "
            "written by loraxir.backbones.save_backbone."
        )
    import pickle

    from safetensors import SafetensorError
    from spandrel import ModelLoader, UnsupportedModelError

    _install_extra_architectures()
    try:
        descriptor = ModelLoader().load_from_file(str(path))
    except UnsupportedModelError:
        raise CheckpointError(
            f"spandrel does not recognise the architecture of {path}. Build the network "
            "yourself, load its state dict, and pass the module to get_loraxir_model."
        ) from None
    except (pickle.UnpicklingError, EOFError, SafetensorError) as error:
        raise CheckpointError(
            f"{path} is not a PyTorch or safetensors checkpoint ({type(error).__name__}: "
            f"{error}). Pass the .pth/.safetensors file of the network's weights."
        ) from None
    except (OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"Could not read backbone checkpoint {path}: {error}") from None
    except (AttributeError, TypeError) as error:  # a pickle of a list, a number, None...
        raise CheckpointError(
            f"{path} holds no state dict ({type(error).__name__}: {error}). Pass the "
            ".pth/.safetensors file of the network's weights."
        ) from None
    return from_descriptor(descriptor)


def from_descriptor(descriptor: Any) -> nn.Module:
    """The network of a spandrel ``ModelDescriptor``, remembering its architecture id so
    that :func:`detect_preset` recognises a network spandrel names but loraxir does not."""
    model = descriptor.model
    model._loraxir_architecture = descriptor.architecture.id
    return model


def backbone_spec(backbone: nn.Module) -> dict[str, Any] | None:
    """``{"name", "hyperparameters"}`` remembered by :func:`create_backbone`, or ``None``
    for a network built another way (loaded by spandrel, or the user's own)."""
    return getattr(backbone, "_loraxir_backbone", None)


def save_backbone(backbone: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``backbone.json`` (name and constructor arguments) and ``backbone.safetensors``
    (the network's own state dict: native keys, no DAM blocks, no experts), atomically.

    The weights file also loads with spandrel's ``ModelLoader().load_from_state_dict``.
    A backbone with expert layers is refused: merge them first (``merge_and_unload``).
    """
    from loraxir.checkpoint import staged_folder

    with staged_folder(directory) as staging:
        write_backbone_files(backbone, staging)


def write_backbone_files(backbone: nn.Module, folder: Path) -> None:
    """The two files of :func:`save_backbone`, written into an existing ``folder`` (for
    writers that stage a whole folder, such as a pre-training run's output)."""
    from loraxir.checkpoint import write_safetensors

    state = backbone.state_dict()
    if any(".loraxir_experts." in key for key in state):
        raise ConfigError(
            "This backbone carries expert layers, so its keys are not its own; save the plain "
            "network (model.merge_and_unload(...) or the backbone before get_loraxir_model)."
        )
    spec = json.dumps(_backbone_spec(backbone), indent=2, sort_keys=True) + "\n"
    native = {k: v for k, v in state.items() if not is_added_by_loraxir(k)}
    write_safetensors(Path(folder) / BACKBONE_WEIGHTS, native)
    (Path(folder) / BACKBONE_CONFIG).write_text(spec, encoding="utf-8")


def is_added_by_loraxir(path: str) -> bool:
    """Is a module path or state-dict key part of what loraxir adds to a backbone (any
    component starting ``loraxir_``, such as the DAM blocks under ``loraxir_dam``)?"""
    return any(part.startswith("loraxir_") for part in path.split("."))


def _backbone_spec(backbone: nn.Module) -> dict[str, Any]:
    """``{"name", "hyperparameters"}`` that rebuild ``backbone`` with :func:`create_backbone`."""
    remembered = backbone_spec(backbone)
    if remembered is not None:
        if not _is_json_value(remembered):
            raise ConfigError(
                f"The hyper-parameters of this {remembered['name']!r} are not all JSON values "
                f"({remembered['hyperparameters']}); save its state_dict yourself."
            )
        return remembered
    preset = detect_preset(backbone)
    hyper = getattr(backbone, "hyperparameters", None)
    if preset is None or preset.builder is None or not isinstance(hyper, dict):
        raise ConfigError(
            f"Cannot describe a {type(backbone).__name__} in {BACKBONE_CONFIG}: it was not built "
            "by loraxir.create_backbone and no registered family builds it. Save its "
            "state_dict yourself."
        )
    plain = {k: v for k, v in hyper.items() if _is_json_value(v)}
    return {"name": preset.name, "hyperparameters": plain}


def _load_backbone_folder(folder: Path) -> nn.Module:
    from loraxir.checkpoint import read_safetensors

    spec_path = folder / BACKBONE_CONFIG
    if not spec_path.is_file():
        raise CheckpointError(
            f"{folder} is a folder without {BACKBONE_CONFIG}; pass a checkpoint file, or a "
            "folder written by loraxir.backbones.save_backbone."
        )
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        name, hyper = spec["name"], spec.get("hyperparameters", {})
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{spec_path} is not a backbone description ({error}).") from None
    if not isinstance(name, str) or not isinstance(hyper, dict):
        raise CheckpointError(
            f"{spec_path} is not a backbone description: it needs a name (a string) and "
            f"hyperparameters (an object), got {name!r} and {hyper!r}."
        )
    state = read_safetensors(folder, BACKBONE_WEIGHTS)
    model = create_backbone(name, **hyper)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(
            f"{folder / BACKBONE_WEIGHTS} does not fit the {name!r} network described in "
            f"{spec_path}: {error}"
        ) from None
    return model


def _find_variant(name: str) -> tuple[Preset, dict[str, Any]]:
    for preset in _PRESETS.values():
        if preset.builder is None:
            continue
        if name == preset.name:
            return preset, {}
        suffix = name.removeprefix(f"{preset.name}-")
        if suffix != name and suffix in preset.variants:
            return preset, preset.variants[suffix]
    raise unknown_name("backbone", name, list_backbones())


def _install_extra_architectures() -> None:
    """Let spandrel detect the optional (non-commercial) architectures when installed."""
    try:
        import spandrel_extra_arches
    except ImportError:
        return
    spandrel_extra_arches.install(ignore_duplicates=True)


def _is_json_value(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
