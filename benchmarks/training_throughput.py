"""Training throughput (patches/s) of a small NAFNet on the CPU: pre-training, fine-tuning,
and one versus two processes.

    python benchmarks/training_throughput.py            # nafnet-small, 64² patches, batch 8
    python benchmarks/training_throughput.py --quick    # nafnet-tiny, 32², a few steps

Measures whole optimizer steps (forward, backward, AdamW) on fixed random batches, so
the numbers are the network's cost, not the synthetic degradations' (see
``degradation_throughput.py`` for those):

* pre-training, full network + DAM blocks driven by a frozen router (``GuidedBackbone``),
  and the same network without DAM;
* fine-tuning, experts only, top-1 gates from labels, with ``compute="batched"`` (what the
  recipes' CPU configs pin) and with the default ``"auto"``;
* the fine-tuning step under Accelerate with 1 and with 2 processes (torchrun, gloo), the
  same global batch and the same total number of threads, and the speed-up.

Run it alone on the machine: other jobs make CPU timings meaningless. Prints a table and
writes JSON (default ``benchmarks/results/training_throughput.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _timing import output_file, positive_int, seed_type
from torch import nn
from tqdm import tqdm

from loraxir.training.entry import run_script, script_description

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["noise", "rain", "haze", "blur", "low_light"]


def _router(embed_dim: int = 64) -> nn.Module:
    from loraxir.router import DegradationRouter

    return DegradationRouter.from_encoder(
        "cnn-tiny", CLASSES, image_size=32, hidden_dim=128, embed_dim=embed_dim
    )


def _backbone(name: str, seed: int) -> nn.Module:
    from loraxir.backbones import create_backbone

    torch.manual_seed(seed)
    return create_backbone(name)


def _experts(name: str, seed: int, compute: str = "batched") -> nn.Module:
    """Five rank-8 experts on ``name``; ``"batched"`` is the form the recipes' CPU configs
    pin (their published numbers were made with it), ``"auto"`` the library's default."""
    from loraxir import LoraIRConfig, get_loraxir_model

    config = LoraIRConfig(degradations=CLASSES, r=8, compute=compute)
    return get_loraxir_model(_backbone(name, seed), config)


def _gates(batch: int) -> torch.Tensor:
    return torch.eye(len(CLASSES))[torch.arange(batch) % len(CLASSES)]


def _step_fn(
    model: nn.Module, batch: int, patch: int, routed: bool, seed: int
) -> Callable[[], None]:
    """One optimizer step of ``model`` on a fixed batch (L1 loss)."""
    generator = torch.Generator().manual_seed(seed)
    lq = torch.rand(batch, 3, patch, patch, generator=generator)
    gt = torch.rand(batch, 3, patch, patch, generator=generator)
    extra = {"gates": _gates(batch)} if routed else {}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        loss = (model(lq, **extra) - gt).abs().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def patches_per_second(step: Callable[[], None], batch: int, steps: int) -> float:
    """Patches per second over ``steps`` timed steps, after one warm-up step."""
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def single_process_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    from loraxir.guidance import GuidedBackbone

    cases = {
        "pre-training: full network + DAM (frozen router)": (
            lambda: GuidedBackbone(_backbone(args.backbone, args.seed), _router()),
            False,
        ),
        "pre-training: full network, no DAM": (lambda: _backbone(args.backbone, args.seed), False),
        "fine-tuning: experts only (batched, top-1)": (
            lambda: _experts(args.backbone, args.seed),
            True,
        ),
        "fine-tuning: experts only (auto, top-1)": (
            lambda: _experts(args.backbone, args.seed, "auto"),
            True,
        ),
    }
    rows = []
    for name, (build, routed) in tqdm(cases.items(), desc="single-process steps", unit="case"):
        model = build().train()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        step = _step_fn(model, args.batch, args.patch, routed, args.seed)
        rate = patches_per_second(step, args.batch, args.steps)
        rows.append({"measure": name, "processes": 1, "threads": torch.get_num_threads(),
                     "trainable_parameters": trainable, "patches_per_s": rate})  # fmt: skip
    return rows


