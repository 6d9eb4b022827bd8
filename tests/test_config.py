"""LoraIRConfig: validation errors that name the field, and an exact JSON round trip."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import loraxir
from loraxir import ConfigError, LoraIRConfig
from loraxir.router import DegradationRouter, RouterConfig

ROOT = Path(__file__).resolve().parents[1]


def test_num_experts_defaults_to_degradation_count_and_names_default():
    assert LoraIRConfig(degradations=["noise", "rain"]).num_experts == 2
    assert LoraIRConfig(num_experts=3).degradations == ["expert_0", "expert_1", "expert_2"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be an integer >= 1"),
        ({"r": -2}, "r must be an integer >= 1"),
        ({"r": 2.5}, "r must be an integer"),
        ({"lora_alpha": 0}, "lora_alpha must be a finite number > 0"),
        ({"top_k": 4}, "top_k=4 is larger than num_experts=3"),
        ({"top_k": 0}, "top_k must be an integer >= 1"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"trainable": "everything"}, "trainable must be one of 'experts', 'new_experts'"),
        ({"init": "xavier"}, "init must be one of 'default', 'gaussian'"),
        ({"compute": "fast"}, "compute must be one of 'auto'"),
        ({"num_experts": 4}, "num_experts=4 does not match the 3 degradations"),
        ({"target_modules": []}, "target_modules must be None, a regex string or a non-empty list"),
        ({"task_type": "CAUSAL_LM"}, "task_type must be None"),
    ],
)
def test_invalid_values_raise_config_error_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoraIRConfig(degradations=["noise", "rain", "haze"], **kwargs)


def test_degradations_must_be_unique_names():
    with pytest.raises(ConfigError, match="repeated"):
        LoraIRConfig(degradations=["noise", "noise"])
    with pytest.raises(ConfigError, match="Give the degradation class names"):
        LoraIRConfig()


def test_json_round_trip_is_exact(tmp_path):
    config = LoraIRConfig(
        degradations=["noise", "rain", "haze"],
        r=4,
        lora_alpha=8,
        top_k=2,
        target_modules=["conv1", "conv2"],
        exclude_modules="ending",
        lora_dropout=0.1,
        trainable="all",
        init="gaussian",
    )
    path = tmp_path / "adapter_config.json"
    path.write_text(config.to_json_string())
    loaded = LoraIRConfig.from_file(path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.peft_type == "LORAXIR"


def test_unknown_keys_from_another_version_are_named(tmp_path):
    data = LoraIRConfig(degradations=["noise"]).to_dict()
    data["expert_sharding"] = "rows"
    data["loraxir_version"] = "9.0.0"
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"\['expert_sharding'\].*loraxir 9.0.0.*strict=False"):
        LoraIRConfig.from_file(path)
    with pytest.warns(UserWarning, match="expert_sharding"):
        assert LoraIRConfig.from_file(path, strict=False).degradations == ["noise"]
    # Inside the router's and DAM blocks' configs too: strict=False covers them as well.
    from loraxir import DAMConfig
    from loraxir.router import RouterConfig

    router = RouterConfig(degradations=["noise"])
    dam = DAMConfig(embed_dim=router.embed_dim)
    nested = LoraIRConfig(degradations=["noise"], router=router, dam=dam).to_dict()
    nested["router"]["pooling_v3"] = "median"
    nested["dam"]["gain"] = 2.0
    path.write_text(json.dumps(nested))
    with pytest.raises(ConfigError, match=r"\['dam.gain', 'router.pooling_v3'\].*strict=False"):
        LoraIRConfig.from_file(path)
    with pytest.warns(UserWarning, match=r"\['dam.gain', 'router.pooling_v3'\].*ignored"):
        loaded = LoraIRConfig.from_file(path, strict=False)
    assert loaded.router == router and loaded.dam == dam


def test_corrupt_json_and_foreign_peft_type_are_refused(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LoraIRConfig.from_file(path)
    with pytest.raises(ConfigError, match="peft_type='LORA'"):
        LoraIRConfig.from_dict({"peft_type": "LORA", "r": 8})


def test_api_docs_list_every_field_with_its_help_and_every_public_name():
    from dataclasses import fields
    from pathlib import Path

    import loraxir

    api = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    for f in fields(LoraIRConfig):
        if f.name in {
            "base_model_name_or_path",
            "revision",
            "peft_type",
            "task_type",
            "inference_mode",
            "auto_mapping",
            "peft_version",
        }:
            continue
        assert f"| `{f.name}` |" in api and f.metadata["help"] in api, f.name
    for name in loraxir.__all__:
        if name != "__version__":
            assert name in api, name


def _router_config(**settings) -> RouterConfig:
    router = DegradationRouter.from_encoder(
        "cnn-tiny", ["noise", "rain", "haze"], image_size=16, hidden_dim=8, embed_dim=8, **settings
    )
    return router.to_config()


def test_router_is_typed_and_round_trips_exactly_through_json_and_peft(tmp_path):
    from peft import PeftConfig

    router = _router_config(top_k=2, temperature=3.0, views="resize")
    config = LoraIRConfig(degradations=["noise", "rain", "haze"], top_k=2, router=router)
    assert config.router is router
    from_json = LoraIRConfig.from_dict(json.loads(config.to_json_string()))
    assert isinstance(from_json.router, RouterConfig) and from_json.router == router
    assert from_json.to_dict() == config.to_dict()
    config.save_pretrained(str(tmp_path))
    from_peft = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(from_peft, LoraIRConfig) and from_peft.router == router
    with pytest.raises(ConfigError, match="router must be a RouterConfig"):
        LoraIRConfig(degradations=["noise"], router=["noise"])


def test_temperature_lives_in_the_router_only():
    with pytest.raises(ConfigError, match=r"router\.temperature = t.*RouterConfig"):
        LoraIRConfig(degradations=["noise"], temperature=0.5)
    with pytest.raises(AttributeError, match="belongs to the router"):
        _ = LoraIRConfig(degradations=["noise"]).temperature
    assert "temperature" not in LoraIRConfig(degradations=["noise"]).to_dict()


def test_adapter_configs_of_loraxir_0_1_with_a_dead_temperature_still_load(tmp_path):
    data = LoraIRConfig(degradations=["noise", "rain"]).to_dict()
    data["temperature"] = 0.1
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(data))
    assert LoraIRConfig.from_file(path).degradations == ["noise", "rain"]


def test_model_card_reports_the_temperature_the_gates_use(tmp_path):
    """Defect: the card printed LoraIRConfig.temperature (1) while the router used 3."""
    torch.manual_seed(0)
    router = DegradationRouter.from_encoder(
        "cnn-tiny", ["noise", "rain", "haze"], image_size=16, top_k=2, temperature=3.0
    )
    backbone = loraxir.create_backbone("nafnet-tiny")
    config = LoraIRConfig(degradations=["noise", "rain", "haze"], top_k=2)
    model = loraxir.get_loraxir_model(backbone, config, router=router).eval()
    images = torch.rand(2, 3, 32, 32)
    logits = router.logits(images).detach()
    top = logits.topk(2, dim=1)
    expected = torch.zeros_like(logits).scatter(1, top.indices, (top.values / 3.0).softmax(1))
    torch.testing.assert_close(router(images), expected)
    model.save_pretrained(str(tmp_path / "adapter"))
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "temperature 3" in card
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["router"]["temperature"] == 3.0 and "temperature" not in saved


@pytest.mark.parametrize("module", ["loraxir/config.py", "loraxir/router/config.py"])
def test_configs_import_nothing_of_the_method(module):
    """Like peft's configs: no layers, model, routing, router model or torch."""
    tree = ast.parse((ROOT / module).read_text())
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    allowed = {"loraxir", "loraxir.errors", "loraxir.validation", "loraxir.router.config"}
    method = {name for name in imported if name.startswith("loraxir")} - allowed
    assert not method, f"{module} imports {method}"
    assert not {name for name in imported if name.split(".")[0] == "torch"}
