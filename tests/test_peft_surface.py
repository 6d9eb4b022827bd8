"""peft's model API on loraxir adapters: disabling adapters, several adapters on one
backbone, switching the active one, and the operations loraxir refuses."""

from __future__ import annotations

import peft
import pytest
import torch

import loraxir
from loraxir import ConfigError, DAMConfig, LoraIRConfig, RoutingError
from loraxir.router import DegradationRouter
from tests.conftest import randomize_experts

DEGRADATIONS = ["noise", "rain", "haze"]
X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return loraxir.create_backbone("nafnet-tiny").eval()


def _guided_peft_model() -> peft.PeftModel:
    """Experts, DAM blocks that change the output, and a router."""
    torch.manual_seed(1)
    router = DegradationRouter.from_encoder("cnn-tiny", DEGRADATIONS, image_size=16)
    config = LoraIRConfig(degradations=DEGRADATIONS, dam=DAMConfig(embed_dim=router.embed_dim))
    model = peft.get_peft_model(_backbone(), config)
    model.base_model.attach_router(router)
    randomize_experts(model.base_model)
    for block in model.base_model.model.loraxir_dam.values():
        torch.nn.init.normal_(block.beta, std=0.3)
    return model.eval()


def test_disabled_adapters_run_the_bare_backbone_dam_blocks_and_merges_included() -> None:
    with torch.no_grad():
        bare = _backbone()(X)
        model = _guided_peft_model()
        adapted = model(X)
        assert not torch.allclose(adapted, bare, atol=1e-3)
        with model.disable_adapter():
            assert torch.equal(model(X), bare)
        assert torch.equal(model(X), adapted), "enabled again"
        model.base_model.merge(degradation="rain")
        forced = model.base_model(X, degradation="rain")
        with model.disable_adapter():  # takes the merged experts out, as peft's LoRA does
            assert torch.equal(model(X), bare)
        assert not model.base_model.merged
        torch.testing.assert_close(model.base_model(X, degradation="rain"), forced)
        model.base_model.disable_adapter_layers()  # the same, without a context manager
        assert torch.equal(model(X), bare)
        model.base_model.enable_adapter_layers()
        assert torch.equal(model(X), adapted)


def _two_saved_adapters(folder, config: LoraIRConfig, degradation: str) -> dict[str, torch.Tensor]:
    """Adapters "a" and "b" (other random experts) saved under ``folder``; their outputs."""
    outputs = {}
    for name, seed in (("a", 1), ("b", 2)):
        single = loraxir.get_loraxir_model(_backbone(), config).eval()
        torch.manual_seed(seed)
        randomize_experts(single)
        single.save_pretrained(folder / name)
        with torch.no_grad():
            outputs[name] = single(X, degradation=degradation)
    return outputs


def test_a_second_adapter_switches_exactly_and_one_with_dam_or_a_router_is_refused(
    tmp_path,
) -> None:
    plain = LoraIRConfig(degradations=DEGRADATIONS)
    outputs = _two_saved_adapters(tmp_path, plain, "haze")
    model = peft.PeftModel.from_pretrained(_backbone(), tmp_path / "a").eval()
    model.load_adapter(tmp_path / "b", adapter_name="b")
    with torch.no_grad(), loraxir.route(model, degradation="haze"):
        assert torch.equal(model(X), outputs["a"])
        model.set_adapter("b")
        assert torch.equal(model(X), outputs["b"])
    guided = _guided_peft_model()
    with torch.no_grad():
        before = guided(X)
    others = [LoraIRConfig(degradations=DEGRADATIONS, target_modules=t) for t in (["intro"], ["x"])]
    for config in (plain, *others):
        with pytest.raises(ConfigError, match="second adapter"):
            (model if config.target_modules else guided).add_adapter("c", config)
    assert list(guided.peft_config) == ["default"] and list(model.peft_config) == ["default", "b"]
    model.add_adapter("c", LoraIRConfig(degradations=DEGRADATIONS, preset="nafnet"))  # the same
    with torch.no_grad():
        assert torch.equal(guided(X), before), "the refused adapter changed nothing"


def test_an_adapter_loaded_again_under_its_name_runs_its_own_weights(tmp_path) -> None:
    """Folds kept for a deleted adapter must not serve the one loaded under its name."""
    config = LoraIRConfig(degradations=DEGRADATIONS)
    outputs = _two_saved_adapters(tmp_path, config, "rain")
    model = peft.get_peft_model(_backbone(), config).eval()
    for name, trainable in (("a", False), ("b", True)):  # a trainable load does not call eval()
        if "second" in model.peft_config:
            model.set_adapter("default")
            model.delete_adapter("second")
        model.load_adapter(tmp_path / name, adapter_name="second", is_trainable=trainable)
        model.set_adapter("second")
        with torch.no_grad():
            assert torch.equal(model.base_model(X, degradation="rain"), outputs[name]), name


