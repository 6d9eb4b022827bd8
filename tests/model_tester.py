"""One set of model checks run for every backbone case and compute form (as peft's common
tester): a new preset or layer type gets every check by adding one line to ``CASES``.

Every numerical check compares against :func:`reference_output`, an independent
computation of ``y = base(x) + sum_i g_i * (alpha / r) * (B_i A_i applied as its own
convolution or linear map)``, one image at a time. It shares no code with the expert
layers (not their folds, forms, skipping or gate handling), so a wrong fold fails here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import loraxir
from loraxir import LoraIRConfig
from tests.conftest import randomize_experts, rel_err

DEGRADATIONS = ["noise", "rain", "haze"]
FORMS = ("activation", "weight", "batched", "gathered", "auto")
TOLERANCE = 1e-5


# ------------------------------------------------------------ the plain formula
def expert_delta(base: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Expert ``dW`` of one expert, built by hand from its factors ``a`` and ``b``."""
    if isinstance(base, nn.ConvTranspose2d):
        return (a.T @ b).reshape(base.weight.shape)
    return (b @ a).reshape(base.weight.shape)


def apply_weight(
    base: nn.Module, x: torch.Tensor, weight: torch.Tensor, output_padding: Any = None
) -> torch.Tensor:
    """``base``'s operation with another weight and no bias (the formula's ``dW * x``)."""
    if isinstance(base, nn.Linear):
        return F.linear(x, weight)
    if isinstance(base, nn.ConvTranspose2d):
        padding = base.output_padding if output_padding is None else output_padding
        return F.conv_transpose2d(
            x, weight, None, base.stride, base.padding, padding, base.groups, base.dilation
        )
    if base.padding_mode != "zeros":
        x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        return F.conv2d(x, weight, None, base.stride, 0, base.dilation, base.groups)
    return F.conv2d(x, weight, None, base.stride, base.padding, base.dilation, base.groups)


class _ReferenceLayer(nn.Module):
    """``base(x) + sum_i gate_i * scale * (dW_i * x)`` for one image; every expert is
    computed, zero gates included, so gradients reach gates and factors as the formula says."""

    def __init__(self, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.base = base
        self.factors = (a, b)  # the model's own parameters: gradients land on them
        self.scale = scale
        self.gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.factors
        out = self.base(x)
        for i in range(a.shape[0]):
            delta = apply_weight(self.base, x, expert_delta(self.base, a[i], b[i]))
            out = out + self.gate[i] * self.scale * delta
        return out


def reference_output(
    model: loraxir.LoraIRModel, x: torch.Tensor, gates: torch.Tensor
) -> torch.Tensor:
    """The formula for ``gates`` ``(B, E)``, image by image, on a copy of the backbone whose
    expert layers are replaced by :class:`_ReferenceLayer` (base weights copied before any
    merge; expert factors shared with ``model``)."""
    net = copy.deepcopy(model.model, memo={id(model.routing): None})  # not the live gates
    references = []
    for path, layer in model.expert_layers():
        a, b = layer.loraxir_experts["default"].stacked()
        reference = _ReferenceLayer(copy.deepcopy(layer.base_layer), a, b, layer.scaling("default"))
        parent, _, name = path.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, name, reference)
        references.append(reference)
    outputs = []
    for image, row in zip(x, gates, strict=True):
        for reference in references:
            reference.gate = row
        outputs.append(net(image[None]))
    return torch.cat(outputs)


