"""The recipe machinery (loraxir.training) piece by piece: schedule, EMA, activation
checkpointing, the stop on a non-finite loss, fingerprints, output folders, metrics."""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from loraxir.errors import ConfigError, DataError, UnknownNameError
from loraxir.training import (
    ExponentialMovingAverage,
    RecipeConfig,
    TrainingError,
    TrainState,
    check_finite_loss,
    enable_activation_checkpointing,
    evaluate_restoration,
    fingerprint,
    load_config,
    make_optimizer_and_scheduler,
    parse_recipe_args,
    prepare_output_dir,
)
from loraxir.training.checkpoints import clear_earlier_run
from loraxir.training.restoration import RestorationConfig, pixel_loss


class _OneProcess:
    """The parts of an Accelerator these helpers use, for a single process."""

    device = torch.device("cpu")

    def get_tracker(self, name: str, unwrap: bool = False) -> Any:
        raise ValueError(f"no {name} tracker")

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def gather_for_metrics(self, values: Any) -> Any:
        return values


def test_cosine_schedule_warms_up_and_ends_at_the_floor() -> None:
    config = RecipeConfig(max_steps=10, warmup_steps=2, learning_rate=1e-3, min_learning_rate=1e-4)
    weight = nn.Parameter(torch.zeros(1))
    optimizer, scheduler = make_optimizer_and_scheduler([{"params": [weight]}], config)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(5e-4) and rates[1] == pytest.approx(1e-3)
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-4)
    assert all(a >= b for a, b in itertools.pairwise(rates[1:]))
    assert optimizer.defaults["betas"] == (0.9, 0.999)


def test_a_warm_up_as_long_as_the_run_is_named() -> None:
    """A shipped config's warm-up with a short ``--set max_steps`` never reaches the rate."""
    weight = nn.Parameter(torch.zeros(1))
    long = RecipeConfig(max_steps=10, warmup_steps=20, learning_rate=1e-3)
    with pytest.warns(UserWarning, match=r"warmup_steps \(20\) >= max_steps \(10\).*0\.5x"):
        make_optimizer_and_scheduler([{"params": [weight]}], long)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_optimizer_and_scheduler(
            [{"params": [weight]}], RecipeConfig(max_steps=21, warmup_steps=20)
        )


