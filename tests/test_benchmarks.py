"""The overhead benchmark runs end to end at a toy size and writes its JSON table."""

from __future__ import annotations

import json
import math
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
    measures = [row["measure"] for row in rows]
    lora = next(m for m in measures if m.startswith("peft LoRA r="))
    assert {"merged inference", "trainable params: loraxir / peft LoRA"} <= set(measures)
    assert any(m.startswith("routed top-1 inference") for m in measures)
    assert any(m.startswith("experts-only train step top-1") for m in measures)
    assert "frozen base, no experts (floor) / full base step" in measures
    assert len(set(measures)) == len(measures)  # one row per measure for one setting
    for row in rows:
        assert (row["backbone"], row["batch"], row["size"]) == ("nafnet-tiny", 2, 32)
        assert row["unit"] == ("s" if row["measure"].endswith("(s)") else "x"), row
        assert math.isfinite(row["value"]) and row["value"] > 0, row
    # The LoRA baseline's rank is matched to our trainable count: the ratio can only be off
    # by the rounding of that rank, |T / (round(T / P) P) - 1| <= 0.5 / round(T / P).
    rank = int(lora.split("r=")[1].split()[0])
    ratio = rows[measures.index("trainable params: loraxir / peft LoRA")]["value"]
    assert abs(ratio - 1) <= 0.5 / rank
    printed = capsys.readouterr().out
    assert all(measure in printed for measure in measures)


def test_training_floor_trains_one_parameter_and_leaves_the_backbone_alone(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("overhead", None)
    import overhead

    import loraxir

    base = loraxir.create_backbone("nafnet-tiny")
    floor = overhead._frozen_floor(base)
    assert [p.requires_grad for p in floor.parameters()].count(True) == 1
    assert all(p.requires_grad for p in base.parameters())
