"""Degradation throughput per suite, and data loading against a training step.

1. Every task of every built-in suite degrades a batch of clean crops (default 16 × 256²,
   CPU); we report images per second per task, and per suite as if its tasks were mixed
   evenly (total images / total time).
2. Loading one batch of ``SyntheticPairs`` patches in the main process (decode, crop,
   degrade, collate) is timed against one training step (forward, L1 loss, backward,
   AdamW) of each tiny backbone on that batch. A ratio below 1 means one loader worker
   keeps up with training; the ratio is an upper bound, since workers load in parallel.

Prints tables and writes JSON (default ``benchmarks/results/degradation_throughput.json``).

    python benchmarks/degradation_throughput.py [--batch 16] [--size 256] [--patch 128] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from itertools import chain, islice, repeat
from pathlib import Path

import torch
from _timing import output_file, positive_int, seed_type
from torch.utils.data import DataLoader

from loraxir import degradations
from loraxir.backbones import create_backbone
from loraxir.data import SKIMAGE_IMAGES, SyntheticPairs, skimage_image
from loraxir.degradations.gallery import square
from loraxir.training.entry import run_script, script_description

TINY_BACKBONES = ("nafnet-tiny", "swinir-tiny")


def clean_batch(batch: int, size: int) -> torch.Tensor:
    """``batch`` square crops of scikit-image photos, float ``(B, 3, size, size)``."""
    names = [SKIMAGE_IMAGES[i % len(SKIMAGE_IMAGES)] for i in range(batch)]
    return torch.cat([square(skimage_image(name), size) for name in names])


def time_call(fn, repeats: int) -> float:
    """Seconds per call: one warm-up call, then the mean of ``repeats`` calls."""
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def suite_throughput(images: torch.Tensor, repeats: int, seed: int) -> dict[str, dict]:
    results = {}
    generator = torch.Generator().manual_seed(seed)
    for name in degradations.available_suites():
        suite = degradations.suite(name)
        tasks = {}
        for task in suite.task_names:
            seconds = time_call(lambda s=suite, t=task: s.degrade(images, t, generator), repeats)
            tasks[task] = images.shape[0] / seconds
        total_time = sum(images.shape[0] / rate for rate in tasks.values())
        results[name] = {"tasks": tasks, "mixed": images.shape[0] * len(tasks) / total_time}
    return results


def loading_versus_training(
    data: SyntheticPairs, batch: int, batches: int, seed: int
) -> dict[str, dict]:
    """Seconds to load a full batch, and per training step, per tiny backbone. The loader
    goes round the data as often as ``batches`` full batches need (a short last batch
    would make loading look cheaper)."""
    loader = DataLoader(
        data,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    next(iter(loader))
    start = time.perf_counter()
    sample = list(islice(chain.from_iterable(repeat(loader)), batches))
    load = (time.perf_counter() - start) / batches
    results = {}
    for name in TINY_BACKBONES:
        model = create_backbone(name)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(items=sample[0], net=model, opt=optimizer) -> None:
            loss = (net(items["lq"]) - items["gt"]).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        seconds = time_call(step, batches)
        results[name] = {"load_s": load, "step_s": seconds, "load_over_step": load / seconds}
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument(
        "--size", type=positive_int, default=256, help="side of the throughput images"
    )
    parser.add_argument("--patch", type=positive_int, default=128, help="training patch side")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--seed", type=seed_type, default=0, help="seed of the drawn degradations")
    parser.add_argument(
        "--output",
        type=output_file,
        default=Path("benchmarks/results/degradation_throughput.json"),
    )
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    patches = {"split": "train", "seed": args.seed}
    data = SyntheticPairs("skimage", "five_task", args.patch, **patches)
    if args.batch > len(data):  # more patches per photo, so that one full batch exists
        repeats = -(-args.batch // len(data))
        data = SyntheticPairs("skimage", "five_task", args.patch, repeats=repeats, **patches)

    throughput = suite_throughput(clean_batch(args.batch, args.size), args.repeats, args.seed)
    print(
        f"Degradation throughput, images/s at {args.size}², batch {args.batch}, CPU "
        f"({torch.get_num_threads()} threads)"
    )
    print(f"{'suite':<14}{'task':<14}{'images/s':>10}")
    for suite, result in throughput.items():
        for task, rate in result["tasks"].items():
            print(f"{suite:<14}{task:<14}{rate:>10.1f}")
        print(f"{suite:<14}{'(mixed)':<14}{result['mixed']:>10.1f}")

    ratio = loading_versus_training(data, args.batch, args.repeats, args.seed)
    print(
        f"\nLoading a batch (SyntheticPairs five_task, {args.patch}² patches, batch "
        f"{args.batch}, main process) vs one training step"
    )
    print(f"{'backbone':<14}{'load s':>9}{'step s':>9}{'load/step':>11}")
    for name, result in ratio.items():
        print(
            f"{name:<14}{result['load_s']:>9.3f}{result['step_s']:>9.3f}"
            f"{result['load_over_step']:>11.2f}"
        )

    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "settings": {
            **vars(args),
            "output": str(args.output),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
        },
        "throughput_images_per_s": throughput,
        "loading_vs_training_step": ratio,
    }
    args.output.write_text(json.dumps(report, indent=2))
    print(f"\nWrote {args.output}")


if __name__ == "__main__":
    run_script(main, "Nothing was written.")
