"""``DegradationRouter`` (the paper's DG-Router): which experts should restore this image?

Data flow (``docs/routing.md``)::

    image (B, C, H, W) in [0, 1]
      → views: a global view + grid×grid local views          (B, 1+g², 3, S, S)
      → encoder, one call for every view of every image        (B·(1+g²), D)
      → concat(global, mean [and max] of local views)          (B, 2D or 3D)  [(B, D) if g=0]
      → [+ image statistics of the views (image_stats)]       (B, F)
      → MLP → degradation embedding e_deg                      (B, embed_dim)
      → head → class logits                                    (B, E)
      → top-k softmax with a temperature → gates               (B, E), rows sum to 1

Every setting is a field of :class:`~loraxir.router.config.RouterConfig`. A router saves
as a small adapter: MLP and head tensors, plus the encoder's tensors only when they cannot
be rebuilt from a reference (a trained tower, the tiny CNN, random or custom weights), with
the same atomic writer and pickle refusal as adapters (:mod:`loraxir.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loraxir import checkpoint
from loraxir.errors import CheckpointError, ConfigError, RoutingError, UnknownNameError
from loraxir.router.config import RouterConfig, field_names
from loraxir.router.encoders import DegradationEncoder, create_encoder, encoder_from_spec
from loraxir.router.explanation import RouterExplanation
from loraxir.router.gating import top_k_gates
from loraxir.router.heads import TextPrototypeHead, degradation_prompt, grow_linear
from loraxir.router.statistics import (
    CEPSTRUM_DIM,
    STATISTICS_DIM,
    cepstrum_statistics,
    view_statistics,
)
from loraxir.router.views import check_image_batch, multi_view
from loraxir.routing import check_degradations
from loraxir.validation import check_names

CONFIG_NAME = "router_config.json"
WEIGHTS_NAME = "router.safetensors"
# Key of the fitted class embeddings in router.safetensors (absent until fitted).
CLASS_EMBEDDINGS_KEY = "class_embeddings"


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


class DegradationRouter(nn.Module):
    """Encoder → views → MLP → ``e_deg`` → head → logits → top-k gates.

    Build it with :meth:`from_encoder` (or :meth:`from_config` / :meth:`from_pretrained`),
    or as ``DegradationRouter(encoder, degradations, **settings)`` on a
    :class:`DegradationEncoder`, ``settings`` being :class:`RouterConfig` fields (or pass a
    ``RouterConfig`` instead of the class names). ``router(x)`` maps images
    ``(B, C, H, W)`` float in [0, 1] (any size; C = 3, 1 or 4) to gates ``(B, E)``,
    ``E = len(degradations)``, each row summing to 1 with exactly ``top_k`` non-zero
    entries. Gates are differentiable with respect to the trainable parameters (MLP, head,
    and the encoder when unfrozen). Noisy gating (``noise_std``) applies in training only.

    ``top_k``, ``temperature``, ``noise_std`` and ``unsure_below`` can be changed on a
    built router (checked when set); the other settings shape its tensors and are fixed.
    """

    def __init__(
        self,
        encoder: DegradationEncoder,
        degradations: Sequence[str] | RouterConfig,
        *,
        prototypes: torch.Tensor | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        self._config = _make_config(degradations, settings)
        config = self._config
        self.encoder = encoder
        features = (
            encoder.embed_dim * (1 + _local_pools(config))
            + (STATISTICS_DIM if config.image_stats else 0)
            + (CEPSTRUM_DIM if config.cepstrum else 0)
        )
        self.mlp = nn.Sequential(
            nn.LayerNorm(features),
            nn.Linear(features, config.hidden_dim),
            nn.GELU(),
            nn.Linear(config.hidden_dim, config.embed_dim),
        )
        # (E, embed_dim) mean e_deg per class (fit_class_embeddings); moves with the router
        # and is in state_dict() once fitted, so peft's save and load keep it too.
        self.register_buffer("class_embeddings", None)
        if config.head == "linear":
            self.head: nn.Module = nn.Linear(config.embed_dim, len(config.degradations))
            self._config = dataclasses.replace(config, prompts=None)
            return
        prompts = {
            n: (config.prompts or {}).get(n, degradation_prompt(n)) for n in config.degradations
        }
        if prototypes is None:
            prototypes = encoder.encode_text([prompts[n] for n in config.degradations])
        self.head = TextPrototypeHead(config.embed_dim, prototypes)
        self._config = dataclasses.replace(config, prompts=prompts)

    # ------------------------------------------------------------------ settings
    @property
    def degradations(self) -> list[str]:
        """Class names; gate ``i`` drives expert ``i``."""
        return list(self._config.degradations)

    @property
    def views(self) -> str:
        """View kind, ``"native"`` or ``"resize"`` (see :mod:`loraxir.router.views`)."""
        return self._config.views

    @property
    def grid(self) -> int:
        """Local views per side (0: global view only); fixed, as it sets the MLP's input."""
        return self._config.grid

    @property
    def cepstrum(self) -> int:
        """Side of the native crops whose cepstrum the MLP reads (0: off); fixed."""
        return self._config.cepstrum

    @property
    def hidden_dim(self) -> int:
        return self._config.hidden_dim

    @property
    def embed_dim(self) -> int:
        """Size of the degradation embedding ``e_deg``."""
        return self._config.embed_dim

    @property
    def head_type(self) -> str:
        """``"linear"`` or ``"text"``."""
        return self._config.head

    @property
    def prompts(self) -> dict[str, str] | None:
        """Text prompt per class (``head="text"``), else ``None``."""
        return dict(self._config.prompts) if self._config.prompts else None

    @property
    def top_k(self) -> int:
        """Experts mixed per image, in ``[1, E]``; checked when set."""
        return self._config.top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        self._config = dataclasses.replace(self._config, top_k=value)

    @property
    def temperature(self) -> float:
        """Softmax temperature of the gates, ``> 0``; checked when set."""
        return self._config.temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._config = dataclasses.replace(self._config, temperature=value)

    @property
    def noise_std(self) -> float:
        """Std of the logit noise in training mode, ``>= 0``; checked when set."""
        return self._config.noise_std

    @noise_std.setter
    def noise_std(self, value: float) -> None:
        self._config = dataclasses.replace(self._config, noise_std=value)

    @property
    def unsure_below(self) -> float:
        """Top probability under which :meth:`explain` flags an image unsure; checked when set."""
        return self._config.unsure_below

    @unsure_below.setter
    def unsure_below(self, value: float) -> None:
        self._config = dataclasses.replace(self._config, unsure_below=value)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_encoder(
        cls,
        encoder: str | Path | nn.Module,
        degradations: Sequence[str],
        *,
        pretrained: str | None = None,
        image_size: int | None = None,
        trainable_encoder: bool | None = None,
        **settings: Any,
    ) -> DegradationRouter:
        """Build a router on an encoder given by name, folder or module.

        Args:
            encoder: ``"cnn-tiny"``, an open_clip name (``"ViT-B-32"``,
                ``"local-dir:/folder"``), a 🤗 CLIP folder, or an ``nn.Module``; see
                :func:`loraxir.router.encoders.create_encoder`.
            degradations: class names, one per expert, in expert order.
            pretrained: open_clip tag or local weights file (``None``: random weights).
            image_size: tower input size override (the CNN's working resolution).
            trainable_encoder: unfreeze the tower (default: only ``"cnn-tiny"``).
            settings: :class:`RouterConfig` fields (``views``, ``grid``, ``hidden_dim``,
                ``embed_dim``, ``head``, ``prompts``, ``top_k``, ``temperature``,
                ``noise_std``, ``unsure_below``).
        """
        built = create_encoder(
            encoder, pretrained=pretrained, image_size=image_size, trainable=trainable_encoder
        )
        return cls(built, degradations, **settings)

    @classmethod
    def from_config(
        cls, config: RouterConfig | dict[str, Any], encoder: nn.Module | None = None
    ) -> DegradationRouter:
        """Rebuild a router from :meth:`to_config` (or its dict form), reloading the encoder.

        The MLP, head and any saved encoder tensors start fresh: load them with
        :meth:`load_adapter_state_dict` (or use :meth:`from_pretrained`). Pass ``encoder``
        (a module or a :class:`DegradationEncoder`) to reuse a tower you already hold, and
        always for a router built on a custom module.
        """
        config = RouterConfig.coerce(config)
        if config.encoder is None:
            raise ConfigError(
                "This RouterConfig has no encoder spec; build the router with "
                "DegradationRouter.from_encoder(...) or from a config written by to_config()."
            )
        if isinstance(encoder, DegradationEncoder):
            built = encoder
        else:
            try:
                built = encoder_from_spec(config.encoder, module=encoder)
            except (ConfigError, CheckpointError, UnknownNameError) as error:
                # The spec references weights by path or tag: moved or missing, they are
                # the router's, not the user's current call's. (A custom module's own
                # error already says to pass encoder=.)
                if not _references_weights(config.encoder):
                    raise
                raise type(error)(
                    f"This router's encoder references {_reference(config.encoder)}, which "
                    f"cannot be loaded here: {error} Copy the weights along with the router "
                    "(or to the same path), or pass encoder= with the tower you hold."
                ) from error
        prototypes = None
        if config.head == "text":
            prototypes = torch.zeros(len(config.degradations), int(config.text_dim or 1))
        return cls(built, config, prototypes=prototypes)

    def to_config(self) -> RouterConfig:
        """The :class:`RouterConfig` of this router, encoder spec included.

        :meth:`from_config` rebuilds the router from it; ``to_config().to_dict()`` is its
        JSON form. The encoder appears by reference (type, name, pretrained tag or path);
        its tensors are in :meth:`adapter_state_dict` only when it cannot be rebuilt.
        """
        text_dim = self.head.prototypes.shape[1] if self.head_type == "text" else None
        return dataclasses.replace(self._config, encoder=self.encoder.spec(), text_dim=text_dim)

    # ------------------------------------------------------------------ routing
    def make_views(self, images: torch.Tensor) -> torch.Tensor:
        """The ``(B, 1 + grid², 3, S, S)`` views this router encodes (``S``: tower input)."""
        return multi_view(images, self.encoder.image_size, self.grid, self.views)

    def read_cepstrum(self, images: torch.Tensor) -> torch.Tensor | None:
        """The ``(B, 2)`` cepstrum statistics this router reads beside its views, or
        ``None`` without the ``cepstrum`` setting
        (:func:`~loraxir.router.statistics.cepstrum_statistics`)."""
        if not self.cepstrum:
            return None
        return cepstrum_statistics(images, self.cepstrum)

    def encode_views(
        self, views: torch.Tensor, cepstrum: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encoder features ``(B, F)`` of precomputed views: the MLP's input.

        All views of all images go through the encoder in one call. The global view's
        embedding comes first, then the local views' embeddings pooled by mean (and by
        element-wise max with ``pooling="mean_max"``; none with ``grid = 0``), then, with
        ``image_stats``, the views' :func:`~loraxir.router.statistics.view_statistics`,
        then, with ``cepstrum``, the images' :meth:`read_cepstrum` (required then: views
        are too small to hold it).
        """
        batch, num_views = views.shape[:2]
        embeddings = self.encoder(views.flatten(0, 1)).view(batch, num_views, -1)
        parts = [embeddings[:, 0]]
        if self.grid:
            local = embeddings[:, 1:]
            parts.append(local.mean(dim=1))
            if self._config.pooling == "mean_max":
                parts.append(local.amax(dim=1))
        if self._config.image_stats:
            parts.append(view_statistics(views).to(embeddings.dtype))
        if self.cepstrum:
            if cepstrum is None or cepstrum.shape != (batch, CEPSTRUM_DIM):
                got = None if cepstrum is None else tuple(cepstrum.shape)
                raise RoutingError(
                    f"This router reads the cepstrum of each image beside its views: pass "
                    f"cepstrum=router.read_cepstrum(images) ({batch}, {CEPSTRUM_DIM}) with the "
                    f"views (got {got}), or call router.route(images)."
                )
            parts.append(cepstrum.to(embeddings))
        return torch.cat(parts, dim=-1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Multi-view encoder features of images of any float dtype (see
        :meth:`encode_views` and :meth:`route`)."""
        return self.encode_views(*self._views_and_cepstrum(images))

    def _views_and_cepstrum(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Views and cepstrum computed in float32 (their anti-aliased resampling and FFT
        have no half-precision CPU kernels), cast to the router's own dtype."""
        check_image_batch(images)
        if images.is_floating_point():
            images = images.float()
        dtype = next(self.mlp.parameters()).dtype
        cepstrum = self.read_cepstrum(images)
        return self.make_views(images).to(dtype), None if cepstrum is None else cepstrum.to(dtype)

    def route_views(
        self, views: torch.Tensor, cepstrum: torch.Tensor | None = None
    ) -> RouterOutput:
        """One routing pass on precomputed :meth:`make_views` (and :meth:`read_cepstrum`)
        output (training pipelines)."""
        embedding = self.mlp(self.encode_views(views, cepstrum))
        logits = self.head(embedding)
        noise = self.noise_std if self.training else 0.0
        gates = top_k_gates(logits, self.top_k, self.temperature, noise)
        return RouterOutput(embedding=embedding, logits=logits, gates=gates)

    def route(self, images: torch.Tensor) -> RouterOutput:
        """One routing pass: ``e_deg``, logits and gates (see :class:`RouterOutput`).

        Views and cepstrum are computed in float32 from images of any float dtype (their
        anti-aliased resampling and FFT have no half-precision CPU kernels), then cast to
        the router's own dtype."""
        return self.route_views(*self._views_and_cepstrum(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Gates ``(B, E)`` for images ``(B, C, H, W)`` in [0, 1]."""
        return self.route(images).gates

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The degradation embedding ``e_deg`` ``(B, embed_dim)``."""
        return self.mlp(self.features(images))

    @torch.no_grad()
    def fit_class_embeddings(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor | Sequence[str]]]
    ) -> torch.Tensor:
        """Set :attr:`class_embeddings` to each class's mean ``e_deg`` over ``batches``.

        ``batches`` yields ``(images, labels)``: images ``(B, C, H, W)`` in [0, 1], labels
        class indices ``(B,)`` or names. Use the images DAM blocks and experts trained on
        (degraded training crops): the mean is the embedding they saw most of for that
        class. Images go to the router's device. Raises :class:`RoutingError` naming a class
        that no image showed; the router is left unchanged then. Returns the
        ``(E, embed_dim)`` embeddings.
        """
        classes = self.degradations
        parameter = next(self.mlp.parameters())
        sums = torch.zeros(len(classes), self._config.embed_dim, dtype=torch.float64)
        counts = torch.zeros(len(classes), dtype=torch.float64)
        was_training = self.training
        self.eval()
        try:
            for batch in batches:
                if not (isinstance(batch, tuple | list) and len(batch) == 2):
                    raise RoutingError(
                        "fit_class_embeddings takes an iterable of (images, labels) pairs, "
                        "e.g. [(images, labels)] for one batch."
                    )
                images, labels = batch
                if not isinstance(images, torch.Tensor) or images.dim() != 4:
                    raise RoutingError(
                        f"Images are a (B, C, H, W) torch.Tensor batch, got "
                        f"{getattr(images, 'shape', type(images).__name__)}."
                    )
                index = _class_indices(labels, classes).cpu()
                if index.numel() != images.shape[0]:
                    raise RoutingError(
                        f"{index.numel()} labels for {images.shape[0]} images; give one "
                        "label per image."
                    )
                embedding = self.embed(images.to(parameter.device)).double().cpu()
                sums.index_add_(0, index, embedding)
                counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
        finally:
            self.train(was_training)
        unseen = [name for name, count in zip(classes, counts.tolist(), strict=True) if not count]
        if unseen:
            raise RoutingError(
                f"No images of class(es) {unseen} to fit class embeddings on; give images "
                f"of every class {classes}."
            )
        self.class_embeddings = (sums / counts[:, None]).to(parameter)
        return self.class_embeddings

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """torch's loading, which skips a buffer that is still ``None``: fitted class
        embeddings in ``state_dict`` (a peft or Accelerate checkpoint) land in an unfitted
        router too. A wrong shape is reported as torch reports any other."""
        fitted = state_dict.get(prefix + CLASS_EMBEDDINGS_KEY)
        if self.class_embeddings is None and isinstance(fitted, torch.Tensor):
            shape = (len(self.degradations), self._config.embed_dim)
            self.class_embeddings = torch.empty(shape).to(next(self.mlp.parameters()))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def class_embedding(self, gates: torch.Tensor) -> torch.Tensor | None:
        """``gates @ class_embeddings``: the DAM embedding of a class the caller fixed
        (``(B, E)`` or ``(E,)`` gates), or ``None`` before :meth:`fit_class_embeddings`."""
        if self.class_embeddings is None:
            return None
        rows = gates.reshape(-1, gates.shape[-1])
        return rows.to(self.class_embeddings) @ self.class_embeddings

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, E)`` (the input of the gating and of a classification loss)."""
        return self.head(self.embed(images))

    @torch.no_grad()
    def explain(self, images: torch.Tensor) -> RouterExplanation:
        """Probabilities, chosen experts and unsure flags per image (:class:`RouterExplanation`),
        without the training-time gate noise (``noise_std``), so the same image always gets
        the same explanation."""
        was_training = self.training
        self.eval()
        try:
            output = self.route(images)
        finally:
            self.train(was_training)
        return RouterExplanation(
            self.degradations,
            output.probabilities.cpu(),
            output.gates.cpu(),
            unsure_below=self.unsure_below,
        )

    def check_degradations(self, expected: Sequence[str]) -> None:
        """Raise :class:`ConfigError` unless this router's classes are ``expected``, in order."""
        check_degradations(self.degradations, expected)

    def add_degradation(self, name: str, prompt: str | None = None) -> None:
        """Add a class (and its gate) by name.

        With ``head="text"`` its prototype is the text embedding of ``prompt`` (default
        :func:`degradation_prompt`), so the router recognises it zero-shot. With a linear
        head the new row is freshly initialised and must be trained. Old classes' logits are
        unchanged either way. Fitted class embeddings keep their rows, so an old class given
        by name drives DAM blocks exactly as before; the new class gets the mean of them
        until :meth:`fit_class_embeddings` fits its own (``recipes/add_degradation.py`` fits
        it on the new class's patches).
        """
        degradations = check_names("degradations", [*self.degradations, name])
        prompts = self._config.prompts
        if isinstance(self.head, TextPrototypeHead):
            text = prompt or degradation_prompt(name)
            self.head.add_class(self.encoder.encode_text([text])[0])
            prompts = {**(prompts or {}), name: text}
        else:
            self.head = grow_linear(self.head)
        self._config = dataclasses.replace(self._config, degradations=degradations, prompts=prompts)
        if self.class_embeddings is not None:
            fitted = self.class_embeddings
            self.class_embeddings = torch.cat([fitted, fitted.mean(0, keepdim=True)])

    # ------------------------------------------------------------------ saving
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
        tensors = {
            f"{prefix}.{key}": tensor.detach().contiguous()
            for prefix, module in parts
            for key, tensor in module.state_dict().items()
        }
        if self.class_embeddings is not None:
            tensors[CLASS_EMBEDDINGS_KEY] = self.class_embeddings.detach().contiguous()
        return tensors

    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load tensors saved by :meth:`adapter_state_dict`, strictly.

        Raises :class:`CheckpointError` naming missing keys, unexpected keys and shape
        mismatches; the router is left unchanged when it raises.
        """
        expected = self.adapter_state_dict()
        expected.pop(CLASS_EMBEDDINGS_KEY, None)
        fitted = state_dict.get(CLASS_EMBEDDINGS_KEY)
        if fitted is not None:
            expected[CLASS_EMBEDDINGS_KEY] = torch.empty(
                len(self.degradations), self._config.embed_dim
            )
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
                if key != CLASS_EMBEDDINGS_KEY:
                    targets[key].copy_(value)
        # Tensors without embeddings clear this router's: its own were computed by the MLP
        # just replaced, and would drive DAM blocks with another network's vectors.
        self.class_embeddings = (
            None if fitted is None else fitted.to(next(self.mlp.parameters())).clone()
        )

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``router_config.json`` and ``router.safetensors`` into ``directory``.

        Atomic, through the adapters' writer (:func:`loraxir.checkpoint.staged_folder`):
        an interrupted save leaves the previous router intact; other files are kept.
        """
        if not isinstance(directory, str | os.PathLike):
            raise CheckpointError(f"Pass a folder path to save the router in, got {directory!r}.")
        with checkpoint.staged_folder(directory) as staging:
            text = json.dumps(self.to_config().to_dict(), indent=2) + "\n"
            (staging / CONFIG_NAME).write_text(text, encoding="utf-8")
            checkpoint.write_safetensors(staging / WEIGHTS_NAME, self.adapter_state_dict())
        return Path(directory)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, encoder: nn.Module | None = None
    ) -> DegradationRouter:
        """Load a router saved by :meth:`save_pretrained`; only safetensors weights are read.

        ``path`` is the folder or its ``router.safetensors``; pickle files are refused.
        """
        if not isinstance(path, str | os.PathLike):
            raise CheckpointError(f"Pass the router's folder path, got {path!r}.")
        path = Path(path)
        if path.suffix == ".safetensors" and path.is_file():
            path = path.parent
        if path.is_file():
            checkpoint.refuse_file(path)
        tensors = checkpoint.read_safetensors(path, WEIGHTS_NAME)
        config_path = path / CONFIG_NAME
        if not config_path.is_file():
            raise CheckpointError(f"No {CONFIG_NAME} in {str(path)!r}.")
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{config_path} is not valid JSON: {error}") from error
        router = cls.from_config(config, encoder=encoder)
        router.load_adapter_state_dict(tensors)
        return router

    def extra_repr(self) -> str:
        config = self._config
        return (
            f"degradations={config.degradations}, views={config.views!r}, grid={config.grid}, "
            f"head={config.head!r}, top_k={config.top_k}, temperature={config.temperature}, "
            f"noise_std={config.noise_std}"
        )


