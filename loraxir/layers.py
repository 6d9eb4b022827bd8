"""Routed low-rank expert layers for ``nn.Linear``, ``nn.Conv2d`` and ``nn.ConvTranspose2d``.

Each wrapped layer computes, for per-image gates ``g`` (B, E) and scaling ``s = alpha / r``::

    y = base(x) + sum_i g_i * s * (dW_i * x),      dW_i = low-rank product of expert i

The experts of one layer live in one :class:`ExpertBank` (stacked ``A`` and ``B`` tensors),
never one module per expert: DDP rejects parameters that a top-k step leaves unused.

How a layer computes is a *compute form* of :mod:`loraxir.compute` (``"activation"``,
``"weight"``, ``"batched"``, ``"gathered"``; all exact). ``compute="auto"`` (default) uses
the form the cost model planned for the layer's shape when it was wrapped
(:func:`loraxir.compute.plan_forms`), adjusted per call by :meth:`FormPlan.pick` (one gate
row for the batch, dropout, ``torch.compile``) and replaced by ``LoraIRModel.autotune``'s
choice once tuned. Experts whose ``B`` is still zero and train run with ``exact_base`` so
that fresh experts return the base output bit for bit in training too.

Experts whose gate is zero for every image are skipped, unless the gates need gradients
(a zero gate still has a non-zero gradient); experts whose ``B`` is still zero are skipped
when ``B`` gets no gradient. A single gate row serves a batch of any size.

These layers know nothing of routers: they read gates from a shared
:class:`~loraxir.routing.RoutingState`.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from loraxir import compute
from loraxir.errors import RoutingError, TargetModulesError, unknown_name
from loraxir.routing import RoutingState


class ExpertBank(nn.Module):
    """The stacked low-rank factors of all experts of one layer for one adapter.

    ``A`` acts first on the input and ``B`` second; ``B`` starts at zero so that attaching
    experts leaves the backbone's function unchanged. Experts added later (a new
    degradation) are kept as separate chunks so that old chunks can be frozen and stay
    bit-identical while the new one trains.
    """

    def __init__(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], num_experts: int):
        super().__init__()
        self.a_shape = a_shape
        self.b_shape = b_shape
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.grow(num_experts)

    @property
    def num_experts(self) -> int:
        return sum(a.shape[0] for a in self.A)

    def grow(self, num_new: int) -> None:
        """Append ``num_new`` experts (A random, B zero) as a new chunk."""
        reference = self.A[0] if len(self.A) else None
        kwargs: dict[str, Any] = {}
        if reference is not None:
            kwargs = {"device": reference.device, "dtype": reference.dtype}
        self.A.append(nn.Parameter(torch.empty(num_new, *self.a_shape, **kwargs)))
        self.B.append(nn.Parameter(torch.zeros(num_new, *self.b_shape, **kwargs)))
        self.reset_chunk(len(self.A) - 1, "default")

    def reset_chunk(self, index: int, init: str) -> None:
        """Initialise chunk ``index``: ``default`` is Kaiming-uniform A (as ``nn.Linear``),
        ``gaussian`` is A ~ N(0, 1/r); B is zero in both."""
        a = self.A[index]
        rank = self.a_shape[0]
        with torch.no_grad():
            if init == "gaussian":
                a.normal_(0.0, 1.0 / rank)
            else:
                fan_in = math.prod(self.a_shape[1:])
                bound = 1.0 / math.sqrt(fan_in)
                a.uniform_(-bound, bound)
            self.B[index].zero_()

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of all experts, shapes ``(E, *a_shape)`` and ``(E, *b_shape)``."""
        if len(self.A) == 1:
            return self.A[0], self.B[0]
        return torch.cat(list(self.A)), torch.cat(list(self.B))


class _UsedExperts(NamedTuple):
    """The experts one layer call uses: their factors, coefficients ``(N, k)``, the
    images grouped by coefficient row (``None`` when the coefficients need gradients),
    whether a kept expert is fresh (``B = 0``, training) and the compute form."""

    a: torch.Tensor
    b: torch.Tensor
    coeffs: torch.Tensor
    groups: compute.RowGroups | None
    fresh: bool
    form: str


# Optimizer steps taken in this process. Kept folds are valid for one count: a fused
# optimizer (and any step through ``.data``) moves no version counter, and a step may
# follow a no-grad call that filled them.
_optimizer_steps = [0]


def _count_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_step)


