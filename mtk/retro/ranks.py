"""The ranks of a RETRO stage started by torchrun (``WORLD_SIZE``, ``RANK``, ``LOCAL_WORLD_SIZE``).

The stages share out blocks, not tensors: rank 0 lists the blocks still missing on disk and every
rank takes every ``world``-th of them, so a run of any rank count finishes what an earlier one left.
The ranks only pass small objects and wait at barriers, so they talk over gloo whatever device embeds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

T = TypeVar("T")
# rank 0 alone trains the index and merges the shards while the others wait at a barrier: hours at scale
TIMEOUT = timedelta(days=1)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list[T]) -> list[T]:
        """This rank's part of a list every rank holds alike: item i goes to rank i % world."""
        return items[self.rank :: self.world]

    def part(self, items: list[T]) -> list[T]:
        """This rank's contiguous slice of ``items`` (rank order is list order)."""
        n = len(items)
        return items[n * self.rank // self.world : n * (self.rank + 1) // self.world]

    def from_main(self, value: T) -> T:
        """Rank 0's ``value``, on every rank."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def available_cores() -> int:
    """The cores this process may run on, shared among the ranks on this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def join() -> Ranks:
    """This process's rank in torchrun's job (a single rank without torchrun), its torch threads set
    to its share of the node's cores."""
    import torch

    torch.set_num_threads(available_cores())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=TIMEOUT)
        return Ranks(dist.get_rank(), world)
    return Ranks()


def leave(ranks: Ranks) -> None:
    """End the job's process group, every rank together."""
    if ranks.world > 1:
        import torch.distributed as dist

        ranks.barrier()
        dist.destroy_process_group()
