"""``keep_freed_cpu_memory``: freed blocks are reused instead of faulted in again.

Each measure runs in a fresh interpreter, so that the setting (process-wide, one way)
does not leak into the test process.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from loraxir.inference import allocator

_FAULTS_PER_CALL = """
import resource, sys
import torch
if sys.argv[1] == "keep":
    from loraxir.inference.allocator import keep_freed_cpu_memory
    assert keep_freed_cpu_memory()
    assert keep_freed_cpu_memory()  # a second call changes nothing
torch.manual_seed(0)
net = torch.nn.Sequential(*[torch.nn.Conv2d(8, 8, 3, padding=1) for _ in range(4)])
# 37 MiB per activation, above the largest block glibc's malloc ever serves from its heap by
# default (32 MiB): 4 layers, 9500 pages each per call.
x = torch.rand(1, 8, 1100, 1100)
with torch.no_grad():
    for _ in range(3):
        net(x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        net(x)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


def _faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _FAULTS_PER_CALL, mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    # The system allocator maps each activation anew and faults its pages in at every
    # call; kept, a call reuses the pages that the calls before it freed.
    system = _faults("system")
    assert system > 20_000
    assert _faults("keep") < system / 10


def test_other_systems_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    assert allocator.keep_freed_cpu_memory() is False
