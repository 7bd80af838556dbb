"""Ternary quantization-aware fine-tuning with distillation from the original model.

    student = prepare(copy.deepcopy(model), TernaryConfig())   # fake-quant, trainable
    result = train_qat(student, teacher=model, blocks=..., cfg=TrainConfig(steps=200))
    model = convert(student)          # result.findings: curves, timings, final losses

Loss = task_weight * next-token CE (causal LMs)
     + kd_weight * KL(teacher || student) on logits at temperature T (models with an output head),
       or normalized MSE on the main output (encoders without a head)
     + hidden_weight * mean over blocks of the normalized MSE of block outputs (TernaryBERT-style).
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
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .distributed import DistContext
from .errors import TritpressError
from .fileio import atomic_path, write_json
from .modelio import BlockOutputs, ModelIO, nmse
from .structure import ModelStructure
from .transform import set_lambda, tie_groups

SCHEDULES = ("cosine", "linear", "constant")
QUANT_SCHEDULES = ("linear", "sigmoid", "none")
PARALLEL = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    steps: int = 0                 # QAT optimizer steps with distillation from the original; 0 = post-training only
    data: str | None = None        # training text: .txt/.jsonl/.json/.csv/.tsv/.parquet file, pkg:ptb,
                                   # or a HF dataset NAME[:CONFIG] (online)
    text_column: str = "text"      # text column of tabular data
    eval_data: str | None = None   # held-out text for before/after loss [default: the last 5% of --data]
    seq_len: int = 128             # tokens per training sequence
    batch_size: int = 8            # sequences per optimizer step, all processes together
    micro_batch_size: int = 0      # sequences per forward per process (gradient accumulation); 0 = no accumulation
    lr: float = 0.0                # peak learning rate [default: 2e-4 below 100M params, 1e-4 above]
    weight_decay: float = 0.0      # AdamW weight decay
    warmup_steps: int = -1         # learning-rate warm-up steps [default: 10% of steps]
    schedule: str = "cosine"       # LR decay after warm-up: cosine | linear | constant
    quant_warmup: int = -1         # steps for lambda to reach 1 [default: half of steps]
    quant_schedule: str = "linear"  # lambda schedule: linear = min(step/warmup, 1) | sigmoid | none (lambda = 1)
    grad_clip: float = 1.0         # gradient-norm clip
    task_weight: float = 1.0       # next-token CE weight
    kd_weight: float = 1.0         # logit KL / output MSE weight
    kd_temperature: float = 1.0    # KD temperature
    hidden_weight: float = 1.0     # per-block hidden-state MSE weight
    max_train_tokens: int = 0      # use at most this many training tokens; 0 = all of --data
    eval_tokens: int = 32768       # held-out tokens scored before and after
    seed: int = 0                  # seed for data order and init
    checkpoint_every: int = 50     # save training state every N steps; 0 = never
    resume: bool = False           # continue from the last training checkpoint in --out
    parallel: str = "ddp"          # with several processes: ddp | fsdp

    def __post_init__(self):
        for name, allowed in (("schedule", SCHEDULES), ("quant_schedule", QUANT_SCHEDULES),
                              ("parallel", PARALLEL)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.steps < 0 or self.seq_len < 2 or self.batch_size < 1:
            raise ValueError("steps >= 0, seq_len >= 2 and batch_size >= 1 are required")

    def resolved(self, n_params: int) -> "TrainConfig":
        """Concrete values for the derived defaults."""
        r = dataclasses.replace(self)
        if r.lr <= 0:
            r.lr = 2e-4 if n_params < 100_000_000 else 1e-4
        if r.warmup_steps < 0:
            r.warmup_steps = max(1, r.steps // 10)
        if r.quant_warmup < 0:
            r.quant_warmup = max(1, r.steps // 2)
        return r


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


def distill_losses(io: ModelIO, student, teacher, ids, s_blocks: BlockOutputs, t_blocks: BlockOutputs,
                   cfg: TrainConfig) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        t_out = io.forward(teacher, ids)
        t_hidden = t_blocks.take()
    s_out = io.forward(student, ids)
    s_hidden = s_blocks.take()
    losses = {}
    if io.has_head:
        T = cfg.kd_temperature
        losses["kd"] = F.kl_div(F.log_softmax(s_out / T, -1).flatten(0, -2), F.log_softmax(t_out / T, -1)
                                .flatten(0, -2), log_target=True, reduction="batchmean") * T * T
        if io.causal:
            losses["task"] = F.cross_entropy(s_out[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    else:
        losses["kd"] = nmse(s_out, t_out)
    if s_hidden:
        losses["hidden"] = torch.stack([nmse(s, t) for s, t in zip(s_hidden, t_hidden)]).mean()
    weights = {"task": cfg.task_weight, "kd": cfg.kd_weight, "hidden": cfg.hidden_weight}
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
           state_dir) -> _Run:
    student.to(ctx.device)
    student.eval()  # dropout off: see module docstring
    blocks = BlockOutputs(student, io.block_paths), BlockOutputs(teacher, io.block_paths)
    wrapped = _wrap(student, ctx, cfg, io)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" else nullcontext())
    return _Run(cfg, ctx, io, student, teacher, wrapped, params, optimizer, scheduler, blocks, *batch,
                Path(state_dir), autocast)


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


def _accumulate(run: _Run, mine: torch.Tensor) -> dict[str, float]:
    """Forward and backward over this process's sequences in micro batches (gradients sync on
    the last one). -> this process's losses, averaged over its sequences."""
    sums: dict[str, float] = {}
    s_blocks, t_blocks = run.blocks
    for m0 in range(0, run.local, run.micro):
        ids = mine[m0: m0 + run.micro]
        last = m0 + run.micro >= run.local
        sync = nullcontext() if (last or not hasattr(run.wrapped, "no_sync")) else run.wrapped.no_sync()
        with sync, run.autocast:
            losses = distill_losses(run.io, run.wrapped, run.teacher, ids, s_blocks, t_blocks, run.cfg)
            (losses["loss"] * (len(ids) / run.local)).backward()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.detach().item() * len(ids) / run.local
    return sums


