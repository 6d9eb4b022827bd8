"""``make quickstart``: train an all-in-one restorer with routed experts on the CPU and see
what it does, in under 10 minutes on 2 cores.

    python benchmarks/quickstart.py [--output-dir outputs/quickstart] [--overwrite]

The whole LoRA-IR pipeline at a small size (``benchmarks/configs/quick.yaml``): a
degradation router, degradation-guided pre-training of a small NAFNet with DAM, then at
equal steps the base network trained on, one plain LoRA, and LoRA-IR's routed experts;
each tested on photos none of them trained on. Then the saved LoRA-IR adapter is loaded
back (``loraxir.load_adapter``) and restores the whole test photos under each
degradation. It prints progress, the comparison table, and where everything is.

Ctrl-C stops it; running the same command again resumes (finished stages are kept, the
interrupted one continues from its last checkpoint). An earlier run's folder with other
settings is never overwritten without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import all_in_one
from _all_in_one_config import config_json, load_bench_config
from _all_in_one_methods import Paths
from _all_in_one_stages import DONE, RESUME_HINT, atomic_path, prepare_run, run_stage, stage_done
from _timing import positive_int, seed_type

from loraxir.training.entry import run_script, script_description

ADAPTER_METHOD = "lora_ir_top1"


def restore_test_photos(root: Path, suite_name: str, seed: int, max_side: int) -> dict[str, Any]:
    """Degrade each whole test photo (downscaled to at most ``max_side``) with each task of
    the suite and restore it with the saved adapter, loaded from its folder alone; PNGs
    under ``root/restored_photos``."""
    import torch
    from PIL import Image

    import loraxir
    from loraxir import degradations
    from loraxir.data import open_source
    from loraxir.data.patches import seeded_generator

    paths = Paths(root, suite_name, seed, False)
    model = loraxir.load_adapter(paths.method(ADAPTER_METHOD) / "adapter")
    suite = degradations.suite(suite_name)
    photos = open_source(str(paths.test))
    written = 0
    for index, photo in enumerate(photos.ids):
        clean = photos.load(index).float()[None] / 255
        scale = max_side / max(clean.shape[-2:])
        if scale < 1:
            clean = torch.nn.functional.interpolate(
                clean, scale_factor=scale, mode="bicubic", antialias=True
            ).clamp(0, 1)
        for task in range(len(suite.tasks)):
            degraded, _ = suite.degrade(clean, task, seeded_generator(seed, index, task))
            with torch.no_grad():
                restored = model(degraded.clamp(0, 1))
            stem = Path(photo).stem
            for kind, image in (("degraded", degraded), ("restored", restored)):
                pixels = image[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
                path = root / "restored_photos" / suite.task_names[task] / f"{stem}_{kind}.png"
                with atomic_path(path) as temporary:
                    Image.fromarray(pixels).save(temporary, "PNG")
                written += 1
    return {"images": written, "max_side": max_side}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=" ".join(script_description(__doc__).split()).replace("``", "")
    )
    parser.add_argument(
        "--output-dir", default="outputs/quickstart", help="Where every result goes."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an earlier run.")
    parser.add_argument("--scale", default="quick", help=argparse.SUPPRESS)
    parser.add_argument(
        "--max-side", type=positive_int, default=512, help="Side of restored photos."
    )
    parser.add_argument(
        "--seed",
        type=seed_type,
        default=None,
        help="Seed of pre-training, the methods and the test draws (default 0; the shared "
        "router keeps seed 0).",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    config = load_bench_config(
        args.scale, overrides=[] if args.seed is None else [f"seeds=[{args.seed}]"]
    )
    root = Path(args.output_dir).resolve()  # as all_in_one.py: however it is spelled
    resuming = prepare_run(root, config_json(config), args.overwrite)
    suite, seed = config.suites[0], config.seeds[0]
    print(
        f"loraxir quickstart ({'resuming' if resuming else 'fresh run'}, output: {root})\n"
        f"  {suite}: router -> DAM pre-training ({config.pretrain_steps} steps) -> "
        f"{', '.join(config.methods)} ({config.adapter_steps} steps each) -> test on "
        "held-out photos. Ctrl-C to stop; rerun to resume.",
        flush=True,
    )
    command = shlex.join(["python", "benchmarks/quickstart.py", *argv])
    results = all_in_one.run(config, root, command)
    photos = root / "restored_photos"
    done = stage_done(photos)
    if done is not None and done["result"].get("max_side") != args.max_side:
        (photos / DONE).unlink()  # restored at another --max-side: restore them again
    run_stage(
        photos,
        "restore the whole test photos with the saved adapter",
        lambda: restore_test_photos(root, suite, seed, args.max_side),
        lambda message: print(message, flush=True),
    )
    adapter = Paths(root, suite, seed, False).method(ADAPTER_METHOD) / "adapter"
    print(
        "\nWhere everything is:\n"
        f"  adapter (LoRA-IR, self-contained): {adapter}\n"
        f"      model = loraxir.load_adapter({str(adapter)!r}); restored = model(images)\n"
        f"  tables:   {root / 'results.md'}  (all numbers: {root / 'results.json'})\n"
        f"  figures:  {root / 'figures'}/\n"
        f"  restored test crops per method: {root / 'restored' / suite}/<task>/<method>.png\n"
        f"  restored whole test photos:     {root / 'restored_photos'}/<task>/\n"
        "  The 3-seed CPU table is in docs/benchmarks.md (python benchmarks/all_in_one.py "
        "--scale cpu).",
        flush=True,
    )
    return results


if __name__ == "__main__":
    run_script(main, RESUME_HINT)
