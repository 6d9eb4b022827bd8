"""Cost of routed experts relative to the bare backbone, measured in one run (issue 8).

Inference rows: routed top-1 and top-2 with per-image experts (default settings, then
after ``autotune``), one degradation for the whole batch, and merged weights, each as a
ratio of the best way to run the bare backbone (the fastest of one batched call, one
image at a time and, on a CPU, the chunks of ``loraxir.model.family_chunk_pixels`` pixels
that a LoraIRModel's inference runs). Training rows: one experts-only step (top-1,
top-2, and a single expert E=1 r=40 of the same trainable size) as a ratio of one full
training step of the bare network, and the step's memory as a ratio of the full step's;
the floor row is the frozen network with no experts (forward and input gradients only),
what an experts-only step costs before its experts add anything. ``autotune`` rows
compare the tuned model with the best single form applied to every layer, on the same
input. Every ratio is the median of paired ratios (candidate and reference alternate)
with its spread; a busy machine or a drifting reference is flagged (``!`` and a warning).

Memory on CPU is a deterministic byte count: the distinct storages saved for backward
plus the gradients and two AdamW moments of what trains; on CUDA it is the peak
allocated during a step.

    python benchmarks/overhead.py                 # the issue's whole table (CPU: long)
    python benchmarks/overhead.py --quick         # a representative subset, ~2 minutes
    python benchmarks/overhead.py --device cuda --amp bf16
    python benchmarks/overhead.py --backbones nafnet-tiny --sizes 32 --batches 2 --repeats 1
    python benchmarks/overhead.py --quick --keep-freed-memory   # malloc as `loraxir restore` has it

Prints a table and writes JSON (default ``benchmarks/results/overhead.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import peft
import torch
from _timing import (
    Ratio,
    machine_busy,
    median_time,
    output_file,
    paired_ratios,
    positive_int,
    seed_type,
)
from torch import nn
from tqdm import tqdm

import loraxir
from loraxir import LoraIRConfig
from loraxir.compute import FORMS
from loraxir.inference.allocator import keep_freed_cpu_memory, keeps_freed_cpu_memory
from loraxir.training.entry import run_script, script_description

EXPERTS, RANK = 5, 8
SINGLE_RANK = EXPERTS * RANK  # one expert of the same trainable size as E x r
DEGRADATIONS = [f"degradation_{i}" for i in range(EXPERTS)]
# The table: (backbone, size, batch) per section.
INFERENCE = [("nafnet", s, b) for s in (128, 256) for b in (1, 4, 16)] + [
    ("restormer", 128, b) for b in (1, 4)
]
TRAINING = [
    (name, s, b) for name in ("nafnet-small", "nafnet") for s in (64, 128) for b in (8, 16)
] + [("nafnet-small", 256, 4), ("nafnet", 256, 4)]
QUICK_INFERENCE = [("nafnet", 128, 1), ("nafnet", 128, 4)]
QUICK_TRAINING = [("nafnet-small", 64, 8)]


class Bench:
    """Measurement context: device, autocast, repeats, and the collected rows."""

    def __init__(self, device: str, amp: str | None, repeats: int, threads: int) -> None:
        self.device = torch.device(device)
        self.amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")
        self.repeats = repeats
        self.threads = threads
        self.rows: list[dict] = []
        self.warnings: list[str] = []

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.amp is None:
            yield
        else:
            with torch.autocast(self.device.type, dtype=self.amp):
                yield

    def ratio(self, fn: Callable[[], object], reference: Callable[[], object]) -> Ratio:
        with self.autocast():
            return paired_ratios(fn, reference, self.repeats, self.sync)

    def seconds(self, fn: Callable[[], object]) -> float:
        with self.autocast():
            return median_time(fn, self.repeats, self.sync)

    def check_machine(self) -> None:
        if self.device.type == "cpu":
            warning = machine_busy(self.threads)
            if warning and warning not in self.warnings:
                self.warnings.append(warning)
                print(f"WARNING: {warning}", file=sys.stderr, flush=True)

    def record(self, setting: tuple[str, int, int], measure: str, value: float | Ratio) -> None:
        name, size, batch = setting
        row = {"backbone": name, "size": size, "batch": batch, "measure": measure}
        if isinstance(value, Ratio):
            row |= {
                "value": value.median,
                "low": value.low,
                "high": value.high,
                "reference_drift": value.drift,
                "unit": "x",
            }
            if value.drifted:
                row["warning"] = "reference drifted between repeats: machine load changed"
        else:
            row |= {"value": value, "unit": "s" if measure.endswith("(s)") else "x"}
        self.rows.append(row)


# ------------------------------------------------------------------------- helpers
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


def _training_gates(
    batch: int, top_k: int, experts: int, generator: torch.Generator
) -> torch.Tensor:
    """:func:`_gates` of the ``EXPERTS`` experts, or all ones for a single expert (top-k
    columns of five experts cut to one would leave most images without an expert)."""
    return _gates(batch, top_k, generator) if experts == EXPERTS else torch.ones(batch, 1)


def _routed(
    base: nn.Module, generator: torch.Generator, experts: int = EXPERTS, rank: int = RANK
) -> loraxir.LoraIRModel:
    """A routed copy of ``base`` with trained-looking (non-zero) experts."""
    names = DEGRADATIONS[:experts]
    model = loraxir.get_loraxir_model(
        copy.deepcopy(base), LoraIRConfig(degradations=names, r=rank, top_k=min(2, experts))
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".loraxir_experts." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return model


def _train_step(model: nn.Module, call: Callable[[], torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        call().float().abs().mean().backward()
        optimizer.step()

    return step


def _frozen_floor(base: nn.Module) -> nn.Module:
    """A copy of ``base`` whose first parameter alone trains: the backward pass reaches every
    layer (input gradients) but forms no other weight gradient. An experts-only step costs
    this plus what the experts add, so it is the lowest such a step can go."""
    floor = copy.deepcopy(base).requires_grad_(False)
    next(floor.parameters()).requires_grad_(True)
    return floor


def _training_bytes(bench: Bench, model: nn.Module, step: Callable[[], None], call) -> float:
    """Memory of one training step (see the module docstring)."""
    if bench.device.type == "cuda":
        with bench.autocast():
            step()
        torch.cuda.synchronize(bench.device)
        torch.cuda.reset_peak_memory_stats(bench.device)
        with bench.autocast():
            step()
        return float(torch.cuda.max_memory_allocated(bench.device))
    kept: list[torch.UntypedStorage] = []  # held, so that no address is reused in the call

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept.append(tensor.untyped_storage())
        return tensor

    with bench.autocast(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call()
    saved = {storage.data_ptr(): storage.nbytes() for storage in kept}
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return float(sum(saved.values()) + 3 * trainable)


def _set_forms(model: loraxir.LoraIRModel, form: str) -> None:
    """``form`` on every layer in both phases, as an ``autotune`` candidate runs (``"auto"``:
    back to the default, the cost model's plan; also what the model-level grouping of
    inference calls reads, so a row timed after ``autotune`` is a default one again)."""
    model.set_compute_choice({"inference": form, "training": form})


def _best_fixed(
    bench: Bench, model: loraxir.LoraIRModel, run: Callable[[], None], reference
) -> str:
    """The form that, applied to every layer of ``model``, gives the smallest ratio to
    ``reference``; ``model`` is left with that form on every layer."""
    ratios = {}
    for form in FORMS:
        _set_forms(model, form)
        try:
            ratios[form] = bench.ratio(run, reference).median
        except loraxir.errors.LoraIRError:  # a form that cannot run here (dropout)
            continue
    best = min(ratios, key=ratios.__getitem__)
    _set_forms(model, best)
    return best


def _tuned_against_best_fixed(
    bench: Bench,
    model: loraxir.LoraIRModel,
    runner: Callable[[nn.Module], Callable[[], None]],
    reference: Callable[[], None],
) -> Ratio:
    """``model`` as ``autotune`` left it against the best fixed form, timed in pairs.

    Dividing two separately measured ratios would compare the tuned model with the least
    of several noisy medians, which is biased low; here a copy keeps the tuned forms and
    ``model`` takes the best fixed one (found against ``reference``), and the two alternate.
    """
    tuned = copy.deepcopy(model)
    _best_fixed(bench, model, runner(model), reference)
    ratio = bench.ratio(runner(tuned), runner(model))
    _set_forms(model, "auto")
    return ratio


def _peft_lora(base: nn.Module, model: loraxir.LoraIRModel) -> tuple[nn.Module, int]:
    """peft's plain LoRA on the layers it can take (Linear, groups=1 Conv2d among our
    targets), its rank matched to our trainable parameter count; ``(model, rank)``."""
    targets = [
        path
        for path, layer in model.expert_layers()
        if type(layer.base_layer) is nn.Linear
        or (type(layer.base_layer) is nn.Conv2d and layer.base_layer.groups == 1)
    ]
    per_rank = 0
    for path in targets:
        module = base.get_submodule(path)
        if isinstance(module, nn.Linear):
            per_rank += module.in_features + module.out_features
        else:
            per_rank += module.in_channels * math.prod(module.kernel_size) + module.out_channels
    rank = max(1, round(model.count_parameters()[0] / per_rank))
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets)
    return peft.get_peft_model(copy.deepcopy(base), config), rank


# ------------------------------------------------------------------------ sections
def _setup(
    bench: Bench, setting: tuple[str, int, int], seed: int
) -> tuple[nn.Module, torch.Tensor, torch.Generator]:
    """``(backbone, images, generator)`` of one setting, seeded; warns when the CPU is busy."""
    name, size, batch = setting
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    base = loraxir.create_backbone(name).to(bench.device)
    x = torch.rand(batch, 3, size, size, generator=generator).to(bench.device)
    bench.check_machine()
    return base, x, generator


def _chunk_size(bench: Bench, base: nn.Module, x: torch.Tensor) -> int:
    """Images per backbone call that a LoraIRModel's inference uses for ``x`` here."""
    if bench.device.type != "cpu" or keeps_freed_cpu_memory():
        return x.shape[0]
    pixels = loraxir.model.family_chunk_pixels(base)
    return loraxir.model.images_per_call(x.shape[-2], x.shape[-1], pixels)