# ------------------------------------------------------------------ the cases
class UserUNet(nn.Module):
    """A user's own network: reflect-padded, depthwise, dilated, grouped and strided
    convolutions, a Linear over channels, a transposed convolution; optionally with
    activation checkpointing over its encoder (recomputed during backward)."""

    def __init__(self, checkpointed: bool = False) -> None:
        super().__init__()
        self.checkpointed = checkpointed
        self.head = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.down = nn.Conv2d(8, 16, 2, stride=2)
        self.mix = nn.Linear(16, 16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.tail = nn.Conv2d(8, 3, 1)
        self.skip = nn.Conv2d(3, 3, 1)  # excluded from the experts by the case's config

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.dw(self.head(x)))
        return torch.relu(self.grouped(self.dilated(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed:
            h = checkpoint(self._encode, x, use_reentrant=False)
        else:
            h = self._encode(x)
        d = self.down(h)
        d = self.mix(d.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.skip(x) + self.tail(self.up(d) + h)


USER_UNET_CONFIG = {"target_modules": r"[a-z]+", "exclude_modules": ["skip"]}


@dataclass(frozen=True)
class Case:
    """A tiny backbone, the config options it needs, its input size and wrapped layers."""

    name: str
    backbone: Callable[[], nn.Module]
    size: int
    layers: int
    config: dict[str, Any] = field(default_factory=dict)
    slow: bool = False


def _preset(name: str) -> Callable[[], nn.Module]:
    return lambda: loraxir.create_backbone(name)


# nafnet-tiny: 5 blocks x 6 convs + intro + ending + 2 downs + 2 ups = 36 (every conv);
# restormer-tiny: 8 transformer blocks x 6 convs; swinir-tiny: 2 Swin blocks x 4 linears;
# scunet-tiny: 7 Swin-Conv blocks x 4 linears + 3 transposed-conv upsamplers.
CASES = [
    Case("nafnet-tiny", _preset("nafnet-tiny"), 32, 36),
    Case("user-unet", UserUNet, 16, 8, USER_UNET_CONFIG),
    Case("restormer-tiny", _preset("restormer-tiny"), 32, 48, slow=True),
    Case("swinir-tiny", _preset("swinir-tiny"), 32, 8, slow=True),
    Case("scunet-tiny", _preset("scunet-tiny"), 64, 31, slow=True),
]

# Per-image gates for a batch of two: top-1 (a different expert each) and soft top-2.
TOP1 = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
TOP2 = torch.tensor([[0.3, 0.7, 0.0], [0.6, 0.0, 0.4]])
FIXED = torch.tensor([0.2, 0.0, 0.8])


class ModelTester:
    """The checks for one case and compute form; each builds what it needs afresh."""

    def __init__(self, case: Case, compute: str) -> None:
        self.case = case
        self.compute = compute
        self.x = torch.rand(2, 3, case.size, case.size, generator=torch.Generator().manual_seed(5))

    # --------------------------------------------------------------- helpers
    def backbone(self) -> nn.Module:
        torch.manual_seed(123)  # the same base weights every time: the adapter is what differs
        return self.case.backbone().eval()

    def config(self, **options: Any) -> LoraIRConfig:
        return LoraIRConfig(
            degradations=DEGRADATIONS, compute=self.compute, **self.case.config, **options
        )

    def model(self, randomized: bool = True) -> loraxir.LoraIRModel:
        model = loraxir.get_loraxir_model(self.backbone(), self.config()).eval()
        if randomized:
            torch.manual_seed(7)
            randomize_experts(model)
        return model

    def _routed(self, model: nn.Module, gates: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(self.x, gates=gates)

    # ---------------------------------------------------------------- checks
    def check_fresh_experts_equal_the_base(self) -> None:
        backbone = self.backbone()
        with torch.no_grad():
            expected = backbone(self.x)
            torch.manual_seed(3)  # drop-path in training mode draws random numbers
            expected_training = backbone.train()(self.x)
        model = loraxir.get_loraxir_model(backbone.eval(), self.config()).eval()
        assert len(list(model.expert_layers())) == self.case.layers
        for gates in (TOP1, TOP2):
            assert torch.equal(self._routed(model, gates), expected)
        if self.compute == "auto":  # fresh experts that train: still the base, bit for bit
            model.train()
            torch.manual_seed(3)
            out = model(self.x, gates=TOP2)
            assert torch.equal(out, expected_training)
            out.sum().backward()
            b_grads = [p.grad for n, p in model.named_parameters() if ".B." in n]
            assert all(g is not None for g in b_grads) and any(g.abs().sum() > 0 for g in b_grads)

    def check_routed_equals_the_reference(self) -> None:
        model = self.model()
        with torch.no_grad():
            plain = reference_output(model, self.x, torch.zeros(2, 3))
            for gates in (TOP1, TOP2):
                expected = reference_output(model, self.x, gates)
                assert rel_err(expected, plain) > 1e-3, "the experts must change the output"
                assert rel_err(self._routed(model, gates), expected) <= TOLERANCE

    def check_merged_equals_the_reference_and_unmerges_exactly(self) -> None:
        model = self.model()
        original = {n: p.detach().clone() for n, p in model.model.named_parameters()}
        with torch.no_grad():
            expected = reference_output(model, self.x, FIXED.expand(2, -1))
            model.merge(gates=FIXED)
            assert rel_err(model(self.x), expected) <= TOLERANCE
            assert rel_err(model(self.x, gates=FIXED), expected) <= TOLERANCE
        model.unmerge()
        for name, param in model.model.named_parameters():
            assert torch.equal(param, original[name]), name
        plain = model.merge_and_unload(gates=FIXED)  # SCUNet's `config` is not peft's
        assert type(plain) is type(self.backbone())
        with torch.no_grad():
            assert rel_err(plain(self.x), expected) <= TOLERANCE

    def check_gradients_equal_the_reference(self) -> None:
        # float64 and eval mode: deep transformers accumulate float32 rounding in their
        # gradients, and drop-path would differ between the two sides.
        model = self.model().double()
        x = self.x.double()
        params = [p for p in model.parameters() if p.requires_grad]
        weights = torch.randn(x.shape, dtype=torch.float64)

        def grads(forward: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
            gates = TOP1.double().requires_grad_(True)  # zero gates have gradients too
            return torch.autograd.grad((forward(gates) * weights).sum(), [*params, gates])

        got = grads(lambda g: model(x, gates=g))
        expected = grads(lambda g: reference_output(model, x, g))
        assert expected[-1][:, 0].abs().sum() > 0
        for g, e in zip(got, expected, strict=True):
            assert rel_err(g, e) <= 1e-9

    def check_pinned_gate_serves_any_batch(self) -> None:
        model = self.model()
        x = torch.cat([self.x, self.x.flip(-1)])
        with torch.no_grad():
            expected = reference_output(model, x, torch.tensor([[0.0, 1.0, 0.0]] * 4))
            with loraxir.route(model, degradation="rain"):
                assert rel_err(model(x), expected) <= TOLERANCE
                assert rel_err(model.model(x[:3]), expected[:3]) <= TOLERANCE

    def check_save_load_round_trips_through_both_apis(self, folder: Path) -> None:
        model = self.model()
        expected = self._routed(model, TOP2)
        model.save_pretrained(folder / "ours")
        loaded = loraxir.LoraIRModel.from_pretrained(self.backbone(), folder / "ours")
        assert torch.equal(self._routed(loaded, TOP2), expected)
        assert [p for p, _ in loaded.expert_layers()] == [p for p, _ in model.expert_layers()]
        assert not any(p.requires_grad for p in loaded.parameters())

        # peft's forward runs the whole batch through each layer; so does ours inside
        # loraxir.route (a plain call runs it once per gate row: equal up to rounding).
        peft_model = peft.PeftModel.from_pretrained(self.backbone(), folder / "ours")
        with torch.no_grad():
            with loraxir.route(peft_model, gates=TOP2):
                by_peft = peft_model(self.x)
            with loraxir.route(model, gates=TOP2):
                assert torch.equal(by_peft, model(self.x))
        assert rel_err(by_peft, expected) <= 1e-6

        torch.manual_seed(11)
        peft_model = peft.get_peft_model(self.backbone(), self.config()).eval()
        randomize_experts(peft_model)
        with loraxir.route(peft_model, gates=TOP1), torch.no_grad():
            expected = peft_model(self.x)
        peft_model.save_pretrained(folder / "peft")
        loaded = loraxir.LoraIRModel.from_pretrained(self.backbone(), folder / "peft")
        with loraxir.route(loaded, gates=TOP1), torch.no_grad():
            assert torch.equal(loaded(self.x), expected)

    def check_add_degradation_keeps_old_outputs(self) -> None:
        model = self.model()
        with torch.no_grad():
            before = model(self.x, degradation=["noise", "haze"])
        model.add_degradation("snow")
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(n.endswith((".A.1", ".B.1")) for n in trainable)
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1
        )
        model.train()
        model(self.x, degradation="snow").square().mean().backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(self.x, degradation=["noise", "haze"]), before)
            assert not torch.equal(model(self.x, degradation=["snow", "snow"]), before)
