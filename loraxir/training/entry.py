"""How a recipe or benchmark script ends when it is run from a shell.

A user who mistypes a path or a config key should read one line naming the problem and the
fix, not a stack trace: every loraxir error already says both (:mod:`loraxir.errors`). A
stopped run should say how to continue. Tests call the scripts' ``main`` directly and see
the exceptions themselves.
"""

from __future__ import annotations

import errno
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

RESUME_HINT = (
    "Add --resume latest to the same command to continue from the last checkpoint (a run "
    "with checkpoint_every: 0 saves one only at the end, and starts again)."
)


# Errors of the machine, not of the code: the disk or quota is full, or a folder is
# read-only. One line and the way to continue, like a Ctrl-C.
_MACHINE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


# safetensors and torch.save report a full disk as their own exception types, in words.
_MACHINE_MESSAGES = (
    "No space left on device",
    "Disk quota exceeded",
    "os error 28",
    "os error 122",
    "file write failed",  # torch.save's zip writer
)

_interrupted = 0  # the signal that interrupted the run (SIGINT, SIGTERM), 0 for none


def _machine_error(error: Exception) -> bool:
    """Is ``error`` the machine's (a full disk or quota, a read-only folder), not a bug?"""
    if isinstance(error, OSError):
        return error.errno in _MACHINE_ERRORS
    return any(message in str(error) for message in _MACHINE_MESSAGES)


def _out_of_memory(error: Exception) -> bool:
    """Did an allocation fail (a GPU's memory, or the CPU allocator's)? The settings are
    too large for the machine, which the traceback would not say."""
    import torch

    return isinstance(error, MemoryError | torch.OutOfMemoryError) or any(
        message in str(error) for message in ("can't allocate memory", "Unable to allocate")
    )


def _on_interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM (what ``timeout`` and job schedulers send): remember which (see
    :func:`raise_if_interrupted`), then interrupt as Ctrl-C does."""
    global _interrupted
    _interrupted = signum
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed since :func:`run_script` started.

    CPython drops an exception raised inside a weakref callback or ``__del__``, and torch
    runs some in the middle of its work, so a Ctrl-C that lands there is lost and the run
    went on to the end; long loops call this to stop at their next step instead."""
    if _interrupted:
        raise KeyboardInterrupt


def script_description(doc: str) -> str:
    """A script's ``--help`` description: the first paragraph of its module docstring, on
    one line and without reST markup (its first line alone stops mid-sentence)."""
    return " ".join(doc.split("\n\n")[0].split()).replace("``", "")


def run_script(main: Callable[[], Any], resume_hint: str = RESUME_HINT) -> NoReturn:
    """Call ``main()`` and exit: 0 on success, 2 with ``<script>: error: <message>`` on a
    loraxir error, 130 on Ctrl-C (143 on SIGTERM) with ``resume_hint``, 1 with one line
    and ``resume_hint`` when the disk is full, a file cannot be written or memory runs out
    (with what to lower). Other exceptions are bugs and keep their traceback."""

    global _interrupted
    _interrupted = 0
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        # Restored when the script ends: a process that goes on (the tests, a benchmark
        # calling recipes) keeps its own handling of Ctrl-C and SIGTERM.
        handlers = {
            sig: signal.signal(sig, _on_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)
        }
    try:
        _run_and_exit(main, resume_hint)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _run_and_exit(main: Callable[[], Any], resume_hint: str) -> NoReturn:
    """:func:`run_script`'s body: ``main()``, then the exit its outcome calls for."""
    from loraxir.errors import LoraIRError

    script = Path(sys.argv[0]).name
    try:
        main()
    except LoraIRError as error:
        print(f"{script}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\nInterrupted. {resume_hint}", file=sys.stderr)
        sys.exit(128 + (_interrupted or signal.SIGINT))  # 130 for Ctrl-C, 143 for SIGTERM
    except Exception as error:
        if _out_of_memory(error):
            reason = (str(error) or type(error).__name__).splitlines()[0]
            print(f"{script}: error: out of memory ({reason}). Lower "
                  "batch_size or patch_size (gradient_accumulation_steps keeps the batch), "
                  f"then: {resume_hint}", file=sys.stderr)  # fmt: skip
            sys.exit(1)
        if not _machine_error(error):
            raise
        print(f"{script}: error: {error}. Free space or fix the permissions, then: "
              f"{resume_hint}", file=sys.stderr)  # fmt: skip
        sys.exit(1)
    sys.exit(0)
