"""LoraIRModel: presets, routing, merge, training policy, growth, compile and checkpointing."""

from __future__ import annotations

import copy
import pickle
import re

import numpy as np
import pytest
import torch

import loraxir
from loraxir import (
    ConfigError,
    DAMConfig,
    DataError,
    LoraIRConfig,
    RoutingError,
    TargetModulesError,
    UnknownNameError,
)
from loraxir.compute import FORMS
from loraxir.layers import LoraIRLayer
from tests.conftest import randomize_experts, rel_err
from tests.model_tester import USER_UNET_CONFIG, UserUNet, reference_output

DEGRADATIONS = ["noise", "rain", "haze"]


def _model(name="nafnet-tiny", **config):
    backbone = loraxir.create_backbone(name)
    return loraxir.get_loraxir_model(backbone, LoraIRConfig(degradations=DEGRADATIONS, **config))


def _trained_model(**config):
    """An eval-mode model whose experts all change the output."""
    model = _model(**config).eval()
    randomize_experts(model)
    return model


def test_gates_degradation_names_and_one_hot_agree():
    model = _trained_model()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        by_name = model(x, degradation=["rain", "haze"])
        by_gate = model(x, gates=torch.tensor([[0.0, 1, 0], [0, 0, 1]]))
    assert torch.equal(by_name, by_gate)
    assert torch.equal(model.last_routing, torch.tensor([[0.0, 1, 0], [0, 0, 1]]))
    assert torch.equal(model.degradation_gates(["rain", "haze"]), model.last_routing)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({}, RoutingError, "No routing for this call"),
        ({"gates": torch.ones(2, 4)}, RoutingError, r"shape \(B=2, E=3\)"),
        ({"gates": torch.ones(2)}, RoutingError, r"\(or \(E,\) for all images\), got \(2,\)\."),
        ({"gates": -torch.ones(2, 3)}, RoutingError, "non-negative"),
        ({"gates": torch.full((2, 3), float("nan"))}, RoutingError, "NaN"),
        ({"degradation": "snow"}, UnknownNameError, "Unknown degradation 'snow'.*noise"),
        ({"degradation": ["rain"]}, RoutingError, "1 degradation names for a batch of 2"),
    ],
)
def test_bad_routing_raises_documented_error(kwargs, error, message):
    model = _model()
    with pytest.raises(error, match=message):
        model(torch.rand(2, 3, 32, 32), **kwargs)


def test_inference_refuses_nan_or_0_255_images_however_they_are_routed():
    """A given class or gates skip the router, which refuses such images: one NaN pixel
    came out as an all-NaN image (global pooling), 0-255 values as garbage. A network of
    one's own may take other ranges (normalised inputs), and is not checked."""
    model = _trained_model()
    x = torch.rand(1, 3, 32, 32)
    nan = x.clone()
    nan[0, 1, 5, 7] = float("nan")
    cases = ((nan, "NaN or infinite values"), (x * 255, r"got values in \[.*\]; divide 0-255"))
    with torch.no_grad():
        for images, message in cases:
            for routing in ({"degradation": "rain"}, {"gates": torch.tensor([[0.0, 1, 0]])}):
                with pytest.raises(DataError, match=message):
                    model(images, **routing)
        own = loraxir.get_loraxir_model(UserUNet(), LoraIRConfig(num_experts=2, **USER_UNET_CONFIG))
        assert own(x * 4 - 2, gates=torch.tensor([[1.0, 0.0]])).isfinite().all()


def test_deleting_the_last_adapter_leaves_a_model_that_says_what_to_do():
    model = _model().eval()
    x = torch.rand(1, 3, 32, 32)
    model.delete_adapter("default")
    with pytest.raises(RoutingError, match=r"No adapter is active.*unload\(\)"):
        model(x, degradation="rain")
    backbone = model.unload()
    assert not any(isinstance(m, LoraIRLayer) for m in backbone.modules())
    assert backbone(x).shape == x.shape


@pytest.mark.parametrize(
    ("images", "kwargs", "error", "message"),
    [
        (lambda: torch.rand(1, 3, 16, 16).numpy(), {}, loraxir.DataError, "torch.Tensor.*ndarray"),
        (
            lambda: [torch.rand(3, 16, 16), torch.rand(3, 8, 8)],
            {},
            loraxir.DataError,
            r"got list; stack images of one size .* one call each",
        ),
        (
            lambda: [np.zeros((16, 16, 3), np.uint8)],  # torch.stack would refuse arrays
            {},
            loraxir.DataError,
            r"got list; convert with torch\.from_numpy\(array\)\.permute\(2, 0, 1\)\[None\]"
            r"\.float\(\) / 255, each image",
        ),
        (  # a float batch needs neither a permute nor a / 255
            lambda: np.random.rand(1, 3, 16, 16).astype(np.float32),
            {},
            loraxir.DataError,
            r"got ndarray; convert with torch\.from_numpy\(array\)\.float\(\)\.$",
        ),
        (lambda: torch.zeros(1, 3, 16, 16, dtype=torch.uint8), {}, loraxir.DataError, "/ 255"),
        (lambda: torch.rand(1, 3, 16, 16).double(), {}, loraxir.DataError, "float64.*float32"),
        (
            lambda: torch.rand(3, 16, 16),
            {},
            loraxir.DataError,
            r"one image of shape \(3, 16, 16\).*x\[None\]",
        ),
        (lambda: torch.rand(1, 3, 16, 16), {"degradation": 1}, RoutingError, "neither a class"),
        (lambda: torch.rand(1, 1, 16, 16), {}, loraxir.DataError, r"3-channel.*got 1.*expand"),
        (lambda: torch.rand(1, 4, 16, 16), {}, loraxir.DataError, r"got 4 channels.*x\[:, :3\]"),
        (lambda: torch.rand(1, 2, 3, 16, 16), {}, loraxir.DataError, r"x\.flatten\(0, 1\)"),
    ],
)
def test_inputs_the_backbone_cannot_take_are_refused_up_front(images, kwargs, error, message):
    model = _model().eval()
    with pytest.raises(error, match=message):
        model(images(), **{"degradation": "rain", **kwargs})
    for routing in ("rain", ["rain", "noise"]):  # positional: meant as routing, not for NAFNet
        with pytest.raises(
            RoutingError, match=rf"model\(x, degradation={re.escape(repr(routing))}"
        ):
            model(torch.rand(2, 3, 16, 16), routing)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.rand(1, 3, 16, 16).bfloat16(), degradation="rain").shape[1] == 3


def test_target_names_match_whole_path_components():
    from loraxir.targeting import matches

    assert matches(["conv2"], "encoders.0.0.conv2") and matches(["0.conv2"], "encoders.0.0.conv2")
    assert not matches(["conv2"], "encoders.0.0.myconv2")  # a name, not a string suffix
    assert not matches(["conv"], "conv2") and matches(r".*conv\d", "body.conv2")


