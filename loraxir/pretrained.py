"""Ready-to-use adapters: list them, find them by name, folder or Hub repo id, load them.

A self-contained adapter folder (TEAM contract 7, ``docs/sharing.md``) holds the adapter
files (``adapter_config.json``, ``adapter_model.safetensors``, ``README.md``) and, when its
base network is not a public checkpoint, ``backbone.json`` + ``backbone.safetensors``, so
it loads with no other file. Shipped adapters are such folders under the ``adapters/``
directory of the package (``loraxir.adapters``); folders in the paths listed in the
``LORAXIR_ADAPTER_PATH`` environment variable (``os.pathsep``-separated) are listed too,
first. Adding an adapter is dropping its folder there.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraxir import PEFT_TYPE
from loraxir.devices import resolve_device
from loraxir.errors import BackboneMismatchError, CheckpointError, ConfigError, unknown_name
from loraxir.validation import file_in_the_way

if TYPE_CHECKING:
    from loraxir.model import LoraIRModel

# The saved key of a router's fitted class embeddings (checkpoint.ROUTER_PREFIX + the
# router's CLASS_EMBEDDINGS_KEY), spelt out: this module reads folders without torch.
_CLASS_EMBEDDINGS_KEY = "base_model.loraxir_router.class_embeddings"

ADAPTER_PATH_ENV = "LORAXIR_ADAPTER_PATH"
#: The adapter ``loraxir restore`` uses when none is given.
DEFAULT_ADAPTER = "nafnet-five-task"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
BACKBONE_CONFIG = "backbone.json"
BACKBONE_WEIGHTS = "backbone.safetensors"
FOLDER_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, BACKBONE_CONFIG, BACKBONE_WEIGHTS)
METRICS_NAME = "metrics.json"


def adapter_roots() -> list[Path]:
    """Folders searched for adapters by name: ``$LORAXIR_ADAPTER_PATH`` entries, then the
    shipped ``adapters/`` directory."""
    roots = [Path(p) for p in os.environ.get(ADAPTER_PATH_ENV, "").split(os.pathsep) if p]
    spec = importlib.util.find_spec("loraxir.adapters")
    if spec is not None and spec.submodule_search_locations:
        roots += [Path(p) for p in spec.submodule_search_locations]
    return [root for root in roots if root.is_dir()]


def list_adapters() -> list[str]:
    """Names of the adapters found in :func:`adapter_roots`: sub-folders whose
    ``adapter_config.json`` is a loraxir one (other peft adapters are left out)."""
    names: dict[str, None] = {}
    for root in adapter_roots():
        for folder in sorted(root.iterdir()):
            if _is_loraxir_config(folder / CONFIG_NAME):
                names.setdefault(folder.name)
    return list(names)


def _is_loraxir_config(path: Path) -> bool:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("peft_type", PEFT_TYPE) == PEFT_TYPE


def find_adapter(adapter: str | os.PathLike | None = None, **hub_kwargs: Any) -> Path:
    """The local folder of ``adapter``: a folder path, an adapter name (see
    :func:`list_adapters`), or a Hub repo id ``owner/name`` (downloaded through the Hub
    cache, ``hub_kwargs`` going to ``snapshot_download``; ``subfolder=`` picks a folder
    inside the repo or folder). ``None`` is :data:`DEFAULT_ADAPTER`."""
    from loraxir.checkpoint import local_folder

    spec = DEFAULT_ADAPTER if adapter is None else str(adapter)
    path = Path(spec).expanduser()
    if path.is_dir():
        return local_folder(path, hub_kwargs)
    if path.is_file():
        raise CheckpointError(f"{spec!r} is a file; pass the adapter folder that contains it.")
    for root in adapter_roots():
        if (root / spec / CONFIG_NAME).is_file():
            return local_folder(root / spec, hub_kwargs)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _download(spec, hub_kwargs)
    if spec.startswith((".", "/", "~")) or spec.endswith(("/", os.sep)):
        raise CheckpointError(f"There is no adapter folder {spec!r}.")
    hint = (
        "Pass an adapter folder, a Hub repo id (owner/name), or one of the names listed by "
        "`loraxir info --list`."
    )
    if adapter is None:
        hint = f"No adapter was given and the default is not installed. {hint}"
    raise unknown_name("adapter", spec, list_adapters(), hint)


def load_adapter(
    adapter: str | os.PathLike | None = None,
    backbone: Any = None,
    device: str = "cpu",
    strict: bool = True,
    **hub_kwargs: Any,
) -> LoraIRModel:
    """Load ``adapter`` (name, folder or Hub repo id; see :func:`find_adapter`) onto its
    backbone and return the frozen :class:`~loraxir.LoraIRModel` in eval mode on ``device``.

    ``backbone`` is an ``nn.Module``, a spandrel checkpoint path, or ``None`` for the
    backbone stored in the folder (``backbone.json`` + ``backbone.safetensors``).
    ``device`` is ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (the first present); one
    this machine lacks raises :class:`ConfigError` before anything loads. An
    adapter that does not fit the given backbone raises :class:`CheckpointError` naming
    both. ``strict=False`` loads a config with keys this version does not know (written by
    a newer loraxir), warning about them; tensors must match either way.
    """
    from loraxir.backbones import load_backbone
    from loraxir.model import LoraIRModel

    device = resolve_device(device)
    folder = find_adapter(adapter, **hub_kwargs)
    given = backbone
    if backbone is None:
        if not (folder / BACKBONE_CONFIG).is_file():
            raise CheckpointError(
                f"Adapter {str(folder)!r} carries no {BACKBONE_CONFIG}, so its base network is "
                "not in the folder: pass it with --backbone PATH (backbone= in Python); the "
                f"card may say which ({folder / CARD_NAME}). To make the folder self-contained, "
                "save the network into it: loraxir.backbones.save_backbone(network, folder)."
            )
        backbone = load_backbone(folder)
    elif isinstance(backbone, str | os.PathLike):
        backbone = load_backbone(backbone)
    try:
        model = LoraIRModel.from_pretrained(backbone, str(folder), strict=strict)
    except BackboneMismatchError as error:
        raise BackboneMismatchError(
            f"Adapter {str(folder)!r} (trained on {describe_adapter(folder).backbone_label}) "
            f"does not fit the backbone {_backbone_label(given, backbone)}: {error}"
        ) from None
    return model.to(device)


def save_merged(
    model: Any, degradation: str, output: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Fold ``degradation``'s experts into ``model``'s backbone and save the plain network's
    state dict (native keys, loadable by spandrel) to ``output`` (``.safetensors``).

    ``model`` is left as it was (a copy is merged). An adapter with DAM blocks is refused before
    anything is merged: a block adds ``β·(LayerNorm(x)·s)`` to its input, a layer the plain
    network does not have, whatever drives ``s`` (each image's router embedding, or a
    class's fitted embedding), so no weight of the backbone can take it in.
    """
    from safetensors.torch import save_file

    from loraxir.checkpoint import with_default_modes
    from loraxir.guidance import DAMBlock

    output = check_merged_output(output, overwrite)
    blocks = [name for name, module in model.named_modules() if isinstance(module, DAMBlock)]
    if blocks:
        raise ConfigError(
            f"This adapter has DAM blocks ({len(blocks)}, e.g. {blocks[0]!r}): layers that "
            "add a modulation of their input which the plain network has no layer for, so "
            "they cannot be folded into a plain checkpoint. Restore with the class given instead "
            "(`loraxir restore --degradation NAME`: experts merged, DAM blocks kept)."
        )
    network = copy.deepcopy(model).merge_and_unload(degradation=degradation)
    state = network.state_dict()
    _check_spandrel_reads_as(network, state)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(partial))
        with_default_modes(partial)
        os.replace(partial, output)
    except BaseException as error:
        partial.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise CheckpointError(
                f"Cannot write {str(output)!r}: {error.strerror or error}. Free space or "
                "choose another -o; nothing was written."
            ) from None
        raise
    return output


