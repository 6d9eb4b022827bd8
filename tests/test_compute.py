"""Every compute form equals an independent per-image, per-expert reference:
y_n = base(x_n) + sum_i c_ni * op(x_n, B_i A_i), outputs and gradients of x, A, B and c."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraxir import compute
from loraxir.errors import ConfigError, UnknownNameError
from tests.conftest import rel_err
from tests.model_tester import apply_weight, expert_delta

E, R, N = 4, 3, 3

# (name, base layer factory, input shape with N images, call options)
CASES = [
    ("linear", lambda: nn.Linear(12, 10), (N, 12), {}),
    ("linear_windows", lambda: nn.Linear(12, 10), (N * 4, 5, 12), {}),
    ("linear_nobias", lambda: nn.Linear(12, 10, bias=False), (N, 7, 12), {}),
    ("conv1x1", lambda: nn.Conv2d(6, 8, 1), (N, 6, 9, 9), {}),
    ("conv1x1_tiles", lambda: nn.Conv2d(6, 8, 1, bias=False), (N * 2, 6, 5, 5), {}),
    ("conv1x1_stride2", lambda: nn.Conv2d(6, 8, 1, stride=2), (N, 6, 9, 9), {}),
    # a U-Net bottleneck: a fold per image costs more than the rank path on a 2x2 map
    ("conv1x1_bottleneck", lambda: nn.Conv2d(40, 24, 1), (N, 40, 2, 2), {}),
    ("conv3x3", lambda: nn.Conv2d(6, 8, 3, padding=1), (N, 6, 9, 9), {}),
    ("conv3x3_tiles", lambda: nn.Conv2d(6, 8, 3, padding=1), (N * 2, 6, 7, 7), {}),
    ("conv_stride2", lambda: nn.Conv2d(6, 8, 2, stride=2), (N, 6, 8, 8), {}),
    ("conv_dilation2", lambda: nn.Conv2d(6, 8, 3, padding=2, dilation=2), (N, 6, 9, 9), {}),
    (
        "conv_reflect",
        lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect", bias=False),
        (N, 6, 9, 9),
        {},
    ),
    ("conv_depthwise", lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (N, 6, 9, 9), {}),
    ("conv_grouped", lambda: nn.Conv2d(6, 8, 3, padding=1, groups=2), (N, 6, 9, 9), {}),
    ("convT", lambda: nn.ConvTranspose2d(6, 8, 2, stride=2), (N, 6, 5, 5), {}),
    (
        "convT_output_size",
        lambda: nn.ConvTranspose2d(6, 8, 3, stride=2, padding=1),
        (N, 6, 5, 5),
        {"output_size": (10, 10)},
    ),
]
IDS = [case[0] for case in CASES]


def _coeffs(kind: str) -> torch.Tensor:
    """(N, E) coefficients: top-1 to different experts, soft top-2, one row for all, a zero row."""
    if kind == "top1":
        return torch.eye(E)[[2, 0, 3]] * 2.0
    if kind == "top2":
        c = torch.zeros(N, E)
        c[0, [1, 3]] = torch.tensor([0.7, 0.3])
        c[1, [0, 2]] = torch.tensor([0.4, 0.6])
        c[2, [1, 2]] = torch.tensor([0.5, 0.5])
        return c
    if kind == "equal":
        return torch.tensor([[0.2, 0.0, 0.8, 0.0]]).expand(N, E).clone()
    if kind == "zero_row":
        c = torch.rand(N, E)
        c[1] = 0.0
        return c
    raise AssertionError(kind)


def _factors(base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    a_shape, b_shape = compute.factor_shapes(base, R)
    return torch.randn(E, *a_shape) * 0.3, torch.randn(E, *b_shape) * 0.3


def _output_padding(base: nn.Module, x: torch.Tensor, options: dict):
    if "output_size" not in options:
        return None
    return base._output_padding(
        x, options["output_size"], base.stride, base.padding, base.kernel_size, 2, base.dilation
    )


def _reference(base, x, a, b, coeffs, output_padding) -> torch.Tensor:
    """Loop over images and experts, each expert's dW_i built by hand from its factors."""
    per_image = x.reshape(coeffs.shape[0], -1, *x.shape[1:])
    outputs = []
    for image, row in zip(per_image, coeffs, strict=True):
        out = apply_weight(base, image, base.weight, output_padding)
        if base.bias is not None:
            linear = isinstance(base, nn.Linear)
            out = out + (base.bias if linear else base.bias[:, None, None])
        for i in range(E):
            delta = expert_delta(base, a[i], b[i])
            out = out + row[i] * apply_weight(base, image, delta, output_padding)
        outputs.append(out)
    return torch.cat(outputs)


