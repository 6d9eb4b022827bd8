"""What routing costs: the router's forward as a ratio of the restoration backbone's forward.

For each encoder (the tiny CNN, open_clip ViT-B-32 and ViT-L-14-336 with random weights,
which cost like real ones) and each image size, the router runs with multi-view input
(global view + 2×2 local views, ``--views native`` by default or the paper's ``resize``)
and with the global view only. Reported per cell: the FLOP count (torch's flop counter,
deterministic) and, unless ``--flops-only``, the median wall time over ``--repeats`` calls
(batch 1, inference mode, after a warm-up), both divided by the backbone's. The router
reads a fixed number of views whatever the image size, so its relative cost falls as
images grow; multi-view multiplies the encoder's work by 5.

    python benchmarks/router.py                               # full table (minutes on a CPU)
    python benchmarks/router.py --flops-only --sizes 512      # the FLOP ratios only
    python benchmarks/router.py --encoders cnn-tiny --sizes 64 --repeats 2    # seconds

Prints a table, writes JSON and a PNG bar chart (default ``benchmarks/results/router.*``).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import torch
from _timing import median_time, output_file, positive_int, seed_type
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from loraxir import create_backbone, list_backbones
from loraxir.router import DegradationRouter
from loraxir.router.encoders import available_encoders
from loraxir.router.encoders.open_clip import LOCAL_DIR_PREFIX
from loraxir.training.entry import run_script, script_description

CLASSES = ["noise", "rain", "haze", "blur", "low_light"]


def flops(module: nn.Module, images: torch.Tensor) -> int:
    """Floating-point operations of one forward (multiply-adds count as two)."""
    counter = FlopCounterMode(display=False)
    with counter:
        module(images)
    return counter.get_total_flops()


def measure(
    backbone: str,
    encoders: list[str],
    sizes: list[int],
    repeats: int,
    seed: int,
    views: str = "native",
    image_size: int | None = None,
) -> list[dict[str, object]]:
    """One row per (encoder, grid, size): router/backbone FLOP (and time) ratios.

    ``repeats=0`` skips the timing (FLOPs only). ``image_size`` sets the tiny CNN's input.
    """
    torch.manual_seed(seed)
    net = create_backbone(backbone).eval()
    rows = []
    for name in encoders:
        size_option = image_size if name == "cnn-tiny" else None
        multi = DegradationRouter.from_encoder(
            name, CLASSES, image_size=size_option, grid=2, views=views
        ).eval()
        single = DegradationRouter(multi.encoder, CLASSES, grid=0).eval()
        for size in sizes:
            images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
            with torch.inference_mode():
                base_time = median_time(functools.partial(net, images), repeats) if repeats else 0
                base_flops = flops(net, images)
                for router in (multi, single):
                    router_time = (
                        median_time(functools.partial(router, images), repeats) if repeats else 0
                    )
                    rows.append(
                        {
                            "encoder": f"{name} ({router.encoder.image_size} px)",
                            "views": f"global+2x2 {views}" if router.grid else "global",
                            "size": size,
                            "router_ms": 1000 * router_time if repeats else None,
                            "backbone_ms": 1000 * base_time if repeats else None,
                            "time_ratio": router_time / base_time if repeats else None,
                            "router_gflops": flops(router, images) / 1e9,
                            "backbone_gflops": base_flops / 1e9,
                            "flop_ratio": flops(router, images) / base_flops,
                        }
                    )
                    print(_format_row(rows[-1]), flush=True)
    return rows


def plot(rows: list[dict[str, object]], path: Path) -> None:
    """Bar chart of time ratios, one group per encoder and size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["encoder"], r["size"]) for r in rows}, key=str)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(groups), 4))
    for offset, multi in ((-0.2, True), (0.2, False)):
        values = [
            next(
                r["time_ratio"]
                for r in rows
                if (r["encoder"], r["size"]) == g and (r["views"] != "global") == multi
            )
            for g in groups
        ]
        ax.bar(
            [i + offset for i in range(len(groups))],
            values,
            width=0.4,
            label="global + 2×2" if multi else "global",
        )
    ax.set_xticks(range(len(groups)), [f"{e}\n{s}²" for e, s in groups])
    ax.set_yscale("log")
    ax.set_ylabel("router time / backbone time")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _format_row(row: dict[str, object]) -> str:
    flops_text = (
        f"router {row['router_gflops']:8.2f} GFLOP  backbone {row['backbone_gflops']:8.1f} GFLOP"
        f"  flops x{row['flop_ratio']:.4f}"
    )
    if row["time_ratio"] is None:
        return f"{row['encoder']:<22} {row['views']:<18} {row['size']:>4}²  {flops_text}"
    return (
        f"{row['encoder']:<22} {row['views']:<18} {row['size']:>4}²  "
        f"router {row['router_ms']:9.1f} ms  backbone {row['backbone_ms']:9.1f} ms  "
        f"time x{row['time_ratio']:.3f}  {flops_text}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    parser.add_argument("--backbone", default="nafnet", help="loraxir.create_backbone name")
    parser.add_argument("--encoders", nargs="+", default=["cnn-tiny", "ViT-B-32", "ViT-L-14-336"])
    parser.add_argument(
        "--views", default="native", choices=("native", "resize"), help="'resize': the paper's"
    )
    parser.add_argument("--image-size", type=positive_int, default=32, help="input of the tiny CNN")
    parser.add_argument("--flops-only", action="store_true", help="skip the timing")
    parser.add_argument("--sizes", nargs="+", type=positive_int, default=[256, 512])
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--seed", type=seed_type, default=0)
    parser.add_argument("--output", type=output_file, default="benchmarks/results/router.json")
    args = parser.parse_args(argv)
    known = available_encoders()
    local = [e for e in args.encoders if e.startswith(LOCAL_DIR_PREFIX)]
    unknown = [
        e for e in args.encoders if e not in known + local and not Path(e).expanduser().exists()
    ]
    if unknown:  # before the other encoders' minutes, whose rows an error would lose
        parser.error(
            f"unknown encoder(s) {unknown}: name cnn-tiny, an open_clip model "
            "(open_clip.list_models()) or a folder"
        )
    if args.backbone not in list_backbones():
        parser.error(f"unknown backbone {args.backbone!r}; see loraxir.list_backbones()")

    print(f"backbone {args.backbone}, {torch.get_num_threads()} threads, batch 1")
    repeats = 0 if args.flops_only else args.repeats
    rows = measure(
        args.backbone, args.encoders, args.sizes, repeats, args.seed, args.views, args.image_size
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "output"} | {"repeats": repeats}
    output.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    if repeats:
        plot(rows, output.with_suffix(".png"))
        print(f"wrote {output} and {output.with_suffix('.png')}")
    else:
        print(f"wrote {output} (no timing, so no plot of it)")


if __name__ == "__main__":
    run_script(main, "Nothing was written.")