def _check_spandrel_reads_as(network: Any, state: dict[str, Any]) -> None:
    """Refuse a file spandrel would load as another network. spandrel infers a network's
    hyperparameters from its weights and guesses the few it cannot see (SwinIR's
    ``img_range`` for 7-pixel windows, SCUNet's ``input_resolution``): a file whose network
    differs there would restore differently with no error. Networks spandrel does not know
    (a user's own) are not checked: their file is read with their own class."""
    import spandrel
    import torch

    from loraxir.backbones import input_channels
    from loraxir.padding import size_multiple

    try:
        loaded = spandrel.ModelLoader().load_from_state_dict(state).model
    except (spandrel.UnsupportedModelError, KeyError, ValueError, RuntimeError):
        return
    # Compared in float32 on the CPU: a half-precision SwinIR builds its attention masks in
    # float32 at sizes other than its own, and the question is the network, not its dtype.
    # (``network`` is the caller's merged copy; ``state`` keeps its tensors as they were.)
    ours_net = network.float().cpu().eval()
    loaded = loaded.float().cpu().eval()
    side = 2 * size_multiple(network)
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand(1, input_channels(network) or 3, side, side, generator=generator)
    with torch.no_grad():
        ours, theirs = ours_net(probe), loaded(probe)
    gap = (ours - theirs).abs().max().item() if ours.shape == theirs.shape else float("inf")
    if gap > 1e-3 * max(ours.abs().max().item(), 1.0):
        raise CheckpointError(
            f"spandrel would load the merged {type(network).__name__} as another network (it "
            f"guesses hyperparameters the weights do not show; outputs differ by {gap:.3g}), "
            "so a plain checkpoint would restore differently. Keep the backbone folder "
            "instead (loraxir.backbones.save_backbone(model.merge_and_unload(degradation=...), "
            "folder)), which records them and loads with loraxir.backbones.load_backbone."
        )


