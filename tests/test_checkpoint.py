"""Save/load: bit-identical round trips (ours and peft's), atomic writes, refused inputs."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch

import loraxir
from loraxir import CheckpointError, ConfigError, LoraIRConfig
from loraxir.layers import LoraIRLayer
from tests.conftest import randomize_experts

DEGRADATIONS = ["noise", "rain", "haze"]
X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def _backbone(name: str = "nafnet-tiny", **hyper):
    torch.manual_seed(123)  # the same base weights every time: the adapter is what differs
    return loraxir.create_backbone(name, **hyper).eval()


def _trained_model(**config):
    model = loraxir.get_loraxir_model(
        _backbone(), LoraIRConfig(degradations=DEGRADATIONS, **config)
    ).eval()
    randomize_experts(model)
    return model


def _outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X, degradation=["rain", "haze"])


def _base_state(backbone) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in backbone.state_dict().items()}


def test_save_writes_config_weights_and_model_card(tmp_path):
    model = _trained_model()
    model.save_pretrained(tmp_path / "adapter", metrics={"psnr_rain": 31.2})
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORAXIR" and config["degradations"] == DEGRADATIONS
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "noise, rain, haze" in card and "psnr_rain" in card


def test_saving_over_another_networks_folder_drops_its_backbone_and_metrics(tmp_path):
    """Adapter B saved into adapter A's folder kept A's backbone pair, so loading the
    folder ran B's experts on A's network, silently; A's metrics.json described it too."""
    from loraxir.backbones import save_backbone

    folder = tmp_path / "adapter"
    model = _trained_model()
    save_backbone(_backbone(), folder)
    model.save_pretrained(folder)
    (folder / "metrics.json").write_text('{"psnr_rain": 31.0}\n')
    with pytest.warns(UserWarning, match=r"drops its \['metrics.json'\]"):
        model.save_pretrained(folder)  # the same base, further trained experts: kept
    with torch.no_grad():
        loaded = loraxir.load_adapter(folder).eval()(X, degradation=["rain", "haze"])
    torch.testing.assert_close(loaded, _outputs(model))
    half = copy.deepcopy(model).to(torch.bfloat16)  # its base rounds to the saved one
    half.save_pretrained(folder)
    assert (folder / "backbone.safetensors").exists()
    other = _backbone()
    with torch.no_grad():
        other.intro.weight.add_(0.1)
    moved = loraxir.get_loraxir_model(other, LoraIRConfig(degradations=DEGRADATIONS)).eval()
    with pytest.warns(UserWarning, match=r"drops its \['backbone.json', 'backbone.safetensors'\]"):
        moved.save_pretrained(folder)
    assert not (folder / "backbone.safetensors").exists()
    with pytest.raises(CheckpointError, match=r"carries no backbone\.json"):
        loraxir.load_adapter(folder)


def test_saving_through_a_link_updates_the_folder_it_points_at(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data" / "adapter", target_is_directory=True)
    first = loraxir.get_loraxir_model(_backbone(), LoraIRConfig(degradations=DEGRADATIONS))
    second = _trained_model()
    assert not torch.equal(_outputs(first.eval()), _outputs(second))
    first.save_pretrained(tmp_path / "data" / "adapter")
    second.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "link"]
    with torch.no_grad():
        loaded = loraxir.load_adapter(tmp_path / "data" / "adapter", _backbone())
        torch.testing.assert_close(loaded.eval()(X, degradation=["rain", "haze"]), _outputs(second))


def test_saved_folders_are_readable_by_others_as_the_umask_allows(tmp_path):
    """Staging folders and safetensors files start private (0700 / 0600); a saved adapter
    gets a plain mkdir's and open's permissions."""
    import os

    mask = os.umask(0o022)
    try:
        _trained_model().save_pretrained(tmp_path / "adapter")
    finally:
        os.umask(mask)
    folder = tmp_path / "adapter"
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}


def test_saving_onto_a_file_path_is_a_checkpoint_error(tmp_path):
    model = _trained_model()
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        model.save_pretrained(tmp_path / "taken")
    with pytest.raises(CheckpointError, match=r"Cannot write .*: .* is a file"):
        model.save_pretrained(tmp_path / "taken" / "adapter")
    assert (tmp_path / "taken").read_text() == "mine"


