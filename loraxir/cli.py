"""The ``loraxir`` command line.

One subcommand per job. To add one, write ``_add_<name>(subparsers)`` that registers a
parser with ``set_defaults(run=<function taking the parsed args and returning an exit
code>)`` and append it to :data:`SUBCOMMANDS`. Keep this module light: import torch and
other heavy modules inside the run functions, so ``loraxir --help`` answers at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any


def _add_degradations(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "degradations",
        help="list degradations and suites, or render a labelled gallery of a suite",
        description=(
            "Render every task of a suite (or every registered degradation with --all) on "
            "one image, labelled with the parameters drawn; or --list them."
        ),
    )
    parser.add_argument("--list", action="store_true", help="print degradations and suites")
    parser.add_argument(
        "--suite", default="five_task", help="a built-in suite name or a suite YAML path"
    )
    parser.add_argument(
        "--all", action="store_true", help="show every registered degradation, not a suite"
    )
    parser.add_argument(
        "--image",
        default="skimage:astronaut",
        help="an image file, or skimage:NAME for a photo bundled with scikit-image",
    )
    parser.add_argument("-o", "--output", default="gallery.png", help="where to write the PNG")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn parameters")
    parser.add_argument("--size", type=int, default=256, help="side of each cell in pixels")
    parser.add_argument("--columns", type=int, default=3, help="cells per row")
    parser.set_defaults(run=_run_degradations)


def _run_degradations(args: argparse.Namespace) -> int:
    from loraxir import degradations
    from loraxir.data import read_image, skimage_image
    from loraxir.degradations.gallery import render_gallery, square
    from loraxir.errors import ConfigError

    if args.list:
        print("Degradations (parameters: a number fixes it, [low, high] draws from a range):")
        for name in degradations.available():
            print(degradations.get(name).describe())
        print("\nSuites:")
        for name in degradations.available_suites():
            print(degradations.suite(name).describe())
        return 0
    if args.size < 16 or args.columns < 1:
        raise ConfigError(
            f"--size must be >= 16 and --columns >= 1, got {args.size}, {args.columns}."
        )
    if not 0 <= args.seed < 2**63:
        raise ConfigError(f"--seed must be in [0, 2**63 - 1], got {args.seed}.")
    if args.image.startswith("skimage:"):
        pixels = skimage_image(args.image.removeprefix("skimage:"))
    else:
        pixels = read_image(args.image)
    suite = None if args.all else degradations.suite(args.suite)
    path = render_gallery(square(pixels, args.size), args.output, suite, args.seed, args.columns)
    print(f"Wrote {path}")
    return 0


def _add_restore(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "restore",
        help="restore images and videos with an adapter (routed per input, tiled)",
        description=(
            "Restore image files, folders (recursively), glob patterns and videos (mp4, webm, "
            "mkv, mov, avi). The adapter's router picks the experts for each input (each "
            "frame of a video) and the choice is printed; --degradation forces one class and "
            "merges its experts (fast path). Large images are restored in overlapping tiles "
            "that all use the whole image's routing. Inputs that fail are skipped and listed "
            "at the end (exit code 1). See docs/cli.md."
        ),
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or globs")
    parser.add_argument(
        "-o",
        "--output",
        default="restored",
        help="output file (one input) or folder (several); default: the folder ./restored",
    )
    _add_adapter_options(parser)
    parser.add_argument("--degradation", help="force this class (merged experts, no routing)")
    parser.add_argument(
        "--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps"
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="compute precision; auto: float16 on GPUs, float32 on the CPU",
    )
    parser.add_argument("--tile", type=int, default=512, help="largest tile side in pixels")
    parser.add_argument("--overlap", type=int, default=32, help="pixels shared by neighbour tiles")
    parser.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        help="video: EMA momentum of the gates, in [0, 1) (a warning when no input is a video)",
    )
    parser.add_argument(
        "--reference", help="video: clean reference video (PSNR per frame; videos only)"
    )
    parser.add_argument(
        "--max-pixels", type=int, default=1_000_000_000, help="refuse larger images (header check)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=_run_restore)


def _add_adapter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter",
        help="adapter name (see `loraxir info --list`), folder or Hub repo id; default: the "
        "shipped one",
    )
    _add_backbone_option(parser)


def _add_backbone_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backbone", help="spandrel checkpoint of the base network (default: from the adapter)"
    )


def _run_restore(args: argparse.Namespace) -> int:
    from loraxir.inference import batch
    from loraxir.inference.allocator import keep_freed_cpu_memory
    from loraxir.inference.images import set_pixel_limit
    from loraxir.inference.restorer import Restorer
    from loraxir.pretrained import load_adapter

    device = _check_restore_options(args)
    if device == "cpu":  # this process only restores: reuse freed memory, fault no pages
        keep_freed_cpu_memory()
    jobs, outcome = batch.collect(args.inputs, args.output)
    if not jobs and not outcome.failed:
        print(
            f"loraxir: nothing to restore: no image or video file in {args.inputs}.",
            file=sys.stderr,
        )
        return 1
    jobs = batch.pending(jobs, outcome, args.overwrite)  # before the model loads
    if (args.smooth or args.reference) and jobs and not any(job.is_video for job in jobs):
        print(
            "loraxir: warning: --smooth and --reference apply to videos only; no input is a "
            "video, so they are ignored.",
            file=sys.stderr,
        )
    if jobs:
        dtype = _precision(args.precision, device)
        set_pixel_limit(args.max_pixels)
        model = load_adapter(args.adapter, args.backbone, device=device)
        restorer = Restorer(model, args.degradation, args.tile, args.overlap, dtype=dtype)
        batch.run(restorer, jobs, outcome, args.smooth, args.reference, not args.quiet)
    print(f"Restored {len(outcome.done)} input(s) into {args.output}.")
    if outcome.failed:
        print(f"Skipped {len(outcome.failed)} input(s):", file=sys.stderr)
        for source, reason in outcome.failed:
            print(f"  {source}: {reason}", file=sys.stderr)
        return 1
    return 0


def _check_restore_options(args: argparse.Namespace) -> str:
    """Refuse bad option values once, before any input is read (exit 2, not one skipped
    input per value); returns the device. ``--tile`` is checked again against the network's
    size unit once the adapter is loaded."""
    from pathlib import Path

    from loraxir.errors import ConfigError
    from loraxir.inference.tiling import check_tiling

    check_tiling(args.tile, args.overlap, 1)
    if not 0.0 <= args.smooth < 1.0:
        raise ConfigError(f"--smooth must be in [0, 1), got {args.smooth}.")
    if args.reference is not None and not Path(args.reference).is_file():
        raise ConfigError(f"--reference {args.reference!r} is not a file; pass the clean video.")
    if args.max_pixels < 1:
        raise ConfigError(f"--max-pixels must be >= 1, got {args.max_pixels}.")
    from loraxir.devices import resolve_device

    return resolve_device(args.device, "--device ")


def _precision(name: str, device: str) -> Any:
    """The ``torch.dtype`` for ``--precision`` (half precision by default on GPUs)."""
    import torch

    if name == "auto":
        name = "float32" if device == "cpu" else "float16"
    return getattr(torch, name)


def _add_info(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info",
        help="describe an adapter (name, folder or Hub repo id), or --list the installed ones",
        description=(
            "Print an adapter's classes, rank, router, trainable size, backbone and metrics, "
            "read from its files without loading the network."
        ),
    )
    parser.add_argument("adapter", nargs="?", metavar="NAME|DIR|REPO_ID")
    parser.add_argument("--list", action="store_true", help="list installed adapters")
    parser.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    from loraxir.pretrained import adapter_roots, describe_adapter, find_adapter, list_adapters

    if args.list or args.adapter is None:
        names = list_adapters()
        roots = ", ".join(str(root) for root in adapter_roots())
        print(f"Installed adapters ({len(names)}) in {roots or '(no adapter folder)'}:")
        for name in names:
            print(f"  {name}")
        return 0
    for line in describe_adapter(find_adapter(args.adapter)).lines():
        print(line)
    return 0


def _add_merge(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="fold one degradation's experts into a plain backbone checkpoint",
        description=(
            "Merge the experts of one class into the base weights and save the plain network "
            "(its native keys, loadable by spandrel) as safetensors. It restores that class "
            "exactly as the adapter routed to it does, with no loraxir at run time, on "
            "images whose sides are multiples of the backbone's unit (reflect-pad others)."
        ),
    )
    parser.add_argument("adapter", metavar="NAME|DIR|REPO_ID")
    parser.add_argument("--degradation", required=True, help="the class to fold in")
    parser.add_argument("-o", "--output", required=True, help="output .safetensors file")
    _add_backbone_option(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(run=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from loraxir.pretrained import check_merged_output, load_adapter, save_merged

    check_merged_output(args.output, args.overwrite)  # before the adapter loads
    model = load_adapter(args.adapter, args.backbone)
    path = save_merged(model, args.degradation, args.output, args.overwrite)
    print(f"Wrote {path} (backbone with the {args.degradation!r} experts folded in)")
    return 0


def _add_push(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload an adapter folder to the Hugging Face Hub",
        description=(
            "Check DIR is a loraxir adapter folder and upload it (config, weights, backbone "
            "files, model card) with huggingface_hub. Log in first (`hf auth login` or "
            "HF_TOKEN). See docs/sharing.md."
        ),
    )
    parser.add_argument("folder", metavar="DIR")
    parser.add_argument("repo_id", metavar="REPO_ID", help="owner/name on the Hub")
    parser.add_argument("--public", action="store_true", help="create a public repo")
    parser.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or the Hub)")
    parser.set_defaults(run=_run_push)


def _run_push(args: argparse.Namespace) -> int:
    from loraxir.hub import push_folder

    url = push_folder(args.folder, args.repo_id, private=not args.public, endpoint=args.endpoint)
    print(f"Pushed {args.folder} to {args.repo_id}: {url}")
    return 0


# Each entry registers one subcommand; see the module docstring.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_degradations,
    _add_restore,
    _add_info,
    _add_merge,
    _add_push,
]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand of :data:`SUBCOMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="loraxir",
        description="Degradation-routed mixtures of low-rank experts for image restoration.",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for a loraxir error, with its message;
    130 on Ctrl-C, 143 on SIGTERM)."""
    for stream in (sys.stdout, sys.stderr):
        # File names need not be valid UTF-8 (they come back with surrogates): print them
        # escaped rather than stop the run in the middle of a report.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    # Deprecation notices from the networks' own code (spandrel's SwinIR and Restormer)
    # would print above every report and error: nothing a user of the command can act on.
    for notice in (
        r"torch\.meshgrid: in an upcoming release",
        r"`torch\.jit\.script` is deprecated",
    ):
        warnings.filterwarnings("ignore", message=notice)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 1
    from loraxir.errors import LoraIRError

    # Only the main thread may set a handler (a caller may run main() in a thread).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return args.run(args)
    except LoraIRError as error:
        print(f"loraxir: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interruption:
        kept = (
            " Every output written so far is complete (files are written under a temporary "
            "name and renamed); run the same command again to go on: those outputs are kept "
            "and listed as existing."
            if args.run is _run_restore
            else ""
        )
        print(f"\nloraxir: interrupted.{kept}", file=sys.stderr)
        return 143 if isinstance(interruption, _Terminated) else 130
    except BrokenPipeError:
        # The reader went away (`loraxir degradations --list | head`): stop quietly, as
        # shell tools do, and keep Python's exit-time flush from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM (what ``timeout``, systemd and job schedulers send) stops a command as Ctrl-C
    does: temporary outputs are removed and finished ones kept."""


def _terminate(signum: int, frame: Any) -> None:
    raise _Terminated
