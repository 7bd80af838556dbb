"""The evaluation task registry: each task is one declarative `Task` (lm-evaluation-harness style).

A task names its data reader, its runner, its gated metrics (each declaring its direction
and default tolerance) and the EvalConfig keys (recipe keys, `--flags`) that point at its
data. `evaluate` and the gate only iterate the registry, so a new task is one `register`
call: one entry in analyzers/quality/tasks.py for a built-in one, or from any module.

    task.read(task, cfg, need_train) -> [TaskData]   data read once, the same for both models
    task.run(task, model, tokenizer, data, cfg, desc) -> {"metrics": {...}, "protocol": {...},
                                                        "head": "own" | "probe"}
    task.needs_probe(task, model, tokenizer, cfg) -> bool   (default: no own head for the task)
    task.check(task, model, tokenizer, data, cfg)  raises a one-line TritpressError on input the
                                                   model cannot be scored on, before any forward
A runner may add "per_example": bootstrap.ExampleStats (the gate's Δ interval; not written out).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable

from tritpress.compressor import modelio
from tritpress.analyzers.defaults import PROBE_CHOICES  # re-exported: declared with the settings
from tritpress.compressor.errors import TritpressError

from .metrics import Metric


@dataclass
class TaskData:
    """One evaluation job's data: what both models are scored on, and where it came from."""

    label: str                  # report label: the task name, or lm:<dataset> for each LM text
    test: Any
    train: Any = None           # probe training data (None: the model's own head is used)
    protocol: dict = field(default_factory=dict)   # provenance, report.json tasks.<label>.data


@dataclass(frozen=True)
class Task:
    name: str                   # the --tasks name
    title: str
    metrics: tuple[Metric, ...]  # gated metrics, in report order
    read: Callable[..., list[TaskData]]
    run: Callable[..., dict]
    data_key: str | None = None   # EvalConfig field (recipe key, --flag) of the evaluation data
    train_key: str | None = None  # ... of the probe training data
    default_data: str = ""        # Hugging Face dataset used when no file is given (online)
    eval_split: str = "validation"
    train_split: str = "train"    # probe training data when no train file is given
    head_classes: tuple[str, ...] = ()  # class-name endings of a transformers model with its own head
    needs_probe: Callable[..., bool] | None = None  # default: the model has no own head (probe="auto")
    probe_epochs: int = 10
    check: Callable[..., None] | None = None  # check(task, model, tokenizer, data, cfg): bad input, before compute
    data_metrics: tuple[Metric, ...] = ()  # gated only on data that calls for them (tok: plain tags' macro-F1)

    @property
    def gated(self) -> tuple[Metric, ...]:
        """Every metric the gate compares when both models report it, in report order."""
        return self.metrics + self.data_metrics

    @property
    def train_flag(self) -> str:
        return "--" + (self.train_key or f"{self.name}_train").replace("_", "-")

    def eval_data(self, cfg):
        return getattr(cfg, self.data_key) if self.data_key else None

    def train_data(self, cfg):
        return getattr(cfg, self.train_key) if self.train_key else None

    def metric(self, name: str) -> Metric | None:
        return next((m for m in self.gated if m.name == name), None)

    def probe_needed(self, model, tokenizer, cfg) -> bool:
        """Whether `model` is scored through a probe; probe="never" without an own head is an error."""
        if self.needs_probe is not None:
            needed = self.needs_probe(self, model, tokenizer, cfg)
        else:
            needed = not use_own_head(model, self, cfg.probe)
        if needed and cfg.probe == "never":
            raise TritpressError(f"--probe never, but {type(model).__name__} has no {self.title} head for task "
                                 f"{self.name!r} (use --probe auto to score it through a probe)")
        return needed


def use_own_head(model, task: Task, probe: str) -> bool:
    """probe="auto": the model's own head when it has one for the task; "always": the probe;
    "never": the own head only (Task.probe_needed refuses a model without one)."""
    if probe not in PROBE_CHOICES:
        raise TritpressError(f"probe must be one of {', '.join(PROBE_CHOICES)}, not {probe!r}")
    return (probe != "always" and bool(task.head_classes) and modelio.is_hf(model)
            and type(model).__name__.endswith(task.head_classes))


_TASKS: dict[str, Task] = {}
TASKS = MappingProxyType(_TASKS)   # read-only view, in registration order


def register(task: Task) -> Task:
    if task.name in _TASKS:
        raise TritpressError(f"an evaluation task named {task.name!r} is already registered")
    if not task.metrics or len({m.name for m in task.metrics}) != len(task.metrics):
        raise TritpressError(f"task {task.name!r} needs at least one metric, each named once")
    _TASKS[task.name] = task
    return task


def unregister(name: str) -> Task:
    return _TASKS.pop(name)


@contextmanager
def registered(task: Task):
    """The task is registered inside the block only (tests, one-off tasks)."""
    register(task)
    try:
        yield task
    finally:
        unregister(task.name)


def get(name: str) -> Task:
    if name not in _TASKS:
        parse_tasks(name)  # raises the one-line "unknown task" error
    return _TASKS[name]


def parse_tasks(spec: str) -> list[str]:
    names = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in _TASKS]
    if unknown or not names:
        raise TritpressError(f"unknown task(s) {', '.join(unknown) or spec!r}; choose from {', '.join(_TASKS)}")
    return list(dict.fromkeys(names))


def find_metric(task: str, name: str) -> Metric:
    """The metric `name` as task `task` declares it; an undeclared one is higher-is-better, 1 point."""
    declared = _TASKS[task].metric(name) if task in _TASKS else None
    return declared or Metric(name)
