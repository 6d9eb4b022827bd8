"""`loraxir restore / info / merge / push`: help, lazy imports, bad inputs, merged checkpoints."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from inference_helpers import CLASSES, photo, write_adapter
from PIL import Image
from safetensors.torch import save_file

import loraxir
from loraxir.cli import main
from loraxir.errors import CheckpointError, DataError
from loraxir.inference import allocator
from loraxir.inference.batch import _replace
from loraxir.pretrained import ADAPTER_PATH_ENV

COMMANDS = ["restore", "info", "merge", "push", "degradations"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return write_adapter(tmp_path_factory.mktemp("adapters") / "tiny-three")


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )


def test_every_command_has_help_without_importing_torch():
    code = (
        "import sys\nfrom loraxir.cli import main\n"
        f"for command in {COMMANDS!r} + [None]:\n"
        "    try:\n        main([command, '--help'] if command else ['--help'])\n"
        "    except SystemExit as exit:\n        assert exit.code == 0, command\n"
        "print(sorted(m for m in ('torch', 'peft', 'numpy') if m in sys.modules))"
    )
    result = _fresh_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
    for command in COMMANDS:
        assert f"usage: loraxir {command}" in result.stdout


def test_import_is_lazy_and_peft_still_finds_loraxir(adapter):
    """`import loraxir` pulls neither torch nor peft; importing peft afterwards registers
    our method, so peft's own from_pretrained loads a loraxir folder."""
    code = (
        "import sys, loraxir\n"
        "assert 'torch' not in sys.modules and 'peft' not in sys.modules\n"
        "assert sorted(loraxir.__all__) == sorted(set(loraxir.__all__))\n"
        "assert all(getattr(loraxir, name) is not None for name in loraxir.__all__)\n"
        "import peft\n"
        f"backbone = loraxir.load_backbone({str(adapter)!r})\n"
        f"model = peft.PeftModel.from_pretrained(backbone, {str(adapter)!r})\n"
        "print(type(model.base_model).__name__, model.base_model.degradations)"
    )
    result = _fresh_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"LoraIRModel {CLASSES}"


def test_public_names_are_exact():
    expected = {
        "__version__", "BackboneMismatchError", "CheckpointError", "ConfigError", "DAMConfig",
        "DataError",
        "GuidedBackbone", "LoraIRConfig", "LoraIRError", "LoraIRModel", "Preset",
        "RoutingError", "TargetModulesError", "TrainingError", "UnknownNameError",
        "create_backbone", "get_loraxir_model", "get_preset",
        "list_adapters", "list_backbones", "list_presets", "load_adapter", "load_backbone",
        "register_preset", "route",
    }  # fmt: skip
    assert set(loraxir.__all__) == expected and len(loraxir.__all__) == len(expected)


