"""Neighbour-swap augmentation of a task model's training examples for distillation.

Task QAT distils the teacher's outputs on the training examples; a tied, ternary student soon
matches them there (CoNLL-2003 at 45x: logit KL 0.0025 over the last 1,000 of 5,000 steps) and the
gap that is left is on inputs it never saw. As in TinyBERT's task distillation (which draws
replacements from a masked LM; a task model has none), each token of a training batch is replaced,
with probability `p`, by one of its `k` nearest ids in the teacher's input embedding (cosine).
Distillation needs no gold label for the new input: the teacher scores it. The student also meets
ids the training examples never use, which is what a trimmed vocabulary maps to kept rows.
"""

from __future__ import annotations

import zlib
from typing import Iterable

import torch
import torch.nn.functional as F


def neighbor_table(weight: torch.Tensor, k: int, exclude: Iterable[int] = (), chunk: int = 2048) -> torch.Tensor:
    """[V, k] int64: each row's k nearest other rows of `weight` by cosine, nearest first. Ids in
    `exclude` (special tokens) are nobody's neighbour."""
    w = F.normalize(weight.detach().float(), dim=1)
    banned = torch.tensor(sorted(set(exclude)), dtype=torch.long)
    k = min(k, len(w) - 1 - len(banned))
    if k < 1:
        raise ValueError("neighbor_table: fewer than 2 rows to choose from")
    out = []
    for i0 in range(0, len(w), chunk):
        sim = w[i0:i0 + chunk] @ w.T
        rows = torch.arange(len(sim))
        sim[rows, rows + i0] = float("-inf")
        sim[:, banned] = float("-inf")
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


class NeighborSwap:
    """An ExampleSource (compressor.train) whose batches are `source`'s with tokens swapped for
    neighbours. Ids in `keep` (special tokens) and padding are never swapped; labels stay as
    they are (cls/qa/tok gold labels, used only with --label-weight). A batch depends only on
    `seed` and its example indices, so a resumed run sees the same inputs."""

    def __init__(self, source, neighbors: torch.Tensor, p: float, keep: Iterable[int], seed: int = 0):
        if not 0.0 < p < 1.0:
            raise ValueError(f"augment probability {p}: expected 0 < p < 1")
        self.inner, self.neighbors, self.p, self.seed = source, neighbors, p, seed
        self.keep = torch.zeros(len(neighbors), dtype=torch.bool)
        self.keep[[i for i in keep if 0 <= i < len(neighbors)]] = True

    @property
    def task(self) -> str:
        return self.inner.task

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name):  # features, source, examples...: the wrapped examples'
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        b = self.inner.batch(indices)
        ids = b["input_ids"]
        g = torch.Generator().manual_seed(zlib.crc32(repr((self.seed, list(indices))).encode()))
        inside = ids.clamp(max=len(self.neighbors) - 1)  # an id beyond the table is never swapped (below)
        swap = (torch.rand(ids.shape, generator=g) < self.p) & (ids == inside) & ~self.keep[inside]
        if "attention_mask" in b:
            swap &= b["attention_mask"].bool()
        pick = torch.randint(self.neighbors.shape[1], ids.shape, generator=g)
        return {**b, "input_ids": torch.where(swap, self.neighbors[inside, pick], ids)}


def augmented(source, teacher, tokenizer, p: float, k: int, seed: int = 0) -> NeighborSwap:
    """`source` with neighbour swaps drawn from the teacher's input embedding (special tokens
    of `tokenizer` kept and never drawn)."""
    special = list(getattr(tokenizer, "all_special_ids", None) or [])
    table = neighbor_table(teacher.get_input_embeddings().weight, k, exclude=special)
    return NeighborSwap(source, table, p, keep=special, seed=seed)
