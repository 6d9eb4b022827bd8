"""The training loop's parts: the Accelerator, data loaders, optimizer and schedule, the
batch stream, EMA, activation checkpointing, and the stop on a non-finite loss.

Guarantees:

* The same seed gives the same numbers on the CPU, and a resumed run continues
  bit-exactly (seedable sampler, per-epoch ``set_epoch``, skipping consumed batches, RNG
  states in the checkpoint). ``batch_size`` is the *global* batch: the same config gives
  the same batches on 1 process or N (``split_batches``).
* ``--cpu`` (or ``cpu: true``) builds ``Accelerator(cpu=True)``, the only way torchrun
  runs several CPU processes as one job (gloo); without it each process trains alone.
* Progress bars draw on the main process only; tensorboard receives the flattened config.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint
from torch.utils.data import DataLoader, Dataset

from loraxir.errors import ConfigError, TrainingError
from loraxir.training.checkpoints import (
    LOGS_DIR,
    TrainState,
    check_resumable,
    clear_earlier_run,
    last_checkpoint,
)
from loraxir.training.config import RecipeConfig, config_dict, flatten_config
from loraxir.training.entry import raise_if_interrupted


def setup_accelerator(config: RecipeConfig, find_unused_parameters: bool = False) -> Any:
    """An ``Accelerator`` for ``config``: seeded, logging to tensorboard under
    ``output_dir/logs`` once :func:`start_recording` starts the trackers.

    ``find_unused_parameters`` tells DDP that some trained parameters may miss a step's
    graph (an expert no image of the batch is routed to). It writes nothing: call
    :func:`start_recording` once the run's model is built.
    """
    from accelerate import Accelerator
    from accelerate.utils import (
        DataLoaderConfiguration,
        DistributedDataParallelKwargs,
        GradientAccumulationPlugin,
        ProjectConfiguration,
        set_seed,
    )

    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        cpu=config.cpu,
        mixed_precision=config.mixed_precision,
        # Every step averages the same number of batches: train_batches streams epoch after
        # epoch, so the end of one is no step boundary (it made a step of one batch).
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with="tensorboard",
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / LOGS_DIR)
        ),
        dataloader_config=DataLoaderConfiguration(
            split_batches=True, use_seedable_sampler=True, data_seed=config.seed
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
        if find_unused_parameters
        else None,
    )
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        warnings.warn(
            "mixed_precision='fp16' does nothing on the CPU (its autocast has no float16): "
            "this run computes in float32. Use mixed_precision='bf16' on the CPU.",
            stacklevel=2,
        )
    if config.batch_size % accelerator.num_processes:
        raise ConfigError(
            f"batch_size={config.batch_size} (global) must be divisible by the "
            f"{accelerator.num_processes} processes."
        )
    set_seed(config.seed)
    return accelerator


def start_recording(accelerator: Any, config: RecipeConfig, project_name: str) -> None:
    """Make ``output_dir`` this run's: check that a resumed checkpoint has this run's
    settings, clear an overwritten run's checkpoints and logs, write the resolved config to
    ``config.yaml`` (main process) and start the tensorboard trackers.

    Call it after the model is built, so that a refused setting or resume leaves the
    folder of an earlier run as it was: its ``config.yaml`` still describes its
    checkpoints.
    """
    check_resumable(config)
    if accelerator.is_main_process:
        clear_earlier_run(config)
        output_dir = Path(config.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(config_dict(config), sort_keys=False)
        (output_dir / "config.yaml").write_text(text)
    accelerator.wait_for_everyone()
    accelerator.init_trackers(project_name, config=flatten_config(config_dict(config)))


def make_loader(
    dataset: Dataset, config: RecipeConfig, *, shuffle: bool, batch_size: int | None = None
) -> DataLoader:
    """A DataLoader with a seeded generator (shuffle order and worker seeds).

    Pass it through ``accelerator.prepare``; training loaders drop the last partial batch.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size or config.batch_size,
        shuffle=shuffle,
        drop_last=shuffle,
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed),
    )


