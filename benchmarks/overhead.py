"""Cost of routed experts relative to the bare backbone, measured in one run.

For each backbone: inference (routed top-1/top-2, merged, peft's plain LoRA of matched
rank) as a ratio of the bare backbone's batched forward, and one training step (experts
only, and peft LoRA) as a ratio of one full training step of the base. Memory is the
training step's footprint that the method changes: saved activations plus gradients and
AdamW state of what trains (deterministic byte counts, not noisy RSS readings). Each ratio
is measured in pairs, alternating with its reference (see ``_timing.paired_ratio``).

    python benchmarks/overhead.py                      # NAFNet-w32 + Restormer, 256², batch 1 and 4
    python benchmarks/overhead.py --size 64 --backbones nafnet-tiny --batches 2   # seconds

Prints a table and writes JSON (default ``benchmarks/results/overhead.json``).
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from pathlib import Path

import peft
import torch
from _timing import median_time, paired_ratio
from torch import nn

import loraxir
from loraxir import LoraIRConfig

EXPERTS, RANK = 5, 8
DEGRADATIONS = [f"degradation_{i}" for i in range(EXPERTS)]


def _train_step(model: nn.Module, call: Callable[[], torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        call().abs().mean().backward()
        optimizer.step()

    return step


def _training_bytes(model: nn.Module, call: Callable[[], torch.Tensor]) -> int:
    """Saved-activation bytes of one forward, plus grads and 2 AdamW moments of trainables."""
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call()
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return saved + 3 * trainable


def _gates(batch: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """Top-k gates where image b prefers expert b mod E (different experts per image)."""
    gates = torch.zeros(batch, EXPERTS)
    for b in range(batch):
        chosen = [b % EXPERTS, *torch.randperm(EXPERTS, generator=generator)[: top_k - 1].tolist()]
        chosen = list(dict.fromkeys(chosen))[:top_k]
        while len(chosen) < top_k:
            chosen.append((chosen[-1] + 1) % EXPERTS)
        gates[b, chosen] = torch.softmax(torch.randn(top_k, generator=generator), 0)
    return gates


def _dense_conv_targets(model: loraxir.LoraIRModel) -> list[str]:
    """Modules peft's LoRA can take: Linear and groups=1 Conv2d among the preset's targets."""
    return [
        path
        for path, layer in model.expert_layers()
        if isinstance(layer.base_layer, nn.Linear)
        or (type(layer.base_layer) is nn.Conv2d and layer.base_layer.groups == 1)
    ]


def _lora_params_per_rank(module: nn.Module) -> int:
    """peft LoRA parameters per unit of rank: A (in * kernel) plus B (out)."""
    if isinstance(module, nn.Linear):
        return module.in_features + module.out_features
    return module.in_channels * module.kernel_size[0] * module.kernel_size[1] + module.out_channels


def bench_backbone(name: str, size: int, batches: list[int], repeats: int, seed: int) -> list[dict]:
    """All measures for one backbone, for each batch size."""
    return [row for batch in batches for row in _bench_batch(name, size, batch, repeats, seed)]


def _bench_batch(name: str, size: int, batch: int, repeats: int, seed: int) -> list[dict]:
    rows: list[dict] = []

    def record(kind: str, value: float, unit: str = "x") -> None:
        rows.append(
            {
                "backbone": name,
                "batch": batch,
                "size": size,
                "measure": kind,
                "value": value,
                "unit": unit,
            }
        )

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    base = loraxir.create_backbone(name).eval()
    x = torch.rand(batch, 3, size, size, generator=generator)

    # ---- bare backbone: the reference of every ratio, kept unwrapped
    def base_forward() -> None:
        with torch.no_grad():
            base(x)

    full = copy.deepcopy(base).train().requires_grad_(True)
    base_step = _train_step(full, lambda: full(x))
    mem_base = _training_bytes(full, lambda: full(x))
    record("base forward (s)", median_time(base_forward, repeats), "s")
    record("base full train step (s)", median_time(base_step, repeats), "s")
    with torch.no_grad():
        record(
            "base forward, one image at a time",
            paired_ratio(lambda: [base(x[i : i + 1]) for i in range(batch)], base_forward, repeats),
        )

    # ---- loraxir
    model = loraxir.get_loraxir_model(
        copy.deepcopy(base), LoraIRConfig(degradations=DEGRADATIONS, r=RANK)
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".loraxir_experts." in n:
                p.normal_(0, 0.01, generator=generator)
    for top_k in (1, 2):
        gates = _gates(batch, top_k, generator)

        def routed(g: torch.Tensor = gates) -> None:
            with torch.no_grad():
                model(x, gates=g)

        model.eval()
        record(
            f"routed top-{top_k} inference (default)", paired_ratio(routed, base_forward, repeats)
        )
        with torch.no_grad():
            model.autotune(x, gates=gates, repeats=1)
        record(
            f"routed top-{top_k} inference (autotuned)", paired_ratio(routed, base_forward, repeats)
        )
        model.train()
        step = _train_step(model, lambda g=gates: model(x, gates=g))
        record(
            f"experts-only train step top-{top_k} / full base step (default)",
            paired_ratio(step, base_step, repeats),
        )
        model.autotune(x, gates=gates, repeats=1, training=True)
        record(
            f"experts-only train step top-{top_k} / full base step (autotuned)",
            paired_ratio(step, base_step, repeats),
        )
        for _, layer in model.expert_layers():
            layer.tuned.clear()
        mem = _training_bytes(model, lambda g=gates: model(x, gates=g))
        record(f"train memory top-{top_k} / full base", mem / mem_base)
    model.eval()
    one = torch.zeros(EXPERTS)
    one[0] = 1.0
    with torch.no_grad():
        record(
            "routed, one degradation for the batch",
            paired_ratio(lambda: model(x, gates=one), base_forward, repeats),
        )
        model.merge(gates=one)
        record("merged inference", paired_ratio(lambda: model(x), base_forward, repeats))
        model.unmerge()
    trainable_ours = model.count_parameters()[0]

    # ---- peft plain LoRA on the dense layers, rank matched to our trainable count
    targets = _dense_conv_targets(model)
    per_rank = sum(_lora_params_per_rank(base.get_submodule(path)) for path in targets)
    lora_rank = max(1, round(trainable_ours / per_rank))
    lora = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=targets),
    )
    trainable_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    lora.eval()
    with torch.no_grad():
        record(
            f"peft LoRA r={lora_rank} inference (unmerged)",
            paired_ratio(lambda: lora(x), base_forward, repeats),
        )
    lora.train()
    record(
        "peft LoRA train step / full base step",
        paired_ratio(_train_step(lora, lambda: lora(x)), base_step, repeats),
    )
    record("peft LoRA train memory / full base", _training_bytes(lora, lambda: lora(x)) / mem_base)
    record("trainable params: loraxir / peft LoRA", trainable_ours / trainable_lora)
    return rows


def _table(rows: list[dict]) -> str:
    lines = [f"{'backbone':<12} {'batch':>5} {'size':>5}  {'measure':<64} {'value':>9}"]
    lines += [
        f"{r['backbone']:<12} {r['batch']:>5} {r['size']:>5}  {r['measure']:<64} "
        f"{r['value']:>8.3f}{'' if r['unit'] == 's' else r['unit']}"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["nafnet", "restormer"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "overhead.json"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.backbones:
        rows += bench_backbone(name, args.size, args.batches, args.repeats, args.seed)
        print(_table([r for r in rows if r["backbone"] == name]), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps({"settings": vars(args) | {"output": str(args.output)}, "rows": rows}, indent=2)
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
