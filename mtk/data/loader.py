"""Batches for training: Megatron's pretraining sampler and a ``torch.utils.data.DataLoader`` around it."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DataLoader


class PretrainingSampler:
    """This data-parallel rank's micro-batches of sample indices, in dataset order, from ``consumed_samples``.

    Samples are taken ``micro_batch_size * data_parallel_size`` at a time; rank ``r`` gets slice ``r`` of
    each such global step, so ranks never share a sample. Resuming with the ``consumed_samples`` of a
    stopped run yields exactly the batches that run would have seen next. With ``drop_last=False`` a
    final short step is split the same way (a rank may get a short or empty list).
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples < 1 or micro_batch_size < 1 or data_parallel_size < 1:
            raise ValueError("total_samples, micro_batch_size and data_parallel_size must be positive")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} is outside [0, total_samples={total_samples})"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank={data_parallel_rank} is outside [0, {data_parallel_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.step = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        remaining = self.total_samples - self.consumed_samples
        return remaining // self.step if self.drop_last else -(-remaining // self.step)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(self.consumed_samples, self.total_samples, self.step):
            stop = min(start + self.step, self.total_samples)
            if stop - start < self.step and self.drop_last:
                return
            first = start + self.data_parallel_rank * self.micro_batch_size
            yield list(range(first, min(first + self.micro_batch_size, stop)))


def build_loader(
    dataset: Sized,
    micro_batch_size: int,
    consumed_samples: int = 0,
    data_parallel_rank: int = 0,
    data_parallel_size: int = 1,
    num_workers: int = 2,
    pin_memory: bool | None = None,
    seed: int = 1234,
) -> DataLoader:
    """A DataLoader over ``dataset`` batched by ``PretrainingSampler`` (drop_last) from ``consumed_samples``.

    Workers persist across epochs and prefetch; ``pin_memory`` defaults to whether CUDA is available;
    ``seed`` fixes the workers' base seed, so any randomness inside the dataset repeats run to run.
    """
    sampler = PretrainingSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size
    )
    return DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )
