"""The degradation-guided router (DG-Router): which experts should restore this image?

One module per concern:

* :mod:`~loraxir.router.config` — :class:`RouterConfig`, every setting, typed (no torch).
* :mod:`~loraxir.router.views` — the fixed set of square views an image is read through.
* :mod:`~loraxir.router.encoders` — the towers (tiny CNN, open_clip, 🤗 CLIP, any module).
* :mod:`~loraxir.router.statistics` — hand-made image statistics of the views (optional).
* :mod:`~loraxir.router.heads` — linear classifier or CLIP text prototypes.
* :mod:`~loraxir.router.gating` — top-k gates and the load-balancing loss.
* :mod:`~loraxir.router.explanation` — :class:`RouterExplanation`.
* :mod:`~loraxir.router.model` — :class:`DegradationRouter`, saving and loading.

Names are imported on first use, so ``loraxir.router.config`` (read by
:class:`~loraxir.config.LoraIRConfig`) loads without the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from loraxir.router.config import RouterConfig

if TYPE_CHECKING:
    from loraxir.router.data import labelled_batches
    from loraxir.router.explanation import RouterExplanation
    from loraxir.router.gating import load_balancing_loss, top_k_gates
    from loraxir.router.heads import degradation_prompt
    from loraxir.router.model import (
        CONFIG_NAME,
        WEIGHTS_NAME,
        DegradationRouter,
        RouterOutput,
        check_degradations,
    )
    from loraxir.router.views import multi_view

_LAZY = {
    "CONFIG_NAME": "model",
    "WEIGHTS_NAME": "model",
    "DegradationRouter": "model",
    "RouterOutput": "model",
    "check_degradations": "model",
    "RouterExplanation": "explanation",
    "labelled_batches": "data",
    "load_balancing_loss": "gating",
    "top_k_gates": "gating",
    "degradation_prompt": "heads",
    "multi_view": "views",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'loraxir.router' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"loraxir.router.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "DegradationRouter",
    "RouterConfig",
    "RouterExplanation",
    "RouterOutput",
    "check_degradations",
    "degradation_prompt",
    "labelled_batches",
    "load_balancing_loss",
    "multi_view",
    "top_k_gates",
]