def test_restore_skips_bad_inputs_reports_them_and_restores_the_others(
    adapter, tmp_path, capsys, monkeypatch
):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(photo(40, 60)).save(inputs / "good.png")
    Image.fromarray(photo(30, 20)[..., 0]).save(inputs / "gray.jpg")
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (inputs / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    monkeypatch.setattr(allocator, "_keeping", False)
    assert main(["restore", str(inputs), "-o", str(out), "--adapter", str(adapter)]) == 1
    assert allocator.keeps_freed_cpu_memory()  # on a CPU: freed memory kept for reuse
    result = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["good.png", "gray.jpg"]
    assert "broken.png" in result.err and "notes.txt" in result.err
    assert "Skipped 2 input(s)" in result.err
    assert sum(f"-> {out}" in line and "p=" in line for line in result.out.splitlines()) == 2
    with Image.open(out / "gray.jpg") as gray:
        assert gray.mode == "L" and gray.size == (20, 30)
    # Existing outputs are kept unless --overwrite.
    again = ["restore", str(inputs / "good.png"), "-o", str(out), "--adapter", str(adapter)]
    assert main([*again, "--quiet"]) == 1
    assert main([*again, "--quiet", "--overwrite", "--degradation", "blur"]) == 0


def test_restore_writes_back_the_colour_profile_and_exif(adapter, tmp_path):
    """read_picture read them, but the restored picture was built without them."""
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    for name in ("p.jpg", "p.png"):
        Image.fromarray(photo(32, 48)).save(tmp_path / name, icc_profile=icc, exif=exif.tobytes())
    out = tmp_path / "out"
    inputs = [str(tmp_path / "p.jpg"), str(tmp_path / "p.png")]
    assert main(["restore", *inputs, "-o", str(out), "--adapter", str(adapter), "--quiet"]) == 0
    for name in ("p.jpg", "p.png"):
        with Image.open(out / name) as restored:
            assert restored.info.get("icc_profile") == icc
            assert restored.getexif().get(0x010F) == "TestCam"


def test_restore_flags_an_unsure_image_with_its_runner_up(adapter, tmp_path, capsys):
    """An image whose top probability is under the router's ``unsure_below`` is reported
    as unsure, with the second class and the command that forces it."""
    import shutil

    from loraxir.inference.restorer import Restorer

    unsure = tmp_path / "unsure"
    shutil.copytree(adapter, unsure)
    model = loraxir.load_adapter(adapter)
    model.loraxir_router.unsure_below = 1.0  # no image is that sure
    model.save_pretrained(str(unsure))
    Image.fromarray(photo(40, 60)).save(tmp_path / "a.png")
    args = ["restore", str(tmp_path / "a.png"), "-o", str(tmp_path / "out.png"), "--quiet"]
    assert main([*args, "--adapter", str(unsure)]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if "-> " in row)
    routing = Restorer(loraxir.load_adapter(unsure)).route(photo(40, 60))
    name, probability = routing.runner_up()
    assert routing.unsure and name != routing.label
    detected = f"{routing.label} (p={routing.confidence:.2f})"
    assert f"{detected}, UNSURE: {name} p={probability:.2f}" in line
    assert line.rstrip().endswith(f"--degradation {name} -> {tmp_path / 'out.png'}")
    assert main([*args, "--adapter", str(adapter), "--overwrite", "--degradation", name]) == 0
    assert "UNSURE" not in capsys.readouterr().out


def test_forced_degradation_equals_routing_to_that_class(adapter, tmp_path):
    image = photo(33, 47)
    Image.fromarray(image).save(tmp_path / "x.png")
    assert main(["restore", str(tmp_path / "x.png"), "-o", str(tmp_path / "y.png"),
                 "--adapter", str(adapter), "--degradation", "noise", "--quiet"]) == 0  # fmt: skip
    model = loraxir.load_adapter(adapter)
    padded = np.pad(image, ((0, 7), (0, 1), (0, 0)), mode="reflect")
    x = torch.from_numpy(padded).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        routed = model(x, degradation="noise")[0, :, :33, :47]
    expected = (routed.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    restored = np.asarray(Image.open(tmp_path / "y.png"))
    assert np.abs(restored.astype(int) - expected).max() <= 1


def test_mismatched_backbone_names_both(adapter, tmp_path, capsys):
    other = loraxir.create_backbone("nafnet-tiny", width=16)
    save_file(other.state_dict(), str(tmp_path / "wide.safetensors"))
    Image.fromarray(photo(16, 16)).save(tmp_path / "x.png")
    wide = str(tmp_path / "wide.safetensors")
    code = main(["restore", str(tmp_path / "x.png"), "-o", str(tmp_path / "o"),
                 "--adapter", str(adapter), "--backbone", wide])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and str(adapter) in error and "wide.safetensors" in error


def test_a_damaged_adapter_is_reported_as_damaged_not_as_a_mismatch(adapter, tmp_path, capsys):
    """A pickle renamed to .safetensors (its zip magic reads as an exabyte header) and a
    truncated file: the file is at fault, not the backbone, in every command."""
    damaged = {}
    for kind in ("pickle", "truncated"):
        damaged[kind] = shutil.copytree(adapter, tmp_path / kind)
        weights = damaged[kind] / "adapter_model.safetensors"
        if kind == "pickle":
            torch.save({"w": torch.zeros(2)}, weights)
        else:
            weights.write_bytes(weights.read_bytes()[:-100])
    for kind, folder in damaged.items():
        with pytest.raises(CheckpointError) as raised:
            loraxir.load_adapter(folder)
        assert not isinstance(raised.value, loraxir.BackboneMismatchError)
        assert "does not fit" not in str(raised.value)
        merge = [
            "merge",
            str(folder),
            "--degradation",
            "noise",
            "-o",
            str(tmp_path / "m.safetensors"),
        ]
        # info reads headers only: a file cut short after its header passes it
        for command in [merge] + [["info", str(folder)]] * (kind == "pickle"):
            assert main(command) == 2
            error = capsys.readouterr().err
            assert "Traceback" not in error and "does not fit" not in error, error
            assert re.search(r"truncated|not safetensors|corrupted", error), error


def test_hub_repo_offline_with_nothing_cached_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    Image.fromarray(photo(16, 16)).save(tmp_path / "x.png")
    code = main(["restore", str(tmp_path / "x.png"), "-o", str(tmp_path / "o"),
                 "--adapter", "someone/not-downloaded", "--quiet"])  # fmt: skip
    assert code == 2 and "not in the Hub cache" in capsys.readouterr().err


def test_info_describes_and_lists(adapter, capsys, monkeypatch, tmp_path):
    assert main(["info", str(adapter)]) == 0
    text = capsys.readouterr().out
    assert f"degradations (3): {', '.join(CLASSES)}" in text
    assert "backbone: nafnet" in text and "expert +" in text
    assert "top-k / temperature: 1 / 1.0" in text, "the router's temperature, not 'None'"
    assert re.search(r"router: cnn-tiny \(cnn encoder, trained with the head; .*width=\d+\)", text)
    monkeypatch.setenv(ADAPTER_PATH_ENV, str(adapter.parent))
    assert main(["info", "--list"]) == 0
    assert "tiny-three" in capsys.readouterr().out
    plain = tmp_path / "plain"  # no router: no temperature to print
    loraxir.get_loraxir_model(loraxir.create_backbone("nafnet-tiny"), loraxir.LoraIRConfig(
        degradations=list(CLASSES))).save_pretrained(str(plain))  # fmt: skip
    assert main(["info", str(plain)]) == 0
    assert "top-k: 1 (no router)" in capsys.readouterr().out


def test_info_says_when_class_embeddings_are_fitted_and_does_not_count_them(adapter, tmp_path):
    from loraxir.pretrained import describe_adapter

    model = loraxir.load_adapter(adapter)
    labels = torch.arange(len(CLASSES)).repeat(2)
    model.loraxir_router.fit_class_embeddings([(torch.rand(len(labels), 3, 32, 32), labels)])
    model.save_pretrained(str(tmp_path / "fitted"))
    before, after = describe_adapter(adapter), describe_adapter(tmp_path / "fitted")
    assert (before.class_embeddings, after.class_embeddings) == (False, True)
    assert after.router_parameters == before.router_parameters
    assert any("with fitted class embeddings" in line for line in after.lines())


@pytest.mark.parametrize("name", ["blur", "compression"])
def test_merge_writes_a_plain_spandrel_checkpoint_equal_to_routing(adapter, tmp_path, name):
    from spandrel import ModelLoader

    target = tmp_path / f"{name}.safetensors"
    assert main(["merge", str(adapter), "--degradation", name, "-o", str(target)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask, "not private as a temp file"
    descriptor = ModelLoader().load_from_file(str(target))
    assert descriptor.architecture.id == "NAFNet"
    hyper = json.loads((adapter / "backbone.json").read_text())["hyperparameters"]
    assert descriptor.model.hyperparameters["width"] == hyper["width"]
    x = torch.rand(2, 3, 32, 40)
    with torch.no_grad():
        merged = descriptor.model.eval()(x)
        routed = loraxir.load_adapter(adapter)(x, degradation=name)
    torch.testing.assert_close(merged, routed, rtol=1e-4, atol=1e-5)
    assert main(["merge", str(adapter), "--degradation", name, "-o", str(target)]) == 2


def test_merge_out_of_disk_exits_2_leaving_no_partial_file(adapter, tmp_path, capsys, monkeypatch):
    import errno

    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    target = tmp_path / "out" / "noise.safetensors"
    code = main(["merge", str(adapter), "--degradation", "noise", "-o", str(target)])
    assert code == 2 and "No space left on device. Free space" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


def test_merge_refuses_dam_blocks_before_touching_the_model(tmp_path, capsys):
    """The shipped adapter has DAM blocks, which no plain checkpoint can hold: `merge`
    exits 2 naming them and writes nothing, and the library call leaves the model whole."""
    from loraxir.errors import ConfigError
    from loraxir.pretrained import save_merged

    target = tmp_path / "haze.safetensors"
    assert main(["merge", "nafnet-five-task", "--degradation", "haze", "-o", str(target)]) == 2
    assert "DAM blocks" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    model = loraxir.load_adapter("nafnet-five-task")
    layers = len(list(model.expert_layers()))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x, degradation="rain")
        with pytest.raises(ConfigError, match="restore --degradation"):
            save_merged(model, "haze", target)
        torch.testing.assert_close(model(x, degradation="rain"), before, rtol=0, atol=0)
    assert len(list(model.expert_layers())) == layers and not model.merged
    assert list(tmp_path.iterdir()) == []


def _video(path, frames=1):
    from fractions import Fraction

    from loraxir.inference.video import VideoWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    with VideoWriter(path, 16, 16, Fraction(5)) as writer:
        for index in range(frames):
            writer.write(photo(16, 16, seed=index))
    return path


def test_video_reports_are_outputs_too(adapter, tmp_path, capsys):
    """clip.mp4 and clip.webm would both write clip.frames.csv/.png: the second is skipped;
    an existing report is not replaced without --overwrite."""
    videos = tmp_path / "videos"
    _video(videos / "clip.mp4")
    _video(videos / "clip.webm")
    out = tmp_path / "out"
    restore = ["restore", "--adapter", str(adapter), "--quiet"]
    assert main([*restore, str(videos), "-o", str(out)]) == 1
    assert f"also writes {out / 'clip.frames.csv'}" in capsys.readouterr().err
    names = ["clip.frames.csv", "clip.frames.png", "clip.mp4"]
    assert sorted(p.name for p in out.iterdir()) == names
    (out / "clip.mp4").unlink()
    assert main([*restore, str(videos / "clip.mp4"), "-o", str(out)]) == 1
    assert f"{out / 'clip.frames.csv'} exists (pass --overwrite)" in capsys.readouterr().err
    assert not (out / "clip.mp4").exists()


def test_an_output_folder_inside_the_input_folder_is_not_an_input(adapter, tmp_path):
    folder = tmp_path / "g"
    (folder / "a").mkdir(parents=True)
    Image.fromarray(photo(16, 16)).save(folder / "a" / "x.png")
    restore = ["restore", "-o", str(folder / "restored"), "--adapter", str(adapter), "--quiet"]
    assert main([*restore, str(folder)]) == 0
    assert main([*restore, str(folder), "--overwrite"]) == 0
    assert main([*restore, f"{folder}/**/*.png", "--overwrite"]) == 0  # a glob through it too
    found = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))
    assert found == ["a/x.png", "restored/a/x.png", "restored/x.png"]


def test_no_job_writes_over_its_own_input_and_a_file_named_twice_is_one_job(tmp_path):
    from loraxir.inference.batch import collect

    folder = tmp_path / "photos"
    (folder / "restored").mkdir(parents=True)
    for name in ("a.png", "restored/b.png"):
        Image.fromarray(photo(8, 8)).save(folder / name)
    jobs, outcome = collect([str(folder)], folder)  # -o the input folder
    assert jobs == [] and all("the input itself" in why for _, why in outcome.failed)
    # `restore photos/* -o photos/restored` run twice: the shell passes the results back.
    inputs = [str(folder / "a.png"), str(folder / "restored")]
    jobs, outcome = collect(inputs, folder / "restored")
    assert [job.source.name for job in jobs] == ["a.png"]
    assert outcome.failed == [
        (
            str(folder / "restored" / "b.png"),
            "its output would be the input itself; choose another -o",
        )
    ]
    twice = [str(folder / "a.png"), f"{folder}/./a.png", f"{folder}/*.png"]
    jobs, outcome = collect(twice, tmp_path / "out")
    assert [job.target for job in jobs] == [tmp_path / "out" / "a.png"] and not outcome.failed
    # Another input's file is not written over either: `restore a/x.png b/x.png -o b`.
    Image.fromarray(photo(8, 8)).save(folder / "restored" / "a.png")
    jobs, outcome = collect([str(folder / "a.png"), str(folder / "restored")], folder / "restored")
    assert jobs == [] and sorted(why for _, why in outcome.failed) == [
        f"its output would be the input {folder / 'restored' / 'a.png'}; choose another -o",
        "its output would be the input itself; choose another -o",
        "its output would be the input itself; choose another -o",
    ]


def test_a_linked_folder_inside_an_input_folder_is_reported_not_skipped_silently(tmp_path):
    from loraxir.inference.batch import collect

    (tmp_path / "photos").mkdir()
    (tmp_path / "elsewhere").mkdir()
    Image.fromarray(photo(8, 8)).save(tmp_path / "elsewhere" / "e.png")
    (tmp_path / "photos" / "trip").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "photos" / "loop").symlink_to(tmp_path / "photos")
    (tmp_path / "photos" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    jobs, outcome = collect([str(tmp_path / "photos")], tmp_path / "out")
    assert jobs == []
    assert [(Path(source).name, why.split(" (")[0]) for source, why in outcome.failed] == [
        ("gone.png", "a broken link: its target does not exist"),
        ("loop", "a link to a folder is not followed"),
        ("trip", "a link to a folder is not followed"),
    ]


def test_hidden_files_and_folders_in_an_input_folder_are_not_inputs(tmp_path):
    from loraxir.inference.batch import collect

    for name in ("a.png", ".b.png", ".cache/c.png", "trip/d.png"):
        (tmp_path / "photos" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(8, 8)).save(tmp_path / "photos" / name)
    jobs, outcome = collect([str(tmp_path / "photos")], tmp_path / "out")
    assert sorted(job.source.name for job in jobs) == ["a.png", "d.png"] and not outcome.failed


def test_an_output_folder_that_cannot_be_written_is_found_before_restoring(tmp_path, monkeypatch):
    from loraxir.inference import batch

    for name in ("a.png", "b.png"):
        Image.fromarray(photo(8, 8)).save(tmp_path / name)
    (tmp_path / "taken").write_text("a file without a suffix")
    jobs, outcome = batch.collect(
        [str(tmp_path / "a.png"), str(tmp_path / "b.png")], tmp_path / "taken"
    )
    assert batch.pending(jobs, outcome, overwrite=False) == []
    assert [why for _, why in outcome.failed] == [
        f"cannot write into {tmp_path / 'taken'}: it is a file, not a folder"
    ] * 2

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(batch.tempfile, "mkstemp", refused)  # a read-only folder, even for root
    jobs, outcome = batch.collect([str(tmp_path / "a.png")], tmp_path / "new" / "out")
    assert batch.pending(jobs, outcome, overwrite=False) == []
    assert outcome.failed == [
        (str(tmp_path / "a.png"), f"cannot write into {tmp_path}: Permission denied")
    ]


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "foo"])
def test_a_device_this_machine_lacks_exits_2_naming_what_it_has(
    adapter, tmp_path, capsys, monkeypatch, device
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    Image.fromarray(photo(16, 16)).save(tmp_path / "x.png")
    code = main(["restore", str(tmp_path / "x.png"), "-o", str(tmp_path / "o.png"),
                 "--adapter", str(adapter), "--device", device])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and f"--device {device!r}" in error
    assert ("available: cpu" in error) == (device != "foo")


def test_a_backbone_that_is_not_a_checkpoint_exits_2(adapter, tmp_path, capsys):
    (tmp_path / "junk.pth").write_bytes(b"junk\n")
    Image.fromarray(photo(16, 16)).save(tmp_path / "x.png")
    code = main(["restore", str(tmp_path / "x.png"), "-o", str(tmp_path / "o.png"),
                 "--adapter", str(adapter), "--backbone", str(tmp_path / "junk.pth")])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and "junk.pth is not a PyTorch or safetensors checkpoint" in error


@pytest.mark.parametrize(("source", "output"), [("clip.mp4", "out.png"), ("x.png", "out.mp4")])
def test_an_output_suffix_that_does_not_suit_the_input_exits_2(
    adapter, tmp_path, capsys, source, output
):
    if source.endswith(".mp4"):
        _video(tmp_path / source)
    else:
        Image.fromarray(photo(16, 16)).save(tmp_path / source)
    code = main(["restore", str(tmp_path / source), "-o", str(tmp_path / output),
                 "--adapter", str(adapter), "--quiet"])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and f"-o {str(tmp_path / output)!r}" in error and ".mp4" in error
    assert not any(tmp_path.glob("*out*"))


@pytest.mark.parametrize(
    ("repo_id", "setting", "message"),
    [
        ("a/b/c", {}, "Invalid Hub repo id 'a/b/c'"),
        ("notarepo", {}, "'notarepo' has no owner; use owner/name"),
        ("me/tiny", {"offline": True}, "offline mode (HF_HUB_OFFLINE is set)"),
        ("me/tiny", {"endpoint": "http://127.0.0.1:9"}, "Cannot reach the Hub at http://127"),
        ("me/tiny", {"file": True}, "is a file; pass the adapter folder that holds it"),
    ],
)
def test_push_problems_exit_2_saying_which(adapter, capsys, monkeypatch, repo_id, setting, message):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", setting.get("offline", False))
    source = adapter / "adapter_config.json" if setting.get("file") else adapter
    argv = ["push", str(source), repo_id]
    if "endpoint" in setting:
        argv += ["--endpoint", setting["endpoint"]]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("output", ["results.v2/", "existing.d"])
def test_a_folder_style_output_is_a_folder(adapter, tmp_path, output):
    """A trailing slash, or an existing folder, is a folder even for one input (and a
    dotted name)."""
    Image.fromarray(photo(16, 16)).save(tmp_path / "x.png")
    (tmp_path / "existing.d").mkdir()
    code = main(["restore", str(tmp_path / "x.png"), "-o", f"{tmp_path}/{output}",
                 "--adapter", str(adapter), "--quiet"])  # fmt: skip
    assert code == 0
    assert (tmp_path / output.rstrip("/") / "x.png").is_file()


def test_a_file_output_after_a_folder_or_glob_that_finds_one_image_is_that_file(adapter, tmp_path):
    """``-o out.png`` after a glob or folder of one image writes out.png, not a folder of
    that name; the output file in the searched folder is not an input on a rerun."""
    shots = tmp_path / "shots"
    shots.mkdir()
    Image.fromarray(photo(16, 16)).save(shots / "x.png")
    (shots / "notes.txt").write_text("not an image")
    code = main(["restore", f"{tmp_path}/*/*.png", "-o", str(tmp_path / "out.png"),
                 "--adapter", str(adapter), "--quiet"])  # fmt: skip
    assert code == 0 and (tmp_path / "out.png").is_file()
    for _ in range(2):  # notes.txt is listed as unsupported (exit 1); x.png is restored
        code = main(["restore", str(shots), "-o", str(shots / "out.PNG"), "--overwrite",
                     "--adapter", str(adapter), "--quiet"])  # fmt: skip
        assert code == 1 and (shots / "out.PNG").is_file()
    assert sorted(p.name for p in shots.iterdir()) == ["notes.txt", "out.PNG", "x.png"]
    clips = tmp_path / "clips"
    _video(clips / "c.mp4")
    for _ in range(2):  # a video's report (out.frames.png) is a result, not an input, too
        code = main(["restore", str(clips), "-o", str(clips / "out.mp4"), "--overwrite",
                     "--adapter", str(adapter), "--quiet"])  # fmt: skip
        assert code == 0 and (clips / "out.frames.png").is_file()


def test_a_file_output_for_several_images_exits_2_naming_a_folder(adapter, tmp_path, capsys):
    for name in ("a.png", "b.png"):
        Image.fromarray(photo(16, 16)).save(tmp_path / name)
    code = main(["restore", f"{tmp_path}/*.png", "-o", str(tmp_path / "out.png"),
                 "--adapter", str(adapter), "--quiet"])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 2 and "names one file, but the inputs hold 2 files" in error
    assert f"-o {str(tmp_path / 'out') + '/'!r}" in error
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tile", "64", "--overlap", "32"], "tile=64 must be at least 3 x overlap=32"),
        (["--tile", "0"], "tile (--tile) must be a positive number of pixels, got 0"),
        (["--tile", "4", "--overlap", "0"], "tile=4 is under this network's size unit of 8 pixels"),
        (["--overlap", "-8"], "overlap (--overlap) must be >= 0, got -8"),
        (["--smooth", "1.5"], r"--smooth must be in [0, 1), got 1.5"),
    ],
)
def test_bad_options_exit_2_once_quoting_the_values(adapter, tmp_path, capsys, options, message):
    for name in ("a.png", "b.png"):
        Image.fromarray(photo(16, 16)).save(tmp_path / name)
    code = main(["restore", str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                 "-o", str(tmp_path / "out"), "--adapter", str(adapter), *options])  # fmt: skip
    result = capsys.readouterr()
    assert code == 2 and result.err.count(message) == 1 and "Skipped" not in result.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("name", "kind"), [("i.jpg", "JPEG"), ("i.ppm", "PPM")])
