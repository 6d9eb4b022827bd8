"""All-in-one quality benchmark: do routed low-rank experts (LoRA-IR) restore many
degradations better than one network, or one LoRA, of the same cost?

    python benchmarks/all_in_one.py --scale tiny                 # seconds (the test suite)
    python benchmarks/all_in_one.py --scale cpu                  # the published CPU table
    python benchmarks/all_in_one.py --scale paper --set source=/data/photos   # GPUs

On synthetic task suites (``three_task``, ``five_task``) built from clean photos split BY
PHOTO into training, validation (settings are chosen there) and test photos (numbers are
reported there), it runs the recipes: a shared stage (router, then degradation-guided
pre-training with DAM), then every compared method at equal steps, batch and patch size
(``_all_in_one_methods.py`` says exactly what each is), for each seed. It tests every
method on the held-out photos (the suite's tasks, mixed and unseen degradations) and
writes into ``--output-dir``:

* ``results.json``: everything measured, per seed and as mean ± std over seeds, with the
  paired differences LoRA-IR − base and LoRA-IR − LoRA;
* ``results.md``: the tables (``docs/benchmarks.md`` quotes them);
* ``figures/``: PSNR per task per method, the router's confusion matrix, expert usage per
  degradation, a grid of restored examples per suite, and ``headline.png``;
* ``restored/<suite>/<task>/<method>.png``: the restored examples (first seed);
* ``<suite>/seed-<s>/<method>/``: each recipe's output (adapters, backbones, metrics).

Interrupt it at any time: rerunning the same command skips finished stages and resumes
the interrupted one from its last checkpoint. A folder holding another run is refused
unless ``--overwrite``; results are written atomically.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _all_in_one_config import BenchConfig, config_json, load_bench_config
from _all_in_one_methods import (
    Paths,
    make_router_variants,
    method_stage,
    router_settings,
    shared_stage,
)
from _all_in_one_report import figures, headline, summarise, write_markdown
from _all_in_one_stages import (
    RESUME_HINT,
    atomic_path,
    discard_replaced_run,
    prepare_run,
    recipe,
    recipe_argv,
    run_recipe,
    run_stage,
    write_json,
    write_text,
)

from loraxir.errors import ConfigError
from loraxir.training.entry import run_script, script_description

Log = Callable[[str], None]
SHIFT_NOTE = "shift"
ROOT = Path(__file__).resolve().parents[1]
DOCS = Path("docs/benchmarks.md")
IMAGES = Path("docs/images")
SHARED_ROUTER_SEED = 0
BEGIN, END = "<!-- all_in_one results: begin -->", "<!-- all_in_one results: end -->"


def _print(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    parser.add_argument("--scale", default="tiny", help="tiny | quick | cpu | paper")
    parser.add_argument("--config", help="A YAML of benchmark settings instead of --scale.")
    parser.add_argument(
        "--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
        help="Override settings (YAML values), e.g. --set seeds=[0] suites=[five_task].",
    )  # fmt: skip
    parser.add_argument("--output-dir", help="Default: outputs/all_in_one_<scale>.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an earlier run.")
    parser.add_argument(
        "--publish", action="store_true",
        help=f"Also write the tables into {DOCS} and the figures into {IMAGES}/.",
    )  # fmt: skip
    return parser.parse_args(argv)


def split_photos(config: BenchConfig, root: Path) -> dict[str, list[str]]:
    """Write the clean photos into ``photos/trainval`` and ``photos/test``, split by photo
    with ``split_seed``; the recipes only ever see ``trainval``. BMP (lossless): the data
    loaders decode a whole photo per training patch, and a PNG of 1400² takes ~0.1 s to
    decode on these CPUs, a BMP a fifth of that."""
    from PIL import Image

    from loraxir.checkpoint import staged_folder
    from loraxir.data import open_source
    from loraxir.data.sampling import split_by_image

    source = open_source(config.source)
    test = set(split_by_image(source.ids, "test", config.test_fraction, config.split_seed))
    names: dict[str, list[str]] = {"trainval": [], "test": []}
    with staged_folder(root / "photos") as staging:
        for index, image_id in enumerate(source.ids):
            part = "test" if index in test else "trainval"
            name = image_id.replace("/", "__").rsplit(".", 1)[0] + ".bmp"
            (staging / part).mkdir(exist_ok=True)
            image = Image.fromarray(source.load(index).permute(1, 2, 0).numpy())
            if config.max_photo_side and max(image.size) > config.max_photo_side:
                image.thumbnail((config.max_photo_side,) * 2, Image.Resampling.LANCZOS)
            image.save(staging / part / name)
            names[part].append(image_id)
    return names


def _train(runner: str, settings: dict[str, Any]) -> dict[str, Any]:
    if runner == "peft":
        import _all_in_one_peft

        main = _all_in_one_peft.main
    else:
        main = recipe(runner).main
    metrics = run_recipe(main, settings)
    return {
        "trainable_parameters": metrics["trainable_parameters"],
        "val_psnr": metrics["final"]["psnr"],
        "val": metrics["final"],
        "steps": metrics["steps"],
        "resumed_from_step": metrics["resumed_from_step"],
    }


def run_seed(config: BenchConfig, root: Path, suite: str, seed: int, log: Log) -> dict[str, Any]:
    """Every stage of one (suite, seed); returns its record (test, shift, costs, train)."""
    paths = Paths(root, suite, seed, config.router_per_seed)
    # One router per suite is trained with seed 0 whatever the seeds listed, so that a
    # seed's numbers do not depend on the others run beside it (or their order).
    router_seed = seed if config.router_per_seed else SHARED_ROUTER_SEED
    router_paths = Paths(root, suite, router_seed, config.router_per_seed)
    run_stage(
        paths.router_run,
        f"router ({suite})",
        lambda: recipe("train_router").main(recipe_argv(router_settings(config, router_paths))),
        log,
    )
    variants = run_stage(
        paths.router_run / "variants", "router variants", lambda: make_router_variants(paths), log
    )
    classes = variants["result"]["classes"]
    train = {}
    stages = [shared_stage(config, paths)]
    stages += [method_stage(config, paths, m, len(classes)) for m in config.methods]
    for stage in stages:
        done = run_stage(
            paths.method(stage.name),
            f"{suite} seed {seed}: {stage.name} ({stage.settings['max_steps']} steps)",
            lambda stage=stage: _train(stage.runner, stage.settings),
            log,
        )
        train[stage.name] = {"seconds": done["seconds"], **done["result"]}
    examples = root / "restored" / suite if seed == config.seeds[0] else None
    evaluated = run_stage(
        paths.seed_dir / "eval",
        f"{suite} seed {seed}: test on held-out photos",
        lambda: _evaluate(config, paths, classes, examples),
        log,
    )
    return {**evaluated["result"], "train": train, "classes": classes}


def _evaluate(
    config: BenchConfig, paths: Paths, classes: list[str], examples: Path | None
) -> dict[str, Any]:
    import torch
    from _all_in_one_eval import evaluate_suite, inference_costs, load_methods, shift_suite

    from loraxir import degradations
    from loraxir.router import DegradationRouter

    torch.manual_seed(0)
    loaded = load_methods(paths, config.methods, classes)
    router = DegradationRouter.from_pretrained(paths.router).eval()
    suite = degradations.suite(paths.suite)
    record = {"test": evaluate_suite(config, paths, suite, loaded, router, examples)}
    if config.shift:
        shifted = degradations.suite(str(shift_suite(paths.suite)))
        record[SHIFT_NOTE] = evaluate_suite(config, paths, shifted, loaded, router, examples)
    record["costs"] = inference_costs(config, paths, suite, loaded)
    return record


def run(config: BenchConfig, root: Path, command: str, log: Log = _print) -> dict[str, Any]:
    """Run (or resume) the whole benchmark into ``root``; returns ``results.json``'s data."""
    photos = run_stage(root / "photos", "split photos", lambda: split_photos(config, root), log)
    summaries = []
    for suite in config.suites:
        records = [run_seed(config, root, suite, seed, log) for seed in config.seeds]
        summary = summarise(suite, config.seeds, records)
        summary["per_seed"] = {str(s): r for s, r in zip(config.seeds, records, strict=True)}
        summary["figures"] = figures(summary, root / "restored" / suite, root / "figures")
        summaries.append(summary)
    headline_path = root / "figures" / "headline.png"
    headline(summaries[0], root / "restored" / summaries[0]["suite"], headline_path)
    table = write_markdown(root / "results.md", summaries, command)
    results = {
        "command": command,
        "config": config_json(config),
        "photos": photos["result"],
        "suites": {s["suite"]: s for s in summaries},
        "headline": str(headline_path),
    }
    write_json(root / "results.json", results)
    discard_replaced_run(root)
    log("\n" + table)
    return results


