"""The all-in-one benchmark (benchmarks/all_in_one.py) and the quickstart built on it.

One ``--scale tiny`` run (random nafnet-tiny, 2 steps per recipe, 32² crops, one seed) is
shared by the module: it must write every artefact it promises, its Markdown table must
show the JSON's numbers, and rerunning it must resume rather than retrain. The rest pins
the bad-input behaviours: another run's folder, a foreign folder, a failed write.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from loraxir.errors import ConfigError, UnknownNameError
from loraxir.pretrained import describe_adapter

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import _all_in_one_stages as stages  # noqa: E402
import all_in_one  # noqa: E402
from _all_in_one_config import METHODS, BenchConfig, load_bench_config  # noqa: E402
from _all_in_one_methods import Paths, method_stage, shared_stage  # noqa: E402

ADAPTER_METHODS = ("lora", "lora_ir_top1", "lora_ir_top2", "oracle")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench") / "tiny"
    try:
        results = all_in_one.main(["--scale", "tiny", "--output-dir", str(root)])
    finally:
        torch.set_num_threads(threads)
    return root, results


def test_tiny_run_writes_every_artefact(tiny: tuple[Path, dict[str, Any]]) -> None:
    root, results = tiny
    summary = results["suites"]["three_task"]
    assert json.loads((root / "results.json").read_text()) == results
    assert list(summary["methods"]) == ["input", "pretrain", *METHODS]
    tasks = ["noise_15", "noise_25", "noise_50", "rain", "haze"]
    shift = ["noise+jpeg", "haze+rain", "low_light+noise", "unseen_blur"]
    assert (summary["tasks"], summary["shift_tasks"]) == (tasks, shift)
    for name, entry in summary["methods"].items():
        assert set(entry["per_task"]) == set(tasks) and set(entry["shift"]) == set(shift)
        for metric in ("psnr", "ssim", "psnr_y", "ssim_y"):
            assert entry["average"][metric]["values"][0] == pytest.approx(
                sum(entry["per_task"][t][metric]["mean"] for t in tasks) / len(tasks)
            ), (name, metric)
    for kind in ("psnr_per_task", "router_confusion", "expert_usage", "restored_examples"):
        assert Path(summary["figures"][kind]).stat().st_size > 1000, kind
    assert (root / "figures" / "headline.png").stat().st_size > 1000
    for task in tasks + shift:
        for column in ["input", "reference", "pretrain", *METHODS]:
            assert (root / "restored" / "three_task" / task / f"{column}.png").is_file()
    seed_dir = root / "three_task" / "seed-0"
    for method in ADAPTER_METHODS:
        assert (seed_dir / method / "adapter" / "adapter_model.safetensors").is_file()
        # The LoRA-IR adapters (the ones users restore with) carry class embeddings.
        fitted = describe_adapter(seed_dir / method / "adapter").class_embeddings
        assert fitted == method.startswith("lora_ir"), method
    assert (seed_dir / "peft_lora" / "adapter" / "lora.safetensors").is_file()
    assert not list(root.rglob("checkpoints")), "finished stages drop their checkpoints"
    assert set(summary["expert_usage"]) == {"lora_ir_top1", "lora_ir_top2"}
    assert len(summary["router"]["confusion"]) == len(summary["router"]["classes"]) == 3


def test_paired_differences_and_the_confusion_matrix_read_the_right_way(
    tiny: tuple[Path, dict[str, Any]],
) -> None:
    summary = tiny[1]["suites"]["three_task"]
    by_label = {entry["label"]: entry for entry in summary["methods"].values()}
    assert summary["differences"]
    for label, value in summary["differences"].items():
        first, second = (by_label[name]["average"]["psnr"]["values"] for name in label.split(" − "))
        assert value["values"] == pytest.approx([a - b for a, b in zip(first, second, strict=True)])
    # Rows are the true classes: three_task has three noise tasks to one rain and one haze.
    router = summary["router"]
    rows = dict(zip(router["classes"], map(sum, router["confusion"]), strict=True))
    assert rows["noise"] == 3 * rows["rain"] == 3 * rows["haze"] > 0, router


def test_methods_share_one_budget(tiny: tuple[Path, dict[str, Any]]) -> None:
    root, results = tiny
    methods = results["suites"]["three_task"]["methods"]
    counts = {m: methods[m]["trainable_parameters"] for m in ADAPTER_METHODS}
    assert len(set(counts.values())) == 1, f"E experts of rank r vs one of rank E·r: {counts}"
    assert methods["peft_lora"]["trainable_parameters"] < counts["lora"], "dense convs only"
    config = load_bench_config("tiny")
    paths = Paths(root, "three_task", 0, False)
    stages_ = [shared_stage(config, paths)] + [
        method_stage(config, paths, m, 3) for m in config.methods
    ]
    for stage in stages_:
        for key in ("patch_size", "batch_size", "loss", "train_repeats", "seed"):
            assert stage.settings[key] == stages_[0].settings[key], (stage.name, key)
        expected = {"pretrain": 2, "no_dam": 4}.get(stage.name, 2)
        assert stage.settings["max_steps"] == expected, stage.name
        assert stage.settings["source"].endswith("photos/trainval")
    photos = results["photos"]
    assert len(photos["test"]) == 4 and not set(photos["test"]) & set(photos["trainval"])


def _table_rows(text: str) -> dict[str, list[str]]:
    """The first table of a Markdown text as {first cell: other cells}."""
    rows = {}
    for line in text.split("\n\n")[3].splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def test_the_markdown_table_shows_the_json_numbers(tiny: tuple[Path, dict[str, Any]]) -> None:
    root, results = tiny
    summary = results["suites"]["three_task"]
    rows = _table_rows((root / "results.md").read_text())
    assert list(rows) == [entry["label"] for entry in summary["methods"].values()]
    for entry in summary["methods"].values():
        cells = rows[entry["label"]]
        expected = [entry["per_task"][t]["psnr"] for t in summary["tasks"]]
        expected += [entry["average"][m] for m in ("psnr", "ssim", "psnr_y", "ssim_y")]
        for text, value in zip(cells, expected, strict=False):
            mean, std = (float(x) for x in re.split(r" ± ", text))
            digits = len(text.split(" ± ")[0].split(".")[1])
            assert mean == round(value["mean"], digits), (entry["label"], text, value)
            assert std == round(value["std"], digits)
        if "trainable_parameters" in entry:
            assert cells[len(expected)] == f"{entry['trainable_parameters']:,}"


def test_publish_replaces_only_the_results_section(
    tiny: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    root, results = tiny
    docs = tmp_path / "docs" / "benchmarks.md"
    docs.parent.mkdir()
    docs.write_text(f"intro\n{all_in_one.BEGIN}\nold table\n{all_in_one.END}\noutro\n")
    all_in_one.publish(results, root, repository=tmp_path)
    text = docs.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{all_in_one.END}\noutro\n")
    assert "old table" not in text and (root / "results.md").read_text() in text
    assert (tmp_path / "docs" / "images" / "all_in_one_headline.png").is_file()
    assert "images/all_in_one_three_task_psnr_per_task.png" in text
    docs.write_text("no markers")
    with pytest.raises(ConfigError, match="markers"):
        all_in_one.publish(results, root, repository=tmp_path)


def test_quickstart_resumes_then_restores_photos_with_the_saved_adapter(
    tiny: tuple[Path, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import quickstart

    root, results = tiny

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(stages, "run_recipe", refuse)
    monkeypatch.setattr(all_in_one, "run_recipe", refuse)
    kept = stages.replaced_run(root)  # what --overwrite kept, gone once the run completes
    kept.mkdir()
    argv = ["--scale", "tiny", "--output-dir", str(root), "--max-side", "48"]
    again = quickstart.main(argv)
    assert again["suites"] == results["suites"], "resumed: every stage's record reused"
    assert not kept.exists()
    assert again["command"] == "python benchmarks/quickstart.py " + " ".join(argv)
    out = capsys.readouterr().out
    assert "resuming" in out and "Where everything is" in out and "loraxir.load_adapter" in out
    restored = sorted((root / "restored_photos" / "rain").glob("*_restored.png"))
    assert len(restored) == 4, "one per test photo"
    assert max(Image.open(restored[0]).size) == 48
    quickstart.main(["--scale", "tiny", "--output-dir", str(root), "--max-side", "40"])
    assert max(Image.open(restored[0]).size) == 40, "another --max-side restores again"


def test_an_interrupted_recipe_resumes_from_its_last_checkpoint(
    tiny: tuple[Path, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import loraxir.training.checkpoints as checkpoints

    (tmp_path / "photos").symlink_to(tiny[0] / "photos")
    config = load_bench_config("tiny", overrides=["checkpoint_every=1"])
    stage = method_stage(config, Paths(tmp_path, "three_task", 0, False), "no_dam", 3)
    folder = Path(stage.settings["output_dir"])
    original = checkpoints.maybe_checkpoint

    def ctrl_c_after_step_two(accelerator: Any, settings: Any, state: Any) -> None:
        original(accelerator, settings, state)
        if state.step == 2:
            raise KeyboardInterrupt

    def train() -> dict[str, Any]:
        return all_in_one._train(stage.runner, stage.settings)

    monkeypatch.setattr(checkpoints, "maybe_checkpoint", ctrl_c_after_step_two)
    with pytest.raises(KeyboardInterrupt):
        stages.run_stage(folder, "no_dam", train, print)
    monkeypatch.undo()
    record = stages.run_stage(folder, "no_dam", train, print)
    assert (record["result"]["resumed_from_step"], record["result"]["steps"]) == (2, 4)


def test_another_runs_folder_is_refused_without_overwrite(tmp_path: Path) -> None:
    settings = {"seeds": [0], "methods": ["base"]}
    assert stages.prepare_run(tmp_path / "run", settings, overwrite=False) is False
    (tmp_path / "run" / "result.txt").write_text("earlier")
    assert stages.prepare_run(tmp_path / "run", settings, overwrite=False) is True
    with pytest.raises(ConfigError, match=r"other settings.*\['seeds'\].*--overwrite"):
        stages.prepare_run(tmp_path / "run", {**settings, "seeds": [1]}, overwrite=False)
    assert (tmp_path / "run" / "result.txt").read_text() == "earlier"
    stale = tmp_path / f".run.old-{os.getpid()}"  # what a Ctrl-C mid-delete leaves
    (stale / "x").mkdir(parents=True)
    stages.prepare_run(tmp_path / "run", {**settings, "seeds": [1]}, overwrite=True)
    assert not (tmp_path / "run" / "result.txt").exists()
    kept = tmp_path / ".run.replaced"  # until the new run completes: a Ctrl-C loses nothing
    assert (kept / "result.txt").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name, kept.name, "run"]
    # --overwrite again before that run completed: its unfinished folder goes, the kept stays
    stages.prepare_run(tmp_path / "run", {**settings, "seeds": [3]}, overwrite=True)
    assert (kept / "result.txt").read_text() == "earlier"
    stages.discard_replaced_run(tmp_path / "run")  # what a completed run does
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name, "run"]
    (kept / "x").mkdir(parents=True)  # a kept run a failed discard left beside a finished one
    (tmp_path / "run" / "results.json").write_text("{}")
    stages.prepare_run(tmp_path / "run", {**settings, "seeds": [4]}, overwrite=True)
    assert sorted(p.name for p in kept.iterdir()) == ["results.json", "run.json"]
    stages.discard_replaced_run(tmp_path / "run")
    (tmp_path / "linked").symlink_to(tmp_path / "run")  # a run folder reached by a link
    stages.prepare_run(tmp_path / "linked", {**settings, "seeds": [2]}, overwrite=True)
    assert (tmp_path / "linked").is_symlink(), "the link stays; the run it points to goes"
    assert stages._run_settings(tmp_path / "run" / stages.RUN_FILE)["seeds"] == [2]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_that_python_dropped_still_stops_the_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CPython ignores an exception raised in ``__del__`` or a weakref callback (torch runs
    some): the Ctrl-C handler's flag stops the stage before it is marked done."""
    from loraxir.training import entry

    monkeypatch.setattr(entry, "_interrupted", False)

    class Collected:
        def __del__(self) -> None:
            entry._on_interrupt(signal.SIGINT, None)

    def work() -> dict[str, Any]:
        Collected()  # its KeyboardInterrupt is printed as "Exception ignored" and dropped
        return {"x": 1}

    with pytest.raises(KeyboardInterrupt):
        stages.run_stage(tmp_path, "stage", work, print)
    assert stages.stage_done(tmp_path) is None


