"""Ternary quantization-aware fine-tuning with distillation from the original model.

    student = prepare(copy.deepcopy(model), TernaryConfig())   # fake-quant, trainable
    result = train_qat(student, teacher=model, blocks=..., cfg=TrainConfig(steps=200))
    model = convert(student)          # result.findings: curves, timings, final losses

Loss on LM text blocks (a [N, seq_len] tensor of token ids; for a model whose output is only the
next token's logits, windows whose last token is the target, see data.next_token_windows):
       task_weight * next-token CE (causal LMs)
     + kd_weight * KL(teacher || student) on logits at temperature T (models with an output head),
       or normalized MSE on the main output (encoders without a head)
     + hidden_weight * mean over blocks of the normalized MSE of block outputs (TernaryBERT-style).
Loss on a task's examples (an `ExampleSource`: padded batches of keyword inputs with gold labels),
TernaryBERT's recipe with the model's own head:
       kd_weight * KL(teacher || student) on the head's logits at temperature T (cls: per example;
       tok: per scored token; qa: start and end over the real positions)
     + hidden_weight * block-output NMSE over real tokens + attention_weight * attention NMSE
     + label_weight * gold-label CE.
Every task term is a mean over each example's own tokens, then over examples, so that splitting a
batch across processes or micro batches, each padded to its own longest example, does not change it.
The quantization warm-up factor lambda (w + lambda*(q(w) - w)) rises from 0 to 1 over
`quant_warmup` steps. Dropout is off (the student runs in eval mode): distillation from a
deterministic teacher, and results that do not depend on the number of processes.

The same function runs in one process or under torchrun (DDP, or FSDP2 with
`parallel="fsdp"`): every step takes the same global batch of sequences whatever the world
size; each rank takes an equal slice, so N processes reproduce one process's weights up to
float summation order. Training state is checkpointed atomically every `checkpoint_every`
steps and `resume=True` continues exactly where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .distributed import DistContext
from .errors import TrainingInterrupted, TritpressError
from .fileio import atomic_path, write_json
from .fused import fusable, fused_kernels, fusion_failure
from .settings import PARALLEL, QUANT_SCHEDULES, SCHEDULES, TASKS, TrainConfig  # re-exported: torch-free home
from .modelio import BlockOutputs, ModelIO, eager_attention, nmse, task_forward
from .structure import ModelStructure
from .transform import set_lambda, tie_groups

QUIET_LOGITS = -1e4   # logit put on padding before a softmax over positions: probability exactly 0


class ExampleSource(Protocol):
    """A task's training examples, encoded once, served as padded batches (built above this floor:
    the pipeline reads the task data with the evaluation readers).

    `task` is cls | tok | qa. `batch(indices)` pads those examples to the longest of them and
    returns keyword inputs (input_ids, attention_mask[, token_type_ids]) with the gold labels:
    `labels` [B] (cls) or [B, T] with -100 off each word's first sub-token (tok), or
    `start_positions` / `end_positions` [B] (qa)."""
    task: str

    def __len__(self) -> int: ...

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]: ...


def quant_lambda(step: int, cfg: TrainConfig) -> float:
    """lambda at optimizer step `step` (0-based count of steps already taken)."""
    if cfg.quant_schedule == "none" or cfg.quant_warmup <= 0:
        return 1.0
    x = min(step / cfg.quant_warmup, 1.0)
    if cfg.quant_schedule == "linear":
        return x
    s = lambda v: 1.0 / (1.0 + math.exp(-12.0 * (v - 0.5)))  # noqa: E731
    return (s(x) - s(0.0)) / (s(1.0) - s(0.0))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def teacher_precision(cfg: TrainConfig, device: torch.device):
    """The teacher's forward under bf16 autocast with teacher_dtype bf16 (its outputs are read as
    float32 by every loss), as it is otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if cfg.teacher_dtype == "bf16" else nullcontext()


