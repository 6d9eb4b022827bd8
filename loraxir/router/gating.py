"""Gating: from class logits to sparse expert mixture weights, and a balance penalty."""

from __future__ import annotations

import torch

from loraxir.errors import RoutingError


def top_k_gates(
    logits: torch.Tensor,
    k: int,
    temperature: float = 1.0,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sparse mixture weights from ``(B, E)`` logits: softmax over each row's top ``k``.

    Contract: the result is ``(B, E)``, each row sums to 1 and has exactly ``k`` non-zero
    entries. ``temperature`` divides the kept logits (below 1 sharpens the mixture, above
    1 flattens it). ``noise_std > 0`` adds Gaussian noise to the logits before the top-k
    choice (noisy gating: experts near the boundary get picked now and then, which helps
    training without labels); pass it only while training.

    For ``k = 1`` the value is exactly one-hot, but the gradient is that of the chosen
    expert's softmax probability (straight-through), so a router can still learn from a
    loss on the experts' output.
    """
    num_experts = logits.shape[-1]
    if logits.dim() != 2:
        raise RoutingError(f"logits must be (B, E), got shape {tuple(logits.shape)}.")
    if not 1 <= k <= num_experts:
        raise RoutingError(f"top_k must be in [1, {num_experts}] (the number of experts), got {k}.")
    if temperature <= 0:
        raise RoutingError(f"temperature must be > 0, got {temperature}.")
    if noise_std > 0:
        noise = torch.randn(
            logits.shape, generator=generator, device=logits.device, dtype=logits.dtype
        )
        logits = logits + noise_std * noise
    top_values, top_index = logits.topk(k, dim=-1)
    # Shifted by the row's largest logit before dividing: logits / 1e-4 overflow to inf in
    # float16 (and inf - inf gave NaN gates); the softmax is the same either way.
    top = top_values[:, :1]
    weights = torch.softmax((top_values - top) / temperature, dim=-1)
    # A very low temperature can underflow a kept weight to 0; keep k entries non-zero.
    weights = weights.clamp_min(torch.finfo(weights.dtype).tiny)
    if k == 1:
        chosen = torch.softmax((logits - top) / temperature, dim=-1).gather(-1, top_index)
        weights = weights + (chosen - chosen.detach())
    return torch.zeros_like(logits).scatter(-1, top_index, weights)


def load_balancing_loss(gates: torch.Tensor) -> torch.Tensor:
    """Penalty for uneven expert usage over a batch: ``E · Σ_i mean_b(gates[b, i])²``.

    With rows summing to 1 the mean usage sums to 1, so by Cauchy–Schwarz the loss is at
    least 1, with equality exactly when every expert gets the same share of the batch,
    and at most ``E`` when one expert takes every image. Gradients flow through the gates
    (soft top-k weights, or the straight-through probability for ``k = 1``), pushing
    probability away from over-used experts. Add it, scaled, to an unsupervised objective.
    """
    if gates.dim() != 2:
        raise RoutingError(f"gates must be (B, E), got shape {tuple(gates.shape)}.")
    usage = gates.mean(dim=0)
    return gates.shape[-1] * (usage * usage).sum()