def test_ema_averages_swaps_in_and_restores_its_state() -> None:
    weight = nn.Parameter(torch.zeros(3))
    ema = ExponentialMovingAverage({"w": weight}, decay=0.5)
    with torch.no_grad():
        weight.fill_(1.0)
    ema.update()  # warm-up decay min(0.5, 2/11) = 2/11
    expected = torch.full((3,), 9 / 11)
    torch.testing.assert_close(ema.shadow["w"], expected)
    with ema.applied():
        torch.testing.assert_close(weight.detach(), expected)
    assert torch.equal(weight.detach(), torch.ones(3)), "the trained value is back"
    other = ExponentialMovingAverage({"w": nn.Parameter(torch.zeros(3))}, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.updates == 1 and torch.equal(other.shadow["w"], ema.shadow["w"])
    with pytest.raises(ConfigError, match="decay"):
        ExponentialMovingAverage({"w": weight}, decay=1.0)


def test_activation_checkpointing_keeps_outputs_and_gradients() -> None:
    from loraxir.backbones import create_backbone

    torch.manual_seed(0)
    plain = create_backbone("nafnet-tiny")
    checkpointed = create_backbone("nafnet-tiny")
    checkpointed.load_state_dict(plain.state_dict())
    wrapped = enable_activation_checkpointing(checkpointed)
    assert wrapped and all(".".join(w.split(".")[:1]) in {"encoders", "middle_blks", "decoders"}
                           for w in wrapped)  # fmt: skip
    images = torch.rand(2, 3, 16, 16)
    outputs = [model(images) for model in (plain, checkpointed)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    for output in outputs:
        output.square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(),
                                 strict=True):  # fmt: skip
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(ConfigError, match="no block"):
        enable_activation_checkpointing(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_a_non_finite_loss_names_the_step_and_the_last_checkpoint(tmp_path: Path) -> None:
    config = RecipeConfig(output_dir=str(tmp_path))
    state = TrainState(step=6, batches=7)
    check_finite_loss(_OneProcess(), torch.tensor(0.5), config, state)
    with pytest.raises(TrainingError, match=r"step 7 .*No checkpoint was saved yet"):
        check_finite_loss(_OneProcess(), torch.tensor(float("inf")), config, state)
    good = tmp_path / "checkpoints" / "step-0000005"
    good.mkdir(parents=True)
    (good / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoints" / "step-0000006").mkdir()  # an interrupted save
    with pytest.raises(TrainingError, match="step-0000005"):
        check_finite_loss(_OneProcess(), torch.tensor(float("nan")), config, state)


def _fit_sgd(
    config: RecipeConfig, model: nn.Module, batches: torch.Tensor, lr: float, loss: Any
) -> nn.Module:
    """Run the recipes' training loop on ``model`` (zero-initialised) with plain SGD at a
    constant ``lr``, one row of ``batches`` per batch; ``loss(model, batch)``."""
    from torch.utils.data import DataLoader, TensorDataset

    from loraxir.training.engine import fit, setup_accelerator

    accelerator = setup_accelerator(config)
    nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loader = DataLoader(TensorDataset(batches), batch_size=1)
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
    fit(
        accelerator,
        config,
        TrainState(),
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        compute_loss=lambda batch: loss(model, batch[0]),
    )
    return model


@pytest.mark.usefixtures("isolated_recipe_run")
@pytest.mark.parametrize("max_grad_norm", [0.5, 0.0])
def test_the_training_loop_clips_the_gradient_norm_when_asked(
    tmp_path: Path, max_grad_norm: float
) -> None:
    """One plain SGD step (lr 1) moves the weights by the gradient: clipped to
    ``max_grad_norm``, or whole when clipping is off (0)."""
    config = RecipeConfig(
        output_dir=str(tmp_path), cpu=True, max_steps=1, max_grad_norm=max_grad_norm
    )
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    model = _fit_sgd(config, nn.Linear(4, 1, bias=False), x, 1.0, lambda m, b: 10.0 * m(b).sum())
    gradient = 10.0 * x[0]
    expected = gradient * (max_grad_norm / gradient.norm() if max_grad_norm else 1.0)
    torch.testing.assert_close(model.weight.detach()[0], -expected)


@pytest.mark.usefixtures("isolated_recipe_run")
def test_checkpoints_come_every_n_steps_and_at_the_end_and_only_the_newest_stay(
    tmp_path: Path,
) -> None:
    from loraxir.training.checkpoints import last_checkpoint

    config = RecipeConfig(
        output_dir=str(tmp_path), cpu=True, max_steps=5, checkpoint_every=2, keep_checkpoints=2
    )
    _fit_sgd(config, nn.Linear(1, 1, bias=False), torch.ones(1, 1), 0.1, lambda m, b: m(b).sum())
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-0000004", "step-0000005"]  # 2 was removed, 5 is the end
    assert last_checkpoint(config) == tmp_path / "checkpoints" / "step-0000005"


@pytest.mark.usefixtures("isolated_recipe_run")
def test_the_logged_loss_of_an_accumulated_step_averages_its_micro_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from accelerate import Accelerator

    config = RecipeConfig(
        output_dir=str(tmp_path), cpu=True, max_steps=2, gradient_accumulation_steps=2,
        log_every=1,
    )  # fmt: skip
    logged: list[float] = []
    monkeypatch.setattr(
        Accelerator, "log", lambda self, values, step: logged.append(values["train/loss"])
    )
    batches = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    _fit_sgd(
        config, nn.Linear(1, 1, bias=False), batches, 0.0, lambda m, b: b.sum() + 0 * m(b).sum()
    )
    assert logged == [1.5, 3.5]  # the mean of each step's two batches, not its last one


def test_fingerprint_leaves_out_what_may_change_on_resume() -> None:
    config = RestorationConfig(output_dir="a", checkpoint_every=5, validate_every=3)
    other = RestorationConfig(output_dir="b", checkpoint_every=7, cpu=True, resume="latest")
    assert fingerprint(config) == fingerprint(other)
    assert fingerprint(config) != fingerprint(RestorationConfig(patch_size=64))
    assert "learning_rate" in fingerprint(config) and "output_dir" not in fingerprint(config)


def test_output_folder_of_an_earlier_run_needs_overwrite_or_resume(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "step-0000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000001" / "trainer_state.json").write_text("{}")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "val_step-0000900.png").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"--overwrite.*--resume latest"):
        prepare_output_dir(RecipeConfig(output_dir=str(tmp_path)), ("adapter",))
    prepare_output_dir(RecipeConfig(output_dir=str(tmp_path), resume="latest"), ("adapter",))
    overwrite = RecipeConfig(output_dir=str(tmp_path), overwrite=True)
    prepare_output_dir(overwrite, ("adapter",))
    assert (tmp_path / "checkpoints").exists(), "nothing goes before the new run is built"
    clear_earlier_run(overwrite)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "figures").exists()
    assert (tmp_path / "adapter").exists()
    prepare_output_dir(RecipeConfig(output_dir=str(tmp_path / "new")), ("adapter",))


