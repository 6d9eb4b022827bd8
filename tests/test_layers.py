"""Every expert layer form equals the plain formula y = base(x) + sum_i g_i s (dW_i * x)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraxir.errors import ConfigError, RoutingError, TargetModulesError
from loraxir.layers import wrap_layer
from loraxir.routing import RoutingState
from tests.conftest import rel_err
from tests.model_tester import apply_weight, expert_delta

E, R, ALPHA = 4, 3, 6.0

# (name, base layer factory, input shape): every Conv2d configuration the issue names.
CASES = [
    ("linear", lambda: nn.Linear(12, 10), (3, 12)),
    ("linear_windows", lambda: nn.Linear(12, 10), (3 * 4, 5, 12)),
    ("linear_nobias", lambda: nn.Linear(12, 10, bias=False), (3, 7, 12)),
    ("conv1x1", lambda: nn.Conv2d(6, 8, 1), (3, 6, 9, 9)),
    ("conv3x3", lambda: nn.Conv2d(6, 8, 3, padding=1), (3, 6, 9, 9)),
    ("conv3x5_nobias", lambda: nn.Conv2d(6, 8, (3, 5), padding=(1, 2), bias=False), (3, 6, 9, 9)),
    ("conv_stride2", lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (3, 6, 9, 9)),
    ("conv_dilation2", lambda: nn.Conv2d(6, 8, 3, padding=2, dilation=2), (3, 6, 9, 9)),
    ("conv_groups2", lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2), (3, 6, 9, 9)),
    ("conv_depthwise", lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (3, 6, 9, 9)),
    ("conv_depthwise_x2", lambda: nn.Conv2d(6, 12, 3, padding=1, groups=6), (3, 6, 9, 9)),
    ("conv_reflect", lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"), (3, 6, 9, 9)),
    (
        "conv_replicate",
        lambda: nn.Conv2d(6, 8, 3, padding=2, padding_mode="replicate"),
        (3, 6, 9, 9),
    ),
    ("conv_circular", lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="circular"), (3, 6, 9, 9)),
    ("conv_same_dilated", lambda: nn.Conv2d(6, 8, 4, padding="same", dilation=2), (3, 6, 9, 9)),
    (
        "conv_same_reflect",
        lambda: nn.Conv2d(6, 8, 3, padding="same", padding_mode="reflect"),
        (3, 6, 9, 9),
    ),
    ("convT", lambda: nn.ConvTranspose2d(6, 8, 2, stride=2), (3, 6, 5, 5)),
    (
        "convT_padded",
        lambda: nn.ConvTranspose2d(6, 8, 3, stride=2, padding=1, output_padding=1),
        (3, 6, 5, 5),
    ),
]
MODES = ["activation", "weight", "batched", "gathered", "auto"]


def _reference(layer, x: torch.Tensor, gates: torch.Tensor, output_padding=None) -> torch.Tensor:
    """Loop over images and experts: base(x_b) + sum_i g_bi * s * (dW_i * x_b)."""
    base = layer.base_layer
    a, b = layer.loraxir_experts["default"].stacked()
    per_image = x.reshape(gates.shape[0], -1, *x.shape[1:])
    outputs = []
    for image, row in zip(per_image, gates, strict=True):
        if output_padding is None:
            out = base(image)
        else:
            out = apply_weight(base, image, base.weight, output_padding) + base.bias[:, None, None]
        for i in range(E):
            delta = apply_weight(base, image, expert_delta(base, a[i], b[i]), output_padding)
            out = out + row[i] * (ALPHA / R) * delta
        outputs.append(out)
    return torch.cat(outputs)


def _layer(factory, gates: torch.Tensor):
    routing = RoutingState()
    layer = wrap_layer(factory(), routing)
    layer.update_layer("default", r=R, lora_alpha=ALPHA, chunks=[E], dropout=0.0, init="default")
    with torch.no_grad():
        for p in layer.loraxir_experts.parameters():
            p.normal_(0.0, 0.3)
    routing.gates, routing.pinned = gates, True  # as inside loraxir.route(...)
    return layer


def _gates() -> torch.Tensor:
    gates = torch.rand(3, E)
    gates[2] = gates[0]  # two images share a gate row: exercises grouping by unique rows
    return gates


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=[c[0] for c in CASES])
def test_forms_equal_plain_formula_outputs_and_input_grads(name, factory, shape, mode):
    gates = _gates()
    layer = _layer(factory, gates)
    layer.compute = mode
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = _reference(layer, x_ref, gates)
    assert y.shape == y_ref.shape
    assert rel_err(y, y_ref) <= 1e-5
    grad_out = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad_out)
    (gx_ref,) = torch.autograd.grad(y_ref, x_ref, grad_out)
    assert rel_err(gx, gx_ref) <= 1e-5


@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=[c[0] for c in CASES])
def test_forms_give_equal_expert_and_gate_gradients(name, factory, shape):
    x = torch.randn(shape)
    grads = {}
    for mode in ("activation", "weight", "batched"):
        torch.manual_seed(1)
        gates = _gates().requires_grad_(True)
        layer = _layer(factory, gates)
        layer.compute = mode
        bank = layer.loraxir_experts["default"]
        layer(x).square().sum().backward()
        grads[mode] = (bank.A[0].grad, bank.B[0].grad, gates.grad)
    for mode in ("weight", "batched"):
        for got, expected in zip(grads[mode], grads["activation"], strict=True):
            assert rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=[c[0] for c in CASES])
def test_fresh_experts_leave_output_exactly_unchanged(name, factory, shape):
    routing = RoutingState()
    base = factory()
    layer = wrap_layer(base, routing)
    layer.update_layer("default", r=R, lora_alpha=ALPHA, chunks=[E], dropout=0.0, init="default")
    routing.gates, routing.pinned = torch.rand(3, E), True
    x = torch.randn(shape)
    for mode in ("activation", "weight", "batched", "auto"):
        layer.compute = mode
        with torch.no_grad():
            assert torch.equal(layer(x), base(x))
    layer.compute = "auto"
    out = layer(x)  # training: fresh experts must still get gradients
    assert torch.equal(out, base(x))
    out.sum().backward()
    assert layer.loraxir_experts["default"].B[0].grad.abs().sum() > 0


def test_zero_gates_run_the_base_layer_only():
    layer = _layer(lambda: nn.Conv2d(6, 8, 3, padding=1), torch.zeros(3, E))
    x = torch.randn(3, 6, 9, 9)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_dropout_uses_activation_form_and_refuses_others():
    layer = _layer(lambda: nn.Linear(12, 10), torch.rand(3, E))
    layer.loraxir_dropout["default"] = 0.5
    layer.train()
    x = torch.randn(3, 12)
    torch.manual_seed(3)
    y1 = layer(x)
    torch.manual_seed(3)
    layer.compute = "activation"
    assert torch.equal(y1, layer(x))
    layer.compute = "weight"
    with pytest.raises(ConfigError, match="lora_dropout"):
        layer(x)


def test_input_not_image_major_is_a_clear_error():
    layer = _layer(lambda: nn.Linear(12, 10), torch.rand(3, E))
    with pytest.raises(RoutingError, match="not a multiple of the 3 routed images"):
        layer(torch.randn(4, 12))


def test_layer_without_gates_says_how_to_route():
    routing = RoutingState()
    layer = wrap_layer(nn.Linear(4, 4), routing)
    layer.update_layer("default", r=2, lora_alpha=4, chunks=[2], dropout=0.0, init="default")
    with pytest.raises(RoutingError, match="without gates"):
        layer(torch.randn(2, 4))


def test_grouped_transposed_conv_and_other_types_are_refused():
    with pytest.raises(TargetModulesError, match="groups=2"):
        wrap_layer(nn.ConvTranspose2d(4, 4, 2, groups=2), RoutingState())
    with pytest.raises(TargetModulesError, match="Conv1d"):
        wrap_layer(nn.Conv1d(4, 4, 3), RoutingState())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "factory", "shape"), CASES, ids=[c[0] for c in CASES])
def test_zero_gates_get_their_true_gradient(name, factory, shape, mode):
    gates = _gates()
    gates[:, 1] = 0.0  # expert 1 is off for every image, yet dL/dg_1 is not zero
    gates.requires_grad_(True)
    layer = _layer(factory, gates)
    layer.compute = mode
    x = torch.randn(shape)
    y = layer(x)
    grad_out = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, gates, grad_out)
    reference_gates = gates.detach().clone().requires_grad_(True)
    reference = _reference(layer, x, reference_gates)
    (expected,) = torch.autograd.grad(reference, reference_gates, grad_out)
    assert expected[:, 1].abs().sum() > 0
    assert rel_err(grad, expected) <= 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_transposed_conv_honours_output_size(mode):
    layer = _layer(lambda: nn.ConvTranspose2d(6, 8, 3, stride=2, padding=1), _gates())
    layer.compute = mode
    x = torch.randn(3, 6, 5, 5)
    y = layer(x, output_size=(10, 10))
    assert y.shape == layer.base_layer(x, output_size=(10, 10)).shape == (3, 8, 10, 10)
    assert rel_err(y, _reference(layer, x, layer.routing.gates, output_padding=1)) <= 1e-5


def test_gate_derived_values_are_computed_once_per_gate_tensor_and_version():
    routing = RoutingState()
    routing.gates, routing.pinned = torch.rand(3, E), True
    builds = []

    def build(gates: torch.Tensor) -> float:
        builds.append(1)
        return float(gates.sum())

    first = routing.derived("sum", build)
    assert routing.derived("sum", build) == first and len(builds) == 1
    routing.gates.mul_(2.0)  # an in-place edit bumps the version: recomputed
    assert routing.derived("sum", build) == pytest.approx(2 * first) and len(builds) == 2
    with routing.activate(routing.gates):  # a new call starts afresh
        routing.derived("sum", build)
    assert len(builds) == 3
    routing.gates = torch.rand(3, E)  # new gates: recomputed
    routing.derived("sum", build)
    assert len(builds) == 4


def test_merge_and_unmerge_keep_the_merged_count_of_the_routing_state():
    layer = _layer(lambda: nn.Conv2d(6, 8, 3, padding=1), torch.rand(3, E))
    layer.routing.merge_gate = torch.rand(E)
    layer.merge()
    layer.merge()  # already merged: counted once
    assert layer.routing.merged_layers == 1
    layer.unmerge()
    layer.unmerge()
    assert layer.routing.merged_layers == 0