def distill_losses(io: ModelIO, student, teacher, ids, s_blocks: BlockOutputs, t_blocks: BlockOutputs,
                   cfg: TrainConfig) -> dict[str, torch.Tensor]:
    inputs = io.lm_inputs(ids)  # a next-token-only model reads each window but its last token, its target
    with torch.no_grad(), teacher_precision(cfg, ids.device):
        t_out = io.forward(teacher, inputs).float()
        t_hidden = t_blocks.take()
    s_out = io.forward(student, inputs)
    s_hidden = s_blocks.take()
    losses = {}
    if io.has_head:
        s_kd, t_kd, produced = student_vocabulary(s_out, t_out)
        target = distill_targets(io.next_token_targets(s_out, ids), produced) if io.causal else None
        kd, task = logit_losses(s_kd.flatten(0, -2), t_kd.flatten(0, -2), target, cfg.kd_temperature)
        losses["kd"] = kd
        if task is not None:
            losses["task"] = task
    else:
        losses["kd"] = nmse(s_out, t_out)
    if s_hidden:
        losses["hidden"] = torch.stack([nmse(s, t) for s, t in zip(s_hidden, t_hidden)]).mean()
    weights = {"task": cfg.task_weight, "kd": cfg.kd_weight, "hidden": cfg.hidden_weight}
    losses["loss"] = sum(weights[k] * v for k, v in losses.items())
    return losses


@fusable
def logit_losses(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None, T: float):
    """Logit distillation and next-token loss on [rows, vocab] logits, from one log-softmax of the
    student when T = 1 (fused into a few loops under fused kernels) -> (KL(teacher || student) at
    temperature T times T^2, mean over rows; cross-entropy of the student on `target` (-100: no
    target), mean over targeted rows, or None without targets)."""
    log_s = F.log_softmax(student / T if T != 1 else student, -1)
    log_t = F.log_softmax(teacher / T if T != 1 else teacher, -1)
    kd = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * (T * T)
    if target is None:
        return kd, None
    log_s1 = log_s if T == 1 else F.log_softmax(student, -1)
    return kd, F.nll_loss(log_s1, target, ignore_index=-100)


def distill_targets(target: torch.Tensor, produced: torch.Tensor | None) -> torch.Tensor:
    """Next-token targets over the vocabulary the student produces: a trimmed vocabulary cannot
    produce dropped ids (no target: -100), the others renumbered to their column among the
    produced ids (the log-softmax over those equals the one over all: the rest score -inf)."""
    if produced is None:
        return target
    column = produced.long().cumsum(0) - 1
    known = target.clamp(min=0)
    return torch.where((target >= 0) & produced[known], column[known], -100)


def student_vocabulary(s_out: torch.Tensor, t_out: torch.Tensor):
    """A trimmed student (compressor/vocab) scores dropped ids -inf. Distillation is over the ids it
    can produce: both logit sets restricted to them (the teacher renormalized over the kept ids),
    and next-token targets it cannot produce are ignored. -> (student, teacher, produced ids mask
    or None when the student scores the whole vocabulary)."""
    produced = torch.isfinite(s_out.detach().reshape(-1, s_out.shape[-1])[0])
    if bool(produced.all()):
        return s_out, t_out, None
    return s_out[..., produced], t_out[..., produced], produced


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """KL(teacher || student) over the last dim at temperature T, times T^2, per row: [..., C] -> [...]."""
    log_s, log_t = F.log_softmax(student / T, -1), F.log_softmax(teacher / T, -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1) * T * T