def make_optimizer_and_scheduler(
    param_groups: list[dict[str, Any]], config: RecipeConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over ``param_groups`` (each may set its own ``lr`` and ``weight_decay``) and a
    warm-up + cosine (down to ``min_learning_rate``) or constant schedule over
    ``config.max_steps``."""
    trainable = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in param_groups]
    groups = [group for group in trainable if group["params"]]
    if not groups:
        raise ConfigError("Nothing to train: every parameter is frozen.")
    optimizer = torch.optim.AdamW(
        groups,
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
        betas=tuple(config.adam_betas),
    )
    warmup, total, cosine = config.warmup_steps, config.max_steps, config.lr_schedule == "cosine"
    floor = config.min_learning_rate / config.learning_rate if config.learning_rate else 0.0
    if warmup >= total:  # a shipped config's warm-up with a short --set max_steps
        warnings.warn(
            f"warmup_steps ({warmup}) >= max_steps ({total}): the learning rate climbs for "
            f"the whole run and ends at {total / warmup:.2g}x learning_rate"
            f"{', never decaying' if cosine else ''}. Lower it: --set warmup_steps=N.",
            stacklevel=2,
        )

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_batches(loader: Any, state: TrainState) -> Iterator[Any]:
    """Yield training batches forever, epoch after epoch, resuming after ``state.batches``.

    Each epoch calls ``loader.set_epoch`` (new shuffle order) and the dataset's
    ``set_epoch`` where it has one (new crops and degradations): Accelerate's prepared
    loader passes the epoch on to the dataset on one process only, so on several every
    epoch would draw epoch 0's patches again. On resume the consumed batches of the current
    epoch are skipped, not replayed. ``state.batches`` is advanced as batches go.
    """
    from accelerate import skip_first_batches

    per_epoch = len(loader)
    if per_epoch == 0:
        raise ConfigError(
            "The training set is smaller than one batch; lower batch_size or add data."
        )
    epoch, skip = divmod(state.batches, per_epoch)
    while True:
        loader.set_epoch(epoch)
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        epoch_loader = skip_first_batches(loader, skip) if skip else loader
        for batch in epoch_loader:
            state.batches += 1
            yield batch
        epoch, skip = epoch + 1, 0


def progress_bar(accelerator: Any, config: RecipeConfig, state: TrainState, desc: str) -> Any:
    """A tqdm bar over optimizer steps, drawn by the main process only."""
    from tqdm.auto import tqdm

    return tqdm(
        total=config.max_steps,
        initial=state.step,
        desc=desc,
        disable=not accelerator.is_local_main_process,
        dynamic_ncols=True,
    )


def check_finite_loss(
    accelerator: Any, loss: torch.Tensor, config: RecipeConfig, state: TrainState
) -> None:
    """Stop every process at once when any process's loss is NaN or infinite.

    Called before ``backward``, so the weights of the failing step are never updated.
    The error names the step and the last good checkpoint to resume from.
    """
    bad = (~torch.isfinite(loss.detach().float())).float().reshape(1)
    if not accelerator.gather(bad).any():
        return
    found = last_checkpoint(config)
    where = (
        f"The last good checkpoint is {str(found)!r} (resume it with --resume latest after "
        "lowering learning_rate, enabling max_grad_norm or switching mixed_precision off)."
        if found is not None
        else "No checkpoint was saved yet; lower learning_rate or enable max_grad_norm."
    )
    raise TrainingError(
        f"The loss became {loss.item()} at step {state.step + 1} (batch {state.batches}); "
        f"training stopped. {where}"
    )


class ExponentialMovingAverage:
    """An exponential moving average of some parameters (the trained ones).

    ``shadow ← d·shadow + (1-d)·param`` after every optimizer step, with the warm-up
    ``d = min(decay, (1 + n) / (10 + n))`` for the ``n``-th update, so early averages are
    not dominated by the random start. Shadows are float32 whatever the parameter dtype.
    :meth:`applied` swaps the averages in (validation, saving) and back. It has
    ``state_dict``/``load_state_dict``: register it with
    ``accelerator.register_for_checkpointing`` so that resuming restores it bit-exactly.
    """

    def __init__(self, parameters: dict[str, nn.Parameter], decay: float) -> None:
        if not 0 < decay < 1:
            raise ConfigError(f"EMA decay must be in (0, 1), got {decay}.")
        self.decay = decay
        self.updates = 0
        self._params = dict(parameters)
        self.shadow = {n: p.detach().float().clone() for n, p in self._params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """Move the averages towards the current parameters."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, param in self._params.items():
            self.shadow[name].lerp_(param.detach().float(), 1 - decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the parameters hold the averages; restored after."""
        saved = {n: p.detach().clone() for n, p in self._params.items()}
        with torch.no_grad():
            for name, param in self._params.items():
                param.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self._params.items():
                    param.copy_(saved[name])

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ConfigError("The saved EMA averages other parameters than this model trains.")
        self.decay, self.updates = state["decay"], state["updates"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """``name → parameter`` for every parameter that requires grad (shared ones once)."""
    seen: set[int] = set()
    found = {}
    for name, param in module.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            found[name] = param
    return found


def maybe_ema(accelerator: Any, module: nn.Module, decay: float) -> ExponentialMovingAverage | None:
    """An EMA of ``module``'s trainable parameters, registered for checkpointing, when
    ``decay > 0`` (call before :func:`~loraxir.training.checkpoints.resume`)."""
    if decay <= 0:
        return None
    ema = ExponentialMovingAverage(trainable_parameters(module), decay)
    accelerator.register_for_checkpointing(ema)
    return ema


def ema_applied(ema: ExponentialMovingAverage | None) -> contextlib.AbstractContextManager:
    """:meth:`ExponentialMovingAverage.applied`, or nothing when there is no EMA."""
    return ema.applied() if ema is not None else contextlib.nullcontext()


def enable_activation_checkpointing(module: nn.Module, suffix: str = "Block") -> list[str]:
    """Recompute the activations of ``module``'s blocks in backward instead of storing them.

    Blocks are the outermost submodules whose class name ends with ``suffix`` (NAFNet's
    ``NAFBlock``, Restormer's ``TransformerBlock``, SwinIR's ``SwinTransformerBlock``,
    SCUNet's ``ConvTransBlock``). Outputs and gradients are unchanged; memory falls, time
    rises by about one forward. Expert layers and DAM blocks read the routing state, which
    stays set until the next call, so recomputation sees the same gates. Returns the
    paths of the wrapped blocks.
    """
    wrapped: list[str] = []
    for name, sub in module.named_modules():
        if not type(sub).__name__.endswith(suffix):
            continue
        if any(name.startswith(f"{outer}.") for outer in wrapped):
            continue
        sub.forward = functools.partial(_checkpointed, sub.forward)
        wrapped.append(name)
    if not wrapped:
        raise ConfigError(
            f"gradient_checkpointing found no block (a module whose class name ends with "
            f"{suffix!r}) in {type(module).__name__}; turn it off for this network."
        )
    return wrapped


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return _checkpoint(forward, *args, use_reentrant=False, **kwargs)


def fit(
    accelerator: Any,
    config: RecipeConfig,
    state: TrainState,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loader: Any,
    compute_loss: Callable[[Any], torch.Tensor],
    ema: ExponentialMovingAverage | None = None,
    validate: Callable[[int], Any] | None = None,
    validate_every: int = 0,
    desc: str = "train",
) -> None:
    """Train until ``config.max_steps``: the loop every restoration recipe shares.

    Per optimizer step: ``compute_loss(batch)`` for each accumulated batch (stopping on a
    non-finite loss), backward, clipping, optimizer and scheduler steps, the EMA update,
    tensorboard logs every ``log_every`` steps, ``validate(step)`` every
    ``validate_every`` steps (not at the last one: the recipe validates its final
    weights itself), and checkpoints (:func:`~loraxir.training.checkpoints.maybe_checkpoint`).
    """
    from loraxir.training.checkpoints import maybe_checkpoint

    bar = progress_bar(accelerator, config, state, desc)
    batches = train_batches(loader, state)
    params = [p for p in model.parameters() if p.requires_grad]
    window: list[torch.Tensor] = []  # the micro-batch losses of one optimizer step
    model.train()
    while state.step < config.max_steps:
        raise_if_interrupted()
        batch = next(batches)
        with accelerator.accumulate(model):
            loss = compute_loss(batch)
            check_finite_loss(accelerator, loss, config, state)
            window.append(loss.detach().float())
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            used_lr = optimizer.param_groups[0]["lr"]  # the scheduler steps to the next one
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue
        step_loss = torch.stack(window).mean()
        window.clear()
        state.step += 1
        if ema is not None:
            ema.update()
        bar.update(1)
        if state.step % config.log_every == 0 or state.step == config.max_steps:
            logged = accelerator.reduce(step_loss, "mean").item()
            bar.set_postfix(loss=f"{logged:.4f}")
            accelerator.log({"train/loss": logged, "train/lr": used_lr}, step=state.step)
        if validate and validate_every and state.step % validate_every == 0:
            if state.step < config.max_steps:
                validate(state.step)
                model.train()
        maybe_checkpoint(accelerator, config, state)
    bar.close()