def _class_indices(labels: torch.Tensor | Sequence[str], classes: list[str]) -> torch.Tensor:
    """Class indices ``(B,)`` from indices (a tensor, NumPy array or list of ints) or names;
    unknown names, fractional indices and a bare string raise RoutingError."""
    if isinstance(labels, str):
        raise RoutingError(
            f"Labels are one per image: pass [{labels!r}] * batch_size, not the string {labels!r}."
        )
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels) if labels.dtype.kind in "iuf" else labels.tolist()
    if not isinstance(labels, torch.Tensor) and all(
        isinstance(label, numbers.Number) and not isinstance(label, bool) for label in labels
    ):
        labels = torch.tensor(list(labels))
    if isinstance(labels, torch.Tensor):
        if labels.dtype == torch.bool:
            raise RoutingError(
                "Labels are class indices or names, not booleans: convert a mask with "
                "mask.long() if 0/1 are the classes you mean."
            )
        if labels.is_floating_point() and not bool((labels == labels.round()).all()):
            raise RoutingError(f"Class indices must be whole numbers, got {labels}.")
        index = labels.long().flatten()
        if index.numel() and not (0 <= int(index.min()) and int(index.max()) < len(classes)):
            raise RoutingError(f"Class indices must be in [0, {len(classes)}), got {labels}.")
        return index
    unknown = sorted({name for name in labels if name not in classes})
    if unknown:
        raise RoutingError(f"Unknown class name(s) {unknown}; the router's classes are {classes}.")
    return torch.tensor([classes.index(name) for name in labels], dtype=torch.long)