def bench_inference(bench: Bench, setting: tuple[str, int, int], seed: int) -> None:
    batch = setting[2]
    base, x, generator = _setup(bench, setting, seed)
    base.eval()

    @torch.no_grad()
    def batched() -> None:
        base(x)

    def in_chunks(size: int) -> Callable[[], None]:
        @torch.no_grad()
        def run() -> None:
            for i in range(0, batch, size):
                base(x[i : i + size])

        return run

    # The bare backbone's best way: one call, one image at a time, or the chunks a
    # LoraIRModel runs on this device (model.inference_chunk_pixels).
    candidates = {"one image at a time": in_chunks(1)}
    chunk = _chunk_size(bench, base, x)
    if 1 < chunk < batch:
        candidates[f"{chunk} images per call"] = in_chunks(chunk)
    reference, best = batched, 1.0
    for label, candidate in candidates.items():
        ratio = bench.ratio(candidate, batched)
        bench.record(setting, f"bare: {label} / one batched call", ratio)
        if ratio.median < best:
            reference, best = candidate, ratio.median
    model = _routed(base, generator).eval()
    for top_k in (1, 2):
        gates = _gates(batch, top_k, generator).to(bench.device)

        @torch.no_grad()
        def routed(g: torch.Tensor = gates) -> None:
            model(x, gates=g)

        bench.record(
            setting, f"routed top-{top_k} inference (default)", bench.ratio(routed, reference)
        )
        with bench.autocast():
            model.autotune(x, gates=gates, repeats=1)
        tuned = bench.ratio(routed, reference)
        bench.record(setting, f"routed top-{top_k} inference (autotuned)", tuned)
        if top_k == 1:

            def runner(m: nn.Module, g: torch.Tensor = gates) -> Callable[[], None]:
                return torch.no_grad()(lambda: m(x, gates=g))

            against = _tuned_against_best_fixed(bench, model, runner, reference)
            bench.record(setting, "autotuned / best fixed form (inference top-1)", against)
        _set_forms(model, "auto")
    one = torch.zeros(EXPERTS, device=bench.device)
    one[0] = 1.0
    with torch.no_grad():
        bench.record(
            setting,
            "routed, one degradation for the batch",
            bench.ratio(lambda: model(x, gates=one), reference),
        )
        model.merge(gates=one)
        bench.record(setting, "merged inference", bench.ratio(lambda: model(x), reference))
        model.unmerge()
        lora, rank = _peft_lora(base, model)
        lora.eval()
        ratio = bench.ratio(lambda: lora(x), reference)
        bench.record(setting, f"peft LoRA r={rank} inference (unmerged)", ratio)