def test_merge_takes_one_gate_and_copies_inside_a_route_block_start_unpinned():
    """A copy kept the block's gates pinned for good (no block ever ends on it), so a copy
    made while another thread's Restorer ran restored every later image with them."""
    model = _trained_model()
    with pytest.raises(RoutingError, match="exactly one of gates"):
        model.merge(gates=torch.tensor([0.0, 1.0, 0.0]), degradation="rain")
    assert not model.merged
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad(), loraxir.route(model, degradation="rain"):
        copied = copy.deepcopy(model)
        expected = model.model(x)
    assert not copied.routing.pinned
    with torch.no_grad():
        with pytest.raises(RoutingError, match="not reused"):
            copied.model(x)
        with loraxir.route(copied, degradation="rain"):
            assert torch.equal(copied.model(x), expected)


def test_target_patterns_that_match_nothing_list_close_names():
    backbone = loraxir.create_backbone("nafnet-tiny")
    with pytest.raises(TargetModulesError, match=r"Closest module names.*conv"):
        loraxir.get_loraxir_model(
            backbone, LoraIRConfig(degradations=DEGRADATIONS, target_modules=["convv1"])
        )
    assert not any(isinstance(m, LoraIRLayer) for m in backbone.modules())
    with pytest.raises(TargetModulesError, match="no preset matches a Sequential"):
        loraxir.get_loraxir_model(
            torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3)), LoraIRConfig(num_experts=2)
        )
    with pytest.raises(ConfigError, match=r"'conv\[' is not a valid regular expression"):
        loraxir.get_loraxir_model(
            backbone, LoraIRConfig(degradations=DEGRADATIONS, target_modules="conv[")
        )
    assert not any(isinstance(m, LoraIRLayer) for m in backbone.modules())


@pytest.mark.parametrize("argument", ["target_modules", "exclude_modules"])
def test_a_listed_name_that_matches_nothing_is_refused_even_when_others_match(argument):
    """A typo in a list would otherwise wrap (or exclude) the other names without it."""
    net = torch.nn.Sequential()
    net.add_module("head", torch.nn.Conv2d(3, 8, 3))
    net.add_module("tail", torch.nn.Conv2d(8, 3, 3))
    names = {"target_modules": ["head", "tial"], "exclude_modules": ["tial"]}
    config = LoraIRConfig(num_experts=2, **{argument: names[argument]})
    if argument == "exclude_modules":
        config.target_modules = ["head", "tail"]
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(TargetModulesError, match=rf"{argument} names \['tial'\].*\['tail'\]"):
        loraxir.get_loraxir_model(net, config)
    assert not any(isinstance(m, LoraIRLayer) for m in net.modules())
    assert net.state_dict().keys() == before.keys()


@pytest.mark.parametrize("layer", [torch.nn.Conv3d(3, 3, 1), torch.nn.Conv1d(3, 3, 1)])
def test_a_regex_matching_only_an_unsupported_layer_names_its_type(layer):
    net = torch.nn.Sequential(layer, torch.nn.GELU())
    kind = type(layer).__name__
    with pytest.raises(
        TargetModulesError, match=rf"matched only layers.*'0' is a {kind}; experts attach to"
    ):
        loraxir.get_loraxir_model(net, LoraIRConfig(num_experts=2, target_modules="0"))


class _StandardisedConv(torch.nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, weight, self.bias)


def test_a_conv_subclass_named_as_a_target_is_refused_with_what_to_do():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), _StandardisedConv(8, 3, 3, padding=1))
    named = LoraIRConfig(num_experts=2, target_modules=["0", "1"])
    with pytest.raises(
        TargetModulesError, match=r"'1' is a _StandardisedConv, a subclass of Conv2d.*\['1'\]"
    ):
        loraxir.get_loraxir_model(net, named)
    model = loraxir.get_loraxir_model(net, LoraIRConfig(num_experts=2, target_modules=r".*"))
    assert [path for path, _ in model.expert_layers()] == ["0"]


