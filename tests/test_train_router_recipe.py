"""The router recipe and the shared training machinery (loraxir.training).

The runs use a tiny CNN at 16 px on images of 32 to 128 px and one photo fold, so that
they fit in CI (the two-process torchrun run, gloo on CPU, takes ~20 s on 2 cores).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from recipe_helpers import ROOT
from recipe_helpers import recipe as load_recipe
from safetensors.torch import load_file

from loraxir.degradations import apply
from loraxir.errors import CheckpointError, ConfigError, UnknownNameError
from loraxir.router import DegradationRouter
from loraxir.router.data import resize_image
from loraxir.training import (
    RecipeConfig,
    confusion_matrix,
    flatten_config,
    load_config,
    save_confusion_matrix,
)
from tests.conftest import TINY_OPEN_CLIP

RECIPE = ROOT / "recipes" / "train_router.py"
TINY = [
    "suite=five_task",
    "image_size=16",
    "router={views: native, grid: 2, hidden_dim: 64, embed_dim: 32, cepstrum: 32}",
    "min_side=32",
    "max_side=128",
    "crops=4",
    "batch_size=16",
    "folds=3",
    "run_folds=1",
    "eval_sizes=[64, 0]",
    "eval_repeats=1",
    "learning_rate=3e-3",
    "warmup_steps=0",
    "log_every=5",
    "num_workers=0",
]


pytestmark = pytest.mark.usefixtures("isolated_recipe_run")


def _recipe() -> Any:
    return load_recipe("train_router")


def run_recipe(output_dir: Path, *overrides: str) -> dict[str, Any]:
    settings = [*TINY, f"output_dir={output_dir}", *overrides]
    return _recipe().main(["--cpu", "--set", *settings])


def _reroute(router: DegradationRouter, overrides: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Route fold 0's test images again with a saved router: (predicted, true) of the
    labelled ones, computed here rather than by the recipe's scoring."""
    recipe = _recipe()
    config = load_config(recipe.TrainRouterConfig, None, overrides)
    data = recipe.build_data(config)
    items = [item for item in recipe.test_images(config, data, 0) if item[3] == "suite"]
    predicted = []
    with torch.no_grad():
        for image, *_ in items:
            predicted.append(int(router.logits(image[None]).argmax()))
    return torch.tensor(predicted), torch.tensor([item[1] for item in items])


NOISE_SUITE = """
name: noise_or_not
tasks:
  - {name: noise, steps: [{noise: {sigma: 25}}]}
  - {name: haze, steps: [{haze: {beta: [0.8, 2.0]}}]}
"""


def test_router_of_a_short_run_finds_noise_on_whole_photos_it_never_saw(tmp_path: Path) -> None:
    """Whole-image noise detection: σ=25 on 256² photos outside training, trained on 32-128 px.

    About 25 s, kept in the default suite: it is the guard of issue 10's main failure (a
    router that saw only downscaled views missed every noisy whole photo)."""
    suite = tmp_path / "noise_or_not.yaml"
    suite.write_text(NOISE_SUITE)
    settings = [f"suite={suite}", "clean_class=true", "max_steps=400", "eval_sizes=[256]"]
    metrics = run_recipe(tmp_path / "run", *settings, "mixtures={}")
    router = DegradationRouter.from_pretrained(tmp_path / "run" / "router")
    assert router.degradations == ["noise", "haze", "clean"]
    recipe = _recipe()
    data = recipe.build_data(load_config(recipe.TrainRouterConfig, None, [*TINY, *settings]))
    photos = [data.photos[i] for i in data.folds[0]]
    assert set(metrics["per_fold"][0]["test_photos"]) == {data.photo_ids[i] for i in data.folds[0]}
    clean = torch.stack([resize_image(photo, 256, 256) for photo in photos])
    noisy = apply("noise", clean, torch.Generator().manual_seed(0), sigma=25)[0]
    assert router.explain(noisy).chosen == [["noise"]] * len(photos)
    assert ["noise"] not in router.explain(clean).chosen