def _local_pools(config: RouterConfig) -> int:
    """How many pooled copies of the local views' features the MLP reads (0 without them)."""
    if not config.grid:
        return 0
    return 2 if config.pooling == "mean_max" else 1


def _make_config(
    degradations: Sequence[str] | RouterConfig, settings: dict[str, Any]
) -> RouterConfig:
    """A :class:`RouterConfig` from class names (or a config) and keyword settings."""
    unknown = sorted(set(settings) - set(field_names()))
    if unknown:
        raise ConfigError(
            f"Unknown router settings {unknown}; the settings are the RouterConfig fields "
            f"{[n for n in field_names() if n != 'degradations']}."
        )
    if isinstance(degradations, RouterConfig):
        return dataclasses.replace(degradations, **settings)
    return RouterConfig(degradations=check_names("degradations", degradations), **settings)


def _references_weights(spec: dict[str, Any]) -> bool:
    """Does an encoder spec load weights it names (a file, a folder or a tag)?"""
    return any(spec.get(key) for key in ("pretrained", "path")) or str(
        spec.get("name", "")
    ).startswith("local-dir:")


def _reference(spec: dict[str, Any]) -> str:
    """How a router config names its encoder's weights (for errors)."""
    parts = [f"{key}={spec[key]!r}" for key in ("name", "pretrained", "path") if spec.get(key)]
    return ", ".join(parts) or repr(spec.get("type"))