def test_switching_adapters_keeps_each_ones_trainable_policy() -> None:
    model = peft.get_peft_model(_backbone(), LoraIRConfig(degradations=DEGRADATIONS))
    model.base_model.add_degradation("snow")  # trainable: new_experts
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith((".A.1", ".B.1")) for n in trained), "the new expert"
    model.add_adapter("full", LoraIRConfig(degradations=DEGRADATIONS, trainable="all"))
    model.set_adapter("full")
    assert any(p.requires_grad for n, p in model.named_parameters() if "loraxir" not in n)
    model.set_adapter("default")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained


def test_each_adapter_runs_its_own_compute_form_and_tuned_choice() -> None:
    """A layer kept the first adapter's form: a second adapter with dropout ("auto", which
    takes a dropout form) was refused as if it had asked for "weight"."""
    wrapped = peft.get_peft_model(
        _backbone(), LoraIRConfig(degradations=DEGRADATIONS, compute="weight")
    )
    model = wrapped.base_model
    model.set_compute_choice({"inference": "batched"})
    wrapped.add_adapter("drop", LoraIRConfig(degradations=DEGRADATIONS, lora_dropout=0.1))
    wrapped.set_adapter("drop")
    assert model.compute_choice() == {}
    model.train()(X, degradation="rain").mean().backward()  # dropout applies
    wrapped.set_adapter("default")
    assert model.compute_choice() == {"inference": "batched"}
    layers = [layer for _, layer in model.expert_layers()]
    assert {layer.compute for layer in layers} == {"weight"}


def test_a_half_precision_network_through_peft_keeps_its_experts_dtype() -> None:
    """peft upcast the experts to float32 beside bf16 weights, and the first call failed
    inside torch."""
    network = _backbone().to(torch.bfloat16)
    model = peft.get_peft_model(network, LoraIRConfig(degradations=DEGRADATIONS))
    randomize_experts(model.base_model)
    assert {p.dtype for n, p in model.named_parameters() if "loraxir_experts" in n} == {
        torch.bfloat16
    }
    with torch.no_grad(), loraxir.route(model.base_model, degradation="rain"):
        assert model(X.bfloat16()).dtype == torch.bfloat16


def test_unsupported_peft_operations_are_refused_by_name() -> None:
    model = loraxir.get_loraxir_model(_backbone(), LoraIRConfig(degradations=DEGRADATIONS))
    with pytest.raises(ConfigError, match="add_weighted_adapter is not supported"):
        model.add_weighted_adapter(["default"], [1.0], "mix")
    model.merge(degradation="noise")
    model.unmerge_adapter()  # peft's name: the merged gate goes with the merge
    assert not model.merged
    with pytest.raises(RoutingError, match="fixed gate"):
        model.merge_adapter()


def test_peft_saves_the_router_as_it_runs_and_both_loaders_read_it(tmp_path) -> None:
    """peft's save_pretrained wrote the config as it was before the router was attached
    (no router: the folder would not load) or grown (its old classes: refused)."""
    model = _guided_peft_model()
    with torch.no_grad():
        routed = model(X)
    model.save_pretrained(tmp_path / "attached")
    model.base_model.add_degradation("snow")
    randomize_experts(model.base_model)
    with torch.no_grad():
        grown = model(X)
    model.save_pretrained(tmp_path / "grown")
    for folder, expected in (("attached", routed), ("grown", grown)):
        ours = loraxir.LoraIRModel.from_pretrained(_backbone(), str(tmp_path / folder))
        theirs = peft.PeftModel.from_pretrained(_backbone(), str(tmp_path / folder)).eval()
        with torch.no_grad():
            assert torch.equal(ours(X), expected), folder
            assert torch.equal(theirs(X), expected), folder


def test_growing_a_second_adapter_leaves_the_first_adapters_router_alone(tmp_path) -> None:
    model = peft.get_peft_model(_backbone(), LoraIRConfig(degradations=DEGRADATIONS))
    torch.manual_seed(1)  # no DAM: a second adapter may join
    model.base_model.attach_router(DegradationRouter.from_encoder("cnn-tiny", DEGRADATIONS))
    model.save_pretrained(tmp_path / "first")
    model = peft.PeftModel.from_pretrained(_backbone(), str(tmp_path / "first"), is_trainable=True)
    model.add_adapter("b", LoraIRConfig(degradations=["x", "y"]))
    model.set_adapter("b")
    model.base_model.add_degradation("z")
    assert model.base_model.degradations == ["x", "y", "z"]
    assert model.base_model.loraxir_router.degradations == DEGRADATIONS
    model.set_adapter("default")
    with torch.no_grad():
        model.base_model(X)  # raised: the router had grown a class "default" lacks
    model.base_model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "adapter_config.json").read_text().count('"router": {') == 1


