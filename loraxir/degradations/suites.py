"""Task suites: named sets of degradation tasks, the synthetic stand-ins of the paper's settings.

A suite is a YAML file. Built-in suites live in ``loraxir/suites/``; users pass the path of
their own file to :func:`suite` or :func:`load_suite`. The format::

    name: my_suite
    description: one line shown by `loraxir degradations --list`
    tasks:                      # the order defines the task index
      - name: noise_25
        label: noise            # degradation class for the router (default: the task name)
        steps:                  # applied in order; several steps make a mixture
          - noise: {sigma: 25}  # a number fixes a parameter, [low, high] draws from a range
      - name: rain_haze
        steps: [rain, {haze: {beta: [0.5, 1.0]}}]   # a bare name keeps default ranges
    schedule:                   # optional, for video: tasks switch every `period` frames
      period: 10
      order: [noise_25, rain_haze]

Every name and parameter is checked when the file loads; a key written twice in one
mapping is an error (YAML would keep only the last).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from loraxir.degradations.registry import Compose, check_images, compose, get
from loraxir.errors import ConfigError, UnknownNameError, unknown_name
from loraxir.validation import read_yaml_file

_SUITE_KEYS = {"name", "description", "tasks", "schedule"}
_TASK_KEYS = {"name", "label", "description", "steps"}
_SCHEDULE_KEYS = {"period", "order"}


@dataclass(frozen=True)
class Task:
    """One task of a suite: a name, a degradation class ``label`` and a pipeline."""

    name: str
    label: str
    pipeline: Compose
    description: str = ""

    def degrade(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Any]]:
        """Degrade a batch; returns ``(degraded, {"steps": [...]})`` (see :class:`Compose`)."""
        return self.pipeline(images, generator)


@dataclass(frozen=True)
class Schedule:
    """A video schedule: the tasks in ``order`` take turns, each for ``period`` frames."""

    period: int
    order: tuple[str, ...]


@dataclass(frozen=True)
class Suite:
    """A named list of tasks. Task ``i`` has task index ``i``; tasks sharing a ``label``
    (e.g. noise at three σ) share a degradation class, indexed by :attr:`labels`."""

    name: str
    description: str
    tasks: tuple[Task, ...]
    schedule: Schedule | None = None

    @property
    def task_names(self) -> list[str]:
        """Task names in task-index order."""
        return [task.name for task in self.tasks]

    @property
    def labels(self) -> list[str]:
        """Degradation class names, in order of first appearance among the tasks."""
        return list(dict.fromkeys(task.label for task in self.tasks))

    def __len__(self) -> int:
        return len(self.tasks)

    def index(self, task: int | str) -> int:
        """The task index of ``task`` (a name or an index)."""
        if isinstance(task, int) and not isinstance(task, bool):
            if not 0 <= task < len(self.tasks):
                raise ConfigError(
                    f"Suite {self.name!r} has tasks 0..{len(self.tasks) - 1}, got index {task}."
                )
            return task
        if task not in self.task_names:
            raise unknown_name("task", task, self.task_names, f"(suite {self.name!r})")
        return self.task_names.index(task)

    def task(self, task: int | str) -> Task:
        """The :class:`Task` named (or indexed) ``task``."""
        return self.tasks[self.index(task)]

    def label_index(self, task: int | str) -> int:
        """The degradation class index (into :attr:`labels`) of ``task``."""
        return self.labels.index(self.task(task).label)

    def degrade(
        self, images: Tensor, task: int | str, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Any]]:
        """Degrade a batch ``(B, 3, H, W)`` in [0, 1] with one task's pipeline."""
        return self.task(task).degrade(images, generator)

    def frame_tasks(self, num_frames: int, period: int | None = None) -> list[int]:
        """The task index of each of ``num_frames`` frames under the schedule.

        Without a schedule in the file, every task takes a turn in suite order.
        """
        order = self.schedule.order if self.schedule else tuple(self.task_names)
        if period is None:
            period = self.schedule.period if self.schedule else 1
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ConfigError(
                f"A schedule period is a whole number of frames >= 1, got {period!r}."
            )
        return [self.index(order[(frame // period) % len(order)]) for frame in range(num_frames)]

    def degrade_video(
        self, frames: Tensor, generator: torch.Generator | None = None, period: int | None = None
    ) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
        """Degrade frames ``(T, 3, H, W)`` following the schedule.

        Each run of frames with the same task is one segment: its parameters are drawn once
        (a camera does not change settings every frame) while the noise patterns differ per
        frame. Returns the frames, the task index per frame ``(T,)`` and one reported
        parameter set per segment.
        """
        check_images(frames)
        per_frame = self.frame_tasks(frames.shape[0], period)
        out, segments, start = torch.empty_like(frames), [], 0
        while start < len(per_frame):
            stop = start
            while stop < len(per_frame) and per_frame[stop] == per_frame[start]:
                stop += 1
            degraded, params = self.degrade(frames[start:stop], per_frame[start], generator)
            out[start:stop] = degraded
            task = self.task_names[per_frame[start]]
            segments.append({"task": task, "frames": [start, stop], **params})
            start = stop
        return out, torch.tensor(per_frame), segments

    def describe(self) -> str:
        """A plain-text table of tasks, labels and steps (used by the CLI and the docs)."""
        lines = [f"{self.name}: {self.description}"]
        for index, task in enumerate(self.tasks):
            steps = " -> ".join(_format_step(name, params) for name, params in task.pipeline.steps)
            lines.append(f"  {index}  {task.name:<12} [{task.label}]  {steps}")
        if self.schedule:
            order = ", ".join(self.schedule.order)
            lines.append(f"  schedule: every {self.schedule.period} frames cycle {order}")
        return "\n".join(lines)


def available_suites() -> list[str]:
    """Names of the built-in suites."""
    folder = resources.files("loraxir") / "suites"
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def suite(name: str | Path) -> Suite:
    """A built-in suite by name, or a user suite by the path of its YAML file."""
    text = str(name)
    if text in available_suites():
        return _builtin(text)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return load_suite(text)
    raise unknown_name(
        "suite", text, available_suites(), hint="Or pass the path of a suite YAML file."
    )


def load_suite(path: str | Path) -> Suite:
    """Load and check a suite YAML file (format in this module's docstring)."""
    path = Path(path)
    if not path.exists() and str(path) in available_suites():
        raise ConfigError(
            f"{str(path)!r} is the name of a built-in suite, not a file: load it with "
            f"loraxir.degradations.suite({str(path)!r})."
        )
    data = read_yaml_file(path, "Suite file")
    return _parse_suite(data, default_name=path.stem, where=str(path))


@functools.cache
def _builtin(name: str) -> Suite:
    with resources.as_file(resources.files("loraxir") / "suites" / f"{name}.yaml") as path:
        return load_suite(path)


def _parse_suite(data: Any, default_name: str, where: str) -> Suite:
    _check_mapping(data, _SUITE_KEYS, where)
    tasks_data = data.get("tasks")
    if not isinstance(tasks_data, list) or not tasks_data:
        raise ConfigError(f"{where}: 'tasks' must be a non-empty list of tasks.")
    tasks = tuple(_parse_task(item, f"{where}: task {i}") for i, item in enumerate(tasks_data))
    names = [task.name for task in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{where}: task names must be unique; repeated: {duplicates}.")
    schedule = _parse_schedule(data.get("schedule"), names, where)
    name = _text(data, "name", default_name, where)
    return Suite(name, _text(data, "description", "", where, empty=True), tasks, schedule)


def _parse_task(data: Any, where: str) -> Task:
    _check_mapping(data, _TASK_KEYS, where)
    if "name" not in data or "steps" not in data:
        raise ConfigError(f"{where}: a task needs a 'name' and a list of 'steps'.")
    name = _text(data, "name", "", where)
    where = f"{where} ({name})"
    steps = data["steps"]
    if not isinstance(steps, list) or not steps:
        raise ConfigError(f"{where}: 'steps' must be a non-empty list.")
    parsed = [_parse_step(step, where) for step in steps]
    try:
        pipeline = compose(parsed)
    except (ConfigError, UnknownNameError) as error:
        # The registry's message names the degradation and parameter; add the file and task.
        raise type(error)(f"{where}: {error}") from None
    for step, params in pipeline.steps:
        inputs = sorted(set(params) & set(get(step).extras))
        if inputs:  # checked by the function only when it runs, mid-training
            raise ConfigError(
                f"{where}: {step}'s {inputs} are inputs given in code (tensors, such as a "
                "depth map), not suite settings; drop them from the file."
            )
    label = _text(data, "label", name, where)
    return Task(name, label, pipeline, _text(data, "description", "", where, empty=True))


def _text(data: Mapping[str, Any], key: str, default: str, where: str, empty: bool = False) -> str:
    """``data[key]`` as a string (``default`` if absent). A bare ``key:`` reads as null,
    which ``str`` would turn into the text ``"None"``: it is the empty string here, and an
    error unless ``empty`` (a task named ``""`` or ``"None"`` is never what was meant)."""
    if key not in data:
        return default
    value = "" if data[key] is None else data[key]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(
            f"{where}: '{key}' must be text, got {value!r}; quote it if it is meant as text."
        )
    text = str(value)
    if not text.strip() and not empty:
        raise ConfigError(f"{where}: '{key}' is empty; write a {key}.")
    return text


def _parse_step(step: Any, where: str) -> str | tuple[str, Mapping[str, Any]]:
    if isinstance(step, str):
        return step
    if isinstance(step, Mapping) and len(step) == 1:
        ((name, params),) = step.items()
        if isinstance(params, Mapping) and any(isinstance(key, bool) for key in params):
            raise ConfigError(
                f"{where}: step {name!r} has a parameter key read as a boolean: YAML reads "
                "on, off, yes and no as true or false; quote the key ('on': ...)."
            )
        if params is None or isinstance(params, Mapping):
            return str(name), dict(params or {})
    raise ConfigError(
        f"{where}: cannot read step {step!r}; write a degradation name or "
        "{name: {param: value, ...}}."
    )


def _parse_schedule(data: Any, task_names: Sequence[str], where: str) -> Schedule | None:
    if data is None:
        return None
    _check_mapping(data, _SCHEDULE_KEYS, f"{where}: schedule")
    period, order = data.get("period"), data.get("order", list(task_names))
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ConfigError(f"{where}: schedule.period must be an integer >= 1, got {period!r}.")
    if not isinstance(order, list) or not order:
        raise ConfigError(f"{where}: schedule.order must be a non-empty list of task names.")
    order = [str(name) if isinstance(name, int | float) else name for name in order]  # as tasks
    for name in order:
        if name not in task_names:
            raise unknown_name("task", name, task_names, where=f"in {where}'s schedule")
    return Schedule(period, tuple(order))


def _check_mapping(data: Any, allowed: set[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}.")
    extra = sorted(set(map(str, data)) - allowed)
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {extra}; allowed keys: {sorted(allowed)}.")


def _format_step(name: str, params: Mapping[str, Any]) -> str:
    if not params:
        return name
    return name + "(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"