def test_an_output_that_would_lose_alpha_is_refused_naming_it(
    adapter, tmp_path, capsys, name, kind
):
    """PPM dropped alpha without a word; JPEG failed after restoring, naming a temporary
    file."""
    rgba = np.dstack([photo(16, 16), np.full((16, 16), 128, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "i.png")
    code = main(["restore", str(tmp_path / "i.png"), "-o", str(tmp_path / "so" / name),
                 "--adapter", str(adapter), "--quiet"])  # fmt: skip
    error = capsys.readouterr().err
    assert code == 1 and f"{str(tmp_path / 'so' / name)!r}: {kind} keeps no alpha" in error
    assert "partial" not in error and not (tmp_path / "so" / name).exists()


def test_temporary_names_clash_with_no_input_and_names_need_not_be_utf8(adapter, tmp_path):
    """`.x.partial.png` was the fixed temporary name of x.png's output, so restoring both
    lost one output; a name with bytes that are not UTF-8 stopped the run at its report
    line on a strict UTF-8 stdout."""
    inputs = tmp_path / b"in-\xe9".decode("utf-8", "surrogateescape")
    inputs.mkdir()
    for name in (".x.partial.png", "x.png"):
        Image.fromarray(photo(16, 16)).save(inputs / name)
    command = [sys.executable, "-m", "loraxir", "restore", str(inputs / ".x.partial.png"),
               str(inputs / "x.png"), "-o", str(tmp_path / "out"), "--adapter", str(adapter),
               "--degradation", "noise"]  # fmt: skip
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".x.partial.png", "x.png"]
    assert "in-\\udce9" in result.stdout


def test_a_failed_write_names_the_output_not_its_temporary_file(tmp_path):
    target = tmp_path / "i.png"
    with pytest.raises(DataError) as caught:
        _replace(target, lambda path: (path / "inside").write_bytes(b""))
    assert str(target / "inside") in str(caught.value) and "partial" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"an earlier result")

    def half_written(path: Path) -> None:  # the disk fills up mid-file
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(DataError, match="No space left on device"):
        _replace(target, half_written)
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == b"an earlier result"


