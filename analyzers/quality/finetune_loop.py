"""The training loop of `compress finetune-head`: AdamW with linear warm-up and decay over
length-grouped, dynamically padded batches; the dev split scored every `eval_every` steps and
at each epoch end; the best weights (by the dev metric) kept in memory; a wall-clock budget
that stops the run cleanly after a step, or (fit_budget) shortens the schedule to the pace
measured so far, so that the learning rate still decays to 0 in time.

The dev scorer is passed in (`score(model) -> {metric: value}`): finetune.py builds it from
the evaluation task's own runner, so the numbers are those `compress evaluate` reports."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from .encode import collate
from .finetune_data import TrainSet, epoch_batches


@dataclass
class DevTracker:
    """The dev curve and the best checkpoint so far."""

    metric: str
    lower_is_better: bool = False
    curve: list[dict] = field(default_factory=list)
    best: dict | None = None               # the curve point of the best checkpoint
    best_state: dict | None = None         # its weights (a CPU copy)

    def record(self, model, point: dict) -> bool:
        """Add a curve point; keep the weights when it is the best so far (ties: the earlier one)."""
        self.curve.append(point)
        value = point["metrics"][self.metric]
        better = self.best is None or (value < self.best["metrics"][self.metric] if self.lower_is_better
                                       else value > self.best["metrics"][self.metric])
        if better:
            self.best = point
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return better


@dataclass
class LoopResult:
    steps: int                             # optimizer steps taken
    planned_steps: int
    scheduled_steps: int                   # where the schedule ended (< planned: shortened by --fit-budget)
    steps_per_epoch: int
    stopped: str                           # "completed" or "max_minutes"
    losses: list[float]
    tracker: DevTracker | None


def planned_steps(cfg, n_features: int) -> tuple[int, int]:
    """(optimizer steps of the run, steps per epoch): --epochs passes, else --steps."""
    per_epoch = math.ceil(n_features / cfg.batch_size)
    return (cfg.epochs * per_epoch if cfg.epochs else cfg.steps), per_epoch


class Schedule:
    """The learning-rate factor of step s: 0 -> 1 over the warm-up steps, then linearly to 0 at
    `total`. `shorten` moves the end earlier, decaying linearly from the factor reached."""

    def __init__(self, total: int, warmup: float):
        self.total, self.warm = total, int(total * warmup)
        self.decay_from = (self.warm, 1.0)     # (step, factor) where the linear decay starts

    def __call__(self, s: int) -> float:
        if s < self.warm:
            return s / self.warm
        s0, f0 = self.decay_from
        return max(0.0, f0 * (self.total - s) / max(1, self.total - s0))

    def shorten(self, step: int, total: int) -> bool:
        """End at `total` instead (only after the warm-up, only earlier); True if it did."""
        if step < self.warm or total >= self.total:
            return False
        self.decay_from, self.total = (step, self(step)), max(total, step + 1)
        return True


def optimizer(model, cfg, schedule: Schedule):
    """AdamW without weight decay on biases and norms (1-d tensors), and its schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def batch_stream(lengths: list[int], cfg) -> Iterator[tuple[int, list[int], bool]]:
    """(epoch, batch, last batch of its epoch), epoch after epoch, a fresh seeded order each."""
    epoch = 0
    while True:
        batches = epoch_batches(lengths, cfg.batch_size, cfg.group_batches, cfg.seed, epoch)
        for i, batch in enumerate(batches):
            yield epoch, batch, i == len(batches) - 1
        epoch += 1


def train_step(model, opt, sched, batch: dict) -> float:
    device = next(model.parameters()).device
    loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return loss.item()


def dev_point(model, score, step: int, per_epoch: int, started: float) -> dict:
    """Score the model on the dev split (eval mode, no gradients); one curve point."""
    model.eval()
    t0 = time.monotonic()
    with torch.no_grad():
        metrics = score(model)
    model.train()
    return {"step": step, "epoch": round(step / per_epoch, 3), "metrics": metrics,
            "eval_seconds": round(time.monotonic() - t0, 1), "elapsed_minutes": round((time.monotonic() - started) / 60, 2)}


def fit_to_budget(schedule: Schedule, step: int, train_started: float, deadline: float, reserve: float) -> bool:
    """--fit-budget: shorten the schedule to the steps the pace so far (dev scoring included)
    reaches before the deadline, `reserve` seconds (the final scoring) kept free."""
    now = time.monotonic()
    pace = (now - train_started) / step
    return schedule.shorten(step, step + int(max(0.0, deadline - now - reserve) / pace))


def run_training(model, train: TrainSet, cfg, pad_id: int, score, tracker: DevTracker | None, started: float,
                 progress=None) -> LoopResult:
    """Train `model` in place; `started` is the run's time.monotonic() start (for --max-minutes)."""
    planned, per_epoch = planned_steps(cfg, len(train.features))
    schedule = Schedule(planned, cfg.warmup)
    opt, sched = optimizer(model, cfg, schedule)
    emit = progress or (lambda kind, info: None)
    deadline = started + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    model.train()
    losses, stopped, scored_at, train_started = [], "completed", None, time.monotonic()
    for epoch, idx, epoch_end in batch_stream(train.lengths, cfg):
        losses.append(train_step(model, opt, sched, collate([train.features[k] for k in idx], pad_id)))
        step = len(losses)
        if step == 1 or step % cfg.log_every == 0 or step == schedule.total:
            emit("step", {"step": step, "total": schedule.total, "epoch": epoch + 1, "lr": sched.get_last_lr()[0],
                          "loss": _mean(losses[-cfg.log_every:]), "minutes": (time.monotonic() - started) / 60})
            reserve = tracker.curve[-1]["eval_seconds"] if tracker and tracker.curve else 0.0
            if cfg.fit_budget and deadline < math.inf and fit_to_budget(schedule, step, train_started, deadline,
                                                                        reserve):
                emit("fit", {"step": step, "total": schedule.total, "planned": planned})
        if tracker and (epoch_end or (cfg.eval_every and step % cfg.eval_every == 0)):
            scored_at = _score(model, score, tracker, step, per_epoch, started, emit)
        if step >= schedule.total:
            break
        if time.monotonic() > deadline:
            stopped = "max_minutes"
            emit("stop", {"step": step, "total": schedule.total, "minutes": (time.monotonic() - started) / 60})
            break
    if tracker and scored_at != len(losses):  # the last weights are always scored
        _score(model, score, tracker, len(losses), per_epoch, started, emit)
    return LoopResult(len(losses), planned, schedule.total, per_epoch, stopped, losses, tracker)


def _score(model, score, tracker: DevTracker, step: int, per_epoch: int, started: float, emit) -> int:
    point = dev_point(model, score, step, per_epoch, started)
    best = tracker.record(model, point)
    emit("eval", {**point, "metric": tracker.metric, "is_best": best, "best": tracker.best})
    return step


def _mean(values: list[float]) -> float:
    return sum(values) / max(len(values), 1)


def loss_curve(losses: list[float], every: int) -> list[dict]:
    """Mean training loss over each window of `every` steps (finetune.json)."""
    every = max(1, every)
    return [{"step": min(i + every, len(losses)), "loss": round(_mean(losses[i:i + every]), 5)}
            for i in range(0, len(losses), every)]
