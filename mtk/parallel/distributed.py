"""Process-group set-up from torchrun's environment; the collectives themselves are ``mtk.collectives``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedEnv:
    world_size: int
    rank: int
    local_rank: int
    device: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None, timeout_minutes: float = 10.0) -> DistributedEnv:
    """Join the job torchrun started (WORLD_SIZE, RANK, LOCAL_RANK); a plain single process otherwise.

    NCCL on CUDA, gloo on CPU. ``device`` None picks ``cuda:LOCAL_RANK`` when CUDA is available.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return DistributedEnv(world_size, rank, local_rank, device)


def shutdown_distributed() -> None:
    """End the job's process group together: every rank waits for the others, then tears it down
    (a rank that exits while another still talks to it can abort the job)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


__all__ = ["DistributedEnv", "init_distributed", "shutdown_distributed"]