def check_merged_output(output: str | os.PathLike, overwrite: bool = False) -> Path:
    """``output`` as a path :func:`save_merged` can write, or :class:`ConfigError` saying
    why not (call it before loading anything): a ``.safetensors`` file name, not an existing
    folder, under no existing file, and not an existing file without ``overwrite``."""
    output = Path(output)
    if output.suffix.lower() != ".safetensors":
        raise ConfigError(f"--output must end in .safetensors, got {str(output)!r}.")
    if output.is_dir():
        raise ConfigError(f"--output {str(output)!r} is a folder; name a .safetensors file.")
    blocking = file_in_the_way(output)
    if blocking is not None:
        raise ConfigError(f"Cannot write {str(output)!r}: {str(blocking)!r} is a file.")
    if output.exists() and not overwrite:
        raise ConfigError(f"{output} exists; pass --overwrite to replace it.")
    return output


@dataclass
class AdapterInfo:
    """What an adapter folder says about itself, read without torch or peft."""

    folder: Path
    config: dict[str, Any]
    expert_parameters: int
    dam_parameters: int
    router_parameters: int
    backbone: dict[str, Any] | None
    backbone_parameters: int | None
    metrics: dict[str, Any] = field(default_factory=dict)
    class_embeddings: bool = False

    @property
    def degradations(self) -> list[str]:
        return list(self.config.get("degradations", []))

    @property
    def backbone_label(self) -> str:
        if self.backbone is None:
            return "a network not in the folder (see its card)"
        settings = self.backbone.get("hyperparameters", {})
        return f"{self.backbone.get('name')}({', '.join(f'{k}={v}' for k, v in settings.items())})"

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        config = self.config
        router = config.get("router") or {}
        encoder = router.get("encoder") if isinstance(router, dict) else None
        # The gate temperature is a router setting (the top-level key of loraxir 0.1 is gone).
        temperature = router.get("temperature") if isinstance(router, dict) else None
        fitted = ", with fitted class embeddings" if self.class_embeddings else ""
        lines = [
            f"folder: {self.folder}",
            f"degradations ({len(self.degradations)}): {', '.join(self.degradations)}",
            f"rank r / alpha: {config.get('r')} / {config.get('lora_alpha')}",
            f"top-k / temperature: {config.get('top_k')} / {temperature}"
            if router
            else f"top-k: {config.get('top_k')} (no router)",
            f"targets: {config.get('target_modules') or config.get('preset') or 'detected'}",
            f"router: {_encoder_label(encoder) if encoder else 'none'}{fitted}",
            f"trainable size: {self.expert_parameters:,} expert + {self.dam_parameters:,} DAM + "
            f"{self.router_parameters:,} router parameters",
            f"backbone: {self.backbone_label}",
        ]
        if self.backbone_parameters is not None:
            lines.append(f"backbone size: {self.backbone_parameters:,} parameters")
        lines += [f"metric {name}: {value}" for name, value in metric_rows(self.metrics)]
        return lines


def _encoder_label(encoder: Any) -> str:
    """``cnn-tiny (cnn encoder, trained with the head; width=16)`` from a saved spec."""
    if not isinstance(encoder, dict):
        return str(encoder)
    spec = dict(encoder)
    name, kind = spec.pop("name", None), spec.pop("type", None)
    state = "trained with the head" if spec.pop("trained", False) else "frozen"
    spec.pop("trainable", None)
    settings = ", ".join(f"{key}={value}" for key, value in sorted(spec.items()))
    return f"{name or kind} ({kind} encoder, {state}{'; ' + settings if settings else ''})"