def _run(form, base, x, a, b, coeffs, options, exact_base=False):
    return compute.routed_forward(
        form,
        base,
        x,
        a,
        b,
        coeffs,
        output_padding=_output_padding(base, x, options),
        exact_base=exact_base,
    )


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


@pytest.mark.parametrize("exact_base", [False, True])
@pytest.mark.parametrize("gates", ["top1", "top2", "equal", "zero_row"])
@pytest.mark.parametrize("form", compute.FORMS)
@pytest.mark.parametrize(("name", "factory", "shape", "options"), CASES, ids=IDS)
def test_form_matches_reference_outputs_and_gradients(
    name, factory, shape, options, form, gates, exact_base
):
    base = factory().requires_grad_(False)
    a, b = _factors(base)
    coeffs = _coeffs(gates)
    x = torch.randn(shape)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
    out = _run(form, base, *leaves, coeffs, options, exact_base)
    expected = _reference(base, *ref_leaves, coeffs, _output_padding(base, x, options))
    assert out.shape == expected.shape
    assert rel_err(out, expected) <= 1e-5
    grad_out = torch.randn_like(out)
    for got, want in zip(
        _grads(out, leaves, grad_out), _grads(expected, ref_leaves, grad_out), strict=True
    ):
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("form", compute.FORMS)
@pytest.mark.parametrize(("name", "factory", "shape", "options"), CASES, ids=IDS)
def test_gate_gradients_are_exact_zero_gates_included(name, factory, shape, options, form):
    base = factory().requires_grad_(False)
    a, b = _factors(base)
    coeffs = _coeffs("top2")  # expert-wise zeros: their gradient is not zero
    x = torch.randn(shape)
    c = coeffs.clone().requires_grad_(True)
    c_ref = coeffs.clone().requires_grad_(True)
    out = _run(form, base, x, a, b, c, options)
    expected = _reference(base, x, a, b, c_ref, _output_padding(base, x, options))
    grad_out = torch.randn_like(out)
    (got,) = _grads(out, [c], grad_out)
    (want,) = _grads(expected, [c_ref], grad_out)
    assert want[coeffs == 0].abs().sum() > 0
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("form", compute.FORMS)
@pytest.mark.parametrize("name", ["linear_windows", "conv1x1", "conv3x3", "conv_depthwise"])
def test_one_coefficient_row_serves_every_image(name, form):
    _, factory, shape, options = CASES[IDS.index(name)]
    base = factory()
    a, b = _factors(base)
    x = torch.randn(shape)
    row = torch.rand(1, E)
    out = _run(form, base, x, a, b, row, options)
    expected = _reference(base, x, a, b, row.expand(N, E), None)
    assert rel_err(out, expected) <= 1e-5


