"""Megatron-style blends: ``--data "0.3 PREFIX_A 0.7 PREFIX_B"`` mixes datasets by weight.

``build_split_datasets`` builds the train, valid and test datasets of a blend for any dataset class,
as Megatron's ``BlendedMegatronDatasetBuilder`` does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mtk.config import parse_split
from mtk.data.helpers import build_blending_indices, cached_indices, default_cache_dir
from mtk.data.indexed import IndexedDataset

# Megatron asks each dataset for 0.5% more samples than its share, so the greedy blend never runs short.
SAMPLE_SURPLUS = 1.005


class SplitDataset(Protocol):
    """What the builder and a blend need of a dataset: its samples, and ``description``, its cache key."""

    description: dict[str, Any]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


def parse_blend(text: str) -> list[tuple[float, str]]:
    """``"0.3 A 0.7 B"`` -> ``[(0.3, "A"), (0.7, "B")]``; a lone ``"A"`` -> ``[(1.0, "A")]``.

    Weights are not normalised here. Raises ValueError on an odd count, a weight that is not a
    positive number, or weights whose sum overflows or next to which one vanishes when normalised;
    FileNotFoundError naming the first missing ``.bin``/``.idx``.
    """
    words = text.split()
    if len(words) == 1:
        blend = [(1.0, words[0])]
    elif not words or len(words) % 2:
        raise ValueError(
            f"data {text!r}: expected a prefix, or pairs of 'WEIGHT PREFIX' ({len(words)} words given)"
        )
    else:
        blend = []
        for weight_text, prefix in zip(words[::2], words[1::2], strict=True):
            try:
                weight = float(weight_text)
            except ValueError:
                raise ValueError(
                    f"data {text!r}: weight {weight_text!r} (before {prefix}) is not a number"
                ) from None
            if not math.isfinite(weight) or weight <= 0:
                raise ValueError(
                    f"data {text!r}: weight {weight_text!r} of {prefix} must be a positive number"
                )
            blend.append((weight, prefix))
        _check_weights(text, [weight for weight, _ in blend])
    for _, prefix in blend:
        for suffix in (".bin", ".idx"):
            if not Path(f"{prefix}{suffix}").is_file():
                raise FileNotFoundError(
                    f"data: {prefix}{suffix} not found (each prefix needs a .bin and an .idx)"
                )
    return blend


def _check_weights(text: str, weights: list[float]) -> None:
    """Weights that normalise to finite, positive shares (each was checked finite and positive)."""
    total = sum(weights)
    if not math.isfinite(total):
        raise ValueError(
            f"data {text!r}: the weights {' + '.join(map(repr, weights))} overflow when added; "
            "only their ratios matter, so scale them down (e.g. to fractions of 1)"
        )
    vanishing = [weight for weight in weights if weight / total == 0]
    if vanishing:
        raise ValueError(
            f"data {text!r}: weight {vanishing[0]!r} is too small next to the total {total!r} to give its "
            "dataset any share; scale the weights to comparable sizes or leave that dataset out"
        )


class BlendedDataset:
    """``num_samples`` samples drawn from ``datasets`` in proportion to ``weights`` (Megatron's greedy order).

    ``datasets`` must have a ``description`` (their cache key), which together with the weights and size
    keys this blend's cached indices in ``cache_dir``.
    """

    def __init__(
        self,
        datasets: Sequence[SplitDataset],
        weights: Sequence[float],
        num_samples: int,
        cache_dir: str | os.PathLike,
    ) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.weights = [weight / sum(weights) for weight in weights]
        self.description = {
            "class": type(self).__name__,
            "datasets": [dataset.description for dataset in datasets],
            "weights": self.weights,
            "num_samples": num_samples,
        }

        def build() -> dict[str, np.ndarray]:
            dataset_index, dataset_sample_index = build_blending_indices(self.weights, num_samples)
            return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

        arrays, self.built_indices = cached_indices(
            cache_dir, self.description, ("dataset_index", "dataset_sample_index"), build
        )
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]
        counts = np.bincount(self.dataset_index, minlength=len(datasets))
        for i, (dataset, count) in enumerate(zip(self.datasets, counts, strict=True)):
            if count > len(dataset):
                name = dataset.description.get("path_prefix", f"dataset {i} of the blend")
                raise ValueError(
                    f"the blend needs {count} samples of {name}, "
                    f"which has {len(dataset)}: give that dataset more samples"
                )

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, index: int) -> Any:
        dataset = self.datasets[self.dataset_index[index]]
        return dataset[int(self.dataset_sample_index[index])]


def build_split_datasets(
    data: str,
    split: str,
    num_samples: tuple[int, int, int],
    make_dataset: Callable[..., SplitDataset],
    cache_dir: str | os.PathLike | None = None,
) -> tuple[SplitDataset | None, SplitDataset | None, SplitDataset | None]:
    """Train, valid and test datasets for a ``--data`` string (see ``parse_blend``); None for a split
    with no weight or no samples. Every prefix is split by ``split`` on its own.

    ``make_dataset(indexed, split, split_index, count, cache_dir=cache_dir)`` builds ``count`` samples
    of split ``split_index`` (0 train, 1 valid, 2 test) of one prefix. A single prefix gives those
    datasets with ``num_samples``. A blend asks each prefix for ``ceil(n * weight * 1.005)`` samples of
    each split and blends them (``BlendedDataset``, cached in ``cache_dir`` or beside the first prefix).
    """
    if len(num_samples) != 3:
        raise ValueError(f"num_samples needs three counts (train, valid, test), got {num_samples}")
    blend = parse_blend(data)
    if len(blend) == 1:
        return _prefix_datasets(blend[0][1], split, num_samples, make_dataset, cache_dir)
    total = sum(weight for weight, _ in blend)
    weights = [weight / total for weight, _ in blend]
    per_prefix = [
        _prefix_datasets(
            prefix,
            split,
            tuple(math.ceil(n * weight * SAMPLE_SURPLUS) for n in num_samples),
            make_dataset,
            cache_dir,
        )
        for weight, (_, prefix) in zip(weights, blend, strict=True)
    ]
    blend_cache_dir = cache_dir if cache_dir is not None else default_cache_dir(blend[0][1])
    wanted = _wanted(split, num_samples)
    train, valid, test = (
        BlendedDataset(
            [datasets[i] for datasets in per_prefix], [weight for weight, _ in blend], n, blend_cache_dir
        )
        if wanted[i]
        else None
        for i, n in enumerate(num_samples)
    )
    return train, valid, test


def _prefix_datasets(
    prefix: str,
    split: str,
    num_samples: Sequence[int],
    make_dataset: Callable[..., SplitDataset],
    cache_dir: str | os.PathLike | None,
) -> tuple[SplitDataset | None, SplitDataset | None, SplitDataset | None]:
    indexed = IndexedDataset(prefix)
    wanted = _wanted(split, num_samples)
    train, valid, test = (
        make_dataset(indexed, split, i, n, cache_dir=cache_dir) if wanted[i] else None
        for i, n in enumerate(num_samples)
    )
    return train, valid, test


def _wanted(split: str, num_samples: Sequence[int]) -> list[bool]:
    return [weight > 0 and n > 0 for weight, n in zip(parse_split(split), num_samples, strict=True)]