def publish(results: dict[str, Any], root: Path, repository: Path = ROOT) -> None:
    """Copy the figures into ``docs/images/all_in_one_*.png`` and replace the results
    section of ``docs/benchmarks.md`` (between its markers) with the tables, atomically."""
    import shutil

    docs = repository / DOCS
    text = docs.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise ConfigError(f"{docs} lacks the markers {BEGIN!r} and {END!r}; restore them.")
    images = []
    for summary in results["suites"].values():
        for kind, path in summary["figures"].items():
            images.append((Path(path), f"all_in_one_{summary['suite']}_{kind}.png"))
    images.append((Path(results["headline"]), "all_in_one_headline.png"))
    for source, name in images:
        with atomic_path(repository / IMAGES / name) as temporary:
            shutil.copyfile(source, temporary)
    figures_md = "\n".join(f"![{name[:-4]}](images/{name})" for _, name in images[:-1])
    table = (root / "results.md").read_text(encoding="utf-8")
    head, rest = text.split(BEGIN, 1)
    section = f"{BEGIN}\n{table}\n{figures_md}\n{END}"
    write_text(docs, head + section + rest.split(END, 1)[1])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (as on the command line) and run; returns the results."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    config = load_bench_config(args.scale, args.config, args.overrides)
    # Absolute: the stages record their folders in their checkpoints' settings, and a
    # rerun must find the same ones however the folder is spelled.
    root = Path(args.output_dir or f"outputs/all_in_one_{config.scale}").resolve()
    resuming = prepare_run(root, config_json(config), args.overwrite)
    _print(f"{'Resuming' if resuming else 'Starting'} the all-in-one benchmark in {root}")
    command = shlex.join(["python", "benchmarks/all_in_one.py", *argv])
    results = run(config, root, command)
    if args.publish:
        publish(results, root)
        _print(f"Published the tables to {DOCS} and the figures to {IMAGES}/.")
    return results


if __name__ == "__main__":
    run_script(main, RESUME_HINT)
