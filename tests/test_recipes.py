"""The restoration recipes (recipes/pretrain.py, finetune.py, add_degradation.py) end to end.

Every run is a random-init nafnet-tiny (20 k parameters) on 32² patches of the package
photos, a handful of steps: seconds each on one thread. The two-process runs use torchrun
with gloo on the CPU (``--cpu``), as a cluster would use NCCL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from recipe_helpers import ROOT, recipe
from safetensors.torch import load_file

from loraxir.errors import CheckpointError, ConfigError, DataError, UnknownNameError
from loraxir.training import TrainingError

CLASSES = ["noise", "rain", "haze", "blur", "low_light"]
DATA = [
    "patch_size=32",
    "val_patch_size=32",
    "batch_size=8",
    "train_repeats=2",
    "val_repeats=1",
    "log_every=2",
    "learning_rate=2e-3",
]
FINETUNE = [*DATA, "route_by=label", "compute=batched", "r=2", "ema_decay=0.9"]


pytestmark = pytest.mark.usefixtures("isolated_recipe_run")


def run(name: str, output_dir: Path, *settings: str, flags: tuple[str, ...] = ()) -> dict:
    return recipe(name).main(["--cpu", *flags, "--set", f"output_dir={output_dir}", *settings])


def torchrun(name: str, processes: int, output_dir: Path, *settings: str) -> dict:
    """Run a recipe under torchrun; returns its metrics.json."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={processes}", str(ROOT / "recipes" / f"{name}.py"), "--cpu",
        "--set", f"output_dir={output_dir}", *settings,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((output_dir / "metrics.json").read_text())


def adapter_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A no-DAM base network folder, as recipes/pretrain.py writes it (random weights)."""
    from loraxir.backbones import create_backbone, save_backbone

    folder = tmp_path_factory.mktemp("base") / "backbone"
    torch.manual_seed(0)
    save_backbone(create_backbone("nafnet-tiny"), folder)
    return folder


@pytest.fixture(scope="module")
def finetuned(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A 6-step fine-tuning run that checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("finetuned")
    torch.set_num_threads(1)
    metrics = run(
        "finetune", out, *FINETUNE, f"base={base}", "max_steps=6", "checkpoint_every=3",
        "keep_checkpoints=5",
    )  # fmt: skip
    _reset_accelerate()
    return out, metrics


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# ----------------------------------------------------------------- fine-tuning
def test_logged_learning_rate_is_the_one_each_step_used(finetuned: tuple[Path, dict]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from loraxir.training.config import load_config
    from loraxir.training.engine import make_optimizer_and_scheduler

    out, _ = finetuned
    config = load_config(recipe("finetune").FinetuneConfig, out / "config.yaml")
    optimizer, scheduler = make_optimizer_and_scheduler(
        [{"params": [torch.zeros(1, requires_grad=True)]}], config
    )
    used = {}
    for step in range(1, config.max_steps + 1):
        used[step] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    logged = {event.step: event.value for event in events.Reload().Scalars("train/lr")}
    assert sorted(logged) == [2, 4, 6]
    for step, value in logged.items():
        assert value == pytest.approx(used[step], rel=1e-6), step


def test_finetune_writes_a_self_contained_adapter(finetuned: tuple[Path, dict]) -> None:
    out, metrics = finetuned
    assert (metrics["steps"], metrics["num_processes"]) == (6, 1)
    assert set(metrics["final"]["per_task"]) == {"noise", "rain", "haze", "blur", "low_light"}
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md",
                 "backbone.json", "backbone.safetensors"):  # fmt: skip
        assert (out / "adapter" / name).is_file(), name
    assert "val PSNR (dB)" in (out / "adapter" / "README.md").read_text()
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "initial_step-0000000.png",
        "val_step-0000006.png",
    ]
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    # The experts moved away from B = 0, so the network changed.
    assert metrics["final"]["psnr"] != metrics["initial"]["psnr"]


def reevaluate(name: str, output_dir: Path, restore: Any) -> dict:
    """Validate ``restore`` on the validation set of the run in ``output_dir``."""
    from loraxir.training import evaluate_restoration, load_config
    from loraxir.training.restoration import RestorationConfig, build_data

    module = recipe(name)
    config_class = next(
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, RestorationConfig) and v is not RestorationConfig
    )
    config = load_config(config_class, output_dir / "config.yaml")
    data = build_data(config)

    class _Single:
        def gather_for_metrics(self, values: Any) -> Any:
            return values

    loader = torch.utils.data.DataLoader(data.val, batch_size=8)
    with torch.no_grad():
        return evaluate_restoration(_Single(), lambda b: restore(b, data), loader, data.task_names)


def assert_same_psnr(result: dict, expected: dict) -> None:
    assert result["psnr"] == pytest.approx(expected["psnr"], abs=1e-9)
    for task, numbers in expected["per_task"].items():
        assert result["per_task"][task]["psnr"] == pytest.approx(numbers["psnr"], abs=1e-9)


def assert_label_routed_adapter_reproduces(output_dir: Path, metrics: dict) -> None:
    """The adapter a finetune.py run saved, loaded again and routed by label, gives the
    run's final validation PSNR."""
    from loraxir import LoraIRModel
    from loraxir.backbones import load_backbone
    from loraxir.training.models import routing_arguments

    folder = output_dir / "adapter"
    model = LoraIRModel.from_pretrained(load_backbone(folder), str(folder))
    result = reevaluate(
        "finetune",
        output_dir,
        lambda b, data: model(b["lq"], **routing_arguments("label", b, data)),
    )
    assert_same_psnr(result, metrics["final"])


def test_saved_adapter_reproduces_the_final_validation_psnr(
    finetuned: tuple[Path, dict],
) -> None:
    out, metrics = finetuned
    assert_label_routed_adapter_reproduces(out, metrics)


def test_resumed_finetune_is_bit_identical(
    base: Path, finetuned: tuple[Path, dict], tmp_path: Path
) -> None:
    """Stopped after 3 steps and resumed: the same weights (EMA included) bit for bit."""
    out, metrics = finetuned
    step3 = out / "checkpoints" / "step-0000003"
    shutil.copytree(step3, tmp_path / "checkpoints" / step3.name)
    resumed = run(
        "finetune", tmp_path, *FINETUNE, f"base={base}", "max_steps=6", "checkpoint_every=3",
        "keep_checkpoints=5", flags=("--resume", "latest"),
    )  # fmt: skip
    assert (resumed["resumed_from_step"], resumed["steps"]) == (3, 6)
    expected, actual = adapter_tensors(out), adapter_tensors(tmp_path)
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key
    assert resumed["final"] == metrics["final"]


