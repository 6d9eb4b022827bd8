"""Backbone families and the preset registry: names, variants, detection, building, saving."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import loraxir
from loraxir import ConfigError, LoraIRConfig, UnknownNameError
from loraxir.backbones import (
    Preset,
    _registry,
    backbone_spec,
    detect_preset,
    from_descriptor,
    get_preset,
    list_backbones,
    list_presets,
    register_preset,
    save_backbone,
)


def test_each_family_registers_its_presets_and_variants():
    assert list_presets() == ["nafnet", "restormer", "scunet", "swinir"]
    assert list_presets("s*") == ["scunet", "swinir"]
    assert list_backbones("nafnet*") == [
        "nafnet",
        "nafnet-small",
        "nafnet-tiny",
        "nafnet-w32",
        "nafnet-w64",
    ]
    for family in list_presets():
        preset = get_preset(family)
        assert family in list_backbones() and f"{family}-tiny" in list_backbones()
        assert preset.dam_points and preset.builder and preset.module_classes


def test_nafnet_small_is_the_cpu_training_network():
    model = loraxir.create_backbone("nafnet-small")
    assert model.hyperparameters["width"] == 32
    assert model.hyperparameters["enc_blk_nums"] == [1, 1, 1, 2]
    assert model.hyperparameters["middle_blk_num"] == 1
    assert model.hyperparameters["dec_blk_nums"] == [1, 1, 1, 1]
    assert backbone_spec(model)["name"] == "nafnet-small"


def test_variant_overrides_keep_family_defaults_and_user_overrides_win():
    model = loraxir.create_backbone("nafnet-w64", middle_blk_num=2)
    assert model.hyperparameters["width"] == 64
    assert model.hyperparameters["enc_blk_nums"] == [1, 1, 1, 28]
    assert model.hyperparameters["middle_blk_num"] == 2


def test_importing_the_families_imports_no_network_code():
    code = (
        "import sys, loraxir.backbones as b; assert len(b.list_presets()) == 4; "
        "print(sorted(m for m in sys.modules if m.startswith('spandrel')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_unknown_names_and_bad_hyperparameters_are_clear_errors():
    with pytest.raises(UnknownNameError, match=r"Unknown backbone 'nafnet-w46'.*nafnet-w64"):
        loraxir.create_backbone("nafnet-w46")
    with pytest.raises(ConfigError, match=r"'nafnet-tiny' cannot be built.*given: depth=3"):
        loraxir.create_backbone("nafnet-tiny", depth=3)
    with pytest.raises(ConfigError, match=r"given: width='abc'.*defaults: \{'width': 32"):
        loraxir.create_backbone("nafnet", width="abc")
    # Values the constructors fail on inside torch (a float width, a list too short).
    with pytest.raises(ConfigError, match=r"given: width=8\.5.*ValueError"):
        loraxir.create_backbone("nafnet-tiny", width=8.5)
    with pytest.raises(ConfigError, match=r"'swinir-tiny' cannot be built.*IndexError"):
        loraxir.create_backbone("swinir-tiny", depths=[1, 1, 1])  # two num_heads
    with pytest.raises(loraxir.CheckpointError, match="No backbone at /no/such/net"):
        loraxir.load_backbone("/no/such/net")
    with pytest.raises(UnknownNameError, match=r"Unknown preset 'swinr'.*swinir"):
        get_preset("swinr")
    for call, message in [
        (lambda: loraxir.create_backbone(None), "takes a backbone name"),
        (lambda: loraxir.load_backbone(None), "takes a checkpoint file or a backbone folder"),
        (lambda: list_backbones(5), "pattern must be a shell-style string"),
        (lambda: list_presets(None), "pattern must be a shell-style string"),
        (lambda: register_preset("mynet"), r"takes a Preset\(name=.*got str"),
    ]:
        with pytest.raises(ConfigError, match=message):
            call()


@pytest.mark.parametrize("content", [[1, 2], "text", None, 3])
def test_a_pickle_that_holds_no_state_dict_is_a_checkpoint_error(tmp_path, content):
    torch.save(content, tmp_path / "odd.pth")
    with pytest.raises(loraxir.CheckpointError, match="holds no state dict"):
        loraxir.load_backbone(tmp_path / "odd.pth")


def test_a_preset_may_not_take_another_familys_backbone_names(monkeypatch):
    """create_backbone('nafnet-tiny') built the first family registered by that name."""
    monkeypatch.setattr(_registry, "_PRESETS", dict(_registry._PRESETS))
    mine = Preset(name="nafnet-tiny", target_modules=["body"], builder="torch.nn:Identity")
    with pytest.raises(ConfigError, match=r"\['nafnet-tiny'\] that another family"):
        register_preset(mine)
    register_preset(Preset(name="mine", target_modules=["body"], builder="torch.nn:Nothing"))
    with pytest.raises(ConfigError, match=r"names no class 'Nothing' in torch\.nn"):
        loraxir.create_backbone("mine")


def test_missing_restormer_extra_names_the_pip_extra(monkeypatch):
    for name in [m for m in sys.modules if m.startswith("spandrel_extra_arches")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "spandrel_extra_arches", None)
    with pytest.raises(ConfigError, match=r"loraxir\[restormer\].*NON-COMMERCIAL"):
        loraxir.create_backbone("restormer-tiny")


def test_user_presets_register_detect_and_refuse_duplicates(monkeypatch):
    monkeypatch.setattr(_registry, "_PRESETS", dict(_registry._PRESETS))

    class MyNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.body(x)

    preset = register_preset(
        Preset(name="mynet", target_modules=["body"], module_classes=("MyNet",))
    )
    assert detect_preset(MyNet()) is preset and "mynet" in list_presets("my*")
    assert "mynet" not in list_backbones()  # no builder: detection only
    with pytest.raises(ConfigError, match="already registered"):
        register_preset(Preset(name="mynet", target_modules=["body"]))
    model = loraxir.get_loraxir_model(MyNet(), LoraIRConfig(num_experts=2))
    assert [path for path, _ in model.expert_layers()] == ["body"]
    assert model.inference_chunk_pixels == loraxir.model.CPU_CHUNK_PIXELS
    # A preset's list may name layers some variants of the family lack: not a user's typo.
    register_preset(Preset(name="mynet2", target_modules=["body", "skip"], module_classes=()))
    variant = loraxir.get_loraxir_model(MyNet(), LoraIRConfig(num_experts=2, preset="mynet2"))
    assert [path for path, _ in variant.expert_layers()] == ["body"]


def test_a_user_preset_with_side_multiple_1_passes_inputs_as_they_are(monkeypatch):
    """A network of one's own declaring a ``window_size`` is otherwise reflect-padded."""
    monkeypatch.setattr(_registry, "_PRESETS", dict(_registry._PRESETS))

    class Windowed(torch.nn.Module):
        window_size = 8

        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Conv2d(3, 3, 3, padding=1, padding_mode="zeros")

        def forward(self, x):
            return self.body(x)

    net, x = Windowed(), torch.rand(1, 3, 13, 17)
    with torch.no_grad():
        expected = net(x)
        plain = LoraIRConfig(num_experts=2, target_modules=["body"])
        padded = loraxir.get_loraxir_model(copy.deepcopy(net), plain)
        assert not torch.equal(padded(x, gates=torch.tensor([[1.0, 0]])), expected)
        register_preset(Preset(name="windowed", target_modules=["body"],
                               module_classes=("Windowed",), side_multiple=1))  # fmt: skip
        model = loraxir.get_loraxir_model(copy.deepcopy(net), LoraIRConfig(num_experts=2))
        assert torch.equal(model(x, gates=torch.tensor([[1.0, 0]])), expected)

    class Undetected(Windowed):  # no preset detects it: only the one the config names
        pass

    register_preset(Preset(name="named", target_modules=["body"], side_multiple=1))
    other = Undetected()
    other.load_state_dict(net.state_dict())
    with torch.no_grad():
        named = loraxir.get_loraxir_model(other, LoraIRConfig(num_experts=2, preset="named"))
        assert torch.equal(named(x, gates=torch.tensor([[1.0, 0]])), expected)
    for bad in (0, -8, 2.5, "8", True):
        with pytest.raises(ConfigError, match="side_multiple must be a positive int"):
            Preset(name="bad", target_modules=["body"], side_multiple=bad)
    with pytest.raises(ConfigError, match="'module:Class'"):
        Preset(name="bad", target_modules=["body"], builder="mynet.MyNet")