def bench_training(bench: Bench, setting: tuple[str, int, int], seed: int) -> None:
    batch = setting[2]
    base, x, generator = _setup(bench, setting, seed)
    base.train()
    full = copy.deepcopy(base).requires_grad_(True)
    full_step = _train_step(full, lambda: full(x))
    full_memory = _training_bytes(bench, full, full_step, lambda: full(x))
    bench.record(setting, "full base train step (s)", bench.seconds(full_step))
    floor = _frozen_floor(base)
    floor_step = _train_step(floor, lambda: floor(x))
    ratio = bench.ratio(floor_step, full_step)
    bench.record(setting, "frozen base, no experts (floor) / full base step", ratio)
    variants = [
        ("top-1", 1, EXPERTS, RANK),
        ("top-2", 2, EXPERTS, RANK),
        (f"single expert E=1 r={SINGLE_RANK}", 1, 1, SINGLE_RANK),
    ]
    for label, top_k, experts, rank in variants:
        model = _routed(base, generator, experts, rank).train()
        gates = _training_gates(batch, top_k, experts, generator).to(bench.device)
        step = _train_step(model, lambda m=model, g=gates: m(x, gates=g))
        ratio = bench.ratio(step, full_step)
        bench.record(setting, f"experts-only train step {label} / full base step", ratio)
        memory = _training_bytes(bench, model, step, lambda m=model, g=gates: m(x, gates=g))
        bench.record(setting, f"train memory {label} / full base", memory / full_memory)
        if top_k == 1 and experts == EXPERTS:
            with bench.autocast():
                model.autotune(x, gates=gates, repeats=1, training=True)
            tuned = bench.ratio(step, full_step)
            bench.record(setting, f"experts-only train step {label} (autotuned)", tuned)

            def runner(m: nn.Module, g: torch.Tensor = gates) -> Callable[[], None]:
                return _train_step(m, lambda: m(x, gates=g))

            against = _tuned_against_best_fixed(bench, model, runner, full_step)
            bench.record(setting, "autotuned / best fixed form (training top-1)", against)
            _bench_peft_training(bench, setting, base, model, x, full_step, full_memory)