def example_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] values -> the mean over each example's masked-in tokens, then over examples."""
    mask = mask.float()
    return ((values * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def masked_nmse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NMSE of [B, T, ...] outputs over each example's real tokens (mask [B, T]), then over examples."""
    m = mask.float().reshape(*mask.shape, *([1] * (teacher.dim() - 2)))
    diff = ((student.float() - teacher.float()).pow(2) * m).flatten(1).sum(1)
    return (diff / (teacher.float().pow(2) * m).flatten(1).sum(1).clamp(min=1e-8)).mean()


def attention_nmse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """NMSE of attention probabilities [B, heads, T, T] over the real query rows (the padded keys
    have probability 0 in both), per example, then over examples."""
    rows = mask.float()[:, None, :, None]
    diff = ((student.float() - teacher.float()).pow(2) * rows).flatten(1).sum(1)
    return (diff / (teacher.float().pow(2) * rows).flatten(1).sum(1).clamp(min=1e-8)).mean()


def head_kl(student: list, teacher: list, batch: dict, task: str, T: float) -> torch.Tensor:
    """Logit distillation on a task head: cls per example, tok per scored token, qa over the real
    positions of start and end (averaged)."""
    if task == "cls":
        return _kl_rows(student[0], teacher[0], T).mean()
    if task == "tok":
        return example_mean(_kl_rows(student[0], teacher[0], T), batch["labels"] != -100)
    quiet = ~batch["attention_mask"].bool()
    kl = [_kl_rows(s.masked_fill(quiet, QUIET_LOGITS), t.masked_fill(quiet, QUIET_LOGITS), T).mean()
          for s, t in zip(student, teacher)]
    return sum(kl) / len(kl)


def gold_ce(student: list, batch: dict, task: str) -> torch.Tensor:
    """Cross-entropy of the student's head on the gold labels, per example then over examples."""
    if task == "cls":
        return F.cross_entropy(student[0], batch["labels"])
    if task == "tok":
        labels = batch["labels"]
        ce = F.cross_entropy(student[0].transpose(1, 2), labels.clamp(min=0), reduction="none")
        return example_mean(ce, labels != -100)
    quiet = ~batch["attention_mask"].bool()
    golds = (batch["start_positions"], batch["end_positions"])
    return sum(F.cross_entropy(s.masked_fill(quiet, QUIET_LOGITS), g) for s, g in zip(student, golds)) / 2


def task_losses(io: ModelIO, student, teacher, batch: dict, s_blocks: BlockOutputs, t_blocks: BlockOutputs,
                cfg: TrainConfig, task: str) -> dict[str, torch.Tensor]:
    """The TernaryBERT losses on one padded batch of task examples (see the module docstring)."""
    attend = cfg.attention_weight > 0
    with torch.no_grad(), teacher_precision(cfg, batch["input_ids"].device):
        t_logits, t_attn = task_forward(io, teacher, batch, attend)
        t_logits = [t.float() for t in t_logits]
        t_hidden = t_blocks.take()
    s_logits, s_attn = task_forward(io, student, batch, attend)
    s_hidden = s_blocks.take()
    mask = batch["attention_mask"]
    losses = {"kd": head_kl(s_logits, t_logits, batch, task, cfg.kd_temperature)}
    if s_hidden:
        losses["hidden"] = torch.stack([masked_nmse(s, t, mask) for s, t in zip(s_hidden, t_hidden)]).mean()
    if s_attn:
        losses["attention"] = torch.stack([attention_nmse(s, t, mask) for s, t in zip(s_attn, t_attn)]).mean()
    if cfg.label_weight > 0:
        losses["label"] = gold_ce(s_logits, batch, task)
    weights = {"kd": cfg.kd_weight, "hidden": cfg.hidden_weight, "attention": cfg.attention_weight,
               "label": cfg.label_weight}
    losses["loss"] = sum(weights[k] * v for k, v in losses.items())
    return losses


# ------------------------------------------------------------------ state


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def batch_indices(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """The global batch of step `step`: a seeded permutation per epoch, independent of world size."""
    out = []
    start = step * batch
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset: offset + batch - len(out)].tolist())
    return torch.tensor(out)


# ------------------------------------------------------------------ loop


def _wrap(student: nn.Module, ctx: DistContext, cfg: TrainConfig, io: ModelIO) -> nn.Module:
    if not ctx.enabled:
        return student
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for path in io.block_paths:  # one unit per block; tied/shared tensors stay in the root unit
            fully_shard(student.get_submodule(path))
        return fully_shard(student)
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(student, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
               find_unused_parameters=True)


def _full_state(wrapped: nn.Module, student: nn.Module, optimizer, ctx: DistContext, cfg: TrainConfig):
    if ctx.enabled and cfg.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(wrapped, options=opts)
        for keys in tie_groups(student):  # gathered copies of a tied tensor become one tensor again
            if keys[0] in model_state:
                for alias in keys[1:]:
                    model_state[alias] = model_state[keys[0]]
        return model_state, get_optimizer_state_dict(wrapped, optimizer, options=opts)
    return student.state_dict(), optimizer.state_dict()


def _load_full_state(wrapped, student, optimizer, model_state, optim_state, ctx, cfg):
    if ctx.enabled and cfg.parallel == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        set_model_state_dict(wrapped, model_state, options=opts)
        set_optimizer_state_dict(wrapped, optimizer, optim_state, options=opts)
        return
    student.load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)


