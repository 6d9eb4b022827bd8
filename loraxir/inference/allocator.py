"""Keeping freed CPU memory for reuse, so that inference stops paying for page faults.

A restoration network at full resolution allocates and frees activations of megabytes
to tens of megabytes in every layer. glibc's ``malloc`` serves such blocks with ``mmap``
and returns them to the system on ``free`` (it also trims the top of its heap), so the
next layer, and the next image, gets fresh pages that the kernel faults in and zero-fills
one at a time. On the 2-core CI machine (a VM, where a fault is expensive) that was half
of the time of the bare NAFNet-w32 on one 512² image. Keeping the freed memory in the heap
for reuse removes those faults: measured there with a throwaway script (no gradient,
median of 8 calls, one run each), 128² 157 → 88 ms, four 128² images 509 → 301 ms, 512²
2.68 → 1.35 s; ``benchmarks/tiled_inference.py`` against its ``--system-allocator`` run
gives the shipped adapter's numbers (docs/cli.md).

PyTorch's CPU performance guide reaches the same end by preloading a caching allocator
(jemalloc, tcmalloc); :func:`keep_freed_cpu_memory` asks the allocator the process
already has. It is a process-wide choice with a cost: the process keeps its peak heap
instead of giving memory back. So ``loraxir restore`` (a process of its own) makes it on
the CPU, and the library never does behind its user's back; call it in your own script
to get the same speed.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free memory at the top of the heap kept before trimming: more than any process here holds.
_NEVER_TRIM = 2**31 - 1
_keeping = False


def keep_freed_cpu_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse: large blocks come from the heap
    instead of ``mmap`` and the heap is not trimmed (see the module docstring).

    Returns ``True`` when the setting took effect, ``False`` where it does not apply (a C
    library other than glibc: macOS, Windows, musl), leaving the process as it was. Calling
    it again changes nothing. Once it has, :class:`~loraxir.LoraIRModel` runs CPU batches
    in one backbone call by default (``inference_chunk_pixels``): the chunks it otherwise
    runs only saved page faults.
    """
    global _keeping
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    # Trimming off first: with mmap off and trimming still on, freed memory would go back
    # to the system through the heap's top instead, and fault in again just the same.
    _keeping = bool(libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)) and bool(
        libc.mallopt(_M_MMAP_MAX, 0)
    )
    return _keeping


def keeps_freed_cpu_memory() -> bool:
    """Whether :func:`keep_freed_cpu_memory` has taken effect in this process."""
    return _keeping