def _bench_peft_training(bench, setting, base, model, x, full_step, full_memory) -> None:
    """peft's plain LoRA (rank matched to ``model``'s trainable count) in training."""
    ours = model.count_parameters()[0]
    lora, _ = _peft_lora(base, model)
    lora.train()
    step = _train_step(lora, lambda: lora(x))
    bench.record(setting, "peft LoRA train step / full base step", bench.ratio(step, full_step))
    memory = _training_bytes(bench, lora, step, lambda: lora(x))
    bench.record(setting, "peft LoRA train memory / full base", memory / full_memory)
    params = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    bench.record(setting, "trainable params: loraxir / peft LoRA", ours / params)


# --------------------------------------------------------------------------- output
def _table(rows: list[dict]) -> str:
    width = max([58, *(len(r["measure"]) + 1 for r in rows)])  # values in one column
    lines = [f"{'backbone':<13}{'size':>5}{'batch':>6}  {'measure':<{width}}{'value':>9}  spread"]
    for r in rows:
        spread = f"{r['low']:.2f}-{r['high']:.2f}" if "low" in r else ""
        flag = " !" if "warning" in r else ""
        unit = r["unit"] if r["unit"] == "x" else f" {r['unit']}"
        lines.append(
            f"{r['backbone']:<13}{r['size']:>5}{r['batch']:>6}  {r['measure']:<{width}}"
            f"{r['value']:>8.3f}{unit}  {spread}{flag}"
        )
    return "\n".join(lines)


