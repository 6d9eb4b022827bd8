"""Typed errors of loraxir.

Errors are part of the public API: each names the offending value, what was expected and
how to fix it. Every class derives from :class:`LoraIRError` *and* from the built-in type a
caller would naturally catch (``ValueError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LoraIRError(Exception):
    """Base class of every error raised on purpose by loraxir."""


class ConfigError(LoraIRError, ValueError):
    """An invalid configuration value (a field of ``LoraIRConfig``, a recipe YAML, ...)."""


class TargetModulesError(LoraIRError, ValueError):
    """Target patterns that match no module, or match modules of an unsupported type."""


class RoutingError(LoraIRError, ValueError):
    """Gates of the wrong shape or value, or a forward that has no way to route."""


class CheckpointError(LoraIRError, ValueError):
    """A checkpoint that cannot be loaded: wrong format, corrupted, or other shapes."""


class BackboneMismatchError(CheckpointError):
    """A readable adapter whose tensors do not fit the backbone it is loaded on (another
    family, width or variant)."""


class UnknownNameError(LoraIRError, ValueError):
    """A name (degradation, suite, preset, backbone, encoder) that is not registered."""


class DataError(LoraIRError, ValueError):
    """Input data that cannot be used: empty folders, mismatched pairs, bad images."""


class TrainingError(LoraIRError, RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step and the last
    good checkpoint."""


def unknown_name(
    kind: str, name: object, known: Iterable[str], hint: str = "", where: str = ""
) -> UnknownNameError:
    """Build an :class:`UnknownNameError` that lists the known names, closest first.
    ``kind`` is a noun (``"parameter"``), ``where`` what it belongs to (``"of 'noise'"``)."""
    known = sorted(set(known))
    where = f" {where}" if where else ""
    listed = f"Known {kind}s{where}: {', '.join(known) if known else '(none)'}."
    if not isinstance(name, str):
        return UnknownNameError(
            f"A {kind} name{where} must be a string, got {type(name).__name__}. {listed}"
            f"{' ' + hint if hint else ''}"
        )
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    message = f"Unknown {kind} {name!r}{where}."
    if close:
        message += f" Did you mean {', '.join(repr(c) for c in close)}?"
    message += f" {listed}"
    if hint:
        message += f" {hint}"
    return UnknownNameError(message)
