"""The adapter checkpoint format: reading, checking and atomically writing it.

A checkpoint is a folder (or a Hub repo) with ``adapter_config.json`` (the
:class:`~loraxir.config.LoraIRConfig`), ``adapter_model.safetensors`` (experts under peft's
key names, plus router weights) and a ``README.md`` model card. Loading never unpickles.
Key names follow peft (``base_model.model.<module path>.loraxir_experts.A.<chunk>``), so a
folder written here loads with ``peft.PeftModel.from_pretrained`` and the other way round.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
import warnings
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from loraxir.config import CONFIG_NAME, LoraIRConfig
from loraxir.errors import BackboneMismatchError, CheckpointError, ConfigError
from loraxir.layers import LAYER_TYPES
from loraxir.targeting import resolve_targets
from loraxir.validation import make_parent_folder

WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
ROUTER_PREFIX = "base_model.loraxir_router."
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

__all__ = ["CheckpointError", "expert_key", "read", "write"]


def expert_key(path: str, factor: str, chunk: int) -> str:
    """Saved name of one expert chunk's ``A`` or ``B`` for the module at ``path``."""
    return f"base_model.model.{path}.loraxir_experts.{factor}.{chunk}"


def split_router(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split saved tensors into expert tensors and router tensors (prefix removed)."""
    experts = {k: v for k, v in tensors.items() if not k.startswith(ROUTER_PREFIX)}
    router = {k[len(ROUTER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(ROUTER_PREFIX)}
    return experts, router


def expected_expert_shapes(backbone: nn.Module, config: LoraIRConfig) -> dict[str, tuple[int, ...]]:
    """The key and shape of every expert tensor ``config`` would create on ``backbone``."""
    shapes = {}
    for path in resolve_targets(
        backbone, config.target_modules, config.exclude_modules, config.preset
    ):
        base = backbone.get_submodule(path)
        a_shape, b_shape = LAYER_TYPES[type(base)].factor_shapes(base, config.r)
        for chunk, size in enumerate(config.expert_chunks):
            shapes[expert_key(path, "A", chunk)] = (size, *a_shape)
            shapes[expert_key(path, "B", chunk)] = (size, *b_shape)
    return shapes


def check_expert_shapes(
    backbone: nn.Module, config: LoraIRConfig, tensors: dict[str, torch.Tensor]
) -> None:
    """Raise :class:`BackboneMismatchError` naming the first layer whose saved shape differs from
    what the backbone needs, or the first missing or unexpected tensor."""
    expected = expected_expert_shapes(backbone, config)
    for key, shape in expected.items():
        if key not in tensors:
            raise BackboneMismatchError(
                f"The checkpoint has no tensor {key!r} that this backbone needs; it was saved "
                "for another backbone or another config."
            )
        if tuple(tensors[key].shape) != shape:
            layer = key.removeprefix("base_model.model.").split(".loraxir_experts.")[0]
            _refuse_an_edited_config(backbone, key, tuple(tensors[key].shape), shape, config)
            raise BackboneMismatchError(
                f"Layer {layer!r} does not fit: the checkpoint has {key.rsplit('.', 3)[-3:]} of "
                f"shape {tuple(tensors[key].shape)}, this backbone needs {shape}. The adapter was "
                "saved for a backbone of other shapes (another width or variant)."
            )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise BackboneMismatchError(
            f"The checkpoint has {len(unexpected)} tensors this backbone has no layer for, e.g. "
            f"{unexpected[0]!r}; it was saved for another backbone."
        )


def read(
    model_id: str | os.PathLike, strict: bool = True, **hub_kwargs: Any
) -> tuple[LoraIRConfig, dict[str, torch.Tensor]]:
    """Read the config and tensors of a checkpoint folder or Hub repo, without unpickling."""
    folder = _resolve_folder(model_id, hub_kwargs)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_NAME}; is it a loraxir adapter folder?")
    config = LoraIRConfig.from_file(config_path, strict=strict)
    return config, read_safetensors(folder, WEIGHTS_NAME)


def read_safetensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``folder / name``, never unpickling (shared by adapters and routers).

    Raises :class:`CheckpointError` when the file is missing (naming any pickle files found
    instead, which are refused), truncated or corrupted.
    """
    weights = folder / name
    if not weights.is_file():
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        pickles = [p for p in found if Path(p).suffix in _PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{folder} holds pickle weights {pickles} and no {name}. loraxir loads "
                "safetensors only (a pickle can run arbitrary code); convert it with "
                "safetensors.torch.save_file in a trusted environment."
            )
        raise CheckpointError(f"{folder} has no {name}.")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{weights} is truncated or corrupted ({error}); re-save or re-download it."
        ) from None


def plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A backbone's own tensors under its native keys, also while it carries experts or
    DAM blocks: expert layers' ``base_layer`` unwrapped, every ``loraxir_`` part (experts,
    DAM) left out. Load it into a fresh backbone to save a fine-tuned base network."""
    state = {}
    for key, value in module.state_dict().items():
        if any(part.startswith("loraxir_") for part in key.split(".")):
            continue
        state[key.replace(".base_layer.", ".")] = value.detach().cpu()
    return state


def _refuse_an_edited_config(
    backbone: nn.Module,
    key: str,
    saved: tuple[int, ...],
    needed: tuple[int, ...],
    config: LoraIRConfig,
) -> None:
    """A tensor that differs from what the backbone needs only in its expert count, or
    that fits the layer at another rank, points at the config (``degradations``,
    ``expert_chunks`` or ``r`` edited or missing), not at another backbone: say so
    (:class:`CheckpointError`)."""
    layer = key.removeprefix("base_model.model.").split(".loraxir_experts.")[0]
    if len(saved) != len(needed):
        return
    if saved[0] != needed[0] and saved[1:] == needed[1:]:
        raise CheckpointError(
            f"Layer {layer!r} holds {saved[0]} experts in a chunk, but adapter_config.json "
            f"gives {needed[0]} (degradations {config.degradations}, expert_chunks "
            f"{config.expert_chunks}): the config was edited or does not belong to these "
            "weights. Restore it as saved."
        )
    base = backbone.get_submodule(layer)
    factor = 0 if key.rsplit(".", 2)[-2] == "A" else 1
    for rank in sorted(set(saved[1:]) - {config.r}):
        if (needed[0], *LAYER_TYPES[type(base)].factor_shapes(base, rank)[factor]) == saved:
            raise CheckpointError(
                f"The experts of layer {layer!r} have rank {rank}, but adapter_config.json "
                f"gives r={config.r}: the config was edited or lacks 'r'. Set "
                f'"r": {rank} there.'
            )


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Save ``tensors`` (detached, on the CPU, contiguous) as a safetensors file."""
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(contiguous, str(path), metadata={"format": "pt"})


