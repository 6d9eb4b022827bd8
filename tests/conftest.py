"""Shared helpers for the test suite: seeded tiny models and a relative-error measure."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from loraxir.inference import allocator
from loraxir.router.encoders import register_open_clip_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative error ||a - e|| / ||e|| (0 when both are zero)."""
    expected = expected.double()
    scale = expected.norm().item()
    return (actual.double() - expected).norm().item() / (scale if scale > 0 else 1.0)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _allocator_defaults(monkeypatch) -> None:
    """``loraxir restore`` run in-process has glibc keep freed memory (process-wide, for
    good); each test still sees the library's defaults that follow from it as they were."""
    monkeypatch.setattr(allocator, "_keeping", allocator.keeps_freed_cpu_memory())


@pytest.fixture
def isolated_recipe_run() -> Iterator[None]:
    """Run in-process recipes on one thread, and forget Accelerate's process-wide state after.

    One thread: the many tiny ops of the degradations slow down tenfold when OpenMP threads
    compete with other processes for the cores. The reset keeps a recipe's Accelerator
    settings from leaking into other tests.
    """
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def randomize_experts(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Give every expert non-zero A and B, so that routing changes the output."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".loraxir_experts." in name:
                param.normal_(0.0, scale)


# A ~1 M-parameter open_clip architecture (image 32 px, patch 8) that builds in milliseconds,
# for encoder and router tests.
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 1},
}
TINY_NAME = "loraxir-test-tiny-clip"


def tiny_open_clip_name() -> str:
    """Register the tiny architecture with open_clip and return its model name."""
    return register_open_clip_config(TINY_NAME, TINY_OPEN_CLIP)


def save_open_clip_weights(path: Path, seed: int, cfg: dict | None = None) -> dict:
    """Write a full open_clip state dict (random, seeded) and return it."""
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**(cfg or TINY_OPEN_CLIP))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, path)
    return state
