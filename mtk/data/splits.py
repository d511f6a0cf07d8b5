"""Megatron's ``--split "949,50,1"`` (parsed by ``mtk.config.parse_split``): the train, valid and test
sequences of every dataset."""

from __future__ import annotations

import itertools

import numpy as np

from mtk.config import parse_split

SPLIT_NAMES = ("train", "valid", "test")


def split_indices(split: str, num_sequences: int) -> list[np.ndarray]:
    """Sequence ids of train, valid and test: contiguous ranges cut at the rounded cumulative weights."""
    bookends = [0.0, *itertools.accumulate(parse_split(split))]
    return [
        np.arange(int(round(begin * num_sequences)), int(round(end * num_sequences)), dtype=np.int32)
        for begin, end in itertools.pairwise(bookends)
    ]