@pytest.mark.slow
def test_short_run_learns_and_writes_every_result(tmp_path: Path) -> None:
    metrics = run_recipe(tmp_path, "max_steps=150", "checkpoint_every=75")
    assert (metrics["steps"], metrics["folds_run"], metrics["num_processes"]) == (150, 1, 1)
    suite = metrics["whole_image"]["suite"]
    assert suite["accuracy"] >= 0.4, f"chance is 0.2; got {suite['accuracy']:.2f}"
    assert set(suite["per_class"]) == {"noise", "rain", "haze", "blur", "low_light"}
    assert set(suite["per_size"]) == {"64", "full"}
    bins = metrics["calibration"]["bins"]
    outside = metrics["whole_image"]["outside"]["items"]
    assert sum(b["items"] for b in bins) == suite["items"] + outside
    for name in (
        "metrics.json",
        "router_evaluation.png",
        "confusion_matrix.png",
        "router_choices.png",
        "config.yaml",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*")), "tensorboard logs"
    checkpoints = sorted(p.name for p in (tmp_path / "folds" / "fold-0" / "checkpoints").iterdir())
    assert checkpoints == ["step-0000075", "step-0000150"]
    router = DegradationRouter.from_pretrained(tmp_path / "router")
    assert router.degradations == ["noise", "rain", "haze", "blur", "low_light"]
    predicted, truth = _reroute(router, TINY)
    assert (predicted == truth).float().mean().item() == pytest.approx(suite["accuracy"])


def test_one_step_run_writes_a_router_that_loads(tmp_path: Path) -> None:
    """The fast sibling of the run above: every result is written and loads."""
    metrics = run_recipe(tmp_path, "max_steps=2", "eval_sizes=[64]", "mixtures={}")
    router = DegradationRouter.from_pretrained(tmp_path / "router")
    assert router.views == "native" and router.encoder.image_size == 16
    assert metrics["per_fold"][0]["test_photos"] == [
        metrics["photos"][i]
        for i in _recipe().build_data(load_config(_recipe().TrainRouterConfig, None, TINY)).folds[0]
    ]
    predicted, truth = _reroute(router, [*TINY, "eval_sizes=[64]"])
    assert (predicted == truth).float().mean().item() == pytest.approx(
        metrics["whole_image"]["suite"]["accuracy"]
    )


def test_final_fit_saves_a_router_trained_on_every_photo(tmp_path: Path) -> None:
    """The folds still make the report; the saved router is a separate run on all photos."""
    metrics = run_recipe(
        tmp_path, "max_steps=2", "eval_sizes=[64]", "mixtures={}", "final_fit=true"
    )
    assert metrics["saved_router"] == "final fit on every photo"
    saved = load_file(tmp_path / "router" / "router.safetensors")
    final = load_file(tmp_path / "folds" / "final" / "router" / "router.safetensors")
    fold = load_file(tmp_path / "folds" / "fold-0" / "router" / "router.safetensors")
    assert all(torch.equal(saved[key], final[key]) for key in saved)
    assert not all(torch.equal(saved[key], fold[key]) for key in saved)


def test_an_overwrite_refused_late_or_a_path_resume_with_a_final_fit_keeps_the_earlier_run(
    tmp_path: Path,
) -> None:
    """Settings that only the router refuses were found after --overwrite had cleared the
    folds; a checkpoint path was applied to both fold 0 and the final fit."""
    run_recipe(tmp_path, "max_steps=2", "eval_sizes=[64, 0]", "mixtures={}", "final_fit=true",
               "checkpoint_every=2", "keep_checkpoints=2")  # fmt: skip
    assert (tmp_path / "router_choices.png").is_file()
    kept = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    recipe = _recipe()
    one_class = tmp_path.parent / "one_class.yaml"
    one_class.write_text("name: one\ntasks:\n  - name: noise\n    steps: [noise]\n")
    late = (
        ("image_size=4", "image_size"),
        ("batch_size=6", "multiple of crops"),
        ("min_side=500", "min_side <= max_side"),  # these were refused once the folds were gone
        ("whole_fraction=2", "whole_fraction"),
        ("max_aspect=0.5", "max_aspect"),
        ("train_images=-3", "train_images must be"),
        ("label_smoothing=2", "label_smoothing must be in"),
        ("encoder_learning_rate=-1", "encoder_learning_rate must be > 0"),
        ("test_widen=0.25", r"train_widen < test_widen"),  # "outside" = the training range
        (f"suite={one_class}", r"train on \['noise'\] only"),
    )
    for bad, message in late:
        with pytest.raises(ConfigError, match=message):
            recipe.main(["--cpu", "--overwrite", "--set", *TINY, f"output_dir={tmp_path}", bad])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == kept
    step = tmp_path / "folds" / "fold-0" / "checkpoints" / "step-0000002"
    with pytest.raises(ConfigError, match="several folds or a final fit use resume=latest"):
        run_recipe(tmp_path, "max_steps=2", "final_fit=true", f"resume={step}")
    recipe.main(["--cpu", "--overwrite", "--set", *TINY, f"output_dir={tmp_path}",
                 "max_steps=2", "eval_sizes=[64]", "mixtures={}"])  # fmt: skip
    assert not (tmp_path / "router_choices.png").exists(), "an earlier run's figure"


def test_resumed_run_continues_bit_exactly(tmp_path: Path) -> None:
    fast = ["eval_sizes=[64]", "mixtures={}"]
    full = tmp_path / "full"
    run_recipe(full, "max_steps=8", "checkpoint_every=4", "keep_checkpoints=5", *fast)
    resumed = tmp_path / "resumed"
    step = Path("folds") / "fold-0" / "checkpoints" / "step-0000004"
    shutil.copytree(full / step, resumed / step)
    run_recipe(resumed, "max_steps=8", "checkpoint_every=4", "resume=latest", *fast)
    expected = load_file(full / "router" / "router.safetensors")
    actual = load_file(resumed / "router" / "router.safetensors")
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def test_same_seed_gives_the_same_router(tmp_path: Path) -> None:
    fast = ["max_steps=4", "eval_sizes=[64]", "mixtures={}"]
    first = run_recipe(tmp_path / "a", *fast)
    second = run_recipe(tmp_path / "b", *fast)
    assert first["confusion_matrix"] == second["confusion_matrix"]
    a = load_file(tmp_path / "a" / "router" / "router.safetensors")
    b = load_file(tmp_path / "b" / "router" / "router.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_contrastive_run_adds_the_held_out_class_by_name(tmp_path: Path) -> None:
    metrics = run_recipe(
        tmp_path,
        "max_steps=4",
        "eval_sizes=[64]",
        "mixtures={}",
        "objective=contrastive",
        "encoder=loraxir-test-recipe-clip",
        f"open_clip_model_cfg={json.dumps(TINY_OPEN_CLIP)}",
        "train_encoder=true",
        "zero_shot_holdout=[haze]",
    )
    assert metrics["classes"] == ["noise", "rain", "blur", "low_light", "haze"]
    matrix = torch.tensor(metrics["confusion_matrix"], dtype=torch.float64)
    haze = metrics["classes"].index("haze")
    assert metrics["zero_shot_accuracy"] == pytest.approx(
        (matrix[haze, haze] / matrix[haze].sum()).item()
    )
    seen = [i for i in range(len(matrix)) if i != haze]
    seen_correct = sum(matrix[i, i] for i in seen) / matrix[seen].sum()
    assert metrics["seen_accuracy"] == pytest.approx(seen_correct.item())
    router = DegradationRouter.from_pretrained(tmp_path / "router")
    assert router.head_type == "text" and router.prompts["haze"] == "a photo degraded by haze"
    assert router.to_config().encoder["model_cfg"] == TINY_OPEN_CLIP


def test_two_cpu_processes_train_the_same_router_as_one(tmp_path: Path) -> None:
    """torchrun with --cpu forms one gloo job; the global batch is split, not duplicated."""
    settings = [*TINY, "max_steps=8", "eval_sizes=[64]", "mixtures={}"]
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
    assert one["whole_image"]["suite"]["items"] == two["whole_image"]["suite"]["items"]
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
    assert load_config(_Config, None, ["mixed_precision=no"]).mixed_precision == "no"  # not False


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
        ("max_steps: 1\nmax_steps: 2\n", [], ConfigError, "'max_steps' is written twice"),
        ("names: caf\xe9\n", [], ConfigError, "not UTF-8"),
        ("", ["seed=-1"], ConfigError, r"seed must be in \[0, 2\*\*32 - 1\], got -1"),
        ("resume: yes\n", [], ConfigError, r"got True \(bool\) \(YAML reads a bare yes/no"),
        ("", ["seed=4294967296"], ConfigError, r"seed must be in \[0, 2\*\*32 - 1\]"),
    ],
)
def test_bad_configs_raise_with_the_setting_named(
    tmp_path: Path, text: str, overrides: list[str], error: type, message: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(text.encode("latin-1"))  # ASCII but for the one non-UTF-8 case
    with pytest.raises(error, match=message):
        load_config(_Config, path, overrides)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("eval_sizes=[128, -1]", "eval_sizes must be image sides"),
        ("router.top_k=abc", "top_k"),
        ("router.views=tiles", "views"),
        ("router.hiden_dim=3", "Unknown router setting 'hiden_dim'.*Did you mean 'hidden_dim'"),
        ("router.degradations=[a, b]", "the suite gives the classes"),
        ("learning_rate=-1", "learning_rate must be > 0, got -1"),
        # Each trained a fold, then crashed measuring it (or ran every fold, for 0).
        ("eval_sizes=[]", "eval_sizes must name at least one size"),
        ("eval_repeats=0", "eval_repeats must be an integer >= 1, got 0"),
        ("run_folds=0", "run_folds must be an integer >= 1, got 0"),
        ("crops=0", "crops must be an integer >= 1, got 0"),
        # Its rows were scored as that regime's, then crashed the confusion matrix.
        ("mixtures={outside: [noise, rain]}", "mixture name 'outside' is an evaluation regime"),
    ],
)
def test_router_settings_are_checked_when_the_config_loads(setting: str, message: str) -> None:
    """Before any photo is degraded or any step trained (these once failed after training)."""
    with pytest.raises((ConfigError, UnknownNameError), match=message):
        load_config(_recipe().TrainRouterConfig, None, [setting])


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
    folder = tmp_path / "folds" / "fold-0" / "checkpoints" / "step-0000005"
    folder.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        run_recipe(tmp_path, "max_steps=6", f"resume={folder}")