class _TwoStages(torch.nn.Module):
    """An MPRNet-style network: one restored image per stage."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.c2 = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        first = x + self.c1(x)
        return {"stages": [first + self.c2(first), first]}


def test_a_network_with_several_outputs_runs_split_batches_as_one():
    model = loraxir.get_loraxir_model(
        _TwoStages(), LoraIRConfig(degradations=DEGRADATIONS, target_modules=["c1", "c2"])
    ).eval()
    randomize_experts(model)
    model.inference_chunk_pixels = 2 * 24 * 24  # two images per call
    x, names = torch.rand(5, 3, 24, 24), ["rain", "haze", "rain", "noise", "haze"]
    with torch.no_grad():
        out = model(x, degradation=names)["stages"]
        alone = [model(x[i : i + 1], degradation=names[i])["stages"] for i in range(5)]
    for stage in (0, 1):
        expected = torch.cat([image[stage] for image in alone])
        torch.testing.assert_close(out[stage], expected, rtol=0, atol=1e-6)


def _weight_normed() -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 3, 1))
    torch.nn.utils.weight_norm(net[0])
    return net


def _parametrized() -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 3, 1))
    torch.nn.utils.parametrizations.weight_norm(net[0])
    return net


def _one_conv_twice() -> torch.nn.Module:
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    return torch.nn.Sequential(conv, torch.nn.ReLU(), conv)


def _tied() -> torch.nn.Module:
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Conv2d(3, 3, 3, padding=1)
    )
    net[1].weight = net[0].weight
    return net


def _weightless() -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Conv2d(3, 3, 1))
    net[1].weight = None
    return net


def _quantized() -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Conv2d(3, 3, 1))
    net[1].weight = torch.nn.Parameter(net[1].weight.to(torch.int8), requires_grad=False)
    return net


@pytest.mark.parametrize(
    ("network", "message"),
    [
        (_weightless, r"'1' holds no weight.*exclude_modules=\['1'\]"),
        (_quantized, r"'1' holds a torch\.int8 weight.*Dequantize"),
        (_weight_normed, r"'0' has forward hooks \(WeightNorm\).*remove_weight_norm"),
        (_one_conv_twice, r"'0' is one module placed at \['0', '2'\].*copy\.deepcopy"),
        (_tied, r"'0' and '1' share one weight tensor"),
    ],
)
@pytest.mark.parametrize("by_name", [True, False])
def test_layers_whose_experts_would_compute_something_else_are_refused(network, message, by_name):
    """Experts skipped weight_norm's hook (outputs off by 1.1 when fresh), reached one of a
    module's two uses, or corrupted a tied weight on unmerge, silently; a layer without a
    float weight failed deep inside torch."""
    net = network()
    before = _plain_layers(net)
    convs = [path for path, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    config = LoraIRConfig(num_experts=2, target_modules=convs if by_name else r".*")
    with pytest.raises(TargetModulesError, match=message):
        loraxir.get_loraxir_model(net, config)
    assert _plain_layers(net) == before


class _SharedBlockLoop(torch.nn.Module):
    """One block applied three times (a recurrent restorer): its layer has one slot."""

    def __init__(self) -> None:
        super().__init__()
        block = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1))
        self.blocks = torch.nn.ModuleList([block, block, block])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_a_block_reused_in_a_loop_gets_experts_at_every_use():
    model = loraxir.get_loraxir_model(
        _SharedBlockLoop(), LoraIRConfig(num_experts=2, target_modules=r".*")
    ).eval()
    randomize_experts(model)
    x, gates = torch.rand(1, 3, 16, 16), torch.tensor([[0.0, 1.0]])
    with torch.no_grad():
        routed = model(x, gates=gates)
        plain = copy.deepcopy(model).merge_and_unload(gates=gates[0])
        torch.testing.assert_close(routed, plain(x), rtol=0, atol=1e-5)


def test_a_parametrized_layer_named_as_a_target_is_refused_and_a_regex_passes_it_by():
    with pytest.raises(TargetModulesError, match=r"'0' has parametrizations.*remove_param"):
        loraxir.get_loraxir_model(
            _parametrized(), LoraIRConfig(num_experts=2, target_modules=["0"])
        )
    model = loraxir.get_loraxir_model(
        _parametrized(), LoraIRConfig(num_experts=2, target_modules=r".*")
    )
    assert [path for path, _ in model.expert_layers()] == ["1"]


def _plain_layers(module: torch.nn.Module) -> list[str]:
    return [type(m).__name__ for m in module.modules()]


class _GroupedUp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inc = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.down = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2)
        self.outc = torch.nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outc(self.up(self.down(self.inc(x))))


def test_a_grouped_transposed_conv_is_refused_by_name_before_anything_changes():
    net = _GroupedUp()
    before = _plain_layers(net)
    named = LoraIRConfig(num_experts=2, target_modules=["inc", "down", "up", "outc"])
    with pytest.raises(TargetModulesError, match=r"groups=2.*exclude_modules=\['up'\]"):
        loraxir.get_loraxir_model(net, named)
    assert _plain_layers(net) == before
    with pytest.raises(TargetModulesError, match=r"matched only layers.*'up' is a ConvT.*=2"):
        loraxir.get_loraxir_model(net, LoraIRConfig(num_experts=2, target_modules=r"u."))
    model = loraxir.get_loraxir_model(net, LoraIRConfig(num_experts=2, target_modules=r".*"))
    assert [path for path, _ in model.expert_layers()] == ["inc", "down", "outc"]
    for targets in (["inc"], r".*"):  # a regex matched the inner base layers (peft's error)
        with pytest.raises(TargetModulesError, match=r"already carries loraxir experts"):
            loraxir.get_loraxir_model(
                model.model, LoraIRConfig(num_experts=2, target_modules=targets)
            )


@pytest.mark.parametrize("dam", [False, True])
def test_a_failure_during_injection_leaves_the_network_as_it_was(monkeypatch, dam):
    """Whatever fails part-way (here the third layer to wrap), the layers already wrapped
    and any DAM blocks inserted are taken out again: the network computes as before."""
    import loraxir.model as model_module
    from loraxir.config import DAMConfig

    backbone = loraxir.create_backbone("nafnet-tiny").eval()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = backbone(x)
    before = _plain_layers(backbone)
    calls = []
    real_wrap = model_module.wrap_layer

    def failing_wrap(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real_wrap(*args, **kwargs)

    monkeypatch.setattr(model_module, "wrap_layer", failing_wrap)
    config = LoraIRConfig(degradations=DEGRADATIONS, dam=DAMConfig(embed_dim=8) if dam else None)
    with pytest.raises(RuntimeError, match="injected failure"):
        loraxir.get_loraxir_model(backbone, config)
    assert len(calls) == 3
    assert _plain_layers(backbone) == before
    assert not hasattr(backbone, "loraxir_dam")
    assert not any(m._forward_pre_hooks for m in backbone.modules())
    with torch.no_grad():
        assert torch.equal(backbone(x), expected)
    monkeypatch.setattr(model_module, "wrap_layer", real_wrap)
    model = loraxir.get_loraxir_model(backbone, config)
    assert len(list(model.expert_layers())) > 3, "a retry wraps every target"


def test_a_failure_while_wrapping_a_guided_network_keeps_its_dam_blocks_bound(monkeypatch):
    import loraxir.model as model_module
    from loraxir.guidance import DAMBlock, GuidedBackbone
    from loraxir.router import DegradationRouter

    router = DegradationRouter.from_encoder("cnn-tiny", DEGRADATIONS, image_size=16,
                                            hidden_dim=16, embed_dim=8)  # fmt: skip
    guided = GuidedBackbone(loraxir.create_backbone("nafnet-tiny"), router).eval()
    for block in (m for m in guided.modules() if isinstance(m, DAMBlock)):
        torch.nn.init.normal_(block.beta)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = guided(x)
    monkeypatch.setattr(model_module, "wrap_layer", lambda *a, **k: 1 / 0)
    config = LoraIRConfig(degradations=DEGRADATIONS, dam=guided.dam)
    with pytest.raises(ZeroDivisionError):
        loraxir.get_loraxir_model(guided.backbone, config, router=router)
    with torch.no_grad():
        assert torch.equal(guided(x), expected)


def test_a_refused_second_adapter_leaves_the_model_that_wraps_the_network_as_it_was(tmp_path):
    """The network shares its peft_config with the model that wraps it; a refused call on
    that network must not leave its config in there."""
    model = _trained_model()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x, degradation="rain")
    other = LoraIRConfig(degradations=["snow", "blur"], r=4, target_modules=["no_such_layer"])
    with pytest.warns(UserWarning, match="peft_config"), pytest.raises(TargetModulesError):
        loraxir.get_loraxir_model(model.model, other)
    assert model.degradations == DEGRADATIONS and list(model.peft_config) == ["default"]
    with torch.no_grad():
        assert torch.equal(model(x, degradation="rain"), expected)
    model.save_pretrained(tmp_path)
    loaded = loraxir.LoraIRModel.from_pretrained(loraxir.create_backbone("nafnet-tiny"), tmp_path)
    assert loaded.degradations == DEGRADATIONS


def test_user_module_with_names_regex_and_exclude():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 1)
    )
    model = loraxir.get_loraxir_model(
        net, LoraIRConfig(num_experts=2, target_modules=r"\d", exclude_modules=["2"])
    )
    assert [p for p, _ in model.expert_layers()] == ["0"]
    with pytest.raises(UnknownNameError, match=r"Unknown preset 'nafnett'.*nafnet"):
        loraxir.get_loraxir_model(
            torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1)),
            LoraIRConfig(num_experts=2, preset="nafnett"),
        )


def test_trainable_policies(capsys):
    model = _model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".loraxir_experts." in n for n in trainable)
    everything = _model(trainable="all")
    assert all(p.requires_grad for p in everything.parameters())
    trainable_count, total = model.count_parameters()
    assert 0 < trainable_count < total
    assert trainable_count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.print_trainable_parameters()
    assert capsys.readouterr().out == (
        f"trainable params: {trainable_count:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable_count / total:.4f}\n"
    )


def test_merge_and_unload_returns_plain_backbone_with_experts_folded():
    model = _trained_model()
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        expected = reference_output(model, x, torch.tensor([[0.0, 0.0, 1.0]]))
    plain = model.merge_and_unload(degradation="haze")
    assert not any(isinstance(m, LoraIRLayer) for m in plain.modules())
    with torch.no_grad():
        assert rel_err(plain(x), expected) <= 1e-5
    with pytest.raises(RoutingError, match="needs a fixed gate"):
        _model().merge_and_unload()


def test_unload_of_a_merged_model_gives_back_the_networks_own_weights():
    model = _trained_model()
    original = {k: v.clone() for k, v in model.model.state_dict().items() if "loraxir" not in k}
    model.merge(degradation="rain")
    plain = model.unload()
    assert not any(isinstance(m, LoraIRLayer) for m in plain.modules())
    state = plain.state_dict()
    assert state.keys() == {k.replace(".base_layer", "") for k in original}
    assert all(torch.equal(state[k.replace(".base_layer", "")], v) for k, v in original.items())


@pytest.mark.parametrize("mode", [True, False])
def test_wrapping_keeps_the_networks_mode(mode):
    """New expert layers and the model take the wrapped network's mode (a new module's
    default is train), so an eval network's calls stay deterministic inference calls."""
    backbone = loraxir.create_backbone("nafnet-tiny").train(mode)
    config = LoraIRConfig(degradations=DEGRADATIONS, lora_dropout=0.5)
    model = loraxir.get_loraxir_model(backbone, config)
    assert model.training == mode
    assert {layer.training for _, layer in model.expert_layers()} == {mode}
    assert {m.training for m in model.modules()} == {mode}
    # a second adapter on the same layers, as peft's add_adapter adds it
    model.peft_config["second"] = LoraIRConfig(degradations=DEGRADATIONS, lora_dropout=0.5)
    model.inject_adapter(model.model, "second")
    assert {m.training for m in model.modules()} == {mode}
    randomize_experts(model)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        first, second = model(x, degradation="rain"), model(x, degradation="rain")
    assert torch.equal(first, second) != mode  # dropout draws anew only in train mode


@pytest.mark.parametrize(
    "use",
    [
        lambda model, _: model(torch.rand(1, 3, 32, 32), degradation="rain"),
        lambda model, _: model.add_degradation("snow"),
        lambda model, folder: model.save_pretrained(str(folder)),
        lambda model, _: model.merge(degradation="rain"),
    ],
)
@pytest.mark.parametrize("unload", ["merge_and_unload", "unload"])
def test_a_model_whose_backbone_was_handed_back_refuses_every_routed_use(use, unload, tmp_path):
    """The wrapper's backbone has no experts left: a call for another class would run the
    merged weights, a save would write an empty adapter (both silently, before)."""
    model = _trained_model()
    getattr(model, unload)(**({"degradation": "haze"} if unload == "merge_and_unload" else {}))
    with pytest.raises(RoutingError, match=r"was unloaded.*copy\.deepcopy\(model\)"):
        use(model, tmp_path / "never-written")
    with pytest.raises(RoutingError, match="was unloaded"):  # naming the adapter skips nothing
        model.save_pretrained(str(tmp_path / "never-written"), adapter_name="default")
    assert not (tmp_path / "never-written").exists()


def _user_unet_model(checkpointed: bool = False, **config) -> loraxir.LoraIRModel:
    torch.manual_seed(0)
    model = loraxir.get_loraxir_model(
        UserUNet(checkpointed),
        LoraIRConfig(degradations=DEGRADATIONS, **USER_UNET_CONFIG, **config),
    )
    randomize_experts(model)
    return model


def test_saving_a_model_that_trained_its_base_says_to_save_the_network_and_that_works(tmp_path):
    """The base's trained weights are not in an adapter folder (reloaded outputs were 0.5
    off, without a word)."""
    from loraxir.backbones import save_backbone

    model = _model(trainable="all")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-2)
    x = torch.rand(3, 3, 32, 32)
    for _ in range(2):
        optimizer.zero_grad()
        (model(x, degradation=DEGRADATIONS) - x).abs().mean().backward()
        optimizer.step()
    with pytest.warns(UserWarning, match=r"trainable='all'.*save_backbone\(copy\.deepcopy"):
        model.save_pretrained(str(tmp_path / "a"))
    save_backbone(copy.deepcopy(model).unload(), tmp_path / "a")
    with torch.no_grad():
        expected = model.eval()(x, degradation=DEGRADATIONS)
        assert torch.equal(
            loraxir.load_adapter(tmp_path / "a")(x, degradation=DEGRADATIONS), expected
        )


def test_adapter_names_of_the_wrong_kind_are_refused_by_name():
    backbone = loraxir.create_backbone("nafnet-tiny")
    for name in ("my.adapter", "", 5):
        with pytest.raises(ConfigError, match="adapter_name must be a non-empty string"):
            loraxir.get_loraxir_model(
                backbone, LoraIRConfig(degradations=DEGRADATIONS), adapter_name=name
            )
        assert not any(isinstance(m, LoraIRLayer) for m in backbone.modules())
    model = _model().eval()
    with pytest.raises(ConfigError, match=r"pass \['default'\]"):
        model.merge(degradation="rain", adapter_names="default")
    assert not model.merged


def test_method_arguments_of_the_wrong_kind_are_refused_before_anything_changes(tmp_path):
    model = _model().eval()
    x = torch.rand(1, 3, 16, 16)
    for kwargs, message in [
        ({"save_directory": None}, "needs a folder path"),
        ({"metrics": "psnr 30"}, "metrics must be a dict keyed by names"),
        ({"base_model": 5}, "base_model names the backbone"),
        ({"adapter_name": "nosuch"}, "Unknown adapter 'nosuch'"),
    ]:
        with pytest.raises((ConfigError, UnknownNameError), match=message):
            model.save_pretrained(**{"save_directory": tmp_path / "a", **kwargs})
    assert not (tmp_path / "a").exists()
    nested = {"psnr": np.float32(30.5), "dataset": "BSD68", "held_out": {"noise": 30.1}}
    model.save_pretrained(tmp_path / "a", metrics=nested)  # a metrics.json's contents too
    with pytest.raises(ConfigError, match="compute choice is a dict"):
        model.set_compute_choice("weight")
    with pytest.raises(ConfigError, match="Unknown phase 'train'"):
        model.set_compute_choice({"inference": "weight", "train": "weight"})
    assert model.compute_choice() == {}, "the valid phase was not applied either"
    with pytest.raises(ConfigError, match="cache_folds must be True or False"):
        model.cache_folds = "no"
    with pytest.raises(ConfigError, match="repeats must be a whole number"):
        model.autotune(x, degradation="rain", repeats=0)
    with pytest.raises(loraxir.DataError, match=r"torch\.Tensor"):
        model.autotune(x.numpy(), degradation="rain")
    assert model.degradation_gates("rain", batch_size=0).shape == (0, 3)
    for batch_size in ("2", -1):
        with pytest.raises(RoutingError, match="batch_size must be a whole number"):
            model.degradation_gates("rain", batch_size=batch_size)
    with pytest.raises(UnknownNameError, match="snow"):
        model.degradation_gates("snow", batch_size=0)


