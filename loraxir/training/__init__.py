"""The machinery shared by the training recipes (``recipes/*.py``), so each recipe holds
only what is particular to its job.

A recipe reads top to bottom::

    config = parse_recipe_args(MyConfig, "what this trains")    # YAML + --set overrides
    prepare_output_dir(config, ("adapter",))                     # no silent overwrite
    data = build_data(config)                                     # data errors before models
    accelerator = setup_accelerator(config)                       # seeds, gloo on CPU
    model = build_model(config)                                   # model errors before writing
    start_recording(accelerator, config, "my_recipe")            # config.yaml, trackers
    model, optimizer, loader, scheduler = accelerator.prepare(...)
    ema = maybe_ema(accelerator, model, config.ema_decay)
    state = resume(accelerator, config)                          # or a fresh TrainState
    fit(accelerator, config, state, model=..., compute_loss=..., validate=...)
    metrics = validate(...); save the result with save_pretrained

Modules: :mod:`~loraxir.training.config` (typed YAML configs),
:mod:`~loraxir.training.engine` (Accelerator, loaders, optimizer, loop, EMA, activation
checkpointing, stop on NaN), :mod:`~loraxir.training.checkpoints` (save, bit-exact
resume, fingerprints, output folders), :mod:`~loraxir.training.evaluation` (PSNR/SSIM
per task gathered over processes, image grids, confusion matrices) and
:mod:`~loraxir.training.restoration` (data, loss and backbone folders of the restoration
recipes) and :mod:`~loraxir.training.entry` (how a script exits on an error or Ctrl-C).
See ``docs/recipes.md``.
"""

from loraxir.training.checkpoints import (
    CHECKPOINTS_DIR,
    STATE_NAME,
    TrainState,
    checkpoint_dir,
    complete_checkpoints,
    last_checkpoint,
    maybe_checkpoint,
    prepare_output_dir,
    resume,
    save_checkpoint,
)
from loraxir.training.config import (
    RecipeConfig,
    config_dict,
    fingerprint,
    flatten_config,
    load_config,
    parse_recipe_args,
)
from loraxir.training.engine import (
    ExponentialMovingAverage,
    TrainingError,
    check_finite_loss,
    enable_activation_checkpointing,
    fit,
    make_loader,
    make_optimizer_and_scheduler,
    maybe_ema,
    progress_bar,
    setup_accelerator,
    start_recording,
    train_batches,
    trainable_parameters,
)
from loraxir.training.evaluation import (
    confusion_matrix,
    evaluate_restoration,
    format_table,
    save_confusion_matrix,
    save_image_grid,
    write_json,
)

__all__ = [
    "CHECKPOINTS_DIR",
    "STATE_NAME",
    "ExponentialMovingAverage",
    "RecipeConfig",
    "TrainState",
    "TrainingError",
    "check_finite_loss",
    "checkpoint_dir",
    "complete_checkpoints",
    "config_dict",
    "confusion_matrix",
    "enable_activation_checkpointing",
    "evaluate_restoration",
    "fingerprint",
    "fit",
    "flatten_config",
    "format_table",
    "last_checkpoint",
    "load_config",
    "make_loader",
    "make_optimizer_and_scheduler",
    "maybe_checkpoint",
    "maybe_ema",
    "parse_recipe_args",
    "prepare_output_dir",
    "progress_bar",
    "resume",
    "save_checkpoint",
    "save_confusion_matrix",
    "save_image_grid",
    "setup_accelerator",
    "start_recording",
    "train_batches",
    "trainable_parameters",
    "write_json",
]
