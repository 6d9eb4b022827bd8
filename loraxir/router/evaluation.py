"""Scoring a router on held-out photos: accuracy per class and size, calibration, figures.

The recipe (``recipes/train_router.py``) routes every test image once and keeps one row
per image: true class, predicted class, top probability, the probabilities, the image
size and the *regime* (suite parameters, parameters outside the training ranges, a clean
photo, a mixture of two degradations). This module turns those rows into the numbers of
``metrics.json`` and into the evaluation figure.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CALIBRATION_EDGES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


@dataclass
class Predictions:
    """One row per routed test image (``label`` is ``-1`` when there is no true class)."""

    labels: list[int] = field(default_factory=list)
    probabilities: list[torch.Tensor] = field(default_factory=list)
    sizes: list[str] = field(default_factory=list)
    regimes: list[str] = field(default_factory=list)

    def add(
        self,
        probabilities: torch.Tensor,
        labels: Sequence[int],
        sizes: Sequence[str],
        regimes: Sequence[str],
    ) -> None:
        """Append a batch: probabilities ``(B, E)`` and one label, size, regime per image."""
        self.probabilities.extend(probabilities.detach().float().cpu())
        self.labels.extend(int(v) for v in labels)
        self.sizes.extend(sizes)
        self.regimes.extend(regimes)

    def extend(self, other: Predictions) -> None:
        self.labels += other.labels
        self.probabilities += other.probabilities
        self.sizes += other.sizes
        self.regimes += other.regimes

    def select(self, regime: str, size: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probabilities (N, E), labels (N,))`` of the rows of ``regime`` (and ``size``)."""
        rows = [
            i
            for i, (r, s) in enumerate(zip(self.regimes, self.sizes, strict=True))
            if r == regime and (size is None or s == size)
        ]
        if not rows:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
        probs = torch.stack([self.probabilities[i] for i in rows])
        return probs, torch.tensor([self.labels[i] for i in rows])


def accuracy_report(
    probabilities: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]
) -> dict[str, Any]:
    """Overall and per-class accuracy with item counts (``None`` for a class with no items)."""
    correct = probabilities.argmax(dim=1) == labels
    per_class = {
        name: (correct[labels == i].float().mean().item() if (labels == i).any() else None)
        for i, name in enumerate(classes)
    }
    return {
        "accuracy": correct.float().mean().item() if len(labels) else None,
        "items": len(labels),
        "per_class": per_class,
    }


def calibration(
    probabilities: torch.Tensor, labels: torch.Tensor, edges: Sequence[float] = CALIBRATION_EDGES
) -> dict[str, Any]:
    """Accuracy per bin of top probability, and the expected calibration error.

    A calibrated router is right 90% of the time when it says 0.9. ``bins`` lists, per
    bin ``[low, high)`` (the last one closed), the items, their mean confidence and their
    accuracy; ``ece`` is the item-weighted mean of ``|accuracy - confidence|``.
    """
    confidence, predicted = probabilities.max(dim=1)
    correct = (predicted == labels).float()
    bins, ece = [], 0.0
    for index, (low, high) in enumerate(itertools.pairwise(edges)):
        last = index == len(edges) - 2
        inside = (confidence >= low) & ((confidence <= high) if last else (confidence < high))
        count = int(inside.sum())
        if count:
            mean_conf, accuracy = confidence[inside].mean().item(), correct[inside].mean().item()
            ece += count / len(labels) * abs(accuracy - mean_conf)
        else:
            mean_conf = accuracy = None
        bins.append(
            {"range": [low, high], "items": count, "confidence": mean_conf, "accuracy": accuracy}
        )
    return {"bins": bins, "ece": ece}


def mean_gates(probabilities: torch.Tensor, classes: Sequence[str]) -> dict[str, float]:
    """Mean soft gate (softmax probability, all experts) per class over the rows."""
    mean = probabilities.mean(dim=0)
    return {name: float(mean[i]) for i, name in enumerate(classes)}


def plot_evaluation(metrics: dict[str, Any], path: str | Path) -> None:
    """One PNG: accuracy per class × size (suite and outside regimes), calibration, mixtures."""
    from matplotlib.figure import Figure  # not pyplot: the caller's backend stays

    classes = metrics["classes"]
    panels = [k for k in ("suite", "outside") if k in metrics["whole_image"]]
    fig = Figure(figsize=(5 * (len(panels) + 2), 4.2))
    axes = fig.subplots(1, len(panels) + 2)
    for ax, regime in zip(axes, panels, strict=False):
        table = metrics["whole_image"][regime]
        sizes = list(table["per_size"])
        grid = torch.tensor(
            [[_nan(table["per_size"][s]["per_class"][c]) for s in sizes] for c in classes]
        )
        ax.imshow(grid, vmin=0.5, vmax=1, cmap="RdYlGn", aspect="auto")
        for (row, col), value in zip(
            [(r, c) for r in range(len(classes)) for c in range(len(sizes))],
            grid.flatten().tolist(),
            strict=True,
        ):
            ax.text(col, row, "–" if value != value else f"{value:.0%}", ha="center", va="center")
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_title(f"{regime}: held-out accuracy {table['accuracy']:.1%}")
    bins = [b for b in metrics["calibration"]["bins"] if b["items"]]
    ax = axes[len(panels)]
    # Each bar spans its own bin (the first, below 0.5, is wide); the axis starts at the
    # lowest bin that holds items, so none is drawn off the axis.
    ax.bar(
        [b["range"][0] for b in bins],
        [b["accuracy"] for b in bins],
        width=[b["range"][1] - b["range"][0] for b in bins],
        align="edge",
        edgecolor="white",
        label="accuracy",
    )
    ax.plot([0, 1], [0, 1], color="gray", lw=0.8, label="calibrated")
    ax.set_xlim(min([0.4, *(b["range"][0] for b in bins)]), 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("top probability")
    ax.set_title(f"calibration (ECE {metrics['calibration']['ece']:.3f})")
    ax.legend()
    ax = axes[len(panels) + 1]
    mixtures = metrics.get("mixtures", {})
    if mixtures:
        names = list(mixtures)
        table = torch.tensor([[mixtures[m]["mean_gates"][c] for c in classes] for m in names])
        ax.imshow(table, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for row, name in enumerate(names):
            for col, cls in enumerate(classes):
                value = mixtures[name]["mean_gates"][cls]
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", color="w")
        ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
    ax.set_title("mean soft gates on mixtures")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value