@pytest.mark.parametrize("name", ["figures", "checkpoints", "logs", "adapter"])
def test_a_file_where_the_run_writes_a_folder_is_refused_before_training(
    tmp_path: Path, name: str
) -> None:
    """A file named figures crashed the run at its first validation, losing its steps."""
    (tmp_path / name).write_text("mine")
    for config in (RecipeConfig(output_dir=str(tmp_path), overwrite=True),
                   RecipeConfig(output_dir=str(tmp_path), resume="latest")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"'.*{name}' is a file, where the run writes"):
            prepare_output_dir(config, ("adapter",))
    assert (tmp_path / name).read_text() == "mine"


def test_resume_with_nothing_to_resume_keeps_a_finished_run(tmp_path: Path) -> None:
    """--resume latest over results without a complete checkpoint would start from scratch
    and replace them."""
    (tmp_path / "checkpoints" / "step-0000001").mkdir(parents=True)  # interrupted: no state
    (tmp_path / "metrics.json").write_text("{}")
    latest = RecipeConfig(output_dir=str(tmp_path), resume="latest")
    with pytest.raises(ConfigError, match=r"Nothing to resume.*metrics\.json.*--overwrite"):
        prepare_output_dir(latest, ("adapter",))
    prepare_output_dir(dataclasses.replace(latest, overwrite=True), ("adapter",))
    prepare_output_dir(RecipeConfig(output_dir=str(tmp_path / "new"), resume="latest"))
    # A first checkpoint cut short (a full disk) in a result folder is no finished result:
    # the same command starts again instead of being refused for good.
    folds = tmp_path / "router_run"
    (folds / "folds" / "fold-0" / "checkpoints" / "step-0000002").mkdir(parents=True)
    prepare_output_dir(RecipeConfig(output_dir=str(folds), resume="latest"), ("folds",))
    (folds / "folds" / "fold-0" / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"Nothing to resume.*\['folds'\]"):
        prepare_output_dir(RecipeConfig(output_dir=str(folds), resume="latest"), ("folds",))


