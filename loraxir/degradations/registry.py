"""The registry of named degradations and the contract they all share.

A degradation is a pure function of a clean batch, a parameter set and a seed. Parameters
are *sampled* once per call from ranges (or fixed by the caller) and *reported*, together
with the seed that drives every random pattern (noise, streaks, drops), so that
``apply(name, images, **reported)`` reproduces a sample bit for bit. One parameter set is
drawn per call, shared by the whole batch; to vary parameters image by image, call per
image (as :class:`loraxir.data.SyntheticPairs` does).

Contract of every degradation: input float ``(B, 3, H, W)`` in ``[0, 1]`` on any device;
output of the same shape, dtype and device, clipped to ``[0, 1]`` and rounded to the 256
levels of an 8-bit file, because the benchmark sets the paper evaluates on are 8-bit
files.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from loraxir.errors import ConfigError, DataError, unknown_name

Number = int | float
# A caller's value for one parameter: a number (fixed), a (low, high) pair (sampled
# uniformly) or, for parameters with choices, a list of allowed values (one is drawn).
ParamValue = Number | Sequence[Number]
_SEED_HIGH = 2**31 - 1


@dataclass(frozen=True)
class Param:
    """One parameter of a degradation: its allowed range and what is drawn by default.

    ``low``/``high`` bound every value a caller may pass (inclusive). ``default`` is the
    value or ``(low, high)`` range drawn when the caller passes nothing. ``choices``
    restricts an integer parameter to a finite set (e.g. a scale factor of 2 or 4).

    The spec is checked when it is built: a default outside its own bounds would otherwise
    be drawn and reported, and replaying that report would then fail.
    """

    low: float
    high: float
    default: ParamValue
    help: str
    integer: bool = False
    choices: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        where = f"Param({self.help!r})"
        bounds = (self.low, self.high)
        if not all(_is_number(b) and math.isfinite(b) for b in bounds) or self.low > self.high:
            raise ConfigError(
                f"{where}: low={self.low!r} and high={self.high!r} must be finite numbers "
                "with low <= high."
            )
        if self.choices is not None and (
            not isinstance(self.choices, tuple)
            or not self.choices
            or not all(
                _is_number(c) and c == int(c) and self.low <= c <= self.high for c in self.choices
            )
        ):
            raise ConfigError(
                f"{where}: choices={self.choices!r} must be a non-empty tuple of whole numbers "
                f"inside [{self.low:g}, {self.high:g}] (choices are for integer parameters; "
                "give a float parameter a [low, high] range)."
            )
        self.validate(where, "default", self.default)

    def validate(self, degradation: str, name: str, value: Any) -> None:
        """Raise :class:`ConfigError` unless ``value`` is a fixed value, range or choice list."""
        values = _as_numbers(degradation, name, value)
        if self.choices is not None:
            bad = [v for v in values if v not in self.choices]
            if bad:
                raise ConfigError(
                    f"{degradation}: {name}={bad[0]!r} is not one of {list(self.choices)} "
                    f"({self.help}). Pass one of them, or a list of them to draw from."
                )
            return
        if not isinstance(value, int | float) and len(values) != 2:
            raise ConfigError(
                f"{degradation}: {name}={list(values)!r} must be a number or a [low, high] "
                f"range of two numbers ({self.help})."
            )
        for v in values:
            if not self.low <= v <= self.high:
                raise ConfigError(
                    f"{degradation}: {name}={v!r} is out of range [{self.low:g}, {self.high:g}] "
                    f"({self.help}). Pass a value inside the range."
                )
            if self.integer and v != int(v):
                raise ConfigError(f"{degradation}: {name}={v!r} must be an integer ({self.help}).")
        if len(values) == 2 and values[0] > values[1]:
            raise ConfigError(
                f"{degradation}: {name} range {list(values)!r} has low > high; write it as "
                f"[{values[1]!r}, {values[0]!r}]."
            )

    def draw(self, value: ParamValue, generator: torch.Generator | None) -> Number:
        """Return a concrete value: ``value`` itself if fixed, else one drawn with ``generator``."""
        if isinstance(value, int | float):
            return int(value) if self.integer else float(value)
        if self.choices is not None:
            index = _randint(0, len(value) - 1, generator)
            return int(value[index])
        low, high = value
        if self.integer:
            return _randint(int(low), int(high), generator)
        u = torch.rand((), generator=generator, dtype=torch.float64, device=_device(generator))
        return float(low + (high - low) * u.item())


DegradeFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Degradation:
    """A registered degradation: ``fn(images, generator, **params) -> images``.

    ``fn`` receives concrete parameter values and a generator seeded from the reported
    ``seed``, on the images' device; it must draw every random pattern from it.
    """

    name: str
    fn: DegradeFn
    params: Mapping[str, Param]
    summary: str
    extras: tuple[str, ...] = ()

    def describe(self) -> str:
        """A plain-text summary: the name, what it does and each parameter's range."""
        lines = [f"{self.name}: {self.summary}"]
        for key, spec in self.params.items():
            allowed = list(spec.choices) if spec.choices else f"[{spec.low:g}, {spec.high:g}]"
            default = spec.default if isinstance(spec.default, int | float) else list(spec.default)
            lines.append(f"    {key:<11} {spec.help}; allowed {allowed}, default {default}")
        lines.extend(f"    {key:<11} optional input, see the docs" for key in self.extras)
        return "\n".join(lines)

    def check_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Raise a typed error for unknown parameter names or values out of range; return
        the parameters with numpy scalars made Python numbers (reports stay JSON)."""
        params = {
            key: value if key in self.extras else _plain(value) for key, value in params.items()
        }
        for key, value in params.items():
            if key == "seed":
                _check_seed(self.name, value)
            elif key in self.params:
                self.params[key].validate(self.name, key, value)
            elif key not in self.extras:
                raise unknown_name(
                    "parameter",
                    key,
                    [*self.params, *self.extras, "seed"],
                    hint=f"See `loraxir degradations --list` for {self.name!r}'s parameters.",
                    where=f"of {self.name!r}",
                )
        return params

    def sample(self, generator: torch.Generator | None = None, **params: Any) -> dict[str, Any]:
        """Return a full, concrete parameter set (including ``seed``) for one call."""
        params = self.check_params(params)
        drawn: dict[str, Any] = {}
        for key, spec in self.params.items():
            drawn[key] = spec.draw(params.get(key, spec.default), generator)
        drawn.update({key: params[key] for key in self.extras if key in params})
        seed = params.get("seed")
        drawn["seed"] = _randint(0, _SEED_HIGH, generator) if seed is None else int(seed)
        return drawn

    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None, **params: Any
    ) -> tuple[Tensor, dict[str, Any]]:
        """Degrade ``images``; return the degraded batch and the parameters that made it."""
        check_images(images)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ConfigError(
                f"{self.name}: the generator must be a torch.Generator or None, got "
                f"{type(generator).__name__}; seed one with torch.Generator().manual_seed(0)."
            )
        drawn = self.sample(generator, **params)
        if images.numel() == 0:
            # Nothing to degrade; convolutions, FFTs and JPEG encoders fail on empty input.
            return quantize(images), drawn
        local = torch.Generator(device=images.device).manual_seed(drawn["seed"])
        kwargs = {key: value for key, value in drawn.items() if key != "seed"}
        with torch.no_grad():
            out = self.fn(images, local, **kwargs)
        return quantize(_checked_output(self.name, images, out)), drawn


def _checked_output(name: str, images: Tensor, out: Any) -> Tensor:
    """``out`` as the contract has it (the input's shape, dtype and device, finite), or a
    :class:`DataError` naming the degradation: a registered function of one's own is
    otherwise trusted, and a NaN would survive clipping into the training data."""
    if not isinstance(out, Tensor) or out.shape != images.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise DataError(
            f"Degradation {name!r} returned {got}, not a tensor of its input's shape "
            f"{tuple(images.shape)}; a degradation keeps the batch, channels and size."
        )
    out = out.to(device=images.device, dtype=images.dtype)
    if not bool(torch.isfinite(out).all()):
        raise DataError(
            f"Degradation {name!r} returned NaN or infinite values for parameters within "
            "its ranges; guard its arithmetic (e.g. divisions by zero) or narrow its Param "
            "ranges."
        )
    return out


_REGISTRY: dict[str, Degradation] = {}


def register(
    name: str,
    params: Mapping[str, Param],
    summary: str,
    extras: tuple[str, ...] = (),
) -> Callable[[DegradeFn], DegradeFn]:
    """Decorator registering ``fn`` under ``name``; registering a name twice is an error.

    ``extras`` names optional keyword arguments that are passed through untouched and are
    not sampled (e.g. a depth map for ``haze``). The name and parameter names are checked
    here, because a bad one would only fail later, in every :func:`available` or ``apply``.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"A degradation name must be a non-empty string, got {name!r}; e.g. "
            "register('vignette', {...}, 'radial darkening')."
        )
    if not isinstance(params, Mapping):
        raise ConfigError(
            f"register({name!r}): params must map parameter names to Param, got "
            f"{type(params).__name__}."
        )
    if not isinstance(extras, tuple) or not all(isinstance(e, str) and e for e in extras):
        raise ConfigError(
            f"register({name!r}): extras must be a tuple of names, got {extras!r}; e.g. "
            "extras=('depth',)."
        )
    reserved = {"seed", "images", "generator"}  # the reported seed and fn's own arguments
    for key in (*params, *extras):
        if not isinstance(key, str) or not key or key in reserved:
            raise ConfigError(
                f"register({name!r}): parameter name {key!r} must be a non-empty string other "
                "than 'seed' (the reported seed), 'images' and 'generator' (the function's "
                "own arguments)."
            )
    for key, spec in params.items():
        if key in extras:
            raise ConfigError(f"register({name!r}): {key!r} is both a parameter and an extra.")
        if not isinstance(spec, Param):
            raise ConfigError(
                f"register({name!r}): parameter {key!r} must be a Param, got {type(spec).__name__}."
            )

    def decorate(fn: DegradeFn) -> DegradeFn:
        if name in _REGISTRY:
            raise ConfigError(f"A degradation named {name!r} is already registered.")
        _REGISTRY[name] = Degradation(name, fn, dict(params), summary, extras)
        return fn

    return decorate