def test_a_stage_stopped_by_a_full_disk_reports_that_error_not_its_time_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(name: Any, *args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(name))

    def work() -> dict[str, Any]:
        monkeypatch.setattr(stages, "write_json", full)  # the stage's time record fails too
        full("adapter_model.safetensors")
        return {}

    with pytest.raises(OSError) as raised:
        stages.run_stage(tmp_path, "stage", work, print)
    assert raised.value.filename == "adapter_model.safetensors"


@pytest.mark.parametrize("run_json", [None, '{"x": 1}', "[1, 2]", "not json"])
def test_a_foreign_folder_is_never_deleted(tmp_path: Path, run_json: str | None) -> None:
    """Nor one that happens to hold a run.json that is not the benchmark's."""
    (tmp_path / "mine.txt").write_text("keep")
    if run_json is not None:
        (tmp_path / "run.json").write_text(run_json)
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="not a benchmark output folder"):
            stages.prepare_run(tmp_path, {}, overwrite=overwrite)
    assert (tmp_path / "mine.txt").read_text() == "keep"
    with pytest.raises(ConfigError, match=r"mine\.txt' is a file; name a folder"):
        stages.prepare_run(tmp_path / "mine.txt" / "run", {}, overwrite=False)


def test_a_failed_write_leaves_the_earlier_result_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "results.json"
    stages.write_json(path, {"psnr": 30.0})

    def disk_full(self: Path, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        stages.write_json(path, {"psnr": 31.0})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"psnr": 30.0}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"], "no temporary file left"


