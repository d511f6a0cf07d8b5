"""Pretraining sampler: resumption and data-parallel sharding; the DataLoader built around it."""

from __future__ import annotations

import pytest
import torch

from mtk.data.loader import PretrainingSampler, build_loader
from mtk.data.mock import MockGPTDataset


def reference_batches(total, consumed, micro_batch_size, rank, world, drop_last=True) -> list[list[int]]:
    """Megatron's MegatronPretrainingSampler: walk from consumed, cut global batches, keep this rank's slice."""
    batches, pending = [], []
    for index in range(consumed, total):
        pending.append(index)
        if len(pending) == micro_batch_size * world:
            batches.append(pending[rank * micro_batch_size : (rank + 1) * micro_batch_size])
            pending = []
    if pending and not drop_last:
        batches.append(pending[rank * micro_batch_size : (rank + 1) * micro_batch_size])
    return batches


@pytest.mark.parametrize(("micro_batch_size", "world"), [(1, 1), (3, 1), (2, 4), (4, 3)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_matches_reference(micro_batch_size, world, drop_last):
    total = 50
    for rank in range(world):
        for consumed in (0, 7, micro_batch_size * world * 2):
            sampler = PretrainingSampler(total, consumed, micro_batch_size, rank, world, drop_last)
            batches = list(sampler)
            assert batches == reference_batches(total, consumed, micro_batch_size, rank, world, drop_last)
            assert len(sampler) == len(batches)


def test_resuming_continues_the_uninterrupted_run():
    micro_batch_size, world, total = 2, 3, 100
    for rank in range(world):
        uninterrupted = list(PretrainingSampler(total, 0, micro_batch_size, rank, world))
        for steps_done in range(len(uninterrupted)):
            consumed = steps_done * micro_batch_size * world
            resumed = list(PretrainingSampler(total, consumed, micro_batch_size, rank, world))
            assert resumed == uninterrupted[steps_done:]


def test_ranks_split_each_global_batch():
    micro_batch_size, world, total = 4, 3, 60
    per_rank = [list(PretrainingSampler(total, 0, micro_batch_size, rank, world)) for rank in range(world)]
    for step, batches in enumerate(zip(*per_rank, strict=True)):
        assert all(len(batch) == micro_batch_size for batch in batches)
        together = [index for batch in batches for index in batch]
        start = step * micro_batch_size * world
        assert sorted(together) == together == list(range(start, start + micro_batch_size * world))


@pytest.mark.parametrize(
    "arguments", [(0, 0, 1, 0, 1), (10, 10, 1, 0, 1), (10, 0, 0, 0, 1), (10, 0, 1, 2, 2), (10, -1, 1, 0, 1)]
)
def test_sampler_rejects_bad_arguments(arguments):
    with pytest.raises(ValueError):
        PretrainingSampler(*arguments)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_yields_this_ranks_batches(num_workers):
    dataset = MockGPTDataset(num_samples=40, seq_length=6, vocab_size=100, seed=0)
    loader = build_loader(
        dataset,
        micro_batch_size=4,
        consumed_samples=8,
        data_parallel_rank=1,
        data_parallel_size=2,
        num_workers=num_workers,
    )
    batches = list(loader)
    expected = reference_batches(40, 8, 4, 1, 2)
    assert len(batches) == len(expected) == 4
    for batch, indices in zip(batches, expected, strict=True):
        assert batch["tokens"].shape == (4, 6) and batch["tokens"].dtype == torch.int64
        assert batch["loss_mask"].shape == (4, 6) and batch["position_ids"].shape == (4, 6)
        assert batch["tokens"].equal(torch.stack([dataset[i]["tokens"] for i in indices]))
        assert batch["labels"].equal(torch.stack([dataset[i]["labels"] for i in indices]))
    assert loader.persistent_workers == (num_workers > 0)
    assert [b["tokens"].tolist() for b in loader] == [b["tokens"].tolist() for b in batches]  # second epoch