def test_every_set_option_counts() -> None:
    """A second --set replaced the first (argparse's default store action)."""
    config = parse_recipe_args(
        RestorationConfig, "", ["--set", "max_steps=4", "--set", "patch_size=32", "seed=3"]
    )
    assert (config.max_steps, config.patch_size, config.seed) == (4, 32, 3)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("num_workers=-1", "num_workers must be >= 0"),
        ("keep_checkpoints=0", "keep_checkpoints must be >= 1"),
        ("max_grad_norm=-1", "max_grad_norm must be >= 0"),
        ("validate_every=-1", "validate_every must be >= 0"),
        ("val_batch_size=0", "val_batch_size must be >= 1"),
        ("tasks=[noise, rain, noise]", "names a task twice"),
        (
            "paired_train={rain: a}\npaired_val={rain: ./a}",
            r"\['rain'\] \(\./a\) are the same folder",
        ),
        ("paired_train={rain: a}\npaired_val={rain: a/val}", "folders inside one another"),
        ("paired_train={rain: a/b}\npaired_val={rain: a}", "folders inside one another"),
        (
            "paired_train={rain: r, noise: n}\npaired_val={rain: v, noise: r/held}",
            r"paired_train\['rain'\] \(r\) and paired_val\['noise'\]",
        ),
        ("paired_train={}\npaired_val={}", "paired_train is empty"),
        ("paired_train={rain: a}\npaired_val={}", "paired_val is empty"),
        ("paired_train={yes: a}\npaired_val={yes: b}", r"not text: \[True\]"),
        ("val_crop_border=-3", "val_crop_border must be >= 0"),
        ("tasks=[]", "tasks is empty"),
        ("val_tasks=[]", "val_tasks is empty; list the tasks to validate, or null: the training"),
        ("val_tasks=[rain, rain]", r"val_tasks names a task twice: \['rain', 'rain'\]"),
        ("paired_train={rain: a}\npaired_val={rain: b}\nval_tasks=[rain]", "in paired_val"),
        ("paired_train={rain: a}\npaired_val={rain: b}\ntasks=[rain]", "list only the classes"),
    ],
)
def test_settings_that_would_train_wrongly_are_refused_when_the_config_loads(
    setting: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(RestorationConfig, None, setting.split("\n"))


def test_restoration_config_rejects_bad_settings_with_the_closest_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder; pass a YAML file in it"):
        load_config(RestorationConfig, tmp_path, [])
    with pytest.raises(UnknownNameError, match="patch_size"):
        load_config(RestorationConfig, None, ["patchsize=32"])
    with pytest.raises(ConfigError, match="loss"):
        load_config(RestorationConfig, None, ["loss=l3"])
    with pytest.raises(ConfigError, match="not a mapping"):
        load_config(RestorationConfig, None, ["loss=l1", "loss.weight=1"])
    with pytest.raises(ConfigError, match="joined by dots"):
        load_config(RestorationConfig, None, ["paired_train..rain=x"])
    with pytest.raises(UnknownNameError, match="paired_train"):
        load_config(RestorationConfig, None, ["paired_trian.rain=x"])
    with pytest.raises(ConfigError, match="fft_weight"):
        load_config(RestorationConfig, None, ["loss=l1_fft", "fft_weight=-0.1"])
    with pytest.raises(ConfigError, match="patch_context"):
        load_config(RestorationConfig, None, ["patch_context=-8"])
    with pytest.raises(ConfigError, match="paired_val"):
        load_config(RestorationConfig, None, ["paired_train={rain: data/rain}"])
    with pytest.raises(ConfigError, match=r"paired_train\.rain"):
        load_config(RestorationConfig, None, ["paired_train={rain: 3}", "paired_val={}"])
    with pytest.raises(ConfigError, match="val_batch_size=4 with whole-image"):
        load_config(RestorationConfig, None, ["val_patch_size=null", "val_batch_size=4"])


@dataclasses.dataclass
class _Sections:
    model: dict[str, Any] = dataclasses.field(default_factory=lambda: {"width": 16, "depth": 2})
    paired: dict[str, str] | None = None


def test_a_dotted_override_sets_one_entry_and_keeps_the_others() -> None:
    assert load_config(_Sections, None, ["model.width=32"]).model == {"width": 32, "depth": 2}
    assert load_config(_Sections, None, ["model={width: 8}", "model.depth=3"]).model == {
        "width": 8,
        "depth": 3,
    }
    assert load_config(_Sections, None, ["paired.rain=data/rain"]).paired == {"rain": "data/rain"}
    assert _Sections().model == {"width": 16, "depth": 2}  # the default is not mutated


def test_psnr_loss_is_minus_the_mean_psnr_in_decibels() -> None:
    target = torch.zeros(2, 3, 4, 4)
    restored = torch.stack([torch.full((3, 4, 4), 0.1), torch.full((3, 4, 4), 0.01)])
    # PSNRs 20 dB and 40 dB: the loss is -(20 + 40) / 2 (up to the 1e-8 in the log).
    assert pixel_loss(restored, target, "psnr").item() == pytest.approx(-30.0, abs=1e-3)
    assert pixel_loss(restored, target, "l1").item() == pytest.approx(0.055)


def test_l1_fft_loss_adds_the_l1_distance_of_the_spectra() -> None:
    generator = torch.Generator().manual_seed(0)
    restored = torch.rand(2, 3, 8, 6, generator=generator)
    target = torch.rand(2, 3, 8, 6, generator=generator)
    # Independent reference: numpy's real FFT of the difference, real and imaginary parts.
    spectrum = np.fft.rfft2((restored - target).double().numpy())
    expected = np.abs(restored - target).mean().item() + 0.1 * np.mean(
        np.abs(np.stack([spectrum.real, spectrum.imag]))
    )
    assert pixel_loss(restored, target, "l1_fft").item() == pytest.approx(expected, rel=1e-5)
    l1 = pixel_loss(restored, target, "l1")
    assert pixel_loss(restored, target, "l1_fft", fft_weight=0.0) == pytest.approx(l1.item())


def test_validation_metrics_are_per_task_and_average_over_tasks() -> None:
    gt = torch.rand(6, 3, 16, 16)
    lq = (gt + 0.05 * torch.randn_like(gt)).clamp(0, 1)
    tasks = torch.tensor([0, 0, 0, 0, 1, 1])
    loader = [{"lq": lq[:4], "gt": gt[:4], "task": tasks[:4]},
              {"lq": lq[4:], "gt": gt[4:], "task": tasks[4:]}]  # fmt: skip
    result = evaluate_restoration(_OneProcess(), lambda b: b["gt"], loader, ["a", "b"])
    assert result["per_task"]["a"]["num_images"] == 4 and result["num_images"] == 6
    assert result["psnr"] == 100.0, "identical images count as 100 dB"
    noisy = evaluate_restoration(_OneProcess(), lambda b: b["lq"], loader, ["a", "b"])
    per_task = [noisy["per_task"][t]["psnr"] for t in ("a", "b")]
    assert noisy["psnr"] == pytest.approx(sum(per_task) / 2)
    assert noisy["psnr"] == pytest.approx(noisy["input_psnr"])


def test_val_tasks_validate_wider_than_training() -> None:
    """Training on blur, validating on blur and rain: rain items only in validation, the
    data's classes both, its training classes blur alone."""
    from loraxir.training.restoration import build_data

    settings = ["patch_size=32", "batch_size=4", "train_repeats=1", "val_repeats=1",
                "tasks=[blur]", "val_tasks=[rain, blur]"]  # fmt: skip
    data = build_data(load_config(RestorationConfig, None, settings))
    trained = {data.train[i]["task_name"] for i in range(len(data.train))}
    validated = [data.val[i]["task_name"] for i in range(len(data.val))]
    assert trained == {"blur"} and set(validated) == {"rain", "blur"}
    assert (data.classes, data.train_classes) == (["rain", "blur"], ["blur"])
    narrow = build_data(load_config(RestorationConfig, None, settings[:-1]))
    assert {narrow.val[i]["task_name"] for i in range(len(narrow.val))} == {"blur"}
    with pytest.raises(UnknownNameError, match="snowfall"):
        build_data(load_config(RestorationConfig, None, [*settings[:-1], "val_tasks=[snowfall]"]))


def test_clean_images_can_come_from_a_hugging_face_dataset(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from loraxir.training.restoration import build_data

    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / f"photo{index}.png"
        )
    settings = [f"source=hf:{tmp_path}", "patch_size=32", "batch_size=4", "train_repeats=1",
                "test_fraction=0.34", "suite=three_task"]  # fmt: skip
    data = build_data(load_config(RestorationConfig, None, settings))
    assert (len(data.train), len(data.val)) == (10, 10)  # 2 + 1 photos, 5 tasks, 1 + 2 repeats
    assert data.classes == ["noise", "rain", "haze"]
    assert data.train[0]["lq"].shape == (3, 32, 32)
    # The same photos saved with save_to_disk (load_dataset refuses such a folder).
    import datasets

    saved = datasets.load_dataset(str(tmp_path), split="train")
    saved.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": saved}).save_to_disk(str(tmp_path / "saved_dict"))
    for folder in ("saved", "saved_dict"):
        settings[0] = f"source=hf:{tmp_path / folder}"
        from_disk = build_data(load_config(RestorationConfig, None, settings))
        assert torch.equal(from_disk.train[3]["gt"], data.train[3]["gt"]), folder
    settings[0] = f"source=hf:{tmp_path / 'saved_dict'}@test"
    with pytest.raises(DataError, match=r"has splits \['train'\], not 'test'"):
        build_data(load_config(RestorationConfig, None, settings))
    settings[0] = f"source=hf:{tmp_path / 'saved'}@train"  # the split it was saved from
    assert torch.equal(build_data(load_config(RestorationConfig, None, settings)).train[3]["gt"],
                       data.train[3]["gt"])  # fmt: skip
    settings[0] = f"source=hf:{tmp_path / 'saved'}@test"  # one Dataset: no other split
    with pytest.raises(DataError, match=r"one Dataset \(of split 'train'\), so @test names"):
        build_data(load_config(RestorationConfig, None, settings))


def test_paired_folders_give_train_repeats_crops_per_pair(tmp_path: Path) -> None:
    """Repeats were ignored for real pairs, and the too-few-items error advised raising
    them; whole held-out pairs are read once (every read would be the same)."""
    from PIL import Image

    from loraxir.training.restoration import build_data

    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for side in ("lq", "gt"):
            (tmp_path / split / side).mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / side / f"{index}.png")
    paired = [
        f"paired_train={{rain: {tmp_path / 'train'}}}",
        f"paired_val={{rain: {tmp_path / 'val'}}}",
    ]
    settings = [*paired, "patch_size=16", "batch_size=4", "train_repeats=5", "val_repeats=3"]
    data = build_data(load_config(RestorationConfig, None, [*settings, "val_patch_size=16"]))
    assert (len(data.train), len(data.val)) == (15, 6)
    crops = [data.train[i]["gt"] for i in (0, 3, 6)]  # pair 0, three reads
    assert not torch.equal(crops[0], crops[1]) and not torch.equal(crops[1], crops[2])
    whole = build_data(load_config(RestorationConfig, None, [*settings, "val_patch_size=null"]))
    assert len(whole.val) == 2