@dataclass
class TrainResult:
    """What train_qat gives back: the findings for the report and, under FSDP, the gathered full
    state dict (the student itself stays sharded: rebuild a plain one from it)."""
    findings: dict
    full_state: dict | None = None


@dataclass
class _Run:
    """Everything one training run's steps share."""
    cfg: TrainConfig
    ctx: DistContext
    io: ModelIO
    student: nn.Module
    teacher: nn.Module
    wrapped: nn.Module          # the student under DDP/FSDP, or the student itself
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    blocks: tuple[BlockOutputs, BlockOutputs]   # student's, teacher's
    local: int                  # sequences per step on this process
    micro: int                  # sequences per forward
    state_dir: Path
    autocast: object
    task: str = "lm"            # lm: token blocks; cls | tok | qa: an ExampleSource's batches


def _per_process_batch(cfg: TrainConfig, ctx: DistContext) -> tuple[int, int]:
    """-> (sequences per step on this process, sequences per forward)."""
    if cfg.batch_size % ctx.world:
        raise TritpressError(f"batch size {cfg.batch_size} must be a multiple of the {ctx.world} processes")
    local = cfg.batch_size // ctx.world
    micro = cfg.micro_batch_size or local
    if local % micro:
        raise TritpressError(f"micro batch {micro} must divide the per-process batch {local}")
    return local, micro


@contextmanager
def _borrowed(teacher: nn.Module, device: torch.device):
    """The caller's teacher, frozen and on `device` for the run, given back as it came."""
    teacher_device = next(teacher.parameters()).device
    teacher_grad = [p.requires_grad for p in teacher.parameters()]
    teacher.eval().requires_grad_(False).to(device)
    try:
        yield teacher
    finally:
        for p, flag in zip(teacher.parameters(), teacher_grad):
            p.requires_grad_(flag)
        teacher.to(teacher_device)


def _setup(student, teacher, io: ModelIO, cfg: TrainConfig, ctx: DistContext, batch: tuple[int, int],
           state_dir, task: str) -> _Run:
    student.to(ctx.device)
    student.eval()  # dropout off: see module docstring
    blocks = BlockOutputs(student, io.block_paths), BlockOutputs(teacher, io.block_paths)
    wrapped = _wrap(student, ctx, cfg, io)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" else nullcontext())
    return _Run(cfg, ctx, io, student, teacher, wrapped, params, optimizer, scheduler, blocks, *batch,
                Path(state_dir), autocast, task)


def _resume(run: _Run) -> tuple[int, list]:
    """Seed, then continue from the checkpoint when asked to. -> (first step, curve so far)."""
    torch.manual_seed(run.cfg.seed)
    ckpt_path = run.state_dir / "train_state.pt"
    if not (run.cfg.resume and ckpt_path.exists()):
        return 0, []
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # our own file
    _load_full_state(run.wrapped, run.student, run.optimizer, ckpt["model"], ckpt["optimizer"], run.ctx, run.cfg)
    run.scheduler.load_state_dict(ckpt["scheduler"])
    _set_rng_state(ckpt["rng"])
    return ckpt["step"], ckpt["curve"]


def _micro_batches(run: _Run, data, mine: torch.Tensor) -> list:
    """This process's examples of the step (`mine`: their indices) as micro batches: slices of the
    token blocks, or each micro batch padded by the source to its own longest example."""
    if isinstance(data, torch.Tensor):
        blocks = data[mine].to(run.ctx.device)
        return [blocks[m0: m0 + run.micro] for m0 in range(0, run.local, run.micro)]
    return [{k: v.to(run.ctx.device) for k, v in data.batch(mine[m0: m0 + run.micro].tolist()).items()}
            for m0 in range(0, run.local, run.micro)]