def test_the_choices_figure_shows_the_test_images_at_their_own_size(tmp_path: Path) -> None:
    """They were resized to squares of the shorter side, which thins noise and streaks."""
    router = DegradationRouter.from_encoder("cnn-tiny", ["noise", "rain"], image_size=16)
    read: list[tuple[int, ...]] = []
    explain = router.explain
    router.explain = lambda images: read.append(tuple(images.shape)) or explain(images)
    wide = [(torch.rand(3, 40, 60), label, "full", "suite") for label in (1, 0)]
    other = [(torch.rand(3, 50, 50), 0, "full", "suite"), (torch.rand(3, 64, 64), 1, "64", "suite")]
    _recipe().save_router_choices(router, [*wide, *other], tmp_path / "choices.png")
    assert read == [(2, 3, 40, 60)] and (tmp_path / "choices.png").stat().st_size > 1000


def test_flatten_config_gives_tensorboard_scalars() -> None:
    flat = flatten_config({"a": 1, "b": {"c": [1, 2], "d": None}, "e": "x", "f": True})
    assert flat == {"a": 1, "b/c": "[1, 2]", "b/d": "null", "e": "x", "f": True}


def test_confusion_matrix_counts_and_figure(tmp_path: Path) -> None:
    matrix = confusion_matrix(torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 1, 2, 2, 2]), 3)
    assert matrix.tolist() == [[1, 0, 0], [0, 1, 0], [1, 1, 1]]
    save_confusion_matrix(matrix, ["a", "b", "c"], tmp_path / "cm.png", "test")
    assert (tmp_path / "cm.png").stat().st_size > 1000


