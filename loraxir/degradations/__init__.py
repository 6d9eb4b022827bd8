"""Seeded synthetic degradations on float ``(B, 3, H, W)`` batches in [0, 1], and task suites.

>>> from loraxir import degradations
>>> degraded, params = degradations.apply("noise", images, generator, sigma=25)
>>> again, _ = degradations.apply("noise", images, **params)   # identical to `degraded`
>>> suite = degradations.suite("three_task")
>>> lq, params = suite.degrade(images, "rain", generator)

See ``docs/degradations.md`` for every degradation, its parameters and the suites.
"""

# Importing the modules that define degradations registers them.
from loraxir.degradations import blur, camera, noise, weather  # noqa: F401
from loraxir.degradations.registry import (
    Compose,
    Degradation,
    Param,
    apply,
    available,
    check_images,
    compose,
    get,
    quantize,
    register,
)
from loraxir.degradations.suites import Schedule, Suite, Task, available_suites, load_suite, suite
from loraxir.degradations.weather import estimate_depth

__all__ = [
    "Compose",
    "Degradation",
    "Param",
    "Schedule",
    "Suite",
    "Task",
    "apply",
    "available",
    "available_suites",
    "check_images",
    "compose",
    "estimate_depth",
    "get",
    "load_suite",
    "quantize",
    "register",
    "suite",
]
