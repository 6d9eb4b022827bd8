"""The exact compute forms of a routed expert layer, and the per-shape cost model that
picks one.

A routed expert layer wrapping a base operation ``op`` (``nn.Linear``, ``nn.Conv2d`` or
``nn.ConvTranspose2d``) with weight ``W0`` computes, for image ``n`` and coefficients
``c[n, e] = g[n, e] * alpha / r``::

    y_n = op(x_n, W0) + sum_e c[n, e] * op(x_n, dW_e),        dW_e = low-rank product of e

Every form below computes exactly that (up to float rounding; outputs and the gradients of
``x``, the factors and the coefficients). They differ in where the mixture is applied:

``"activation"``
    ``A`` of all ``E`` experts as one operation to ``E*r`` channels, scaled per image,
    then ``B``: one LoRA of rank ``E*r`` beside the base op. The only form that can apply
    ``lora_dropout`` (on the experts' input). Expensive for grouped convolutions (every
    group expands to ``E*r`` channels).
``"weight"``
    Images grouped by identical coefficient rows; each group's mixture is folded into the
    weight (one ``addmm`` per expert) and the base op runs once per group. One distinct row
    (one degradation for the batch) is a single base call: the cheapest form there is.
    When folding costs more multiply-adds than the low-rank path over the call's pixels
    (a 1x1 convolution on a pooled 1x1 map, a bottleneck on 8x8), the layer runs the base
    op and adds ``B (c * (A x))`` instead; decided per call (:func:`folds_cost_more`).
``"batched"``
    One folded weight per image, all images in one call: a batched matmul for ``Linear``
    and 1x1 convolutions, a grouped convolution with ``groups = B * groups`` otherwise.
``"gathered"``
    Each image uses only its own experts: the ``k`` experts with a non-zero coefficient
    (``k = 1`` for top-1 routing; all ``E`` when the coefficients need gradients, because a
    zero gate has a non-zero gradient) are gathered per image as one rank ``k*r`` LoRA with
    the coefficients folded into the small ``B`` factors. For ``Linear`` and 1x1
    convolutions one fused operation runs ``x -> (W0 + B_n A_n) x`` and its backward
    computes the input gradient with the folded weight and the factor gradients through
    rank ``k*r`` products: no gradient of the ``(out, in)`` weight is formed. Where a fold
    per image costs more than the rank path over the image's pixels (a U-Net's bottleneck
    on an 8x8 map), the base op runs with ``W0`` and the rank path is added instead; decided
    per call, like ``"weight"``'s fold (:func:`_rank_path_is_cheaper`). For other
    dense convolutions the base op runs with ``W0`` and the rank ``k*r`` path as a grouped
    convolution over the batch, added in a fused ``baddbmm``. For grouped convolutions it
    is ``"batched"`` restricted to the gathered experts.

``exact_base=True`` (for experts whose ``B`` is still zero) makes ``"weight"``,
``"batched"`` and ``"gathered"`` compute ``op(x, W0) + delta`` with the base op itself, so
that zero experts give the base output bit for bit; the fast fused forms may differ from
the base op by float rounding (their kernels add in another order, and a convolution of
part of the batch may round unlike one of the whole batch). ``"activation"`` is exact by
construction (``delta = 0``).

**Cost model** (:func:`plan_forms`, fixed per layer shape when the layer is wrapped).
Per output pixel, the base op costs ``F = fan_in * out`` multiply-adds (``fan_in =
in/groups * kh * kw``) forward, and as much again for each of its input and weight
gradients. An experts-only training step never needs the frozen base's weight gradient,
so the forms are compared by what they add to forward plus input gradient:

- ``"gathered"`` (fused, 1x1 and ``Linear``): ``2*k*r*(fan_in + out)`` (rank products
  for the factor gradients); dense ``kxk`` (base op + low-rank path): ``3*k*r*(fan_in +
  out)``;
- folding in training: the weight gradient of the folded weight, ``F``. ``Linear`` and
  1x1 layers fold per image (``"batched"``: one batched matmul); dense ``kxk``
  convolutions fold per group of images sharing a row (``"weight"``: a plain
  convolution per group, which on a CPU ran the 32 -> 3 output convolution of NAFNet in
  half the time of the grouped convolution over the batch that ``"batched"`` needs).

The cheaper one is the layer's training form; grouped convolutions always fold per image
(``"batched"``: the factored path would expand every group, and a depthwise convolution
per group of images cost more than one grouped call over the batch). In inference every layer
uses ``"weight"``: running the base op once per group of images costs about what running
the bare backbone one image at a time costs, and each fold is ``k*r*F`` against ``H*W*F``
for the op (measured on NAFNet-w32, 128², 4 images routed to 4 experts: ``"weight"`` on
every layer beat ``"batched"`` and ``"gathered"``, whose grouped convolution over the batch
runs slower than the depthwise base). :meth:`FormPlan.pick` applies what only a call
knows: one distinct row -> ``"weight"`` in inference, and in training where the plan folds
(one weight gradient for the batch instead of one per image), several rows of which some
mix experts (soft top-k) -> ``"gathered"`` in inference, dropout -> ``"activation"``,
``torch.compile`` -> a form without data-dependent shapes. ``LoraIRModel.autotune``
refines the plan by timing whole model calls. Expert layers may keep the folds of
one-expert rows between inference calls (:func:`folded_forward` with their own ``fold``;
see ``LoraIRModel.cache_folds``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraxir.errors import ConfigError, TargetModulesError, unknown_name

FORMS = ("activation", "weight", "batched", "gathered")


# --------------------------------------------------------------------------- cost model
@dataclass(frozen=True)
class FormPlan:
    """The forms a layer of one shape uses without tuning, per phase."""

    inference: str
    training: str

    def pick(
        self,
        *,
        training: bool,
        shared_row: bool,
        dropout: bool,
        compiling: bool,
        grouped: bool,
        tuned: str | None = None,
        mixed_rows: bool = False,
    ) -> str:
        """The form for one call.

        Args:
            training: a training step (gradients of the factors are needed).
            shared_row: every image has the same coefficient row (and the coefficients need
                no gradient).
            dropout: ``lora_dropout`` is active (only ``"activation"`` applies it).
            compiling: inside ``torch.compile`` (no data-dependent shapes or branches).
            grouped: the base op is a grouped convolution.
            tuned: the form ``autotune`` chose for this phase, if any.
            mixed_rows: several distinct coefficient rows, some mixing experts (soft top-k
                over a batch). Every image then needs a weight of its own; in inference
                ``"gathered"`` applies them in one call (each image's rank ``k*r`` path, or
                its own fold where that is cheaper) instead of a base call per row: on
                NAFNet-w32, 4 images of 128² with soft top-2 rows, 1.26-1.44× the bare
                backbone against 1.82-2.07× for ``"weight"`` (2-core CPU, two runs of a
                throwaway script; ``benchmarks/overhead.py``: 1.49× against 1.87-2.16×).
                With kept folds (inference, ``cache_folds``) and top-2 rows, the layer
                mixes each image's weight from them instead (``LoraIRLayer``).
        """
        if dropout:
            return "activation"
        if compiling:
            return "batched" if grouped else "activation"
        if shared_row and not training:
            return "weight"
        if tuned is not None:
            return tuned
        if mixed_rows and not training:
            return "gathered"
        if shared_row and self.training == "batched":
            return "weight"  # one fold and one weight gradient for the batch, not one per image
        return self.training if training else self.inference


# A layer runs a batch of several gate rows in one call with a weight per image from this
# many positions (pixels, tokens) per image (NAFNet-w32's 16² bottleneck at 128² inputs
# gained), or when its weights for the batch hold at most this many numbers (a channel
# attention's 1x1 on a pooled map, for a few images).
STACK_MIN_POSITIONS = 256
STACK_MAX_ELEMENTS = 1 << 20


def plan_forms(base: nn.Module, rank: int, experts_per_image: int) -> FormPlan:
    """The cost model's choice for ``base`` with rank-``rank`` experts, ``experts_per_image``
    of them used per image (the router's ``top_k``); see the module docstring."""
    kind = _kind(base)
    if kind == "conv" and base.groups > 1:
        return FormPlan(inference="weight", training="batched")
    k_r = experts_per_image * rank
    fan_in, out = _fan_in_out(base)
    fold = fan_in * out
    if kind == "linear" or _is_pointwise(base):
        training = "gathered" if 2 * k_r * (fan_in + out) <= fold else "batched"
    else:
        training = "gathered" if 3 * k_r * (fan_in + out) <= fold else "weight"
    return FormPlan(inference="weight", training=training)


def _fan_in_out(base: nn.Module) -> tuple[int, int]:
    """``(fan_in, out)``: the weight as the matrix the experts' product ``dW`` has."""
    if _kind(base) == "conv_transpose":
        return base.in_channels, base.out_channels * math.prod(base.kernel_size)
    return math.prod(base.weight.shape[1:]), base.weight.shape[0]


def check_form(form: str) -> str:
    """``form`` if it names a compute form (or ``"auto"``), else a clear error."""
    if form == "auto" or form in FORMS:
        return form
    raise unknown_name("compute form", form, ("auto", *FORMS))


# ----------------------------------------------------------------------------- shapes
def factor_shapes(base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of one expert's ``A`` and ``B`` for ``base``.

    ``Linear``: ``A (r, in)``, ``B (out, r)``. ``Conv2d`` with ``groups = G``: the weight
    as the matrix ``(out, in/G * kh * kw)``, ``A (r, in/G * kh * kw)``, ``B (out, r)`` (the
    same low-rank product in every group). ``ConvTranspose2d``: ``A (r, in)`` a 1x1 map and
    ``B (r, out * kh * kw)`` a transposed convolution with the base kernel, so that ``dW =
    A^T B`` as the matrix ``(in, out * kh * kw)``.
    """
    w = base.weight
    if _kind(base) == "conv_transpose":
        return (rank, w.shape[0]), (rank, math.prod(w.shape[1:]))
    return (rank, math.prod(w.shape[1:])), (w.shape[0], rank)


def delta_weights(
    base: nn.Module, a: torch.Tensor, b: torch.Tensor, coeffs: torch.Tensor
) -> torch.Tensor:
    """``(N, *weight.shape)``: ``sum_e coeffs[n, e] * dW_e`` for each row of ``coeffs``."""
    if _kind(base) == "conv_transpose":
        delta = torch.einsum("ne,eri,erj->nij", coeffs, a, b)
    else:
        delta = torch.einsum("ne,eor,eri->noi", coeffs, b, a)
    return delta.reshape(coeffs.shape[0], *base.weight.shape)


# ---------------------------------------------------------------------------- forms
def routed_forward(
    form: str,
    base: nn.Module,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    coeffs: torch.Tensor,
    *,
    output_padding: Any = None,
    exact_base: bool = False,
    expert_input: torch.Tensor | None = None,
    groups: RowGroups | None = None,
) -> torch.Tensor:
    """``base(x) + sum_e coeffs[n, e] * (dW_e * x_n)`` computed by ``form``.

    Args:
        form: one of :data:`FORMS`.
        base: the wrapped ``nn.Linear``, ``nn.Conv2d`` or ``nn.ConvTranspose2d``.
        x: input whose leading dimension is image-major: ``N * m`` rows (``m`` windows,
            frames or tiles per image) for ``N`` coefficient rows (one row serves all).
        a, b: stacked factors ``(E, *a_shape)``, ``(E, *b_shape)`` (:func:`factor_shapes`).
        coeffs: ``(N, E)`` gate times ``alpha / r``, in the factors' dtype.
        output_padding: a ``ConvTranspose2d``'s output padding for this call (from its
            ``output_size``); ``None`` uses the layer's.
        exact_base: run the base op itself and add the delta (see the module docstring).
        expert_input: the experts' input when it differs from the base op's (``x`` after
            ``lora_dropout``); only the ``"activation"`` form takes one.
        groups: :func:`group_rows` of ``coeffs`` when the caller has it (a layer shares one
            per call); the ``"weight"`` form computes it otherwise.
    """
    ops = _ops_for(base, output_padding)
    if expert_input is not None and form != "activation":
        raise ConfigError(
            f"compute={form!r} cannot apply lora_dropout; use compute='activation' or "
            "lora_dropout=0."
        )
    if form == "activation":
        delta_input = x if expert_input is None else expert_input
        return ops.base(x) + ops.activation_delta(delta_input, a, b, coeffs)
    if form == "weight":
        if exact_base:  # convolutions of sub-batches may round unlike the base op's own call
            return ops.base(x) + ops.activation_delta(x, a, b, coeffs)
        if coeffs.requires_grad:
            return _per_image_weight_form(ops, x, a, b, coeffs)
        groups = groups or group_rows(coeffs)
        if folds_cost_more(ops.module, x, len(groups.rows), a.shape[0]):
            return ops.base(x).add_(ops.activation_delta(x, a, b, coeffs))
        return _grouped_weight_form(ops, x, groups, lambda row: ops.fold(a, b, row))
    if form == "batched":
        return _batched_form(ops, x, a, b, coeffs, exact_base)
    if form == "gathered":
        return _gathered_form(ops, x, a, b, coeffs, exact_base)
    raise unknown_name("compute form", form, FORMS)


@dataclass(frozen=True)
class RowGroups:
    """Images grouped by identical coefficient rows, for the ``"weight"`` form.

    Built once per call from coefficients that need no gradient and shared by every layer
    of the call, so that no layer compares rows, selects images or reads numbers back.

    Attributes:
        rows: each distinct row as Python numbers (the exact float values of the
            coefficients), the scales of the folds.
        members: the images of each row: a ``slice`` when they are consecutive (a view of
            the input, no copy), else an index tensor.
        order: the permutation that puts the concatenated group outputs back in image
            order, or ``None`` when the groups already are in order.
        mixed: some row has two or more non-zero coefficients (soft top-k routing).
        image_rows: the index in ``rows`` of each image's row, in image order.
    """

    rows: tuple[tuple[float, ...], ...]
    members: tuple[slice | torch.Tensor, ...]
    order: torch.Tensor | None
    mixed: bool
    image_rows: tuple[int, ...]


def group_rows(coeffs: torch.Tensor) -> RowGroups:
    """:class:`RowGroups` of ``coeffs`` ``(N, E)`` (rows in order of first appearance)."""
    images: dict[tuple[float, ...], list[int]] = {}
    for index, row in enumerate(coeffs.tolist()):
        images.setdefault(tuple(row), []).append(index)
    members: list[slice | torch.Tensor] = []
    for group in images.values():
        if group == list(range(group[0], group[-1] + 1)):
            members.append(slice(group[0], group[-1] + 1))
        else:
            members.append(torch.tensor(group, device=coeffs.device))
    concatenated = [index for group in images.values() for index in group]
    order = None
    if concatenated != sorted(concatenated):
        order = torch.argsort(torch.tensor(concatenated, device=coeffs.device))
    mixed = any(sum(c != 0.0 for c in row) > 1 for row in images)
    image_rows = [0] * coeffs.shape[0]
    for index, group in enumerate(images.values()):
        for image in group:
            image_rows[image] = index
    return RowGroups(tuple(images), tuple(members), order, mixed, tuple(image_rows))


def folds_cost_more(base: nn.Module, x: torch.Tensor, rows: int, experts: int) -> bool:
    """Whether folding ``rows`` coefficient rows into the weight costs more multiply-adds
    than the low-rank path over every pixel of ``x``: ``rows * fan_in * out`` against
    ``pixels * experts * (fan_in + out)`` (the rank cancels). Known only per call: a layer
    that runs on few pixels (a squeeze-excitation 1x1 on the pooled 1x1 map, a bottleneck
    on 8x8) folds a large weight for little work, and the low-rank path is then cheaper.
    Grouped convolutions always fold: their low-rank path expands every group.
    """
    if getattr(base, "groups", 1) > 1:  # the low-rank path would expand every group
        return False
    fan_in, out = _fan_in_out(base)
    channels = x.shape[-1] if _kind(base) == "linear" else x.shape[1]
    pixels = x.numel() // max(channels, 1)
    return rows * fan_in * out > pixels * experts * (fan_in + out)


def _rank_path_is_cheaper(base: nn.Module, x: torch.Tensor, folds: int, exact_base: bool) -> bool:
    """Whether the ``"gathered"`` form of a ``Linear`` or 1x1 convolution should run the base
    op plus each image's rank ``k*r`` path rather than the fused fold (``folds`` of them, one
    per row of per-image factors).

    Always with ``exact_base`` (zero experts must give the base output bit for bit). Else
    when one fold per image (``k*r*fan_in*out`` multiply-adds, and a weight-sized tensor
    per image written, read in forward and again for the input gradient) costs more than
    the rank path over the image's pixels (``k*r*(fan_in + out)`` each): :func:`folds_cost_more`
    with one row per image (``k*r`` cancels). That is the bottleneck of a U-Net, where a
    ``1024 x 512`` weight per image serves a 4x4 map; on NAFNet-small (width 32) at 64²
    crops, batch 8, taking the rank path there made an experts-only training step 13%
    faster.
    """
    return exact_base or folds_cost_more(base, x, folds, 1)


def folded_forward(
    base: nn.Module,
    x: torch.Tensor,
    groups: RowGroups,
    fold: Callable[[tuple[float, ...]], torch.Tensor],
    output_padding: Any = None,
) -> torch.Tensor:
    """The ``"weight"`` form with the folds supplied by the caller: the base op once per
    distinct row of ``groups``, with weight ``fold(row)`` (``W0 + sum_e row[e] dW_e``, e.g.
    kept from an earlier call by the layer's fold cache)."""
    return _grouped_weight_form(_ops_for(base, output_padding), x, groups, fold)


def weight_op(base: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``base``'s op as a function of the input and a weight (its own bias and
    hyper-parameters; a ``ConvTranspose2d`` with its own output padding), for a caller that
    runs it with weights it keeps."""
    return _ops_for(base, None).op


def fold_weight(
    base: nn.Module, a: torch.Tensor, b: torch.Tensor, row: tuple[float, ...]
) -> torch.Tensor:
    """``W0 + sum_e row[e] * dW_e`` for the stacked factors ``a``, ``b`` (the fold the
    ``"weight"`` form computes; ``W0`` itself for a row of zeros)."""
    return _ops_for(base, None).fold(a, b, row)


def stacks_weights(base: nn.Module, x: torch.Tensor, groups: RowGroups) -> bool:
    """Whether :func:`folded_forward` runs ``x`` in one base call with a weight per image
    rather than a call per row of ``groups`` (see ``_grouped_weight_form``)."""
    images, linear = len(groups.image_rows), _kind(base) == "linear"
    if torch.is_grad_enabled() or len(groups.rows) < 2 or (x.shape[0] != images and not linear):
        return False  # a convolution over windows or frames would repeat each weight
    channels = x.shape[-1] if linear else x.shape[1]
    positions = x.numel() // max(channels * images, 1)
    small = images * base.weight.numel() <= STACK_MAX_ELEMENTS
    return (positions >= STACK_MIN_POSITIONS or small) and all(any(row) for row in groups.rows)


def _grouped_weight_form(
    ops: _Ops,
    x: torch.Tensor,
    groups: RowGroups,
    fold: Callable[[tuple[float, ...]], torch.Tensor],
) -> torch.Tensor:
    """The base op with ``fold(row)`` as the weight of each image's row.

    One row (one degradation for the batch) is a single base call. In inference, several
    rows are one call too, each image with its row's weight (a batched matrix product, or a
    convolution grouped over the batch): a base call per row costs more, whether the rows
    are soft mixtures or one expert each (NAFNet-w32, 128², paired in one process on a
    2-core CPU, throwaway scripts: 4 images with soft top-2 rows 0.88× the time of the
    ``"gathered"`` form; 4, 8 and 16 images over 4-5 experts, 0.75×, 0.84× and 0.81× a call
    per row). Not with gradients (a call per row gives each row's weight its gradient), for a
    row of zeros (images routed only to fresh experts, skipped: they keep the base op's own
    output, bit for bit), for a convolution over windows or frames of an image (each would
    need a weight copy; a ``Linear`` takes them as rows of the image's product)
    or under ``STACK_MIN_POSITIONS`` positions per image unless the batch's weights are
    small (``STACK_MAX_ELEMENTS``), where a weight copy per image costs more than it saves
    (NAFNet-w32 on 64 images of 32²: 4× the time and 3.6× the memory of a call per row).
    Images share a row's call only when no gradient is needed: a folded weight shared by
    several images cannot tell which image's coefficient a gradient belongs to.
    """
    if len(groups.rows) == 1:
        return ops.op(x, fold(groups.rows[0]))
    if stacks_weights(ops.module, x, groups):
        weights = [fold(row) for row in groups.rows]
        return ops.batched(x, torch.stack([weights[r] for r in groups.image_rows]), True)
    num_images = sum(
        m.stop - m.start if isinstance(m, slice) else m.numel() for m in groups.members
    )
    per_image = x.reshape(num_images, x.shape[0] // num_images, *x.shape[1:])
    outputs = [
        ops.op(per_image[members].flatten(0, 1), fold(row))
        for row, members in zip(groups.rows, groups.members, strict=True)
    ]
    out = torch.cat(outputs)
    if groups.order is None:
        return out
    return out.reshape(num_images, -1, *out.shape[1:])[groups.order].flatten(0, 1)


def _per_image_weight_form(
    ops: _Ops, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, coeffs: torch.Tensor
) -> torch.Tensor:
    """The base op once per image with its own folded weight (coefficients with gradients)."""
    num_images = coeffs.shape[0]
    weights = ops.module.weight + delta_weights(ops.module, a, b, coeffs)
    if num_images == 1:
        return ops.op(x, weights[0])
    per_image = x.reshape(num_images, x.shape[0] // num_images, *x.shape[1:])
    return torch.cat([ops.op(per_image[n], weights[n]) for n in range(num_images)])


def _batched_form(
    ops: _Ops,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    coeffs: torch.Tensor,
    exact_base: bool,
) -> torch.Tensor:
    """One folded weight per coefficient row, all images in one call."""
    deltas = delta_weights(ops.module, a, b, coeffs)
    if exact_base:
        return ops.base(x) + ops.batched(x, deltas, with_bias=False)
    return ops.batched(x, ops.module.weight + deltas, with_bias=True)


def _gathered_form(
    ops: _Ops,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    coeffs: torch.Tensor,
    exact_base: bool,
) -> torch.Tensor:
    """Each image's own experts as one rank ``k*r`` LoRA (see the module docstring)."""
    if ops.grouped:  # the factored path would expand every group: fold per image instead
        return _batched_form(ops, x, a, b, coeffs, exact_base)
    index, values = _gather(coeffs)
    a_g, b_g = _gathered_factors(a, b, index, values, ops.b_is_output)
    return ops.gathered(x, _per_row(a_g, x.shape[0]), _per_row(b_g, x.shape[0]), exact_base)


def _gather(coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, values)`` ``(N, k)``: the experts each image uses and their coefficients.

    ``k`` is the largest number of non-zero coefficients in a row; rows with fewer pad with
    zero coefficients (exact: they add zero). When the coefficients need gradients every
    expert is kept (``k = E``): a zero gate's gradient is not zero.
    """
    num_images, num_experts = coeffs.shape
    if not coeffs.requires_grad:
        k = max(int((coeffs != 0).sum(1).max()), 1)
        if k < num_experts:
            index = coeffs.abs().topk(k, dim=1).indices
            return index, coeffs.gather(1, index)
    index = torch.arange(num_experts, device=coeffs.device).expand(num_images, num_experts)
    return index, coeffs


# -------------------------------------------------------------------- per-op kernels
def _kind(base: nn.Module) -> str:
    if type(base) is nn.Linear:
        return "linear"
    if type(base) is nn.Conv2d:
        return "conv"
    if type(base) is nn.ConvTranspose2d:
        return "conv_transpose"
    raise TargetModulesError(
        f"No compute forms for a {type(base).__name__}; supported types are Linear, Conv2d "
        "and ConvTranspose2d."
    )


def _is_pointwise(conv: nn.Module) -> bool:
    """A 1x1 convolution that is a per-pixel matrix product (no stride, padding, groups)."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.groups == 1
        and (conv.padding == (0, 0) or conv.padding in ("valid", "same"))
    )


def _per_row(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Repeat per-image tensors over the ``rows // N`` rows (windows, frames) of each image."""
    return t if t.shape[0] == rows else t.repeat_interleave(rows // t.shape[0], dim=0)


def _gathered_factors(
    a: torch.Tensor,
    b: torch.Tensor,
    index: torch.Tensor,
    values: torch.Tensor,
    b_is_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image factors ``A_n (N, k*r, fan)`` and ``B_n`` with the coefficients folded into
    ``B`` (the smaller tensor): ``(N, out, k*r)`` when ``B`` maps rank to output (``Linear``
    and ``Conv2d``), else ``(N, k*r, out*kk)`` (``ConvTranspose2d``)."""
    num_images, k = index.shape
    flat = index.flatten()  # index_select: its backward is an index_add, cheaper than index's
    a_g = a.index_select(0, flat).reshape(num_images, k * a.shape[1], a.shape[2])
    b_g = b.index_select(0, flat).unflatten(0, (num_images, k)) * values[:, :, None, None]
    if b_is_output:  # b (E, out, r) -> (N, out, k*r)
        b_g = b_g.squeeze(1) if k == 1 else b_g.permute(0, 2, 1, 3).flatten(2)
    else:  # conv transpose: b (E, r, out*kk) -> (N, k*r, out*kk)
        b_g = b_g.flatten(1, 2)
    return a_g, b_g


def _over_batch(
    functional: Any, x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None, groups: int
) -> torch.Tensor:
    """A convolution with one weight per row as one grouped call (``groups * N`` groups)."""
    weights = _per_row(weights, x.shape[0])
    n = weights.shape[0]
    bias = None if bias is None else bias.repeat(n)
    out = functional(x.reshape(1, -1, *x.shape[2:]), weights.flatten(0, 1), bias, groups * n)
    return out.reshape(n, -1, *out.shape[2:])


class _Ops(ABC):
    """The operations of one wrapped op that the forms are made of."""

    grouped = False
    b_is_output = True  # B maps rank -> output (Linear, Conv2d); ConvTranspose2d: the kernel

    def __init__(self, module: nn.Module, output_padding: Any) -> None:
        self.module = module
        self.output_padding = output_padding

    def base(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.module.weight)

    def fold(self, a: torch.Tensor, b: torch.Tensor, row: tuple[float, ...]) -> torch.Tensor:
        """``W0 + sum_e row[e] * dW_e`` as one ``addmm`` per expert with a non-zero
        coefficient (the coefficient is its ``alpha``): no ``(E, *weight.shape)`` delta is
        formed and added. A row of zeros gives ``W0`` itself."""
        weight = self.module.weight
        matrix = weight.reshape(weight.shape[0], -1)
        for expert, scale in enumerate(row):
            if scale != 0.0:
                left, right = (b[expert], a[expert])
                if not self.b_is_output:
                    left, right = a[expert].T, b[expert]
                matrix = torch.addmm(matrix, left, right, alpha=scale)
        return matrix.view(weight.shape)

    @abstractmethod
    def op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base op with another weight (same bias and hyper-parameters)."""

    @abstractmethod
    def batched(self, x: torch.Tensor, weights: torch.Tensor, with_bias: bool) -> torch.Tensor:
        """The op with one weight per image (``weights`` ``(N, *weight.shape)``)."""

    @abstractmethod
    def activation_delta(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, coeffs: torch.Tensor
    ) -> torch.Tensor:
        """``sum_e coeffs[n, e] * (dW_e * x_n)`` through the factors of all experts."""

    @abstractmethod
    def gathered(
        self, x: torch.Tensor, a_g: torch.Tensor, b_g: torch.Tensor, exact_base: bool
    ) -> torch.Tensor:
        """The ``"gathered"`` form with per-row factors from :func:`_gathered_factors`."""


class _LinearOps(_Ops):
    def op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.module.bias)

    def batched(self, x: torch.Tensor, weights: torch.Tensor, with_bias: bool) -> torch.Tensor:
        rows = x.reshape(weights.shape[0], -1, x.shape[-1])
        bias = self.module.bias if with_bias else None
        if bias is None:
            out = torch.bmm(rows, weights.transpose(1, 2))
        else:
            out = torch.baddbmm(
                bias.expand(rows.shape[0], rows.shape[1], -1), rows, weights.transpose(1, 2)
            )
        return out.reshape(*x.shape[:-1], -1)

    def activation_delta(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, coeffs: torch.Tensor
    ) -> torch.Tensor:
        experts, rank = a.shape[0], a.shape[1]
        z = F.linear(x, a.reshape(experts * rank, -1))
        rows = _per_row(coeffs, x.shape[0])
        z = z.unflatten(-1, (experts, rank)) * rows.reshape(
            rows.shape[0], *([1] * (x.dim() - 2)), experts, 1
        )
        return F.linear(z.flatten(-2), b.permute(1, 0, 2).reshape(b.shape[1], experts * rank))

    def gathered(
        self, x: torch.Tensor, a_g: torch.Tensor, b_g: torch.Tensor, exact_base: bool
    ) -> torch.Tensor:
        rows = x.reshape(a_g.shape[0], -1, x.shape[-1])
        if _rank_path_is_cheaper(self.module, x, a_g.shape[0], exact_base):
            y = self.base(x).reshape(rows.shape[0], rows.shape[1], -1)
            out = torch.baddbmm(y, torch.bmm(rows, a_g.transpose(1, 2)), b_g.transpose(1, 2))
        else:
            out = _FusedLowRank.apply(rows, self.module.weight, self.module.bias, a_g, b_g, True)
        return out.reshape(*x.shape[:-1], -1)


class _ConvOps(_Ops):
    def __init__(self, module: nn.Module, output_padding: Any) -> None:
        super().__init__(module, output_padding)
        self.grouped = module.groups > 1

    def _padded(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Apply a non-zero padding mode explicitly, as ``nn.Conv2d`` does internally."""
        conv = self.module
        if conv.padding_mode != "zeros":
            return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0
        return x, conv.padding

    def functional(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int
    ) -> torch.Tensor:
        conv = self.module
        x, padding = self._padded(x)
        return F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, groups)

    def op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.functional(x, weight, self.module.bias, self.module.groups)

    def batched(self, x: torch.Tensor, weights: torch.Tensor, with_bias: bool) -> torch.Tensor:
        bias = self.module.bias if with_bias else None
        if weights.shape[0] == 1:
            return self.functional(x, weights[0], bias, self.module.groups)
        weights = _per_row(weights, x.shape[0])
        n = weights.shape[0]
        if _is_pointwise(self.module):
            flat = x.reshape(n, x.shape[1], -1)
            matrices = weights.reshape(n, weights.shape[1], -1)
            if bias is None:
                out = torch.bmm(matrices, flat)
            else:
                out = torch.baddbmm(bias[:, None].expand(n, -1, flat.shape[2]), matrices, flat)
            return out.reshape(n, -1, *x.shape[2:])
        return _over_batch(self.functional, x, weights, bias, self.module.groups)

    def activation_delta(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, coeffs: torch.Tensor
    ) -> torch.Tensor:
        groups = self.module.groups
        experts, rank = a.shape[0], a.shape[1]
        kernel = a.reshape(experts * rank, *self.module.weight.shape[1:])
        z = self.functional(x, kernel.repeat(groups, 1, 1, 1), None, groups)
        rows = _per_row(coeffs, x.shape[0])
        z = z.unflatten(1, (groups, experts, rank)) * rows[:, None, :, None, None, None]
        mix = b.permute(1, 0, 2).reshape(b.shape[1], experts * rank, 1, 1)
        return F.conv2d(z.flatten(1, 3), mix, groups=groups)

    def gathered(
        self, x: torch.Tensor, a_g: torch.Tensor, b_g: torch.Tensor, exact_base: bool
    ) -> torch.Tensor:
        n = x.shape[0]
        if _is_pointwise(self.module) and not _rank_path_is_cheaper(self.module, x, n, exact_base):
            out = _FusedLowRank.apply(
                x.reshape(n, x.shape[1], -1),
                self.module.weight.flatten(1),
                self.module.bias,
                a_g,
                b_g,
                False,
            )
            return out.reshape(n, -1, *x.shape[2:])
        y = self.base(x)
        if _is_pointwise(self.module):
            z = torch.bmm(a_g, x.reshape(n, x.shape[1], -1))
        else:
            kernel = a_g.reshape(-1, *self.module.weight.shape[1:])
            z = self.functional(x.reshape(1, -1, *x.shape[2:]), kernel, None, n).reshape(
                n, a_g.shape[1], -1
            )
        return torch.baddbmm(y.reshape(n, y.shape[1], -1), b_g, z).reshape(y.shape)


class _ConvTransposeOps(_Ops):
    b_is_output = False

    def functional(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int
    ) -> torch.Tensor:
        conv = self.module
        padding = conv.output_padding if self.output_padding is None else self.output_padding
        return F.conv_transpose2d(
            x, weight, bias, conv.stride, conv.padding, padding, groups, conv.dilation
        )

    def op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.functional(x, weight, self.module.bias, 1)

    def batched(self, x: torch.Tensor, weights: torch.Tensor, with_bias: bool) -> torch.Tensor:
        bias = self.module.bias if with_bias else None
        if weights.shape[0] == 1:
            return self.functional(x, weights[0], bias, 1)
        return _over_batch(self.functional, x, weights, bias, 1)

    def activation_delta(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, coeffs: torch.Tensor
    ) -> torch.Tensor:
        experts, rank = a.shape[0], a.shape[1]
        z = F.conv2d(x, a.reshape(experts * rank, -1, 1, 1))
        rows = _per_row(coeffs, x.shape[0])
        z = z.unflatten(1, (experts, rank)) * rows[:, :, None, None, None]
        kernel = b.reshape(experts * rank, *self.module.weight.shape[1:])
        return self.functional(z.flatten(1, 2), kernel, None, 1)

    def gathered(
        self, x: torch.Tensor, a_g: torch.Tensor, b_g: torch.Tensor, exact_base: bool
    ) -> torch.Tensor:
        n = x.shape[0]
        z = torch.bmm(a_g, x.reshape(n, x.shape[1], -1))
        kernel = b_g.reshape(-1, *self.module.weight.shape[1:])
        delta = self.functional(z.reshape(1, -1, *x.shape[2:]), kernel, None, n)
        return self.base(x) + delta.reshape(n, -1, *delta.shape[2:])


_OPS: dict[str, type[_Ops]] = {
    "linear": _LinearOps,
    "conv": _ConvOps,
    "conv_transpose": _ConvTransposeOps,
}


def _ops_for(base: nn.Module, output_padding: Any) -> _Ops:
    return _OPS[_kind(base)](base, output_padding)


# ------------------------------------------------------------- fused 1x1 / Linear form
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on for ``x``'s device."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class _FusedLowRank(torch.autograd.Function):
    """``Y_n = (W0 + B_n A_n) X_n + bias`` with factor gradients through rank ``k*r``.

    Layout ``rows=False``: ``X (N, in, P)`` -> ``Y (N, out, P)`` (1x1 convolutions);
    ``rows=True``: ``X (N, M, in)`` -> ``Y (N, M, out)`` (``Linear``). Forward and input
    gradient use the folded weight (one matmul each, as the base op); the gradients of
    ``A_n`` ``(N, kr, in)`` and ``B_n`` ``(N, out, kr)`` use ``Z = A_n X`` and ``B_n^T dY``,
    so no ``(out, in)`` weight gradient is formed per image. Matmuls run in autocast's
    dtype when autocast is on (forward and backward alike).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        w0: torch.Tensor,
        bias: torch.Tensor | None,
        a_g: torch.Tensor,
        b_g: torch.Tensor,
        rows: bool,
    ) -> torch.Tensor:
        ctx.dtypes = (x.dtype, w0.dtype, None if bias is None else bias.dtype, a_g.dtype, b_g.dtype)
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x, a_g, b_g = x.to(dtype), a_g.to(dtype), b_g.to(dtype)
            n = x.shape[0]
            folded = torch.baddbmm(w0.to(dtype).expand(n, -1, -1), b_g, a_g)
            if rows:
                out = torch.bmm(x, folded.transpose(1, 2))
                if bias is not None:
                    out = out.add_(bias.to(dtype))
            elif bias is None:
                out = torch.bmm(folded, x)
            else:
                out = torch.baddbmm(bias.to(dtype)[:, None].expand(n, -1, x.shape[2]), folded, x)
            z = None
            if ctx.needs_input_grad[4]:
                z = torch.bmm(x, a_g.transpose(1, 2)) if rows else torch.bmm(a_g, x)
        ctx.rows = rows
        ctx.save_for_backward(x, folded, b_g, z)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, folded, b_g, z = ctx.saved_tensors
        rows = ctx.rows
        grad = grad.to(x.dtype)
        # Column layout throughout: X (N, in, P), G (N, out, P), Z (N, kr, P).
        xc, gc = (x.transpose(1, 2), grad.transpose(1, 2)) if rows else (x, grad)
        zc = None if z is None else (z.transpose(1, 2) if rows else z)
        dx = dw0 = dbias = da = db = None
        needs = ctx.needs_input_grad
        x_dtype, w0_dtype, bias_dtype, a_dtype, b_dtype = ctx.dtypes
        if needs[0]:
            dx = torch.bmm(grad, folded) if rows else torch.bmm(folded.transpose(1, 2), grad)
            dx = dx.to(x_dtype)
        if needs[1]:
            dw0 = torch.bmm(gc, xc.transpose(1, 2)).sum(0).to(w0_dtype)
        if needs[2]:
            dbias = gc.sum((0, 2)).to(bias_dtype)
        if needs[3]:
            da = torch.bmm(torch.bmm(b_g.transpose(1, 2), gc), xc.transpose(1, 2)).to(a_dtype)
        if needs[4]:
            db = torch.bmm(gc, zc.transpose(1, 2)).to(b_dtype)
        return dx, dw0, dbias, da, db, None
