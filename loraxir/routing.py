"""The routing state: the gates of the current batch, shared by every expert layer.

Why a shared object instead of forward arguments or hooks: a backbone's ``forward`` does
not know about gates (extra keyword arguments reach it and crash it), and forward hooks
are not re-run when activation checkpointing recomputes a segment during backward. The
model writes the gates here before it calls the backbone and leaves them in place until
the next call, so a recomputation in backward reads the same gates as the forward did.
Reading a plain attribute is traced by ``torch.compile`` without a graph break.
"""

from __future__ import annotations

import torch

from loraxir.errors import RoutingError


class RoutingState:
    """Gates for the batch being processed and the fixed gate of a merge.

    Attributes:
        gates: ``(B, E)`` mixture weights of the current batch, one row per image, or
            ``None`` before the first routed forward.
        merge_gate: ``(E,)`` gate folded into the base weights by ``merge``, or ``None``.
        pinned: ``True`` inside ``loraxir.route(...)``: calls without gates keep these.
    """

    def __init__(self) -> None:
        self.gates: torch.Tensor | None = None
        self.merge_gate: torch.Tensor | None = None
        self.pinned = False

    def require_gates(self) -> torch.Tensor:
        """Return the current gates, or raise if no routed forward has set them."""
        if self.gates is None:
            raise RoutingError(
                "An expert layer ran without gates. Call the LoraIRModel (model(x, gates=...), "
                "model(x, degradation=...), or attach a router), or wrap a direct backbone call "
                "in `with loraxir.route(model, gates=...)`."
            )
        return self.gates


def check_gates(gates: torch.Tensor, num_experts: int, batch_size: int) -> torch.Tensor:
    """Validate a ``(B, E)`` gate tensor and return it.

    Gates must be finite and non-negative; rows need not sum to one (a user may scale an
    expert up or mix several at will), but a row of zeros is allowed and means "base only".
    """
    if not isinstance(gates, torch.Tensor):
        raise RoutingError(
            f"gates must be a torch.Tensor of shape (B, E), got {type(gates).__name__}."
        )
    if gates.dim() == 1:
        gates = gates.unsqueeze(0).expand(batch_size, -1)
    if gates.dim() != 2 or gates.shape[1] != num_experts or gates.shape[0] not in (1, batch_size):
        raise RoutingError(
            f"gates must have shape (B={batch_size}, E={num_experts}) (or (E,) for all images), "
            f"got {tuple(gates.shape)}."
        )
    if not gates.is_floating_point():
        raise RoutingError(f"gates must be a floating-point tensor, got dtype {gates.dtype}.")
    if not torch.compiler.is_compiling():
        if not bool(torch.isfinite(gates).all()):
            raise RoutingError("gates contain NaN or infinite values; pass finite mixture weights.")
        if bool((gates < 0).any()):
            raise RoutingError(
                f"gates must be non-negative (mixture weights), got a minimum of "
                f"{float(gates.min()):.4g}. Apply a softmax to router logits first."
            )
    return gates.expand(batch_size, -1)