def _step(run: _Run, step: int, train_blocks: torch.Tensor) -> dict:
    """One optimizer step on the global batch of `step`. -> its curve entry (without timing)."""
    cfg, ctx = run.cfg, run.ctx
    lam = quant_lambda(step, cfg)
    set_lambda(run.student, lam)
    idx = batch_indices(step, len(train_blocks), cfg.batch_size, cfg.seed)
    mine = train_blocks[idx[ctx.rank * run.local:(ctx.rank + 1) * run.local]].to(ctx.device)
    sums = _accumulate(run, mine)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)) if cfg.grad_clip > 0 else 0.0
    lr_used = run.optimizer.param_groups[0]["lr"]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    metrics = ctx.all_reduce_mean(sums)
    return {"step": step + 1, **{k: round(v, 6) for k, v in metrics.items()}, "lambda": round(lam, 4),
            "lr": lr_used, "grad_norm": round(grad_norm, 4)}


def _log(run: _Run, entry: dict) -> None:
    if run.ctx.is_main:
        run.state_dir.mkdir(parents=True, exist_ok=True)
        with open(run.state_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")


def _checkpoint(run: _Run, done: int, curve: list) -> None:
    """Every `checkpoint_every` steps and at the last: the full training state, atomically."""
    cfg = run.cfg
    if not cfg.checkpoint_every or not (done % cfg.checkpoint_every == 0 or done == cfg.steps):
        return
    model_state, optim_state = _full_state(run.wrapped, run.student, run.optimizer, run.ctx, cfg)
    if run.ctx.is_main:
        with atomic_path(run.state_dir / "train_state.pt") as tmp:
            torch.save({"step": done, "model": model_state, "optimizer": optim_state,
                        "scheduler": run.scheduler.state_dict(), "rng": _rng_state(), "curve": curve,
                        "config": dataclasses.asdict(cfg)}, tmp)
    run.ctx.barrier()


def _train_steps(run: _Run, train_blocks: torch.Tensor, start: int, curve: list,
                 on_step: Callable[[dict], None] | None) -> float:
    """Steps `start`..cfg.steps, each logged and checkpointed when due. -> start time."""
    t0 = time.perf_counter()
    for step in range(start, run.cfg.steps):
        entry = _step(run, step, train_blocks)
        elapsed = time.perf_counter() - t0
        tokens_done = (step + 1 - start) * run.cfg.batch_size * run.cfg.seq_len
        entry.update(tokens_per_s=round(tokens_done / elapsed, 1), elapsed_s=round(elapsed, 2))
        curve.append(entry)
        _log(run, entry)
        _checkpoint(run, step + 1, curve)
        if on_step and run.ctx.is_main:  # after the checkpoint: a callback sees a finished step
            on_step(entry)
    return t0


def train_qat(student: nn.Module, teacher: nn.Module, structure: ModelStructure, train_blocks: torch.Tensor,
              cfg: TrainConfig, state_dir: str | os.PathLike, ctx: DistContext | None = None,
              on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Fine-tune the prepared `student` in place against the frozen `teacher`, on the process's
    device (its GPU under CUDA, bf16 autocast), and leave it on the CPU. Returns the findings
    (curves, timings, final losses) and, under FSDP, the gathered weights. `cfg` must be
    `resolved()`. The teacher comes back unchanged. `on_step(entry)` runs on rank 0 after each
    step (and its checkpoint, when one is due)."""
    ctx = ctx or DistContext()
    batch = _per_process_batch(cfg, ctx)  # a bad split is refused before the models move
    io = ModelIO.discover(student, structure)
    with _borrowed(teacher, ctx.device):
        run = _setup(student, teacher, io, cfg, ctx, batch, state_dir)
        start, curve = _resume(run)
        t0 = _train_steps(run, train_blocks, start, curve, on_step)
        set_lambda(student, 1.0)
        for hooks in run.blocks:
            hooks.remove()
    full_state = None
    if ctx.enabled and cfg.parallel == "fsdp":
        full_state, _ = _full_state(run.wrapped, student, run.optimizer, ctx, cfg)
    else:
        student.to("cpu")  # convert and pack run on the CPU
    findings = {"steps": cfg.steps, "resumed_from": start, "tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
                "wall_s": round(time.perf_counter() - t0, 2), "final": curve[-1] if curve else None,
                "world_size": ctx.world, "parallel": cfg.parallel if ctx.enabled else "none",
                "device": str(ctx.device), "bf16_autocast": ctx.device.type == "cuda",
                "curve": curve}
    if ctx.is_main and curve:
        write_json(run.state_dir / "train_curve.json", curve)
    return TrainResult(findings, full_state)