def test_add_degradation_refuses_an_existing_name_and_a_merged_model():
    for name in ("rain", "Rain"):  # a name is matched ignoring case wherever it is typed
        model = _model()
        with pytest.raises(ConfigError, match="already exists"):
            model.add_degradation(name)
        assert model.degradations == DEGRADATIONS
    with pytest.warns(UserWarning, match=r"\['Rain', 'rain'\] differ only in case"):
        assert LoraIRConfig(degradations=["rain", "Rain"]).num_experts == 2  # still loads
    assert LoraIRConfig(degradations=["a"], dam=DAMConfig(8, ["Conv", "conv"])).dam.points
    merged = _model().eval()
    merged.merge(degradation="rain")
    with pytest.raises(RoutingError, match=r"merged; call model.unmerge\(\) before adding"):
        merged.add_degradation("snow")
    everything = _model(trainable="all").eval()  # eval mode: a step would be lost at unmerge
    everything.merge(degradation="rain")
    with pytest.raises(RoutingError, match=r"trains its base weights.*torch\.no_grad"):
        everything(torch.rand(1, 3, 32, 32))
    with torch.no_grad():
        assert everything(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    everything.requires_grad_(False)  # loaded for inference only
    assert everything(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    assert merged.degradations == DEGRADATIONS


@pytest.mark.parametrize("compute", ["activation", "weight", "auto"])
def test_activation_checkpointing_recomputes_with_the_calls_gates(compute):
    x = torch.rand(2, 3, 16, 16)
    gates = torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.0, 1.0]])
    results = []
    for checkpointed in (False, True):
        model = _user_unet_model(checkpointed, compute=compute)
        out = model(x, gates=gates)
        out.square().mean().backward()  # recomputes the encoder after the call returned
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((out, grads))
    (out, grads), (out_checkpointed, grads_checkpointed) = results
    assert torch.equal(out_checkpointed, out)
    for name, grad in grads.items():
        assert rel_err(grads_checkpointed[name], grad) <= 1e-6, name
    with pytest.raises(RoutingError, match="without gates"):
        model.model(x)


def test_torch_compile_full_graph_matches_eager():
    """(spandrel's NAFNet uses a custom autograd LayerNorm that Dynamo cannot trace in
    full, so a user network stands in.)"""
    model = _user_unet_model()
    assert len(list(model.expert_layers())) == 8
    x = torch.rand(2, 3, 16, 16)
    gates = torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.0, 1.0]])
    eager = model(x, gates=gates)
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model.model, backend="aot_eager", fullgraph=True)
    with loraxir.route(model, gates=gates):
        out = compiled(x)
    out.square().mean().backward()
    assert rel_err(out, eager) <= 1e-5
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, grads[n]) <= 1e-5


@pytest.mark.parametrize("training", [False, True])
def test_autotune_records_a_choice_per_layer_and_keeps_outputs(training):
    model = _trained_model()
    x = torch.rand(2, 3, 32, 32)
    gates = torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.0, 1.0]])
    with torch.no_grad():
        before = model(x, gates=gates)
    timings = model.autotune(x, gates=gates, repeats=1, training=training)
    phase = "training" if training else "inference"
    assert set(timings) == {"auto", *FORMS}
    chosen = min(timings, key=timings.__getitem__)
    assert model.compute_choice() == ({} if chosen == "auto" else {phase: chosen})
    assert all(not layer.training for _, layer in model.expert_layers())
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert rel_err(model(x, gates=gates), before) <= 1e-5
    if training:
        model.train()
        loss = (model(x, gates=gates) - before).square().sum()
        loss.backward()
        assert loss.item() < 1e-6


@pytest.mark.parametrize("name", ["nafnet-tiny", "swinir-tiny", "restormer-tiny", "scunet-tiny"])
def test_existing_checkpoint_loads_through_spandrel_and_its_preset_is_detected(tmp_path, name):
    from safetensors.torch import save_file

    original = loraxir.create_backbone(name)
    save_file(
        {k: v.contiguous() for k, v in original.state_dict().items()}, tmp_path / "net.safetensors"
    )
    backbone = loraxir.load_backbone(str(tmp_path / "net.safetensors"))
    assert type(backbone) is type(original)
    for key, value in original.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value)
    model = loraxir.get_loraxir_model(backbone, LoraIRConfig(num_experts=2))
    expected = {
        p
        for p, _ in loraxir.get_loraxir_model(original, LoraIRConfig(num_experts=2)).expert_layers()
    }
    assert {p for p, _ in model.expert_layers()} == expected


@pytest.mark.parametrize(("name", "unit"), [("restormer-tiny", 8), ("scunet-tiny", 64)])
def test_any_input_size_runs_where_the_network_alone_needs_a_multiple(name, unit):
    """Restormer pads nothing and SCUNet's own reflect padding to 64 fails on sides <= 32:
    their presets name the multiple, and the model reflect-pads to it."""
    from loraxir.padding import backbone_unit

    backbone = loraxir.create_backbone(name).eval()
    assert backbone_unit(backbone) == unit
    model = loraxir.get_loraxir_model(backbone, LoraIRConfig(num_experts=2)).eval()
    randomize_experts(model)
    with torch.no_grad():
        for size in [(1, 1), (8, 8), (17, 70), (32, 32)]:
            x = torch.rand(1, 3, *size)
            assert model(x, degradation="expert_1").shape == x.shape
        if name == "scunet-tiny":  # where SCUNet pads itself, the same reflection
            x = torch.rand(1, 3, unit * 2 - 3, unit + 5)
            model.merge(degradation="expert_1")
            assert rel_err(model(x), model.model(x)) < 1e-6


def test_unrecognised_backbone_checkpoint_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"weird.weight": torch.zeros(2, 2)}, tmp_path / "net.safetensors")
    with pytest.raises(loraxir.CheckpointError, match="does not recognise"):
        loraxir.load_backbone(str(tmp_path / "net.safetensors"))


def test_autotune_choice_is_saved_with_the_adapter_and_restored_on_load(tmp_path):
    import peft

    model = _trained_model()
    model.set_compute_choice({"inference": "batched", "training": "gathered"})
    model.save_pretrained(str(tmp_path / "ours"))
    peft_model = peft.get_peft_model(
        loraxir.create_backbone("nafnet-tiny"), copy.deepcopy(model.config)
    )
    peft_model.save_pretrained(str(tmp_path / "peft"))
    for folder in ("ours", "peft"):
        loaded = loraxir.LoraIRModel.from_pretrained(
            loraxir.create_backbone("nafnet-tiny"), str(tmp_path / folder)
        )
        assert loaded.config.tuned == {"inference": "batched", "training": "gathered"}
        assert all(
            layer.tuned == {"inference": "batched", "training": "gathered"}
            for _, layer in loaded.expert_layers()
        )
    model.set_compute_choice({"inference": "auto", "training": "auto"})
    assert model.config.tuned is None and model.compute_choice() == {}


def test_autotune_for_training_with_dropout_leaves_the_model_trainable():
    model = _model(lora_dropout=0.1)
    randomize_experts(model)
    x = torch.rand(2, 3, 32, 32)
    gates = torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.0, 1.0]])
    model.autotune(x, gates=gates, repeats=1, training=True)
    assert all(layer.tuned["training"] == "activation" for _, layer in model.expert_layers())
    model.train()
    model(x, gates=gates).square().mean().backward()


