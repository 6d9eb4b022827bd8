"""The tiled-inference benchmark runs end to end at toy sizes and writes its JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture
def benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("tiled_inference", None)
    import tiled_inference

    return tiled_inference


def test_one_size_and_folder_measures_in_process(benchmark, tmp_path):
    adapter = benchmark._random_adapter(tmp_path / "random", seed=0)
    # The system allocator: keeping freed memory is process-wide, and this is pytest's.
    row = benchmark._measure_size((adapter, 0.02, 64, 16, 0, True))
    assert row["side"] == 141 and row["tiles"] == 9 and row["seconds"] > 0
    folder = benchmark._folder_throughput(adapter, images=2, size=48, degradation="blur")
    assert folder["merged_degradation"] == "blur" and folder["routed_images_per_s"] > 0


@pytest.mark.slow
def test_tiled_inference_benchmark_quick_run(benchmark, tmp_path):
    output = tmp_path / "tiled.json"
    benchmark.main(
        ["--quick", "--random", "--tile", "128", "--system-allocator", "--output", str(output)]
    )
    result = json.loads(output.read_text())
    assert [round(row["megapixels"], 2) for row in result["sizes"]] == [0.05, 0.2]
    assert result["sizes"][1]["tiles"] > result["sizes"][0]["tiles"]
    assert result["folder"]["routed_images_per_s"] > 0 < result["folder"]["merged_images_per_s"]
    assert result["allocator"] == "system"