def test_a_named_preset_without_a_side_multiple_keeps_the_familys_padding(monkeypatch):
    """Restormer needs sides that are multiples of 8: a preset naming only targets must
    not drop that."""
    monkeypatch.setattr(_registry, "_PRESETS", dict(_registry._PRESETS))
    register_preset(Preset(name="qkv-only", target_modules=r".*\.qkv"))
    backbone = loraxir.create_backbone("restormer-tiny")
    model = loraxir.get_loraxir_model(backbone, LoraIRConfig(num_experts=2, preset="qkv-only"))
    with torch.no_grad():
        assert model(torch.rand(1, 3, 24, 30), gates=torch.tensor([[1.0, 0]])).shape[-2:] == (
            24,
            30,
        )


def test_a_user_preset_named_in_the_config_sets_the_cpu_chunk(monkeypatch):
    """``cpu_chunk_pixels`` follows the preset the config names, not only a detected one,
    and a value that is not a positive int is refused when the preset is made."""
    monkeypatch.setattr(_registry, "_PRESETS", dict(_registry._PRESETS))
    nafnet = _registry.get_preset("nafnet")
    register_preset(Preset(name="chunky", target_modules=nafnet.target_modules,
                           cpu_chunk_pixels=4096))  # fmt: skip
    backbone = loraxir.create_backbone("nafnet-tiny")
    model = loraxir.get_loraxir_model(backbone, LoraIRConfig(num_experts=2, preset="chunky"))
    assert model.inference_chunk_pixels == 4096
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match="cpu_chunk_pixels must be a positive int"):
            Preset(name="bad", target_modules=["body"], cpu_chunk_pixels=bad)


