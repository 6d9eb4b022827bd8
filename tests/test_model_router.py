"""A router plugged into the model: self-routing, save/load with the adapter, growth."""

from __future__ import annotations

import pytest
import torch

import loraxir
from loraxir import ConfigError, LoraIRConfig
from loraxir.layers import LoraIRLayer
from loraxir.router import DegradationRouter
from tests.conftest import randomize_experts

DEGRADATIONS = ["noise", "rain", "haze"]
X = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(2))


def _backbone():
    torch.manual_seed(7)
    return loraxir.create_backbone("nafnet-tiny").eval()


def _router(**options):
    torch.manual_seed(8)
    return DegradationRouter.from_encoder("cnn-tiny", degradations=DEGRADATIONS, **options).eval()


def _model(router=None, **config):
    model = loraxir.get_loraxir_model(
        _backbone(), LoraIRConfig(degradations=DEGRADATIONS, **config), router=router or _router()
    ).eval()
    randomize_experts(model)
    return model


def test_model_with_router_equals_model_with_router_gates():
    model = _model()
    with torch.no_grad():
        gates = model.loraxir_router(X)
        routed = model(X)
        assert torch.equal(model.last_routing, gates)
        assert torch.equal(routed, model(X, gates=gates))


def test_explicit_gates_and_names_override_the_router():
    model = _model()
    with torch.no_grad():
        by_name = model(X, degradation="haze")
        assert torch.equal(model.last_routing, torch.tensor([[0.0, 0, 1]] * 3))
        assert torch.equal(by_name, model(X, gates=torch.tensor([0.0, 0, 1])))


def test_router_classes_and_top_k_must_match_the_adapter():
    with pytest.raises(ConfigError, match=r"Router classes .*differ.*another order"):
        loraxir.get_loraxir_model(
            _backbone(),
            LoraIRConfig(degradations=["rain", "noise", "haze"]),
            router=_router(),
        )
    with pytest.raises(ConfigError, match=r"router\.top_k=2 but config\.top_k=1"):
        loraxir.get_loraxir_model(
            _backbone(), LoraIRConfig(degradations=DEGRADATIONS), router=_router(top_k=2)
        )


def test_router_is_frozen_unless_policy_trains_it():
    frozen = _model()
    assert not any(p.requires_grad for p in frozen.loraxir_router.parameters())
    joint = _model(router=_router(), trainable="experts+router")
    trained = {n for n, p in joint.loraxir_router.named_parameters() if p.requires_grad}
    assert trained and trained <= set(joint.loraxir_router.adapter_state_dict())
    joint.train()
    loss = joint(X).square().mean()
    loss.backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in joint.loraxir_router.parameters()
    )


def test_save_load_with_router_gives_identical_routing_and_output(tmp_path):
    model = _model()
    with torch.no_grad():
        expected = model(X)
        gates = model.last_routing
    model.save_pretrained(tmp_path / "a")
    loaded = loraxir.LoraIRModel.from_pretrained(_backbone(), tmp_path / "a")
    assert loaded.config.router.degradations == DEGRADATIONS
    with torch.no_grad():
        assert torch.equal(loaded(X), expected)
    assert torch.equal(loaded.last_routing, gates)


def test_add_degradation_grows_router_and_keeps_old_outputs():
    model = _model()
    with torch.no_grad():
        before = model(X, degradation=["noise", "rain", "haze"])
    model.add_degradation("snow")
    assert model.loraxir_router.degradations == [*DEGRADATIONS, "snow"]
    with torch.no_grad():
        assert model(X).shape == X.shape
        assert model.last_routing.shape == (3, 4)
        assert torch.equal(model(X, degradation=["noise", "rain", "haze"]), before)


def test_peft_round_trip_keeps_router_weights(tmp_path):
    import peft

    model = _model()
    with torch.no_grad():
        expected = model(X)
    model.save_pretrained(tmp_path / "a")
    peft_model = peft.PeftModel.from_pretrained(_backbone(), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(peft_model(X), expected)
        with pytest.raises(loraxir.RoutingError, match="without gates"):
            peft_model.get_base_model()(X)  # the router's gates lived for that call only
    peft_model.save_pretrained(tmp_path / "b")
    again = loraxir.LoraIRModel.from_pretrained(_backbone(), tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(again(X), expected)


def test_a_router_top_k_changed_after_attaching_is_saved_as_it_runs(tmp_path):
    model = _model()
    model.loraxir_router.top_k = 2
    with torch.no_grad():
        expected = model(X)
    assert (model.last_routing > 0).sum(dim=1).tolist() == [2, 2, 2]
    model.save_pretrained(tmp_path / "a")
    again = loraxir.LoraIRModel.from_pretrained(_backbone(), tmp_path / "a")
    assert again.config.top_k == 2
    with torch.no_grad():
        assert torch.equal(again(X), expected)


def _reordered_router():
    torch.manual_seed(8)
    return DegradationRouter.from_encoder("cnn-tiny", degradations=["rain", "noise", "haze"])


def test_router_in_another_order_is_refused_before_the_backbone_is_touched(tmp_path):
    backbone = _backbone()
    config = LoraIRConfig(degradations=DEGRADATIONS)
    with pytest.raises(ConfigError, match="another order"):
        loraxir.get_loraxir_model(backbone, config, router=_reordered_router())
    assert not any(isinstance(m, LoraIRLayer) for m in backbone.modules())
    assert len(list(loraxir.get_loraxir_model(backbone, config).expert_layers())) == 36

    _model().save_pretrained(tmp_path / "a")
    backbone = _backbone()
    router = _reordered_router()
    router_state = {k: v.clone() for k, v in router.state_dict().items()}
    with pytest.raises(ConfigError, match="another order"):
        loraxir.LoraIRModel.from_pretrained(backbone, tmp_path / "a", router=router)
    assert not any(isinstance(m, LoraIRLayer) for m in backbone.modules())
    assert all(torch.equal(v, router_state[k]) for k, v in router.state_dict().items())
    with torch.no_grad():
        assert loraxir.LoraIRModel.from_pretrained(backbone, tmp_path / "a")(X).shape == X.shape
