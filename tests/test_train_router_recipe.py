"""The router recipe and the shared training machinery (loraxir.training).

The runs use a tiny CNN on 32² patches so that they fit in CI (the two-process torchrun
run, gloo on CPU, takes ~20 s on 2 cores).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from loraxir.errors import CheckpointError, ConfigError, UnknownNameError
from loraxir.router import DegradationRouter
from loraxir.training import (
    RecipeConfig,
    confusion_matrix,
    flatten_config,
    load_config,
    save_confusion_matrix,
)
from tests.conftest import TINY_OPEN_CLIP

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "train_router.py"
TINY = [
    "suite=five_task",
    "patch_size=32",
    "image_size=16",
    "grid=2",
    "hidden_dim=64",
    "embed_dim=32",
    "batch_size=20",
    "train_repeats=2",
    "test_repeats=4",
    "learning_rate=3e-3",
    "warmup_steps=0",
    "log_every=5",
    "num_workers=0",
]


@pytest.fixture(autouse=True)
def _isolated_run() -> Iterator[None]:
    """Run in-process recipes on one thread, and forget Accelerate's process-wide state after.

    One thread: the many tiny ops of the degradations slow down tenfold when OpenMP
    threads compete with other processes for the cores. The reset keeps a recipe's
    Accelerator settings from leaking into other tests.
    """
    from accelerate.state import AcceleratorState, GradientState

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@functools.cache
def _recipe() -> Any:
    """Import recipes/train_router.py (a script, not a package module) once."""
    spec = importlib.util.spec_from_file_location("train_router_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_recipe(output_dir: Path, *overrides: str) -> dict[str, Any]:
    settings = [*TINY, f"output_dir={output_dir}", *overrides]
    return _recipe().main(["--cpu", "--set", *settings])


def test_short_run_learns_and_writes_every_result(tmp_path: Path) -> None:
    metrics = run_recipe(tmp_path, "max_steps=200", "checkpoint_every=100")
    assert (metrics["steps"], metrics["resumed_from_step"], metrics["num_processes"]) == (200, 0, 1)
    assert metrics["accuracy"] >= 0.6, f"chance is 0.2; got {metrics['accuracy']:.2f}"
    assert set(metrics["per_task"]) == {"noise", "rain", "haze", "blur", "low_light"}
    matrix = torch.tensor(metrics["confusion_matrix"])
    assert matrix.sum() == metrics["num_test_items"] == 3 * 5 * 4

    for name in ("metrics.json", "confusion_matrix.png", "router_choices.png", "config.yaml"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*")), "tensorboard logs"
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step-0000100", "step-0000200"]

    router = DegradationRouter.from_pretrained(tmp_path / "router")
    assert router.degradations == ["noise", "rain", "haze", "blur", "low_light"]
    recipe = _recipe()
    config = load_config(recipe.TrainRouterConfig, None, [*TINY, "max_steps=1"])
    _, test, _ = recipe.build_data(config)
    batch = torch.stack([test[i]["lq"] for i in range(10)])
    labels = torch.tensor([test[i]["label"] for i in range(10)])
    accuracy = (router.eval().logits(batch).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.5, "the saved router is the trained one"


def test_resumed_run_continues_bit_exactly(tmp_path: Path) -> None:
    full = tmp_path / "full"
    run_recipe(full, "max_steps=12", "checkpoint_every=5", "keep_checkpoints=5")
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step-0000005", resumed / "checkpoints" / "step-0000005")
    metrics = run_recipe(resumed, "max_steps=12", "checkpoint_every=5", "resume=latest")
    assert (metrics["resumed_from_step"], metrics["steps"]) == (5, 12)
    expected = load_file(full / "router" / "router.safetensors")
    actual = load_file(resumed / "router" / "router.safetensors")
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def test_same_seed_gives_the_same_router(tmp_path: Path) -> None:
    first = run_recipe(tmp_path / "a", "max_steps=6")
    second = run_recipe(tmp_path / "b", "max_steps=6")
    assert first["confusion_matrix"] == second["confusion_matrix"]
    a = load_file(tmp_path / "a" / "router" / "router.safetensors")
    b = load_file(tmp_path / "b" / "router" / "router.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_contrastive_run_adds_the_held_out_class_by_name(tmp_path: Path) -> None:
    metrics = run_recipe(
        tmp_path,
        "max_steps=10",
        "objective=contrastive",
        "encoder=loraxir-test-recipe-clip",
        f"open_clip_model_cfg={json.dumps(TINY_OPEN_CLIP)}",
        "image_size=16",
        "train_encoder=true",
        "zero_shot_holdout=[haze]",
    )
    assert metrics["classes"] == ["noise", "rain", "blur", "low_light", "haze"]
    assert 0.0 <= metrics["zero_shot_accuracy"] <= 1.0 and "seen_accuracy" in metrics
    router = DegradationRouter.from_pretrained(tmp_path / "router")
    assert router.head_type == "text" and router.prompts["haze"] == "a photo degraded by haze"
    assert router.to_config()["encoder"]["model_cfg"] == TINY_OPEN_CLIP


def test_two_cpu_processes_train_the_same_router_as_one(tmp_path: Path) -> None:
    """torchrun with --cpu forms one gloo job; the global batch is split, not duplicated."""
    settings = [*TINY, "max_steps=8"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        command = [*torchrun, f"--nproc_per_node={processes}", str(RECIPE), "--cpu", "--set"]
        result = subprocess.run(
            [*command, *settings, f"output_dir={out}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[processes] = out
    one = json.loads((runs[1] / "metrics.json").read_text())
    two = json.loads((runs[2] / "metrics.json").read_text())
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert one["num_test_items"] == two["num_test_items"]
    # Same data, same init: only the float summation order differs, which Adam amplifies to
    # ~1e-4 over 8 steps; different batches would move weights by ~lr (3e-3) per step.
    a = load_file(runs[1] / "router" / "router.safetensors")
    b = load_file(runs[2] / "router" / "router.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1.5e-3, rtol=0, msg=key)


@dataclasses.dataclass
class _Config(RecipeConfig):
    names: list[str] = dataclasses.field(default_factory=list)
    ratio: float = 0.5
    extra: dict[str, Any] | None = None


def test_config_loads_yaml_and_overrides_with_types(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("learning_rate: 1e-3\nnames: [a, b]\nmax_steps: 7\n")
    config = load_config(_Config, path, ["ratio=2", "extra={x: 1}", "resume=latest"])
    assert config.learning_rate == 0.001 and isinstance(config.learning_rate, float)
    assert (config.names, config.max_steps, config.ratio) == (["a", "b"], 7, 2.0)
    assert config.extra == {"x": 1} and config.resume == "latest"


@pytest.mark.parametrize(
    ("text", "overrides", "error", "message"),
    [
        ("learnig_rate: 0.1\n", [], UnknownNameError, "learning_rate"),
        ("max_steps: many\n", [], ConfigError, "max_steps"),
        ("names: 3\n", [], ConfigError, "names"),
        ("cpu: !!python/object/apply:os.system ['echo pwned']\n", [], ConfigError, "YAML"),
        ("", ["max_steps"], ConfigError, "key=value"),
        ("", ["max_steps=0"], ConfigError, "max_steps"),
        ("- a list\n", [], ConfigError, "mapping"),
    ],
)
def test_bad_configs_raise_with_the_setting_named(
    tmp_path: Path, text: str, overrides: list[str], error: type, message: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(error, match=message):
        load_config(_Config, path, overrides)


def test_recipe_config_rejects_zero_shot_without_text_prototypes() -> None:
    recipe = _recipe()
    with pytest.raises(ConfigError, match="contrastive"):
        load_config(recipe.TrainRouterConfig, None, ["zero_shot_holdout=[haze]"])


def test_shipped_recipe_configs_load() -> None:
    recipe = _recipe()
    for path in sorted((ROOT / "recipes" / "configs").glob("train_router*.yaml")):
        config = load_config(recipe.TrainRouterConfig, path)
        assert config.max_steps > 0, path


def test_resume_from_an_incomplete_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "step-0000005").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        run_recipe(tmp_path, "max_steps=6", f"resume={tmp_path / 'checkpoints' / 'step-0000005'}")


def test_flatten_config_gives_tensorboard_scalars() -> None:
    flat = flatten_config({"a": 1, "b": {"c": [1, 2], "d": None}, "e": "x", "f": True})
    assert flat == {"a": 1, "b/c": "[1, 2]", "b/d": "null", "e": "x", "f": True}


def test_confusion_matrix_counts_and_figure(tmp_path: Path) -> None:
    matrix = confusion_matrix(torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 1, 2, 2, 2]), 3)
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 0], [1, 1, 1]]
    save_confusion_matrix(matrix, ["a", "b", "c"], tmp_path / "cm.png", "test")
    assert (tmp_path / "cm.png").stat().st_size > 1000