@pytest.mark.parametrize("name", ["linear", "conv1x1", "conv3x3"])
def test_fused_form_gives_the_frozen_weight_its_gradient_when_it_trains(name):
    _, factory, shape, options = CASES[IDS.index(name)]
    base, ref = factory(), factory()
    ref.load_state_dict(base.state_dict())
    a, b = _factors(base)
    coeffs = _coeffs("top1")
    x = torch.randn(shape)
    out = _run("gathered", base, x, a, b, coeffs, options)
    expected = _reference(ref, x, a, b, coeffs, None)
    grad_out = torch.randn_like(out)
    params = [base.weight, base.bias]
    for got, want in zip(
        _grads(out, params, grad_out),
        _grads(expected, [ref.weight, ref.bias], grad_out),
        strict=True,
    ):
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("form", ["weight", "batched", "gathered"])
@pytest.mark.parametrize(("name", "factory", "shape", "options"), CASES, ids=IDS)
def test_exact_base_gives_zero_experts_the_base_output_bit_for_bit(
    name, factory, shape, options, form
):
    base = factory()
    a, _ = _factors(base)
    b = torch.zeros(E, *compute.factor_shapes(base, R)[1], requires_grad=True)
    x = torch.randn(shape)
    out = _run(form, base, x, a, b, _coeffs("top2"), options, exact_base=True)
    output_size = options.get("output_size")
    expected = base(x) if output_size is None else base(x, output_size=output_size)
    assert torch.equal(out, expected)
    out.square().sum().backward()
    assert b.grad.abs().sum() > 0  # fresh experts still learn