def test_video_options_with_only_images_are_warned_about(adapter, tmp_path, capsys):
    Image.fromarray(photo(16, 16)).save(tmp_path / "x.png")
    code = main(["restore", str(tmp_path / "x.png"), "-o", str(tmp_path / "o.png"),
                 "--adapter", str(adapter), "--quiet", "--smooth", "0.5"])  # fmt: skip
    assert code == 0
    assert "--smooth and --reference apply to videos only" in capsys.readouterr().err


def test_sigterm_stops_a_video_as_ctrl_c_does_leaving_no_temporary_file(
    adapter, tmp_path, capsys, monkeypatch
):
    """SIGTERM (timeout, schedulers) killed the run and left a hidden ``.partial`` video."""
    import signal

    from loraxir.inference.video import VideoWriter

    written = VideoWriter.write

    def terminated_mid_video(self, frame):
        written(self, frame)
        os.kill(os.getpid(), signal.SIGTERM)

    _video(tmp_path / "in" / "clip.mp4", frames=3)
    monkeypatch.setattr(VideoWriter, "write", terminated_mid_video)
    before = signal.getsignal(signal.SIGTERM)
    code = main(["restore", str(tmp_path / "in" / "clip.mp4"), "-o", str(tmp_path / "out"),
                 "--adapter", str(adapter), "--quiet", "--degradation", "noise"])  # fmt: skip
    assert code == 143 and "interrupted" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_names_ffmpeg_reads_as_protocols_and_names_near_the_length_limit_are_restored(
    adapter, tmp_path, monkeypatch
):
    """``12:00.mp4`` given without a folder was a ``12:`` protocol to FFmpeg; a 240-byte
    name failed after restoring, its temporary twin being over the 255-byte limit."""
    long_name = "p" * 236 + ".png"
    Image.fromarray(photo(16, 16)).save(tmp_path / long_name)
    _video(tmp_path / "12:00.mp4")
    monkeypatch.chdir(tmp_path)
    code = main(["restore", "12:00.mp4", long_name, "-o", "out", "--adapter", str(adapter),
                 "--quiet", "--degradation", "noise"])  # fmt: skip
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["12:00.frames.csv", "12:00.frames.png", "12:00.mp4", long_name]


