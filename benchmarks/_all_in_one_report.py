"""Summaries of the all-in-one benchmark: statistics over seeds, the Markdown tables and the
figures, all computed from the per-seed records (so a rerun reproduces them exactly).

A statistic is ``{"mean", "std", "values"}`` over seeds (sample standard deviation; 0 for
one seed). The paired differences (LoRA-IR − base, LoRA-IR − LoRA) are taken per seed on
the same test items, then summarised, which cancels what the seeds share.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from _all_in_one_config import METHODS
from _all_in_one_eval import METRICS
from _all_in_one_stages import atomic_path, write_text

SHARED = "pretrain"
LABELS = {"input": "degraded input", SHARED: "shared stage (DAM pre-trained)", **METHODS}
DIFFERENCES = (
    ("lora_ir_top1", "base"),
    ("lora_ir_top1", "lora"),
    ("lora_ir_top2", "base"),
    ("lora_ir_top2", "lora"),
    ("lora_ir_top1", "oracle"),
)


def stat(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and the values."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": list(values)}


def summarise(suite: str, seeds: list[int], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The suite's summary over seeds from one record per seed (see ``all_in_one.py``)."""
    first = records[0]
    rows = list(first["test"]["methods"])
    summary: dict[str, Any] = {
        "suite": suite,
        "seeds": seeds,
        "tasks": first["test"]["tasks"],
        "shift_tasks": first["shift"]["tasks"] if first.get("shift") else [],
        "methods": {},
    }
    for name in rows:
        entry: dict[str, Any] = {"label": LABELS[name]}
        for part in ("test", "shift"):
            if not first.get(part):
                continue
            scores = [r[part]["methods"][name] for r in records]
            key = "per_task" if part == "test" else "shift"
            entry[key] = {
                task: {m: stat([s["per_task"][task][m] for s in scores]) for m in METRICS}
                for task in scores[0]["per_task"]
            }
            entry["average" if part == "test" else "shift_average"] = {
                m: stat([s["average"][m] for s in scores]) for m in METRICS
            }
        if name != "input":
            train = [r["train"][name] for r in records]
            entry["trainable_parameters"] = train[0]["trainable_parameters"]
            entry["train_seconds"] = stat([t["seconds"] for t in train])
            entry["val_psnr"] = stat([t["val_psnr"] for t in train])
            entry["flops_ratio"] = records[0]["costs"][name]["flops"]
            entry["time_ratio"] = stat([r["costs"][name]["time"] for r in records])
            entry["beats_input"] = _beats_input(records, name)
        summary["methods"][name] = entry
    summary["differences"] = _differences(records, rows)
    summary["router"] = _router(records)
    summary["expert_usage"] = {
        method: _mean_usage(records, method) for method in records[0]["test"]["gates"]
    }
    return summary


def _mean_usage(records: list[dict[str, Any]], method: str) -> dict[str, list[float]]:
    """Mean gate per expert of ``method`` for every test and shift task, over seeds."""
    usage = {}
    for part in ("test", "shift"):
        if not records[0].get(part):
            continue
        for task in records[0][part]["gates"][method]:
            rows = [r[part]["gates"][method][task] for r in records]
            usage[task] = [statistics.fmean(column) for column in zip(*rows, strict=True)]
    return usage


def _beats_input(records: list[dict[str, Any]], name: str) -> bool:
    """Does ``name`` beat the degraded input's PSNR on every task of every seed?"""
    return all(
        row["psnr"] > r["test"]["methods"]["input"]["per_task"][task]["psnr"]
        for r in records
        for task, row in r["test"]["methods"][name]["per_task"].items()
    )


def _differences(records: list[dict[str, Any]], rows: list[str]) -> dict[str, Any]:
    found = {}
    for a, b in DIFFERENCES:
        if a in rows and b in rows:
            values = [
                r["test"]["methods"][a]["average"]["psnr"]
                - r["test"]["methods"][b]["average"]["psnr"]
                for r in records
            ]
            found[f"{LABELS[a]} − {LABELS[b]}"] = stat(values)
    return found


