"""Which torch device a name means on this machine.

``torch.device("gpu")`` and ``model.to("cuda")`` without a driver fail deep inside torch
with a message about drivers or parsing; the command line and the Python loaders check
the name first and answer with the devices this machine has.
"""

from __future__ import annotations

from typing import Any

from loraxir.errors import ConfigError


def resolve_device(name: Any, option: str = "device=") -> str:
    """The device ``name`` means here: ``auto`` (the first of cuda, mps, cpu present),
    ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or a ``torch.device`` of those.

    Raises :class:`~loraxir.errors.ConfigError` for a name torch has no device for, or a
    device this machine does not have (listing those it has). ``option`` is how the
    caller spells the setting in the message (``--device `` on the command line)."""
    import torch

    spelled = f"{option}{str(name)!r}"
    if not isinstance(name, str | torch.device):
        raise ConfigError(f"{spelled} is not a device; use auto, cpu, cuda, cuda:N or mps.")
    name = str(name)
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    kind, colon, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (colon and not (kind == "cuda" and index.isdigit())):
        raise ConfigError(f"{spelled} is not a device; use auto, cpu, cuda, cuda:N or mps.")
    available = ["cpu", *(["cuda"] if cuda else []), *(f"cuda:{i}" for i in range(cuda))]
    available += ["mps"] if mps else []
    if name not in available:
        raise ConfigError(
            f"{spelled} is not available on this machine (available: {', '.join(available)}). "
            f"Pass one of those, or {option}'auto'."
        )
    return name