def test_the_command_line_runs_in_a_thread_and_names_of_long_characters_are_written(tmp_path):
    """main() set a SIGTERM handler, which only the main thread may do; a temporary name
    cut to 64 characters, not bytes, was too long for a 252-byte name of 4-byte ones."""
    import threading

    codes = []
    thread = threading.Thread(target=lambda: codes.append(main(["degradations", "--list"])))
    thread.start()
    thread.join()
    assert codes == [0]
    target = tmp_path / ("\U0001f600" * 62 + ".png")
    assert len(os.fsencode(target.name)) == 252
    _replace(target, lambda path: path.write_bytes(b"image"))
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_ctrl_c_exits_130_saying_what_is_kept(adapter, tmp_path, capsys, monkeypatch):
    from loraxir.inference import batch

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    Image.fromarray(photo(16, 16)).save(tmp_path / "i.png")
    monkeypatch.setattr(batch, "_restore_image", interrupted)
    code = main(["restore", str(tmp_path / "i.png"), "-o", str(tmp_path / "out"),
                 "--adapter", str(adapter), "--quiet"])  # fmt: skip
    assert code == 130 and "interrupted" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"peft_type": "LORA"}, "peft adapter of type 'LORA'"),
        ({"degradations": "noise"}, "lists its classes as names"),
        ([1, 2], "holds a JSON list, not an object"),
        (
            {"router": "cnn"},
            "has router='cnn'; a saved adapter holds its router settings",
        ),  # printed as "router: none"
    ],
)
def test_info_refuses_what_is_not_a_loraxir_adapter(
    adapter, tmp_path, capsys, monkeypatch, edit, message
):
    """A plain peft LoRA folder was described (and listed) as a loraxir adapter; a string
    of classes was printed letter by letter; a config that loading refuses was described."""
    import shutil

    folder = tmp_path / "odd"
    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(
        json.dumps({**config, **edit} if isinstance(edit, dict) else edit)
    )
    assert main(["info", str(folder)]) == 2
    assert message in capsys.readouterr().err
    monkeypatch.setenv(ADAPTER_PATH_ENV, str(tmp_path))
    # Listed only when it is a loraxir config (a broken one, for `info` to explain).
    assert ("odd" in loraxir.list_adapters()) == (
        edit in ({"degradations": "noise"}, {"router": "cnn"})
    )