def test_atomic_results_are_as_readable_as_normally_written_files(tmp_path: Path) -> None:
    stages.write_json(tmp_path / "atomic.json", {})
    (tmp_path / "plain.json").write_text("{}")
    mode = (tmp_path / "plain.json").stat().st_mode & 0o777
    assert (tmp_path / "atomic.json").stat().st_mode & 0o777 == mode


def test_an_interrupted_stage_runs_again_and_a_done_one_does_not(tmp_path: Path) -> None:
    calls = []

    def interrupted() -> dict[str, Any]:
        calls.append("interrupted")
        time.sleep(0.2)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stages.run_stage(tmp_path, "stage", interrupted, print)
    assert stages.stage_done(tmp_path) is None
    first = stages.run_stage(tmp_path, "stage", lambda: calls.append("run") or {"x": 1}, print)
    again = stages.run_stage(tmp_path, "stage", lambda: calls.append("again") or {}, print)
    assert calls == ["interrupted", "run"] and again == first and first["result"] == {"x": 1}
    assert first["seconds"] >= 0.2, "the interrupted attempt's time counts"
    assert not (tmp_path / stages.SPENT).exists()
    assert stages.recipe_argv({"max_steps": 5})[:2] == ["--resume", "latest"]


@pytest.mark.parametrize("scale", ["tiny", "quick", "cpu", "paper"])
def test_every_scale_gives_settings_its_recipes_accept(scale: str) -> None:
    """Typos in a scale's YAML fail here, not an hour into a run: loading the config loads
    every stage's recipe config (``check_stage_settings``)."""
    from _all_in_one_methods import check_stage_settings

    loaded = check_stage_settings(load_bench_config(scale))
    assert {stage.runner for stage, _ in loaded} >= {"train_router", "pretrain", "finetune"}
    for stage, config in loaded:
        assert config.max_steps == stage.settings["max_steps"], stage.name