@pytest.mark.parametrize("form", compute.FORMS)
@pytest.mark.parametrize(
    "name", ["linear_windows", "conv1x1", "conv3x3", "conv_depthwise", "convT"]
)
def test_forms_follow_bfloat16_autocast(name, form):
    _, factory, shape, options = CASES[IDS.index(name)]
    base = factory().requires_grad_(False)
    a, b = (t.requires_grad_(True) for t in _factors(base))
    coeffs = _coeffs("top1")
    x = torch.randn(shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run(form, base, x, a, b, coeffs, options)
        expected_dtype = base(x).dtype
    assert out.dtype == expected_dtype == torch.bfloat16
    reference = _reference(base, x, a.detach(), b.detach(), coeffs, None)
    assert rel_err(out.float(), reference) <= 3e-2
    out.float().square().sum().backward()
    assert a.grad.dtype == b.grad.dtype == torch.float32
    assert torch.isfinite(a.grad).all() and b.grad.abs().sum() > 0


def test_cost_model_plans_per_layer_shape():
    plan = compute.plan_forms
    # NAFNet width 32 at r=8, top-1: the factored path is cheaper than a weight gradient for
    # 1x1 convolutions of 64 channels and dense 2x2 downsamplers, not for the 32 -> 3 output
    # convolution, which folds per group of images; grouped convolutions fold per image.
    # Inference folds per row everywhere.
    assert plan(nn.Conv2d(32, 64, 1), 8, 1) == compute.FormPlan("weight", "gathered")
    assert plan(nn.Linear(256, 256), 8, 2) == compute.FormPlan("weight", "gathered")
    assert plan(nn.Conv2d(32, 64, 2, stride=2), 8, 1) == compute.FormPlan("weight", "gathered")
    assert plan(nn.Conv2d(32, 3, 3, padding=1), 8, 1) == compute.FormPlan("weight", "weight")
    depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
    assert plan(depthwise, 8, 1) == compute.FormPlan("weight", "batched")
    assert plan(nn.Conv2d(8, 8, 1), 8, 5).training == "batched"  # rank 40 > the layer


def test_plan_pick_applies_what_only_a_call_knows():
    plan = compute.FormPlan("batched", "gathered")
    call = {"training": False, "shared_row": False, "dropout": False, "compiling": False}
    assert plan.pick(**call, grouped=False) == "batched"
    assert plan.pick(**call | {"shared_row": True}, grouped=False) == "weight"
    assert plan.pick(**call | {"training": True, "shared_row": True}, grouped=False) == "gathered"
    assert plan.pick(**call | {"dropout": True}, grouped=False) == "activation"
    assert plan.pick(**call | {"compiling": True}, grouped=True) == "batched"
    assert plan.pick(**call, grouped=False, tuned="weight") == "weight"
    # soft rows over a batch: a weight per image, applied in one call
    assert plan.pick(**call, grouped=False, mixed_rows=True) == "gathered"
    assert plan.pick(**call, grouped=False, mixed_rows=True, tuned="weight") == "weight"
    batched_training = compute.FormPlan("weight", "batched")
    training_call = call | {"training": True, "grouped": False, "mixed_rows": True}
    assert batched_training.pick(**training_call) == "batched"  # training keeps its plan
    # a plan that folds per image in training folds once for a batch that shares one row
    folds = compute.FormPlan("weight", "batched")
    training = call | {"training": True}
    assert folds.pick(**training, grouped=True) == "batched"
    assert folds.pick(**training | {"shared_row": True}, grouped=True) == "weight"
    assert folds.pick(**training | {"shared_row": True}, grouped=True, tuned="batched") == "batched"


def test_only_the_activation_form_takes_a_separate_expert_input():
    base = nn.Linear(12, 10)
    a, b = _factors(base)
    x, dropped = torch.randn(N, 12), torch.randn(N, 12)
    coeffs = _coeffs("top2")
    out = compute.routed_forward("activation", base, x, a, b, coeffs, expert_input=dropped)
    expected = base(x) + _reference(base, dropped, a, b, coeffs, None) - base(dropped)
    assert rel_err(out, expected) <= 1e-5
    with pytest.raises(ConfigError, match="lora_dropout"):
        compute.routed_forward("gathered", base, x, a, b, coeffs, expert_input=dropped)


def test_unknown_form_names_the_forms():
    base = nn.Linear(4, 4)
    a, b = _factors(base)
    with pytest.raises(UnknownNameError, match="gathered"):
        compute.routed_forward("fast", base, torch.randn(N, 4), a, b, _coeffs("top1"))
    assert compute.check_form("auto") == "auto"
    with pytest.raises(UnknownNameError, match="batched"):
        compute.check_form("merged")


@pytest.mark.parametrize(
    ("base", "shape", "low_rank"),
    [
        (nn.Conv2d(64, 64, 1), (N, 64, 1, 1), True),  # a squeeze-excitation 1x1 on a pooled map
        (nn.Conv2d(64, 64, 1), (N, 64, 12, 12), False),
        (nn.Linear(64, 64), (N, 64), True),
        (nn.Conv2d(8, 8, 3, padding=1, groups=2), (N, 8, 1, 1), False),  # grouped: always fold
    ],
    ids=["pooled_1x1", "large_1x1", "linear_rows", "grouped"],
)
@pytest.mark.parametrize("gates", ["top1", "equal"])
def test_weight_form_folds_or_adds_the_low_rank_path_by_cost(base, shape, low_rank, gates):
    a, b = _factors(base)
    coeffs = _coeffs(gates)
    x = torch.randn(shape)
    rows = len(compute.group_rows(coeffs).rows)
    assert compute.folds_cost_more(base, x, rows, E) == low_rank
    out = _run("weight", base, x, a, b, coeffs, {})
    assert rel_err(out, _reference(base, x, a, b, coeffs, None)) <= 1e-5


def test_group_rows_groups_images_by_row_with_views_where_it_can():
    row_a, row_b = [0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0]
    groups = compute.group_rows(torch.tensor([row_a, row_a, row_b]))
    assert groups.rows == (tuple(row_a), tuple(row_b))
    assert groups.mixed and not compute.group_rows(torch.tensor([row_a, row_a])).mixed
    assert groups.members == (slice(0, 2), slice(2, 3)) and groups.order is None
    groups = compute.group_rows(torch.tensor([row_a, row_b, row_a]))
    assert groups.members[0].tolist() == [0, 2] and groups.members[1] == slice(1, 2)
    concatenated = torch.tensor([0, 2, 1])
    assert torch.equal(concatenated[groups.order], torch.arange(3))


@pytest.mark.parametrize("name", ["linear_windows", "conv3x3", "convT"])
def test_weight_form_puts_groups_back_in_image_order(name):
    _, factory, shape, options = CASES[IDS.index(name)]
    base = factory()
    a, b = _factors(base)
    coeffs = _coeffs("top1")
    coeffs[2] = coeffs[0]  # images 0 and 2 share a row: a group that is not a slice
    x = torch.randn(shape)
    groups = compute.group_rows(coeffs)
    assert groups.order is not None
    out = _run("weight", base, x, a, b, coeffs, options)
    expected = _reference(base, x, a, b, coeffs, _output_padding(base, x, options))
    assert rel_err(out, expected) <= 1e-5


@pytest.mark.parametrize("name", ["linear_windows", "conv3x3", "convT"])
def test_weight_form_runs_several_rows_in_one_base_call_in_inference(name, monkeypatch):
    """Without gradients, images of different rows share one base call, each with its row's
    weight (cheaper than a call per row); with gradients, each row has a call of its own,
    so that its folded weight gets its gradient."""
    _, factory, shape, options = CASES[IDS.index(name)]
    base = factory()
    a, b = _factors(base)
    coeffs = _coeffs("top1")
    coeffs[2] = coeffs[0]
    x = torch.randn(shape)
    groups = compute.group_rows(coeffs)
    padding = _output_padding(base, x, options)
    calls = []
    for ops in (compute._LinearOps, compute._ConvOps, compute._ConvTransposeOps):
        monkeypatch.setattr(
            ops, "op", lambda self, *args, op=ops.op: calls.append(1) or op(self, *args)
        )

    def run() -> torch.Tensor:
        fold = lambda row: compute.fold_weight(base, a, b, row)  # noqa: E731
        return compute.folded_forward(base, x, groups, fold, padding)

    with torch.no_grad():
        out = run()
    assert calls == [] and len(groups.rows) > 1
    assert rel_err(out, _reference(base, x, a, b, coeffs, padding)) <= 1e-5
    run()
    assert len(calls) == len(groups.rows)


def test_weight_form_keeps_a_call_per_row_where_a_weight_per_image_costs_more():
    """Few positions per image and a large weight (a U-Net bottleneck on small images), a
    convolution over windows, a row of zeros or gradients: a call per row."""
    coeffs = _coeffs("top1")
    groups = compute.group_rows(coeffs)
    images = len(groups.image_rows)
    small, large = nn.Conv2d(8, 8, 1), nn.Conv2d(1024, 1024, 1)
    assert not compute.stacks_weights(small, torch.randn(images, 8, 1, 1), groups)  # gradients
    zero_row = compute.group_rows(torch.cat([coeffs[:2], torch.zeros(1, coeffs.shape[1])]))
    with torch.no_grad():
        assert compute.stacks_weights(small, torch.randn(images, 8, 1, 1), groups)
        assert not compute.stacks_weights(large, torch.randn(images, 1024, 4, 4), groups)
        assert compute.stacks_weights(large, torch.randn(images, 1024, 16, 16), groups)
        assert not compute.stacks_weights(small, torch.randn(2 * images, 8, 16, 16), groups)
        assert not compute.stacks_weights(small, torch.randn(3, 8, 16, 16), zero_row)


@pytest.mark.parametrize(
    ("name", "fused"),
    [("conv1x1", True), ("linear_nobias", True), ("conv1x1_bottleneck", False), ("linear", False)],
)
def test_gathered_form_folds_per_image_only_where_folding_is_cheaper(name, fused, monkeypatch):
    """The fused per-image fold runs on large maps; on a map smaller than the weight the base
    op plus the rank path runs instead (both match the reference above)."""
    _, factory, shape, options = CASES[IDS.index(name)]
    base = factory().requires_grad_(False)
    a, b = _factors(base)
    calls = []
    apply = compute._FusedLowRank.apply
    monkeypatch.setattr(
        compute._FusedLowRank, "apply", lambda *args: calls.append(1) or apply(*args)
    )
    out = _run("gathered", base, torch.randn(shape), a, b, _coeffs("top1"), options)
    assert out.shape[0] == shape[0]
    assert bool(calls) is fused