@contextlib.contextmanager
def staged_folder(
    directory: str | os.PathLike, carry_over: bool = True, drop: Collection[str] = ()
) -> Iterator[Path]:
    """Write a folder atomically: yield an empty staging folder, then swap it in.

    The staging folder is a sibling of ``directory``; when the block ends without error it
    replaces ``directory`` by renames, carrying over files of the old folder that the
    block did not write (logs, images, a router next to an adapter) unless ``carry_over``
    is false (a folder replaced whole, where an old file would be stale), and except the
    names in ``drop`` (files known to be stale). A crash inside the block leaves the
    previous folder exactly as it was and no staging folder behind. A link to a folder
    is followed: the folder it points at is replaced, the link stays.
    """
    # A link to a folder (on a data disk, say) is written through: the swap below happens
    # beside the real folder, and the link keeps pointing at it.
    target = Path(directory).resolve() if Path(directory).is_symlink() else Path(directory)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} is a file, not a folder; choose a folder path.")
    make_parent_folder(target, CheckpointError)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        with_default_modes(staging)
        if target.exists():
            for item in target.iterdir() if carry_over else ():
                if item.name not in drop and not (staging / item.name).exists():
                    copy = shutil.copytree if item.is_dir() else shutil.copy2
                    copy(item, staging / item.name)
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def with_default_modes(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the permissions a plain
    ``open``/``mkdir`` would (``0o666`` / ``0o777`` less the umask). Temporary files and
    folders start private (``0o600`` / ``0o700``), and safetensors writes ``0o600``: left
    so, a checkpoint could not be read by the rest of a team sharing a machine."""
    mask = os.umask(0)
    os.umask(mask)
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in items:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def write(
    directory: str | os.PathLike,
    config: LoraIRConfig,
    tensors: dict[str, torch.Tensor],
    backbone: str,
    metrics: dict[str, float] | None = None,
    drop: Collection[str] = (),
) -> None:
    """Write a checkpoint folder atomically.

    Everything is written to a temporary sibling folder first, then swapped in with
    renames; files of the old folder that are not ours (logs, images) are carried over,
    except those named in ``drop`` (stale ones). A crash before the swap leaves the
    previous checkpoint exactly as it was.
    """
    from loraxir.hub import render_model_card

    with staged_folder(directory, drop=drop) as staging:
        (staging / CONFIG_NAME).write_text(config.to_json_string(), encoding="utf-8")
        write_safetensors(staging / WEIGHTS_NAME, tensors)
        (staging / CARD_NAME).write_text(
            render_model_card(config, backbone, metrics), encoding="utf-8"
        )


def refuse_file(path: Path) -> NoReturn:
    """Raise :class:`CheckpointError` for a file given where a checkpoint folder is expected
    (pickle files with the reason they are refused)."""
    if path.suffix in _PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path} is a pickle file; loraxir loads safetensors folders only "
            "(a pickle can run arbitrary code)."
        )
    raise CheckpointError(f"{path} is a file; pass the folder that contains it.")


def _resolve_folder(model_id: str | os.PathLike, hub_kwargs: dict[str, Any]) -> Path:
    path = Path(model_id)
    if path.is_dir():
        return local_folder(path, hub_kwargs)
    if path.is_file():
        refuse_file(path)
    if str(model_id).count("/") != 1 or str(model_id).startswith((".", "/")):
        raise CheckpointError(
            f"{model_id} is neither a local folder nor a Hub repo id (owner/name)."
        )
    return download(str(model_id), [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME], hub_kwargs)


def _split_hub_kwargs(hub_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``subfolder`` (a folder inside the repo or local folder, as in peft's
    ``from_pretrained``) and the arguments for ``snapshot_download``. Any other name is
    refused here: ``snapshot_download`` would raise a bare ``TypeError``."""
    from huggingface_hub import snapshot_download

    kwargs = dict(hub_kwargs)
    subfolder = kwargs.pop("subfolder", None) or ""
    if (
        not isinstance(subfolder, str)
        or Path(subfolder).is_absolute()
        or ".." in Path(subfolder).parts
    ):
        raise ConfigError(
            f"subfolder={subfolder!r} must be a relative folder inside the repo or folder, "
            "e.g. subfolder='five-task'."
        )
    accepted = set(inspect.signature(snapshot_download).parameters) - {
        "repo_id", "allow_patterns", "ignore_patterns"
    }  # fmt: skip
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(
            f"Unknown Hub argument(s) {unknown}: loading takes subfolder= and "
            f"huggingface_hub.snapshot_download's {sorted(accepted)}."
        )
    return subfolder.strip("/"), kwargs


def local_folder(path: Path, hub_kwargs: dict[str, Any]) -> Path:
    """``path`` (a local folder), or its ``subfolder``. Hub download arguments given with
    a local folder are ignored, with a warning: a folder of the repo id's name in the
    working directory is loaded before the Hub, and ``revision=`` would silently not
    apply."""
    subfolder, kwargs = _split_hub_kwargs(hub_kwargs)
    ignored = sorted(name for name, value in kwargs.items() if value is not None)
    if ignored:
        warnings.warn(
            f"{str(path)!r} is a local folder, which loads before any Hub repo of that name, "
            f"so the Hub arguments {ignored} are ignored. To load the Hub repo, run from a "
            "directory without that folder.",
            stacklevel=3,
        )
    folder = path / subfolder
    if not folder.is_dir():
        raise CheckpointError(f"{path} has no folder {subfolder!r} (subfolder=).")
    return folder


def download(repo_id: str, files: list[str], hub_kwargs: dict[str, Any]) -> Path:
    """Fetch ``files`` of a Hub repo (or of its ``subfolder``) through the Hub cache
    (offline: from the cache only) and return their folder; errors say whether it was
    offline, the Hub refused or the repo lacks the subfolder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    subfolder, kwargs = _split_hub_kwargs(hub_kwargs)
    patterns = [f"{subfolder}/{name}" if subfolder else name for name in files]
    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=patterns, **kwargs))
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id!r} is not a local folder and is not in the Hub cache, and the Hub cannot "
            "be reached (offline?). Download it where there is network, or pass a local folder."
        ) from None
    except HfHubHTTPError as error:
        raise CheckpointError(f"Could not fetch {repo_id!r} from the Hub: {error}.") from None
    except ValueError as error:
        raise ConfigError(f"Invalid Hub repo id {repo_id!r}: {error}.") from None
    if subfolder and not (snapshot / subfolder / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"Hub repo {repo_id!r} has no adapter in its folder {subfolder!r} (subfolder=)."
        )
    return snapshot / subfolder