class _KeptFolds(NamedTuple):
    """One layer's folds kept between inference calls, and what they are valid for: the
    adapter, the tensors they derive from with their version counters, and which experts
    have a non-zero ``B``; with what every call reads, made once: the key and builder of
    the call's foldable rows, and the base op as a function of the input and a weight."""

    adapter: str
    tensors: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]
    bank: ExpertBank  # the bank folded: an adapter deleted and added again has another
    factors: tuple[dict[str, Any], dict[str, Any]]  # the bank's A and B parameter slots
    factor_ids: list[int]  # the ids of the factor tensors folded (kept.tensors[1:])
    steps: int
    autocast: tuple[bool, torch.dtype]
    live: tuple[bool, ...]
    weights: dict[tuple[float, ...], torch.Tensor]
    rows_key: tuple[Any, ...]
    rows: Callable[[torch.Tensor], compute.RowGroups | None]
    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


_version = operator.attrgetter("_version")


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    """Whether autocast is on for ``device_type`` and its dtype: a fold made under autocast
    has autocast's dtype, so it serves only calls under the same autocast."""
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _gate_support(gates: torch.Tensor) -> tuple[int, ...]:
    """The experts whose gate is non-zero for some image (once per call)."""
    return tuple(gates.ne(0).any(0).nonzero().flatten().tolist())


def _coefficients(
    gates: torch.Tensor, used: tuple[int, ...], scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, compute.RowGroups]:
    """Coefficients ``gates[:, used] * scaling`` in ``dtype`` and their row groups (once
    per call for every layer with the same experts and scaling; gates without gradients)."""
    coeffs = _select(gates.to(dtype), used, dim=1) * scaling
    return coeffs, compute.group_rows(coeffs)


def _foldable_rows(
    gates: torch.Tensor, scaling: float, dtype: torch.dtype
) -> compute.RowGroups | None:
    """Row groups of the coefficients ``gates * scaling`` when every row can be built from
    one-expert folds: at most one non-zero entry (top-1 routing, a forced degradation), or
    two whose gates sum to one (soft top-2 routing: ``W0 + c_a dW_a + c_b dW_b`` is then
    ``g_a F_a + g_b F_b`` with ``F_e = W0 + s dW_e``); else ``None`` (once per call)."""
    groups = compute.group_rows(gates.to(dtype) * scaling)
    for row in groups.rows if groups.mixed else ():
        nonzero = [c for c in row if c != 0.0]
        if len(nonzero) > 2:
            return None
        if len(nonzero) == 2 and not math.isclose(sum(nonzero), scaling, rel_tol=1e-6):
            return None
    return groups


@functools.cache
def _gate_of_one(scaling: float, dtype: torch.dtype) -> float:
    """The coefficient a gate of 1 has in ``dtype`` (``gates.to(dtype) * scaling``): the
    value each top-1 row, and so each kept one-expert fold's key, carries."""
    return float(torch.ones((), dtype=dtype) * scaling)


def _nonzero_rows(t: torch.Tensor) -> list[bool]:
    """Whether each ``t[e]`` has a non-zero (or NaN) entry: one ``amax`` of ``|t|``, about
    twice as fast on CPU as ``any`` over a float tensor."""
    return [bool(m != 0) for m in t.detach().flatten(1).abs().amax(1).tolist()]


def _select(t: torch.Tensor, used: tuple[int, ...], dim: int = 0) -> torch.Tensor:
    """Entries ``used`` of ``t`` along ``dim``: ``t`` itself when all are used, a view when
    they are consecutive (the usual top-k support), else a copy."""
    if len(used) == t.shape[dim]:
        return t
    if used[-1] - used[0] + 1 == len(used):
        return t.narrow(dim, used[0], len(used))
    return t.index_select(dim, torch.tensor(used, device=t.device))