def _router(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The router's confusion matrix summed over seeds, and its accuracy."""
    classes = records[0]["classes"]
    matrix = [[0] * len(classes) for _ in classes]
    for record in records:
        for true, predicted in zip(
            record["test"]["labels"], record["test"]["predictions"], strict=True
        ):
            matrix[true][predicted] += 1
    total = sum(map(sum, matrix))
    correct = sum(matrix[i][i] for i in range(len(classes)))
    return {"classes": classes, "confusion": matrix, "accuracy": correct / max(1, total)}


# ------------------------------------------------------------------- Markdown
def cell(value: dict[str, Any], digits: int = 2) -> str:
    """``mean ± std`` at ``digits`` decimals (the test reads tables back with this)."""
    return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"


def markdown(summary: dict[str, Any], command: str) -> str:
    """The suite's tables: quality and cost per method, paired differences, shifts."""
    tasks, seeds = summary["tasks"], summary["seeds"]
    methods = summary["methods"]
    header = [
        "method",
        *tasks,
        "avg PSNR",
        "avg SSIM",
        "avg PSNR (Y)",
        "avg SSIM (Y)",
        "trainable params",
        "train time (s)",
        "FLOPs × base",
        "time × base",
    ]
    lines = [
        f"### {summary['suite']} — {len(seeds)} seed(s) {seeds}, test photos never trained on",
        "",
        f"Command: `{command}`",
        "",
        "PSNR (dB, RGB) per task, mean ± std over seeds:",
        "",
        _row(header),
        _row(["---"] + ["---:"] * (len(header) - 1)),
    ]
    for name, entry in methods.items():
        average = entry["average"]
        cost = (
            [
                f"{entry['trainable_parameters']:,}",
                cell(entry["train_seconds"], 0),
                f"{entry['flops_ratio']:.2f}",
                cell(entry["time_ratio"]),
            ]
            if name != "input"
            else ["—"] * 4
        )
        lines.append(
            _row(
                [
                    entry["label"],
                    *(cell(entry["per_task"][t]["psnr"]) for t in tasks),
                    cell(average["psnr"]),
                    cell(average["ssim"], 4),
                    cell(average["psnr_y"]),
                    cell(average["ssim_y"], 4),
                    *cost,
                ]
            )
        )
    failing = [e["label"] for n, e in methods.items() if n != "input" and not e["beats_input"]]
    lines += ["", _input_note(failing), ""]
    lines += _difference_table(summary)
    if summary["shift_tasks"]:
        lines += ["", *_shift_table(summary)]
    router = summary["router"]
    lines += ["", f"Router accuracy on the test items: {router['accuracy']:.3f}.", ""]
    return "\n".join(lines)


def _input_note(failing: list[str]) -> str:
    if not failing:
        return "Every method beats the degraded input on every task of every seed."
    return (
        "**Not yet a fair comparison**: these methods do not beat the degraded input on "
        f"every task of every seed: {', '.join(failing)}."
    )


def _difference_table(summary: dict[str, Any]) -> list[str]:
    seeds = summary["seeds"]
    lines = [
        "Paired differences of average PSNR (dB) per seed, same test items:",
        "",
        _row(["difference", *(f"seed {s}" for s in seeds), "mean ± std"]),
        _row(["---"] + ["---:"] * (len(seeds) + 1)),
    ]
    for label, value in summary["differences"].items():
        lines.append(_row([label, *(f"{v:+.2f}" for v in value["values"]), cell(value)]))
    return lines


def _shift_table(summary: dict[str, Any]) -> list[str]:
    tasks = summary["shift_tasks"]
    lines = [
        "Mixed and unseen degradations (PSNR dB, RGB), the same models:",
        "",
        _row(["method", *tasks, "average"]),
        _row(["---"] + ["---:"] * (len(tasks) + 1)),
    ]
    for entry in summary["methods"].values():
        shift = entry["shift"]
        lines.append(
            _row(
                [
                    entry["label"],
                    *(cell(shift[t]["psnr"]) for t in tasks),
                    cell(entry["shift_average"]["psnr"]),
                ]
            )
        )
    return lines


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


# -------------------------------------------------------------------- figures
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=110, format="png")
    _pyplot().close(fig)


def _psnr_axes(ax: Any, summary: dict[str, Any]) -> None:
    """Grouped bars: PSNR per task (and average) per method, error bars = std over seeds."""
    tasks = [*summary["tasks"], "average"]
    names = [n for n in summary["methods"] if n != "input"]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        entry = summary["methods"][name]
        rows = [entry["per_task"][t]["psnr"] for t in summary["tasks"]] + [entry["average"]["psnr"]]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, [r["mean"] for r in rows], width, yerr=[r["std"] for r in rows],
               label=entry["label"], capsize=2)  # fmt: skip
    source = summary["methods"]["input"]
    inputs = [source["per_task"][t]["psnr"]["mean"] for t in summary["tasks"]]
    inputs.append(source["average"]["psnr"]["mean"])
    ax.scatter(range(len(tasks)), inputs, marker="_", s=600, color="black", label="degraded input")
    shown = inputs + [
        row["psnr"]["mean"]
        for n in names
        for row in [*summary["methods"][n]["per_task"].values(), summary["methods"][n]["average"]]
    ]
    ax.set_ylim(min(shown) - 2, max(shown) + 2)
    ax.set_xticks(range(len(tasks)), tasks, rotation=20)
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"{summary['suite']}: test PSNR per task ({len(summary['seeds'])} seed(s))")
    ax.legend(fontsize=7, ncol=2)