def test_a_resume_on_another_process_count_says_it_is_not_bit_exact(
    base: Path, finetuned: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Resuming a 2-process checkpoint on 1 process went on silently, though the docs
    promise bit-identical continuations."""
    out, _ = finetuned
    step3 = tmp_path / "checkpoints" / "step-0000003"
    shutil.copytree(out / "checkpoints" / step3.name, step3)
    state = json.loads((step3 / "trainer_state.json").read_text())
    assert state["processes"] == 1
    (step3 / "trainer_state.json").write_text(json.dumps({**state, "processes": 2}))
    run("finetune", tmp_path, *FINETUNE, f"base={base}", "max_steps=6", "checkpoint_every=3",
        "keep_checkpoints=5", flags=("--resume", "latest"))  # fmt: skip
    assert "saved by 2 process(es), and 1 resume it" in capsys.readouterr().out


@pytest.mark.parametrize(
    "damage", ["interrupted", "truncated_weights", "unreadable_state", "truncated_random_states"]
)
def test_an_interrupted_or_damaged_checkpoint_is_skipped_on_resume(
    base: Path, finetuned: tuple[Path, dict], tmp_path: Path, damage: str
) -> None:
    """A run killed while writing step 6 left a folder without trainer_state.json and a
    truncated weights file; or step 6 was complete and its weights file or state was damaged
    later: --resume latest takes step 3 and ends as the full run did."""
    out, _ = finetuned
    step3 = out / "checkpoints" / "step-0000003"
    shutil.copytree(step3, tmp_path / "checkpoints" / step3.name)
    partial = tmp_path / "checkpoints" / "step-0000006"
    shutil.copytree(out / "checkpoints" / "step-0000006", partial)
    if damage == "interrupted":
        (partial / "trainer_state.json").unlink()
    if damage == "unreadable_state":
        (partial / "trainer_state.json").write_text('{"step": 6, "bat')
    elif damage == "truncated_random_states":  # Accelerate only logs that it cannot read it
        (partial / "random_states_0.pkl").write_bytes(b"trunc")
    else:
        (partial / "model.safetensors").write_bytes(b"trunc")
    resumed = run(
        "finetune", tmp_path, *FINETUNE, f"base={base}", "max_steps=6", "checkpoint_every=3",
        "keep_checkpoints=5", flags=("--resume", "latest"),
    )  # fmt: skip
    assert resumed["resumed_from_step"] == 3
    expected, actual = adapter_tensors(out), adapter_tensors(tmp_path)
    assert all(torch.equal(actual[key], value) for key, value in expected.items())


def test_a_checkpoint_that_cannot_be_loaded_is_a_checkpoint_error(
    base: Path, finetuned: tuple[Path, dict], tmp_path: Path
) -> None:
    out, _ = finetuned
    step3 = tmp_path / "checkpoints" / "step-0000003"
    shutil.copytree(out / "checkpoints" / step3.name, step3)
    (step3 / "model.safetensors").write_bytes(b"trunc")
    with pytest.raises(CheckpointError, match=r"No checkpoint could be loaded.*step-0000003"):
        run(
            "finetune", tmp_path, *FINETUNE, f"base={base}", "max_steps=6", "checkpoint_every=3",
            "keep_checkpoints=5", flags=("--resume", "latest"),
        )  # fmt: skip


def test_finetune_trains_with_the_spectral_weight_it_is_given(base: Path, tmp_path: Path) -> None:
    """finetune.py left fft_weight out of its loss, so every value trained the same."""
    tensors = []
    for weight in (0.0, 50.0):
        run("finetune", tmp_path / str(weight), *FINETUNE, f"base={base}", "max_steps=2",
            "loss=l1_fft", f"fft_weight={weight}", "ema_decay=0")  # fmt: skip
        _reset_accelerate()
        tensors.append(adapter_tensors(tmp_path / str(weight)))
    assert any(not torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


def test_finetune_trains_an_existing_adapter_further_on_one_class(
    finetuned: tuple[Path, dict], tmp_path: Path
) -> None:
    """adapter=...: routed by label on blur only, with weight_decay 0, the blur expert
    trains and every other expert, and the network, stay bit for bit as they were; the
    result is again a self-contained adapter that reproduces its validation PSNR.
    Validation covers every class of the adapter unless val_tasks narrows it."""
    out, _ = finetuned
    source = out / "adapter"
    metrics = run(
        "finetune", tmp_path, *DATA, "ema_decay=0.9", f"adapter={source}", "tasks=[blur]",
        "route_by=label", "weight_decay=0", "max_steps=3",
    )  # fmt: skip
    _reset_accelerate()
    assert set(metrics["final"]["per_task"]) == set(CLASSES)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["val_tasks"] == CLASSES
    narrowed = run(
        "finetune", tmp_path / "narrowed", *DATA, f"adapter={source}", "tasks=[blur]",
        "val_tasks=[blur]", "route_by=label", "max_steps=1",
    )  # fmt: skip
    _reset_accelerate()
    assert set(narrowed["final"]["per_task"]) == {"blur"}
    before, after = adapter_tensors(out), adapter_tensors(tmp_path)
    assert before.keys() == after.keys()
    blur = CLASSES.index("blur")
    experts = [key for key in before if ".A." in key or ".B." in key]
    assert experts
    for key in experts:
        others = [i for i in range(len(CLASSES)) if i != blur]
        assert torch.equal(after[key][others], before[key][others]), key
    assert any(not torch.equal(after[k][blur], before[k][blur]) for k in experts)
    for name in ("backbone.json", "backbone.safetensors"):
        assert (tmp_path / "adapter" / name).read_bytes() == (source / name).read_bytes()
    assert_label_routed_adapter_reproduces(tmp_path, metrics)


def test_finetune_build_model_finds_the_adapter_its_config_names(
    finetuned: tuple[Path, dict],
) -> None:
    """build_model(config, data) without the folder found by main: the adapter still,
    not new experts on ``base`` (which does not exist here)."""
    from loraxir.training import load_config
    from loraxir.training.restoration import build_data

    module = recipe("finetune")
    source = finetuned[0] / "adapter"
    config = load_config(
        module.FinetuneConfig, None, [*DATA, f"adapter={source}", "route_by=label"]
    )
    model = module.build_model(config, build_data(config))
    assert model.degradations == CLASSES
    assert model.config.r == 2  # the adapter's, not the config's default 8


def test_finetune_of_an_adapter_refuses_settings_it_would_ignore(
    finetuned: tuple[Path, dict], tmp_path: Path
) -> None:
    source = finetuned[0] / "adapter"
    with pytest.raises(ConfigError, match=r"r=4.*cannot apply"):
        run("finetune", tmp_path / "a", f"adapter={source}", "r=4")
    with pytest.raises(ConfigError, match=r"top_k=2, trainable='all'.*drop them"):
        run("finetune", tmp_path / "b", f"adapter={source}", "top_k=2", "trainable=all")
    with pytest.raises(ConfigError, match=r"classes \['snow'\] have no expert.*add_degradation"):
        run("finetune", tmp_path / "c", *DATA, f"adapter={source}", "suite=all_weather",
            "tasks=[snow]", "route_by=label", "max_steps=1")  # fmt: skip
    with pytest.raises(ConfigError, match="has no router; set route_by='label'"):
        run("finetune", tmp_path / "d", *DATA, f"adapter={source}", "max_steps=1")
    with pytest.raises(UnknownNameError, match="adapter"):
        run("finetune", tmp_path / "e", *DATA, "adapter=no-such-adapter", "route_by=label")
    with pytest.raises(ConfigError, match=r"class_embeddings=True cannot apply"):
        run("finetune", tmp_path / "f", f"adapter={source}", "class_embeddings=true")
    _reset_accelerate()


def test_finetune_refuses_an_unknown_setting_naming_the_closest(tmp_path: Path) -> None:
    with pytest.raises(UnknownNameError, match="learning_rate"):
        run("finetune", tmp_path, "lerning_rate=0.1")
    with pytest.raises(ConfigError, match="experts is empty"):  # it meant "all", silently
        run("finetune", tmp_path, "experts=[]")


@pytest.mark.parametrize(
    ("setting", "changed"),
    [("r=4", "r: 2 in the checkpoint, 4 now"), ("trainable=all", "trainable")],
)
def test_resume_from_another_config_names_the_difference(
    base: Path, finetuned: tuple[Path, dict], tmp_path: Path, setting: str, changed: str
) -> None:
    out, _ = finetuned
    shutil.copytree(out / "checkpoints" / "step-0000003", tmp_path / "checkpoints" / "s")
    checkpoint = tmp_path / "checkpoints" / "s"
    with pytest.raises(CheckpointError, match=changed):
        run(
            "finetune", tmp_path, *FINETUNE, f"base={base}", "max_steps=6", setting,
            f"resume={checkpoint}",
        )  # fmt: skip


def test_resume_onto_another_backbone_is_refused(base: Path, tmp_path: Path) -> None:
    """Same settings, but the base folder was replaced by a wider network meanwhile."""
    from loraxir.backbones import create_backbone, save_backbone

    moved = tmp_path / "base"
    shutil.copytree(base, moved)
    settings = (*FINETUNE, f"base={moved}", "max_steps=2", "checkpoint_every=1")
    run("finetune", tmp_path / "run", *settings)
    _reset_accelerate()
    shutil.rmtree(moved)
    save_backbone(create_backbone("nafnet-tiny", width=16), moved)
    with pytest.raises(CheckpointError, match="other tensors"):
        run("finetune", tmp_path / "run", *settings, flags=("--resume", "latest"))


def test_an_existing_output_is_not_overwritten_without_the_flag(base: Path, tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    settings = (*FINETUNE, f"base={base}", "max_steps=1")
    with pytest.raises(ConfigError, match="--overwrite"):
        run("finetune", tmp_path, *settings)
    metrics = run("finetune", tmp_path, *settings, flags=("--overwrite",))
    assert metrics["steps"] == 1 and (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_a_refused_run_leaves_the_earlier_one_as_it_was(
    finetuned: tuple[Path, dict], base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused resume, or an --overwrite whose settings fail while the model is built,
    keeps the earlier run's config.yaml, checkpoints and logs (activation checkpointing
    refusing a network without blocks came after the clearing)."""
    from loraxir.training import restoration

    def no_blocks(model: torch.nn.Module) -> None:
        raise ConfigError("gradient_checkpointing found no block in this network")

    out = tmp_path / "run"
    shutil.copytree(finetuned[0], out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="learning_rate"):
        run("finetune", out, *FINETUNE, f"base={base}", "max_steps=6", "learning_rate=0.5",
            flags=("--resume", "latest"))  # fmt: skip
    _reset_accelerate()
    with pytest.raises(ConfigError, match="route_by=router needs"):
        run("finetune", out, *FINETUNE, f"base={base}", "route_by=router",
            flags=("--overwrite",))  # fmt: skip
    _reset_accelerate()
    monkeypatch.setattr(restoration, "enable_activation_checkpointing", no_blocks)
    with pytest.raises(ConfigError, match="found no block"):
        run("finetune", out, *FINETUNE, f"base={base}", "gradient_checkpointing=true",
            flags=("--overwrite",))  # fmt: skip
    _reset_accelerate()
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_routing_by_a_router_of_fewer_classes_than_the_data_is_refused(
    base: Path, tmp_path: Path
) -> None:
    from loraxir.router import DegradationRouter

    router = DegradationRouter.from_encoder(
        "cnn-tiny", ["noise", "rain", "haze"], image_size=16, hidden_dim=16, embed_dim=8
    )
    router.save_pretrained(tmp_path / "router")
    with pytest.raises(ConfigError, match=r"knows only.*\['blur', 'low_light'\]"):
        run("finetune", tmp_path / "out", *FINETUNE, f"base={base}", "route_by=router",
            f"router={tmp_path / 'router'}")  # fmt: skip


def test_pretrain_warns_before_training_when_the_router_lacks_the_datas_classes(
    tmp_path: Path,
) -> None:
    from loraxir.router import DegradationRouter

    router = DegradationRouter.from_encoder(
        "cnn-tiny", ["noise", "haze"], image_size=16, hidden_dim=16, embed_dim=8
    )
    router.save_pretrained(tmp_path / "router")
    with pytest.warns(UserWarning, match=r"not the data's classes \['rain'\].*refuse"):
        run("pretrain", tmp_path / "out", *DATA, "backbone=nafnet-tiny", "max_steps=1",
            "tasks=[noise,rain]", f"router={tmp_path / 'router'}")  # fmt: skip


def test_pretrain_refuses_patches_the_network_cannot_take_before_clearing(tmp_path: Path) -> None:
    """Restormer halves its input without padding: 60 px patches failed in torch at the
    first step, after --overwrite had cleared the earlier run."""
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"patch_size=60: this network cannot take .*of 8"):
        run("pretrain", out, *DATA, "backbone=restormer-tiny", "patch_size=60")
    assert not (out / "config.yaml").exists()