@pytest.mark.parametrize("layout", ["under_a_file", "a_folder"])
def test_merge_refuses_an_unwritable_output_before_loading(adapter, tmp_path, capsys, layout):
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "d.safetensors").mkdir()
    output = {"under_a_file": "afile/m.safetensors", "a_folder": "d.safetensors"}[layout]
    code = main(["merge", "no-such-adapter", "--degradation", "noise",
                 "-o", str(tmp_path / output), "--overwrite"])  # fmt: skip
    assert code == 2 and "Unknown adapter" not in capsys.readouterr().err  # checked first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "d.safetensors"]


def test_load_adapter_passes_strict_on(adapter, tmp_path):
    import shutil

    folder = tmp_path / "newer"
    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "from_the_future": 1}))
    with pytest.raises(loraxir.ConfigError, match="from_the_future"):
        loraxir.load_adapter(folder)
    with pytest.warns(UserWarning, match="from_the_future"):
        assert loraxir.load_adapter(folder, strict=False).degradations == CLASSES
    (folder / "backbone.json").write_text('{"name": "nafnet-tiny", "hyperparameters": [1]}')
    with pytest.raises(loraxir.CheckpointError, match="not a backbone description"):
        loraxir.load_adapter(folder, strict=False)


def test_nothing_to_restore_exits_1_and_existing_outputs_skip_the_model(
    adapter, tmp_path, capsys, monkeypatch
):
    (tmp_path / "empty").mkdir()
    assert main(["restore", str(tmp_path / "empty"), "-o", str(tmp_path / "out")]) == 1
    assert "nothing to restore" in capsys.readouterr().err
    Image.fromarray(photo(16, 16)).save(tmp_path / "i.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "i.png").write_bytes(b"earlier")

    def no_model(*_args, **_kwargs):
        raise AssertionError("the adapter was loaded with nothing to restore")

    monkeypatch.setattr("loraxir.pretrained.load_adapter", no_model)
    assert main(["restore", str(tmp_path / "i.png"), "-o", str(tmp_path / "out") + "/"]) == 1
    assert "exists (pass --overwrite)" in capsys.readouterr().err
    assert (tmp_path / "out" / "i.png").read_bytes() == b"earlier"