def test_saved_backbone_folder_rebuilds_the_network_and_spandrel_reads_its_weights(tmp_path):
    from safetensors.torch import load_file
    from spandrel import ModelLoader

    original = loraxir.create_backbone("nafnet-tiny", width=16).eval()
    save_backbone(original, tmp_path / "net")
    restored = loraxir.load_backbone(tmp_path / "net").eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(restored(x), original(x))
    weights = load_file(tmp_path / "net" / "backbone.safetensors")
    assert weights.keys() == original.state_dict().keys()
    descriptor = ModelLoader().load_from_state_dict(weights)
    assert descriptor.architecture.id == "NAFNet"
    assert backbone_spec(restored) == backbone_spec(original)


def test_a_spandrel_network_of_an_unlisted_class_is_recognised_by_its_architecture_id():
    """A subclass loraxir does not list (a user's tweak of NAFNet) still gets the preset,
    from the architecture id spandrel detected, through from_descriptor and get_loraxir_model."""
    from spandrel import ModelLoader

    weights = loraxir.create_backbone("nafnet-tiny").state_dict()
    descriptor = ModelLoader().load_from_state_dict(weights)
    descriptor.model.__class__ = type("TweakedNet", (type(descriptor.model),), {})
    assert detect_preset(descriptor.model) is None
    assert detect_preset(from_descriptor(descriptor)).name == "nafnet"
    assert backbone_spec(descriptor.model) is None  # not built by name: nothing to rebuild from
    descriptor = ModelLoader().load_from_state_dict(weights)
    descriptor.model.__class__ = type("TweakedNet", (type(descriptor.model),), {})
    model = loraxir.get_loraxir_model(descriptor, LoraIRConfig(num_experts=2))
    reference = loraxir.get_loraxir_model(
        loraxir.create_backbone("nafnet-tiny"), LoraIRConfig(num_experts=2)
    )
    assert [n for n, _ in model.expert_layers()] == [n for n, _ in reference.expert_layers()]


def test_backbone_saving_refuses_expert_layers_and_loading_needs_a_description(tmp_path):
    model = loraxir.get_loraxir_model(
        loraxir.create_backbone("nafnet-tiny"), LoraIRConfig(num_experts=2)
    )
    with pytest.raises(ConfigError, match="carries expert layers"):
        save_backbone(model.model, tmp_path / "net")
    (tmp_path / "empty").mkdir()
    with pytest.raises(loraxir.CheckpointError, match=r"without backbone\.json"):
        loraxir.load_backbone(tmp_path / "empty")


@pytest.mark.parametrize(
    ("old", "new"),
    [("loraxir.registry", "loraxir.backbones"), ("loraxir.encoders", "loraxir.router.encoders")],
)
def test_moved_modules_name_their_new_home(old, new):
    import importlib

    sys.modules.pop(old, None)
    with pytest.raises(ImportError, match=new.replace(".", r"\.")):
        importlib.import_module(old)
