"""The probe protocol: a light head trained on frozen features.

Used when the model has no head of its own for a task (e.g. a bare encoder such as
all-MiniLM-L6-v2). The features are standardized with the training set's mean and std
(part of the head), then one linear layer is trained with AdamW, a fixed seed, a fixed
number of epochs and a fixed batch size: the same budget for the baseline and the
compressed model, so the difference between the two reflects the features alone.
Reports label these numbers "probe".
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ProbeConfig:
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class LinearProbe(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor, outputs: int):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = nn.Linear(mean.numel(), outputs)

    def forward(self, x):
        return self.linear((x.float() - self.mean) / self.std)


def train_probe(x: torch.Tensor, loss_fn, outputs: int, cfg: ProbeConfig, mask: torch.Tensor | None = None
                ) -> LinearProbe:
    """x: [N, H] or [N, T, H] features; loss_fn(head_output [batch, ...], index [batch]) -> loss.
    `mask` ([N, T], optional) picks the positions whose features set the standardization."""
    torch.manual_seed(cfg.seed)
    flat = x.float().reshape(-1, x.shape[-1]) if mask is None else x.float()[mask.bool()]
    return train_probe_module(LinearProbe(flat.mean(0), flat.std(0).clamp(min=1e-6), outputs), x, loss_fn, cfg)


def train_probe_module(head: nn.Module, x: torch.Tensor, loss_fn, cfg: ProbeConfig) -> nn.Module:
    """AdamW over shuffled mini-batches of x for cfg.epochs; seeded, so reruns are identical."""
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            loss = loss_fn(head(x[idx]), idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval()


def classifier_probe(x: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: ProbeConfig) -> LinearProbe:
    return train_probe(x, lambda out, idx: F.cross_entropy(out, labels[idx]), num_classes, cfg)


def span_probe(x: torch.Tensor, allowed: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
               cfg: ProbeConfig) -> LinearProbe:
    """QA: start/end logits per position; positions outside `allowed` ([N, T] bool) are excluded."""
    def loss(out, idx):
        neg = torch.finfo(out.dtype).min
        s = out[..., 0].masked_fill(~allowed[idx], neg)
        e = out[..., 1].masked_fill(~allowed[idx], neg)
        return (F.cross_entropy(s, starts[idx]) + F.cross_entropy(e, ends[idx])) / 2
    return train_probe(x, loss, 2, cfg, mask=allowed)


def probe_config(cfg, task) -> ProbeConfig:
    """The probe budget of EvalConfig `cfg` for `task` (its own epoch count unless --probe-epochs)."""
    return ProbeConfig(epochs=cfg.probe_epochs or task.probe_epochs, lr=cfg.probe_lr,
                       batch_size=cfg.probe_batch_size, seed=cfg.seed)