def test_the_quickstart_takes_a_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import quickstart

    with pytest.raises(SystemExit):
        quickstart.main(["--scale", "tiny", "--output-dir", str(tmp_path / "q"), "--seed", "-3"])
    assert "the seed must be in [0, 2**32 - 1], got -3" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()

    class Ran(Exception):
        pass

    def run(config: BenchConfig, root: Path, *args: Any) -> None:
        raise Ran(config.seeds, root)

    monkeypatch.setattr(all_in_one, "run", run)
    with pytest.raises(Ran, match=r"\[7\]"):
        quickstart.main(["--scale", "tiny", "--output-dir", str(tmp_path / "q"), "--seed", "7"])
    # The stages record their folders in their checkpoints' settings: a folder spelled
    # relatively must resume as the same run, so both scripts work in the absolute path.
    monkeypatch.chdir(tmp_path)
    for main in (quickstart.main, all_in_one.main):
        with pytest.raises(Ran) as ran:
            main(["--scale", "tiny", "--output-dir", "relative"])
        assert ran.value.args[1] == tmp_path / "relative"


@pytest.mark.parametrize("seeds", [[1], [0, 1], [2, 1]])
def test_the_shared_router_has_seed_0_whichever_seeds_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seeds: list[int]
) -> None:
    """Seed 1's numbers came out different when run alone or after seed 2."""

    class Stop(Exception):
        pass

    class Recipe:
        @staticmethod
        def main(argv: list[str]) -> None:
            assert "seed=0" in argv
            assert "checkpoint_every=10" in argv, "an interrupted router resumes too"
            raise Stop

    monkeypatch.setattr(all_in_one, "recipe", lambda name: Recipe)
    config = load_bench_config("tiny", overrides=[f"seeds={seeds}", "checkpoint_every=10"])
    with pytest.raises(Stop):
        all_in_one.run_seed(config, tmp_path, config.suites[0], 1, print)