def test_a_degradation_added_to_a_frozen_peft_load_trains(tmp_path) -> None:
    """peft's frozen load (inference_mode) froze the new expert too: backward then failed
    deep in torch; loraxir's own frozen load trained it."""
    _guided_peft_model().save_pretrained(tmp_path / "adapter")
    model = peft.PeftModel.from_pretrained(_backbone(), str(tmp_path / "adapter"))
    model.base_model.add_degradation("snow")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".loraxir_experts." in n for n in trainable)
    model.base_model(X, degradation="snow").mean().backward()


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        ("drop DAM beta", "BackboneMismatchError"),
        ("drop router head", "CheckpointError"),
        ("config dam null", "CheckpointError"),
        ("config r 3", "CheckpointError"),  # the config named, not the backbone
    ],
)
def test_peft_refuses_a_damaged_folder_before_touching_the_backbone(tmp_path, damage, error):
    """peft builds the model from the config, then loads the weights with strict=False: a
    missing DAM or router tensor, or DAM tensors of a config without DAM, loaded in
    silence (outputs off by 0.5), and another rank failed deep in torch, leaving the
    backbone wrapped. It now gets the checks loraxir's own loader makes."""
    import json

    from safetensors.torch import load_file, save_file

    _guided_peft_model().save_pretrained(tmp_path)
    weights, config = tmp_path / "adapter_model.safetensors", tmp_path / "adapter_config.json"
    tensors, saved = load_file(weights), json.loads(config.read_text())
    if damage.startswith("drop"):
        part = "loraxir_dam." if "DAM" in damage else "loraxir_router.head."
        save_file({k: v for k, v in tensors.items() if part not in k or "bias" in k}, weights)
    else:
        saved.update(dam=None) if "dam" in damage else saved.update(r=3)
        config.write_text(json.dumps(saved))
    for load in (loraxir.LoraIRModel.from_pretrained, peft.PeftModel.from_pretrained):
        backbone = _backbone()
        with pytest.raises(getattr(loraxir, error)):
            load(backbone, str(tmp_path))
        assert not any("loraxir" in name for name, _ in backbone.named_modules()), load
        assert not hasattr(backbone, "peft_config"), load


