"""The few collectives mtk needs beyond the model's own (flags, objects, barriers), written once.

A leaf: it imports nothing from mtk. Every function is the single-process answer when there is no
process group of more than one rank, so callers need no branch of their own. ``mtk.parallel.distributed``
sets the process group up; the training loop and ``mtk.checkpoint`` talk through these.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks; (0, 1) in a single process."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (e.g. one rank received SIGTERM)."""
    if not is_distributed():
        return flag
    device = (
        torch.cuda.current_device() if dist.get_backend() == "nccl" else "cpu"
    )  # NCCL reduces GPU tensors
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def gather_objects(obj: object) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    objects: list = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def barrier() -> None:
    if is_distributed():
        dist.barrier()
