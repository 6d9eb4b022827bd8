"""``RouterExplanation``: what the router believed about each image and what it chose."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraxir.errors import ConfigError
from loraxir.figures import save_figure


@dataclass
class RouterExplanation:
    """Class probabilities, chosen experts and a confidence flag per image.

    ``str(explanation)`` prints one line per image; :meth:`plot` draws the probabilities
    with the chosen experts outlined. An image is *unsure* when its top probability is
    below ``unsure_below`` (the router's setting): a mixed degradation, one it was not
    trained on, or a clean image without a ``clean`` class. Unsure images deserve a look,
    ``top_k > 1``, or a class of their own.
    """

    degradations: list[str]
    probabilities: torch.Tensor
    """``(B, E)`` softmax of the logits: the router's belief about each class."""
    gates: torch.Tensor
    """``(B, E)`` the mixture actually applied: non-zero for the chosen experts only."""
    unsure_below: float = 0.0
    """Top probability under which an image is flagged unsure."""

    @property
    def chosen(self) -> list[list[str]]:
        """Per image, the experts with a non-zero gate, largest gate first."""
        result = []
        for row in self.gates:
            order = torch.argsort(row, descending=True)
            result.append([self.degradations[i] for i in order.tolist() if row[i] > 0])
        return result

    @property
    def confidence(self) -> torch.Tensor:
        """``(B,)`` the top class probability of each image."""
        return self.probabilities.max(dim=-1).values

    @property
    def unsure(self) -> list[bool]:
        """Per image, whether the top probability is below ``unsure_below``."""
        return (self.confidence < self.unsure_below).tolist()

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-serialisable dict per image: chosen experts, gates, probabilities, unsure."""
        return [
            {
                "chosen": chosen,
                "gates": {n: float(g) for n, g in zip(self.degradations, gates, strict=True) if g},
                "probabilities": {
                    n: float(p) for n, p in zip(self.degradations, probs, strict=True)
                },
                "unsure": unsure,
            }
            for chosen, gates, probs, unsure in zip(
                self.chosen, self.gates, self.probabilities, self.unsure, strict=True
            )
        ]

    def __str__(self) -> str:
        lines = []
        for index, record in enumerate(self.to_records()):
            picked = ", ".join(f"{n} ({record['gates'][n]:.2f})" for n in record["chosen"])
            ranked = sorted(record["probabilities"].items(), key=lambda item: -item[1])
            beliefs = ", ".join(f"{n} {p:.2f}" for n, p in ranked[:3])
            flag = " | UNSURE" if record["unsure"] else ""
            lines.append(f"image {index}: experts {picked} | p: {beliefs}{flag}")
        return "\n".join(lines)

    def plot(self, path: str | Path | None = None, labels: Sequence[str] | None = None) -> Any:
        """A heatmap of probabilities (images × classes), chosen experts outlined.

        ``labels`` names the rows (e.g. the true degradation); unsure rows get a ``?``.
        Saves a PNG when ``path`` is given; returns the matplotlib figure.
        """
        # A Figure of its own, not pyplot's: the caller's backend (a notebook's) stays.
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle

        probs = self.probabilities.detach().float().cpu()
        rows, cols = probs.shape
        if labels is not None and (isinstance(labels, str) or len(labels) != rows):
            raise ConfigError(f"labels names the {rows} image(s), one each; got {labels!r}.")
        fig = Figure(figsize=(1.2 + 0.9 * cols, 0.8 + 0.4 * rows))
        ax = fig.subplots()
        image = ax.imshow(probs, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for b, i in (self.gates.detach().cpu() > 0).nonzero().tolist():
            ax.add_patch(Rectangle((i - 0.5, b - 0.5), 1, 1, fill=False, ec="red", lw=2))
        names = (
            [str(n) for n in labels] if labels is not None else [f"image {b}" for b in range(rows)]
        )
        names = [
            f"{name} ?" if unsure else name for name, unsure in zip(names, self.unsure, strict=True)
        ]
        ax.set_xticks(range(cols), self.degradations, rotation=30, ha="right")
        ax.set_yticks(range(rows), names)
        ax.set_title("router probabilities (red: chosen experts, ?: unsure)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        if path is not None:
            save_figure(fig, path, dpi=120)
        return fig
