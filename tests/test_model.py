"""LoraIRModel: presets, routing, merge, training policy, growth, compile and checkpointing."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import loraxir
from loraxir import ConfigError, LoraIRConfig, RoutingError, TargetModulesError, UnknownNameError
from loraxir.layers import LoraIRLayer
from tests.conftest import randomize_experts, rel_err

DEGRADATIONS = ["noise", "rain", "haze"]

# (backbone name, expected number of wrapped layers, input size): one line per preset.
# nafnet-tiny: 5 blocks x 6 convs + intro + ending + 2 downs + 2 ups = 36 (every conv);
# restormer-tiny: 8 transformer blocks x 6 convs; swinir-tiny: 2 Swin blocks x 4 linears;
# scunet-tiny: 7 Swin-Conv blocks x 4 linears + 3 transposed-conv upsamplers.
PRESET_CASES = [
    ("nafnet-tiny", 36, 32),
    ("restormer-tiny", 48, 32),
    ("swinir-tiny", 8, 32),
    ("scunet-tiny", 31, 64),
]


def _model(name="nafnet-tiny", **config):
    backbone = loraxir.create_backbone(name)
    return loraxir.get_loraxir_model(backbone, LoraIRConfig(degradations=DEGRADATIONS, **config))


@pytest.mark.parametrize(("name", "layers", "size"), PRESET_CASES)
def test_each_preset_wraps_expected_layers_and_fresh_experts_change_nothing(name, layers, size):
    backbone = loraxir.create_backbone(name).eval()
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        expected = backbone(x)
    model = loraxir.get_loraxir_model(backbone, LoraIRConfig(degradations=DEGRADATIONS))
    assert len(list(model.expert_layers())) == layers
    with torch.no_grad():
        assert torch.equal(model(x, degradation=["noise", "haze"]), expected)
    randomize_experts(model)
    with torch.no_grad():
        assert not torch.equal(model(x, degradation="rain"), expected)


def test_gates_degradation_names_and_one_hot_agree():
    model = _model().eval()
    randomize_experts(model)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        by_name = model(x, degradation=["rain", "haze"])
        by_gate = model(x, gates=torch.tensor([[0.0, 1, 0], [0, 0, 1]]))
    assert torch.equal(by_name, by_gate)
    assert torch.equal(model.last_routing, torch.tensor([[0.0, 1, 0], [0, 0, 1]]))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({}, RoutingError, "No routing for this call"),
        ({"gates": torch.ones(2, 4)}, RoutingError, r"shape \(B=2, E=3\)"),
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


def test_trainable_policies():
    model = _model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".loraxir_experts." in n for n in trainable)
    everything = _model(trainable="all")
    assert all(p.requires_grad for p in everything.parameters())
    trainable_count, total = model.count_parameters()
    assert 0 < trainable_count < total


@pytest.mark.parametrize("name", ["nafnet-tiny", "swinir-tiny", "scunet-tiny"])
def test_merged_equals_routed_and_unmerge_is_bit_exact(name):
    size = 64 if name == "scunet-tiny" else 32
    model = loraxir.get_loraxir_model(
        loraxir.create_backbone(name), LoraIRConfig(degradations=DEGRADATIONS)
    ).eval()
    randomize_experts(model)
    x = torch.rand(2, 3, size, size)
    gate = torch.tensor([0.2, 0.0, 0.8])
    original = {
        n: p.detach().clone() for n, p in model.model.named_parameters() if "base_layer" in n
    }
    with torch.no_grad():
        routed = model(x, gates=gate)
        model.merge(gates=gate)
        assert model.merged
        merged = model(x)
    assert rel_err(merged, routed) <= 1e-5
    with pytest.raises(RoutingError, match="unmerge"):
        model(x, degradation="rain")
    model.unmerge()
    for n, p in model.model.named_parameters():
        if "base_layer" in n:
            assert torch.equal(p, original[n]), n


def test_merge_and_unload_returns_plain_backbone_with_experts_folded():
    model = _model().eval()
    randomize_experts(model)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        routed = model(x, degradation="haze")
    plain = model.merge_and_unload(degradation="haze")
    assert not any(isinstance(m, LoraIRLayer) for m in plain.modules())
    with torch.no_grad():
        assert rel_err(plain(x), routed) <= 1e-5
    with pytest.raises(RoutingError, match="needs a fixed gate"):
        _model().merge_and_unload()


def test_add_degradation_keeps_old_outputs_bit_identical_and_trains_only_new_expert():
    model = _model().eval()
    randomize_experts(model)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        before = model(x, degradation=["noise", "rain", "haze"])
    model.add_degradation("snow")
    assert model.degradations == [*DEGRADATIONS, "snow"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".A.1", ".B.1")) for n in trainable)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1
    )
    model.train()
    model(x, degradation="snow").square().mean().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(x, degradation=["noise", "rain", "haze"])
        assert not torch.equal(model(x, degradation=["snow"] * 3), before)
    assert torch.equal(after, before)
    with pytest.raises(ConfigError, match="already exists"):
        model.add_degradation("rain")


def test_activation_checkpointing_gives_same_outputs_and_gradients():
    model = _model(compute="activation")
    randomize_experts(model)
    x = torch.rand(2, 3, 32, 32)
    gates = torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.0, 1.0]])
    out = model(x, gates=gates)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model._set_gates(gates)
    recomputed = checkpoint(model.model, x, use_reentrant=False)
    recomputed.square().mean().backward()
    assert torch.equal(recomputed, out)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, grads[n]) <= 1e-6


class _UserUNet(torch.nn.Module):
    """A user's own network with dense, depthwise, strided, transposed convs and a linear.

    (spandrel's NAFNet uses a custom autograd LayerNorm that Dynamo cannot trace in full.)
    """

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.down = torch.nn.Conv2d(8, 16, 2, stride=2)
        self.mix = torch.nn.Linear(16, 16)
        self.up = torch.nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.tail = torch.nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.dw(self.head(x)))
        d = self.down(h)
        d = self.mix(d.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + self.tail(self.up(d) + h)


def test_torch_compile_full_graph_matches_eager():
    model = loraxir.get_loraxir_model(
        _UserUNet(),
        LoraIRConfig(degradations=DEGRADATIONS, target_modules=r"head|dw|down|mix|up|tail"),
    )
    assert len(list(model.expert_layers())) == 6
    randomize_experts(model)
    x = torch.rand(2, 3, 16, 16)
    gates = torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.0, 1.0]])
    eager = model(x, gates=gates)
    eager.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model.model, backend="aot_eager", fullgraph=True)
    model._set_gates(gates)
    out = compiled(x)
    out.square().mean().backward()
    assert rel_err(out, eager) <= 1e-5
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert rel_err(p.grad, grads[n]) <= 1e-5


def test_route_context_pins_gates_for_direct_calls():
    model = _model().eval()
    randomize_experts(model)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x, degradation="rain")
        with loraxir.route(model, degradation="rain", batch_size=2):
            assert torch.equal(model(x), expected)
            assert torch.equal(model.model(x), expected)


@pytest.mark.parametrize("training", [False, True])
def test_autotune_records_a_choice_per_layer_and_keeps_outputs(training):
    model = _model().eval()
    randomize_experts(model)
    x = torch.rand(2, 3, 32, 32)
    gates = torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.0, 1.0]])
    with torch.no_grad():
        before = model(x, gates=gates)
    timings = model.autotune(x, gates=gates, repeats=1, training=training)
    phase = "training" if training else "inference"
    assert set(timings) == {p for p, _ in model.expert_layers()}
    assert all(
        layer.tuned[phase] in ("activation", "weight", "batched") and not layer.training
        for _, layer in model.expert_layers()
    )
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


def test_unrecognised_backbone_checkpoint_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"weird.weight": torch.zeros(2, 2)}, tmp_path / "net.safetensors")
    with pytest.raises(loraxir.CheckpointError, match="does not recognise"):
        loraxir.load_backbone(str(tmp_path / "net.safetensors"))
