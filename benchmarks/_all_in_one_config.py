"""Settings of the all-in-one benchmark (``benchmarks/all_in_one.py``): one typed dataclass,
loaded from a scale's YAML (``benchmarks/configs/<scale>.yaml``) plus ``key=value``
overrides, with unknown keys rejected by name (the recipes' loader).

Equal budget is built in, not configured per method: every compared method trains
``adapters.max_steps`` steps on the same data settings (``data``: patch size, batch size,
loss, repeats), after the shared stage (router, then ``pretrain.max_steps`` steps of
degradation-guided pre-training); the no-DAM base trains for the sum of both.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraxir.errors import ConfigError, unknown_name
from loraxir.training import load_config
from loraxir.training.config import check_seed_range
from loraxir.validation import check_int

CONFIGS = Path(__file__).resolve().parent / "configs"
SCALES = ("tiny", "quick", "cpu", "paper")

# Method name -> its label in tables and figures (the order of every table).
METHODS = {
    "no_dam": "no-DAM base (all steps)",
    "base": "base (DAM, full fine-tuning)",
    "lora": "LoRA (loraxir E=1, r=E·r)",
    "peft_lora": "LoRA (peft, dense convs)",
    "lora_ir_top1": "LoRA-IR top-1",
    "lora_ir_top2": "LoRA-IR soft top-2",
    "oracle": "oracle (true labels)",
}
# Methods whose experts a router gates (expert usage is drawn for them).
ROUTED = ("lora_ir_top1", "lora_ir_top2")


@dataclass
class BenchConfig:
    """What the benchmark trains and measures. Sections ``router``, ``data``, ``pretrain``,
    ``adapters``, ``base`` and ``no_dam`` are recipe settings (``recipes/*.py``)."""

    scale: str = field(default="custom", metadata={"help": "Name shown in the report."})
    suites: list[str] = field(
        default_factory=lambda: ["three_task"], metadata={"help": "Task suites to run."}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds."})
    methods: list[str] = field(
        default_factory=lambda: list(METHODS), metadata={"help": f"Subset of {list(METHODS)}."}
    )
    source: str = field(
        default="skimage", metadata={"help": "Clean photos: 'skimage' or a folder of images."}
    )
    test_fraction: float = field(
        default=0.27, metadata={"help": "Share of photos held out for the test (4 of 14)."}
    )
    val_fraction: float = field(
        default=0.25, metadata={"help": "Share of the other photos used for validation."}
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the photo splits."})
    max_photo_side: int | None = field(
        default=None, metadata={"help": "Downscale larger photos to this side; null: keep."}
    )
    eval_patch_size: int | None = field(
        default=128, metadata={"help": "Side of test crops; null: whole photos."}
    )
    eval_repeats: int = field(default=2, metadata={"help": "Test crops per (photo, task)."})
    eval_batch_size: int = field(default=8, metadata={"help": "Images per evaluation call."})
    eval_seed: int = field(
        default=12345, metadata={"help": "Seed of the test degradations (same for all seeds)."}
    )
    shift: bool = field(
        default=True, metadata={"help": "Also test on mixed and unseen degradations."}
    )
    router_per_seed: bool = field(
        default=False,
        metadata={"help": "Train a router per seed (else one per suite, with seed 0)."},
    )
    timing_repeats: int = field(
        default=3, metadata={"help": "Paired timing calls for the inference-cost ratio."}
    )
    checkpoint_every: int = field(
        default=0, metadata={"help": "Recipe checkpoints (resume after Ctrl-C); 0: at the end."}
    )
    router: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "recipes/train_router.py settings."}
    )
    data: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Data settings of every restoration recipe."}
    )
    pretrain: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "recipes/pretrain.py settings (shared stage)."}
    )
    adapters: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "recipes/finetune.py settings of every adapter."}
    )
    base: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Overrides for the 'base' continuation."}
    )
    no_dam: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Overrides for the no-DAM base."}
    )

    def __post_init__(self) -> None:
        for method in self.methods:
            if method not in METHODS:
                raise unknown_name("benchmark method", method, list(METHODS))
        if not self.seeds or not self.suites or not self.methods:
            raise ConfigError("seeds, suites and methods must each name at least one entry.")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct, got {self.seeds}.")
        for seed in self.seeds:
            check_seed_range("every entry of seeds", seed)
        # Checked here, before an --overwrite run deletes the earlier one's folder.
        from loraxir.degradations import suite as load_suite

        for name in self.suites:
            load_suite(name)
        if self.source != "skimage" and not Path(self.source).is_dir():
            raise ConfigError(
                f"source {self.source!r} is neither 'skimage' nor a folder of images."
            )
        for name in ("test_fraction", "val_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in (0, 1), got {getattr(self, name)}.")
        if self.eval_patch_size is None and self.eval_batch_size > 1:
            raise ConfigError(
                f"eval_batch_size={self.eval_batch_size} with whole test photos "
                "(eval_patch_size: null): photos of different sizes cannot share a batch. Set "
                "eval_batch_size=1 (as the paper scale does) or an eval_patch_size."
            )
        for name in ("eval_repeats", "eval_batch_size", "timing_repeats"):
            check_int(name, getattr(self, name), 1)
        for name in ("eval_patch_size", "max_photo_side"):  # None: whole / full-size photos
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        check_int("adapters.r", self.adapters.get("r", 8), 1)  # before the LoRA's E·r
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}.")
        for section in ("pretrain", "adapters"):
            steps = getattr(self, section).get("max_steps")
            if not isinstance(steps, int) or steps < 1:
                raise ConfigError(
                    f"{section}.max_steps must be a positive integer (the equal budget), got "
                    f"{steps!r}; set it in the scale's YAML or with --set."
                )

    @property
    def pretrain_steps(self) -> int:
        return int(self.pretrain["max_steps"])

    @property
    def adapter_steps(self) -> int:
        return int(self.adapters["max_steps"])


def scale_path(scale: str) -> Path:
    """The YAML of a named scale."""
    if scale not in SCALES:
        raise unknown_name("benchmark scale", scale, list(SCALES))
    return CONFIGS / f"{scale}.yaml"


def load_bench_config(
    scale: str | None, path: str | Path | None = None, overrides: list[str] | None = None
) -> BenchConfig:
    """The config of ``scale`` (or the YAML at ``path``) with ``key=value`` overrides,
    every stage's recipe settings checked too (before any folder is claimed or deleted)."""
    from _all_in_one_methods import check_stage_settings

    if path is None:
        path = scale_path(scale or "tiny")
    config = load_config(BenchConfig, path, overrides or [])
    check_stage_settings(config)
    return config


def config_json(config: BenchConfig) -> dict[str, Any]:
    """The config as plain JSON data (what ``run.json`` records and resumption compares)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