def metric_rows(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """``metrics.json`` as ``(name, value)`` rows for reading (``loraxir info``, model
    cards): nested tables (a shipped adapter's per-class results) become
    ``held_out/noise``, numbers are rounded."""
    rows: list[tuple[str, str]] = []
    for name, value in metrics.items():
        if isinstance(value, dict) and all(not isinstance(v, dict) for v in value.values()):
            cells = ", ".join(f"{k} {_number(v)}" for k, v in value.items())
            rows.append((f"{prefix}{name}", cells))
        elif isinstance(value, dict):
            rows += metric_rows(value, f"{prefix}{name}/")
        else:
            rows.append((f"{prefix}{name}", _number(value)))
    return rows


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def describe_adapter(folder: str | os.PathLike) -> AdapterInfo:
    """Read ``folder``'s config, tensor sizes (safetensors headers only), backbone spec and
    metrics (``metrics.json`` when present)."""
    folder = Path(folder)
    config = _read_json(folder / CONFIG_NAME)
    if config.get("peft_type", PEFT_TYPE) != PEFT_TYPE:
        raise CheckpointError(
            f"{str(folder)!r} holds a peft adapter of type {config.get('peft_type')!r}, not a "
            "loraxir one; load it with peft (PeftModel.from_pretrained)."
        )
    degradations = config.get("degradations")
    if not isinstance(degradations, list) or not all(isinstance(d, str) for d in degradations):
        raise CheckpointError(
            f"{folder / CONFIG_NAME} has degradations={degradations!r}; a loraxir adapter "
            "lists its classes as names (re-save it with save_pretrained)."
        )
    for key in ("router", "dam"):  # read as their dict form (importing the config is slow)
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise CheckpointError(
                f"{folder / CONFIG_NAME} has {key}={config[key]!r}; a saved adapter holds its "
                f"{key} settings as a JSON object (re-save it with save_pretrained)."
            )
    experts = dam = router = 0
    class_embeddings = False
    for key, count in _tensor_sizes(folder / WEIGHTS_NAME).items():
        if key == _CLASS_EMBEDDINGS_KEY:
            class_embeddings = True
        elif ".loraxir_router." in f".{key}":
            router += count
        elif ".loraxir_dam." in f".{key}":
            dam += count
        else:
            experts += count
    backbone = backbone_size = None
    if (folder / BACKBONE_CONFIG).is_file():
        backbone = _read_json(folder / BACKBONE_CONFIG)
        backbone_size = sum(_tensor_sizes(folder / BACKBONE_WEIGHTS).values())
    metrics = _read_json(folder / METRICS_NAME) if (folder / METRICS_NAME).is_file() else {}
    return AdapterInfo(
        folder, config, experts, dam, router, backbone, backbone_size, metrics, class_embeddings
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.parent.exists():
        raise CheckpointError(f"There is no folder {str(path.parent)!r}.")
    if not path.parent.is_dir():
        raise CheckpointError(f"{str(path.parent)!r} is a file; pass the adapter folder.")
    if not path.is_file():
        raise CheckpointError(f"{str(path.parent)!r} has no {path.name}; is it an adapter folder?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid UTF-8 JSON: {error}.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object.")
    return data


def _tensor_sizes(path: Path) -> dict[str, int]:
    """Element count of every tensor in a safetensors file, from its JSON header only."""
    try:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > path.stat().st_size - 8:  # e.g. a pickle's zip magic read as a length
                raise ValueError(f"a header of {length} bytes in a file of {path.stat().st_size}")
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError) as error:
        raise CheckpointError(
            f"{path} is missing, truncated or not safetensors ({error})."
        ) from None
    sizes = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise CheckpointError(f"{path}: tensor {key!r} has no valid shape in its header.")
        count = 1
        for dim in shape:
            count *= dim
        sizes[key] = count
    return sizes


def _backbone_label(given: Any, module: Any) -> str:
    if isinstance(given, str | os.PathLike):
        return f"{str(given)!r} ({type(module).__name__})"
    from loraxir.backbones import backbone_spec

    spec = backbone_spec(module)
    hyper = getattr(module, "hyperparameters", None)
    return f"{type(module).__name__} {spec or hyper or ''}".strip()


def _download(repo_id: str, hub_kwargs: dict[str, Any]) -> Path:
    from loraxir.checkpoint import download

    return download(repo_id, [*FOLDER_FILES, METRICS_NAME], hub_kwargs)