def test_every_optimizer_step_accumulates_the_same_number_of_batches(tmp_path: Path) -> None:
    """train_batches streams epoch after epoch: Accelerate's default synced at the end of
    each epoch too, making a step of one batch (3 batches an epoch, 2 per step)."""
    from accelerate.state import AcceleratorState, GradientState

    from loraxir.training import TrainState, make_loader, setup_accelerator, train_batches

    config = load_config(_Config, None, ["cpu=true", "batch_size=1",
                                         "gradient_accumulation_steps=2",
                                         f"output_dir={tmp_path}"])  # fmt: skip
    try:
        accelerator = setup_accelerator(config)
        model = torch.nn.Linear(1, 1)
        loader = make_loader(torch.arange(3.0)[:, None], config, shuffle=True)
        model, loader = accelerator.prepare(model, loader)
        batches, synced = train_batches(loader, TrainState()), []
        for _ in range(6):  # as the engine's loop: fetch, then accumulate
            next(batches)
            with accelerator.accumulate(model):
                synced.append(accelerator.sync_gradients)
        assert synced == [False, True] * 3
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_photos_can_come_from_a_hugging_face_dataset(tmp_path: Path) -> None:
    """The router recipe read 'hf:<folder>' as a folder named so, and found none."""
    import numpy as np
    from PIL import Image

    recipe = _recipe()
    rng = np.random.default_rng(0)
    for index in range(3):
        pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"photo{index}.png")
    config = load_config(recipe.TrainRouterConfig, None, [*TINY, f"source=hf:{tmp_path}"])
    data = recipe.build_data(config)
    assert len(data.photos) == 3 and data.photos[0].shape == (3, 40, 48)
    import datasets

    photos = [Image.open(tmp_path / f"photo{index}.png") for index in range(3)]
    datasets.Dataset.from_dict({"picture": photos}).save_to_disk(str(tmp_path / "saved"))
    settings = [*TINY, f"source=hf:{tmp_path / 'saved'}", "image_column=picture"]
    named = recipe.build_data(load_config(recipe.TrainRouterConfig, None, settings))
    assert all(torch.equal(a, b) for a, b in zip(named.photos, data.photos, strict=True))
