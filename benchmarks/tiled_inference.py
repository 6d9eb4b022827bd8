"""Tiled inference: peak memory and time per megapixel, and merged vs routed throughput.

    python benchmarks/tiled_inference.py                     # shipped adapter, 1-64 MP
    python benchmarks/tiled_inference.py --quick --random    # smoke run, random adapter

Each image size runs in a fresh process, so its peak resident memory (``ru_maxrss``) is
its own; "working" memory is the peak minus the memory held once the model and the input
image are loaded, i.e. what tiling adds (output array, tile strip, activations). The
folder part restores ``--images`` photos with the router (routed) and with one class's
experts merged (``--degradation``, the CLI's fast path). Run it alone on the machine:
timings taken beside other jobs are noise. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _timing import output_file, positive_float, positive_int, seed_type

from loraxir.inference.tiling import check_tiling
from loraxir.pretrained import describe_adapter, find_adapter
from loraxir.training.entry import run_script, script_description


def _photo(height: int, width: int, seed: int) -> np.ndarray:
    from skimage import data

    rng = np.random.default_rng(seed)
    image = np.resize(data.astronaut(), (height, width, 3)).astype(np.float32)
    return np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure_size(task: tuple[str, float, int, int, int]) -> dict[str, float]:
    """In a child process: restore one ``megapixels`` image, return time and memory."""
    import torch

    from loraxir.inference.restorer import Restorer
    from loraxir.pretrained import load_adapter

    adapter, megapixels, tile, overlap, seed, system_allocator = task
    _allocator(system_allocator)
    torch.manual_seed(seed)
    side = round((megapixels * 1e6) ** 0.5)
    restorer = Restorer(load_adapter(adapter), tile=tile, overlap=overlap)
    image = _photo(side, side, seed)
    restorer.restore(_photo(64, 64, seed))  # warm-up
    before = _rss_mib()
    start = time.perf_counter()
    restorer.restore(image)
    seconds = time.perf_counter() - start
    peak = _rss_mib()
    return {
        "megapixels": side * side / 1e6,
        "side": side,
        "tiles": len(restorer.plan(side, side)),
        "seconds": seconds,
        "seconds_per_mp": seconds / (side * side / 1e6),
        "peak_rss_mib": peak,
        "working_mib": peak - before,
        "working_mib_per_mp": (peak - before) / (side * side / 1e6),
    }


def _allocator(system: bool) -> None:
    """As ``loraxir restore`` does on a CPU, unless ``--system-allocator``."""
    if not system:
        from loraxir.inference.allocator import keep_freed_cpu_memory

        keep_freed_cpu_memory()


def _folder_throughput(adapter: str, images: int, size: int, degradation: str | None) -> dict:
    from loraxir.inference.restorer import Restorer
    from loraxir.pretrained import load_adapter

    photos = [_photo(size, size, seed) for seed in range(images)]
    result = {"images": images, "size": size}
    routed = Restorer(load_adapter(adapter), tile=512)
    degradation = degradation or routed.degradations[0]
    merged = Restorer(load_adapter(adapter), degradation=degradation, tile=512)
    for label, restorer in (("routed", routed), ("merged", merged)):
        restorer.restore(photos[0])  # warm-up
        start = time.perf_counter()
        for photo in photos:
            restorer.restore(photo)
        result[f"{label}_images_per_s"] = images / (time.perf_counter() - start)
    result["merged_degradation"] = degradation
    result["merged_speedup"] = result["merged_images_per_s"] / result["routed_images_per_s"]
    return result


def _random_adapter(folder: Path, seed: int) -> str:
    """A random-init nafnet-tiny adapter with a tiny CNN router (smoke runs only)."""
    import torch

    import loraxir
    from loraxir.backbones import save_backbone
    from loraxir.router import DegradationRouter

    torch.manual_seed(seed)
    classes = ["noise", "blur", "rain"]
    backbone = loraxir.create_backbone("nafnet-tiny")
    save_backbone(backbone, folder)
    router = DegradationRouter.from_encoder("cnn-tiny", classes, image_size=32, grid=1)
    config = loraxir.LoraIRConfig(degradations=classes, r=4)
    loraxir.get_loraxir_model(backbone, config, router=router).save_pretrained(str(folder))
    return str(folder)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    parser.add_argument("--adapter", help="adapter name, folder or repo id (default: shipped)")
    parser.add_argument("--random", action="store_true", help="use a random nafnet-tiny adapter")
    parser.add_argument(
        "--sizes", type=positive_float, nargs="+", default=[1, 4, 16, 64], help="MP"
    )
    parser.add_argument("--quick", action="store_true", help="sizes 0.05 and 0.2 MP, 4 images")
    parser.add_argument("--tile", type=positive_int, default=512)
    parser.add_argument("--overlap", type=int, default=32, help="at most a third of --tile")
    parser.add_argument(
        "--images", type=positive_int, default=16, help="folder size for throughput"
    )
    parser.add_argument(
        "--image-size", type=positive_int, default=512, help="side of folder images"
    )
    parser.add_argument("--degradation", help="class merged for the fast path (default: first)")
    parser.add_argument("--seed", type=seed_type, default=0)
    parser.add_argument(
        "--system-allocator",
        action="store_true",
        help="leave malloc as it is (default: keep freed memory, as `loraxir restore` does)",
    )
    parser.add_argument(
        "--output", type=output_file, default="benchmarks/results/tiled_inference.json"
    )
    args = parser.parse_args(argv)
    check_tiling(args.tile, args.overlap, 1)  # before any worker starts
    if args.quick:
        args.sizes, args.images, args.image_size = [0.05, 0.2], 4, 128
    with tempfile.TemporaryDirectory() as scratch:
        adapter = _random_adapter(Path(scratch) / "random", args.seed) if args.random else None
        adapter = adapter or args.adapter
        classes = describe_adapter(find_adapter(adapter)).degradations
        if args.degradation is not None and args.degradation not in classes:
            # checked here, not when the folder is restored after every size is measured
            parser.error(f"--degradation {args.degradation!r}: the adapter's classes are {classes}")
        context = multiprocessing.get_context("spawn")
        sizes = []
        for megapixels in args.sizes:
            with context.Pool(1) as pool:
                task = (
                    adapter,
                    megapixels,
                    args.tile,
                    args.overlap,
                    args.seed,
                    args.system_allocator,
                )
                sizes.append(pool.apply(_measure_size, (task,)))
        _allocator(args.system_allocator)
        folder = _folder_throughput(adapter, args.images, args.image_size, args.degradation)
    named = f"random nafnet-tiny (seed {args.seed})" if args.random else adapter
    result = {"adapter": named or "(shipped default)", "tile": args.tile, "sizes": sizes}
    result |= {"overlap": args.overlap, "seed": args.seed}
    result["allocator"] = "system" if args.system_allocator else "keep freed memory"
    result["folder"] = folder
    print(f"{'MP':>7} {'tiles':>6} {'s':>8} {'s/MP':>7} {'peak MiB':>9} {'work MiB/MP':>12}")
    for row in sizes:
        print(
            f"{row['megapixels']:7.2f} {row['tiles']:6d} {row['seconds']:8.2f} "
            f"{row['seconds_per_mp']:7.2f} {row['peak_rss_mib']:9.0f} "
            f"{row['working_mib_per_mp']:12.1f}"
        )
    print(
        f"folder of {folder['images']} x {folder['size']}²: routed "
        f"{folder['routed_images_per_s']:.2f} img/s, merged ({folder['merged_degradation']}) "
        f"{folder['merged_images_per_s']:.2f} img/s ({folder['merged_speedup']:.2f}x)"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    run_script(lambda: main(sys.argv[1:]), "Nothing was written.")
