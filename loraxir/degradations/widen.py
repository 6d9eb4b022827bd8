"""Widening a task's parameter ranges, to train and test beyond a suite's settings.

A suite fixes the parameters of its benchmark stand-ins (noise σ = 25, haze β in
[0.8, 2.0], ...). A router trained only on those ranges misreads milder or stronger
cases, and an honest test needs parameters the router did not train on. Rather than
editing the suites, :func:`widen` rewrites a pipeline's *explicit* parameters (those the
suite's YAML sets; the others keep the degradation's own default ranges):

* ``margin`` moves each bound away from the range by that fraction of its magnitude:
  ``[lo, hi]`` becomes ``[lo - margin·|lo|, hi + margin·|hi|]`` (a fixed value ``v``
  becomes ``[v - margin·|v|, v + margin·|v|]``); σ = 25 with ``margin=0.5`` draws from
  [12.5, 37.5], β in [0.8, 2.0] from [0.4, 3.0].
* ``inside`` (with ``margin > inside``) keeps only what lies *outside* the range widened by
  ``inside``: each parameter is drawn below or above it (the side drawn with the
  generator), e.g. ``inside=0.25, margin=0.5`` gives σ in [12.5, 18.75] or [31.25, 37.5]:
  parameters beyond a router trained with ``margin=0.25``, up to 50% outside the suite.

Bounds are clipped to each parameter's allowed range; integer parameters keep integers;
parameters with a fixed list of choices are left alone.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from loraxir.degradations.registry import Compose, Param, get
from loraxir.errors import ConfigError


def widen(
    pipeline: Compose,
    margin: float,
    inside: float = 0.0,
    generator: torch.Generator | None = None,
) -> Compose:
    """A copy of ``pipeline`` whose explicit parameter ranges are widened (see module)."""
    if inside < 0 or margin < 0 or (inside > 0 and inside >= margin):
        raise ConfigError(
            f"widen needs 0 <= inside < margin (or inside = 0), got inside={inside}, "
            f"margin={margin}: nothing lies between the two."
        )
    steps = []
    for name, params in pipeline.steps:
        specs = get(name).params
        steps.append(
            (
                name,
                {
                    key: _widened(specs[key], value, margin, inside, generator)
                    if key in specs and specs[key].choices is None
                    else value
                    for key, value in params.items()
                },
            )
        )
    return Compose(tuple(steps))


def _widened(
    spec: Param, value: Any, margin: float, inside: float, generator: torch.Generator | None
) -> Any:
    low, high = (value, value) if isinstance(value, int | float) else value
    outer_low, outer_high = _band(spec, low, high, margin)
    if inside == 0:
        sides = [(outer_low, outer_high)]
    else:
        inner_low, inner_high = _band(spec, low, high, inside)
        sides = [(outer_low, inner_low), (inner_high, outer_high)]
    if spec.integer:
        # Integers only, and outside the inner band: below [4.5, 6.75) → [5, 6].
        if inside == 0:
            sides = [(math.ceil(outer_low), math.floor(outer_high))]
        else:
            sides = [
                (math.ceil(outer_low), math.ceil(inner_low) - 1),
                (math.floor(inner_high) + 1, math.floor(outer_high)),
            ]
        sides = [(a, b) for a, b in sides if a <= b]
    else:
        sides = [(a, b) for a, b in sides if a < b or inside == 0]
    if not sides:
        if inside > 0:
            warnings.warn(
                f"widen: {spec.help!r} = {value!r} has no room outside it (a zero, or its "
                f"allowed range [{spec.low:g}, {spec.high:g}]), so it is kept as it is.",
                stacklevel=3,
            )
        return value
    pick = int(torch.randint(len(sides), (), generator=generator)) if len(sides) > 1 else 0
    below, above = sides[pick]
    return [below, above] if below < above else below


def _band(spec: Param, low: float, high: float, margin: float) -> tuple[float, float]:
    """``[low, high]`` widened by ``margin`` of each bound's magnitude, clipped to the spec."""
    return (
        max(spec.low, _tidy(low - margin * abs(low))),
        min(spec.high, _tidy(high + margin * abs(high))),
    )


def _tidy(value: float) -> float:
    """Six significant digits: 0.009000000000000001 → 0.009 in configs and reports."""
    return float(f"{value:.6g}")
