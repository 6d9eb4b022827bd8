"""``LoraIRModel``: a backbone with routed low-rank experts, and ``get_loraxir_model``.

The model is a peft ``BaseTuner``, so the same object serves our API and peft's
(``get_peft_model`` wraps it in a ``PeftModel``). Each call makes its gates live in the
shared :class:`~loraxir.routing.RoutingState` that every expert layer reads (from
``gates=``, from ``degradation=`` names, from gates pinned by :func:`route`, or from an
attached router, which runs once per call and also supplies the degradation embedding of
DAM blocks). The gate logic itself (names to gates, checks) lives in :mod:`loraxir.routing`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.constants import DUMMY_MODEL_CONFIG
from torch import nn

from loraxir import checkpoint, guidance
from loraxir.backbones import check_input, from_descriptor
from loraxir.compute import FORMS, RowGroups, check_form, group_rows
from loraxir.config import LoraIRConfig
from loraxir.errors import (
    BackboneMismatchError,
    CheckpointError,
    ConfigError,
    DataError,
    RoutingError,
    TargetModulesError,
    unknown_name,
)
from loraxir.inference.allocator import keeps_freed_cpu_memory
from loraxir.layers import LoraIRLayer, wrap_layer
from loraxir.padding import run_padded
from loraxir.routing import (
    Degradation,
    RoutingState,
    check_gates,
    check_merged_request,
    check_router,
    degradation_gates,
    fixed_gate,
)
from loraxir.targeting import check_wrappable, resolve_preset, resolve_targets

# Pixels per backbone call in CPU inference (model.inference_chunk_pixels). Measured on a
# 2-core CPU (NAFNet-w32, float32, the bare backbone): 4 images of 256² took 0.63-0.73×
# the time of one call when run one at a time, 16 of 128² 0.58-0.69× four at a time. The
# cause is the system allocator, not the caches: a larger call maps more fresh pages for
# its activations and faults them in. Where freed memory is kept for reuse
# (loraxir.inference.allocator.keep_freed_cpu_memory) one call is faster (the chunks took
# 1.14-1.16× in a throwaway script; benchmarks/overhead.py --keep-freed-memory: 4 × 128² one
# at a time 1.54× one call), so the default is then no chunks. At 128² two per call against four was
# within noise (0.84-1.02×), so 2^16: four 128² images per call, one 192² or larger. A
# family preset can name its own (Preset.cpu_chunk_pixels: Restormer and SwinIR, one 128²
# image).
CPU_CHUNK_PIXELS = 1 << 16
_DEFAULT_CHUNKS = -1  # inference_chunk_pixels left as it is: decided per call


def family_chunk_pixels(
    backbone: nn.Module, preset: str | None = None, target_modules: Any = None
) -> int:
    """Pixels per backbone call that CPU inference of ``backbone`` runs by default under the
    system allocator: the ``cpu_chunk_pixels`` of its family preset (the one named by
    ``preset`` or by ``target_modules``, else the one detected, as for targeting), else
    :data:`CPU_CHUNK_PIXELS`."""
    chosen = resolve_preset(backbone, preset, target_modules)
    if chosen is None or chosen.cpu_chunk_pixels is None:
        return CPU_CHUNK_PIXELS
    return chosen.cpu_chunk_pixels


def images_per_call(height: int, width: int, pixels: int = CPU_CHUNK_PIXELS) -> int:
    """How many ``height × width`` images a CPU inference call of a :class:`LoraIRModel`
    passes to the backbone at once under a budget of ``pixels`` (at least one)."""
    return max(1, pixels // (height * width))


class LoraIRModel(BaseTuner):
    """A restoration backbone whose targeted layers carry routed low-rank experts.

    Build it with :func:`get_loraxir_model`. Call it as ``model(x, gates=g)`` with ``g`` of
    shape ``(B, E)``, ``model(x, degradation="rain")`` (or one name per image), or
    ``model(x)`` once a router is attached.
    """

    prefix = "loraxir_"
    tuner_layer_cls = LoraIRLayer
    target_module_mapping: dict[str, list[str]] = {}  # noqa: RUF012 (peft's class attribute)
    # Set once unload()/merge_and_unload() has handed the plain backbone back: the backbone
    # this model wraps has no experts left, so every routed use must be refused.
    _unloaded = False

    def __init__(
        self,
        model: nn.Module,
        peft_config: LoraIRConfig | dict[str, LoraIRConfig],
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
        router: nn.Module | None = None,
    ) -> None:
        # peft's low_cpu_mem_usage builds the tuner under accelerate's init_empty_weights,
        # which puts every new parameter on the meta device: a probe parameter tells.
        probe = nn.Module()
        probe.register_parameter("weight", nn.Parameter(torch.empty(0)))
        if low_cpu_mem_usage or probe.weight.is_meta:
            raise ConfigError(
                "low_cpu_mem_usage=True is not supported: loraxir builds its experts on the "
                "backbone's device and dtype (they are small); load without it."
            )
        self.routing = RoutingState()
        self._built = False
        self._pending_targets: set[str] = set()
        self._chunk_pixels: int | None = _DEFAULT_CHUNKS
        config = peft_config.get(adapter_name) if isinstance(peft_config, dict) else peft_config
        if isinstance(config, LoraIRConfig):
            if router is None and config.router is not None:
                # A saved config names its router (peft's from_pretrained arrives here):
                # rebuild it; its trained weights are loaded with the experts.
                router = _router_from_config(config.router)
            if router is not None:
                check_router(router, config)  # before injecting
        layers_before = {id(m) for m in model.modules() if isinstance(m, LoraIRLayer)}
        dam_before = [(m, m.routing) for m in model.modules() if isinstance(m, guidance.DAMBlock)]
        # A network already wrapped shares its peft_config dict with that model; peft writes
        # the new config into it before any check runs.
        configs_before = dict(getattr(model, "peft_config", {}))
        try:
            super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage, state_dict)
        except BaseException:
            _undo_injection(model, layers_before, dam_before)
            if isinstance(getattr(model, "peft_config", None), dict):
                model.peft_config.clear()
                model.peft_config.update(configs_before)
            raise
        # A peft load that fails after this injection undoes it too, and must put back DAM
        # blocks the network had before (pre-trained by a GuidedBackbone, say), not drop them.
        self.__dict__["_dam_before_injection"] = dam_before
        # The wrapped network's mode, not a new module's default (train): an eval network
        # stays in eval, so its inference calls take the inference paths.
        self.training = model.training
        self.last_routing: torch.Tensor | None = None
        self.loraxir_router: nn.Module | None = None
        if router is not None:
            self.attach_router(router)
        if self.config.tuned:
            self.set_compute_choice(self.config.tuned)
        self._apply_trainable_policy()
        self._built = True

    # ------------------------------------------------------------ peft hooks
    def _pre_injection_hook(
        self, model: nn.Module, config: LoraIRConfig, adapter_name: str
    ) -> None:
        if not isinstance(config, LoraIRConfig):
            raise ConfigError(f"LoraIRModel needs a LoraIRConfig, got {type(config).__name__}.")
        targets = resolve_targets(
            model, config.target_modules, config.exclude_modules, config.preset
        )
        guidance.apply_dam_config(model, config.dam, self.routing)
        check_wrappable(model, targets)  # again: a DAM point may be one of the targets
        self._pending_targets = set(targets)

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any
    ) -> None:
        """peft's injection; a second adapter (peft's ``add_adapter``/``load_adapter``) is
        checked first: it wraps the layers the first one wrapped, and a backbone holds one
        set of DAM blocks and one router, which a second adapter's would overwrite."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ConfigError(
                f"adapter_name must be a non-empty string without '.' (it names a module), "
                f"got {adapter_name!r}."
            )
        # peft's save_pretrained drops every key holding another adapter's name as a part
        # of its path: a name that is also a module's or a tensor's (weight, an expert's A,
        # B or chunk number, a router's head) would lose tensors of the saved adapters.
        router = getattr(self, "loraxir_router", None)
        taken = _tensor_name_parts(model, router) - (set(self.peft_config) - {adapter_name})
        if adapter_name in taken or adapter_name.isdigit():
            raise ConfigError(
                f"adapter_name {adapter_name!r} is also a part of the model's tensor names (a "
                "module or a tensor, e.g. weight, an expert's A, B or chunk number), which "
                "peft's save_pretrained would confuse with it; choose another name."
            )
        others = [name for name in self.peft_config if name != adapter_name]
        if others:
            second = self.peft_config[adapter_name]
            _check_second_adapter(self.peft_config[others[0]], second)
            why = "A second adapter wraps the layers the first one wrapped, so its targets must "
            try:
                wanted = resolve_targets(
                    model, second.target_modules, second.exclude_modules, second.preset, True
                )
            except TargetModulesError as error:
                raise ConfigError(f"{why}be those layers: {error}") from None
            wrapped = [path for path, m in model.named_modules() if isinstance(m, LoraIRLayer)]
            if wanted != wrapped:
                differ = sorted(set(wanted) ^ set(wrapped))[:3]
                raise ConfigError(
                    f"{why}be those layers: it names {len(wanted)} layers (e.g. {differ} "
                    f"differ) where the first wrapped {len(wrapped)}."
                )
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        self._awaiting().add(adapter_name)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """peft's, then the newly active adapter's ``trainable`` policy (peft makes every
        expert of it trainable, ``new_experts`` or not, and leaves the base as it was).

        Checked first, so that a refused switch leaves the model as it was: one known name
        (experts of two adapters are not mixed), and inside a ``loraxir.route`` block an
        adapter of the same classes (the pinned gates are columns of the active one's)."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            if name not in self.peft_config:
                raise unknown_name("adapter", name, list(self.peft_config))
        if len(names) > 1:  # none: peft's own call when the last adapter is deleted
            raise RoutingError(
                f"Exactly one adapter can be active, got {names}: each routes its own "
                "classes. Call set_adapter(name) with one of them."
            )
        pinned = self._built and self.routing.pinned and names and self.active_adapters
        if pinned and self.peft_config[names[0]].degradations != self.config.degradations:
            raise RoutingError(
                "A loraxir.route block is open, and its gates are columns of the active "
                f"adapter's classes {self.config.degradations}, not {names[0]!r}'s "
                f"{self.peft_config[names[0]].degradations}. End the block before set_adapter."
            )
        with self.routing.lock:  # a call running in another thread keeps its adapter
            super().set_adapter(adapter_name, inference_mode)
            if names:
                self._follow_active_compute()
            if not inference_mode and self._built:  # peft's __init__ calls it before the router
                self._apply_trainable_policy()

    def delete_adapter(self, adapter_name: str) -> None:
        """peft's, then the ``trainable`` policy of the adapter it makes active."""
        super().delete_adapter(adapter_name)
        if self.active_adapters:
            self._follow_active_compute()
            self._apply_trainable_policy()

    def _follow_active_compute(self) -> None:
        """Each expert layer runs the active adapter's ``compute`` and tuned choice: both
        belong to an adapter (its config saves them), while a layer keeps one of each, set
        when the first adapter wrapped it."""
        config = self.config
        for _, layer in self.expert_layers():
            layer.compute = config.compute
            layer.tuned = dict(config.tuned or {})

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Nothing: peft upcasts half-precision adapter weights to float32 here, but every
        compute form works in the base weight's dtype (experts are created in it), so an
        upcast bank on a bf16 network failed in torch at its first call."""

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        """peft's ``disable_adapter()`` runs the bare backbone: merged experts are taken out
        (as peft's LoRA does) and DAM blocks pass their input through."""
        with self.routing.lock:  # a call running in another thread keeps its experts
            if not enabled and self.merged:
                self.unmerge()
            super()._enable_adapter_layers(enabled)
            self.routing.adapters_enabled = enabled

    def unmerge_adapter(self) -> None:
        """peft's name for :meth:`unmerge` (which also forgets the merged gate)."""
        self.unmerge()

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Refused: routed experts have no weighted sum with another adapter's."""
        raise ConfigError(
            "add_weighted_adapter is not supported for loraxir adapters: each holds one "
            "expert per degradation, mixed per image by its router. Merge several into the "
            "base for one gate instead (merge(degradation=..., adapter_names=[...]))."
        )

    @staticmethod
    def get_model_config(model: nn.Module) -> dict:
        """peft's reading of ``model.config``, or none when it is not a config: restoration
        networks use that name for their own settings (SCUNet's is a list of block counts),
        and peft would call ``.get`` on it when merging."""
        config = BaseTuner.get_model_config(model)
        return config if isinstance(config, dict) else dict(DUMMY_MODEL_CONFIG)

    def _prepare_adapter_config(
        self, peft_config: LoraIRConfig, model_config: dict
    ) -> LoraIRConfig:
        # Targets (excludes included) are resolved by _pre_injection_hook; hide the excludes
        # from peft so that it does not warn that its own matcher excluded nothing.
        prepared = copy.copy(peft_config)
        prepared.exclude_modules = None
        return prepared

    def _check_target_module_exists(self, peft_config: LoraIRConfig, key: str) -> bool:
        return key in self._pending_targets

    def _create_and_replace(
        self,
        peft_config: LoraIRConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **_: Any,
    ) -> None:
        options = {
            "r": peft_config.r,
            "lora_alpha": peft_config.lora_alpha,
            "chunks": list(peft_config.expert_chunks),
            "dropout": peft_config.lora_dropout,
            "init": peft_config.init,
            "experts_per_image": peft_config.top_k,
        }
        if isinstance(target, LoraIRLayer):
            target.update_layer(adapter_name, **options)
            target.train(target.training)  # the new bank follows the layer's mode
            return
        layer = wrap_layer(target, self.routing)
        layer.compute = peft_config.compute
        layer.update_layer(adapter_name, **options)
        layer.train(target.training)  # the network's mode, not a new module's (train)
        self._replace_module(parent, target_name, layer, target)

    @classmethod
    def _get_adapter_state_dict(
        cls, model, config, adapter_name, state_dict, unwanted_adapter_names
    ):
        """peft's selection of what to save, plus the DAM blocks (they live on the backbone,
        not on a tuner layer), minus a frozen pretrained router tower (referenced by name in
        the config, never copied) and minus the router for an adapter of other classes."""
        selected = super()._get_adapter_state_dict(
            model, config, adapter_name, state_dict, unwanted_adapter_names
        )
        selected.update({k: v for k, v in state_dict.items() if guidance.is_dam_key(k)})
        tuner = getattr(model, "base_model", model)
        router = _owned_router(tuner, adapter_name, config)
        _record_router(config, router)  # peft writes this (live) config next
        saved = set(router.adapter_state_dict()) if router is not None else set()
        marker = "loraxir_router."
        return {
            key: value
            for key, value in selected.items()
            if marker not in key or key.split(marker, 1)[1] in saved
        }

    def _awaiting(self) -> set[str]:
        """Adapters injected whose weights have not been loaded or used yet: a load that
        fails for one of them takes it out again (see ``_remap_adapter_state_dict_for_load``).
        Made on first use, so a model unpickled from before it was tracked has it too."""
        return self.__dict__.setdefault("_awaiting_weights", set())

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, Any]
    ) -> dict[str, Any]:
        """peft's key mapping for ``load_adapter``, then the check loraxir's own loader makes:
        peft loads with ``strict=False``, which would take a missing DAM or router tensor, or
        DAM tensors of a config without DAM, in silence, and another rank deep in torch. On
        a mismatch :class:`~loraxir.errors.BackboneMismatchError` names the tensors, and an
        adapter injected for this load (not yet used) is taken out again (the backbone
        unwrapped when it was the only one)."""
        remapped = super()._remap_adapter_state_dict_for_load(
            model, config, adapter_name, state_dict
        )
        tuner = getattr(model, "base_model", model)
        if not isinstance(tuner, LoraIRModel):  # layers injected without a tuner
            return remapped
        awaiting = tuner._awaiting()
        fresh = adapter_name in awaiting
        awaiting.discard(adapter_name)
        try:
            _check_loaded_keys(tuner, adapter_name, model.state_dict(), remapped)
        except checkpoint.CheckpointError:
            if fresh and list(tuner.peft_config) == [adapter_name]:
                _undo_injection(tuner.model, set(), tuner.__dict__.get("_dam_before_injection", []))
                tuner.model.__dict__.pop("peft_config", None)  # peft's mark on the backbone
                tuner._unloaded = True
            elif fresh:
                tuner.delete_adapter(adapter_name)
            raise
        return remapped

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Saved key for a model key: expert chunks sit one level deeper than peft assumes
        (``loraxir_experts.<adapter>.A.<chunk>``), so drop the adapter name there."""
        marker = f".loraxir_experts.{adapter_name}."
        if marker in key:
            return key.replace(marker, ".loraxir_experts.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Route a call made through peft's ``PeftModel.forward`` (which bypasses ours)."""
        if "gates" in kwargs or "degradation" in kwargs:
            raise RoutingError(
                "peft's PeftModel passes keyword arguments on to the backbone. Route with "
                "`with loraxir.route(peft_model, gates=...)` or call "
                "peft_model.base_model(x, gates=...)."
            )
        images = args[0] if args else next(iter(kwargs.values()))
        with self.routing.turn(False):
            with self.routing.activate(*self._routing_for(images, None, None)):
                yield

    # ---------------------------------------------------------------- access
    @property
    def config(self) -> LoraIRConfig:  # type: ignore[override]
        """The active adapter's configuration."""
        return self.peft_config[self._active_name()]

    @property
    def degradations(self) -> list[str]:
        return list(self.config.degradations)

    @property
    def inference_chunk_pixels(self) -> int | None:
        """Largest number of pixels (batch × height × width) per backbone call in CPU
        inference; a larger batch runs a few images at a time, at least one. ``None`` runs
        every batch in one call. Default :func:`family_chunk_pixels` (2^16, or what the
        backbone's family preset names: one 128² image for Restormer and SwinIR), or
        ``None`` once :func:`~loraxir.inference.allocator.keep_freed_cpu_memory` has taken
        effect in this process. Not applied on GPUs, in training, under autograd or
        ``torch.compile``, or inside ``loraxir.route``. Outputs are the same as one call's
        up to float rounding."""
        if self._chunk_pixels == _DEFAULT_CHUNKS:
            if keeps_freed_cpu_memory():
                return None
            config = self.config
            return family_chunk_pixels(self.model, config.preset, config.target_modules)
        return self._chunk_pixels

    @inference_chunk_pixels.setter
    def inference_chunk_pixels(self, pixels: int | None) -> None:
        valid = isinstance(pixels, int) and not isinstance(pixels, bool) and pixels >= 1
        if pixels is not None and not valid:
            raise ConfigError(
                f"inference_chunk_pixels must be a positive int or None, got {pixels!r}."
            )
        self._chunk_pixels = pixels

    @property
    def cache_folds(self) -> bool:
        """Whether inference calls keep, in each expert layer, the weight folded for each
        expert (top-1 routing, forced degradations) to reuse in later calls (default
        ``True``). Routed top-1 inference then costs about what the bare backbone costs run
        once per expert group; the price is up to one copy of each targeted weight per
        expert in use. Set ``False`` to fold at every call and free the kept weights."""
        return self.routing.cache_folds

    @cache_folds.setter
    def cache_folds(self, enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise ConfigError(f"cache_folds must be True or False, got {enabled!r}.")
        self.routing.cache_folds = enabled
        if not enabled:
            for _, layer in self.expert_layers():
                layer.drop_kept_folds()

    @property
    def merged(self) -> bool:
        return any(layer.merged for _, layer in self.expert_layers())

    def expert_layers(self) -> Iterator[tuple[str, LoraIRLayer]]:
        """``(path, layer)`` for every expert layer, paths relative to the backbone."""
        for path, module in self.model.named_modules():
            if isinstance(module, LoraIRLayer):
                yield path, module

    def _merged_now(self) -> bool:
        """:attr:`merged` from the count the layers keep in the routing state: a call must
        not walk the backbone's modules (about 1.4 ms for NAFNet-w32, 1 % of a 128² call).
        The count covers exactly this model's layers: they are the ones sharing its routing
        state, and unloading recounts (:meth:`_unload_and_optionally_merge`)."""
        return self.routing.merged_layers > 0

    def _base_trains(self) -> bool:
        """Whether the targeted base weights take gradients (``trainable="all"``, unless the
        caller froze them)."""
        return next(layer for _, layer in self.expert_layers()).base_layer.weight.requires_grad

    def _check_not_unloaded(self) -> None:
        if self._unloaded:
            raise RoutingError(
                "This model was unloaded: merge_and_unload()/unload() returned its plain "
                "backbone, which no longer has experts. Use the returned network, or load the "
                "adapter again (loraxir.load_adapter or LoraIRModel.from_pretrained); to keep "
                "this model, merge a copy: copy.deepcopy(model).merge_and_unload(...)."
            )

    def _active_name(self) -> str:
        self._check_not_unloaded()
        if not self.active_adapters:
            raise RoutingError(
                "No adapter is active: the last one was deleted. Take the plain backbone with "
                "unload(), or attach new experts with get_loraxir_model."
            )
        if len(self.active_adapters) != 1:
            raise RoutingError(
                f"Exactly one adapter must be active, got {self.active_adapters}: "
                "choose one with set_adapter(name)."
            )
        return self.active_adapters[0]

    # --------------------------------------------------------------- routing
    def forward(
        self,
        x: torch.Tensor,
        *args: Any,
        gates: torch.Tensor | None = None,
        degradation: Degradation | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Restore ``x`` (B, C, H, W), routed by ``gates`` (B, E), by ``degradation`` name(s),
        by gates pinned with :func:`loraxir.route`, or by the attached router.

        A merged model serves calls that ask for the merged gate, passed or pinned (or give
        no routing), and refuses others. The gates live for this call only (see
        :mod:`loraxir.routing`).
        When the backbone declares a side unit (NAFNet's ``padder_size``, a Swin
        ``window_size``), sides that are not multiples of it (rounded up to a multiple of
        8, as tiled inference does) are reflect-padded for the backbone and cropped back
        (see :mod:`loraxir.padding`); the router sees ``x`` as given. Threads sharing one
        model take turns: a call holds the model's routing lock (see
        :class:`~loraxir.routing.RoutingState`).
        """
        check_input(self.model, x)
        _check_backbone_args(args)
        self._awaiting().clear()  # in use: a failed load no longer takes it out
        own = gates is not None or degradation is not None
        with self.routing.turn(own):  # threads sharing the model take turns (gates live there)
            if self.training and torch.is_grad_enabled() and self._merged_now():
                raise RoutingError(
                    "The model is merged: its experts are folded into the base weights and would "
                    "get no gradient. Call model.unmerge() before training, or model.eval() to "
                    "run the merged model."
                )
            if torch.is_grad_enabled() and self._merged_now() and self._base_trains():
                # Even in eval mode: a step would update the merged weights, and unmerge() then
                # restores the pre-merge copy, dropping the update without a word.
                raise RoutingError(
                    "The model is merged and trains its base weights (trainable='all'): an update "
                    "now would be lost at unmerge(). Call model.unmerge() before training, or run "
                    "the merged model under torch.no_grad()."
                )
            gates, embedding = self._routing_for(x, gates, degradation)
            groups = self._inference_groups(x, gates, args, kwargs)
            if groups is None:
                return self._run_in_chunks(x, gates, embedding, args, kwargs)
            outputs = []
            for members in groups.members:
                part = None if embedding is None else embedding[members]
                outputs.append(self._run_in_chunks(x[members], gates[members], part, (), {}))
            out = _concat(outputs)
            return out if groups.order is None else _rows(out, groups.order)

    def _run_in_chunks(
        self,
        x: torch.Tensor,
        gates: torch.Tensor | None,
        embedding: torch.Tensor | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """The backbone on ``x`` under this routing, a few images per call when
        :attr:`inference_chunk_pixels` says so (per-image gate and embedding rows follow
        their images; shared ones are kept)."""
        size = self._chunk_size(x, args, kwargs)
        if size >= x.shape[0]:
            with self.routing.activate(gates, embedding):
                return self._run_backbone(x, *args, **kwargs)
        outputs = []
        for start in range(0, x.shape[0], size):
            rows = slice(start, start + size)
            part_gates = _image_rows(gates, rows, x.shape[0])
            with self.routing.activate(part_gates, _image_rows(embedding, rows, x.shape[0])):
                outputs.append(self._run_backbone(x[rows]))
        return _concat(outputs)

    def _chunk_size(self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        """Images per backbone call: all of them unless this is a CPU inference call that
        :attr:`inference_chunk_pixels` splits (not in training, under autograd or
        ``torch.compile``, inside ``loraxir.route``, or with extra backbone arguments)."""
        if x.dim() != 4 or x.device.type != "cpu" or not self._splittable_call(args, kwargs):
            return x.shape[0]
        budget = self.inference_chunk_pixels
        return x.shape[0] if budget is None else images_per_call(*x.shape[-2:], budget)

    def _splittable_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether this call may run its batch in parts through the backbone: an inference
        call (not training, no autograd) outside ``loraxir.route`` (pinned gates stay
        whole) and ``torch.compile``, without extra backbone arguments (which may be
        per-batch)."""
        return not (
            args
            or kwargs
            or self.training
            or torch.is_grad_enabled()
            or self.routing.pinned
            or torch.compiler.is_compiling()
        )

    def _inference_groups(
        self,
        x: torch.Tensor,
        gates: torch.Tensor | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> RowGroups | None:
        """The images grouped by gate row when an inference call is better run one group
        at a time through the whole backbone, else ``None``.

        In inference the ``"weight"`` form runs every expert layer once per distinct gate
        row anyway (each group with its own folded weight). Running the backbone once per
        group instead keeps one group's activations in cache from layer to layer and saves
        a split and a concatenation in every layer. Not done for training, under
        ``torch.compile``, inside ``loraxir.route`` (pinned gates stay whole), with extra
        backbone arguments, when the config fixes or tunes inference to another form
        (those compute the whole batch in one call), when some row mixes experts (soft
        top-k: every image then has a row of its own, and the layers run the batch in one
        pass with each image's weight, faster than a pass per image), when most groups are
        one image (the same one pass: NAFNet-w32 at 128², 4 images routed to 4 experts,
        1.07× the bare backbone against 1.50× with a pass per group, 1.27× against 1.63×
        with freed memory kept; 8 images in 5 groups level; 16 images in 5 groups, 1.15×
        against 1.06×: a pass per group runs its images with one weight; paired, in one
        process, 2-core CPU, a throwaway script), or when a routed expert is still
        fresh (``B = 0``: the layers then run the base op on the whole batch, which gives
        the backbone's own output bit for bit; checked on the first expert layer, as
        experts are attached and trained in every layer together).
        """
        if (
            gates is None
            or gates.shape[0] < 2
            or gates.shape[0] != x.shape[0]
            or not self._splittable_call(args, kwargs)
            or self.config.compute not in ("auto", "weight")
            or (self.config.tuned or {}).get("inference", "auto") not in ("auto", "weight")
        ):
            return None
        groups = group_rows(gates)
        if len(groups.rows) < 2 or groups.mixed or 2 * len(groups.rows) > len(gates):
            return None
        _, layer = next(self.expert_layers())
        live = layer.live_experts(self._active_name())
        used = {e for row in groups.rows for e, c in enumerate(row) if c}
        return groups if all(live[e] for e in used) else None

    def _run_backbone(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        preset = resolve_preset(self.model, self.config.preset, self.config.target_modules)
        return run_padded(self.model, x, preset, *args, **kwargs)

    def _routing_for(
        self, x: torch.Tensor, gates: torch.Tensor | None, degradation: Degradation | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(gates, embedding)`` of one call; the router runs at most once, and only when
        its gates or its embedding (for DAM blocks) are needed.

        When the caller fixes the class (``gates=``, ``degradation=``, pinned gates without
        an embedding, or a merge) and the router has fitted class embeddings, DAM blocks get
        those gates' class embedding instead of the image's: a forced class then restores
        as that class, whatever the image looks like to the router."""
        requested = self._requested_gates(x, gates, degradation)
        pinned = self.routing.pinned and requested is None
        merged = self._merged_now()
        routed = not merged and self.routing.adapters_enabled  # kept by peft's disable_adapter
        needs_gates = routed and requested is None and not pinned
        needs_embedding = getattr(self.config, "dam", None) is not None and not (
            pinned and self.routing.embedding is not None
        )
        routed_gates = embedding = None
        if needs_embedding and not pinned:
            embedding = self._class_embedding(requested, merged)
            needs_embedding = embedding is None
        if self.loraxir_router is not None and (needs_gates or needs_embedding):
            routed_gates, routed_embedding = self._run_router(x)
            embedding = routed_embedding if embedding is None else embedding
        if pinned:
            gates = self._pinned_gates(x.shape[0])
            if self.routing.embedding is not None:
                rows = self.routing.embedding.shape[0]
                if rows not in (1, x.shape[0]):
                    raise RoutingError(
                        f"loraxir.route pinned an embedding for {rows} images, but this call "
                        f"has {x.shape[0]}; pin one row, or one per image."
                    )
                embedding = self.routing.embedding
        elif requested is not None:
            gates = requested
        elif routed_gates is not None:
            self._check_router_fits_active_adapter()
            gates = check_gates(routed_gates, self.config.num_experts, x.shape[0])
        elif needs_gates:
            raise RoutingError(
                "No routing for this call: pass gates= (B, E) or degradation= (one of "
                f"{self.config.degradations}), or attach a router with "
                "get_loraxir_model(backbone, config, router=...)."
            )
        if merged:
            if requested is not None or pinned:
                check_merged_request(gates, self.routing.merge_gate, self.config.degradations)
            gates = None
        if gates is not None:
            self.last_routing = gates.detach()
        return gates, embedding

    def _class_embedding(self, fixed: torch.Tensor | None, merged: bool) -> torch.Tensor | None:
        """The fitted class embedding of the gates the caller fixed (``fixed``, or the
        merge's gate), or ``None`` (nothing fixed, or a router without class embeddings)."""
        fitted = getattr(self.loraxir_router, "class_embedding", None)
        if fixed is None and merged:
            fixed = self.routing.merge_gate
        if fitted is None or fixed is None:
            return None
        return fitted(fixed)

    def _requested_gates(
        self, x: torch.Tensor, gates: torch.Tensor | None, degradation: Degradation | None
    ) -> torch.Tensor | None:
        if gates is not None and degradation is not None:
            raise RoutingError("Pass gates= or degradation=, not both.")
        if gates is not None:
            return check_gates(gates, self.config.num_experts, x.shape[0]).to(x.device)
        if degradation is not None:
            return self.degradation_gates(degradation, x.shape[0]).to(x.device)
        return None

    def _pinned_gates(self, batch_size: int) -> torch.Tensor:
        pinned = self.routing.gates
        if pinned.shape[0] not in (1, batch_size):
            raise RoutingError(
                f"loraxir.route pinned gates for {pinned.shape[0]} images, but this call has "
                f"{batch_size}; pin one name (or an (E,) gate) for batches of any size, or one "
                "row per image."
            )
        return pinned

    def _check_router_fits_active_adapter(self) -> None:
        """The router is the model's, attached for one adapter: after ``set_adapter`` to an
        adapter of other classes its gates cannot route it."""
        classes = getattr(self.loraxir_router, "degradations", None)
        if classes is not None and list(classes) != list(self.config.degradations):
            raise RoutingError(
                f"The attached router gives gates for {list(classes)}, but the active adapter "
                f"{self._active_name()!r} has the classes {self.config.degradations}. Attach a "
                "router of these classes (model.attach_router), or pass gates= / degradation=."
            )

    def _run_router(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(gates, embedding)`` from the attached router: ``route(x)`` when it has one
        (a :class:`~loraxir.router.DegradationRouter`), else ``router(x)`` as gates."""
        router = self.loraxir_router
        if x.shape[0] == 0:  # routers refuse an empty batch; an empty call routes nothing
            dam = getattr(self.config, "dam", None)
            embedding = None if dam is None else x.new_zeros(0, dam.embed_dim)
            return x.new_zeros(0, self.config.num_experts), embedding
        if hasattr(router, "route"):
            output = router.route(x)
            return output.gates, output.embedding
        return router(x), None

    def degradation_gates(
        self, degradation: Degradation, batch_size: int | None = None
    ) -> torch.Tensor:
        """One-hot gates ``(B, E)`` for a degradation name (one row, or ``batch_size``) or
        one name per image (one row each)."""
        return degradation_gates(degradation, self.config.degradations, batch_size)

    @contextlib.contextmanager
    def pinned_routing(
        self,
        gates: torch.Tensor | None = None,
        degradation: Degradation | None = None,
        batch_size: int | None = None,
        embedding: torch.Tensor | None = None,
    ) -> Iterator[torch.Tensor]:
        """Fix the gates (and optionally the DAM embedding) for every call inside the block
        (see :func:`loraxir.route`). Without ``embedding``, DAM blocks get the gates' class
        embedding when the router has fitted ones (else the router's, per call). The gates
        are the model's for the block: calls from any thread find them, and a block in
        another thread waits for this one to end."""
        if gates is not None and degradation is not None:
            raise RoutingError("loraxir.route takes gates= or degradation=, not both.")
        if gates is not None:
            rows = gates.shape[0] if isinstance(gates, torch.Tensor) and gates.dim() == 2 else 1
            pinned = check_gates(gates, self.config.num_experts, batch_size or rows)
        elif degradation is not None:
            pinned = degradation_gates(degradation, self.config.degradations, batch_size)
        else:
            raise RoutingError("loraxir.route needs gates= or degradation=.")
        with self.routing.pin_lock:  # one block at a time; calls inside run from any thread
            if self._merged_now():  # refused here: direct backbone calls in the block see no check
                check_merged_request(pinned, self.routing.merge_gate, self.config.degradations)
            device = next(self.model.parameters()).device
            dam = getattr(self.config, "dam", None)
            if embedding is not None:
                width = dam.embed_dim if dam is not None else None
                if (
                    not isinstance(embedding, torch.Tensor)
                    or embedding.dim() != 2
                    or (width is not None and embedding.shape[-1] != width)
                ):
                    got = (
                        tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else embedding
                    )
                    raise RoutingError(
                        f"embedding= must be a (1 or B, {width or 'D'}) tensor, one row per image, "
                        f"got {got}."
                    )
                embedding = embedding.to(device)
            elif dam is not None:
                embedding = self._class_embedding(pinned.to(device), merged=False)
            routing = self.routing
            # The state changes between calls (a call in flight keeps the routing it started
            # with); calls inside the block, from any thread, find the pinned gates, as code
            # that runs tiles on a thread pool needs.
            with routing.lock:
                previous = (routing.gates, routing.embedding, routing.pinned)
                routing.gates, routing.embedding, routing.pinned = (
                    pinned.to(device),
                    embedding,
                    True,
                )
                self.last_routing = routing.gates.detach()
            try:
                yield routing.gates
            finally:
                with routing.lock:
                    routing.gates, routing.embedding, routing.pinned = previous

    # ---------------------------------------------------------------- router
    def attach_router(self, router: nn.Module) -> None:
        """Attach a router (``router(x) -> gates (B, E)``) so that ``model(x)`` routes itself.

        Its class names and ``top_k`` must match the config (the expert order is the
        router's logit order).
        """
        check_router(router, self.config)
        clashing = sorted(set(self.peft_config) & _tensor_name_parts(nn.Module(), router))
        if clashing:
            raise ConfigError(
                f"The adapter name(s) {clashing} are also parts of the router's tensor names, "
                "which peft's save_pretrained would confuse with them; add the adapters under "
                "other names."
            )
        self.loraxir_router = router.to(next(self.model.parameters()).device)
        self._apply_trainable_policy()

    # -------------------------------------------------------------- training
    def _apply_trainable_policy(self) -> None:
        """Set ``requires_grad`` from ``config.trainable`` (see :class:`LoraIRConfig`); a
        config in peft's ``inference_mode`` (``PeftModel.from_pretrained`` without
        ``is_trainable``) freezes everything, as peft does for its own methods."""
        config = self.config
        if getattr(config, "inference_mode", False):
            for param in self.parameters():
                param.requires_grad = False
            return
        active = self._active_name()
        for name, param in self.model.named_parameters():
            if ".loraxir_experts." not in name:
                param.requires_grad = config.trainable == "all"
        for _, layer in self.expert_layers():
            for adapter, bank in layer.loraxir_experts.items():
                last = len(bank.A) - 1
                for index, (a, b) in enumerate(zip(bank.A, bank.B, strict=True)):
                    train = adapter == active and (
                        config.trainable != "new_experts" or index == last
                    )
                    a.requires_grad = b.requires_grad = train
        router = self.loraxir_router
        if router is not None:
            trainable = (
                set(router.adapter_state_dict())
                if config.trainable in ("experts+router", "all")
                else set()
            )
            for name, param in router.named_parameters():
                param.requires_grad = name in trainable

    def print_trainable_parameters(self) -> None:
        """Print trainable and total parameter counts (backbone, experts and router)."""
        trainable, total = self.count_parameters()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    def count_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts."""
        params = list({id(p): p for p in self.parameters()}.values())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def add_degradation(self, name: str, trainable: str = "new_experts") -> None:
        """Add one expert to every layer (and a class to the router) for a new degradation.

        New experts start with ``B = 0``, and computation skips experts whose gate is zero,
        so outputs for the old degradations stay bit-identical. ``trainable="new_experts"``
        (default) trains only the new expert.
        """
        config = self.config
        if not isinstance(name, str) or not name:
            raise ConfigError(f"A degradation name must be a non-empty string, got {name!r}.")
        if name.casefold() in (d.casefold() for d in config.degradations):
            raise ConfigError(
                f"Degradation {name!r} already exists (names are unique ignoring case): "
                f"{config.degradations}."
            )
        if self._merged_now():
            raise RoutingError(
                "The model is merged; call model.unmerge() before adding a degradation (the "
                "merged weights hold one gate over the old classes)."
            )
        # The router grows with the adapter it routes; another adapter's is left alone.
        router = _router_of(self.loraxir_router, config)
        if router is not None and not hasattr(router, "add_degradation"):
            raise ConfigError(
                f"The attached {type(router).__name__} cannot grow a class; detach it first."
            )
        updated = copy.deepcopy(config)
        updated.degradations.append(name)
        updated.num_experts += 1
        updated.expert_chunks.append(1)
        updated.trainable = trainable
        # A new expert starts at zero and is there to train, also on a model peft loaded
        # frozen (inference_mode), which would otherwise freeze it with the rest.
        updated.inference_mode = False
        updated._validate()
        active = self._active_name()
        for _, layer in self.expert_layers():
            layer.loraxir_experts[active].grow(1)
            layer.drop_kept_folds()
        if router is not None:
            router.add_degradation(name)
        self.peft_config[active] = updated
        self._apply_trainable_policy()

    def autotune(
        self,
        x: torch.Tensor,
        gates: torch.Tensor | None = None,
        degradation: Degradation | None = None,
        repeats: int = 3,
        training: bool = False,
    ) -> dict[str, float]:
        """Time whole model calls on ``x`` per candidate assignment of compute forms; keep
        the fastest in every layer's ``tuned`` for the phase.

        Candidates: the cost model's per-layer plan (``"auto"``) and each form of
        :data:`loraxir.compute.FORMS` on every layer. A call is a forward without gradients
        (phase ``"inference"``) or, with ``training=True``, a training-mode forward and
        backward (phase ``"training"``; with ``lora_dropout > 0`` only ``"activation"``
        applies). Candidates are timed in interleaved rounds (median of ``repeats``), so
        the choice is never slower than the best single form measured on the same input.
        Returns seconds per candidate. Training mode is restored and gradients cleared on
        every exit; on an error every layer's previous choice is restored.
        """
        if self.merged:
            raise RoutingError(
                "autotune times the expert compute forms, but the model is merged: every form "
                "would run the same merged weights. Call model.unmerge() first, or keep the "
                "merged model (it has no expert overhead to tune)."
            )
        check_input(self.model, x)
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ConfigError(f"repeats must be a whole number >= 1, got {repeats!r}.")
        phase = "training" if training else "inference"
        layers = [layer for _, layer in self.expert_layers()]
        dropout = training and any(
            layer.loraxir_dropout[self._active_name()] > 0 for layer in layers
        )
        candidates = ["activation"] if dropout else ["auto", *FORMS]
        previous = [dict(layer.tuned) for layer in layers]
        previous_config = copy.deepcopy(self.config.tuned)
        was_training = self.training
        inputs = x.detach().requires_grad_(training)

        def run() -> None:
            with torch.set_grad_enabled(training):
                out = self(inputs, gates=gates, degradation=degradation)
                if training:
                    out.float().mean().backward()

        timings: dict[str, list[float]] = {c: [] for c in candidates}
        try:
            self.train(training)
            for _ in range(max(repeats, 1) + 1):  # the first round warms up
                for candidate in candidates:
                    self.set_compute_choice({phase: candidate})
                    start = time.perf_counter()
                    run()
                    timings[candidate].append(time.perf_counter() - start)
            seconds = {c: statistics.median(t[1:]) for c, t in timings.items()}
            self.set_compute_choice({phase: min(seconds, key=seconds.__getitem__)})
        except BaseException:
            for layer, tuned in zip(layers, previous, strict=True):
                layer.tuned = tuned
            self.config.tuned = previous_config
            raise
        finally:
            self.train(was_training)
            for param in self.parameters():
                param.grad = None
        return seconds

    def compute_choice(self) -> dict[str, str]:
        """``{phase: form}`` set by :meth:`autotune` (``"auto"``: the cost model's plan), to
        keep beside a saved adapter and restore with :meth:`set_compute_choice`."""
        choices = [layer.tuned for _, layer in self.expert_layers()]
        phases = {phase for tuned in choices for phase in tuned}
        return {
            phase: next(iter({t.get(phase, "auto") for t in choices})) for phase in sorted(phases)
        }

    def set_compute_choice(self, choice: dict[str, str]) -> None:
        """Use ``form`` on every expert layer in each ``phase`` of ``choice``
        (``"inference"`` or ``"training"``; ``"auto"`` returns to the cost model's plan).

        The choice is also recorded in the active config's ``tuned`` field, so that both
        save paths (ours and peft's) keep it and a reload runs as tuned."""
        if not isinstance(choice, dict):
            raise ConfigError(
                f"A compute choice is a dict {{phase: form}}, e.g. {{'inference': 'weight'}}, "
                f"got {choice!r}."
            )
        for phase, form in choice.items():  # all checked before any layer changes
            if phase not in ("inference", "training"):
                raise ConfigError(
                    f"Unknown phase {phase!r} in a compute choice; expected 'inference' or "
                    "'training'."
                )
            check_form(form)
        tuned = dict(self.config.tuned or {})
        for phase, form in choice.items():
            for _, layer in self.expert_layers():
                if form == "auto":
                    layer.tuned.pop(phase, None)
                else:
                    layer.tuned[phase] = form
            if form == "auto":
                tuned.pop(phase, None)
            else:
                tuned[phase] = form
        self.config.tuned = tuned or None

    # ----------------------------------------------------------------- merge
    def merge(
        self,
        gates: torch.Tensor | None = None,
        degradation: str | None = None,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> None:
        """Fold the experts mixed by one fixed gate into the base weights (zero overhead).

        ``gates`` is ``(E,)``; ``degradation`` a name (one-hot). ``adapter_names`` merges
        several adapters (default: the active one), each with the same gate. With
        ``safe_merge`` every folded weight is checked to be finite; on any error the model
        is left as it was (unmerged, or merged for its earlier gate; unmerged if, with
        ``safe_merge``, that gate no longer folds finite weights). Afterwards ``model(x)``
        and ``model(x, degradation=<that name>)`` run the merged weights; other routing
        raises. Undo with :meth:`unmerge`.
        """
        if isinstance(adapter_names, str):
            raise ConfigError(
                f"adapter_names must be a list of adapter names, got the string "
                f"{adapter_names!r}; pass [{adapter_names!r}]."
            )
        gate = fixed_gate(gates, degradation, self.config.degradations)
        # The gate in the precision the weights fold it at: float64 for a float64 model
        # (exact), float32 otherwise, so that a float64 NumPy gate still serves as float32.
        wide = next(self.model.parameters()).dtype == torch.float64
        gate = gate.to(torch.float64 if wide else torch.float32)
        with self.routing.lock:  # a call running in another thread keeps its weights
            earlier = None
            if self.merged:
                layer = next(layer for _, layer in self.expert_layers() if layer.merged)
                earlier = (self.routing.merge_gate, list(layer.merged_adapters))
                self.unmerge()
            self.routing.merge_gate = gate
            merged: list[LoraIRLayer] = []
            try:
                for path, layer in self.expert_layers():
                    try:
                        layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                    except RoutingError as error:
                        raise RoutingError(f"Layer {path!r}: {error}") from None
                    merged.append(layer)
            except BaseException:
                for layer in merged:
                    layer.unmerge()
                self.routing.merge_gate = None
                if earlier is not None:
                    # Experts edited while merged may no longer fold finite: then stay unmerged.
                    with contextlib.suppress(RoutingError):
                        self.merge(earlier[0], adapter_names=earlier[1], safe_merge=safe_merge)
                raise

    def unmerge(self) -> None:
        """Restore the exact base weights saved by :meth:`merge`."""
        with self.routing.lock:  # a call running in another thread keeps its weights
            for _, layer in self.expert_layers():
                layer.unmerge()
            self.routing.merge_gate = None

    def merge_and_unload(
        self,
        gates: torch.Tensor | None = None,
        degradation: str | None = None,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """Merge for one fixed gate and return the plain backbone (no expert layers).

        Without ``gates``/``degradation`` an already merged model is unloaded (merged again
        for its gate when ``safe_merge`` or ``adapter_names`` ask for it).
        """
        if gates is None and degradation is None:
            if not self.merged:
                raise RoutingError(
                    "merge_and_unload needs a fixed gate: pass degradation='name' or gates=(E,)."
                )
            if safe_merge or adapter_names is not None:
                gates = self.routing.merge_gate
        if gates is not None or degradation is not None:
            self.merge(gates, degradation, safe_merge, adapter_names)
        return super().merge_and_unload(progressbar, safe_merge, adapter_names)

    def unload(self) -> nn.Module:
        """Remove the experts and return the plain backbone with its own weights: a merged
        model is unmerged first (peft's unload would hand back the merged weights, and a
        backbone saved from them would apply the merged experts twice once they are loaded
        again). The model is consumed, as by :meth:`merge_and_unload`."""
        self.unmerge()
        return super().unload()

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> Any:
        """peft's unload, then a recount of merged layers: unloaded layers, merged or not,
        are no longer part of this model."""
        try:
            plain = super()._unload_and_optionally_merge(*args, **kwargs)
        finally:
            self.routing.merged_layers = sum(layer.merged for _, layer in self.expert_layers())
        self._unloaded = True
        return plain

    # ------------------------------------------------------------ save / load
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors of one adapter under peft's key names (experts, DAM, then router)."""
        self._check_not_unloaded()
        adapter = adapter_name or self._active_name()
        tensors: dict[str, torch.Tensor] = {}
        for path, layer in self.expert_layers():
            bank = layer.loraxir_experts[adapter]
            for index, (a, b) in enumerate(zip(bank.A, bank.B, strict=True)):
                tensors[checkpoint.expert_key(path, "A", index)] = a.detach()
                tensors[checkpoint.expert_key(path, "B", index)] = b.detach()
        for key, value in guidance.dam_state_dict(self.model).items():
            tensors[f"base_model.model.{key}"] = value
        router = _router_of(self.loraxir_router, self.peft_config[adapter])
        if router is not None:
            for key, value in router.adapter_state_dict().items():
                tensors[checkpoint.ROUTER_PREFIX + key] = value.detach()
        return tensors

    def save_pretrained(
        self,
        save_directory: str,
        adapter_name: str | None = None,
        metrics: dict[str, float] | None = None,
        base_model: str | None = None,
    ) -> None:
        """Write ``adapter_config.json``, ``adapter_model.safetensors`` and a ``README.md``
        model card, atomically (a crash leaves the previous checkpoint as it was).

        The saved ``top_k`` is the attached router's (a router's ``top_k`` may be changed
        after attaching): the adapter reloads routing as it ran when saved. The base
        network's weights are not in the folder: with ``trainable="all"`` a warning says to
        save them too (``loraxir.backbones.save_backbone`` of the unloaded network, as the recipes
        do)."""
        self._check_not_unloaded()
        _check_save_arguments(save_directory, metrics, base_model)
        adapter = adapter_name or self._active_name()
        if adapter not in self.peft_config:
            raise unknown_name("adapter", adapter, list(self.peft_config))
        if self.peft_config[adapter].trainable == "all":
            warnings.warn(
                "trainable='all' trains the base network too, but an adapter folder holds "
                "only the experts, DAM blocks and router: also save the trained network into "
                "the folder (loraxir.backbones.save_backbone(copy.deepcopy(model).unload(), "
                "folder)) and load it with loraxir.load_adapter, which reads it.",
                stacklevel=2,
            )
        config = copy.deepcopy(self.peft_config[adapter])
        inserted = guidance.dam_config(self.model)
        if config.dam is None and inserted is not None:  # the folder would not load again
            raise ConfigError(
                f"The network carries DAM blocks at {inserted.points} that adapter "
                f"{adapter!r}'s config does not list (dam=None): they were inserted after "
                "wrapping. Insert them before get_loraxir_model, with LoraIRConfig(dam="
                f"DAMConfig(points={inserted.points}, embed_dim={inserted.embed_dim}))."
            )
        _record_router(config, _owned_router(self, adapter, config))
        config.inference_mode = False
        checkpoint.write(
            save_directory,
            config,
            self.adapter_state_dict(adapter),
            backbone=base_model or type(self.model).__name__,
            metrics=metrics,
            drop=self._stale_files(Path(save_directory)),
        )

    def _stale_files(self, folder: Path) -> list[str]:
        """Files of an earlier save in ``folder`` that would not describe these experts:
        ``metrics.json`` (measured on the earlier weights) and a backbone pair holding
        another network than this model's base (loading the folder would run these
        experts on it, silently). Not checked for a merged model, whose base weights hold
        the merged experts: its backbone pair is kept."""
        from loraxir.pretrained import BACKBONE_CONFIG, BACKBONE_WEIGHTS, METRICS_NAME

        stale = [METRICS_NAME] if (folder / METRICS_NAME).is_file() else []
        weights = folder / BACKBONE_WEIGHTS
        if weights.is_file() and not self.merged:
            try:
                saved = checkpoint.read_safetensors(folder, BACKBONE_WEIGHTS)
            except CheckpointError:  # damaged: stale as well
                saved = {}
            own = checkpoint.plain_state_dict(self.model)
            # In the model's precision: a bf16 model's base, saved in float32, rounds back
            # to itself, while widening it would not give the saved values.
            if saved.keys() != own.keys() or any(
                saved[key].shape != own[key].shape
                or not torch.equal(saved[key].to(own[key].dtype), own[key])
                for key in own
            ):
                stale += [BACKBONE_CONFIG, BACKBONE_WEIGHTS]
        if stale:
            warnings.warn(
                f"Saving into {str(folder)!r} drops its {stale}: they describe another "
                "network or earlier weights than these experts. Save this model's base "
                "network there too (loraxir.backbones.save_backbone) if the folder should "
                "carry one.",
                stacklevel=3,
            )
        return stale

    @classmethod
    def from_pretrained(
        cls,
        backbone: nn.Module,
        model_id: str,
        adapter_name: str = "default",
        router: nn.Module | None = None,
        is_trainable: bool = False,
        strict: bool = True,
        **hub_kwargs: Any,
    ) -> LoraIRModel:
        """Load an adapter saved by :meth:`save_pretrained` (a folder or a Hub repo id).

        Everything is checked before the backbone is touched: the config, the safetensors
        file, and every tensor's shape against the backbone's layers; on any error the
        backbone is left unchanged. ``router`` overrides the saved router spec (needed when
        it was a custom module). ``is_trainable=False`` returns a frozen model in eval mode.
        """
        backbone = _unwrap_backbone(backbone)
        config, tensors = checkpoint.read(model_id, strict=strict, **hub_kwargs)
        dam_tensors, tensors = guidance.split_dam_tensors(tensors)
        expert_tensors, router_tensors = checkpoint.split_router(tensors)
        checkpoint.check_expert_shapes(backbone, config, expert_tensors)
        guidance.check_dam_tensors(backbone, config.dam, dam_tensors)
        config.inference_mode = False  # a peft-saved config says True; frozen below instead
        if router is None and config.router is not None:
            router = _router_from_config(config.router)
        if router is not None:
            check_router(router, config)
            router.load_adapter_state_dict(router_tensors)
        elif router_tensors:
            raise checkpoint.CheckpointError(
                "The checkpoint holds router weights but no router spec; pass router=."
            )
        model = cls(backbone, config, adapter_name, router=router)
        model._load_expert_tensors(expert_tensors, adapter_name)
        model._awaiting().clear()  # loaded: a later failed peft load leaves it in place
        if dam_tensors:
            guidance.load_dam_state_dict(model.model, dam_tensors)
        if not is_trainable:
            model.eval()
            for param in model.parameters():
                param.requires_grad = False
        return model

    def _load_expert_tensors(self, tensors: dict[str, torch.Tensor], adapter: str) -> None:
        with torch.no_grad():
            for path, layer in self.expert_layers():
                bank = layer.loraxir_experts[adapter]
                for index, (a, b) in enumerate(zip(bank.A, bank.B, strict=True)):
                    a.copy_(tensors[checkpoint.expert_key(path, "A", index)])
                    b.copy_(tensors[checkpoint.expert_key(path, "B", index)])


def _check_save_arguments(directory: Any, metrics: Any, base_model: Any) -> None:
    if not isinstance(directory, str | os.PathLike) or not str(directory):
        raise ConfigError(f"save_pretrained needs a folder path, got {directory!r}.")
    if metrics is not None and not (
        isinstance(metrics, dict) and all(isinstance(k, str) for k in metrics)
    ):
        raise ConfigError(
            f"metrics must be a dict keyed by names (e.g. {{'psnr_noise': 30.1}}, or a "
            f"metrics.json's contents), got {metrics!r}."
        )
    if base_model is not None and not isinstance(base_model, str):
        raise ConfigError(
            f"base_model names the backbone in the card (a string), got {base_model!r}."
        )


def _check_backbone_args(args: tuple[Any, ...]) -> None:
    """Positional arguments after ``x`` go to the backbone; a degradation name among them
    was meant as routing (``model(x, "rain")``) and would fail inside the backbone."""
    for arg in args:
        names = arg if isinstance(arg, list | tuple) else [arg]
        if names and all(isinstance(name, str) for name in names):
            raise RoutingError(
                f"Got {arg!r} as a positional argument, which goes to the backbone; pass "
                f"routing by keyword: model(x, degradation={arg!r}) (or gates=...)."
            )


def _check_second_adapter(first: LoraIRConfig, second: LoraIRConfig) -> None:
    """Raise :class:`ConfigError` unless ``second`` can share a backbone with ``first``."""
    if first.dam is not None or second.dam is not None or second.router is not None:
        raise ConfigError(
            "A second adapter cannot bring DAM blocks or a router, nor join one with DAM "
            "blocks: the backbone holds one set of DAM blocks and one router, which the "
            "second's would overwrite (and the first's blocks would modulate the second's "
            "outputs). Load each such adapter on its own copy of the backbone."
        )


def _undo_injection(
    model: nn.Module, layers_before: set[int], dam_before: list[tuple[nn.Module, RoutingState]]
) -> None:
    """Put back the plain layers that a failed injection had already wrapped, and the DAM
    blocks as they were (taken out when it inserted them, bound to their earlier routing
    otherwise), so that an error leaves the user's network as it was."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoraIRLayer) and id(child) not in layers_before:
                setattr(module, name, child.get_base_layer())
    if not dam_before:
        guidance.remove_dam(model)
    for block, routing in dam_before:
        block.routing = routing


def _concat(parts: list[Any]) -> Any:
    """Join the outputs of calls on parts of a batch along the batch."""
    return _map_outputs(torch.cat, parts)


def _rows(out: Any, order: torch.Tensor) -> Any:
    """``out``'s images in ``order``."""
    return _map_outputs(lambda tensors: tensors[0][order], [out])


def _map_outputs(fn: Any, outputs: list[Any]) -> Any:
    """``fn`` on the list of corresponding tensors of backbone outputs of one structure:
    tensors, or lists, tuples and dicts of them (multi-stage networks return one image per
    stage)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return fn(outputs)
    if isinstance(first, tuple | list):
        mapped = [_map_outputs(fn, list(items)) for items in zip(*outputs, strict=True)]
        return type(first)(*mapped) if hasattr(first, "_fields") else type(first)(mapped)
    if isinstance(first, dict):
        return {key: _map_outputs(fn, [output[key] for output in outputs]) for key in first}
    raise DataError(
        f"The backbone returned a {type(first).__name__}, which loraxir cannot join along "
        "the batch after running it in parts; set model.inference_chunk_pixels = None and "
        "route one degradation per call."
    )


def _router_from_config(spec: Any) -> nn.Module:
    """Rebuild a saved router spec (imported lazily: routers pull in their encoders)."""
    from loraxir.router import DegradationRouter

    return DegradationRouter.from_config(spec)


def _unwrap_backbone(backbone: Any) -> nn.Module:
    """Accept a spandrel ``ModelDescriptor`` as well as a module, keeping its architecture id."""
    inner = getattr(backbone, "model", None)
    architecture = getattr(backbone, "architecture", None)
    if (
        isinstance(inner, nn.Module)
        and architecture is not None
        and not isinstance(backbone, nn.Module)
    ):
        return from_descriptor(backbone)
    if not isinstance(backbone, nn.Module):
        raise ConfigError(f"The backbone must be an nn.Module, got {type(backbone).__name__}.")
    return backbone


def get_loraxir_model(
    backbone: nn.Module,
    config: LoraIRConfig,
    router: nn.Module | None = None,
    adapter_name: str = "default",
) -> LoraIRModel:
    """Attach routed experts to ``backbone`` (in place) and return the :class:`LoraIRModel`."""
    if not isinstance(config, LoraIRConfig):
        raise ConfigError(f"config must be a LoraIRConfig, got {type(config).__name__}.")
    return LoraIRModel(_unwrap_backbone(backbone), config, adapter_name, router=router)


@contextlib.contextmanager
def route(
    model: nn.Module,
    gates: torch.Tensor | None = None,
    degradation: Degradation | None = None,
    batch_size: int | None = None,
    embedding: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Pin the gates for every call inside the block.

    For calls that cannot take ``gates=``: peft's ``PeftModel``, the bare backbone, or
    code that calls the model for you (tiling, a video loop). ``gates`` is ``(B, E)`` or
    ``(E,)``; ``degradation`` a name or one name per image. One name or an ``(E,)`` gate
    serves batches of any size (``batch_size`` may fix the size instead); one row per image
    needs batches of that size. ``embedding`` ``(1 or B, D)`` pins the DAM embedding too
    (else an attached router computes it per call). Outside the block, direct backbone
    calls have no gates.
    """
    tuner = model if isinstance(model, LoraIRModel) else getattr(model, "base_model", None)
    if not isinstance(tuner, LoraIRModel):
        raise ConfigError(
            f"loraxir.route needs a LoraIRModel or a PeftModel of one, got {type(model).__name__}."
        )
    with tuner.pinned_routing(gates, degradation, batch_size, embedding) as pinned:
        yield pinned


def _check_loaded_keys(
    tuner: LoraIRModel,
    adapter_name: str,
    model_state: dict[str, torch.Tensor],
    loaded: dict[str, torch.Tensor],
) -> None:
    """Raise :class:`~loraxir.errors.BackboneMismatchError` unless ``loaded`` (a saved
    adapter's tensors under the model's keys) holds exactly the tensors of
    ``adapter_name`` that the model saves, of their shapes: its experts, the DAM blocks
    when it has them, and its router's saved tensors when the router is its own."""
    config = tuner.peft_config[adapter_name]
    # Router tensors belong to the first adapter, the router's (a second adapter of the same
    # classes brings none; a config records the router only once saved).
    first = next(iter(tuner.peft_config))
    router = _router_of(tuner.loraxir_router, config) if adapter_name == first else None
    saves = hasattr(router, "adapter_state_dict")
    router_keys = set(router.adapter_state_dict()) if saves else set()
    marker = "loraxir_router."
    # Fitted class embeddings are optional: the router makes room for them as they load.
    optional = f"{marker}class_embeddings"

    def ours(key: str) -> bool:
        if key.endswith(optional):
            return False
        if f".loraxir_experts.{adapter_name}." in key:
            return True
        if guidance.is_dam_key(key):
            return config.dam is not None
        return marker in key and key.split(marker, 1)[1] in router_keys

    expected = {k: tuple(v.shape) for k, v in model_state.items() if ours(k)}
    saved = {
        k: tuple(v.shape)
        for k, v in loaded.items()
        if "loraxir" in k and not (router is not None and k.endswith(optional))
    }
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    wrong = sorted(k for k in set(expected) & set(saved) if expected[k] != saved[k])
    if missing or unexpected or wrong:
        raise BackboneMismatchError(
            "The adapter's tensors do not fit the model its config builds on this backbone: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}, of another shape "
            f"{[(k, saved[k], expected[k]) for k in wrong[:3]]}. It was saved for another "
            "backbone or config, or edited by hand."
        )


def _record_router(config: LoraIRConfig, router: nn.Module | None) -> None:
    """Write into ``config`` the spec and ``top_k`` of ``router`` (the router of its adapter,
    or ``None``): what a load rebuilds. A router attached, grown or retuned after the config
    was made is saved as it runs, by our ``save_pretrained`` and by peft's."""
    config.router = router.to_config() if hasattr(router, "to_config") else None
    if config.router is not None:
        config.top_k = config.router.top_k


def _tensor_name_parts(model: nn.Module, router: nn.Module | None) -> set[str]:
    """Every part of the model's and the router's tensor names, and the prefixes peft puts
    before them (``base_model.model.``, ``loraxir_router.``), with an expert's ``A`` and
    ``B``."""
    keys = [*model.state_dict(), *(router.state_dict() if router is not None else ())]
    parts = {part for key in keys for part in key.split(".")}
    return parts | {"model", "base_model", "loraxir_router", "A", "B"}


def _owned_router(tuner: Any, adapter_name: str, config: LoraIRConfig) -> nn.Module | None:
    """The router saved with ``adapter_name``: the model's, when that adapter is the first
    (the one the router was attached for). A second adapter of the same classes is routed by
    it but saved plain, as it was added: saved with the router, it could not be loaded back
    beside the first."""
    peft_config = getattr(tuner, "peft_config", {})
    if peft_config and next(iter(peft_config)) != adapter_name:
        return None
    return _router_of(getattr(tuner, "loraxir_router", None), config)


def _router_of(router: nn.Module | None, config: LoraIRConfig) -> nn.Module | None:
    """The model's router when it routes the adapter of ``config`` (the same classes):
    the router is one per model, attached for one adapter, and saved only with that one
    (a second adapter of other classes saved with it could not be loaded)."""
    if router is None or list(getattr(router, "degradations", [])) != list(config.degradations):
        return None
    return router


def _image_rows(rows: torch.Tensor | None, part: slice, batch_size: int) -> torch.Tensor | None:
    """``rows[part]`` when ``rows`` has one row per image of the batch, else ``rows``."""
    if rows is None or rows.dim() != 2 or rows.shape[0] != batch_size:
        return rows
    return rows[part]
