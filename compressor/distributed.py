"""Process-group plumbing: the same code runs as one process or under torchrun.

gloo on CPU, NCCL on GPU. Only rank 0 logs and writes."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        # a 1-process torchrun job has a process group too: DDP/FSDP and NCCL run as they
        # would on many processes (the only way to exercise them on a single GPU)
        return self.world > 1 or (dist.is_available() and dist.is_initialized())

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed() -> DistContext:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if (world > 1 or under_torchrun) and not dist.is_initialized():
        # torchrun keeps one store across elastic restarts: a restarted group must not read the
        # dead workers' addresses, so each attempt gets its own key prefix
        store, _, _ = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                store=dist.PrefixStore(f"tritpress/attempt_{attempt}", store))
    return DistContext(rank, world, local_rank, device)


def restarted_by_torchrun() -> bool:
    """True in a worker that torchrun's elastic agent restarted after a failure."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
