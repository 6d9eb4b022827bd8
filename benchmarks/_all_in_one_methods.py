"""What each compared method is, as recipe settings: the benchmark's single statement of
"equal steps, batch and patch size".

Shared stage, per suite (and per seed when ``router_per_seed``): ``train_router.py`` on
the training photos, then per seed ``pretrain.py`` with DAM driven by that router for
``pretrain.max_steps`` steps. Then, each for ``adapters.max_steps`` steps on the same data
settings:

=============  ============================================================================
no_dam         ``pretrain.py`` without router from scratch for pretrain + adapter steps
base           ``pretrain.py`` continuing the DAM network, every weight trained
lora           ``finetune.py``: one expert (E=1) of rank E·r on the experts' layers, routed
               by a one-class copy of the router (same e_deg for DAM, gate always 1)
peft_lora      peft's LoRA of rank E·r on the dense convolutions (``_all_in_one_peft``)
lora_ir_top1   ``finetune.py``: E experts of rank r, the router's top-1 gates
lora_ir_top2   the same with the router's soft top-2 gates (trained and tested that way)
oracle         the same experts routed by the true labels in training and test
=============  ============================================================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _all_in_one_config import BenchConfig

# Optimiser and schedule keys: the base continuation takes the adapters' schedule.
SCHEDULE = (
    "learning_rate",
    "min_learning_rate",
    "warmup_steps",
    "weight_decay",
    "lr_schedule",
    "adam_betas",
    "max_grad_norm",
)
SINGLE_CLASS = "all"


@dataclass(frozen=True)
class Paths:
    """Where one (suite, seed) of a run lives."""

    root: Path
    suite: str
    seed: int
    router_per_seed: bool

    @property
    def trainval(self) -> Path:
        return self.root / "photos" / "trainval"

    @property
    def test(self) -> Path:
        return self.root / "photos" / "test"

    @property
    def router_run(self) -> Path:
        where = self.root / self.suite
        return where / f"seed-{self.seed}" / "router" if self.router_per_seed else where / "router"

    @property
    def router(self) -> Path:
        return self.router_run / "router"

    def router_variant(self, name: str) -> Path:
        return self.router_run / "variants" / name

    @property
    def seed_dir(self) -> Path:
        return self.root / self.suite / f"seed-{self.seed}"

    def method(self, name: str) -> Path:
        return self.seed_dir / name

    @property
    def pretrained(self) -> Path:
        return self.method("pretrain") / "backbone"


@dataclass(frozen=True)
class Stage:
    """One training run: ``runner`` is ``"pretrain"``, ``"finetune"`` or ``"peft"``."""

    name: str
    runner: str
    settings: dict[str, Any]


def router_settings(config: BenchConfig, paths: Paths) -> dict[str, Any]:
    """``train_router.py`` settings of the shared router."""
    return {
        **config.router,
        "suite": paths.suite,
        "source": str(paths.trainval),
        "seed": paths.seed,
        "split_seed": config.split_seed,
        "output_dir": str(paths.router_run),
        "checkpoint_every": config.checkpoint_every,  # an interrupted router resumes too
        "keep_checkpoints": 1,
    }


def _common(config: BenchConfig, paths: Paths, name: str) -> dict[str, Any]:
    """Data and bookkeeping every restoration run shares."""
    return {
        **config.data,
        "suite": paths.suite,
        "source": str(paths.trainval),
        "test_fraction": config.val_fraction,
        "split_seed": config.split_seed,
        "seed": paths.seed,
        "output_dir": str(paths.method(name)),
        "checkpoint_every": config.checkpoint_every,
        "keep_checkpoints": 1,
    }


def shared_stage(config: BenchConfig, paths: Paths) -> Stage:
    """Degradation-guided pre-training (DAM, frozen router)."""
    settings = {**_common(config, paths, "pretrain"), **config.pretrain}
    return Stage("pretrain", "pretrain", {**settings, "router": str(paths.router)})


def method_stage(config: BenchConfig, paths: Paths, method: str, classes: int) -> Stage:
    """The training run of ``method`` (after the shared stage)."""
    common = _common(config, paths, method)
    steps = config.adapter_steps
    if method == "no_dam":
        total = config.pretrain_steps + steps
        settings = {**common, **config.pretrain, **config.no_dam, "max_steps": total}
        return Stage(method, "pretrain", {**settings, "router": None})
    if method == "base":
        schedule = {k: v for k, v in config.adapters.items() if k in SCHEDULE}
        settings = {**common, **config.pretrain, **schedule, **config.base, "max_steps": steps}
        return Stage(
            method,
            "pretrain",
            {**settings, "router": str(paths.router), "init_checkpoint": str(paths.pretrained)},
        )
    adapters = {**common, **config.adapters, "base": str(paths.pretrained), "max_steps": steps}
    rank, alpha = adapters.get("r", 8), adapters.get("lora_alpha", 16.0)
    wide = {"r": rank * classes, "lora_alpha": alpha * classes}
    if method == "lora":
        single = str(paths.router_variant(SINGLE_CLASS))
        return Stage(method, "finetune", {**adapters, **wide, "router": single, "top_k": 1})
    if method == "peft_lora":
        return Stage(method, "peft", {**_peft_settings(adapters), **wide})
    # The LoRA-IR adapters are the ones users restore with (the shipped one is seed 0's
    # top-1): their routers get class embeddings, for a class the user gives. Routed
    # training and testing do not read them.
    routed = {**adapters, "route_by": "router", "class_embeddings": True}
    if method == "lora_ir_top1":
        return Stage(method, "finetune", {**routed, "top_k": 1})
    if method == "lora_ir_top2":
        top2 = str(paths.router_variant("top2"))
        return Stage(method, "finetune", {**routed, "router": top2, "top_k": 2})
    if method == "oracle":
        return Stage(method, "finetune", {**adapters, "route_by": "label", "top_k": 1})
    raise ValueError(f"unknown method {method!r}")


def check_stage_settings(config: BenchConfig) -> list[tuple[Stage, Any]]:
    """Load every stage's recipe config from its settings (as the stage will), so that a
    mistyped or out-of-range recipe setting (``--set pretrain.bogus=3``) is refused before
    anything runs or an ``--overwrite`` deletes the earlier run. Returns each stage with
    its loaded config."""
    import _all_in_one_peft
    from _all_in_one_stages import recipe, recipe_argv

    from loraxir import degradations
    from loraxir.training import load_config

    classes = {
        "train_router": recipe("train_router").TrainRouterConfig,
        "pretrain": recipe("pretrain").PretrainConfig,
        "finetune": recipe("finetune").FinetuneConfig,
        "peft": _all_in_one_peft.PeftLoraConfig,
    }
    loaded = []
    for suite in config.suites:
        paths = Paths(Path("unused"), suite, config.seeds[0], config.router_per_seed)
        count = len(degradations.suite(suite).task_names)
        stages = [Stage("router", "train_router", router_settings(config, paths))]
        stages += [shared_stage(config, paths)]
        stages += [method_stage(config, paths, m, count) for m in config.methods]
        for stage in stages:
            overrides = recipe_argv(stage.settings)[3:]  # the --set pairs the stage passes
            loaded.append((stage, load_config(classes[stage.runner], None, overrides)))
    return loaded


def _peft_settings(adapters: dict[str, Any]) -> dict[str, Any]:
    """The adapters' settings the peft baseline has too; its targets stay its own (dense
    convolutions: the experts' target list would include depthwise ones)."""
    from _all_in_one_peft import PeftLoraConfig

    known = {f.name for f in dataclasses.fields(PeftLoraConfig)} - {"target_modules"}
    return {key: value for key, value in adapters.items() if key in known}


def make_router_variants(paths: Paths) -> dict[str, str]:
    """Write the routers the LoRA baselines and soft top-2 need, from the trained one:

    * ``all``: one class, same encoder and MLP, so the same ``e_deg`` feeds the DAM blocks
      while the single expert's gate is always 1 (a plain LoRA on a DAM network);
    * ``top2``: the trained router with ``top_k = 2`` (soft mixtures of two experts).
    """
    from loraxir.router import DegradationRouter

    router = DegradationRouter.from_pretrained(paths.router)
    single_config = dataclasses.replace(router.to_config(), degradations=[SINGLE_CLASS], top_k=1)
    single = DegradationRouter(router.encoder, single_config)
    single.mlp.load_state_dict(router.mlp.state_dict())
    single.save_pretrained(paths.router_variant(SINGLE_CLASS))
    router.top_k = min(2, len(router.degradations))
    router.save_pretrained(paths.router_variant("top2"))
    return {"classes": router.degradations}