def test_get_peft_model_trains_only_experts_and_refuses_gate_kwargs():
    peft_model = peft.get_peft_model(_backbone(), LoraIRConfig(degradations=DEGRADATIONS))
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all(".loraxir_experts." in n for n in names)
    with pytest.raises(loraxir.RoutingError, match=r"loraxir\.route"):
        peft_model(X, gates=torch.ones(2, 3))
    with pytest.raises(loraxir.RoutingError, match="No routing"):
        peft_model(X)


def test_grown_adapter_round_trips(tmp_path):
    model = _trained_model()
    model.add_degradation("snow")
    randomize_experts(model)
    with torch.no_grad():
        expected = model(X, degradation=["snow", "rain"])
    model.save_pretrained(tmp_path / "grown")
    loaded = loraxir.LoraIRModel.from_pretrained(_backbone(), tmp_path / "grown", is_trainable=True)
    with torch.no_grad():
        assert torch.equal(loaded(X, degradation=["snow", "rain"]), expected)
    assert loaded.config.expert_chunks == [3, 1]


def test_crash_mid_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = _trained_model()
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    randomize_experts(model)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(loraxir.checkpoint, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "ckpt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging left behind
    monkeypatch.undo()
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "notes.txt").read_text() == "mine"  # user files carried over


def test_saving_again_keeps_the_users_folders_and_leaves_no_old_copy_behind(tmp_path):
    model = _trained_model()
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "images").mkdir()
    (tmp_path / "ckpt" / "images" / "example.png").write_bytes(b"png")
    for _ in range(2):
        model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .ckpt.old-* copies
    assert (tmp_path / "ckpt" / "images" / "example.png").read_bytes() == b"png"


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_safetensors_is_refused_and_backbone_unchanged(tmp_path, damage):
    _trained_model().save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00" * 64)
    backbone = _backbone()
    state = _base_state(backbone)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        loraxir.LoraIRModel.from_pretrained(backbone, tmp_path / "a")
    assert not any(isinstance(m, LoraIRLayer) for m in backbone.modules())
    assert all(torch.equal(v, state[k]) for k, v in backbone.state_dict().items())


def test_other_backbone_shapes_name_first_mismatched_layer_and_leave_it_unchanged(tmp_path):
    _trained_model().save_pretrained(tmp_path / "a")
    wider = _backbone(width=16)
    state = _base_state(wider)
    with pytest.raises(
        loraxir.BackboneMismatchError,
        match=r"Layer 'intro' does not fit.*\(3, 8, 8\).*needs \(3, 16, 8\)",
    ):
        loraxir.LoraIRModel.from_pretrained(wider, tmp_path / "a")
    assert not any(isinstance(m, LoraIRLayer) for m in wider.modules())
    assert wider.state_dict().keys() == state.keys()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"r": 8}, r"layer 'intro' have rank 2, but adapter_config.json gives r=8.*\"r\": 2"),
        ({"r": None}, r"have rank 2, but adapter_config.json gives r=8: .* lacks 'r'"),
        (
            {"degradations": ["noise", "rain"], "num_experts": 2, "expert_chunks": [2]},
            r"'intro' holds 3 experts in a chunk, but adapter_config.json gives 2",
        ),
    ],
)
def test_a_hand_edited_config_is_named_not_blamed_on_the_backbone(tmp_path, edit, message):
    _trained_model(r=2).save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update({k: v for k, v in edit.items() if v is not None})
    for key in [k for k, v in edit.items() if v is None]:
        del config[key]
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as raised:
        loraxir.LoraIRModel.from_pretrained(_backbone(), tmp_path / "a")
    assert not isinstance(raised.value, loraxir.BackboneMismatchError)


def test_an_adapter_of_a_deeper_backbone_of_the_same_width_is_refused(tmp_path):
    """Every layer of the shallower network fits; the deeper one's extra experts would be
    dropped without a word."""
    deeper = loraxir.get_loraxir_model(
        _backbone(middle_blk_num=2), LoraIRConfig(degradations=DEGRADATIONS)
    )
    deeper.save_pretrained(tmp_path / "deep")
    backbone = _backbone()
    with pytest.raises(
        loraxir.BackboneMismatchError,
        match=r"tensors this backbone has no layer for.*middle_blks\.1",
    ):
        loraxir.LoraIRModel.from_pretrained(backbone, tmp_path / "deep")
    assert not any(isinstance(m, LoraIRLayer) for m in backbone.modules())


