"""The degradation-guided router (DG-Router): which experts should restore this image?

Data flow (``docs/routing.md``)::

    image (B, C, H, W) in [0, 1]
      → views: a global view + a grid×grid set of local tiles       (B, 1+g², 3, S, S)
      → encoder, one call for every view of every image             (B·(1+g²), D)
      → concat(global, mean of tiles)                               (B, 2D)   [(B, D) if g=0]
      → MLP → degradation embedding e_deg                           (B, embed_dim)
      → head → class logits                                         (B, E)
      → top-k softmax with a temperature → gates                    (B, E), rows sum to 1

The head is either a learnt linear layer (``head="linear"``, the paper's classifier) or
cosine similarity to *text prototypes*: CLIP text embeddings of prompts such as "a photo
degraded by rain streaks" (``head="text"``), so a class can be added by name before any
image of it has been seen (:meth:`DegradationRouter.add_degradation`).

A router saves as a small adapter: MLP and head tensors, plus the encoder's tensors only
when they cannot be rebuilt from a reference (a trained tower, the tiny CNN, random or
custom weights). A frozen pretrained tower is referenced by name and tag or path in
:meth:`DegradationRouter.to_config`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from loraxir.encoders import (
    DegradationEncoder,
    as_rgb,
    create_encoder,
    encoder_from_spec,
    resize_square,
)
from loraxir.errors import CheckpointError, ConfigError, RoutingError

CONFIG_NAME = "router_config.json"
WEIGHTS_NAME = "router.safetensors"
CONFIG_FORMAT = "loraxir-router"
CONFIG_VERSION = 1
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HEADS = ("linear", "text")
_CONFIG_KEYS = {
    "format",
    "version",
    "degradations",
    "encoder",
    "grid",
    "hidden_dim",
    "embed_dim",
    "head",
    "text_dim",
    "prompts",
    "top_k",
    "temperature",
    "noise_std",
}
# Short descriptions for prompts of common degradation class names; others use the name.
_PROMPT_PHRASES = {
    "noise": "Gaussian noise",
    "rain": "rain streaks",
    "haze": "haze",
    "blur": "motion blur",
    "motion_blur": "motion blur",
    "gaussian_blur": "Gaussian blur",
    "low_light": "low light and under-exposure",
    "jpeg": "JPEG compression artifacts",
    "snow": "snow",
    "raindrop": "raindrops on the lens",
}


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
    weights = torch.softmax(top_values / temperature, dim=-1)
    # A very low temperature can underflow a kept weight to 0; keep k entries non-zero.
    weights = weights.clamp_min(torch.finfo(weights.dtype).tiny)
    if k == 1:
        chosen = torch.softmax(logits / temperature, dim=-1).gather(-1, top_index)
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


def multi_view(images: torch.Tensor, size: int, grid: int) -> torch.Tensor:
    """The views the router encodes: ``(B, 1 + grid², 3, size, size)``.

    View 0 is the whole image resized to ``size`` (global). With ``grid > 0`` the image is
    also resized to ``grid·size`` and cut into ``grid × grid`` tiles of ``size`` (local,
    row-major): each tile sees the image at ``grid``× the global resolution, where noise,
    rain streaks and compression blocks are still visible. Resizing is bilinear with
    antialiasing (:func:`loraxir.encoders.resize_square`); input is RGB, grayscale or RGBA
    (:func:`loraxir.encoders.as_rgb`).
    """
    if grid < 0:
        raise ConfigError(f"grid must be >= 0 (0 = global view only), got {grid}.")
    images = as_rgb(images)
    views = [resize_square(images, size).unsqueeze(1)]
    if grid:
        big = resize_square(images, grid * size)
        b, c = big.shape[:2]
        tiles = big.reshape(b, c, grid, size, grid, size).permute(0, 2, 4, 1, 3, 5)
        views.append(tiles.reshape(b, grid * grid, c, size, size))
    return torch.cat(views, dim=1)


def degradation_prompt(name: str) -> str:
    """The default text prompt of a degradation class, e.g. ``"a photo degraded by haze"``."""
    return f"a photo degraded by {_PROMPT_PHRASES.get(name, name.replace('_', ' '))}"


def check_degradations(router_classes: Sequence[str], adapter_classes: Sequence[str]) -> None:
    """Raise :class:`ConfigError` unless a router's classes are the adapter's, in order.

    Gate ``i`` drives expert ``i``: a router trained on other classes, or the same classes
    in another order, would silently send images to the wrong experts.
    """
    if list(router_classes) == list(adapter_classes):
        return
    missing = [name for name in adapter_classes if name not in router_classes]
    extra = [name for name in router_classes if name not in adapter_classes]
    detail = (
        f"missing from the router: {missing}; not in the adapter: {extra}"
        if missing or extra
        else "same classes in another order"
    )
    raise ConfigError(
        f"Router classes {list(router_classes)} differ from the adapter's degradations "
        f"{list(adapter_classes)} ({detail}). Gate i drives expert i: train or load a router "
        "with exactly the adapter's classes in the same order."
    )


@dataclass
class RouterOutput:
    """Everything one routing pass computes (shapes for a batch of ``B`` images)."""

    embedding: torch.Tensor
    """``(B, embed_dim)`` degradation embedding ``e_deg`` (input of DAM blocks)."""
    logits: torch.Tensor
    """``(B, E)`` class logits."""
    gates: torch.Tensor
    """``(B, E)`` expert mixture weights: top-k softmax, rows sum to 1."""

    @property
    def probabilities(self) -> torch.Tensor:
        """``(B, E)`` class probabilities: softmax of the logits (no temperature, no top-k)."""
        return torch.softmax(self.logits, dim=-1)


@dataclass
class RouterExplanation:
    """What the router saw in each image: class probabilities and the experts it chose.

    ``str(explanation)`` prints one line per image; :meth:`plot` draws the probabilities
    with the chosen experts outlined.
    """

    degradations: list[str]
    probabilities: torch.Tensor
    """``(B, E)`` softmax of the logits: the router's belief about each class."""
    gates: torch.Tensor
    """``(B, E)`` the mixture actually applied: non-zero for the chosen experts only."""

    @property
    def chosen(self) -> list[list[str]]:
        """Per image, the experts with a non-zero gate, largest gate first."""
        result = []
        for row in self.gates:
            order = torch.argsort(row, descending=True)
            result.append([self.degradations[i] for i in order.tolist() if row[i] > 0])
        return result

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-serialisable dict per image: chosen experts, gates and probabilities."""
        return [
            {
                "chosen": chosen,
                "gates": {n: float(g) for n, g in zip(self.degradations, gates, strict=True) if g},
                "probabilities": {
                    n: float(p) for n, p in zip(self.degradations, probs, strict=True)
                },
            }
            for chosen, gates, probs in zip(
                self.chosen, self.gates, self.probabilities, strict=True
            )
        ]

    def __str__(self) -> str:
        lines = []
        for index, record in enumerate(self.to_records()):
            picked = ", ".join(f"{n} ({record['gates'][n]:.2f})" for n in record["chosen"])
            ranked = sorted(record["probabilities"].items(), key=lambda item: -item[1])
            beliefs = ", ".join(f"{n} {p:.2f}" for n, p in ranked[:3])
            lines.append(f"image {index}: experts {picked} | p: {beliefs}")
        return "\n".join(lines)

    def plot(self, path: str | Path | None = None, labels: Sequence[str] | None = None) -> Any:
        """A heatmap of probabilities (images × classes), chosen experts outlined.

        ``labels`` names the rows (e.g. the true degradation). Saves a PNG when ``path``
        is given; returns the matplotlib figure.
        """
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        probs = self.probabilities.detach().float().cpu()
        rows, cols = probs.shape
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * cols, 0.8 + 0.4 * rows))
        image = ax.imshow(probs, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for b, i in (self.gates.detach().cpu() > 0).nonzero().tolist():
            ax.add_patch(plt.Rectangle((i - 0.5, b - 0.5), 1, 1, fill=False, ec="red", lw=2))
        ax.set_xticks(range(cols), self.degradations, rotation=30, ha="right")
        ax.set_yticks(range(rows), list(labels) if labels else [f"image {b}" for b in range(rows)])
        ax.set_title("router probabilities (red: chosen experts)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
        return fig


class _TextPrototypeHead(nn.Module):
    """Logits as scaled cosine similarity between projected ``e_deg`` and text prototypes.

    The prototypes (``(E, text_dim)``, unit norm) are fixed; only the projection and the
    logit scale learn, so the image side is pulled towards the text side, as in CLIP.
    """

    def __init__(self, embed_dim: int, prototypes: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_dim, prototypes.shape[1])
        self.register_buffer("prototypes", F.normalize(prototypes.float(), dim=-1))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        image = F.normalize(self.proj(embedding), dim=-1)
        prototypes = self.prototypes.to(image.dtype)
        return self.logit_scale.exp().clamp(max=100) * image @ prototypes.T

    def add_class(self, prototype: torch.Tensor) -> None:
        row = F.normalize(prototype.float().to(self.prototypes.device), dim=-1).view(1, -1)
        self.prototypes = torch.cat([self.prototypes, row])


class DegradationRouter(nn.Module):
    """Encoder → multi-view → MLP → ``e_deg`` → head → logits → top-k gates.

    Build it with :meth:`from_encoder` (or :meth:`from_config` / :meth:`from_pretrained`).
    ``router(x)`` maps images ``(B, C, H, W)`` float in [0, 1] (any size; C = 3, 1 or 4,
    see :mod:`loraxir.encoders`) to gates ``(B, E)``, ``E = len(degradations)``, each row
    summing to 1 with exactly ``top_k`` non-zero entries. Gates are differentiable with
    respect to the trainable parameters (MLP, head, and the encoder when unfrozen).
    Noisy gating (``noise_std``) applies in training mode only.

    Attributes:
        degradations: class names; gate ``i`` drives expert ``i``.
        top_k: experts mixed per image (1 = hard choice).
        temperature: softmax temperature of the gates.
        noise_std: std of the logit noise added in training mode.
        grid: local tiles per side (0 = global view only); read-only.
    """

    def __init__(
        self,
        encoder: DegradationEncoder,
        degradations: Sequence[str],
        *,
        grid: int = 2,
        hidden_dim: int = 512,
        embed_dim: int = 384,
        head: str = "linear",
        prompts: dict[str, str] | None = None,
        prototypes: torch.Tensor | None = None,
        top_k: int = 1,
        temperature: float = 1.0,
        noise_std: float = 0.0,
    ) -> None:
        super().__init__()
        self.degradations = _check_names(degradations)
        if head not in _HEADS:
            raise ConfigError(f"head must be one of {list(_HEADS)}, got {head!r}.")
        if grid < 0:
            raise ConfigError(f"grid must be >= 0 (0 = global view only), got {grid}.")
        self.encoder = encoder
        self._grid = int(grid)
        self.hidden_dim = int(hidden_dim)
        self.embed_dim = int(embed_dim)
        self.head_type = head
        self.top_k = top_k
        self.temperature = temperature
        self.noise_std = noise_std
        features = encoder.embed_dim * (2 if self.grid else 1)
        self.mlp = nn.Sequential(
            nn.LayerNorm(features),
            nn.Linear(features, self.hidden_dim),
            nn.GELU(),
            nn.Linear(self.hidden_dim, self.embed_dim),
        )
        self.prompts: dict[str, str] | None = None
        if head == "linear":
            self.head: nn.Module = nn.Linear(self.embed_dim, len(self.degradations))
        else:
            self.prompts = {n: (prompts or {}).get(n, degradation_prompt(n)) for n in degradations}
            if prototypes is None:
                prototypes = encoder.encode_text([self.prompts[n] for n in self.degradations])
            self.head = _TextPrototypeHead(self.embed_dim, prototypes)

    @property
    def grid(self) -> int:
        """Local tiles per side (0: global view only); fixed, as it sets the MLP's input size."""
        return self._grid

    @property
    def top_k(self) -> int:
        """Experts mixed per image, in ``[1, E]``; checked when set."""
        return self._top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        if not isinstance(value, int) or not 1 <= value <= len(self.degradations):
            raise ConfigError(
                f"top_k must be an integer in [1, {len(self.degradations)}] (the number of "
                f"degradation classes), got {value!r}."
            )
        self._top_k = value

    @property
    def temperature(self) -> float:
        """Softmax temperature of the gates, ``> 0``; checked when set."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not value > 0:
            raise ConfigError(f"temperature must be > 0, got {value!r}.")
        self._temperature = float(value)

    @property
    def noise_std(self) -> float:
        """Std of the logit noise in training mode, ``>= 0``; checked when set."""
        return self._noise_std

    @noise_std.setter
    def noise_std(self, value: float) -> None:
        if not value >= 0:
            raise ConfigError(f"noise_std must be >= 0, got {value!r}.")
        self._noise_std = float(value)

    @classmethod
    def from_encoder(
        cls,
        encoder: str | Path | nn.Module,
        degradations: Sequence[str],
        *,
        pretrained: str | None = None,
        image_size: int | None = None,
        trainable_encoder: bool | None = None,
        grid: int = 2,
        hidden_dim: int = 512,
        embed_dim: int = 384,
        head: str = "linear",
        prompts: dict[str, str] | None = None,
        top_k: int = 1,
        temperature: float = 1.0,
        noise_std: float = 0.0,
    ) -> DegradationRouter:
        """Build a router on an encoder given by name, folder or module.

        Args:
            encoder: ``"cnn-tiny"``, an open_clip name (``"ViT-B-32"``,
                ``"local-dir:/folder"``), a 🤗 CLIP folder, or an ``nn.Module``; see
                :func:`loraxir.encoders.create_encoder`.
            degradations: class names, one per expert, in expert order.
            pretrained: open_clip tag or local weights file (``None``: random weights).
            image_size: tower input size override (the CNN's working resolution).
            trainable_encoder: unfreeze the tower (default: only ``"cnn-tiny"``).
            grid: local tiles per side (2 = the paper's 2×2 tiles of a 2× resize; 0 = off).
            hidden_dim, embed_dim: MLP sizes; ``embed_dim`` is the size of ``e_deg``.
            head: ``"linear"`` (classifier) or ``"text"`` (CLIP text prototypes).
            prompts: text prompt per class for ``head="text"`` (default
                :func:`degradation_prompt`).
            top_k, temperature, noise_std: gating, see :func:`top_k_gates`.
        """
        built = create_encoder(
            encoder, pretrained=pretrained, image_size=image_size, trainable=trainable_encoder
        )
        return cls(
            built,
            degradations,
            grid=grid,
            hidden_dim=hidden_dim,
            embed_dim=embed_dim,
            head=head,
            prompts=prompts,
            top_k=top_k,
            temperature=temperature,
            noise_std=noise_std,
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Multi-view encoder features ``(B, D·2)`` (``(B, D)`` with ``grid = 0``).

        All views of all images go through the encoder in one call.
        """
        views = multi_view(images, self.encoder.image_size, self.grid)
        batch, num_views = views.shape[:2]
        embeddings = self.encoder(views.flatten(0, 1)).view(batch, num_views, -1)
        if not self.grid:
            return embeddings[:, 0]
        return torch.cat([embeddings[:, 0], embeddings[:, 1:].mean(dim=1)], dim=-1)

    def route(self, images: torch.Tensor) -> RouterOutput:
        """One routing pass: ``e_deg``, logits and gates (see :class:`RouterOutput`)."""
        embedding = self.mlp(self.features(images))
        logits = self.head(embedding)
        noise = self.noise_std if self.training else 0.0
        gates = top_k_gates(logits, self.top_k, self.temperature, noise)
        return RouterOutput(embedding=embedding, logits=logits, gates=gates)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Gates ``(B, E)`` for images ``(B, C, H, W)`` in [0, 1]."""
        return self.route(images).gates

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The degradation embedding ``e_deg`` ``(B, embed_dim)``."""
        return self.mlp(self.features(images))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, E)`` (the input of the gating and of a classification loss)."""
        return self.head(self.embed(images))

    @torch.no_grad()
    def explain(self, images: torch.Tensor) -> RouterExplanation:
        """Class probabilities and chosen experts per image (see :class:`RouterExplanation`)."""
        output = self.route(images)
        return RouterExplanation(
            list(self.degradations), output.probabilities.cpu(), output.gates.cpu()
        )

    def check_degradations(self, expected: Sequence[str]) -> None:
        """Raise :class:`ConfigError` unless this router's classes are ``expected``, in order."""
        check_degradations(self.degradations, expected)

    def add_degradation(self, name: str, prompt: str | None = None) -> None:
        """Add a class (and its gate) by name.

        With ``head="text"`` its prototype is the text embedding of ``prompt`` (default
        :func:`degradation_prompt`), so the router recognises it zero-shot. With a linear
        head the new row is freshly initialised and must be trained.
        """
        degradations = _check_names([*self.degradations, name])
        if isinstance(self.head, _TextPrototypeHead):
            text = prompt or degradation_prompt(name)
            self.head.add_class(self.encoder.encode_text([text])[0])
            self.prompts = {**(self.prompts or {}), name: text}
        else:
            self.head = _grow_linear(self.head)
        self.degradations = degradations

    def to_config(self) -> dict[str, Any]:
        """A JSON-serialisable description; :meth:`from_config` rebuilds the router from it.

        The encoder appears by reference (type, name, pretrained tag or path); its tensors
        are in :meth:`adapter_state_dict` only when they cannot be rebuilt from it.
        """
        text_dim = self.head.prototypes.shape[1] if self.head_type == "text" else None
        return {
            "format": CONFIG_FORMAT,
            "version": CONFIG_VERSION,
            "degradations": list(self.degradations),
            "encoder": self.encoder.spec(),
            "grid": self.grid,
            "hidden_dim": self.hidden_dim,
            "embed_dim": self.embed_dim,
            "head": self.head_type,
            "text_dim": text_dim,
            "prompts": dict(self.prompts) if self.prompts else None,
            "top_k": self.top_k,
            "temperature": self.temperature,
            "noise_std": self.noise_std,
        }

    @classmethod
    def from_config(
        cls, config: dict[str, Any], encoder: nn.Module | None = None
    ) -> DegradationRouter:
        """Rebuild a router from :meth:`to_config`, reloading a referenced encoder.

        The MLP, head and any saved encoder tensors start fresh: load them with
        :meth:`load_adapter_state_dict` (or use :meth:`from_pretrained`). Pass ``encoder``
        (a module or a :class:`DegradationEncoder`) to reuse a tower you already hold, and
        always for a router built on a custom module.
        """
        _check_config(config)
        spec = config["encoder"]
        if isinstance(encoder, DegradationEncoder):
            built = encoder
        else:
            built = encoder_from_spec(spec, module=encoder)
        text_dim = config.get("text_dim")
        prototypes = None
        if config["head"] == "text":
            prototypes = torch.zeros(len(config["degradations"]), int(text_dim))
        return cls(
            built,
            config["degradations"],
            grid=config["grid"],
            hidden_dim=config["hidden_dim"],
            embed_dim=config["embed_dim"],
            head=config["head"],
            prompts=config.get("prompts"),
            prototypes=prototypes,
            top_k=config["top_k"],
            temperature=config["temperature"],
            noise_std=config["noise_std"],
        )

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors an adapter checkpoint must hold for this router.

        MLP and head always; the encoder's only when :attr:`DegradationEncoder.saves_weights`
        (trained, tiny CNN, random or custom weights) — never a frozen pretrained tower,
        which :meth:`to_config` references instead. Keys are relative to the router
        (``mlp.1.weight``, ``head.weight``, ``encoder....``).
        """
        parts: list[tuple[str, nn.Module]] = [("mlp", self.mlp), ("head", self.head)]
        if self.encoder.saves_weights:
            parts.append(("encoder", self.encoder))
        return {
            f"{prefix}.{key}": tensor.detach().contiguous()
            for prefix, module in parts
            for key, tensor in module.state_dict().items()
        }

    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load tensors saved by :meth:`adapter_state_dict`, strictly.

        Raises :class:`CheckpointError` naming missing keys, unexpected keys and shape
        mismatches; the router is left unchanged when it raises.
        """
        expected = self.adapter_state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        mismatched = [
            f"{key}: checkpoint {tuple(state_dict[key].shape)} vs router {tuple(value.shape)}"
            for key, value in expected.items()
            if key in state_dict and state_dict[key].shape != value.shape
        ]
        if missing or unexpected or mismatched:
            problems = [
                f"{label} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                for label, items in (
                    ("missing", missing),
                    ("unexpected", unexpected),
                    ("shape mismatch", mismatched),
                )
                if items
            ]
            raise CheckpointError(
                "Router tensors do not fit this router (other classes, sizes or encoder?): "
                + "; ".join(problems)
            )
        targets = self.state_dict(keep_vars=True)
        with torch.no_grad():
            for key, value in state_dict.items():
                targets[key].copy_(value)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``router_config.json`` and ``router.safetensors`` into ``directory``.

        Written into a temporary folder next to it, then swapped in by renames, so an
        interrupted save leaves the previous router intact. Other files already in
        ``directory`` are kept.
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            (staging / CONFIG_NAME).write_text(json.dumps(self.to_config(), indent=2) + "\n")
            save_file(self.adapter_state_dict(), staging / WEIGHTS_NAME, metadata={"format": "pt"})
            _swap_in(staging, directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return directory

    @classmethod
    def from_pretrained(
        cls, path: str | Path, encoder: nn.Module | None = None
    ) -> DegradationRouter:
        """Load a router saved by :meth:`save_pretrained`; only safetensors weights are read."""
        path = Path(path)
        if path.suffix == ".safetensors" and path.is_file():
            path = path.parent
        if path.suffix in _PICKLE_SUFFIXES or path.is_file():
            raise CheckpointError(
                f"{str(path)!r} is not a router folder. Routers load from a folder with "
                f"{CONFIG_NAME} and {WEIGHTS_NAME}; pickle checkpoints (.bin/.pt/.pth) are "
                "refused because unpickling can run arbitrary code. Convert one you trust "
                "with safetensors.torch.save_file(torch.load(path), 'router.safetensors')."
            )
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            pickles = sorted(p.name for p in path.glob("*") if p.suffix in _PICKLE_SUFFIXES)
            hint = f" Found {pickles}: pickle files are refused (unsafe)." if pickles else ""
            raise CheckpointError(f"No {WEIGHTS_NAME} in {str(path)!r}.{hint}")
        config_path = path / CONFIG_NAME
        if not config_path.is_file():
            raise CheckpointError(f"No {CONFIG_NAME} in {str(path)!r}.")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{config_path} is not valid JSON: {error}") from error
        router = cls.from_config(config, encoder=encoder)
        router.load_adapter_state_dict(load_file(weights))
        return router

    def extra_repr(self) -> str:
        return (
            f"degradations={self.degradations}, grid={self.grid}, head={self.head_type!r}, "
            f"top_k={self.top_k}, temperature={self.temperature}, noise_std={self.noise_std}"
        )


def _grow_linear(old: nn.Linear) -> nn.Linear:
    """A copy of ``old`` with one more (freshly initialised) output row."""
    new = nn.Linear(old.in_features, old.out_features + 1).to(old.weight)
    with torch.no_grad():
        new.weight[:-1].copy_(old.weight)
        new.bias[:-1].copy_(old.bias)
    return new


def _check_names(names: Sequence[str]) -> list[str]:
    names = list(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"degradations must be a non-empty list of names, got {names!r}.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"Degradation names must be unique; repeated: {duplicates}.")
    return names


def _check_config(config: dict[str, Any]) -> None:
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        raise ConfigError(
            f"Not a loraxir router config (expected format {CONFIG_FORMAT!r}): {str(config)[:200]}"
        )
    if config.get("version", 0) > CONFIG_VERSION:
        raise ConfigError(
            f"Router config version {config['version']} is newer than this loraxir "
            f"understands ({CONFIG_VERSION}); upgrade loraxir."
        )
    unknown = sorted(set(config) - _CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"Unknown keys in router config: {unknown}.")


def _swap_in(staging: Path, directory: Path) -> None:
    """Replace ``directory`` by ``staging`` with renames, keeping its unrelated files."""
    if not directory.exists():
        os.replace(staging, directory)
        return
    for entry in directory.iterdir():
        if entry.name in (CONFIG_NAME, WEIGHTS_NAME):
            continue
        if entry.is_dir():
            shutil.copytree(entry, staging / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, staging / entry.name, follow_symlinks=False)
    retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
    os.replace(directory, retired / directory.name)
    os.replace(staging, directory)
    shutil.rmtree(retired, ignore_errors=True)


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "DegradationRouter",
    "RouterExplanation",
    "RouterOutput",
    "check_degradations",
    "degradation_prompt",
    "load_balancing_loss",
    "multi_view",
    "top_k_gates",
]