def test_failed_autotune_restores_every_layer(monkeypatch):
    model = _model().eval()
    x = torch.rand(2, 3, 32, 32)

    def fail(*args, **kwargs):
        raise RuntimeError("timing failed")

    monkeypatch.setattr(loraxir.compute._ConvOps, "batched", fail)
    with pytest.raises(RuntimeError, match="timing failed"):
        model.autotune(x, degradation="rain", repeats=1, training=True)
    assert all(
        layer.compute == "auto" and not layer.training and not layer.tuned
        for _, layer in model.expert_layers()
    )


def test_autotune_refuses_a_merged_model_and_keeps_its_choice():
    model = _model().eval()
    model.set_compute_choice({"inference": "activation"})
    model.merge(degradation="rain")
    with pytest.raises(RoutingError, match=r"merged.*unmerge\(\)"):
        model.autotune(torch.rand(1, 3, 32, 32), degradation="rain", repeats=1)
    assert model.compute_choice() == {"inference": "activation"} and model.merged


def test_safe_merge_refuses_non_finite_weights_and_leaves_the_model_untouched():
    model = _trained_model()
    path, layer = list(model.expert_layers())[7]
    with torch.no_grad():
        layer.loraxir_experts["default"].B[0][2, 0, 0] = float("inf")  # the haze expert
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RoutingError, match=rf"{re.escape(path)}.*non-finite"):
        model.merge_and_unload(degradation="haze", safe_merge=True)
    assert not model.merged and model.routing.merge_gate is None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert isinstance(model.model.get_submodule(path), LoraIRLayer)
    x = torch.rand(1, 3, 32, 32)
    model.merge(degradation="rain")
    with torch.no_grad():
        rain = model(x)
    merged_weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RoutingError, match="non-finite"):
        model.merge(degradation="haze", safe_merge=True)
    assert model.merged, "the earlier merge stays"
    assert all(torch.equal(v, merged_weights[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), rain)
    model.unmerge()
    model.merge(degradation="haze")  # unsafe: non-finite weights, as asked
    with torch.no_grad():
        layer.loraxir_experts["default"].B[0].fill_(float("nan"))  # edited while merged
    with pytest.raises(RoutingError, match="non-finite"):
        model.merge(degradation="rain", safe_merge=True)
    assert not model.merged, "the earlier gate no longer folds finite weights: unmerged"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if "base" in k)


def test_gates_live_for_one_call_or_a_route_block():
    model = _trained_model()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x, degradation="rain")
        with pytest.raises(RoutingError, match="without gates"):
            model.model(x)  # the gates of the call above are not reused
        with loraxir.route(model, degradation="rain", batch_size=2):
            assert torch.equal(model(x), expected)
            assert torch.equal(model.model(x), expected)
        with pytest.raises(RoutingError, match="without gates"):
            model.model(x)


def test_merged_model_accepts_its_own_degradation_and_refuses_others():
    model = _trained_model()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        routed = model(x, degradation="haze")
        model.merge(degradation="haze")
        assert rel_err(model(x, degradation="haze"), routed) <= 1e-5
        assert rel_err(model(x, gates=torch.tensor([0.0, 0.0, 1.0])), routed) <= 1e-5
        refused = [
            {"degradation": "rain"},
            {"degradation": ["haze", "rain"]},
            {"gates": torch.tensor([0.5, 0.0, 0.5])},
        ]
        for kwargs in refused:
            with pytest.raises(RoutingError, match=r"merged for .*haze.*unmerge"):
                model(x, **kwargs)
    model.train()
    with pytest.raises(RoutingError, match=r"merged.*no gradient.*unmerge\(\) before training"):
        model(x, degradation="haze")
    with torch.no_grad():  # a training-mode call without gradients is not training
        assert rel_err(model(x, degradation="haze"), routed) <= 1e-5


def test_a_float64_model_merges_its_mixture_exactly_and_refuses_a_near_one():
    """The merge gate was rounded to float32: the fold was another mixture (4.5e-7 off the
    routed output) and a gate 1e-9 away compared equal to it and was served."""
    model = _trained_model().double()
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    gate = torch.tensor([0.3, 0.7, 0.0], dtype=torch.float64)
    near = torch.tensor([0.3 + 1e-9, 0.7 - 1e-9, 0.0], dtype=torch.float64)
    with torch.no_grad():
        routed = model(x, gates=gate)
        model.merge(gates=gate)
        assert rel_err(model(x, gates=gate), routed) <= 1e-12
        with pytest.raises(RoutingError, match=r"fixed gate \[0\.3, 0\.7, 0\]; .*0\.300000001"):
            model(x, gates=near)
    single = _trained_model()  # float32: a float64 (NumPy) gate merges as float32, as asked
    with torch.no_grad():
        single.merge(gates=np.array([0.3, 0.7, 0.0]))
        single(torch.rand(1, 3, 32, 32), gates=torch.tensor([0.3, 0.7, 0.0]))


def test_merged_model_inside_route_serves_every_call_and_refuses_other_pins():
    """Tiled restoration pins the gates once and calls the model per tile: a merged model
    must serve every call of the block (the first used to clear the pinned gates) and
    refuse pinned gates it cannot serve, like gates passed to the call."""
    model = _trained_model()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        routed = model(x, degradation="haze")
        model.merge(degradation="haze")
        with loraxir.route(model, degradation="haze"):
            for _ in range(3):
                assert rel_err(model(x), routed) <= 1e-5
        # Refused as the block opens: a direct backbone call inside it returned haze's output.
        with pytest.raises(RoutingError, match=r"merged for .*haze.*asks for 'rain'"):
            with loraxir.route(model, degradation="rain"):
                model.model(x)


def test_merge_and_unload_folds_every_named_adapter():
    import peft

    peft_model = peft.get_peft_model(
        loraxir.create_backbone("nafnet-tiny"), LoraIRConfig(degradations=DEGRADATIONS)
    )
    peft_model.add_adapter("other", LoraIRConfig(degradations=DEGRADATIONS, r=4, lora_alpha=2.0))
    tuner = peft_model.base_model
    randomize_experts(tuner)
    layer = tuner.model.intro
    expected = layer.base_layer.weight.detach().clone()
    for adapter, scale in (("default", 16.0 / 8), ("other", 2.0 / 4)):
        a, b = layer.loraxir_experts[adapter].stacked()
        expected += scale * (b[2] @ a[2]).reshape(expected.shape)  # haze = expert 2
    plain = tuner.merge_and_unload(degradation="haze", adapter_names=["default", "other"])
    assert rel_err(plain.intro.weight, expected) <= 1e-6


def _count_folds(monkeypatch):
    """Count the weights folded from now on."""
    import loraxir.compute

    calls = []
    original = loraxir.compute.fold_weight

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(loraxir.compute, "fold_weight", counting)
    return calls