class LoraIRLayer(BaseTunerLayer):
    """Mixin shared by the expert layers: adapter bookkeeping, gating, merge, dispatch.

    The arithmetic lives in :mod:`loraxir.compute`; subclasses only say which extra
    arguments their base ``forward`` takes (:meth:`_call_options`).
    """

    adapter_layer_names: ClassVar[tuple[str, ...]] = ("loraxir_experts",)
    other_param_names: ClassVar[tuple[str, ...]] = (
        "loraxir_r",
        "loraxir_alpha",
        "loraxir_dropout",
        "loraxir_plan",
    )

    def _init_layer(self, base_layer: nn.Module, routing: RoutingState) -> None:
        self.base_layer = base_layer
        self.loraxir_experts = nn.ModuleDict()
        self.loraxir_r: dict[str, int] = {}
        self.loraxir_alpha: dict[str, float] = {}
        self.loraxir_dropout: dict[str, float] = {}
        self.merged_adapters: list[str] = []
        self.routing = routing
        self.compute = "auto"
        self.tuned: dict[str, str] = {}  # "inference"/"training" -> form, set by autotune
        self.loraxir_plan: dict[str, compute.FormPlan] = {}  # per adapter, by the cost model
        self.register_buffer("_loraxir_unmerged_weight", None, persistent=False)

    # ----------------------------------------------------------------- adapters
    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        chunks: list[int],
        dropout: float,
        init: str,
        experts_per_image: int = 1,
    ) -> None:
        """Add an adapter's expert bank to this layer, ``chunks`` experts at a time, and plan
        its compute forms for ``experts_per_image`` experts per image (the ``top_k``)."""
        a_shape, b_shape = self.factor_shapes(self.base_layer, r)
        weight = self.base_layer.weight
        bank = ExpertBank(a_shape, b_shape, chunks[0]).to(device=weight.device, dtype=weight.dtype)
        for size in chunks[1:]:
            bank.grow(size)
        for index in range(len(chunks)):
            bank.reset_chunk(index, init)
        self.loraxir_experts[adapter_name] = bank
        self.loraxir_r[adapter_name] = r
        self.loraxir_alpha[adapter_name] = lora_alpha
        self.loraxir_dropout[adapter_name] = dropout
        self.loraxir_plan[adapter_name] = compute.plan_forms(self.base_layer, r, experts_per_image)
        self.set_adapter(self.active_adapters)

    def scaling(self, adapter_name: str) -> float:
        return self.loraxir_alpha[adapter_name] / self.loraxir_r[adapter_name]

    def _single_active_adapter(self) -> str:
        adapter = self._active_adapter
        if type(adapter) is list and len(adapter) == 1:  # what set_adapter leaves
            adapter = adapter[0]
        if type(adapter) is str and adapter in self.loraxir_experts:
            return adapter  # the usual case, once per layer call: no list built
        active = [a for a in self.active_adapters if a in self.loraxir_experts]
        if len(active) != 1:
            raise RoutingError(
                f"Exactly one loraxir adapter can be active at a time, got {active}. "
                "Use model.set_adapter(name)."
            )
        return active[0]

    # ------------------------------------------------------------------ merging
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the experts of every adapter in ``adapter_names`` (default: the active one),
        each mixed by the routing state's fixed ``merge_gate``, into the base weight.

        The original weight is kept so that :meth:`unmerge` is bit-exact. With
        ``safe_merge`` a non-finite result raises :class:`RoutingError` before the weight
        is changed.
        """
        if self.merged:
            return
        adapters = [self._single_active_adapter()] if adapter_names is None else adapter_names
        for adapter in adapters:
            if adapter not in self.loraxir_experts:
                raise unknown_name("adapter", adapter, self.loraxir_experts.keys())
        weight = self.base_layer.weight
        with torch.no_grad():
            merged = weight.clone()
            for adapter in adapters:
                merged += self.get_delta_weight(adapter).to(weight)
            if safe_merge and not bool(torch.isfinite(merged).all()):
                raise RoutingError(
                    f"Merging adapters {list(adapters)} gives non-finite weights in this "
                    f"{type(self.base_layer).__name__}; its experts hold inf or NaN values. "
                    "Nothing was merged."
                )
            self._loraxir_unmerged_weight = weight.detach().clone()
            weight.copy_(merged)
        self.merged_adapters.extend(adapters)
        if self.merged:
            self.routing.merged_layers += 1

    def unmerge(self) -> None:
        """Restore the exact base weight saved by :meth:`merge`."""
        if not self.merged:
            return
        with torch.no_grad():
            self.base_layer.weight.copy_(self._loraxir_unmerged_weight)
        self._loraxir_unmerged_weight = None
        self.merged_adapters = []
        self.routing.merged_layers -= 1

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The gated weight difference for the routing state's ``merge_gate`` (peft API)."""
        gate = self.routing.merge_gate
        if gate is None:
            raise RoutingError(
                "Merging routed experts needs a fixed gate: call model.merge(degradation=...) or "
                "model.merge(gates=...) (or model.merge_and_unload(degradation=...))."
            )
        bank = self.loraxir_experts[adapter_name]
        if gate.numel() != bank.num_experts:
            raise RoutingError(
                f"The merge gate has {gate.numel()} entries but adapter {adapter_name!r} has "
                f"{bank.num_experts} experts; merge adapters of the same degradations together."
            )
        # Experts with a zero gate are left out, as in the forward: they add nothing, and a
        # broken one (inf or NaN) must not spoil the merge of the others (0 · inf = NaN).
        used = tuple(i for i, g in enumerate(gate.tolist()) if g != 0.0)
        if not used:
            return torch.zeros_like(self.base_layer.weight)
        a, b = bank.stacked()
        coeffs = gate.to(self.base_layer.weight).reshape(1, -1) * self.scaling(adapter_name)
        return compute.delta_weights(
            self.base_layer, _select(a, used), _select(b, used), _select(coeffs, used, dim=1)
        )[0]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return self.base_layer(x, *args, **kwargs)
        options = self._call_options(x, args, kwargs)
        adapter = self._single_active_adapter()
        gates = self.routing.require_gates()
        num_images = gates.shape[0]
        if x.shape[0] == 0 or num_images == 0:  # an empty batch: nothing to route
            return self.base_layer(x, *args, **kwargs)
        if x.shape[0] % num_images:
            raise RoutingError(
                f"{type(self.base_layer).__name__} input has leading dimension {x.shape[0]}, "
                f"not a multiple of the {num_images} routed images; expert layers expect inputs "
                "whose leading dimension is image-major (images, or windows of images)."
            )
        if self._folds_reusable(adapter):
            out = self._forward_with_kept_folds(adapter, x, options)
            if out is not None:
                return out
        a, b = self.loraxir_experts[adapter].stacked()
        used = self._used_experts(adapter, a, b, gates)
        if used is None:
            return self.base_layer(x, *args, **kwargs)
        dropout = self.training and self.loraxir_dropout[adapter] > 0
        return compute.routed_forward(
            used.form,
            self.base_layer,
            x,
            used.a,
            used.b,
            used.coeffs,
            output_padding=options.get("output_padding"),
            exact_base=used.fresh,
            expert_input=self._dropped(adapter, x) if dropout else None,
            groups=used.groups,
        )

    def _folds_reusable(self, adapter: str) -> bool:
        """Whether this call may use (and fill) the layer's kept folds: an inference call
        (no gradient, not compiling) whose form is ``"weight"``."""
        if torch.is_grad_enabled():
            # A step may follow that changes weights without a version bump (a fused
            # optimizer): folds kept from before it must not serve the next inference call.
            self.drop_kept_folds()
            return False
        if not self.routing.cache_folds or torch.compiler.is_compiling():
            return False
        if self.compute == "auto" and not self.tuned and not self.training:
            return self.loraxir_plan[adapter].inference == "weight"  # what pick() returns here
        return self._choose_compute(adapter, None) == "weight"

    def _forward_with_kept_folds(
        self, adapter: str, x: torch.Tensor, options: dict[str, Any]
    ) -> torch.Tensor | None:
        """The ``"weight"`` form with each one-expert row's folded weight kept between calls.

        With top-1 routing (or a forced degradation) every image's coefficient row has a
        single non-zero entry, so a layer only ever folds ``E`` distinct weights: folding
        them once instead of at every call removes the per-call cost of routing beyond the
        base op (tiles of one image, frames of a video and batches of one degradation reuse
        them). A soft top-2 row (two gates summing to one) is the mixture of its two
        experts' kept folds, one ``lerp`` over the weight instead of folding the factors
        anew, even where the low-rank path has fewer multiply-adds (a squeeze-excitation
        1x1 on its pooled map, a bottleneck on 8x8): the lerp is one memory pass, the rank
        path several small operations (NAFNet-w32, one 128² image, soft top-2: 1.11× the
        bare backbone against 1.24× with the rank path on such layers; 2-core CPU,
        freed memory kept, a throwaway script). It is not kept (such rows rarely repeat).
        A batch of several rows runs in one base call, each image with its row's weight
        (see ``compute._grouped_weight_form``): soft rows too, instead of the per-call
        ``"gathered"`` form, whose factor gathering is a score of small operations in every
        layer. ``None`` for other rows. When the kept weights are dropped: see
        :meth:`_kept_folds`; they cost up to one copy of the layer's weight per expert in use.
        """
        kept = self._kept_folds(adapter)
        if kept is None:
            return None
        groups = self.routing.derived(kept.rows_key, kept.rows)
        if groups is None or (
            not all(kept.live)
            and any(c and not kept.live[e] for row in groups.rows for e, c in enumerate(row))
        ):
            # An expert with B = 0 adds nothing: the per-call path skips it and runs the
            # base op on the whole batch, bit for bit, which per-row folds would not.
            return None
        folds = kept.weights
        if len(groups.rows) == 1 and not options:  # the usual call: one lookup
            weight = folds.get(groups.rows[0])
            if weight is not None:
                return kept.op(x, weight)
        several = len(groups.rows) > 1
        if groups.mixed and several and not compute.stacks_weights(self.base_layer, x, groups):
            return None  # a weight per image would cost more: the per-call forms
        bank = self.loraxir_experts[adapter]
        unit = _gate_of_one(*kept.rows_key[1:])

        def one_expert(row: tuple[float, ...]) -> torch.Tensor:
            weight = folds.get(row)
            if weight is None:
                weight = compute.fold_weight(self.base_layer, *bank.stacked(), row)
                if len(folds) > bank.num_experts:  # E one-expert rows and the zero row
                    folds.pop(next(iter(folds)))
                folds[row] = weight
            return weight

        def fold(row: tuple[float, ...]) -> torch.Tensor:
            support = [(e, c) for e, c in enumerate(row) if c != 0.0]
            if len(support) < 2:
                return one_expert(row)
            alone = [tuple(unit if i == e else 0.0 for i in range(len(row))) for e, _ in support]
            (_, c_a), (_, c_b) = support
            return torch.lerp(one_expert(alone[1]), one_expert(alone[0]), c_a / (c_a + c_b))

        return compute.folded_forward(
            self.base_layer, x, groups, fold, options.get("output_padding")
        )

    def _kept_folds(self, adapter: str) -> _KeptFolds | None:
        """The folds kept for ``adapter``, emptied when a tensor they derive from changed in
        place (its version counter moved: ``load_state_dict``, merge, edits under
        ``no_grad``), when the base weight was replaced by another tensor
        (``load_state_dict(assign=True)``, ``torch.func.functional_call``), when the
        adapter's bank or scaling is another (deleted and added again under its name), or
        when autocast changed. ``.to()``, ``train()``/``eval()``, a call with gradients and
        growing the bank drop them outright, because some updates move no version counter
        (fused optimizers, writes through ``.data``). ``None`` for inference tensors, which
        carry no version. A hit costs about 4 µs (the banks' tensors are gathered on a miss
        only)."""
        weight = self.base_layer.weight
        autocast = _autocast_state(weight.device.type)
        kept = self.__dict__.get("_loraxir_kept_folds")
        if (
            kept is not None
            and kept.adapter == adapter
            # nn.Module attribute lookups cost ~0.7 µs each: read the module dicts directly
            and self._modules["loraxir_experts"]._modules.get(adapter) is kept.bank
            and kept.rows_key[1] == self.scaling(adapter)
            and kept.steps == _optimizer_steps[0]
            and kept.autocast == autocast
            and kept.tensors[0] is weight  # replaced: assign=True loads, functional_call
            # factors swapped by functional_call (an EMA evaluation); slots in ``.values()``
            # order are the tensors' order (A chunks, then B chunks)
            and list(map(id, kept.factors[0].values())) + list(map(id, kept.factors[1].values()))
            == kept.factor_ids
            and tuple(map(_version, kept.tensors)) == kept.versions
        ):
            return kept
        bank = self.loraxir_experts[adapter]
        tensors = (weight, *bank.A, *bank.B)  # iterating the banks costs ~7 µs: misses only
        if any(t.is_inference() for t in tensors):
            return None
        scaling = self.scaling(adapter)
        dtype = bank.A[0].dtype
        kept = _KeptFolds(
            adapter,
            tensors,
            tuple(map(_version, tensors)),
            bank,
            (bank.A._parameters, bank.B._parameters),
            list(map(id, tensors[1:])),
            _optimizer_steps[0],
            autocast,
            tuple(self.live_experts(adapter)),
            {},
            ("foldable_rows", scaling, dtype),
            functools.partial(_foldable_rows, scaling=scaling, dtype=dtype),
            compute.weight_op(self.base_layer),
        )
        self.__dict__["_loraxir_kept_folds"] = kept
        return kept

    def live_experts(self, adapter: str) -> list[bool]:
        """Whether each expert of ``adapter`` has a non-zero ``B`` in this layer."""
        return _nonzero_rows(self.loraxir_experts[adapter].stacked()[1])

    def drop_kept_folds(self) -> None:
        """Free the weights kept by :meth:`_forward_with_kept_folds`."""
        self.__dict__.pop("_loraxir_kept_folds", None)

    def __getstate__(self) -> dict[str, Any]:
        # Copies (deepcopy, pickle, torch.save of the module) start without kept folds: a
        # copy's tensors restart their version counters, which could match the old ones.
        state = dict(super().__getstate__())
        state.pop("_loraxir_kept_folds", None)
        return state

    def train(self, mode: bool = True) -> Any:
        # Switching phase brackets training steps: start the next inference with fresh folds.
        self.drop_kept_folds()
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # .to(), .half(), .cuda() may replace parameter storage without a version change.
        self.drop_kept_folds()
        return super()._apply(fn, recurse)

    def _call_options(
        self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """Extra arguments of the base ``forward`` as keyword arguments of the forms (none
        for ``Linear`` and ``Conv2d``, whose ``forward`` takes only the input)."""
        if args or kwargs:
            raise TypeError(
                f"{type(self.base_layer).__name__}.forward takes only the input, got extra "
                f"arguments {args} {sorted(kwargs)}."
            )
        return {}

    def _used_experts(
        self, adapter: str, a: torch.Tensor, b: torch.Tensor, gates: torch.Tensor
    ) -> _UsedExperts | None:
        """The experts that contribute to this call and the form that computes them, or
        ``None`` when none does (the base output is then exact).

        Skipped: experts whose gate is zero for every image, unless the gates need
        gradients (dL/dg of a zero gate is not zero); experts whose ``B`` is still zero,
        unless ``B`` gets a gradient. Skipping makes top-k cheap and keeps old degradations
        bit-identical when experts are added. ``fresh`` says that some kept expert has
        ``B = 0`` and trains: the forms then run the base op itself (``exact_base``), so
        that fresh experts return the base output bit for bit in training too.

        ``B`` is read on every call (an optimizer changes it in place without a trace),
        except when one base call with a folded weight serves the whole batch: a zero
        ``B`` then adds exact zeros, so skipping it only saves time. Everything derived
        from the gates alone is computed once per call and shared by the layers
        (:meth:`RoutingState.derived`).
        """
        scaling = self.scaling(adapter)
        if torch.compiler.is_compiling():
            coeffs = gates.to(a.dtype) * scaling
            return _UsedExperts(a, b, coeffs, None, False, self._choose_compute(adapter, None))
        if gates.requires_grad:
            used = tuple(range(a.shape[0]))
        else:
            used = self.routing.derived("support", _gate_support)
            if not used:
                return None
        coeffs, groups = self._coefficients(gates, used, scaling, a.dtype)
        form = self._choose_compute(adapter, groups)
        trains_b = torch.is_grad_enabled() and b.requires_grad
        fresh = False
        if trains_b or form != "weight" or groups is None or len(groups.rows) > 1:
            nonzero = _nonzero_rows(_select(b, used))
            if trains_b:
                fresh = not all(nonzero)
            elif not all(nonzero):
                used = tuple(e for e, kept in zip(used, nonzero, strict=True) if kept)
                if not used:
                    return None
                coeffs, groups = self._coefficients(gates, used, scaling, a.dtype)
                form = self._choose_compute(adapter, groups)
        return _UsedExperts(_select(a, used), _select(b, used), coeffs, groups, fresh, form)

    def _coefficients(
        self, gates: torch.Tensor, used: tuple[int, ...], scaling: float, dtype: torch.dtype
    ) -> tuple[torch.Tensor, compute.RowGroups | None]:
        """Coefficients ``gates[:, used] * scaling`` ``(N, k)`` and their row groups
        (``None`` when the gates need gradients). In the factors' dtype: under autocast
        ``x`` may be bf16/fp16 while the gates and factors stay float32, and the forms cast
        where they compute."""
        if gates.requires_grad:
            return _select(gates.to(dtype), used, dim=1) * scaling, None
        return self.routing.derived(
            ("coefficients", used, scaling, dtype),
            lambda g: _coefficients(g, used, scaling, dtype),
        )

    def _choose_compute(self, adapter: str, groups: compute.RowGroups | None) -> str:
        """``compute`` when fixed, else the planned form for this call (see module doc)."""
        if self.compute != "auto":
            return compute.check_form(self.compute)
        training = self.training and torch.is_grad_enabled()
        return self.loraxir_plan[adapter].pick(
            training=training,
            shared_row=groups is not None and len(groups.rows) == 1,
            mixed_rows=groups is not None and len(groups.rows) > 1 and groups.mixed,
            dropout=self.training and self.loraxir_dropout[adapter] > 0,
            compiling=torch.compiler.is_compiling(),
            grouped=getattr(self.base_layer, "groups", 1) > 1,
            tuned=self.tuned.get("training" if training else "inference"),
        )

    # ------------------------------------------------------- subclass contract
    @staticmethod
    def factor_shapes(base_layer: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of one expert's ``A`` and ``B`` for ``base_layer`` (no layer needed, so
        that a checkpoint can be checked against a backbone before anything is changed)."""
        return compute.factor_shapes(base_layer, r)

    def _dropped(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.loraxir_dropout[adapter], self.training)

    def __repr__(self) -> str:
        return f"loraxir.{super().__repr__()}"


class Linear(LoraIRLayer, nn.Module):
    """Expert layer for ``nn.Linear``; inputs ``(N, ..., in)`` with ``N`` image-major."""

    def __init__(self, base_layer: nn.Linear, routing: RoutingState) -> None:
        super().__init__()
        self._init_layer(base_layer, routing)


class Conv2d(LoraIRLayer, nn.Module):
    """Expert layer for ``nn.Conv2d`` of any kernel, stride, dilation, groups (depthwise
    included), bias, ``padding_mode`` and ``padding="same"``.

    For ``groups = g`` the weight is the matrix ``(out, in/g * kh * kw)`` and each expert is
    ``B_i (out, r) @ A_i (r, in/g * kh * kw)``, the same grouping as the base convolution.
    """

    def __init__(self, base_layer: nn.Conv2d, routing: RoutingState) -> None:
        super().__init__()
        self._init_layer(base_layer, routing)


class ConvTranspose2d(LoraIRLayer, nn.Module):
    """Expert layer for ``nn.ConvTranspose2d`` with ``groups=1``.

    ``A_i`` is a 1x1 map ``in -> r`` and ``B_i`` a transposed convolution ``r -> out`` with
    the base kernel, so ``dW_i = A_i^T @ B_i`` as a matrix ``(in, out * kh * kw)``.
    """

    def __init__(self, base_layer: nn.ConvTranspose2d, routing: RoutingState) -> None:
        if base_layer.groups != 1:
            raise TargetModulesError(
                f"ConvTranspose2d with groups={base_layer.groups} is not supported; only groups=1. "
                "Exclude this module with exclude_modules."
            )
        super().__init__()
        self._init_layer(base_layer, routing)

    def _call_options(
        self, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """``output_size`` (as ``nn.ConvTranspose2d.forward`` takes it) as the output padding
        every form must use."""
        if len(args) + len(kwargs) > 1 or set(kwargs) - {"output_size"}:
            raise TypeError(
                f"ConvTranspose2d.forward takes the input and output_size, got extra arguments "
                f"{args} {sorted(kwargs)}."
            )
        output_size = args[0] if args else kwargs.get("output_size")
        conv = self.base_layer
        padding = conv._output_padding(
            x, output_size, conv.stride, conv.padding, conv.kernel_size, 2, conv.dilation
        )
        return {"output_padding": padding}


LAYER_TYPES: dict[type[nn.Module], type[LoraIRLayer]] = {
    nn.Linear: Linear,
    nn.Conv2d: Conv2d,
    nn.ConvTranspose2d: ConvTranspose2d,
}


def wrap_layer(base_layer: nn.Module, routing: RoutingState) -> LoraIRLayer:
    """Wrap a supported module in its expert layer (raises for unsupported types)."""
    for base_type, layer_type in LAYER_TYPES.items():
        if type(base_layer) is base_type:
            return layer_type(base_layer, routing)
    supported = ", ".join(t.__name__ for t in LAYER_TYPES)
    raise TargetModulesError(
        f"Cannot attach experts to a {type(base_layer).__name__}; supported types are {supported}. "
        "Narrow target_modules or add the module to exclude_modules."
    )