def _settings(args: argparse.Namespace) -> tuple[list, list]:
    """(inference, training) settings: the issue's table, --quick, or the given grid."""
    if args.backbones or args.sizes or args.batches:
        grid = [
            (name, size, batch)
            for name in args.backbones or ["nafnet"]
            for size in args.sizes or [128]
            for batch in args.batches or [4]
        ]
        return grid, grid
    if args.quick:
        return QUICK_INFERENCE, QUICK_TRAINING
    return INFERENCE, TRAINING


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    parser.add_argument("--quick", action="store_true", help="a representative subset")
    parser.add_argument("--backbones", nargs="+", help="a grid instead of the issue's table")
    parser.add_argument("--sizes", "--size", nargs="+", type=positive_int, dest="sizes")
    parser.add_argument("--batches", nargs="+", type=positive_int)
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["inference", "training"],
        choices=("inference", "training"),
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--amp", choices=["bf16", "fp16"], help="autocast dtype")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads on CPU")
    parser.add_argument("--seed", type=seed_type, default=0)
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="have glibc keep freed memory for reuse, as `loraxir restore` does on a CPU",
    )
    parser.add_argument(
        "--output", type=output_file, default=Path(__file__).parent / "results" / "overhead.json"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda: this machine has no CUDA GPU (run benchmarks/gpu_overhead.sh on one)"
        )
    if args.keep_freed_memory:
        keep_freed_cpu_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick and (args.backbones or args.sizes or args.batches):
        parser.error("--quick runs its own subset; drop it, or --backbones/--sizes/--batches")
    unknown = sorted(set(args.backbones or []) - set(loraxir.list_backbones()))
    if unknown:  # before minutes of other settings, whose rows an error would lose
        parser.error(f"unknown backbone(s) {unknown}; see loraxir.list_backbones()")
    bench = Bench(args.device, args.amp, args.repeats, torch.get_num_threads())
    inference, training = _settings(args)
    sections = {"inference": (inference, bench_inference), "training": (training, bench_training)}
    planned = [(section, setting) for section in args.sections for setting in sections[section][0]]
    # A setting takes minutes on a CPU: a bar over them, each table printed as it completes.
    # Stopped early (Ctrl-C, `timeout`'s SIGTERM in gpu_overhead.sh: run_script's handler,
    # exit 130 or 143) or by an error in a later setting (out of memory on a GPU), it writes
    # the rows of the settings it finished, marked incomplete, then stops as it was stopped.
    start = 0
    try:
        for section, setting in tqdm(planned, desc="overhead settings", unit="setting"):
            start = len(bench.rows)
            sections[section][1](bench, setting, args.seed)
            bench.check_machine()  # the load average now counts this run's own threads
            tqdm.write(_table(bench.rows[start:]))
    except BaseException:
        del bench.rows[start:]
        _write(args, bench, complete=False)
        raise
    _write(args, bench, complete=True)


def _write(args: argparse.Namespace, bench: Bench, complete: bool) -> None:
    """The JSON of the finished settings, written whole (a temporary file renamed over the
    output); none when no setting finished, so that an earlier run's file stays."""
    for warning in bench.warnings:
        print(f"WARNING: {warning}", flush=True)
    if not bench.rows:
        print(f"Nothing finished; {args.output} was not written.", flush=True)
        return
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings_json = vars(args) | {"output": str(args.output), "threads": bench.threads}
    record = {"settings": settings_json, "complete": complete, "warnings": bench.warnings}
    partial = args.output.with_name(f".{args.output.name}.partial")
    partial.write_text(json.dumps(record | {"rows": bench.rows}, indent=2))
    os.replace(partial, args.output)
    early = "" if complete else f" (stopped early: {len(bench.rows)} rows)"
    print(f"wrote {args.output}{early}", flush=True)


if __name__ == "__main__":
    run_script(main, 'The finished settings\' rows were written ("complete": false).')