def test_a_dotted_override_changes_one_entry_of_a_section_and_reaches_its_recipe(
    tmp_path: Path,
) -> None:
    from _all_in_one_methods import router_settings

    cpu = load_bench_config("cpu")
    config = load_bench_config("cpu", overrides=["data.loss=psnr", "router.max_steps=500"])
    assert (cpu.data["loss"], cpu.router["max_steps"]) != ("psnr", 500)
    assert config.data == {**cpu.data, "loss": "psnr"}
    assert config.router == {**cpu.router, "max_steps": 500}
    paths = Paths(tmp_path, config.suites[0], config.seeds[0], config.router_per_seed)
    assert shared_stage(config, paths).settings["loss"] == "psnr"
    assert router_settings(config, paths)["max_steps"] == 500


def test_bad_settings_name_the_value_and_the_fix() -> None:
    with pytest.raises(UnknownNameError, match="lora_ir_top1"):
        load_bench_config("tiny", overrides=["methods=[lora_ir_top]"])
    with pytest.raises(UnknownNameError, match="cpu"):
        load_bench_config("cpuu")
    with pytest.raises(UnknownNameError, match="seeds"):
        load_bench_config("tiny", overrides=["seed=[1]"])
    with pytest.raises(ConfigError, match=r"adapters\.max_steps"):
        BenchConfig(pretrain={"max_steps": 1}, adapters={})
    with pytest.raises(ConfigError, match="eval_batch_size=1"):
        load_bench_config("tiny", overrides=["eval_patch_size=null"])
    # Refused when the config loads: before an --overwrite run deletes the earlier folder.
    with pytest.raises(UnknownNameError, match="nope"):
        load_bench_config("tiny", overrides=["suites=[nope]"])
    with pytest.raises(ConfigError, match="neither 'skimage' nor a folder"):
        load_bench_config("tiny", overrides=["source=/no/such/folder"])
    # A recipe setting of a section, checked then too (it once failed when its stage ran,
    # after --overwrite had deleted the earlier run).
    with pytest.raises(UnknownNameError, match="bogus"):
        load_bench_config("tiny", overrides=["pretrain.bogus=3"])
    with pytest.raises(ConfigError, match=r"adapters\.r must be an integer >= 1, got -1"):
        load_bench_config("tiny", overrides=["adapters.r=-1"])
    with pytest.raises(ConfigError, match="eval_batch_size must be an integer >= 1, got 0"):
        load_bench_config("tiny", overrides=["eval_batch_size=0"])
    with pytest.raises(ConfigError, match=r"every entry of seeds must be in \[0, 2\*\*32 - 1\]"):
        load_bench_config("tiny", overrides=["seeds=[0, 4294967296]"])
    for name in ("eval_patch_size", "max_photo_side"):
        with pytest.raises(ConfigError, match=f"{name} must be an integer >= 1, got 0"):
            load_bench_config("tiny", overrides=[f"{name}=0"])
