"""The overhead and training-throughput benchmarks run end to end at a toy size and write
their JSON tables."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

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
    for kind in ("inference", "training"):  # timed in pairs against the best fixed form
        row = next(r for r in rows if r["measure"] == f"autotuned / best fixed form ({kind} top-1)")
        assert row["low"] <= row["value"] <= row["high"], row
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
    assert json.loads(output.read_text())["complete"] is True


def test_overhead_benchmark_stopped_early_writes_the_finished_settings(tmp_path, monkeypatch):
    """gpu_overhead.sh stops each run with `timeout` (SIGTERM): what was measured stays."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("overhead", None)
    import overhead

    def stop_in_training(bench, setting, seed):
        bench.rows.append({"measure": "half-measured"})
        raise KeyboardInterrupt

    monkeypatch.setattr(overhead, "bench_training", stop_in_training)
    output = tmp_path / "overhead.json"
    argv = ["--backbones", "nafnet-tiny", "--size", "32", "--batches", "2", "--repeats", "1"]
    with pytest.raises(KeyboardInterrupt):
        overhead.main([*argv, "--output", str(output)])
    record = json.loads(output.read_text())
    measures = [row["measure"] for row in record["rows"]]
    assert record["complete"] is False
    assert any(m.startswith("routed top-1 inference") for m in measures), "inference is kept"
    assert "half-measured" not in measures, "the unfinished setting's rows are dropped"
    # An error in a later setting (out of memory on a GPU) kept nothing; a run that
    # finished nothing replaced an earlier file with an empty one.
    output.unlink()

    def fail_in_training(bench, setting, seed):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(overhead, "bench_training", fail_in_training)
    with pytest.raises(RuntimeError):
        overhead.main([*argv, "--output", str(output)])
    assert json.loads(output.read_text())["complete"] is False
    before = output.read_text()
    with pytest.raises(RuntimeError):
        overhead.main([*argv, "--sections", "training", "--output", str(output)])
    assert output.read_text() == before