def test_kept_folds_serve_later_calls_and_equal_per_call_folds(monkeypatch):
    """Top-1 rows fold once per layer and expert; later calls reuse them and give the same
    numbers as folding at every call (``cache_folds = False``)."""
    model = _trained_model()
    x = torch.rand(4, 3, 32, 32)
    gates = torch.eye(3)[[0, 2, 2, 1]]
    layers = len(list(model.expert_layers()))
    with torch.no_grad():
        model.cache_folds = False
        reference = model(x, gates=gates)
        reference_pair = model(x[:2], gates=gates[[1, 0]])
        model.cache_folds = True
        folds = _count_folds(monkeypatch)
        first = model(x, gates=gates)
        assert len(folds) == 3 * layers
        pair = model(x[:2], gates=gates[[1, 0]])
        assert len(folds) == 3 * layers
    assert torch.equal(first, reference)
    assert torch.equal(pair, reference_pair)


def test_kept_folds_follow_weight_changes():
    """An in-place edit, a fused optimizer step (no version bump) and a dtype change all
    reach the next inference call."""
    model = _trained_model()
    x = torch.rand(2, 3, 32, 32)
    gates = torch.eye(3)[[1, 1]]

    def fresh(inputs=x):
        """The same call on a copy that folds at every call."""
        copied = copy.deepcopy(model)
        copied.cache_folds = False
        return copied(inputs, gates=gates)

    with torch.no_grad():
        before = model(x, gates=gates)
        bank = next(layer for _, layer in model.expert_layers()).loraxir_experts["default"]
        bank.B[0].add_(0.5)
        edited = model(x, gates=gates)
        assert not torch.equal(edited, before)
        assert torch.equal(edited, fresh())
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True
    )
    model(x, gates=gates).square().mean().backward()
    with torch.no_grad():
        model(x, gates=gates)  # a preview between backward and step fills the folds again
    optimizer.step()
    with torch.no_grad():
        stepped = model(x, gates=gates)
        assert not torch.equal(stepped, edited)
        assert torch.equal(stepped, fresh())
        model.double()  # kept float32 folds would fail on float64 inputs
        doubled = model(x.double(), gates=gates)
        assert doubled.dtype == torch.float64
        assert torch.equal(doubled, fresh(x.double()))


def test_kept_folds_follow_swapped_tensors_copies_and_autocast():
    """Tensors swapped without a version bump (``load_state_dict(assign=True)``,
    ``functional_call``), copies (whose counters restart) and autocast (whose folds have
    its dtype) each reach the next call: it equals a model that folds at every call."""
    model, other = _trained_model(), _trained_model()
    x = torch.rand(2, 3, 32, 32)
    gates = torch.eye(3)[[1, 1]]

    def fresh(source, inputs=x):
        copied = copy.deepcopy(source)
        copied.cache_folds = False
        return copied(inputs, gates=gates)

    with torch.no_grad():
        own = model(x, gates=gates)
        swapped = torch.func.functional_call(model, dict(other.named_parameters()), (x,),
                                             {"gates": gates})  # fmt: skip
        assert torch.equal(swapped, fresh(other))
        assert torch.equal(model(x, gates=gates), own)
        for part in ("loraxir_experts", ".B."):  # every factor, or the B factors only
            experts = {n: p for n, p in other.named_parameters() if part in n}
            ema = torch.func.functional_call(model, experts, (x,), {"gates": gates})
            own_base = copy.deepcopy(model)
            own_base.load_state_dict(experts, strict=False)
            assert torch.equal(ema, fresh(own_base)) and not torch.equal(ema, own)
        assert torch.equal(model(x, gates=gates), own)
        copied = copy.deepcopy(model)
        copied.load_state_dict(other.state_dict())
        assert torch.equal(copied(x, gates=gates), fresh(other))
        model.load_state_dict(other.state_dict(), assign=True)
        assert torch.equal(model(x, gates=gates), fresh(other))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(x, gates=gates), fresh(other))
        assert torch.equal(model(x, gates=gates), fresh(other))


def test_a_saved_or_copied_model_carries_no_kept_folds():
    """They would add up to a copy of every targeted weight per expert to the file, and a
    copy's version counters restart, so they could pass for current."""
    model = _trained_model()
    empty = len(pickle.dumps(model))
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32), gates=torch.eye(3)[[1, 2]])
    assert len(pickle.dumps(model)) < empty + 4096  # the folds would add ~180 kB here


@pytest.mark.parametrize(
    "route", [{"gates": torch.zeros(0, 3)}, {"degradation": []}, {"degradation": "rain"}]
)
def test_an_empty_batch_gives_an_empty_output(route):
    model = _trained_model()
    with torch.no_grad():
        assert model(torch.rand(0, 3, 32, 32), **route).shape == (0, 3, 32, 32)


def test_kept_folds_are_used_exactly_when_the_plan_picks_the_weight_form():
    """The layers' shortcut for an untuned eval layer agrees with ``FormPlan.pick``, by
    default, after a fixed choice, in train mode and with dropout."""
    for dropout in (0.0, 0.1):
        model = _trained_model(lora_dropout=dropout)
        layers = [layer for _, layer in model.expert_layers()]
        with torch.no_grad():
            for choice in ("auto", "gathered", "weight"):
                model.set_compute_choice({"inference": choice, "training": choice})
                for train in (False, True):
                    model.train(train)
                    for layer in layers:
                        picked = layer._choose_compute("default", None) == "weight"
                        assert layer._folds_reusable("default") == picked, (choice, train)
            model.set_compute_choice({"inference": "auto", "training": "auto"})
            model.eval()
            assert all(layer._folds_reusable("default") for layer in layers)


def test_soft_top2_rows_mix_kept_folds_and_other_rows_fold_per_call(monkeypatch):
    """Two gates summing to one mix the two experts' kept folds (each folded once, then
    reused) in every layer, also where the low-rank path has fewer multiply-adds (a
    1x1 convolution on a pooled map), equal to folding the row's factors at every call up
    to float rounding; rows of three experts, or of two gates that do not sum to one, keep
    nothing."""
    model = _trained_model()
    x = torch.rand(1, 3, 32, 32)
    soft, other = torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[0.2, 0.8, 0.0]])
    with torch.no_grad():
        model.cache_folds = False
        reference, other_reference = model(x, gates=soft), model(x, gates=other)
        model.cache_folds = True
        folds = _count_folds(monkeypatch)
        mixed = model(x, gates=soft)
        layers = len(list(model.expert_layers()))
        assert len(folds) == 2 * layers  # one per layer and expert
        kept = len(folds)
        again = model(x, gates=other)
        assert len(folds) == kept
        assert rel_err(mixed, reference) < 1e-6
        assert rel_err(again, other_reference) < 1e-6
        assert not torch.equal(again, mixed)
        for gates in ([[0.2, 0.3, 0.5]], [[0.5, 0.4, 0.0]]):
            model = _trained_model()
            folds.clear()
            model(x, gates=torch.tensor(gates))
            assert not folds, gates


def test_a_batch_of_soft_rows_runs_the_backbone_once(monkeypatch):
    """Soft top-2 rows give every image a weight of its own: the batch runs in one backbone
    pass (the layers' "gathered" form), not one pass per image, and equals the images run
    one at a time."""
    model = _trained_model()
    x = torch.rand(3, 3, 32, 32)
    gates = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.3, 0.7], [0.9, 0.0, 0.1]])
    batches = _count_calls(model, monkeypatch)
    with torch.no_grad():
        out = model(x, gates=gates)
        assert batches == [3]
        one_by_one = torch.cat([model(x[i : i + 1], gates=gates[i : i + 1]) for i in range(3)])
    assert rel_err(out, one_by_one) < 1e-5