def test_pickle_adapters_are_refused(tmp_path):
    _trained_model().save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(CheckpointError, match=r"pickle.*safetensors only"):
        loraxir.LoraIRModel.from_pretrained(_backbone(), tmp_path / "a")
    with pytest.raises(CheckpointError, match="is a pickle file"):
        loraxir.LoraIRModel.from_pretrained(_backbone(), tmp_path / "a" / "adapter_model.bin")


def test_unknown_config_keys_and_offline_hub_ids_are_clear_errors(tmp_path):
    _trained_model().save_pretrained(tmp_path / "a")
    config_path = tmp_path / "a" / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["future_option"] = 1
    config_path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="future_option"):
        loraxir.LoraIRModel.from_pretrained(_backbone(), tmp_path / "a")
    with pytest.warns(UserWarning, match="future_option"):
        loraxir.LoraIRModel.from_pretrained(_backbone(), tmp_path / "a", strict=False)
    with pytest.raises(CheckpointError, match="offline"):
        loraxir.LoraIRModel.from_pretrained(_backbone(), "someone/not-cached-adapter")


def test_peft_loading_without_is_trainable_freezes_the_experts(tmp_path):
    """peft freezes an adapter loaded for inference; our policy turned the experts back on.
    loraxir's own loading freezes too, and a new class added after it still trains."""
    _trained_model().save_pretrained(tmp_path / "ours")
    grown = loraxir.LoraIRModel.from_pretrained(_backbone(), tmp_path / "ours")
    grown.add_degradation("snow")
    assert any(p.requires_grad for p in grown.parameters())
    frozen = peft.PeftModel.from_pretrained(_backbone(), tmp_path / "ours")
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = peft.PeftModel.from_pretrained(_backbone(), tmp_path / "ours", is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all(".loraxir_experts." in n for n in names)
    trainable.save_pretrained(tmp_path / "peft")  # written with inference_mode: true
    again = loraxir.LoraIRModel.from_pretrained(_backbone(), tmp_path / "peft", is_trainable=True)
    assert any(p.requires_grad for p in again.parameters())


def test_a_second_peft_adapter_is_saved_without_the_first_ones_router(tmp_path):
    from loraxir.router import DegradationRouter

    router = DegradationRouter.from_encoder("cnn-tiny", DEGRADATIONS, image_size=16, grid=0)
    model = loraxir.get_loraxir_model(_backbone(), LoraIRConfig(degradations=DEGRADATIONS), router)
    model.save_pretrained(tmp_path / "first")
    peft_model = peft.PeftModel.from_pretrained(_backbone(), tmp_path / "first")
    peft_model.add_adapter("second", LoraIRConfig(degradations=["rain", "haze"], r=2))
    peft_model.save_pretrained(tmp_path / "both")
    first = loraxir.LoraIRModel.from_pretrained(_backbone(), tmp_path / "both")
    assert first.loraxir_router is not None
    second = loraxir.LoraIRModel.from_pretrained(_backbone(), tmp_path / "both" / "second")
    assert second.loraxir_router is None and second.degradations == ["rain", "haze"]
    peft_model.base_model.save_pretrained(tmp_path / "ours", adapter_name="second")  # ours
    ours = loraxir.LoraIRModel.from_pretrained(_backbone(), tmp_path / "ours")
    assert ours.loraxir_router is None


def test_a_router_of_other_classes_than_the_active_adapter_is_named(tmp_path):
    from loraxir.router import DegradationRouter

    router = DegradationRouter.from_encoder("cnn-tiny", DEGRADATIONS, image_size=16, grid=0)
    peft_model = peft.get_peft_model(_backbone(), LoraIRConfig(degradations=DEGRADATIONS))
    peft_model.base_model.attach_router(router)
    peft_model.add_adapter("second", LoraIRConfig(degradations=["rain", "haze"], r=2))
    peft_model.set_adapter("second")
    with pytest.raises(loraxir.RoutingError, match=r"router gives gates for.*'second'"):
        peft_model(X)
