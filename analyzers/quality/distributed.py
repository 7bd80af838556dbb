"""Sharding evaluation work across torchrun ranks.

Work is split by whole batches (batch i goes to rank i % world), so every batch is the
same tensor it would be in one process; per-item results are gathered and put back in
order, and every metric is computed from the full, ordered list: the numbers are the
ones a single process produces."""
from __future__ import annotations

import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    if not _LOCAL_ONLY and dist.is_available() and dist.is_initialized():
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


_LOCAL_ONLY = False


class local_only:
    """Within this block evaluation runs whole in this process, even inside a process group
    (the pipeline's evaluation stage runs on rank 0 alone, after training)."""

    def __enter__(self):
        global _LOCAL_ONLY
        self.before, _LOCAL_ONLY = _LOCAL_ONLY, True

    def __exit__(self, *exc):
        global _LOCAL_ONLY
        _LOCAL_ONLY = self.before
