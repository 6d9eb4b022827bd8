"""``LoraIRModel``: a backbone with routed low-rank experts, and ``get_loraxir_model``.

The model is a peft ``BaseTuner``, so the same object serves our API and peft's
(``get_peft_model`` wraps it in a ``PeftModel``). Around each forward it writes the gates
into the shared :class:`~loraxir.routing.RoutingState` that every expert layer reads: from
``gates=``, from ``degradation=`` names, or from an attached router.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from loraxir import checkpoint
from loraxir.config import LoraIRConfig
from loraxir.errors import ConfigError, RoutingError, unknown_name
from loraxir.layers import LoraIRLayer, wrap_layer
from loraxir.routing import RoutingState, check_gates
from loraxir.targeting import resolve_targets

Degradation = str | Sequence[str]


class LoraIRModel(BaseTuner):
    """A restoration backbone whose targeted layers carry routed low-rank experts.

    Build it with :func:`get_loraxir_model`. Call it as ``model(x, gates=g)`` with ``g`` of
    shape ``(B, E)``, ``model(x, degradation="rain")`` (or one name per image), or
    ``model(x)`` once a router is attached.
    """

    prefix = "loraxir_"
    tuner_layer_cls = LoraIRLayer
    target_module_mapping: dict[str, list[str]] = {}  # noqa: RUF012 (peft's class attribute)

    def __init__(
        self,
        model: nn.Module,
        peft_config: LoraIRConfig | dict[str, LoraIRConfig],
        adapter_name: str = "default",
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
        router: nn.Module | None = None,
    ) -> None:
        self.routing = RoutingState()
        self._pending_targets: set[str] = set()
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage, state_dict)
        self.last_routing: torch.Tensor | None = None
        self.loraxir_router: nn.Module | None = None
        spec = self.config.router
        if router is None and spec is not None:
            # A saved config names its router (peft's from_pretrained arrives here): rebuild
            # it; its trained weights are loaded with the experts.
            from loraxir.router import DegradationRouter

            router = DegradationRouter.from_config(spec)
        if router is not None:
            self.attach_router(router)
        self._apply_trainable_policy()

    # ------------------------------------------------------------ peft hooks
    def _pre_injection_hook(
        self, model: nn.Module, config: LoraIRConfig, adapter_name: str
    ) -> None:
        if not isinstance(config, LoraIRConfig):
            raise ConfigError(f"LoraIRModel needs a LoraIRConfig, got {type(config).__name__}.")
        targets = resolve_targets(
            model, config.target_modules, config.exclude_modules, config.preset
        )
        self._pending_targets = set(targets)

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
        }
        if isinstance(target, LoraIRLayer):
            target.update_layer(adapter_name, **options)
            return
        layer = wrap_layer(target, self.routing)
        layer.compute = peft_config.compute
        layer.update_layer(adapter_name, **options)
        self._replace_module(parent, target_name, layer, target)

    @classmethod
    def _get_adapter_state_dict(
        cls, model, config, adapter_name, state_dict, unwanted_adapter_names
    ):
        """peft's selection of what to save, minus a frozen pretrained router tower
        (referenced by name in the config, never copied)."""
        selected = super()._get_adapter_state_dict(
            model, config, adapter_name, state_dict, unwanted_adapter_names
        )
        tuner = getattr(model, "base_model", model)
        router = getattr(tuner, "loraxir_router", None)
        saved = set(router.adapter_state_dict()) if router is not None else set()
        marker = "loraxir_router."
        return {
            key: value
            for key, value in selected.items()
            if marker not in key or key.split(marker, 1)[1] in saved
        }

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
        if not self.routing.pinned and not self.merged and self._adapters_enabled():
            images = args[0] if args else next(iter(kwargs.values()))
            self._set_gates(self._gates_for(images, None, None))
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
    def merged(self) -> bool:
        return any(layer.merged for _, layer in self.expert_layers())

    def expert_layers(self) -> Iterator[tuple[str, LoraIRLayer]]:
        """``(path, layer)`` for every expert layer, paths relative to the backbone."""
        for path, module in self.model.named_modules():
            if isinstance(module, LoraIRLayer):
                yield path, module

    def _active_name(self) -> str:
        if len(self.active_adapters) != 1:
            raise RoutingError(f"Exactly one adapter must be active, got {self.active_adapters}.")
        return self.active_adapters[0]

    def _adapters_enabled(self) -> bool:
        return any(not layer.disable_adapters for _, layer in self.expert_layers())

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
        by gates pinned with :func:`loraxir.route`, or by the attached router."""
        if self.merged:
            if gates is not None or degradation is not None:
                raise RoutingError(
                    "The experts are merged into the base weights for one fixed gate; call "
                    "model.unmerge() before routing per image."
                )
        elif self._adapters_enabled() and not (
            self.routing.pinned and gates is None and degradation is None
        ):
            self._set_gates(self._gates_for(x, gates, degradation))
        return self.model(x, *args, **kwargs)

    def _set_gates(self, gates: torch.Tensor) -> None:
        self.routing.gates = gates
        self.last_routing = gates.detach()

    def _gates_for(
        self, x: torch.Tensor, gates: torch.Tensor | None, degradation: Degradation | None
    ) -> torch.Tensor:
        num_experts = self.config.num_experts
        if gates is not None and degradation is not None:
            raise RoutingError("Pass gates= or degradation=, not both.")
        if gates is not None:
            return check_gates(gates, num_experts, x.shape[0]).to(x.device)
        if degradation is not None:
            return self.degradation_gates(degradation, x.shape[0]).to(x.device)
        if self.loraxir_router is not None:
            return check_gates(self.loraxir_router(x), num_experts, x.shape[0])
        raise RoutingError(
            "No routing for this call: pass gates= (B, E) or degradation= (one of "
            f"{self.config.degradations}), or attach a router with "
            "get_loraxir_model(backbone, config, router=...)."
        )

    def degradation_gates(self, degradation: Degradation, batch_size: int = 1) -> torch.Tensor:
        """One-hot gates ``(batch_size, E)`` for a degradation name or one name per image."""
        names = [degradation] * batch_size if isinstance(degradation, str) else list(degradation)
        if len(names) != batch_size:
            raise RoutingError(
                f"Got {len(names)} degradation names for a batch of {batch_size} images; pass one "
                "name for all images or one per image."
            )
        known = self.config.degradations
        gates = torch.zeros(batch_size, len(known))
        for row, name in enumerate(names):
            if name not in known:
                raise unknown_name("degradation", name, known)
            gates[row, known.index(name)] = 1.0
        return gates

    @contextlib.contextmanager
    def pinned_routing(
        self,
        gates: torch.Tensor | None = None,
        degradation: Degradation | None = None,
        batch_size: int = 1,
    ) -> Iterator[torch.Tensor]:
        """Fix the gates for every call inside the block (see :func:`loraxir.route`)."""
        if gates is not None:
            pinned = check_gates(gates, self.config.num_experts, batch_size)
        elif degradation is not None:
            pinned = self.degradation_gates(degradation, batch_size)
        else:
            raise RoutingError("loraxir.route needs gates= or degradation=.")
        device = next(self.model.parameters()).device
        self._set_gates(pinned.to(device))
        self.routing.pinned = True
        try:
            yield self.routing.gates
        finally:
            self.routing.pinned = False

    # ---------------------------------------------------------------- router
    def attach_router(self, router: nn.Module) -> None:
        """Attach a router (``router(x) -> gates (B, E)``) so that ``model(x)`` routes itself.

        Its class names and ``top_k`` must match the config (the expert order is the
        router's logit order).
        """
        from loraxir.router import check_degradations

        config = self.config
        check_degradations(list(getattr(router, "degradations", [])), config.degradations)
        top_k = getattr(router, "top_k", config.top_k)
        if top_k != config.top_k:
            raise ConfigError(
                f"router.top_k={top_k} but config.top_k={config.top_k}; build the router with "
                "the config's top_k."
            )
        self.loraxir_router = router.to(next(self.model.parameters()).device)
        self._apply_trainable_policy()

    # -------------------------------------------------------------- training
    def _apply_trainable_policy(self) -> None:
        """Set ``requires_grad`` from ``config.trainable`` (see :class:`LoraIRConfig`)."""
        config = self.config
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
        if name in config.degradations:
            raise ConfigError(f"Degradation {name!r} already exists: {config.degradations}.")
        router = self.loraxir_router
        if router is not None and not hasattr(router, "add_degradation"):
            raise ConfigError(
                f"The attached {type(router).__name__} cannot grow a class; detach it first."
            )
        updated = copy.deepcopy(config)
        updated.degradations.append(name)
        updated.num_experts += 1
        updated.expert_chunks.append(1)
        updated.trainable = trainable
        updated._validate()
        active = self._active_name()
        for _, layer in self.expert_layers():
            layer.loraxir_experts[active].grow(1)
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
    ) -> dict[str, dict[str, float]]:
        """Time each exact compute form per layer on this input; keep the fastest.

        Runs one forward to capture every expert layer's input, then times the
        ``activation``, ``weight`` and ``batched`` forms of each layer on it and records
        the fastest in ``layer.tuned["inference"]`` (forward without gradients) or, with
        ``training=True``, ``layer.tuned["training"]`` (forward and backward, as a training
        step runs them). Returns seconds per layer and form.
        """
        captured: dict[str, torch.Tensor] = {}
        handles = [
            layer.register_forward_pre_hook(
                lambda _m, args, p=path: captured.__setitem__(p, args[0].detach())
            )
            for path, layer in self.expert_layers()
        ]
        try:
            with torch.no_grad():
                self(x, gates=gates, degradation=degradation)
        finally:
            for handle in handles:
                handle.remove()
        phase = "training" if training else "inference"
        timings: dict[str, dict[str, float]] = {}
        for path, layer in self.expert_layers():
            inputs = captured[path].requires_grad_(training)
            was_training, previous, per_mode = layer.training, layer.compute, {}
            layer.train(training)
            for mode in ("activation", "weight", "batched"):
                layer.compute = mode
                per_mode[mode] = _time_layer(layer, inputs, repeats, training)
            layer.compute = previous
            layer.train(was_training)
            layer.tuned[phase] = min(per_mode, key=per_mode.get)
            timings[path] = per_mode
        return timings

    # ----------------------------------------------------------------- merge
    def merge(self, gates: torch.Tensor | None = None, degradation: str | None = None) -> None:
        """Fold the experts mixed by one fixed gate into the base weights (zero overhead).

        ``gates`` is ``(E,)``; ``degradation`` a name (one-hot). Undo with :meth:`unmerge`.
        """
        if self.merged:
            self.unmerge()
        self.routing.merge_gate = self._fixed_gate(gates, degradation)
        for _, layer in self.expert_layers():
            layer.merge()

    def unmerge(self) -> None:
        """Restore the exact base weights saved by :meth:`merge`."""
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
        """Merge for one fixed gate and return the plain backbone (no expert layers)."""
        if gates is not None or degradation is not None:
            self.merge(gates, degradation)
        elif not self.merged:
            raise RoutingError(
                "merge_and_unload needs a fixed gate: pass degradation='name' or gates=(E,)."
            )
        return super().merge_and_unload(progressbar, safe_merge, adapter_names)

    def _fixed_gate(self, gates: torch.Tensor | None, degradation: str | None) -> torch.Tensor:
        if (gates is None) == (degradation is None):
            raise RoutingError("Merging needs exactly one of gates=(E,) or degradation='name'.")
        if degradation is not None:
            if not isinstance(degradation, str):
                raise RoutingError("Merging takes one degradation name (one gate for all images).")
            return self.degradation_gates(degradation, 1)[0]
        return check_gates(torch.as_tensor(gates, dtype=torch.float32), self.config.num_experts, 1)[
            0
        ]

    # ------------------------------------------------------------ save / load
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors of one adapter under peft's key names (experts, then router)."""
        adapter = adapter_name or self._active_name()
        tensors: dict[str, torch.Tensor] = {}
        for path, layer in self.expert_layers():
            bank = layer.loraxir_experts[adapter]
            for index, (a, b) in enumerate(zip(bank.A, bank.B, strict=True)):
                tensors[checkpoint.expert_key(path, "A", index)] = a.detach()
                tensors[checkpoint.expert_key(path, "B", index)] = b.detach()
        if self.loraxir_router is not None:
            for key, value in self.loraxir_router.adapter_state_dict().items():
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
        model card, atomically (a crash leaves the previous checkpoint as it was)."""
        adapter = adapter_name or self._active_name()
        config = copy.deepcopy(self.peft_config[adapter])
        config.router = self.loraxir_router.to_config() if self.loraxir_router is not None else None
        config.inference_mode = False
        checkpoint.write(
            save_directory,
            config,
            self.adapter_state_dict(adapter),
            backbone=base_model or type(self.model).__name__,
            metrics=metrics,
        )

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
        expert_tensors, router_tensors = checkpoint.split_router(tensors)
        checkpoint.check_expert_shapes(backbone, config, expert_tensors)
        if router is None and config.router is not None:
            from loraxir.router import DegradationRouter

            router = DegradationRouter.from_config(config.router)
        if router is not None:
            router.load_adapter_state_dict(router_tensors)
        elif router_tensors:
            raise checkpoint.CheckpointError(
                "The checkpoint holds router weights but no router spec; pass router=."
            )
        model = cls(backbone, config, adapter_name, router=router)
        model._load_expert_tensors(expert_tensors, adapter_name)
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


def _time_layer(layer: LoraIRLayer, inputs: torch.Tensor, repeats: int, training: bool) -> float:
    """Seconds per call of ``layer`` on ``inputs`` (with backward when ``training``), after
    one warm-up call; gradients it leaves on the layer's parameters are cleared."""

    def run() -> None:
        with torch.set_grad_enabled(training):
            out = layer(inputs)
            if training:
                out.backward(torch.ones_like(out))

    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    elapsed = (time.perf_counter() - start) / repeats
    for param in layer.parameters():
        param.grad = None
    return elapsed


def _unwrap_backbone(backbone: Any) -> nn.Module:
    """Accept a spandrel ``ModelDescriptor`` as well as a module, keeping its architecture id."""
    inner = getattr(backbone, "model", None)
    architecture = getattr(backbone, "architecture", None)
    if (
        isinstance(inner, nn.Module)
        and architecture is not None
        and not isinstance(backbone, nn.Module)
    ):
        inner._loraxir_architecture = architecture.id
        return inner
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
    batch_size: int = 1,
) -> Iterator[torch.Tensor]:
    """Pin the gates for every call inside the block.

    For calls that cannot take ``gates=``: peft's ``PeftModel``, the bare backbone, or
    code that calls the model for you (tiling, a video loop). ``gates`` is ``(B, E)`` or
    ``(E,)``; ``degradation`` a name or one name per image.
    """
    tuner = model if isinstance(model, LoraIRModel) else getattr(model, "base_model", None)
    if not isinstance(tuner, LoraIRModel):
        raise ConfigError(
            f"loraxir.route needs a LoraIRModel or a PeftModel of one, got {type(model).__name__}."
        )
    with tuner.pinned_routing(gates, degradation, batch_size) as pinned:
        yield pinned
