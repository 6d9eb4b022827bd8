"""Package a trained adapter as a shipped one: measure it on whole held-out photos, write its
card and metrics, and copy it into ``adapters/<name>/``.

A recipe's validation numbers come from crops of its validation photos; users restore whole
photos. So the card's table is measured here, on whole photos that no training run saw
(each degraded ``repeats`` times per class with a seed of its own), together with how often
the router picked the right class. The folder is written under a temporary name and renamed:
an interrupted run leaves the previous adapter intact.

    python recipes/ship_adapter.py outputs/all_in_one_cpu/five_task/seed-0/lora_ir_top1/adapter \\
        --photos outputs/all_in_one_cpu/photos/test --suite five_task --name nafnet-five-task \\
        --trained-by "python benchmarks/all_in_one.py --scale cpu --publish" \\
        --class-photos outputs/all_in_one_cpu/photos/trainval

With ``--class-photos`` (the training photos) the router's class embeddings are fitted and
saved first, so that a class the user gives drives the DAM blocks as that class. Either
way the card's "given" column measures each class given (``--degradation NAME``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loraxir.pretrained import DEFAULT_ADAPTER
from loraxir.training.entry import run_script, script_description

ROOT = Path(__file__).resolve().parents[1]


def evaluate(model: Any, items: Any) -> dict[str, dict[str, float]]:
    """Per class: mean PSNR/SSIM (BasicSR convention) of the degraded and restored whole
    photos, the PSNR when the class is given (``given_psnr``), the router's accuracy, and
    how many images were measured. Photos go through :class:`~loraxir.inference.Restorer`,
    as ``loraxir restore`` runs them: routed once on the whole photo, then restored with
    those gates; or with ``--degradation`` set to the true class."""
    from tqdm.auto import tqdm

    from loraxir.inference.restorer import Restorer
    from loraxir.metrics import psnr, ssim

    def restore(restorer: Restorer, item: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        pixels, routing = restorer.restore(item["lq"].permute(1, 2, 0).numpy())
        return torch.from_numpy(pixels).permute(2, 0, 1)[None].clamp(0, 1), routing

    sums: dict[str, dict[str, float]] = {}
    members: dict[str, list[int]] = {}
    restorer = Restorer(model)
    for index in tqdm(range(len(items)), desc="held-out photos, routed", dynamic_ncols=True):
        item = items[index]
        members.setdefault(item["task_name"], []).append(index)
        gt, lq = item["gt"][None], item["lq"][None]
        restored, routing = restore(restorer, item)
        row = sums.setdefault(item["task_name"], dict.fromkeys(_COLUMNS, 0.0))
        row["input_psnr"] += psnr(lq, gt, quantize=True).item()
        row["input_ssim"] += ssim(lq, gt, quantize=True).item()
        row["restored_psnr"] += psnr(restored, gt, quantize=True).item()
        row["restored_ssim"] += ssim(restored, gt, quantize=True).item()
        row["routed"] += float(routing.label == item["task_name"])
        row["images"] += 1
    for task in tqdm(members, desc="held-out photos, class given", dynamic_ncols=True):
        given = Restorer(model, degradation=task)
        for index in members[task]:
            restored, _ = restore(given, items[index])
            gt = items[index]["gt"][None]
            sums[task]["given_psnr"] += psnr(restored, gt, quantize=True).item()
        model.unmerge()
    return {
        task: {k: v if k == "images" else v / row["images"] for k, v in row.items()}
        for task, row in sums.items()
    }


def evaluate_clean(model: Any, items: Any) -> dict[str, Any]:
    """What the adapter does to the held-out photos left undegraded, as ``loraxir restore``
    runs them: a router without a clean class sends each to some expert. Mean and lowest
    PSNR of the output against the photo itself, and the class each was routed to."""
    from loraxir.inference.restorer import Restorer
    from loraxir.metrics import psnr

    restorer = Restorer(model)
    seen: set[str] = set()
    scores, routed_to = [], {}
    for index in range(len(items)):
        item = items[index]
        if item["name"] in seen:
            continue
        seen.add(item["name"])
        pixels, routing = restorer.restore(item["gt"].permute(1, 2, 0).numpy())
        restored = torch.from_numpy(pixels).permute(2, 0, 1)[None].clamp(0, 1)
        scores.append(psnr(restored, item["gt"][None], quantize=True).item())
        routed_to[Path(item["name"]).stem] = routing.label
    return {
        "psnr": sum(scores) / len(scores),
        "lowest_psnr": min(scores),
        "routed_to": routed_to,
    }


# A class whose average PSNR moves by less than this is reported as level with its input,
# not as restored or made worse: the shipped adapter's blur class moved by -0.001 dB routed,
# and given, it moved by +0.03, -0.004 and +0.03 dB over three seeds of the same photos.
LEVEL_DB = 0.05
# A class restored by less than this is named as restored only slightly: a user who sees
# "restores blur" in a table expects a visibly sharper photo, not +0.1 dB.
SLIGHT_DB = 0.5
# Crops the class embeddings are fitted on: side, and draws per photo and class.
_CLASS_CROP = 128
_CLASS_REPEATS = 8
_COLUMNS = (
    "input_psnr",
    "input_ssim",
    "restored_psnr",
    "restored_ssim",
    "given_psnr",
    "routed",
    "images",
)


def card(
    name: str,
    info: Any,
    scores: dict[str, dict[str, float]],
    clean: dict[str, Any],
    notes: dict[str, Any],
) -> str:
    """The model card: what the adapter is, its held-out table, how it was made, its limits."""
    rows = [
        f"| {task} | {s['input_psnr']:.2f} | {s['restored_psnr']:.2f} | "
        f"{s['restored_psnr'] - s['input_psnr']:+.2f} | {s['input_ssim']:.4f} | "
        f"{s['restored_ssim']:.4f} | {s['routed']:.0%} | {s['given_psnr'] - s['input_psnr']:+.2f} |"
        for task, s in scores.items()
    ]
    mean = {k: sum(s[k] for s in scores.values()) / len(scores) for k in _COLUMNS}
    rows.append(
        f"| average | {mean['input_psnr']:.2f} | {mean['restored_psnr']:.2f} | "
        f"{mean['restored_psnr'] - mean['input_psnr']:+.2f} | {mean['input_ssim']:.4f} | "
        f"{mean['restored_ssim']:.4f} | {mean['routed']:.0%} | "
        f"{mean['given_psnr'] - mean['input_psnr']:+.2f} |"
    )
    commands = "\n".join(notes["trained_by"])
    given = (
        ": its experts, and DAM blocks driven by the class's mean embedding (fitted on "
        f"{notes['class_photos']}) instead of the image's"
        if notes.get("class_photos")
        else ""
    )
    config = info.config
    top_k = config.get("top_k") or len(info.degradations)
    router = config.get("router") if isinstance(config.get("router"), dict) else {}
    encoder = router.get("encoder") or {}
    encoder = encoder.get("name", "custom") if isinstance(encoder, dict) else encoder
    dam = (
        f", with degradation-aware modulation (DAM, {info.dam_parameters:,} parameters)"
        if info.dam_parameters
        else ""
    )
    command = (
        "loraxir restore photo.png              # the default adapter; writes ./restored/photo.png"
        if name == DEFAULT_ADAPTER
        else f"loraxir restore photo.png --adapter {name}   # writes ./restored/photo.png"
    )
    mixing = (
        "One expert is chosen per image (top-1): an image with two degradations gets the one "
        "the\n  router finds strongest."
        if top_k == 1
        else f"The {top_k} strongest experts are mixed per image."
    )
    routed_to = ", ".join(f"{photo} as {label}" for photo, label in clean["routed_to"].items())
    clean_line = (
        "- It has no class for clean photos and changes them: the held-out photos above, "
        f"undegraded,\n  were read as degraded ({routed_to}) and came out at "
        f"{clean['psnr']:.2f} dB PSNR against\n  themselves on average (lowest "
        f"{clean['lowest_psnr']:.2f} dB). Restore only photos that need it.\n"
    )
    weak = _weaknesses(scores)
    return f"""---