def test_a_batch_of_soft_rows_mixes_kept_folds_image_by_image(monkeypatch):
    """Each image's weight is the lerp of its two experts' kept folds, made once per layer
    and expert and reused by later batches, instead of gathering and folding the factors in
    every layer and call; equal to the per-call forms up to float rounding, images sharing
    a row apart included."""
    model = _trained_model()
    x = torch.rand(4, 3, 32, 32)
    first = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.3, 0.7], [0.5, 0.5, 0.0], [0.9, 0.0, 0.1]])
    second = torch.tensor([[0.2, 0.8, 0.0], [0.0, 0.6, 0.4], [0.7, 0.0, 0.3], [0.2, 0.8, 0.0]])
    with torch.no_grad():
        model.cache_folds = False
        references = [model(x, gates=gates) for gates in (first, second)]
        model.cache_folds = True
        folds = _count_folds(monkeypatch)
        outputs = [model(x, gates=first)]
        assert len(folds) == 3 * len(list(model.expert_layers()))  # every expert once
        kept = len(folds)
        outputs.append(model(x, gates=second))
        assert len(folds) == kept
    for output, reference in zip(outputs, references, strict=True):
        assert rel_err(output, reference) < 1e-6


@pytest.mark.parametrize("soft", [False, True])
def test_images_routed_to_a_fresh_expert_in_a_mixed_batch_get_the_backbones_output(soft):
    """A fresh expert (B = 0) is skipped, so its images have a row of zeros: they keep the
    base op's own output, bit for bit, beside images whose experts change theirs."""
    torch.manual_seed(0)
    backbone = loraxir.create_backbone("nafnet-tiny").eval()
    plain = copy.deepcopy(backbone)
    model = loraxir.get_loraxir_model(backbone, LoraIRConfig(degradations=["a", "b", "c"])).eval()
    with torch.no_grad():
        for _, layer in model.expert_layers():
            for chunk in layer.loraxir_experts["default"].B:
                chunk.normal_(0, 0.05)
                chunk[1].zero_()
        gates = torch.eye(3)[[0, 1, 2, 1]]
        if soft:
            gates[[0, 2]] = torch.tensor([[0.5, 0.0, 0.5], [0.3, 0.0, 0.7]])
        x = torch.rand(4, 3, 32, 32)
        out, expected = model(x, gates=gates), plain(x)
    assert torch.equal(out[[1, 3]], expected[[1, 3]])
    assert not torch.equal(out[[0, 2]], expected[[0, 2]])


def _count_calls(model, monkeypatch) -> list[int]:
    """The batch size of every backbone call the model makes from now on."""
    batches: list[int] = []
    forward = model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda t: batches.append(len(t)) or forward(t))
    return batches


@pytest.mark.parametrize(
    ("rows", "passes"),
    [([0, 2, 0, 1, 0, 2], [1, 2, 3]), ([0, 2, 0, 1], [4]), ([0, 2, 1, 0, 1], [5])],
)
def test_inference_runs_the_backbone_once_per_gate_row_of_several_images(monkeypatch, rows, passes):
    """Images routed to different experts go through the backbone one group at a time and
    come back in order, as they would one by one, when groups hold two images or more on
    average; else in one pass, each image with its expert's weight in every layer. Calls
    with gradients stay whole."""
    model = _trained_model()
    x = torch.rand(len(rows), 3, 32, 32)
    gates = torch.eye(3)[rows]
    batches = _count_calls(model, monkeypatch)
    with torch.no_grad():
        out = model(x, gates=gates)
        assert sorted(batches) == passes
        one_by_one = torch.cat(
            [model(x[i : i + 1], gates=gates[i : i + 1]) for i in range(len(rows))]
        )
    assert rel_err(out, one_by_one) < 1e-6
    batches.clear()
    model(x, gates=gates)
    assert batches == [len(rows)]


def test_cpu_inference_splits_large_batches_and_keeps_each_images_gates(monkeypatch):
    """Over ``inference_chunk_pixels`` a batch runs a few images per backbone call, each
    with its own gate row (soft rows: chunks of the batch; one-hot rows: chunks of each
    expert group), and returns what one call returns; autograd and ``None`` do not split."""
    x = torch.rand(5, 3, 32, 32)
    soft = torch.softmax(torch.randn(5, 3), dim=-1)
    for compute, gates, unsplit, split in (
        ("activation", soft, [5], [2, 2, 1]),
        ("auto", torch.eye(3)[[0, 1, 0, 1, 0]], [3, 2], [2, 1, 2]),
    ):
        model = _trained_model(compute=compute)
        batches = _count_calls(model, monkeypatch)
        with torch.no_grad():
            model.inference_chunk_pixels = None
            whole = model(x, gates=gates)
            assert batches == unsplit
            batches.clear()
            model.inference_chunk_pixels = 2 * 32 * 32
            chunked = model(x, gates=gates)
        assert batches == split
        assert rel_err(chunked, whole) < 1e-6
        batches.clear()
        model(x, gates=gates)
        assert batches == [5]


def test_a_family_preset_sets_its_own_cpu_chunk(monkeypatch):
    """Restormer's preset runs one 128² image per CPU inference call (its bare network ran
    four of them one at a time in 0.79× the time of one call), SwinIR's too; NAFNet keeps
    2^16, and a value the user sets wins."""
    restormer = _model("restormer-tiny").eval()
    assert restormer.inference_chunk_pixels == 128 * 128
    assert _model("swinir-tiny").inference_chunk_pixels == 128 * 128
    assert _model().inference_chunk_pixels == loraxir.model.CPU_CHUNK_PIXELS
    batches = _count_calls(restormer, monkeypatch)
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        restormer(x, degradation=DEGRADATIONS[0])
        assert batches == [1, 1]
        batches.clear()
        restormer.inference_chunk_pixels = 2 * 128 * 128
        restormer(x, degradation=DEGRADATIONS[0])
    assert batches == [2]


@pytest.mark.parametrize("pixels", [0, -4, 1.5, True, "32768"])
def test_inference_chunk_pixels_refuses_what_is_not_a_positive_int(pixels):
    model = _model()
    with pytest.raises(ConfigError, match="inference_chunk_pixels must be a positive int"):
        model.inference_chunk_pixels = pixels
    assert model.inference_chunk_pixels == loraxir.model.CPU_CHUNK_PIXELS


def test_inference_chunks_default_to_none_where_freed_memory_is_kept(monkeypatch):
    """The chunks only saved page faults: once ``keep_freed_cpu_memory`` has taken effect
    the default runs a CPU batch in one call; a value the user set is kept either way."""
    model = _model()
    monkeypatch.setattr(loraxir.inference.allocator, "_keeping", True)
    assert model.inference_chunk_pixels is None
    model.inference_chunk_pixels = 4096
    assert model.inference_chunk_pixels == 4096
    monkeypatch.setattr(loraxir.inference.allocator, "_keeping", False)
    assert _model().inference_chunk_pixels == loraxir.model.CPU_CHUNK_PIXELS