def available() -> list[str]:
    """The registered degradation names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> Degradation:
    """The :class:`Degradation` registered as ``name``; lists the known names if unknown."""
    if name not in _REGISTRY:
        raise unknown_name("degradation", name, _REGISTRY)
    return _REGISTRY[name]


def apply(
    name: str, images: Tensor, generator: torch.Generator | None = None, **params: Any
) -> tuple[Tensor, dict[str, Any]]:
    """Degrade ``images`` (float ``(B, 3, H, W)`` in ``[0, 1]``) with the degradation ``name``.

    Parameters not given are drawn from their default ranges with ``generator`` (the global
    generator when ``None``); a parameter given as a number is fixed, as ``[low, high]`` is
    drawn from that range. Returns ``(degraded, params)`` where ``params`` holds every
    concrete value and the ``seed``: ``apply(name, images, **params)`` reproduces the batch.
    """
    return get(name)(images, generator, **params)


@dataclass(frozen=True)
class Compose:
    """Degradations applied in sequence (e.g. rain then haze), for mixed degradations.

    Each step draws its own parameters and seed. The reported parameters are
    ``{"steps": [{"name": ..., **params}, ...]}``; ``compose(reported["steps"])`` rebuilds a
    pipeline that reproduces the sample exactly.
    """

    steps: tuple[tuple[str, Mapping[str, Any]], ...]

    @property
    def names(self) -> list[str]:
        """The degradation names of the steps, in order."""
        return [name for name, _ in self.steps]

    def __call__(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Any]]:
        """Apply every step to ``images``; return the result and ``{"steps": [...]}``."""
        reported = []
        for name, params in self.steps:
            images, drawn = get(name)(images, generator, **params)
            reported.append({"name": name, **drawn})
        return images, {"steps": reported}


StepSpec = str | tuple[str, Mapping[str, Any]] | Mapping[str, Any]


def compose(steps: Sequence[StepSpec]) -> Compose:
    """Build a :class:`Compose` from steps, each a name, a ``(name, params)`` pair or a
    ``{"name": ..., **params}`` dict (the form ``Compose`` reports). Names and parameters are
    checked now, so a bad pipeline fails when built rather than mid-training."""
    if isinstance(steps, str) or not isinstance(steps, Sequence) or not steps:
        raise ConfigError(
            f"compose() takes a non-empty list of steps, got {steps!r}; e.g. "
            "compose(['rain', ('haze', {'beta': 1.0})])."
        )
    parsed = []
    for step in steps:
        if isinstance(step, str):
            name, params = step, {}
        elif isinstance(step, tuple) and len(step) == 2 and isinstance(step[1], Mapping):
            name, params = step[0], dict(step[1])
        elif isinstance(step, Mapping) and "name" in step:
            params = dict(step)
            name = params.pop("name")
        else:
            raise ConfigError(
                f"compose(): cannot read step {step!r}; write a name, a (name, params) pair "
                "with params a dict (use {} for none) or a {'name': ..., **params} dict."
            )
        parsed.append((name, get(name).check_params(params)))
    return Compose(tuple(parsed))


def check_images(images: Any) -> None:
    """Raise :class:`DataError` unless ``images`` is a float ``(B, 3, H, W)`` batch in [0, 1].

    NaN is refused explicitly: it passes every comparison with 0 and 1 and would come out
    of a degradation as NaN, breaking the promise that outputs lie in [0, 1].
    """
    if not isinstance(images, Tensor):
        raise DataError(
            f"Expected images as a torch.Tensor of shape (B, 3, H, W), got {type(images).__name__}."
        )
    if images.ndim != 4 or images.shape[1] != 3:
        raise DataError(
            f"Expected images of shape (B, 3, H, W), got {tuple(images.shape)}. Add a batch "
            "dimension with images[None]; convert grayscale with images.expand(-1, 3, -1, -1)."
        )
    if not images.is_floating_point():
        raise DataError(
            f"Expected floating-point images in [0, 1], got dtype {images.dtype}. "
            "Convert 8-bit images with images.float() / 255."
        )
    if not torch.isfinite(images).all():
        count = int((~torch.isfinite(images)).sum())
        raise DataError(
            f"Expected finite images in [0, 1], got {count} NaN or infinite value(s). Find "
            "where they come from (a division by zero, a failed load), or replace them with "
            "torch.nan_to_num(images, 0.0, 1.0, 0.0)."
        )
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise DataError(
            f"Expected images in [0, 1], got values in [{images.min().item():.3g}, "
            f"{images.max().item():.3g}]. Scale 0-255 images by 1/255 and clamp to [0, 1]."
        )


def quantize(images: Tensor) -> Tensor:
    """Clip to [0, 1] and round to 8-bit levels, as saving a PNG would."""
    return torch.round(images.clamp(0, 1) * 255) / 255


def _as_numbers(degradation: str, name: str, value: Any) -> list[Number]:
    values = [value] if isinstance(value, int | float) else value
    if isinstance(value, bool) or not isinstance(values, Sequence) or isinstance(values, str):
        raise ConfigError(
            f"{degradation}: {name}={value!r} must be a number or a [low, high] list of numbers."
        )
    if not values or not all(_is_number(v) for v in values):
        raise ConfigError(
            f"{degradation}: {name}={value!r} must be a number or a non-empty list of numbers."
        )
    return list(values)


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars (``np.float32(5)``, ``np.int64(9)``) made ``int`` or
    ``float``, in lists and tuples too; anything else is returned for validation to judge."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool | int):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, int | float):
        return float(value)
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_seed(degradation: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _SEED_HIGH:
        raise ConfigError(
            f"{degradation}: seed={value!r} must be an integer in [0, {_SEED_HIGH}]; pass the "
            "seed reported by a previous call, or leave it out to draw one."
        )


def _device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """An integer uniform in ``[low, high]`` (inclusive) drawn with ``generator``."""
    draw = torch.randint(low, high + 1, (), generator=generator, device=_device(generator))
    return int(draw.item())
