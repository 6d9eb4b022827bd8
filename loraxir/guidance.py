"""Degradation-aware modulation (DAM): the router's embedding steers the backbone.

Stage 2 of LoRA-IR (``DESIGN.md`` §1): small blocks placed in front of chosen modules of a
restoration network compute ``x <- x + beta * (LayerNorm_C(x) * sigmoid(MLP(e_deg)))``
from the router's degradation embedding ``e_deg``. ``beta`` (one value per channel) starts
at zero, so inserting blocks leaves the network's output bit-identical until they train.

API summary (stable; ``recipes/pretrain.py`` builds on it)::

    import loraxir
    from loraxir.config import DAMConfig
    from loraxir.guidance import GuidedBackbone

    # Pre-training: backbone + DAM train, the router is frozen, no experts.
    guided = GuidedBackbone(loraxir.create_backbone("nafnet-small"), router)  # family points
    restored = guided(degraded)               # router once (no grad), then the backbone
    optimizer = torch.optim.AdamW(guided.trainable_parameters(), lr=2e-4)
    guided.save_pretrained("runs/pre")        # backbone.json, backbone.safetensors (native
                                              # keys, no DAM), dam.safetensors, router/
    guided = GuidedBackbone.from_pretrained("runs/pre")

    # Fine-tuning experts on top: the config names the DAM, so save/load re-insert it.
    config = loraxir.LoraIRConfig(
        degradations=router.degradations, dam=DAMConfig(embed_dim=router.embed_dim)
    )
    model = loraxir.get_loraxir_model(guided.backbone, config, router=guided.router)

    # Lower level: insert_dam(backbone, points, embed_dim, routing) -> inserted points;
    # dam_points(backbone, points) checks and resolves without changing anything;
    # save_dam(backbone, path) / load_dam(backbone, path, routing) for dam.safetensors.

``points`` is ``None`` (the backbone family's default, see ``loraxir.backbones``), a regex
(full match on dotted module paths) or a list of exact module paths. A block reads the
input of its module: images ``(B, C, H, W)``, tokens ``(B, L, C)``, or window-major tokens
``(B·n, L, C)`` (all windows of image 0 first, as SwinIR partitions them).

Where blocks live: all in one ``loraxir_dam`` module dict on the backbone (keys are the
points with ``.`` written ``-``), applied by forward pre-hooks on the named modules. So
the backbone's own module paths and state-dict keys do not change (a wrapper would
rename every weight below it, and the expert keys with them), DAM parameters carry the
``loraxir_`` prefix, and ``merge_and_unload`` returns the backbone with the blocks still
in it: a small module that keeps reading ``e_deg`` from the routing state (run the result
through :class:`GuidedBackbone` with the router to feed it).
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraxir.backbones import check_input, detect_preset, is_added_by_loraxir
from loraxir.config import DAMConfig
from loraxir.errors import (
    BackboneMismatchError,
    CheckpointError,
    ConfigError,
    RoutingError,
    TargetModulesError,
)
from loraxir.padding import run_padded
from loraxir.routing import RoutingState
from loraxir.validation import full_match

DAM_ATTRIBUTE = "loraxir_dam"
DAM_WEIGHTS = "dam.safetensors"
ROUTER_FOLDER = "router"
_METADATA_KEY = "loraxir_dam"
_CHANNEL_SOURCES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.LayerNorm, nn.GroupNorm)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_ITERATED = (nn.ModuleList, nn.ModuleDict)


class DAMBlock(nn.Module):
    """``x + beta * (LayerNorm_C(x) * sigmoid(MLP(e_deg)))`` for one insertion point.

    The layer norm has no affine parameters (``beta`` scales per channel); the MLP is
    ``Linear(embed_dim, C) -> GELU -> Linear(C, C)``. ``beta`` starts at zero: the block is
    then the identity, bit for bit.
    """

    def __init__(self, channels: int, embed_dim: int) -> None:
        super().__init__()
        self.channels, self.embed_dim = int(channels), int(embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(self.embed_dim, self.channels),
            nn.GELU(),
            nn.Linear(self.channels, self.channels),
        )
        self.beta = nn.Parameter(torch.zeros(self.channels))
        self.point = ""
        self.routing: RoutingState | None = None
        self._channels_last: bool | None = None  # the layout of the inputs seen so far

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Modulate ``x`` (``(N, C, H, W)`` or ``(N, ..., C)``) by ``embedding`` ``(B, D)``,
        where ``N`` is a multiple of ``B`` (``N / B`` consecutive rows per image)."""
        channel_dim = self._channel_dim(x)
        if embedding.dim() != 2 or embedding.shape[-1] != self.embed_dim:
            raise RoutingError(
                f"The DAM block at {self.point!r} reads embeddings of {self.embed_dim} "
                f"dimensions, one row per image, got shape {tuple(embedding.shape)}."
            )
        rows, batch = x.shape[0], embedding.shape[0]
        if rows == 0:  # an empty batch: nothing to modulate (and no embedding rows to spread)
            return x
        if rows % batch:
            raise ConfigError(
                f"The DAM block at {self.point!r} got an input of {rows} rows for {batch} "
                "degradation embeddings; the rows must be a whole number per image."
            )
        gate = torch.sigmoid(self.mlp(embedding.to(self.beta.dtype)))
        gate = gate.repeat_interleave(rows // batch, dim=0)
        normed = F.layer_norm(x.movedim(channel_dim, -1), (self.channels,))
        modulation = (self.beta * normed * gate.view(rows, *[1] * (x.dim() - 2), -1)).to(x.dtype)
        return x + modulation.movedim(-1, channel_dim)

    def extra_repr(self) -> str:
        return f"point={self.point!r}, channels={self.channels}, embed_dim={self.embed_dim}"

    def _channel_dim(self, x: torch.Tensor) -> int:
        """The channel axis of ``x``. A square map as wide as it has channels, ``(N, C, C, C)``,
        reads either way: it keeps the layout this block's earlier inputs had (channels
        first until one said otherwise), and an input in the other layout than those is
        refused, not normalised over the wrong axis. A compiled graph only reads the layout
        remembered (its shapes may be symbolic, and it records nothing)."""
        seen = self._channels_last
        if torch.compiler.is_compiling():
            if not seen and x.dim() == 4 and x.shape[1] == self.channels:
                return 1
            if x.dim() >= 2 and x.shape[-1] == self.channels:
                return x.dim() - 1
            raise self._shape_error(x)
        first = x.dim() == 4 and x.shape[1] == self.channels
        last = x.dim() >= 2 and x.shape[-1] == self.channels
        if first and last:
            return x.dim() - 1 if seen else 1
        if not (first or last):
            raise self._shape_error(x)
        if seen is not None and seen != last:
            raise ConfigError(
                f"The DAM block at {self.point!r} got channels {'last' if last else 'first'} "
                f"(shape {tuple(x.shape)}) after inputs with channels "
                f"{'last' if seen else 'first'}; a point's input must keep its layout."
            )
        self._channels_last = last
        return x.dim() - 1 if last else 1

    def _shape_error(self, x: torch.Tensor) -> ConfigError:
        return ConfigError(
            f"The DAM block at {self.point!r} has {self.channels} channels but its input has "
            f"shape {tuple(x.shape)}; expected (N, {self.channels}, H, W) or (N, ..., "
            f"{self.channels})."
        )


class _DAMHook:
    """Forward pre-hook running a block on the first input of its module.

    A plain object holding its block (not a closure), so ``copy.deepcopy`` and pickling of
    the backbone keep hook and block paired; hooks are re-run when activation
    checkpointing recomputes a segment, and the routing state keeps ``e_deg`` until the
    next call, so a recomputation modulates exactly as the forward did.
    """

    def __init__(self, block: DAMBlock) -> None:
        self.block = block

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not self.block.routing.adapters_enabled:
            return None  # peft's disable_adapter(): the bare backbone
        if not args:
            raise ConfigError(
                f"The module at DAM point {self.block.point!r} was called without a positional "
                "input; choose a module whose first argument is the feature map."
            )
        embedding = self.block.routing.require_embedding()
        return (self.block(args[0], embedding), *args[1:])


def dam_points(
    backbone: nn.Module, points: str | list[str] | dict[str, int] | None = None
) -> list[str]:
    """Resolve ``points`` on ``backbone`` to module paths, checking each; changes nothing.

    Raises :class:`TargetModulesError` for a point that names no module (with the closest
    names), the backbone itself, a container backbone, a module whose channel count cannot
    be read, or a point that already has a block.
    """
    return list(_plan(backbone, points))


def insert_dam(
    backbone: nn.Module,
    points: str | list[str] | dict[str, int] | None,
    embed_dim: int,
    routing: RoutingState,
) -> list[str]:
    """Put a zero-initialised :class:`DAMBlock` in front of each point; return the points.

    Every point is checked (see :func:`dam_points`) before the backbone is touched. The
    blocks read ``e_deg`` from ``routing.embedding`` and inherit the backbone's device and
    dtype.
    """
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        raise ConfigError(f"embed_dim must be an integer >= 1, got {embed_dim!r}.")
    if not isinstance(routing, RoutingState):
        raise ConfigError(
            f"routing must be the RoutingState the blocks read e_deg from, got "
            f"{type(routing).__name__}."
        )
    plan = _plan(backbone, points)
    reference = next(backbone.parameters(), None)
    container = getattr(backbone, DAM_ATTRIBUTE, None)
    widths = {block.embed_dim for block in (container or {}).values()}
    if widths - {embed_dim}:  # one embedding drives every block of a backbone
        raise ConfigError(
            f"The backbone's DAM blocks read embeddings of {sorted(widths)} dimensions, not "
            f"{embed_dim}: every block reads the same router embedding."
        )
    if container is None:
        container = nn.ModuleDict()
        setattr(backbone, DAM_ATTRIBUTE, container)
    for point, channels in plan.items():
        block = DAMBlock(channels, embed_dim)
        if reference is not None:
            block.to(device=reference.device, dtype=reference.dtype)
        block.point, block.routing = point, routing
        container[_key(point)] = block
        backbone.get_submodule(point).register_forward_pre_hook(_DAMHook(block))
    return list(plan)


def remove_dam(backbone: nn.Module) -> None:
    """Take every DAM block and its hook out of ``backbone``, which then computes exactly as
    before :func:`insert_dam` (used to undo an injection that failed part-way)."""
    for module in backbone.modules():
        for key in _dam_hook_keys(module):
            del module._forward_pre_hooks[key]
    if hasattr(backbone, DAM_ATTRIBUTE):
        delattr(backbone, DAM_ATTRIBUTE)


def runs_dam_block(module: nn.Module) -> bool:
    """Whether a DAM block runs as a forward pre-hook of ``module`` (a DAM point)."""
    return bool(_dam_hook_keys(module))


def _dam_hook_keys(module: nn.Module) -> list[int]:
    return [key for key, hook in module._forward_pre_hooks.items() if isinstance(hook, _DAMHook)]


def dam_config(backbone: nn.Module) -> DAMConfig | None:
    """The :class:`DAMConfig` describing the blocks on ``backbone``, or ``None``."""
    blocks = _blocks(backbone)
    if not blocks:
        return None
    widths = _widths(backbone)
    try:
        inferred = _resolve_points(backbone, list(widths))
    except TargetModulesError:
        inferred = None
    # Name the widths only where they cannot be read from the backbone, so that a
    # description loaded onto a network of another width is refused, not trusted.
    points = list(widths) if inferred == widths else widths
    return DAMConfig(points=points, embed_dim=next(iter(blocks.values())).embed_dim)


def bind_routing(backbone: nn.Module, routing: RoutingState) -> None:
    """Make every DAM block of ``backbone`` read ``e_deg`` from ``routing``."""
    for block in _blocks(backbone).values():
        block.routing = routing


def apply_dam_config(
    backbone: nn.Module, config: DAMConfig | None, routing: RoutingState
) -> list[str]:
    """Give ``backbone`` the DAM blocks ``config`` describes, reading ``routing``.

    Blocks already there (from pre-training) are kept with their weights when they match
    the config; a mismatch, or blocks the config does not mention, raise
    :class:`ConfigError` before anything changes.
    """
    existing = dam_config(backbone)
    if config is None:
        if existing is not None:
            raise ConfigError(
                f"The backbone carries DAM blocks at {existing.points} (embed_dim "
                f"{existing.embed_dim}) but the config has dam=None, so a saved adapter would "
                f"lose them. Pass dam=DAMConfig(points={existing.points}, "
                f"embed_dim={existing.embed_dim})."
            )
        return []
    if existing is None:
        return insert_dam(backbone, config.points, config.embed_dim, routing)
    wanted = _resolve_points(backbone, config.points)
    widths = _widths(backbone)
    if wanted != widths or config.embed_dim != existing.embed_dim:
        raise ConfigError(
            f"The backbone carries DAM blocks at {widths} (embed_dim "
            f"{existing.embed_dim}); the config asks for {wanted} (embed_dim "
            f"{config.embed_dim}). Make config.dam match the blocks, or start from a backbone "
            "without them."
        )
    bind_routing(backbone, routing)
    return list(wanted)


def dam_state_dict(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The DAM tensors of ``backbone`` under their state-dict keys (``loraxir_dam.*``)."""
    container = getattr(backbone, DAM_ATTRIBUTE, None)
    if container is None:
        return {}
    return {f"{DAM_ATTRIBUTE}.{k}": v.detach() for k, v in container.state_dict().items()}


def is_dam_key(key: str) -> bool:
    """Does a state-dict key (of a backbone, a LoraIRModel or a PeftModel) belong to DAM?"""
    return key.startswith(f"{DAM_ATTRIBUTE}.") or f".{DAM_ATTRIBUTE}." in key


def split_dam_tensors(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split saved tensors into (DAM tensors keyed relative to the backbone, the rest)."""
    dam, rest = {}, {}
    for key, value in tensors.items():
        if is_dam_key(key):
            dam[DAM_ATTRIBUTE + key.split(DAM_ATTRIBUTE, 1)[1]] = value
        else:
            rest[key] = value
    return dam, rest


def check_dam_tensors(
    backbone: nn.Module, config: DAMConfig | None, tensors: dict[str, torch.Tensor]
) -> None:
    """Raise :class:`CheckpointError` unless ``tensors`` are exactly the DAM tensors that
    ``config`` would create on ``backbone`` (checked before the backbone is touched)."""
    if config is None:
        if tensors:
            raise CheckpointError(
                f"The checkpoint holds DAM tensors (e.g. {next(iter(tensors))!r}) but its "
                "config has dam=None; it was written by another tool or edited by hand."
            )
        return
    expected = {}
    for point, channels in _resolve_points(backbone, config.points).items():
        shapes = DAMBlock(channels, config.embed_dim).state_dict()
        for name, value in shapes.items():
            expected[f"{DAM_ATTRIBUTE}.{_key(point)}.{name}"] = tuple(value.shape)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        unexpected = sorted(set(got) - set(expected))
        raise BackboneMismatchError(
            f"The DAM tensors do not fit this backbone: missing {missing[:3]}, of another "
            f"shape {[(k, got[k], expected[k]) for k in wrong[:3]]}, unexpected "
            f"{unexpected[:3]}. They were saved for another backbone, width or DAM points."
        )


def load_dam_state_dict(backbone: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy DAM tensors (keys as :func:`dam_state_dict` writes them) into the blocks."""
    container = getattr(backbone, DAM_ATTRIBUTE)
    prefix = f"{DAM_ATTRIBUTE}."
    container.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items()})


def save_dam(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Write the DAM blocks of ``backbone`` to one safetensors file that describes itself
    (points and ``embed_dim`` in its metadata)."""
    from safetensors.torch import save_file

    config = dam_config(backbone)
    if config is None:
        raise ConfigError("This backbone has no DAM blocks to save; insert them with insert_dam.")
    tensors = {k: v.to("cpu").contiguous() for k, v in dam_state_dict(backbone).items()}
    # One metadata entry: safetensors writes several in a per-process order, and the
    # same blocks must give the same bytes (files compared by hash).
    save_file(tensors, str(path), metadata={_METADATA_KEY: json.dumps(config.to_dict())})


def load_dam(
    backbone: nn.Module, path: str | os.PathLike, routing: RoutingState | None = None
) -> list[str]:
    """Insert the DAM blocks described in ``path`` (unless ``backbone`` has them already)
    and load their weights; everything is checked before the backbone is touched.

    ``routing`` is the state the blocks read (when ``None``: the state blocks already on
    ``backbone`` read, else a fresh one). Returns the points.
    """
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            described = (handle.metadata() or {}).get(_METADATA_KEY)
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"Could not read DAM weights {path}: {error}") from None
    if described is None:
        raise CheckpointError(
            f"{path} does not describe DAM blocks (no {_METADATA_KEY!r} metadata); write it "
            "with loraxir.guidance.save_dam."
        )
    config = DAMConfig.from_dict(json.loads(described))
    check_dam_tensors(backbone, config, tensors)
    # Blocks already there keep the state they read (a GuidedBackbone's or a model's):
    # binding them to a fresh one would leave them without an embedding.
    present = next((m.routing for m in backbone.modules() if isinstance(m, DAMBlock)), None)
    points = apply_dam_config(backbone, config, routing or present or RoutingState())
    load_dam_state_dict(backbone, tensors)
    return points


class GuidedBackbone(nn.Module):
    """A backbone steered by DAM blocks and a frozen router, without experts (pre-training).

    Each call runs the router once (without gradients) on the input, writes ``e_deg`` into
    the routing state the blocks read, then runs the backbone. The router stays frozen and
    in eval mode; the backbone and its DAM blocks train (see :meth:`trainable_parameters`).

    Args:
        backbone: the restoration network; DAM blocks are inserted unless it has them.
        router: anything with ``route(x) -> RouterOutput`` and ``embed_dim``
            (:class:`loraxir.router.DegradationRouter`).
        points: where blocks go when inserted (``None``: the family's default points).
    """

    def __init__(
        self,
        backbone: nn.Module,
        router: nn.Module,
        points: str | list[str] | dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        if not (hasattr(router, "route") and isinstance(getattr(router, "embed_dim", None), int)):
            raise ConfigError(
                f"GuidedBackbone needs a router (route(x) and embed_dim, as a "
                f"DegradationRouter has), got {type(router).__name__}."
            )
        self.routing = RoutingState()
        embed_dim = router.embed_dim
        existing = dam_config(backbone)
        if existing is None:
            insert_dam(backbone, points, embed_dim, self.routing)
        else:
            apply_dam_config(
                backbone,
                DAMConfig(points=points or existing.points, embed_dim=embed_dim),
                self.routing,
            )
        self.backbone = backbone
        self.router = router
        for param in router.parameters():
            param.requires_grad = False
        router.eval()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        check_input(self.backbone, x)
        with self.routing.turn(True):  # the embedding lives in the shared routing state
            with torch.no_grad():
                embedding = self.router.route(x).embedding
            with self.routing.activate(None, embedding):  # any size, as LoraIRModel runs it
                return run_padded(self.backbone, x, None, *args, **kwargs)

    def train(self, mode: bool = True) -> GuidedBackbone:
        super().train(mode)
        self.router.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters that train: the backbone's and its DAM blocks' (not the router's)."""
        return (p for p in self.backbone.parameters() if p.requires_grad)

    @property
    def dam(self) -> DAMConfig:
        """Where the blocks are and the embedding size that drives them."""
        return dam_config(self.backbone)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``backbone.json`` + ``backbone.safetensors`` (native keys, no DAM),
        ``dam.safetensors`` and ``router/``, atomically (a crash keeps the old folder)."""
        from loraxir.backbones import write_backbone_files
        from loraxir.checkpoint import staged_folder

        with staged_folder(directory) as staging:
            write_backbone_files(self.backbone, staging)
            save_dam(self.backbone, staging / DAM_WEIGHTS)
            self.router.save_pretrained(staging / ROUTER_FOLDER)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, router: nn.Module | None = None
    ) -> GuidedBackbone:
        """Rebuild what :meth:`save_pretrained` wrote (``router`` overrides ``router/``)."""
        from loraxir.backbones import load_backbone

        folder = Path(directory)
        backbone = load_backbone(folder)
        if router is None:
            from loraxir.router import DegradationRouter

            router = DegradationRouter.from_pretrained(folder / ROUTER_FOLDER)
        load_dam(backbone, folder / DAM_WEIGHTS)
        return cls(backbone, router)


def _blocks(backbone: nn.Module) -> dict[str, DAMBlock]:
    """``{point: block}`` in insertion order."""
    container = getattr(backbone, DAM_ATTRIBUTE, None)
    return {} if container is None else {block.point: block for block in container.values()}


def _widths(backbone: nn.Module) -> dict[str, int]:
    return {point: block.channels for point, block in _blocks(backbone).items()}


def _plan(backbone: nn.Module, points: str | list[str] | dict[str, int] | None) -> dict[str, int]:
    """:func:`_resolve_points`, refusing points that already have a block."""
    plan = _resolve_points(backbone, points)
    existing = _blocks(backbone)
    for point in plan:
        if point in existing:
            raise TargetModulesError(f"Module {point!r} already has a DAM block in front of it.")
    return plan


def _resolve_points(
    backbone: nn.Module, points: str | list[str] | dict[str, int] | None
) -> dict[str, int]:
    """``{point: channels}`` in module order, every point checked; changes nothing."""
    if isinstance(backbone, _CONTAINERS):
        raise TargetModulesError(
            f"DAM blocks cannot live on a bare {type(backbone).__name__} (its forward would "
            "call them as layers); wrap it in an nn.Module subclass first."
        )
    paths = [p for p, _ in backbone.named_modules() if p and not is_added_by_loraxir(p)]
    preset = detect_preset(backbone)
    if points is None:
        if preset is None or preset.dam_points is None:
            raise TargetModulesError(
                f"No DAM points given and no backbone family names defaults for a "
                f"{type(backbone).__name__}. Pass points=[module paths] (or a regex), e.g. "
                f"{paths[:5]}."
            )
        points = preset.dam_points
    # A ModuleList or ModuleDict is iterated by its owner, never called: a block in front
    # of one would never run. A regex passes over them; a name is refused.
    iterated = {p for p in paths if isinstance(backbone.get_submodule(p), _ITERATED)}
    if isinstance(points, str):
        chosen = [p for p in paths if full_match(points, p) and p not in iterated]
        wanted = [] if chosen else [points]
    else:
        chosen = [p for p in paths if p in points]
        wanted = [p for p in points if p not in paths]
    listed = [p for p in chosen if p in iterated]
    if listed:
        raise TargetModulesError(
            f"DAM points {listed} are module lists their backbone iterates and never calls, "
            "so a block in front of them would never run. Name their members instead "
            f"(e.g. {listed[0]!r}.0)."
        )
    if wanted:
        close = sorted(
            {c for w in wanted for c in difflib.get_close_matches(w, paths, n=5, cutoff=0.3)}
        )
        raise TargetModulesError(
            f"DAM points {wanted!r} name no module of the {type(backbone).__name__}. Closest "
            f"module names: {close or paths[:10]}. A list names exact dotted paths; a string "
            "is a regex that must match the whole path."
        )
    keys: dict[str, str] = {}
    for point in chosen:
        key = _key(point)
        if key in keys:
            raise TargetModulesError(f"DAM points {keys[key]!r} and {point!r} collide; rename one.")
        keys[key] = point
    given = points if isinstance(points, dict) else {}
    source = preset.dam_channel_layer if preset is not None else None
    return {p: given.get(p) or _channels(backbone.get_submodule(p), p, source) for p in chosen}


def _channels(module: nn.Module, point: str, source: str | None) -> int:
    """The channel count entering ``module``: the input size of its first Conv2d, Linear or
    norm layer, or of the first one whose relative path matches the family's ``source``."""
    layers = [(path, m) for path, m in module.named_modules() if isinstance(m, _CHANNEL_SOURCES)]
    preferred = [m for path, m in layers if source and re.fullmatch(source, path)]
    for layer in preferred[:1] or [m for _, m in layers[:1]]:
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            return layer.in_channels
        if isinstance(layer, nn.Linear):
            return layer.in_features
        if isinstance(layer, nn.LayerNorm):
            return int(layer.normalized_shape[-1])
        return layer.num_channels
    raise TargetModulesError(
        f"Cannot tell how many channels enter DAM point {point!r} (a "
        f"{type(module).__name__} without a Conv2d, Linear or norm layer); give them: "
        f"points={{{point!r}: channels}}."
    )


def _key(point: str) -> str:
    return point.replace(".", "-")
