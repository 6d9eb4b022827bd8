"""What recipes measure and draw: PSNR/SSIM per task gathered over processes, image grids,
confusion matrices, results files.

Restoration metrics follow the BasicSR convention of :mod:`loraxir.metrics` (per image,
0–255, optional Y channel and border crop). Each process restores its share of the
validation set; ``gather_for_metrics`` collects the per-image numbers (dropping the
duplicates that pad the last batch), so every process returns the same summary and it
does not depend on the number of processes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from loraxir.metrics import psnr, ssim

MAX_PSNR = 100.0
Restore = Callable[[dict[str, Any]], Tensor]


@torch.no_grad()
def evaluate_restoration(
    accelerator: Any,
    restore: Restore,
    loader: Any,
    task_names: Sequence[str],
    *,
    y_channel: bool = False,
    crop_border: int = 0,
) -> dict[str, Any]:
    """PSNR/SSIM of ``restore(batch)`` against ``batch["gt"]``, per task and averaged.

    ``restore`` maps a batch (``"lq"``, ``"gt"``, ``"task"``, ``"label"``, ...) to restored
    images ``(B, 3, H, W)``; call it with an unwrapped model (no collective inside).
    Returns ``{"psnr", "ssim", "input_psnr", "input_ssim", "num_images", "per_task":
    {name: {...}}}``; the averages are means over tasks of per-task means (every task
    weighs the same), ``input_*`` score the degraded input itself. A pair of identical
    images (a patch a degradation left untouched) counts as ``MAX_PSNR`` (100 dB), not
    infinity, so that one such patch does not swamp an average.
    """
    options = {"y_channel": y_channel, "crop_border": crop_border}
    columns: dict[str, list[Tensor]] = {
        "psnr": [],
        "ssim": [],
        "input_psnr": [],
        "input_ssim": [],
        "task": [],
    }
    for batch in loader:
        restored = restore(batch).float()
        gt, lq = batch["gt"].float(), batch["lq"].float()
        values = (
            psnr(restored, gt, **options).clamp(max=MAX_PSNR),
            ssim(restored, gt, **options),
            psnr(lq, gt, **options).clamp(max=MAX_PSNR),
            ssim(lq, gt, **options),
            batch["task"].to(gt.device),
        )
        gathered = accelerator.gather_for_metrics(values)
        for key, value in zip(columns, gathered, strict=True):
            columns[key].append(value.cpu())
    merged = {key: torch.cat(values) for key, values in columns.items()}
    per_task = {}
    for index, name in enumerate(task_names):
        chosen = merged["task"] == index
        if chosen.any():
            per_task[name] = {
                key: merged[key][chosen].mean().item() for key in columns if key != "task"
            }
            per_task[name]["num_images"] = int(chosen.sum())
    summary: dict[str, Any] = {
        key: sum(t[key] for t in per_task.values()) / max(1, len(per_task))
        for key in ("psnr", "ssim", "input_psnr", "input_ssim")
    }
    summary["num_images"] = len(merged["task"])
    summary["per_task"] = per_task
    return summary


def first_item_per_task(dataset: Any, task_names: Sequence[str]) -> list[dict[str, Any]]:
    """One item of each task present in ``dataset`` (the first), in task order."""
    labels = list(dataset.task_labels) if hasattr(dataset, "task_labels") else None
    chosen: dict[int, int] = {}
    for index in range(len(dataset)):
        task = labels[index] if labels is not None else int(dataset[index]["task"])
        chosen.setdefault(task, index)
        if len(chosen) == len(task_names):
            break
    return [dataset[chosen[task]] for task in sorted(chosen)]


@torch.no_grad()
def save_image_grid(
    accelerator: Any,
    restore: Restore,
    items: Sequence[dict[str, Any]],
    path: str | Path,
    step: int,
    tag: str = "val/restored",
) -> Tensor:
    """Rows of ``degraded | restored | clean`` for ``items`` (e.g. one per task), saved as a
    PNG and sent to tensorboard. Call on the main process only. Returns the grid
    ``(3, H, W)`` in [0, 1]. Items are restored one at a time and padded with white to the
    largest (whole validation images differ in size from one class's folder to the next)."""
    from PIL import Image
    from torchvision.utils import make_grid

    device = accelerator.device
    rows = []
    for item in items:
        batch = {key: torch.as_tensor(item[key])[None] for key in ("lq", "gt", "task", "label")}
        restored = restore({k: v.to(device) for k, v in batch.items()}).float().clamp(0, 1)
        rows += [batch["lq"][0], restored[0].cpu(), batch["gt"][0]]
    height, width = max(t.shape[-2] for t in rows), max(t.shape[-1] for t in rows)
    rows = [
        F.pad(t.float(), (0, width - t.shape[-1], 0, height - t.shape[-2]), value=1.0) for t in rows
    ]
    grid = make_grid(torch.stack(rows), nrow=3, padding=2, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(pixels).save(path)
    try:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image(tag, grid, step)
    except (ValueError, AttributeError):
        pass
    return grid


def scalars(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    """Tensorboard scalars of an :func:`evaluate_restoration` summary: averages and per
    task (``val/psnr``, ``val/psnr/noise``, ...)."""
    values = {f"{prefix}/{key}": float(metrics[key]) for key in ("psnr", "ssim")}
    for task, numbers in metrics.get("per_task", {}).items():
        values[f"{prefix}/psnr/{task}"] = float(numbers["psnr"])
        values[f"{prefix}/ssim/{task}"] = float(numbers["ssim"])
    return values


def format_table(metrics: dict[str, Any], title: str = "") -> str:
    """A plain-text table of an :func:`evaluate_restoration` summary."""
    lines = [title] if title else []
    lines.append(f"  {'task':<14}{'input PSNR':>11}{'PSNR':>9}{'gain':>8}{'SSIM':>8}")
    rows = [*metrics["per_task"].items(), ("average", metrics)]
    for name, row in rows:
        gain = row["psnr"] - row["input_psnr"]
        lines.append(
            f"  {name:<14}{row['input_psnr']:>11.2f}{row['psnr']:>9.2f}{gain:>+8.2f}"
            f"{row['ssim']:>8.4f}"
        )
    return "\n".join(lines)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """``(classes, classes)`` counts; row = true class, column = predicted class."""
    index = labels.long() * classes + predictions.long()
    return torch.bincount(index, minlength=classes * classes).view(classes, classes)


def save_confusion_matrix(
    matrix: torch.Tensor, names: Sequence[str], path: str | Path, title: str = ""
) -> None:
    """Draw a confusion matrix (row-normalised colours, counts written) to a PNG."""
    from matplotlib.figure import Figure  # not pyplot: the caller's backend stays

    counts = matrix.float()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    size = 1.6 + 0.75 * len(names)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    image = ax.imshow(rates, vmin=0, vmax=1, cmap="Blues")
    for (row, col), value in zip(
        torch.cartesian_prod(torch.arange(len(names)), torch.arange(len(names))).tolist(),
        counts.flatten().tolist(),
        strict=True,
    ):
        color = "white" if rates[row, col] > 0.5 else "black"
        ax.text(col, row, f"{int(value)}", ha="center", va="center", color=color)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON (results files that people and scripts read)."""
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
