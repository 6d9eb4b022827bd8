"""The ``loraxir`` command line.

One subcommand per job. To add one, write ``_add_<name>(subparsers)`` that registers a
parser with ``set_defaults(run=<function taking the parsed args and returning an exit
code>)`` and append it to :data:`SUBCOMMANDS`. Keep this module light: import torch and
other heavy modules inside the run functions, so ``loraxir --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


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
    if args.image.startswith("skimage:"):
        pixels = skimage_image(args.image.removeprefix("skimage:"))
    else:
        pixels = read_image(args.image)
    suite = None if args.all else degradations.suite(args.suite)
    path = render_gallery(square(pixels, args.size), args.output, suite, args.seed, args.columns)
    print(f"Wrote {path}")
    return 0


# Each entry registers one subcommand; see the module docstring.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_degradations]


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
    """Run the command line; returns the exit code (2 for a loraxir error, with its message)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 1
    from loraxir.errors import LoraIRError

    try:
        return args.run(args)
    except LoraIRError as error:
        print(f"loraxir: error: {error}", file=sys.stderr)
        return 2
