"""The overhead benchmark runs end to end at a toy size and writes its JSON table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def test_overhead_benchmark_runs_and_writes_every_measure(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("overhead", None)
    import overhead

    output = tmp_path / "overhead.json"
    overhead.main(
        [
            "--backbones",
            "nafnet-tiny",
            "--size",
            "32",
            "--batches",
            "2",
            "--repeats",
            "1",
            "--output",
            str(output),
        ]
    )
    rows = json.loads(output.read_text())["rows"]
    measures = {row["measure"] for row in rows}
    assert {
        "merged inference",
        "routed top-1 inference (autotuned)",
        "experts-only train step top-1 / full base step (autotuned)",
    } <= measures
    assert all(row["value"] > 0 for row in rows)
    assert "merged inference" in capsys.readouterr().out
