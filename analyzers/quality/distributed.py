"""Sharding evaluation work across torchrun ranks.

Work is split by whole batches (batch i goes to rank i % world), so every batch is the
same tensor it would be in one process; per-item results are gathered and put back in
order, and every metric is computed from the full, ordered list: the numbers are the
ones a single process produces."""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch.distributed as dist

# Whether evaluation shards its batches over the process group. A context variable, set only
# inside `local_only()` and reset on the way out (also on error), not a global flag flipped by hand.
_SHARDED: ContextVar[bool] = ContextVar("tritpress_eval_sharded", default=True)


def rank_world() -> tuple[int, int]:
    if _SHARDED.get() and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def my_batches(n_batches: int) -> list[int]:
    rank, world = rank_world()
    return list(range(rank, n_batches, world))


def gather_by_batch(results: dict[int, list]) -> list:
    """{batch index: [item results]} from each rank -> all items in batch order (on every rank)."""
    rank, world = rank_world()
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, results)
        merged = {}
        for part in parts:
            merged.update(part)
        results = merged
    return [item for i in sorted(results) for item in results[i]]


def is_main() -> bool:
    return rank_world()[0] == 0


@contextmanager
def local_only():
    """Within this block evaluation runs whole in this process, even inside a process group
    (the pipeline's evaluation stage runs on rank 0 alone, after training)."""
    token = _SHARDED.set(False)
    try:
        yield
    finally:
        _SHARDED.reset(token)