def _losses(run: _Run, inputs) -> dict[str, torch.Tensor]:
    s_blocks, t_blocks = run.blocks
    if run.task == "lm":
        return distill_losses(run.io, run.wrapped, run.teacher, inputs, s_blocks, t_blocks, run.cfg)
    return task_losses(run.io, run.wrapped, run.teacher, inputs, s_blocks, t_blocks, run.cfg, run.task)


def _accumulate(run: _Run, micro_batches: list) -> dict[str, float]:
    """Forward and backward over this process's micro batches (gradients sync on the last one).
    -> this process's losses, averaged over its examples, and the real tokens it read."""
    sums: dict[str, float] = {}
    for m, inputs in enumerate(micro_batches):
        share = run.micro / run.local
        sync = nullcontext() if (m == len(micro_batches) - 1 or not hasattr(run.wrapped, "no_sync")) \
            else run.wrapped.no_sync()
        with sync, run.autocast:
            losses = _losses(run, inputs)
            (losses["loss"] * share).backward()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.detach().item() * share
        if isinstance(inputs, dict):
            sums["tokens"] = sums.get("tokens", 0.0) + float(inputs["attention_mask"].sum())
    return sums


def _step(run: _Run, step: int, data) -> dict:
    """One optimizer step on the global batch of `step`. -> its curve entry (without timing)."""
    cfg, ctx = run.cfg, run.ctx
    lam = quant_lambda(step, cfg)
    set_lambda(run.student, lam)
    idx = batch_indices(step, len(data), cfg.batch_size, cfg.seed)
    sums = _accumulate(run, _micro_batches(run, data, idx[ctx.rank * run.local:(ctx.rank + 1) * run.local]))
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)) if cfg.grad_clip > 0 else 0.0
    lr_used = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    metrics = ctx.all_reduce_mean(sums)
    tokens = metrics.pop("tokens", None)  # task batches: the real tokens of the step, all processes
    entry = {"step": step + 1, **{k: round(v, 6) for k, v in metrics.items()}, "lambda": round(lam, 4),
             "lr": lr_used, "grad_norm": round(grad_norm, 4)}
    if tokens is not None:
        entry["tokens"] = round(tokens * ctx.world)
    return entry