def test_overhead_training_gates_and_memory_count(monkeypatch):
    """The single-expert row gave 6 of 8 images no expert; the saved-tensor byte count
    moved between identical calls (addresses reused)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("overhead", None)
    import overhead
    import torch

    import loraxir

    generator = torch.Generator().manual_seed(0)
    assert torch.equal(overhead._training_gates(8, 1, 1, generator), torch.ones(8, 1))
    gates = overhead._training_gates(8, 2, overhead.EXPERTS, generator)
    assert gates.shape == (8, overhead.EXPERTS) and (gates > 0).sum(1).eq(2).all()
    bench = overhead.Bench("cpu", None, 1, 1)
    model = loraxir.create_backbone("nafnet-tiny").train()
    x = torch.rand(2, 3, 16, 16)
    counts = {overhead._training_bytes(bench, model, None, lambda: model(x)) for _ in range(4)}
    assert len(counts) == 1


def test_training_floor_trains_one_parameter_and_leaves_the_backbone_alone(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("overhead", None)
    import overhead

    import loraxir

    base = loraxir.create_backbone("nafnet-tiny")
    floor = overhead._frozen_floor(base)
    assert [p.requires_grad for p in floor.parameters()].count(True) == 1
    assert all(p.requires_grad for p in base.parameters())


def test_training_throughput_benchmark_runs_and_writes_every_measure(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("training_throughput", None)
    import torch
    import training_throughput

    threads = torch.get_num_threads()
    output = tmp_path / "throughput.json"
    try:
        report = training_throughput.main(["--quick", "--output", str(output)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(output.read_text()) == report
    rows = report["rows"]
    assert [row["measure"] for row in rows] == [
        "pre-training: full network + DAM (frozen router)",
        "pre-training: full network, no DAM",
        "fine-tuning: experts only (batched, top-1)",
        "fine-tuning: experts only (auto, top-1)",
        "fine-tuning under Accelerate",
        "fine-tuning under Accelerate",
    ]
    assert [row["processes"] for row in rows[-2:]] == [1, 2]  # two processes really ran
    assert rows[-2]["threads"] == 2 * rows[-1]["threads"], "the same cores in total"
    assert all(math.isfinite(row["patches_per_s"]) and row["patches_per_s"] > 0 for row in rows)
    # both fine-tuning rows train the same experts, whatever form computes them
    assert rows[2]["trainable_parameters"] == rows[3]["trainable_parameters"] > 0


def test_counts_and_sizes_below_one_are_refused_before_anything_runs(monkeypatch, capsys):
    """--repeats 0 or --max-side 0 once failed inside torch, the latter after the whole
    quickstart pipeline had run."""
    import pytest

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("overhead", None)
    import overhead

    for argv in (
        ["--repeats", "0"],
        ["--batches", "4", "-2"],
        ["--sizes", "x"],
        ["--backbones", "nafnet-tiny", "nosuch"],  # found after the first backbone's rows
    ):
        with pytest.raises(SystemExit) as exit_info:
            overhead.main(argv)
        assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "must be >= 1, got 0" in error and "unknown backbone(s) ['nosuch']" in error


def test_outputs_and_choices_are_checked_before_anything_runs(tmp_path, monkeypatch, capsys):
    """An --output under a file failed when the results were written, at the end; a bad
    --sections, a --device the machine lacks and an overlap too wide for the tile failed
    inside the run, with a traceback."""
    import pytest

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for name in ("overhead", "tiled_inference", "degradation_throughput"):
        sys.modules.pop(name, None)
    import degradation_throughput
    import overhead
    import tiled_inference

    from loraxir.errors import ConfigError

    (tmp_path / "afile").write_text("mine")
    under_a_file = ["--output", str(tmp_path / "afile" / "x.json")]
    (tmp_path / "locked").mkdir(mode=0o555)
    unwritable = ["--output", str(tmp_path / "locked" / "x.json")]
    as_root = os.geteuid() == 0  # root writes into a read-only folder
    for main, argv in (
        (overhead.main, ["--output", str(tmp_path / ("n" * 300) / "x.json")]),
        *([] if as_root else [(overhead.main, unwritable)]),
        (degradation_throughput.main, under_a_file),
        (overhead.main, under_a_file),
        (overhead.main, ["--sections", "bogus"]),
        (tiled_inference.main, ["--random", "--sizes", "-1"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "is a file, not a folder" in error and "invalid choice: 'bogus'" in error
    assert "File name too long" in error
    assert as_root or "Permission denied" in error
    with pytest.raises(ConfigError, match="at least 3 x overlap=64"):
        tiled_inference.main(["--random", "--tile", "16", "--overlap", "64"])
    assert (tmp_path / "afile").read_text() == "mine"


def test_router_benchmark_without_timing_writes_no_times(tmp_path, monkeypatch):
    """--flops-only wrote 0 ms for what it never timed."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("router", None)
    import router

    output = tmp_path / "router.json"
    router.main(["--backbone", "nafnet-tiny", "--encoders", "cnn-tiny", "--sizes", "32",
                 "--flops-only", "--output", str(output)])  # fmt: skip
    report = json.loads(output.read_text())
    assert report["settings"]["repeats"] == 0 and report["rows"]
    for row in report["rows"]:
        assert row["router_ms"] is row["backbone_ms"] is row["time_ratio"] is None
        assert row["flop_ratio"] > 0


def test_degradation_throughput_loads_full_batches_even_larger_than_the_training_set(
    tmp_path, monkeypatch
):
    """A short last batch (or none) made loading look cheaper than it is."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("degradation_throughput", None)
    import degradation_throughput

    seen = []
    real = degradation_throughput.loading_versus_training

    def recording(data, batch, batches, seed):
        seen.append((len(data), batch))
        return real(data, batch, batches, seed)

    monkeypatch.setattr(degradation_throughput, "loading_versus_training", recording)
    output = tmp_path / "dt.json"
    degradation_throughput.main(["--batch", "60", "--size", "16", "--patch", "16",
                                 "--repeats", "2", "--output", str(output)])  # fmt: skip
    ((patches, batch),) = seen
    assert patches >= batch == 60
    report = json.loads(output.read_text())
    assert report["settings"]["seed"] == 0 and report["loading_vs_training_step"]