def worker(args: argparse.Namespace) -> None:
    """The fine-tuning step under Accelerate in this process (one of ``WORLD_SIZE``)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = _experts(args.backbone, args.seed).train()
    share = args.batch // accelerator.num_processes
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(args.seed + accelerator.process_index)
    lq = torch.rand(share, 3, args.patch, args.patch, generator=generator)
    gates = _gates(share)

    def step() -> None:
        loss = (model(lq, gates=gates) - lq).abs().mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    rate = patches_per_second(step, args.batch, args.steps)
    if accelerator.is_main_process:
        record = {"processes": accelerator.num_processes, "threads": torch.get_num_threads(),
                  "patches_per_s": rate}  # fmt: skip
        Path(args.worker).write_text(json.dumps(record))
    accelerator.wait_for_everyone()


def scaling_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """1 versus 2 processes (torchrun, gloo), the same global batch and total threads."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for processes in tqdm((1, 2), desc="1 vs 2 processes", unit="run"):
            out = Path(folder) / f"p{processes}.json"
            # The same cores in total: an even count, split over the processes.
            threads = 2 * max(1, args.threads // 2) // processes
            command = [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={processes}", __file__, "--worker", str(out),
                "--backbone", args.backbone, "--batch", str(args.batch),
                "--patch", str(args.patch), "--steps", str(args.steps), "--seed", str(args.seed),
                *(["--keep-freed-memory"] if args.keep_freed_memory else []),
            ]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
            result = _run_group(command, env)
            if result.returncode != 0:
                raise RuntimeError(f"{processes}-process run failed:\n{result.stderr[-3000:]}")
            record = json.loads(out.read_text())
            rows.append({"measure": "fine-tuning under Accelerate", **record})
    rows[1]["speedup_vs_1_process"] = rows[1]["patches_per_s"] / rows[0]["patches_per_s"]
    return rows


def _run_group(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``command`` in a process group of its own, the whole group killed if this run is
    stopped: torchrun's workers outlived it (stuck, ignoring SIGTERM) when ``timeout`` or a
    scheduler signalled this process alone."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate()
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'measure':<52}{'procs':>6}{'threads':>8}{'patches/s':>11}"]
    for row in rows:
        lines.append(
            f"{row['measure']:<52}{row['processes']:>6}{row['threads']:>8}"
            f"{row['patches_per_s']:>11.1f}"
        )
    speedup = rows[-1].get("speedup_vs_1_process")
    if speedup is not None:
        lines.append(f"2 processes vs 1: {speedup:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    parser.add_argument("--backbone", default="nafnet-small")
    parser.add_argument("--patch", type=positive_int, default=64, help="training patch side")
    parser.add_argument("--batch", type=positive_int, default=8, help="global batch (even)")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed optimizer steps")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--quick", action="store_true", help="nafnet-tiny, 32², 2 steps, 2 threads in all"
    )
    parser.add_argument(
        "--output", type=output_file, default=ROOT / "benchmarks/results/training_throughput.json"
    )
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="have glibc keep freed memory for reuse, as `loraxir restore` does on a CPU",
    )
    parser.add_argument("--seed", type=seed_type, default=0, help="seed of weights and batches")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.backbone, args.patch, args.batch, args.steps = "nafnet-tiny", 32, 4, 2
        args.threads = 1
    if args.batch % 2:
        parser.error(f"--batch must be even (it is split over 2 processes), got {args.batch}")
    if args.keep_freed_memory:
        from loraxir.inference.allocator import keep_freed_cpu_memory

        keep_freed_cpu_memory()
    if args.worker:
        worker(args)
        return {}
    torch.set_num_threads(args.threads)
    rows = single_process_rows(args) + scaling_rows(args)
    report = {"backbone": args.backbone, "patch": args.patch, "batch": args.batch,
              "steps": args.steps, "seed": args.seed,
              "keep_freed_memory": args.keep_freed_memory,
              "rows": rows}  # fmt: skip
    print(format_rows(rows))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    run_script(main, "Nothing was written.")