def figures(summary: dict[str, Any], examples: Path, folder: Path) -> dict[str, str]:
    """Write the suite's PNG figures into ``folder``; returns ``{kind: path}``."""
    from loraxir.training.evaluation import save_confusion_matrix

    plt = _pyplot()
    suite = summary["suite"]
    written = {}
    fig, ax = plt.subplots(figsize=(3 + 1.6 * (len(summary["tasks"]) + 1), 4.5))
    _psnr_axes(ax, summary)
    fig.tight_layout()
    written["psnr_per_task"] = folder / f"{suite}_psnr_per_task.png"
    _save(fig, written["psnr_per_task"])

    import torch

    router = summary["router"]
    written["router_confusion"] = folder / f"{suite}_router_confusion.png"
    with atomic_path(written["router_confusion"]) as temporary:
        save_confusion_matrix(
            torch.tensor(router["confusion"]),
            router["classes"],
            temporary,
            f"router on {suite} test items (accuracy {router['accuracy']:.2f})",
        )
    if summary["expert_usage"]:
        written["expert_usage"] = folder / f"{suite}_expert_usage.png"
        _expert_usage(summary, written["expert_usage"])
    written["restored_examples"] = folder / f"{suite}_restored_examples.png"
    _examples_grid(summary, examples, written["restored_examples"])
    return {kind: str(path) for kind, path in written.items()}


def _expert_usage(summary: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    usage = summary["expert_usage"]
    classes = summary["router"]["classes"]
    fig, axes = plt.subplots(1, len(usage), figsize=(3 + 3 * len(usage), 4), squeeze=False)
    for ax, (method, rows) in zip(axes[0], usage.items(), strict=True):
        tasks = list(rows)
        ax.imshow([rows[t] for t in tasks], vmin=0, vmax=1, cmap="Blues")
        for i, task in enumerate(tasks):
            for j, value in enumerate(rows[task]):
                color = "white" if value > 0.5 else "black"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=color, fontsize=7)
        ax.set_xticks(range(len(classes)), classes, rotation=30)
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("expert")
        ax.set_title(f"{METHODS[method]}: mean gate")
    fig.tight_layout()
    _save(fig, path)


def _example_columns(summary: dict[str, Any]) -> list[str]:
    names = [n for n in summary["methods"] if n not in ("input", SHARED)]
    return ["input", *names, "reference"]


def _image_cells(
    axes: Any, tasks: list[str], columns: list[str], examples: Path, fontsize: int
) -> None:
    """Draw ``examples/<task>/<column>.png`` into ``axes(row, column)``, titled once."""
    from PIL import Image

    for i, task in enumerate(tasks):
        for j, column in enumerate(columns):
            ax = axes(i, j)
            ax.imshow(Image.open(examples / task / f"{column}.png"))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(LABELS.get(column, column), fontsize=fontsize)
            if j == 0:
                ax.set_ylabel(task, fontsize=fontsize + 1)


def _examples_grid(summary: dict[str, Any], examples: Path, path: Path, tasks: Any = None) -> None:
    """Rows: tasks; columns: input, each method, reference (seed 0's restorations)."""

    plt = _pyplot()
    tasks = tasks or [t for t in [*summary["tasks"], *summary["shift_tasks"]]
                      if (examples / t).is_dir()]  # fmt: skip
    columns = _example_columns(summary)
    fig, axes = plt.subplots(
        len(tasks), len(columns), figsize=(1.5 * len(columns), 1.6 * len(tasks)), squeeze=False
    )
    _image_cells(lambda i, j: axes[i][j], tasks, columns, examples, 6)
    fig.tight_layout()
    _save(fig, path)


def headline(summary: dict[str, Any], examples: Path, path: Path) -> None:
    """The README's figure: restored examples (the first task of each of up to three
    degradation classes) beside the PSNR-per-task plot."""

    plt = _pyplot()
    from loraxir import degradations

    suite = degradations.suite(summary["suite"])
    first_of_class = {suite.task(t).label: t for t in reversed(summary["tasks"])}
    tasks = [t for t in summary["tasks"] if t in first_of_class.values()][:3]
    columns = ["input", "base" if "base" in summary["methods"] else SHARED]
    columns += [c for c in ("lora_ir_top1", "reference") if c in _example_columns(summary)]
    fig = plt.figure(figsize=(13, 1.9 * max(3, len(tasks))))
    grid = fig.add_gridspec(len(tasks), len(columns) + 4)
    _image_cells(lambda i, j: fig.add_subplot(grid[i, j]), tasks, columns, examples, 7)
    _psnr_axes(fig.add_subplot(grid[:, len(columns) :]), summary)
    fig.tight_layout()
    _save(fig, path)


def write_markdown(path: Path, summaries: list[dict[str, Any]], command: str) -> str:
    """All suites' tables in one Markdown file (atomically); returns the text."""
    text = "\n".join(markdown(summary, command) for summary in summaries)
    write_text(path, text)
    return text