def test_a_damaged_second_adapter_is_taken_out_again(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    plain = LoraIRConfig(degradations=DEGRADATIONS)
    for name in ("a", "b"):
        model = loraxir.get_loraxir_model(_backbone(), plain)
        randomize_experts(model)
        model.save_pretrained(str(tmp_path / name))
    weights = tmp_path / "b" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file(dict(list(tensors.items())[1:]), weights)  # one expert tensor lost
    model = peft.PeftModel.from_pretrained(_backbone(), str(tmp_path / "a")).eval()
    with torch.no_grad():
        before = model.base_model(X, degradation="rain")
    with pytest.raises(loraxir.BackboneMismatchError, match="missing"):
        model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    assert list(model.peft_config) == ["default"]
    with torch.no_grad():
        assert torch.equal(model.base_model(X, degradation="rain"), before)


def test_peft_loads_that_must_not_be_refused(tmp_path) -> None:
    """The load check of peft's path: a second adapter of the router's classes brings no
    router tensors, a model's own state dict with fitted class embeddings loads back into
    it, and a refusal of an adapter already in use leaves it in place."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    routed = peft.get_peft_model(_backbone(), LoraIRConfig(degradations=DEGRADATIONS))
    torch.manual_seed(1)
    routed.base_model.attach_router(DegradationRouter.from_encoder("cnn-tiny", DEGRADATIONS))
    routed.save_pretrained(tmp_path / "routed")
    loraxir.get_loraxir_model(_backbone(), LoraIRConfig(degradations=DEGRADATIONS)).save_pretrained(
        str(tmp_path / "plain")
    )
    model = peft.PeftModel.from_pretrained(_backbone(), str(tmp_path / "routed"))
    model.load_adapter(str(tmp_path / "plain"), adapter_name="b")
    assert list(model.peft_config) == ["default", "b"]
    rebuilt = peft.get_peft_model(_backbone(), LoraIRConfig(degradations=DEGRADATIONS))
    torch.manual_seed(2)  # a router attached to a config that does not record it yet
    rebuilt.base_model.attach_router(DegradationRouter.from_encoder("cnn-tiny", DEGRADATIONS))
    set_peft_model_state_dict(rebuilt, get_peft_model_state_dict(routed))
    with torch.no_grad():
        assert torch.equal(rebuilt(X), routed(X))

    guided = _guided_peft_model()
    guided.base_model.loraxir_router.fit_class_embeddings(
        [(torch.rand(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2]))]
    )
    with torch.no_grad():
        before = guided(X)
    state = get_peft_model_state_dict(guided)
    set_peft_model_state_dict(guided, state)
    damaged = {k: v for k, v in state.items() if "loraxir_dam" not in k}
    with pytest.raises(loraxir.BackboneMismatchError, match="missing"):
        set_peft_model_state_dict(guided, damaged)
    with torch.no_grad():
        assert torch.equal(guided(X), before)


def test_low_cpu_mem_usage_is_refused_by_name(tmp_path) -> None:
    _guided_peft_model().save_pretrained(tmp_path)
    backbone = _backbone()
    with pytest.raises(ConfigError, match="low_cpu_mem_usage=True is not supported"):
        peft.PeftModel.from_pretrained(backbone, str(tmp_path), low_cpu_mem_usage=True)
    assert not any("loraxir" in name for name, _ in backbone.named_modules())


@pytest.mark.parametrize("name", ["A", "B", "0", "intro", "ending", "weight", "bias", "model"])
def test_an_adapter_name_that_is_part_of_the_tensor_names_is_refused(name) -> None:
    """peft's save_pretrained of 'default' beside an adapter named A kept 36 of its 72
    tensors (beside '0', none), and neither loader read the folder back."""
    model = peft.get_peft_model(_backbone(), LoraIRConfig(degradations=DEGRADATIONS))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=f"adapter_name '{name}' is also a part of the model"):
        model.add_adapter(name, LoraIRConfig(degradations=DEGRADATIONS))
    assert list(model.peft_config) == ["default"]
    assert model.state_dict().keys() == before.keys()


def test_a_router_whose_tensor_names_hold_an_adapter_name_is_refused() -> None:
    """Beside an adapter named head or encoder, the router's tensors were dropped from the
    first adapter's saved folder, which then did not load."""
    model = peft.get_peft_model(_backbone(), LoraIRConfig(degradations=DEGRADATIONS))
    model.add_adapter("head", LoraIRConfig(degradations=DEGRADATIONS))
    router = DegradationRouter.from_encoder("cnn-tiny", DEGRADATIONS, image_size=16)
    with pytest.raises(ConfigError, match=r"\['head'\] are also parts of the router's tensor"):
        model.base_model.attach_router(router)
    assert model.base_model.loraxir_router is None


def test_set_adapter_is_checked_before_it_changes_anything() -> None:
    """An unknown name raised a bare KeyError and left the model with it active; two names
    left both active; inside a route block, the pinned gates of one adapter's classes ran
    another's experts by position (or an IndexError deep in the fold)."""
    model = peft.get_peft_model(_backbone(), LoraIRConfig(degradations=DEGRADATIONS)).eval()
    model.add_adapter("pair", LoraIRConfig(degradations=["x", "y"]))
    tuner = model.base_model
    with pytest.raises(loraxir.UnknownNameError, match="Unknown adapter 'rain_adapter'"):
        tuner.set_adapter("rain_adapter")
    with pytest.raises(RoutingError, match="Exactly one adapter can be active"):
        tuner.set_adapter(["default", "pair"])
    assert tuner.active_adapters == ["default"]
    with torch.no_grad(), loraxir.route(model, degradation="rain"):
        with pytest.raises(RoutingError, match=r"route block is open.*not 'pair''s \['x', 'y'\]"):
            model.set_adapter("pair")
        assert tuner.active_adapters == ["default"]
    model.set_adapter("pair")  # outside the block
    assert tuner.active_adapters == ["pair"]


def test_a_second_adapter_beside_the_router_saves_plain_and_loads_back(tmp_path) -> None:
    """Saved with the first adapter's router in its config, it was refused on loading as
    a second adapter ('cannot bring a router')."""
    torch.manual_seed(1)
    router = DegradationRouter.from_encoder("cnn-tiny", DEGRADATIONS, image_size=16)
    model = peft.get_peft_model(_backbone(), LoraIRConfig(degradations=DEGRADATIONS))
    model.base_model.attach_router(router)
    model.add_adapter("b", LoraIRConfig(degradations=DEGRADATIONS))
    randomize_experts(model.base_model)
    model.eval()
    model.save_pretrained(tmp_path)  # the first in tmp_path, the second in tmp_path / "b"
    with torch.no_grad(), loraxir.route(model, degradation="haze"):
        model.set_adapter("b")
        expected = model(X)
    saved = LoraIRConfig.from_file(tmp_path / "b" / "adapter_config.json")
    assert saved.router is None
    assert LoraIRConfig.from_file(tmp_path / "adapter_config.json").router is not None
    loaded = peft.PeftModel.from_pretrained(_backbone(), tmp_path).eval()
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    loaded.set_adapter("b")
    with torch.no_grad(), loraxir.route(loaded, degradation="haze"):
        assert torch.equal(loaded(X), expected)