@pytest.mark.usefixtures("isolated_recipe_run")
def test_fp16_on_the_cpu_warns_that_it_runs_in_float32(tmp_path: Path) -> None:
    from loraxir.training.engine import setup_accelerator

    config = RecipeConfig(output_dir=str(tmp_path), cpu=True, mixed_precision="fp16")
    with pytest.warns(UserWarning, match="does nothing on the CPU.*bf16"):
        setup_accelerator(config)


def test_the_image_grid_takes_whole_images_of_different_sizes(tmp_path: Path) -> None:
    """Real pairs validated whole: each class's first image has its own size, and stacking
    them crashed the first validation of the run."""
    from PIL import Image

    from loraxir.training.evaluation import save_image_grid

    items = [
        {"lq": torch.rand(3, 40, 36), "gt": torch.rand(3, 40, 36), "task": 0, "label": 0},
        {"lq": torch.rand(3, 22, 30), "gt": torch.rand(3, 22, 30), "task": 1, "label": 1},
    ]
    grid = save_image_grid(_OneProcess(), lambda b: b["lq"] * 0.5, items, tmp_path / "g.png", 0)
    assert grid.shape == (3, 2 + 2 * (40 + 2), 2 + 3 * (36 + 2))
    assert Image.open(tmp_path / "g.png").size == (grid.shape[2], grid.shape[1])
    torch.testing.assert_close(
        grid[:, 2 + 42 : 2 + 42 + 22, 2 + 38 : 2 + 38 + 30], items[1]["lq"] * 0.5
    )
