"""Shared helpers for the test suite: seeded tiny models and a relative-error measure."""

from __future__ import annotations

import os

import pytest
import torch

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


def randomize_experts(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Give every expert non-zero A and B, so that routing changes the output."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".loraxir_experts." in name:
                param.normal_(0.0, scale)