library_name: loraxir
license: apache-2.0
tags: [image-restoration, all-in-one, lora, mixture-of-experts, loraxir]
---

# {name}

An all-in-one restorer. Network: `{info.backbone_label}`
({info.backbone_parameters:,} parameters){dam}, one rank-{config.get("r")} expert per
degradation on every targeted layer ({info.expert_parameters:,} parameters, top-{top_k} routed)
and a router (`{encoder}` encoder, {info.router_parameters:,} parameters) that picks the expert
from the image itself. Degradations: {", ".join(info.degradations)} (the `{notes["suite"]}`
suite of loraxir's synthetic degradations).

```bash
{command}
```
```python
import loraxir
model = loraxir.load_adapter("{name}")   # backbone included
restored = model(images)                 # (B, 3, H, W) in [0, 1], routed per image
```

## Held-out results

Whole photos that no training run saw ({", ".join(notes["photos"])}; at their own size),
each degraded {notes["repeats"]} times per class with seed
{notes["seed"]}: PSNR (dB) and SSIM in the BasicSR convention (RGB, 8-bit), how often
the router chose the right class (routed), and the gain when the class is given (given:
`--degradation NAME`){given}.

| degradation | input PSNR | restored PSNR | gain | input SSIM | restored SSIM | routed | given |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{chr(10).join(rows)}

`metrics.json` holds the same numbers; the last command below measured them.

## How it was trained

```bash
{commands}
```

## Good and bad at

- Trained {notes["trained_on"]}, with synthetic degradations only: expect it to help
  on images that look like those degradations, and to do less on real rain, real haze or real
  camera shake.
{weak}{clean_line}- {mixing}
"""


def ship(
    adapter: str | Path,
    photos: Path,
    suite: str,
    name: str,
    into: Path,
    trained_by: Sequence[str],
    trained_on: str = "for minutes on a 2-core CPU",
    repeats: int = 3,
    seed: int = 2024,
    overwrite: bool = False,
    class_photos: Path | None = None,
) -> Path:
    """Evaluate ``adapter`` (a folder, a name or a Hub repo id) on ``photos`` and write
    ``into/name`` (card, metrics, weights). With ``class_photos`` (the training photos), the
    router's class embeddings are fitted first (:func:`fit_class_embeddings`) and saved with
    the adapter."""
    import loraxir
    from loraxir.checkpoint import staged_folder
    from loraxir.data import SyntheticPairs
    from loraxir.errors import ConfigError
    from loraxir.pretrained import describe_adapter, find_adapter

    if not name or name in (".", "..") or Path(name).name != name:
        raise ConfigError(f"--name {name!r} must be a plain folder name (no path, not empty).")
    if class_photos is not None:
        held_out, fitting = _fingerprints(photos), _fingerprints(class_photos)
        shared = sorted(held_out[key] for key in held_out.keys() & fitting.keys())
        if shared:
            raise ConfigError(
                f"--photos and --class-photos share {shared} (the same pixels): the card's "
                "held-out photos must not also fit the class embeddings; pass the training "
                "photos as --class-photos."
            )
    target = into / name
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} exists; pass --overwrite to replace it.")
    folder = find_adapter(adapter)
    if not describe_adapter(folder).router_parameters:
        raise ConfigError(
            f"{folder} has no router: a shipped adapter routes by itself. Train one "
            "(recipes/train_router.py) and fine-tune with route_by=router."
        )
    items = SyntheticPairs(str(photos), suite, None, seed=seed, repeats=repeats, augment=False)
    torch.manual_seed(seed)
    model = loraxir.load_adapter(folder)
    unknown = [task for task in items.suite.task_names if task not in model.degradations]
    if unknown:
        raise ConfigError(
            f"Suite {suite!r} has tasks {unknown} that are not the adapter's classes "
            f"{model.degradations}: the card has one row per class, so each task must be one "
            "(a suite like five_task, or a YAML suite naming one task per class)."
        )
    if class_photos is not None:
        fit_class_embeddings(model, class_photos, suite, seed)
    scores = evaluate(model, items)
    clean = evaluate_clean(model, items)
    notes = {
        "suite": suite,
        "trained_on": trained_on,
        "photos": sorted(Path(name).stem for name in items.image_ids),
        "repeats": repeats,
        "seed": seed,
        "trained_by": list(trained_by),
        "class_photos": None if class_photos is None else _photo_names(class_photos),
    }
    with staged_folder(target, carry_over=False) as staging:  # an old file would be stale
        for file in sorted(folder.iterdir()):
            if file.is_file() and file.name != "README.md":
                shutil.copy2(file, staging / file.name)
        if class_photos is not None:
            with warnings.catch_warnings():  # the backbone files were copied above
                warnings.filterwarnings("ignore", message="trainable='all'")
                warnings.filterwarnings("ignore", message="Saving into .* drops its")  # below
                model.save_pretrained(str(staging))
        metrics = {"held_out": scores, "clean_photos": clean, **notes}
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        info = describe_adapter(staging)
        (staging / "README.md").write_text(card(name, info, scores, clean, notes))
    return target


def fit_class_embeddings(model: Any, photos: Path, suite: str, seed: int) -> None:
    """Fit the router's class embeddings (each class's mean degradation embedding) on
    degraded 128² crops of ``photos``, 8 per photo and class: the photos the adapter
    trained on, whose crops its DAM blocks saw. A forced class (``--degradation``) then
    drives DAM with its class embedding instead of the image's, which the router may read
    as another class."""
    from loraxir.data import SyntheticPairs
    from loraxir.router import labelled_batches

    crops = SyntheticPairs(
        str(photos), suite, _CLASS_CROP, seed=seed + 1, repeats=_CLASS_REPEATS, augment=False
    )
    model.loraxir_router.fit_class_embeddings(labelled_batches(crops))


def _weaknesses(scores: dict[str, dict[str, float]]) -> str:
    """The card's lines for what the adapter does not do: each class it does not restore
    (a PSNR change under :data:`LEVEL_DB`), each it restores by less than
    :data:`SLIGHT_DB`, then each restored class whose SSIM falls."""
    gains = {task: s["restored_psnr"] - s["input_psnr"] for task, s in scores.items()}
    not_restored = (_weakness(task, s) for task, s in scores.items() if gains[task] < LEVEL_DB)
    slight = (
        f"- It restores {task} images only slightly ({_gain(gain)} dB on average above): "
        "expect little visible change.\n"
        for task, gain in gains.items()
        if LEVEL_DB <= gain < SLIGHT_DB
    )
    lower_ssim = (
        f"- On {task} it raises PSNR but lowers SSIM ({s['input_ssim']:.4f} to "
        f"{s['restored_ssim']:.4f} on average).\n"
        for task, s in scores.items()
        if gains[task] >= LEVEL_DB and s["restored_ssim"] < s["input_ssim"]
    )
    return "".join(not_restored) + "".join(slight) + "".join(lower_ssim)


def _weakness(task: str, s: dict[str, float]) -> str:
    """The card's line for a class the adapter does not restore: "worse" for a loss of at
    least :data:`LEVEL_DB`, "level" for a change smaller than that either way, with the
    class given as the way out where giving it does better."""
    change = s["restored_psnr"] - s["input_psnr"]
    if change <= -LEVEL_DB:
        verdict = f"It makes {task} images worse ({_gain(change)} dB on average above)."
    else:
        verdict = (
            f"It does not restore {task} images; they come out level with the input "
            f"({_gain(change)} dB on average above)."
        )
    if s["given_psnr"] > s["restored_psnr"]:
        given = _gain(s["given_psnr"] - s["input_psnr"])
        return (
            f"- {verdict} Leave such images as they are, or give the class "
            f"(`--degradation {task}`: {given} dB).\n"
        )
    return f"- {verdict} Leave such images as they are.\n"


def _gain(decibels: float) -> str:
    """A gain in dB for the card's prose: two decimals, three where two would read 0.00
    (a change too small to show at two decimals still shows its sign)."""
    return f"{decibels:+.2f}" if abs(decibels) >= 0.005 else f"{decibels:+.3f}"


def _fingerprints(photos: Path) -> dict[str, str]:
    """The photos' names by a digest of their decoded pixels (a photo saved under another
    name or format is the same photo; two numbered datasets' ``0001.png`` need not be)."""
    import hashlib

    from loraxir.data.sources import open_source

    source = open_source(str(photos))
    return {
        hashlib.sha256(source.load(i).numpy().tobytes()).hexdigest(): name
        for i, name in enumerate(source.ids)
    }


