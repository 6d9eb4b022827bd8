"""Testing the trained methods on the held-out photos: quality, routing and cost.

Every method restores the same test items (the suite's tasks, and with ``shift`` the
mixed and unseen degradations of ``configs/shift_<suite>.yaml``), cut from photos no
training or validation run saw, degraded with ``eval_seed`` (the same for every seed and
method, so differences between methods are paired). Metrics follow BasicSR
(:mod:`loraxir.metrics`): per image on 8-bit-rounded outputs (what saved PNGs measure),
RGB and Y (BT.601), averaged per task, then over tasks.

Also measured: the router's confusion matrix on the test items, the mean gates of each
routed method per task (expert usage), inference FLOPs (``torch.utils.flop_counter``,
exact) and wall time (paired with the base, noisy on shared machines) relative to the
base, and example restorations (first test item of each task) saved as PNG.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _all_in_one_config import ROUTED, BenchConfig
from _all_in_one_methods import Paths
from _timing import paired_ratio
from torch import Tensor

from loraxir.metrics import psnr, ssim

CONFIGS = Path(__file__).resolve().parent / "configs"
METRICS = ("psnr", "ssim", "psnr_y", "ssim_y")
Restore = Callable[[dict[str, Any]], Tensor]


def shift_suite(suite: str) -> Path:
    """The mixed/unseen test suite of ``suite``."""
    return CONFIGS / f"shift_{suite}.yaml"


def load_methods(paths: Paths, methods: list[str], classes: list[str]) -> dict[str, Any]:
    """``{method: (model, restore)}`` for the shared stage (``"pretrain"``) and every
    method, each rebuilt from what its recipe saved (in eval mode)."""
    import loraxir
    from loraxir.backbones import load_backbone
    from loraxir.guidance import GuidedBackbone

    loaded: dict[str, Any] = {}
    for method in ["pretrain", *methods]:
        folder = paths.method(method)
        if method in ("pretrain", "base"):
            model = GuidedBackbone.from_pretrained(folder / "backbone")
        elif method == "no_dam":
            model = load_backbone(folder / "backbone")
        elif method == "peft_lora":
            from _all_in_one_peft import load

            model = load(folder / "adapter")
        else:
            model = loraxir.load_adapter(folder / "adapter")
        model = model.eval()
        if method == "oracle":

            def restore(batch: dict[str, Any], model: Any = model) -> Tensor:
                names = [classes[i] for i in batch["label"].tolist()]
                return model(batch["lq"], degradation=names)
        else:

            def restore(batch: dict[str, Any], model: Any = model) -> Tensor:
                return model(batch["lq"])

        loaded[method] = (model, restore)
    return loaded


def _scores(restored: Tensor, gt: Tensor) -> dict[str, Tensor]:
    restored = restored.float().clamp(0, 1)
    return {
        "psnr": psnr(restored, gt, quantize=True).clamp(max=100.0),
        "ssim": ssim(restored, gt, quantize=True),
        "psnr_y": psnr(restored, gt, y_channel=True, quantize=True).clamp(max=100.0),
        "ssim_y": ssim(restored, gt, y_channel=True, quantize=True),
    }


def _test_items(config: BenchConfig, paths: Paths, suite: Any) -> Any:
    from loraxir.data import SyntheticPairs

    return SyntheticPairs(
        str(paths.test),
        suite,
        config.eval_patch_size,
        split="all",
        seed=config.eval_seed,
        repeats=config.eval_repeats,
        augment=False,
    )


@torch.no_grad()
def evaluate_suite(
    config: BenchConfig,
    paths: Paths,
    suite: Any,
    loaded: dict[str, Any],
    router: Any,
    examples: Path | None,
) -> dict[str, Any]:
    """Per task and average scores of the degraded input and every loaded method on the
    test items of ``suite``; the router's predictions and the routed methods' gates."""
    from torch.utils.data import DataLoader

    items = _test_items(config, paths, suite)
    loader = DataLoader(items, batch_size=config.eval_batch_size, shuffle=False)
    columns: dict[str, dict[str, list[Tensor]]] = {
        name: {m: [] for m in METRICS} for name in ["input", *loaded]
    }
    gates: dict[str, list[Tensor]] = {m: [] for m in loaded if m in ROUTED}
    tasks, predictions, labels = [], [], []
    saved: set[int] = set()
    for batch in loader:
        tasks.append(batch["task"])
        labels.append(batch["label"])
        predictions.append(router.route(batch["lq"]).logits.argmax(dim=1))
        outputs = {"input": batch["lq"]}
        for method, (model, restore) in loaded.items():
            outputs[method] = restore(batch)
            if method in gates:
                gates[method].append(model.last_routing.cpu())
        for name, restored in outputs.items():
            for metric, values in _scores(restored, batch["gt"]).items():
                columns[name][metric].append(values)
        if examples is not None:
            _save_examples(examples, suite, batch, outputs, saved)
    task = torch.cat(tasks)
    result: dict[str, Any] = {"tasks": suite.task_names, "methods": {}}
    for name, metrics in columns.items():
        merged = {metric: torch.cat(values) for metric, values in metrics.items()}
        result["methods"][name] = _per_task(merged, task, suite.task_names)
    result["predictions"] = torch.cat(predictions).tolist()
    result["labels"] = torch.cat(labels).tolist()
    result["task_of_item"] = task.tolist()
    result["gates"] = {
        method: _mean_gates(torch.cat(values), task, suite.task_names)
        for method, values in gates.items()
    }
    return result


def _per_task(merged: dict[str, Tensor], task: Tensor, names: list[str]) -> dict[str, Any]:
    per_task = {
        name: {metric: merged[metric][task == index].mean().item() for metric in METRICS}
        for index, name in enumerate(names)
        if (task == index).any()
    }
    average = {
        metric: sum(row[metric] for row in per_task.values()) / len(per_task) for metric in METRICS
    }
    return {"per_task": per_task, "average": average}


def _mean_gates(gates: Tensor, task: Tensor, names: list[str]) -> dict[str, list[float]]:
    return {
        name: gates[task == index].float().mean(dim=0).tolist()
        for index, name in enumerate(names)
        if (task == index).any()
    }


def _save_examples(
    folder: Path, suite: Any, batch: dict[str, Any], outputs: dict[str, Tensor], saved: set[int]
) -> None:
    """The first test item of each task, as PNG per method (and input, reference)."""
    from _all_in_one_stages import atomic_path
    from PIL import Image

    for row, task in enumerate(batch["task"].tolist()):
        if task in saved:
            continue
        saved.add(task)
        images = {**outputs, "reference": batch["gt"]}
        for method, restored in images.items():
            pixels = restored[row].float().clamp(0, 1).mul(255).round().byte()
            path = folder / suite.task_names[task] / f"{method}.png"
            with atomic_path(path) as temporary:
                Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()).save(temporary, "PNG")


@torch.no_grad()
def inference_costs(
    config: BenchConfig, paths: Paths, suite: Any, loaded: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """FLOPs (exact) and wall time (paired, median) of each method on one test batch,
    relative to the base (the DAM network; the shared stage when base is not run), every
    method fed the same chunks of the batch."""
    from torch.utils.flop_counter import FlopCounterMode

    from loraxir.model import family_chunk_pixels, images_per_call

    items = _test_items(config, paths, suite)
    size = min(config.eval_batch_size, len(items))
    batch = next(iter(torch.utils.data.DataLoader(items, batch_size=size)))
    reference = "base" if "base" in loaded else "pretrain"
    # Every method runs the batch in the chunks a LoraIRModel of this backbone family runs
    # on a CPU, so that the plain networks are timed at their best too (see
    # LoraIRModel.inference_chunk_pixels).
    budget = family_chunk_pixels(loaded[reference][0].backbone)
    step = images_per_call(*batch["lq"].shape[-2:], budget)
    chunks = [{k: v[i : i + step] for k, v in batch.items()} for i in range(0, size, step)]

    def run(restore: Restore) -> None:
        for chunk in chunks:
            restore(chunk)

    def flops(restore: Restore) -> int:
        with FlopCounterMode(display=False) as counter:
            run(restore)
        return counter.get_total_flops()

    base_flops = flops(loaded[reference][1])
    base_call = loaded[reference][1]
    costs = {}
    for method, (_, restore) in loaded.items():
        costs[method] = {
            "flops": flops(restore) / base_flops,
            "time": paired_ratio(
                lambda r=restore: run(r), lambda: run(base_call), config.timing_repeats
            ),
        }
    return costs