def _log(run: _Run, entry: dict) -> None:
    if run.ctx.is_main:
        run.state_dir.mkdir(parents=True, exist_ok=True)
        with open(run.state_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")


def _checkpoint(run: _Run, done: int, curve: list) -> None:
    """Every `checkpoint_every` steps and at the last: the full training state, atomically."""
    cfg = run.cfg
    if not cfg.checkpoint_every or not (done % cfg.checkpoint_every == 0 or done in (cfg.steps, cfg.last_step)):
        return
    model_state, optim_state = _full_state(run.wrapped, run.student, run.optimizer, run.ctx, cfg)
    if run.ctx.is_main:
        with atomic_path(run.state_dir / "train_state.pt") as tmp:
            torch.save({"step": done, "model": model_state, "optimizer": optim_state,
                        "scheduler": run.scheduler.state_dict(), "rng": _rng_state(), "curve": curve,
                        "config": dataclasses.asdict(cfg)}, tmp)
    run.ctx.barrier()


def _train_steps(run: _Run, data, start: int, curve: list, on_step: Callable[[dict], None] | None) -> float:
    """Steps `start`..cfg.last_step, each logged and checkpointed when due. -> start time."""
    t0 = time.perf_counter()
    task_tokens = 0
    for step in range(start, run.cfg.last_step):
        entry = _step(run, step, data)
        elapsed = time.perf_counter() - t0
        if run.task == "lm":
            tokens_done = (step + 1 - start) * run.cfg.batch_size * run.cfg.seq_len
        else:
            task_tokens += entry["tokens"]
            tokens_done = task_tokens
            entry["examples_per_s"] = round((step + 1 - start) * run.cfg.batch_size / elapsed, 1)
        entry.update(tokens_per_s=round(tokens_done / elapsed, 1), elapsed_s=round(elapsed, 2))
        curve.append(entry)
        _log(run, entry)
        _checkpoint(run, step + 1, curve)
        if on_step and run.ctx.is_main:  # after the checkpoint: a callback sees a finished step
            on_step(entry)
    return t0


def train_qat(student: nn.Module, teacher: nn.Module, structure: ModelStructure,
              train_data: "torch.Tensor | ExampleSource", cfg: TrainConfig, state_dir: str | os.PathLike,
              ctx: DistContext | None = None, on_step: Callable[[dict], None] | None = None,
              on_resume: Callable[[int], None] | None = None) -> TrainResult:
    """Fine-tune the prepared `student` in place against the frozen `teacher`, on the process's
    device (its GPU under CUDA, bf16 autocast), and leave it on the CPU. `train_data` is LM text
    cut into token blocks [N, seq_len], or a task's examples (`ExampleSource`: distilled through
    the model's own head, see the module docstring). Returns the findings (curves, timings,
    final losses) and, under FSDP, the gathered weights. `cfg` must be `resolved()`. The teacher
    comes back unchanged. `on_step(entry)` runs on rank 0 after each step (and its checkpoint,
    when one is due); with `cfg.resume`, `on_resume(step)` first, with the step it continues after
    (0: no checkpoint). Ctrl-C raises TrainingInterrupted, saying where a --resume would continue."""
    ctx = ctx or DistContext()
    batch = _per_process_batch(cfg, ctx)  # a bad split is refused before the models move
    io = ModelIO.discover(student, structure)
    task = "lm" if isinstance(train_data, torch.Tensor) else train_data.task
    attend = task != "lm" and cfg.attention_weight > 0  # attention probabilities need eager attention
    with _borrowed(teacher, ctx.device), (eager_attention(teacher, student) if attend else nullcontext()):
        run = _setup(student, teacher, io, cfg, ctx, batch, state_dir, task)
        start, curve = _resume(run)
        if cfg.resume and on_resume and ctx.is_main:
            on_resume(start)
        try:
            with fused_kernels(cfg.fuses):
                t0 = _train_steps(run, train_data, start, curve, on_step)
        except KeyboardInterrupt:
            raise _interrupted(run, len(curve), start) from None
        set_lambda(student, 1.0)
        for hooks in run.blocks:
            hooks.remove()
    full_state = None
    if ctx.enabled and cfg.parallel == "fsdp":
        full_state, _ = _full_state(run.wrapped, student, run.optimizer, ctx, cfg)
    else:
        student.to("cpu")  # convert and pack run on the CPU
    return TrainResult(_findings(run, curve, start, t0, len(train_data)), full_state)


def _interrupted(run: _Run, done: int, start: int) -> TrainingInterrupted:
    """Ctrl-C after `done` finished steps: the step a --resume continues from is the last checkpoint,
    which may be behind (a step cut short by Ctrl-C is not saved: its update may be half applied)."""
    every = run.cfg.checkpoint_every
    saved = max(done // every * every if every else 0, start)
    if saved:
        return TrainingInterrupted(f"interrupted at step {done}; rerun with --resume (it continues from step "
                                   f"{saved}, the last checkpoint in {run.state_dir})")
    return TrainingInterrupted(f"interrupted at step {done}, before the first checkpoint (--checkpoint-every "
                               f"{every}): a rerun starts from step 0")


def _findings(run: _Run, curve: list, start: int, t0: float, n_train: int) -> dict:
    cfg, ctx = run.cfg, run.ctx
    tokens = (cfg.last_step * cfg.batch_size * cfg.seq_len if run.task == "lm"
              else sum(e.get("tokens", 0) for e in curve))
    findings = {"task": run.task, "steps": cfg.last_step, "resumed_from": start, "tokens": tokens,
                "wall_s": round(time.perf_counter() - t0, 2), "final": curve[-1] if curve else None,
                "world_size": ctx.world, "parallel": cfg.parallel if ctx.enabled else "none",
                "device": str(ctx.device), "bf16_autocast": ctx.device.type == "cuda",
                "fused_kernels": cfg.fuses and fusion_failure() is None, "teacher_dtype": cfg.teacher_dtype,
                "curve": curve}
    if cfg.last_step < cfg.steps:  # --stop-after: the first steps of a longer schedule
        findings["schedule_steps"] = cfg.steps
    if run.task != "lm":
        findings.update(train_examples=n_train, examples_seen=cfg.last_step * cfg.batch_size)
    if ctx.is_main and curve:
        write_json(run.state_dir / "train_curve.json", curve)
    return findings