def test_finetune_refuses_dropout_with_a_form_that_cannot_apply_it_before_loading(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError, match="compute='batched' cannot apply lora_dropout"):
        run("finetune", tmp_path / "out", *FINETUNE, "base=nowhere", "lora_dropout=0.1")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("weight_decay=-1", "weight_decay must be finite and >= 0, got -1"),
        ("weight_decay=.nan", "weight_decay must be finite and >= 0, got nan"),
        ("fft_weight=.nan", "fft_weight must be finite and >= 0, got nan"),
        ("max_grad_norm=.nan", "max_grad_norm must be >= 0, got nan"),
        ("train_repeats=0", "train_repeats must be >= 1, got 0"),
    ],
)
def test_settings_torch_or_the_data_would_refuse_are_named_when_the_config_loads(
    setting: str, message: str
) -> None:
    from loraxir.training import load_config

    with pytest.raises(ConfigError, match=message):
        load_config(recipe("finetune").FinetuneConfig, None, [setting])


def test_pretrain_refuses_dam_points_without_a_router(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dam_points places DAM blocks"):
        run("pretrain", tmp_path, *DATA, "backbone=nafnet-tiny", "dam_points=[intro]")


def test_add_degradation_without_an_adapter_folder_says_what_to_point_at(
    base: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"holds no adapter_config\.json.*finetune"):
        run("add_degradation", tmp_path / "out", *DATA, f"adapter={base}")
    # A path that does not exist (finetune.py not run yet) is not looked up as a name.
    with pytest.raises(ConfigError, match=r"'.*no/adapter' does not exist; .*finetune\.py"):
        run("add_degradation", tmp_path / "out", *DATA, f"adapter={tmp_path / 'no' / 'adapter'}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["suite=three_task"], r"no task for the adapter's classes \['blur', 'low_light'\]"),
        (["route_by=router"], "route_by='router'.*has none"),
        (["tasks=[noise]", "val_tasks=[rain]"], r"val_tasks names \['rain'\], which this run"),
    ],
)
def test_add_degradation_refuses_what_it_would_do_silently_wrong(
    finetuned: tuple[Path, dict], tmp_path: Path, settings: list[str], message: str
) -> None:
    """An old class without a task went unreplayed and unreported; route_by=router on an
    adapter without a router failed only at validation, after --overwrite had cleared."""
    source, _ = finetuned
    with pytest.raises(ConfigError, match=message):
        run("add_degradation", tmp_path / "out", *DATA, f"adapter={source / 'adapter'}",
            *settings)  # fmt: skip
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["source=/no/such/folder"], "neither 'skimage', a folder"),
        (["source={empty}"], "No images"),
        (["paired_train={{rain: /no/such}}", "paired_val={{rain: /no/such2}}"], "does not exist"),
    ],
)
def test_missing_or_empty_data_fails_before_any_model_is_built(
    base: Path, tmp_path: Path, settings: list[str], message: str
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    filled = [s.format(empty=empty) for s in settings]
    with pytest.raises(DataError, match=message):
        run("finetune", out, *FINETUNE, f"base={base}", *filled)
    assert not (out / "config.yaml").exists(), "the Accelerator (and model) came after the check"


def test_whole_photos_of_different_sizes_validate_without_a_batch_setting(
    base: Path, tmp_path: Path
) -> None:
    """``val_patch_size: null`` alone once crashed inside torch's collate (a 512² and a
    1000×872 photo in one batch); whole photos now go one per batch by default."""
    metrics = run(
        "finetune", tmp_path, *FINETUNE, f"base={base}", "max_steps=1", "tasks=[noise]",
        "val_patch_size=null", "source=skimage", "test_fraction=0.2",
    )  # fmt: skip
    assert metrics["final"]["num_images"] == 3  # 3 of the 14 photos, 1 draw each
    assert any((tmp_path / "figures").glob("*.png")), "the validation grid was written"


def test_a_nan_loss_stops_naming_the_step_and_the_last_checkpoint(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = recipe("finetune")
    calls = {"n": 0}
    real = module.pixel_loss

    def poisoned(restored: torch.Tensor, target: torch.Tensor, *args: object) -> torch.Tensor:
        calls["n"] += 1
        loss = real(restored, target, *args)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(module, "pixel_loss", poisoned)
    with pytest.raises(TrainingError, match=r"step 3 .*step-0000002"):
        run("finetune", tmp_path, *FINETUNE, f"base={base}", "max_steps=6", "checkpoint_every=2")


# ------------------------------------------------------------- two processes
@pytest.fixture(scope="module")
def two_processes(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("two") / "run"
    return out, torchrun("finetune", 2, out, *_two_epochs(base))


def _two_epochs(base: Path) -> list[str]:
    """4 steps over 2 batches an epoch: the runs cross an epoch, whose patches are new."""
    return [*FINETUNE, f"base={base}", "max_steps=4", "checkpoint_every=2", "keep_checkpoints=5",
            "train_repeats=1", "tasks=[noise,rain]"]  # fmt: skip


def test_two_processes_train_the_same_experts_as_one(
    base: Path, two_processes: tuple[Path, dict], tmp_path: Path
) -> None:
    """torchrun --cpu forms one gloo job: the global batch of 8 is split 4 + 4, not
    duplicated, each epoch draws new patches on both (Accelerate passes the epoch to the
    dataset on one process only), and validation is gathered over both processes."""
    out2, two = two_processes
    one = run("finetune", tmp_path, *_two_epochs(base))
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert one["final"]["num_images"] == two["final"]["num_images"]
    # Same batches and init: only the float summation order differs (all-reduce of two
    # halves), which Adam carries to ~1e-5 over 4 steps; another batch split would move
    # experts by ~lr (2e-3) per step.
    a, b = adapter_tensors(tmp_path), adapter_tensors(out2)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=2e-4, rtol=0, msg=key)
    assert two["final"]["psnr"] == pytest.approx(one["final"]["psnr"], abs=1e-3)


def test_two_processes_validate_whole_images_and_refuse_an_indivisible_batch_up_front(
    base: Path, tmp_path: Path
) -> None:
    """Validation batches are split between the processes: whole images go one per
    process, and a patch batch that does not divide is refused before an --overwrite
    clears the earlier run."""
    out = tmp_path / "run"
    settings = [*FINETUNE, f"base={base}", "max_steps=1", "val_patch_size=null",
                "tasks=[noise]"]  # fmt: skip
    whole = torchrun("finetune", 2, out, *settings)
    one = run("finetune", tmp_path / "one", *settings)
    assert whole["final"]["num_images"] == one["final"]["num_images"] > 2
    assert whole["final"]["psnr"] == pytest.approx(one["final"]["psnr"], abs=1e-3)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(ROOT / "recipes" / "finetune.py"), "--cpu", "--overwrite", "--set",
        f"output_dir={out}", *settings, "val_patch_size=32", "val_batch_size=3",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "divisible by the 2 processes" in result.stderr
    assert json.loads((out / "metrics.json").read_text()) == whole
    assert (out / "checkpoints").is_dir()


@pytest.mark.slow
def test_two_processes_resume_bit_identically(
    base: Path, two_processes: tuple[Path, dict], tmp_path: Path
) -> None:
    out2, _ = two_processes
    resumed = tmp_path / "run"
    shutil.copytree(out2 / "checkpoints" / "step-0000002", resumed / "checkpoints" / "step-0000002")
    metrics = torchrun("finetune", 2, resumed, *_two_epochs(base), "resume=latest")
    assert (metrics["resumed_from_step"], metrics["num_processes"]) == (2, 2)
    expected, actual = adapter_tensors(out2), adapter_tensors(resumed)
    assert all(torch.equal(actual[key], value) for key, value in expected.items())


# ------------------------------------------------------------- new degradation
def test_add_degradation_keeps_old_outputs_and_learns_the_new_class(
    finetuned: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraxir import LoraIRModel
    from loraxir.backbones import load_backbone
    from loraxir.pretrained import ADAPTER_PATH_ENV

    source, _ = finetuned
    monkeypatch.setenv(ADAPTER_PATH_ENV, str(source))  # named as an installed adapter
    metrics = run(
        "add_degradation", tmp_path, *DATA, "adapter=adapter", "max_steps=12",
        "learning_rate=5e-3", "val_patch_size=64", "train_repeats=4", "replay_repeats=2",
    )  # fmt: skip
    old = ["noise", "rain", "haze", "blur", "low_light"]
    assert metrics["experts"] == [*old, "snow"]
    patches = metrics["train_patches"]  # 4 per photo of the new task, 2 (replay) of each old
    assert sorted(patches) == sorted([*old, "snow"]) and patches["snow"] == 2 * patches["noise"]
    assert len({patches[task] for task in old}) == 1
    for task in old:  # batches mixing in snow images round old outputs differently (~1e-7)
        assert abs(metrics["per_task"][task]["change"]) < 1e-5, task
    assert metrics["per_task"]["snow"]["change"] > 0.5, metrics["per_task"]["snow"]

    before = LoraIRModel.from_pretrained(load_backbone(source / "adapter"), str(source / "adapter"))
    grown_folder = tmp_path / "adapter"
    grown = LoraIRModel.from_pretrained(load_backbone(grown_folder), str(grown_folder))
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():  # a batch of one old class: bit for bit
        for name in old:
            assert torch.equal(grown(images, degradation=name), before(images, degradation=name))
        base_only = grown(images, gates=torch.zeros(2, 6))
        assert not torch.equal(grown(images, degradation="snow"), base_only), "own expert"
    # Saved with the policy it came with: 'new_experts' (how the recipe trains) made a
    # later finetune.py train the new class only, and nothing when given other classes.
    assert grown.config.trainable == before.config.trainable == "experts"


def test_finetune_refuses_an_adapter_whose_policy_trains_no_class_of_the_data(
    finetuned: tuple[Path, dict], tmp_path: Path
) -> None:
    """An adapter saved with trainable='new_experts' (grown through the Python API) trained
    nothing on its old classes, saying it trained 'new_experts'."""
    source, _ = finetuned
    shutil.copytree(source / "adapter", tmp_path / "grown")
    config = json.loads((tmp_path / "grown" / "adapter_config.json").read_text())
    config["trainable"] = "new_experts"  # its last class, low_light, is not trained below
    (tmp_path / "grown" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"'new_experts'.*no 'low_light' images.*\"experts\""):
        run("finetune", tmp_path / "out", *DATA, f"adapter={tmp_path / 'grown'}",
            "tasks=[noise]")  # fmt: skip
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.parametrize("where", ["run_folder", "adapter_folder", "linked"])
def test_a_recipe_never_writes_over_the_adapter_it_reads(
    finetuned: tuple[Path, dict], tmp_path: Path, where: str
) -> None:
    """With --overwrite, add_degradation wrote the grown adapter over its input (output_dir
    = the run that holds it, or whose adapter/ links to it) or replaced the adapter folder's
    metrics.json (output_dir = the adapter itself): the refusal's own advice led there."""
    source, _ = finetuned
    shutil.copytree(source, tmp_path / "run")
    adapter = tmp_path / "run" / "adapter"
    if where == "linked":  # saving writes through the link, into the adapter it reads
        (tmp_path / "models").mkdir()
        adapter = adapter.rename(tmp_path / "models" / "mine")
        (tmp_path / "run" / "adapter").symlink_to(adapter)
    before = {p.name: p.read_bytes() for p in adapter.iterdir() if p.is_file()}
    output = adapter if where == "adapter_folder" else tmp_path / "run"
    expected = "is output_dir itself" if where == "adapter_folder" else "lies in its adapter/"
    for recipe_name in ("add_degradation", "finetune"):
        with pytest.raises(ConfigError, match=f"adapter=.* is read by this run but {expected}"):
            run(recipe_name, output, *DATA, f"adapter={adapter}", flags=("--overwrite",))
    assert {p.name: p.read_bytes() for p in adapter.iterdir() if p.is_file()} == before
    with pytest.raises(ConfigError, match=r"init_checkpoint=.* is output_dir itself"):
        run("pretrain", adapter, *DATA, f"init_checkpoint={adapter}", flags=("--overwrite",))


# ------------------------------------------------------- DAM: pretrain -> finetune
@pytest.fixture(scope="module")
def guided(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A router (random, frozen) -> pre-training with DAM -> fine-tuning experts+router."""
    from loraxir.router import DegradationRouter

    root = tmp_path_factory.mktemp("guided")
    torch.manual_seed(0)
    router = DegradationRouter.from_encoder(
        "cnn-tiny", CLASSES, image_size=16, hidden_dim=32, embed_dim=16
    )
    router.save_pretrained(root / "router")
    torch.set_num_threads(1)
    pre = run(
        "pretrain", root / "pre", *DATA, "backbone=nafnet-tiny", f"router={root / 'router'}",
        "max_steps=4", "gradient_checkpointing=true", "ema_decay=0.5",
    )  # fmt: skip
    _reset_accelerate()
    fine = run(
        "finetune", root / "ft", *DATA, f"base={root / 'pre' / 'backbone'}", "route_by=router",
        "trainable=experts+router", "compute=batched", "r=2", "max_steps=4",
    )  # fmt: skip
    _reset_accelerate()
    return {"root": root, "pretrain": pre, "finetune": fine}


def test_pretrain_with_a_router_writes_the_guided_network(guided: dict[str, Any]) -> None:
    from spandrel import ModelLoader

    from loraxir.guidance import GuidedBackbone

    folder = guided["root"] / "pre" / "backbone"
    assert guided["pretrain"]["dam"] is True
    for name in ("backbone.json", "backbone.safetensors", "dam.safetensors", "router"):
        assert (folder / name).exists(), name
    native = load_file(folder / "backbone.safetensors")
    assert not any("loraxir" in key for key in native)
    assert ModelLoader().load_from_state_dict(native).architecture.id == "NAFNet"
    network = GuidedBackbone.from_pretrained(folder).eval()
    result = reevaluate("pretrain", guided["root"] / "pre", lambda b, _: network(b["lq"]))
    assert_same_psnr(result, guided["pretrain"]["final"])


def test_pretrain_overwritten_without_a_router_leaves_no_dam_behind(
    guided: dict[str, Any], tmp_path: Path
) -> None:
    """finetune.py would load an earlier run's DAM blocks and router as this network's."""
    out = shutil.copytree(guided["root"] / "pre", tmp_path / "pre")
    metrics = run("pretrain", out, *DATA, "backbone=nafnet-tiny", "max_steps=1",
                  flags=("--overwrite",))  # fmt: skip
    _reset_accelerate()
    assert metrics["dam"] is False
    assert sorted(p.name for p in (out / "backbone").iterdir()) == [
        "backbone.json",
        "backbone.safetensors",
    ]


def test_finetuned_dam_adapter_reproduces_its_psnr_routed_by_its_router(
    guided: dict[str, Any],
) -> None:
    from loraxir import LoraIRModel
    from loraxir.backbones import load_backbone

    folder = guided["root"] / "ft" / "adapter"
    model = LoraIRModel.from_pretrained(load_backbone(folder), str(folder))
    assert model.config.dam is not None
    result = reevaluate("finetune", guided["root"] / "ft", lambda b, _: model(b["lq"]))
    assert_same_psnr(result, guided["finetune"]["final"])
    trained = load_file(folder / "adapter_model.safetensors")
    start = load_file(guided["root"] / "router" / "router.safetensors")
    key = "base_model.loraxir_router.head.weight"
    assert not torch.equal(trained[key], start["head.weight"]), "experts+router trains it"


def test_finetune_fits_class_embeddings_that_drive_dam_for_labels(
    guided: dict[str, Any], base: Path, tmp_path: Path
) -> None:
    """class_embeddings=true: fitted before training on the training patches, saved with
    the adapter, and used by label-routed validation (the adapter reproduces it)."""
    from loraxir import LoraIRModel
    from loraxir.backbones import load_backbone
    from loraxir.training.models import routing_arguments

    pre = guided["root"] / "pre" / "backbone"
    metrics = run(
        "finetune", tmp_path / "ft", *FINETUNE, f"base={pre}", "class_embeddings=true",
        "max_steps=2",
    )  # fmt: skip
    _reset_accelerate()
    folder = tmp_path / "ft" / "adapter"
    model = LoraIRModel.from_pretrained(load_backbone(folder), str(folder))
    assert model.loraxir_router.class_embeddings.shape == (len(CLASSES), 16)

    def by_label(batch: dict[str, Any], data: Any) -> torch.Tensor:
        return model(batch["lq"], **routing_arguments("label", batch, data))

    assert_same_psnr(reevaluate("finetune", tmp_path / "ft", by_label), metrics["final"])
    model.loraxir_router.class_embeddings = None  # the image's embedding instead
    other = reevaluate("finetune", tmp_path / "ft", by_label)
    assert other["psnr"] != pytest.approx(metrics["final"]["psnr"], abs=1e-6)
    with pytest.raises(ConfigError, match="trainable='experts'"):
        run("finetune", tmp_path / "x", *FINETUNE, f"base={pre}", "class_embeddings=true",
            "trainable=all")  # fmt: skip
    with pytest.raises(ConfigError, match="has none"):
        run("finetune", tmp_path / "y", *FINETUNE, f"base={base}", "class_embeddings=true",
            "router=" + str(guided["root"] / "router"))  # fmt: skip
    _reset_accelerate()


def test_finetune_of_an_adapter_checks_the_adapters_own_policy(
    guided: dict[str, Any], tmp_path: Path
) -> None:
    """The guided adapter trains experts+router: routed by label, its router would get no
    gradient through its gates, so that is refused as it is for a config's policy."""
    source = guided["root"] / "ft" / "adapter"
    with pytest.raises(ConfigError, match="route_by='label' bypasses them"):
        run("finetune", tmp_path, *DATA, f"adapter={source}", "route_by=label", "max_steps=1")
    _reset_accelerate()


def test_finetune_validates_classes_it_does_not_train(base: Path, tmp_path: Path) -> None:
    """val_tasks wider than tasks: the experts are the trained classes unless named, a
    validated class routed by label needs its own expert, and one named but not trained
    stays at zero (the base network's output) while validation measures it."""
    wide = [*FINETUNE, f"base={base}", "tasks=[blur]", "val_tasks=[rain, blur]", "max_steps=2"]
    with pytest.raises(ConfigError, match=r"val_tasks validates the classes \['rain'\]"):
        run("finetune", tmp_path / "a", *wide)
    metrics = run("finetune", tmp_path / "b", *wide, "experts=[rain, blur]")
    _reset_accelerate()
    assert set(metrics["final"]["per_task"]) == {"rain", "blur"}
    tensors = adapter_tensors(tmp_path / "b")
    b_keys = [key for key in tensors if ".B." in key]
    assert b_keys and all(not tensors[key][0].any() for key in b_keys), "rain never trained"
    assert any(tensors[key][1].any() for key in b_keys), "blur trained"


def test_add_degradation_trains_only_the_routers_new_class(
    guided: dict[str, Any], tmp_path: Path
) -> None:
    source = guided["root"] / "ft" / "adapter"
    metrics = run(
        "add_degradation", tmp_path, *DATA, f"adapter={source}", "max_steps=3",
        "val_patch_size=64", "router_loss_weight=1.0",
    )  # fmt: skip
    assert metrics["experts"] == [*CLASSES, "snow"]
    key = "base_model.loraxir_router.head.weight"
    before = load_file(source / "adapter_model.safetensors")[key]
    after = load_file(tmp_path / "adapter" / "adapter_model.safetensors")[key]
    assert after.shape == (6, before.shape[1])
    assert torch.equal(after[:5], before), "old classes' logits unchanged"
    for task in CLASSES:
        assert abs(metrics["per_task"][task]["change"]) < 1e-5, task


def test_add_degradation_validates_in_the_precision_it_trains_in(
    guided: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under bf16 it trained with autocast but validated the inner model in float32, so its
    "before" and "after" were other measures than finetune.py's (the docs say bf16)."""
    grow = recipe("add_degradation")
    build = grow.build_model
    seen: set[tuple[bool, bool]] = set()

    def spied(*args: Any, **kwargs: Any) -> Any:
        model = build(*args, **kwargs)
        model.model.model.register_forward_pre_hook(
            lambda module, inputs: seen.add(
                (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"))
            )
        )
        return model

    monkeypatch.setattr(grow, "build_model", spied)
    run("add_degradation", tmp_path, *DATA, f"adapter={guided['root'] / 'ft' / 'adapter'}",
        "max_steps=1", "val_patch_size=32", "mixed_precision=bf16")  # fmt: skip
    assert seen == {(True, True), (False, True)}, "training and validation both under autocast"


def test_add_degradation_keeps_the_fitted_class_embeddings(
    guided: dict[str, Any], paired_root: Path, tmp_path: Path
) -> None:
    """They were dropped, so every old class given by name drove its DAM blocks with the
    image's embedding instead, and its outputs changed."""
    from loraxir import LoraIRModel
    from loraxir.backbones import load_backbone

    pre = guided["root"] / "pre" / "backbone"
    run("finetune", tmp_path / "ft", *FINETUNE, f"base={pre}", "class_embeddings=true",
        "max_steps=2")  # fmt: skip
    _reset_accelerate()
    source = tmp_path / "ft" / "adapter"
    run("add_degradation", tmp_path / "grown", *DATA, f"adapter={source}", "max_steps=2",
        "val_patch_size=32")  # fmt: skip
    before = LoraIRModel.from_pretrained(load_backbone(source), str(source))
    folder = tmp_path / "grown" / "adapter"
    grown = LoraIRModel.from_pretrained(load_backbone(folder), str(folder))
    fitted = before.loraxir_router.class_embeddings
    assert grown.loraxir_router.class_embeddings.shape == (len(CLASSES) + 1, fitted.shape[1])
    assert torch.equal(grown.loraxir_router.class_embeddings[: len(CLASSES)], fitted)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        for name in CLASSES:
            assert torch.equal(grown(images, degradation=name), before(images, degradation=name))
    # From real pairs: the new row is the mean embedding of the new class's folder (it was
    # sought among the synthetic new_tasks the config also names, found empty, and crashed).
    _reset_accelerate()
    run("add_degradation", tmp_path / "paired", *DATA, f"adapter={source}", "max_steps=1",
        "val_patch_size=32", "new_degradation=fog", "new_tasks=[snow]",
        *_paired(paired_root, ["noise", "fog"]))  # fmt: skip
    folder = tmp_path / "paired" / "adapter"
    paired = LoraIRModel.from_pretrained(load_backbone(folder), str(folder))
    assert paired.loraxir_router.class_embeddings.shape[0] == len(CLASSES) + 1


def test_shipped_recipe_configs_load() -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    from loraxir.training import load_config

    configs = ROOT / "recipes" / "configs"
    classes = {"pretrain": "PretrainConfig", "finetune": "FinetuneConfig",
               "add_degradation": "AddDegradationConfig"}  # fmt: skip
    for name, class_name in classes.items():
        paths = sorted(configs.glob(f"{name}_*.yaml"))
        assert paths, name
        for path in paths:
            assert load_config(getattr(recipe(name), class_name), path).max_steps > 0, path
    processes = {p.stem: ClusterConfig.from_yaml_file(p).num_processes
                 for p in (configs / "accelerate").glob("*.yaml")}  # fmt: skip
    assert processes == {"1gpu": 1, "8gpu": 8, "2nodes": 16, "fsdp": 8}


def test_ship_adapter_tells_a_loss_from_a_change_too_small_to_matter():
    """The card's weaknesses: "worse" for -0.3 dB, "level" for -0.001 and +0.02 dB (under
    LEVEL_DB either way), the class given as the way out only where it does better, "only
    slightly" for +0.11 dB (under SLIGHT_DB) but not for +0.5, and a restored class named
    only when it lowers SSIM."""
    rows = {
        "noise": (19.7, 19.6, 0.5, 0.6),
        "blur": (19.999, 20.04, 0.5, 0.6),
        "haze": (20.02, 20.0, 0.5, 0.6),
        "rain": (22.0, 22.0, 0.6, 0.5),
        "low_light": (22.0, 22.0, 0.5, 0.6),
        "snow": (20.11, 20.2, 0.5, 0.6),
        "fog": (20.5, 20.5, 0.5, 0.6),
    }
    scores = {
        task: {"input_psnr": 20.0, "restored_psnr": restored, "given_psnr": given,
               "input_ssim": ssim_in, "restored_ssim": ssim_out}
        for task, (restored, given, ssim_in, ssim_out) in rows.items()
    }  # fmt: skip
    assert recipe("ship_adapter")._weaknesses(scores) == (
        "- It makes noise images worse (-0.30 dB on average above). Leave such images as "
        "they are.\n"
        "- It does not restore blur images; they come out level with the input (-0.001 dB "
        "on average above). Leave such images as they are, or give the class "
        "(`--degradation blur`: +0.04 dB).\n"
        "- It does not restore haze images; they come out level with the input (+0.02 dB "
        "on average above). Leave such images as they are.\n"
        "- It restores snow images only slightly (+0.11 dB on average above): expect little "
        "visible change.\n"
        "- On rain it raises PSNR but lowers SSIM (0.6000 to 0.5000 on average).\n"
    )


def test_ship_adapter_measures_held_out_photos_and_keeps_an_existing_folder(tmp_path) -> None:
    """recipes/ship_adapter.py: the card's table is metrics.json's, classes the adapter
    makes worse or leaves level are named, the shipped folder restores like the trained
    one, and a second run does not replace it."""
    from inference_helpers import CLASSES, write_adapter
    from PIL import Image

    import loraxir
    from loraxir.data import skimage_image

    trained = write_adapter(tmp_path / "trained")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "coffee"):
        image = Image.fromarray(skimage_image(name).permute(1, 2, 0).numpy()).resize((64, 48))
        image.save(photos / f"{name}.png")
    args = [str(trained), "--photos", str(photos), "--suite", "time_varying", "--name", "tiny",
            "--into", str(tmp_path / "shipped"), "--repeats", "1",
            "--trained-by", "train.py"]  # fmt: skip
    target = recipe("ship_adapter").main(args)
    metrics = json.loads((target / "metrics.json").read_text())
    card = (target / "README.md").read_text()
    assert sorted(metrics["held_out"]) == sorted(CLASSES) and "train.py" in card
    assert metrics["trained_by"][0] == "train.py"  # then the command that measured it
    assert metrics["trained_by"][1].startswith("python recipes/ship_adapter.py")
    assert "--adapter tiny" in card and "the default adapter" not in card
    for task, row in metrics["held_out"].items():
        assert row["images"] == 2
        assert f"| {task} | {row['input_psnr']:.2f} | {row['restored_psnr']:.2f} |" in card
        change = row["restored_psnr"] - row["input_psnr"]
        level = recipe("ship_adapter").LEVEL_DB
        assert (f"It makes {task} images worse" in card) == (change <= -level), task
        assert (f"It does not restore {task} images" in card) == (abs(change) < level), task
    clean = metrics["clean_photos"]
    assert sorted(clean["routed_to"]) == ["astronaut", "coffee"]
    assert set(clean["routed_to"].values()) <= set(CLASSES)
    assert clean["lowest_psnr"] <= clean["psnr"] < 100
    assert f"came out at {clean['psnr']:.2f} dB PSNR" in card
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loraxir.load_adapter(target)(x), loraxir.load_adapter(trained)(x))
    with pytest.raises(ConfigError, match="--overwrite"):
        recipe("ship_adapter").main(args)
    assert (target / "README.md").read_text() == card
    (target / "stale.json").write_text("{}")  # say an old backbone file the new one lacks
    recipe("ship_adapter").main([*args, "--overwrite"])
    assert not (target / "stale.json").exists()
    assert loraxir.load_adapter(target).loraxir_router.class_embeddings is None
    training = tmp_path / "training"
    training.mkdir()
    for name in ("camera", "chelsea"):
        image = Image.fromarray(skimage_image(name).permute(1, 2, 0).numpy()).resize((64, 48))
        image.save(training / f"{name}.png")
    (training / "coffee.png").write_bytes((photos / "coffee.png").read_bytes())
    with pytest.raises(ConfigError, match=r"share \['coffee.png'\] \(the same pixels\)"):
        recipe("ship_adapter").main([*args, "--class-photos", str(training)])
    (training / "coffee.png").unlink()
    (training / "astronaut.png").write_bytes((training / "camera.png").read_bytes())  # a name
    fitted = recipe("ship_adapter").main(
        [*args, "--into", str(tmp_path / "fitted"), "--class-photos", str(training)]
    )  # the last --into wins
    router = loraxir.load_adapter(fitted).loraxir_router
    assert router.class_embeddings.shape == (len(CLASSES), router.mlp[-1].out_features)
    assert "fitted on astronaut, camera, chelsea" in (fitted / "README.md").read_text()
    with torch.no_grad():
        assert torch.equal(loraxir.load_adapter(fitted)(x), loraxir.load_adapter(trained)(x))
    chain = ["--trained-by", "python recipes/ship_adapter.py earlier", "--trained-by", "more.py"]
    again = recipe("ship_adapter").main([*args, *chain, "--into", str(tmp_path / "chain")])
    commands = json.loads((again / "metrics.json").read_text())["trained_by"]
    assert commands[1:3] == ["python recipes/ship_adapter.py earlier", "more.py"]
    assert len(commands) == 4 and commands[3].endswith(str(tmp_path / "chain"))
    given = json.loads((fitted / "metrics.json").read_text())["held_out"]
    assert all(row["given_psnr"] > 0 for row in given.values())


def test_ship_adapter_takes_a_name_and_refuses_an_adapter_without_a_router(
    tmp_path, monkeypatch
) -> None:
    """recipes/ship_adapter.py resolves an adapter name like `loraxir restore` does, and an
    adapter routed only by labels is refused before anything is written."""
    from inference_helpers import CLASSES, write_adapter
    from PIL import Image

    import loraxir
    from loraxir.data import skimage_image

    root = tmp_path / "mine"
    write_adapter(root / "tiny-named")
    monkeypatch.setenv("LORAXIR_ADAPTER_PATH", str(root))
    photos = tmp_path / "photos"
    photos.mkdir()
    image = Image.fromarray(skimage_image("coffee").permute(1, 2, 0).numpy()).resize((40, 32))
    image.save(photos / "coffee.png")
    common = ["--photos", str(photos), "--suite", "time_varying", "--repeats", "1"]
    target = recipe("ship_adapter").main(
        ["tiny-named", *common, "--name", "copy", "--into", str(tmp_path / "out")]
    )
    assert sorted(json.loads((target / "metrics.json").read_text())["held_out"]) == sorted(CLASSES)

    backbone = loraxir.create_backbone("nafnet-tiny")
    config = loraxir.LoraIRConfig(degradations=list(CLASSES), r=2)
    loraxir.get_loraxir_model(backbone, config).save_pretrained(str(tmp_path / "no_router"))
    with pytest.raises(ConfigError, match="no router"):
        recipe("ship_adapter").main(
            [str(tmp_path / "no_router"), *common, "--name", "x", "--into", str(tmp_path / "out")]
        )
    assert not (tmp_path / "out" / "x").exists()
    card = (target / "README.md").read_text()
    assert "python recipes/ship_adapter.py tiny-named" in card  # the command that measured it
    for name in ("../escape", "", "a/b"):
        with pytest.raises(ConfigError, match="plain folder name"):
            recipe("ship_adapter").main(
                ["tiny-named", *common, "--name", name, "--into", str(tmp_path / "out")]
            )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "no_router", "out", "photos"]
    with pytest.raises(ConfigError, match=r"tasks \['noise_15'.*not the adapter's classes"):
        recipe("ship_adapter").main(
            ["tiny-named", "--photos", str(photos), "--suite", "three_task", "--repeats", "1",
             "--name", "y", "--into", str(tmp_path / "out")]
        )  # fmt: skip


# ------------------------------------------------------------- real pairs
@pytest.fixture(scope="module")
def paired_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folders of real-looking pairs: package photos degraded by five_task's noise, rain
    and haze, saved as PNG under <class>/<train|val>/<lq|gt>/, as a user's own data."""
    import numpy as np
    from PIL import Image
    from skimage import data as photos

    from loraxir.degradations import suite

    root = tmp_path_factory.mktemp("pairs")
    five = suite("five_task")
    names = {"train": ["astronaut", "coffee", "chelsea"], "val": ["rocket"]}
    for cls, task in (("noise", "noise"), ("rain", "rain"), ("fog", "haze")):
        for split, picks in names.items():
            for side in ("lq", "gt"):
                (root / cls / split / side).mkdir(parents=True)
            for index, name in enumerate(picks):
                clean = torch.from_numpy(getattr(photos, name)()[:96, :96].copy())
                clean = clean.permute(2, 0, 1)[None].float() / 255
                degraded, _ = five.degrade(clean, task, torch.Generator().manual_seed(index))
                for side, image in (("gt", clean), ("lq", degraded)):
                    pixels = (image[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
                    Image.fromarray(np.ascontiguousarray(pixels)).save(
                        root / cls / split / side / f"{name}.png"
                    )
    return root


def _paired(root: Path, classes: list[str]) -> list[str]:
    train = ", ".join(f"{c}: {root / c / 'train'}" for c in classes)
    val = ", ".join(f"{c}: {root / c / 'val'}" for c in classes)
    return [f"paired_train={{{train}}}", f"paired_val={{{val}}}"]


def test_add_degradation_grows_an_adapter_of_ones_own_classes_from_real_pairs(
    base: Path, paired_root: Path, tmp_path: Path
) -> None:
    """The documented way to add a class from folders ran only with a synthetic suite
    naming every class (it read the suite for the replay, which real pairs do not use)."""
    run("finetune", tmp_path / "ft", *FINETUNE, f"base={base}", "max_steps=2",
        *_paired(paired_root, ["noise", "rain"]))  # fmt: skip
    grow = [*DATA, f"adapter={tmp_path / 'ft' / 'adapter'}", "new_degradation=fog",
            "learning_rate=5e-3", "max_steps=8"]  # fmt: skip
    metrics = run("add_degradation", tmp_path / "grown", *grow,
                  *_paired(paired_root, ["noise", "fog"]))  # fmt: skip
    assert metrics["experts"] == ["noise", "rain", "fog"] and metrics["old_tasks"] == ["noise"]
    assert metrics["per_task"]["noise"]["change"] == pytest.approx(0, abs=1e-5)
    assert metrics["per_task"]["fog"]["change"] > 0, metrics["per_task"]
    for classes, message in (
        (["noise", "rain"], "paired_train has no folder for the new class 'fog'"),
        (["noise", "fog", "snowy"], r"classes \['snowy'\] that are neither"),
    ):
        with pytest.raises(ConfigError, match=message):
            paired = _paired(paired_root, classes)
            run("add_degradation", tmp_path / "bad", *grow, *paired)
        assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.parametrize("change", ["removed", "replaced"])
def test_resume_after_the_data_folders_files_changed_is_refused(
    base: Path, paired_root: Path, tmp_path: Path, change: str
) -> None:
    """Settings name a folder, not what it holds: a resumed run must train on the same
    pairs, so a removed pair is refused naming the cause, and the same files resume."""
    data = tmp_path / "data"
    shutil.copytree(paired_root, data)
    settings = [*FINETUNE, f"base={base}", *_paired(data, ["noise", "rain"])]
    settings += ["max_steps=2", "checkpoint_every=1"]
    run("finetune", tmp_path / "ft", *settings)
    resumed = run("finetune", tmp_path / "ft", *settings, flags=("--resume", "latest"))
    assert resumed["resumed_from_step"] == 2
    lq = data / "rain" / "train" / "lq"
    if change == "removed":
        for side in ("lq", "gt"):
            (data / "rain" / "train" / side / "coffee.png").unlink()
    else:  # another picture of the same size under the same name
        shutil.copyfile(lq / "astronaut.png", lq / "coffee.png")
    with pytest.raises(CheckpointError, match="trained on other data than this run finds"):
        run("finetune", tmp_path / "ft", *settings, flags=("--resume", "latest"))


def test_a_metadata_task_that_is_not_the_folders_class_is_refused(
    base: Path, paired_root: Path, tmp_path: Path
) -> None:
    """A metadata.jsonl 'task' column would send a class folder's pairs to another expert."""
    folder = tmp_path / "noise"
    shutil.copytree(paired_root / "noise" / "train", folder)
    rows = [{"lq_file_name": f"lq/{p.name}", "gt_file_name": f"gt/{p.name}", "task": "rain"}
            for p in sorted((folder / "lq").iterdir())]  # fmt: skip
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    paired = [f"paired_train={{noise: {folder}, rain: {paired_root / 'rain' / 'train'}}}",
              f"paired_val={{noise: {paired_root / 'noise' / 'val'}}}"]  # fmt: skip
    with pytest.raises(DataError, match=r"gives the task\(s\) \['rain'\], but paired_train names"):
        run("finetune", tmp_path / "ft", *FINETUNE, f"base={base}", "max_steps=1", *paired)
    assert not (tmp_path / "ft").exists()
