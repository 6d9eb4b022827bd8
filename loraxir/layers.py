"""Routed low-rank expert layers for ``nn.Linear``, ``nn.Conv2d`` and ``nn.ConvTranspose2d``.

Each wrapped layer computes, for per-image gates ``g`` (B, E) and scaling ``s = alpha / r``::

    y = base(x) + sum_i g_i * s * (dW_i * x),      dW_i = low-rank product of expert i

The experts of one layer live in one :class:`ExpertBank` (stacked ``A`` and ``B`` tensors),
never one module per expert: DDP rejects parameters that a top-k step leaves unused.

Three exact ways to compute the same output (``compute=``):

``"activation"``
    ``A`` of all experts as one convolution (base kernel, stride, dilation, groups,
    padding mode) to ``E*r`` channels, scale each expert's ``r`` channels by its gate, then
    ``B`` as one 1x1 map. Costs one LoRA of rank ``E*r``; the only form that supports
    ``lora_dropout`` (dropout acts on the experts' input).
``"weight"``
    Group the images by identical gate rows; for each group fold the gated experts into
    the base weight and run the base operation once. With top-1 gating and one
    degradation per batch this is a single base call.
``"batched"``
    Fold a weight per image and run all images as one grouped operation.

``"auto"`` picks per call: ``weight`` when all gates are equal, else ``activation`` while
dropout is active or when compiling, else the layer's tuned choice (``LoraIRModel.autotune``
measures it) and ``weight`` by default (fastest on CPU in our measurements).

These layers know nothing of routers: they read gates from a shared
:class:`~loraxir.routing.RoutingState`.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from loraxir.errors import ConfigError, RoutingError, TargetModulesError
from loraxir.routing import RoutingState

COMPUTE_MODES = ("auto", "activation", "weight", "batched")


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


class LoraIRLayer(BaseTunerLayer):
    """Mixin shared by the expert layers: adapter bookkeeping, gating, merge, dispatch.

    Subclasses describe their operation through a few small methods
    (``_op``, ``_batched_op``, ``_activation_delta``, ``_delta_weights``).
    """

    adapter_layer_names: ClassVar[tuple[str, ...]] = ("loraxir_experts",)
    other_param_names: ClassVar[tuple[str, ...]] = ("loraxir_r", "loraxir_alpha", "loraxir_dropout")

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
    ) -> None:
        """Add an adapter's expert bank to this layer, ``chunks`` experts at a time."""
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
        self.set_adapter(self.active_adapters)

    def scaling(self, adapter_name: str) -> float:
        return self.loraxir_alpha[adapter_name] / self.loraxir_r[adapter_name]

    def _single_active_adapter(self) -> str:
        active = [a for a in self.active_adapters if a in self.loraxir_experts]
        if len(active) != 1:
            raise RoutingError(
                f"Exactly one loraxir adapter can be active at a time, got {active}. "
                "Use model.set_adapter(name)."
            )
        return active[0]

    # ------------------------------------------------------------------ merging
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the experts, mixed by the routing state's fixed ``merge_gate``, into the
        base weight. The original weight is kept so that :meth:`unmerge` is bit-exact."""
        if self.merged:
            return
        adapter = self._single_active_adapter() if adapter_names is None else adapter_names[0]
        weight = self.base_layer.weight
        with torch.no_grad():
            merged = weight + self.get_delta_weight(adapter).to(weight)
            if safe_merge and not bool(torch.isfinite(merged).all()):
                raise RoutingError(f"Merging adapter {adapter!r} produced non-finite weights.")
            self._loraxir_unmerged_weight = weight.detach().clone()
            weight.copy_(merged)
        self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Restore the exact base weight saved by :meth:`merge`."""
        if not self.merged:
            return
        with torch.no_grad():
            self.base_layer.weight.copy_(self._loraxir_unmerged_weight)
        self._loraxir_unmerged_weight = None
        self.merged_adapters = []

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The gated weight difference for the routing state's ``merge_gate`` (peft API)."""
        gate = self.routing.merge_gate
        if gate is None:
            raise RoutingError(
                "Merging routed experts needs a fixed gate: call model.merge(degradation=...) or "
                "model.merge(gates=...) (or model.merge_and_unload(degradation=...))."
            )
        coeffs = gate.to(self.base_layer.weight).reshape(1, -1) * self.scaling(adapter_name)
        return self._delta_weights(*self.loraxir_experts[adapter_name].stacked(), coeffs)[0]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return self.base_layer(x, *args, **kwargs)
        adapter = self._single_active_adapter()
        gates = self.routing.require_gates()
        num_images = gates.shape[0]
        if x.shape[0] % num_images:
            raise RoutingError(
                f"{type(self.base_layer).__name__} input has leading dimension {x.shape[0]}, "
                f"not a multiple of the {num_images} routed images; expert layers expect inputs "
                "whose leading dimension is image-major (images, or windows of images)."
            )
        coeffs = gates.to(x.dtype) * self.scaling(adapter)
        a, b = self.loraxir_experts[adapter].stacked()
        fresh = False
        if not torch.compiler.is_compiling():
            # Skip experts that contribute exactly nothing (zero gate for every image, or B
            # still zero when B gets no gradient): faster for top-k, and old degradations stay
            # bit-identical when experts are added. Experts with B = 0 that must train go
            # through the activation form, whose delta is exactly zero, so that fresh
            # experts return the base output bit for bit in training too.
            contributes = (coeffs != 0).any(0)
            b_nonzero = (b.flatten(1) != 0).any(1)
            if torch.is_grad_enabled() and b.requires_grad:
                fresh = bool((contributes & ~b_nonzero).any())
            else:
                contributes = contributes & b_nonzero
            used = contributes.nonzero().flatten()
            if used.numel() == 0:
                return self.base_layer(x, *args, **kwargs)
            if used.numel() < coeffs.shape[1]:
                a, b, coeffs = a[used], b[used], coeffs[:, used]
        mode = (
            "activation"
            if fresh and self.compute == "auto"
            else self._choose_compute(adapter, coeffs)
        )
        if mode == "activation":
            delta = self._activation_delta(a, b, self._dropped(adapter, x), coeffs)
            return self.base_layer(x, *args, **kwargs) + delta
        if mode == "batched":
            return self._batched_op(x, self.base_layer.weight + self._delta_weights(a, b, coeffs))
        return self._weight_forward(a, b, x, coeffs)

    def _choose_compute(self, adapter: str, coeffs: torch.Tensor) -> str:
        if self.compute != "auto":
            if self.compute != "activation" and self.training and self.loraxir_dropout[adapter] > 0:
                raise ConfigError(
                    f"compute={self.compute!r} cannot apply lora_dropout; use compute='activation' "
                    "or lora_dropout=0."
                )
            return self.compute
        if torch.compiler.is_compiling():
            return "activation" if self._supports_activation_cheaply() else "batched"
        if self.training and self.loraxir_dropout[adapter] > 0:
            return "activation"
        if coeffs.requires_grad and coeffs.shape[0] > 1:
            # Gates being trained: grouping images by gate row would mix their gradients.
            return "activation" if self._supports_activation_cheaply() else "weight"
        phase = "training" if self.training and torch.is_grad_enabled() else "inference"
        if phase == "inference" and (coeffs.shape[0] == 1 or bool((coeffs == coeffs[:1]).all())):
            return "weight"
        return self.tuned.get(phase, "weight")

    def _supports_activation_cheaply(self) -> bool:
        """Whether the activation form costs about one LoRA of rank E*r (not for grouped
        convolutions, where it expands every group to E*r channels)."""
        return True

    def _weight_forward(
        self, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, coeffs: torch.Tensor
    ) -> torch.Tensor:
        """Run the base op once per distinct gate row, with that row folded into the weight.

        Images are grouped by identical rows only when the gates need no gradient: a
        shared folded weight cannot tell which image's gate a gradient belongs to.
        """
        num_images = coeffs.shape[0]
        shared = not coeffs.requires_grad
        if num_images == 1 or (shared and bool((coeffs == coeffs[:1]).all())):
            weight = self.base_layer.weight + self._delta_weights(a, b, coeffs[:1])[0]
            return self._op(x, weight)
        if shared:
            unique, inverse = torch.unique(coeffs, dim=0, return_inverse=True)
        else:
            unique, inverse = coeffs, torch.arange(num_images, device=coeffs.device)
        deltas = self._delta_weights(a, b, unique)
        per_image = x.reshape(num_images, x.shape[0] // num_images, *x.shape[1:])
        order = torch.argsort(inverse, stable=True)
        outputs = []
        for u in range(unique.shape[0]):
            images = (inverse == u).nonzero().flatten()
            chunk = per_image[images].flatten(0, 1)
            out = self._op(chunk, self.base_layer.weight + deltas[u])
            outputs.append(out.reshape(images.numel(), -1, *out.shape[1:]))
        stacked = torch.cat(outputs)[torch.argsort(order)]
        return stacked.flatten(0, 1)

    # ------------------------------------------------------- subclass contract
    @staticmethod
    @abstractmethod
    def factor_shapes(base_layer: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of one expert's ``A`` and ``B`` for ``base_layer`` (no layer needed, so
        that a checkpoint can be checked against a backbone before anything is changed)."""

    @abstractmethod
    def _delta_weights(
        self, a: torch.Tensor, b: torch.Tensor, coeffs: torch.Tensor
    ) -> torch.Tensor:
        """``(N, *weight.shape)``: ``sum_e coeffs[n, e] * dW_e`` for each row of ``coeffs``."""

    @abstractmethod
    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base operation with another weight (same bias and hyper-parameters)."""

    @abstractmethod
    def _batched_op(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The base operation with one weight per image, ``weights`` ``(B, *weight.shape)``."""

    @abstractmethod
    def _activation_delta(
        self, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, coeffs: torch.Tensor
    ) -> torch.Tensor:
        """``sum_e coeffs[b, e] * (dW_e * x)`` computed through the factors ``a``, ``b``
        (``(E, *a_shape)``, ``(E, *b_shape)``) without forming any ``dW_e``."""

    def _dropped(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.loraxir_dropout[adapter], self.training)

    def __repr__(self) -> str:
        return f"loraxir.{super().__repr__()}"


def _rows_per_image(coeffs: torch.Tensor, leading: int) -> torch.Tensor:
    """Repeat per-image coefficients over the rows (windows, tokens) of each image."""
    return coeffs.repeat_interleave(leading // coeffs.shape[0], dim=0)


class Linear(LoraIRLayer, nn.Module):
    """Expert layer for ``nn.Linear``; inputs ``(N, ..., in)`` with ``N`` image-major."""

    def __init__(self, base_layer: nn.Linear, routing: RoutingState) -> None:
        super().__init__()
        self._init_layer(base_layer, routing)

    @staticmethod
    def factor_shapes(base_layer: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, base_layer.in_features), (base_layer.out_features, r)

    def _delta_weights(
        self, a: torch.Tensor, b: torch.Tensor, coeffs: torch.Tensor
    ) -> torch.Tensor:
        return torch.einsum("ne,eor,eri->noi", coeffs, b, a)

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.base_layer.bias)

    def _batched_op(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        per_image = x.reshape(weights.shape[0], -1, x.shape[-1])
        out = torch.bmm(per_image, weights.transpose(1, 2))
        if self.base_layer.bias is not None:
            out = out + self.base_layer.bias
        return out.reshape(*x.shape[:-1], -1)

    def _activation_delta(
        self, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, coeffs: torch.Tensor
    ) -> torch.Tensor:
        experts, rank = a.shape[0], a.shape[1]
        z = F.linear(x, a.reshape(experts * rank, -1))
        rows = _rows_per_image(coeffs, x.shape[0])
        z = z.unflatten(-1, (experts, rank)) * rows.reshape(
            rows.shape[0], *([1] * (x.dim() - 2)), experts, 1
        )
        return F.linear(z.flatten(-2), b.permute(1, 0, 2).reshape(b.shape[1], experts * rank))


class _ConvLayer(LoraIRLayer):
    """The weight forms shared by convolutions: the base op with another weight, and one
    weight per image as a grouped convolution over the batch (``groups * B``)."""

    @abstractmethod
    def _functional(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int
    ) -> torch.Tensor:
        """The base layer's functional call with another weight, bias and group count."""

    def _op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._functional(x, weight, self.base_layer.bias, self.base_layer.groups)

    def _batched_op(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        n = weights.shape[0]
        bias = self.base_layer.bias
        out = self._functional(
            x.reshape(1, -1, *x.shape[2:]),
            weights.flatten(0, 1),
            None if bias is None else bias.repeat(n),
            self.base_layer.groups * n,
        )
        return out.reshape(n, -1, *out.shape[2:])


class Conv2d(_ConvLayer, nn.Module):
    """Expert layer for ``nn.Conv2d`` of any kernel, stride, dilation, groups (depthwise
    included), bias, ``padding_mode`` and ``padding="same"``.

    For ``groups = g`` the weight is the matrix ``(out, in/g * kh * kw)`` and each expert is
    ``B_i (out, r) @ A_i (r, in/g * kh * kw)``, the same grouping as the base convolution.
    """

    def __init__(self, base_layer: nn.Conv2d, routing: RoutingState) -> None:
        super().__init__()
        self._init_layer(base_layer, routing)

    @staticmethod
    def factor_shapes(base_layer: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        w = base_layer.weight
        return (r, math.prod(w.shape[1:])), (w.shape[0], r)

    def _supports_activation_cheaply(self) -> bool:
        return self.base_layer.groups == 1

    def _delta_weights(
        self, a: torch.Tensor, b: torch.Tensor, coeffs: torch.Tensor
    ) -> torch.Tensor:
        delta = torch.einsum("ne,eor,eri->noi", coeffs, b, a)
        return delta.reshape(coeffs.shape[0], *self.base_layer.weight.shape)

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Apply a non-zero padding mode explicitly, as ``nn.Conv2d`` does internally."""
        conv = self.base_layer
        if conv.padding_mode != "zeros":
            return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0
        return x, conv.padding

    def _functional(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int
    ) -> torch.Tensor:
        conv = self.base_layer
        x, padding = self._padded(x)
        return F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, groups)

    def _activation_delta(
        self, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, coeffs: torch.Tensor
    ) -> torch.Tensor:
        groups = self.base_layer.groups
        experts, rank = a.shape[0], a.shape[1]
        kernel = a.reshape(experts * rank, *self.base_layer.weight.shape[1:])
        z = self._functional(x, kernel.repeat(groups, 1, 1, 1), None, groups)
        z = z.unflatten(1, (groups, experts, rank)) * coeffs[:, None, :, None, None, None]
        mix = b.permute(1, 0, 2).reshape(b.shape[1], experts * rank, 1, 1)
        return F.conv2d(z.flatten(1, 3), mix, groups=groups)


class ConvTranspose2d(_ConvLayer, nn.Module):
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

    @staticmethod
    def factor_shapes(base_layer: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        w = base_layer.weight
        return (r, w.shape[0]), (r, math.prod(w.shape[1:]))

    def _delta_weights(
        self, a: torch.Tensor, b: torch.Tensor, coeffs: torch.Tensor
    ) -> torch.Tensor:
        delta = torch.einsum("ne,eri,erj->nij", coeffs, a, b)
        return delta.reshape(coeffs.shape[0], *self.base_layer.weight.shape)

    def _functional(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int
    ) -> torch.Tensor:
        conv = self.base_layer
        return F.conv_transpose2d(
            x, weight, bias, conv.stride, conv.padding, conv.output_padding, groups, conv.dilation
        )

    def _activation_delta(
        self, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, coeffs: torch.Tensor
    ) -> torch.Tensor:
        experts, rank = a.shape[0], a.shape[1]
        z = F.conv2d(x, a.reshape(experts * rank, -1, 1, 1))
        z = z.unflatten(1, (experts, rank)) * coeffs[:, :, None, None, None]
        kernel = b.reshape(experts * rank, *self.base_layer.weight.shape[1:])
        return self._functional(z.flatten(1, 2), kernel, None, 1)


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
