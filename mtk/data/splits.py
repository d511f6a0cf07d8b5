"""Megatron's ``--split "949,50,1"``: the train, valid and test shares of every dataset's sequences."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np

SPLIT_NAMES = ("train", "valid", "test")


def parse_split(split: str) -> list[float]:
    """``"949,50,1"`` -> normalised train/valid/test weights; missing trailing weights are 0."""
    try:
        weights = [float(part) for part in re.split(r"[,/]", split)]
    except ValueError:
        weights = []
    if not 0 < len(weights) <= 3 or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) == 0:
        raise ValueError(
            f"split {split!r}: expected one to three non-negative numbers, not all zero, such as '949,50,1'"
        )
    weights += [0.0] * (3 - len(weights))
    return [weight / sum(weights) for weight in weights]


def split_indices(split: str, num_sequences: int) -> list[np.ndarray]:
    """Sequence ids of train, valid and test: contiguous ranges cut at the rounded cumulative weights."""
    bookends = [0.0, *itertools.accumulate(parse_split(split))]
    return [
        np.arange(int(round(begin * num_sequences)), int(round(end * num_sequences)), dtype=np.int32)
        for begin, end in itertools.pairwise(bookends)
    ]