def _photo_names(photos: Path) -> str:
    from loraxir.data.sources import open_source

    return ", ".join(sorted(Path(name).stem for name in open_source(str(photos)).ids))


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=script_description(__doc__))
    parser.add_argument("adapter", help="the trained adapter: a folder, a name or a Hub repo id")
    parser.add_argument("--photos", type=Path, required=True, help="held-out clean photos")
    parser.add_argument("--suite", default="five_task")
    parser.add_argument("--name", required=True, help="folder name under --into")
    parser.add_argument("--into", type=Path, default=ROOT / "adapters")
    parser.add_argument("--trained-by", action="append", default=[], help="a command (repeat)")
    parser.add_argument(
        "--trained-on",
        default="for minutes on a 2-core CPU",
        help="where and how long, for the card: 'for 11 minutes on a 2-core CPU'",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--class-photos",
        type=Path,
        help="the training photos: fit the router's class embeddings on them (for forced classes)",
    )
    args = parser.parse_args(argv)
    command = shlex.join(
        ["python", "recipes/ship_adapter.py", *(sys.argv[1:] if argv is None else argv)]
    )
    # The card says the last command measured it; an earlier ship_adapter.py line is a step
    # of a longer chain (an adapter shipped, then trained further), not this measurement.
    if not args.trained_by or not args.trained_by[-1].startswith("python recipes/ship_adapter.py"):
        args.trained_by.append(command)
    target = ship(
        args.adapter,
        args.photos,
        args.suite,
        args.name,
        args.into,
        args.trained_by,
        args.trained_on,
        args.repeats,
        args.seed,
        args.overwrite,
        args.class_photos,
    )
    print((target / "README.md").read_text())
    return target


if __name__ == "__main__":
    run_script(main, "Nothing was written: the adapter folder is replaced only when complete.")
