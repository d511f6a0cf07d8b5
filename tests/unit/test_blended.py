"""Blends: --data parsing, Megatron's greedy blending order against a plain-Python reference, builders."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest

import mtk.data.blended as blended
import mtk.data.helpers as helpers
from mtk.data.blended import BlendedDataset, build_split_datasets, parse_blend
from mtk.data.gpt_dataset import GPTDataset


def reference_blend(weights: list[float], size: int) -> tuple[list[int], list[int]]:
    """Megatron's build_blending_indices: each sample goes to the dataset furthest below its share."""
    counts = [0] * len(weights)
    dataset_index, dataset_sample_index = [], []
    for i in range(size):
        errors = [weight * max(i, 1) - count for weight, count in zip(weights, counts, strict=True)]
        chosen = errors.index(max(errors))  # first dataset on ties
        dataset_index.append(chosen)
        dataset_sample_index.append(counts[chosen])
        counts[chosen] += 1
    return dataset_index, dataset_sample_index


def documents(seed: int, count: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, rng.integers(1, 30)).tolist() for _ in range(count)]


@pytest.mark.parametrize(
    "weights", [[0.3, 0.7], [0.2, 0.5, 0.3], [1 / 3, 1 / 3, 1 / 3], [0.01, 0.99], [0.25, 0.25, 0.4, 0.1]]
)
@pytest.mark.parametrize("size", [1, 7, 1000])
def test_blending_indices_match_reference(weights, size):
    dataset_index, dataset_sample_index = helpers.build_blending_indices(weights, size)
    expected_index, expected_sample_index = reference_blend(weights, size)
    assert dataset_index.dtype == np.int16 and dataset_sample_index.dtype == np.int64
    assert dataset_index.tolist() == expected_index
    assert dataset_sample_index.tolist() == expected_sample_index
    counts = np.bincount(dataset_index, minlength=len(weights))
    assert counts.tolist() == [expected_index.count(d) for d in range(len(weights))]
    for weight, count in zip(weights, counts, strict=True):
        assert abs(count - weight * size) <= 1


def test_parse_blend():
    with pytest.raises(ValueError, match="pairs"):
        parse_blend("0.3 a 0.7")
    with pytest.raises(ValueError, match="'x' .*not a number"):
        parse_blend("x a 0.7 b")
    with pytest.raises(ValueError, match="'-0.2' of a must be a positive"):
        parse_blend("-0.2 a 0.7 b")
    with pytest.raises(ValueError, match="pairs"):
        parse_blend("   ")


def test_parse_blend_files(write_corpus, tmp_path):
    first = write_corpus("first", documents(0, 5))
    second = write_corpus("second", documents(1, 5))
    assert parse_blend(first) == [(1.0, first)]
    assert parse_blend(f"0.3 {first}\n 0.7 {second}") == [(0.3, first), (0.7, second)]
    (tmp_path / "second.idx").unlink()
    with pytest.raises(FileNotFoundError, match=f"{second}.idx"):
        parse_blend(f"0.3 {first} 0.7 {second}")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        parse_blend(f"1 {tmp_path / 'missing'}")


def gpt(seq_length: int, seed: int):
    return functools.partial(GPTDataset, seq_length=seq_length, seed=seed)


def test_blended_datasets(write_corpus, tmp_path, monkeypatch):
    first = write_corpus("first", documents(0, 60))
    second = write_corpus("second", documents(1, 90))
    num_samples = (200, 20, 0)
    train, valid, test = build_split_datasets(f"1 {first} 3 {second}", "9,1", num_samples, gpt(8, seed=2))
    assert test is None
    for blend, n in ((train, 200), (valid, 20)):
        assert isinstance(blend, BlendedDataset) and len(blend) == n and blend.built_indices
        # Megatron's surplus: each dataset is asked for ceil(n * weight * 1.005) samples.
        assert [d.description["num_samples"] for d in blend.datasets] == [
            math.ceil(n * 0.25 * 1.005),
            math.ceil(n * 0.75 * 1.005),
        ]
        expected_index, expected_sample_index = reference_blend([0.25, 0.75], n)
        assert blend.dataset_index.tolist() == expected_index
        for i in range(n):
            got = blend[i]
            want = blend.datasets[expected_index[i]][expected_sample_index[i]]
            assert all(got[key].equal(want[key]) for key in want)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("blend indices rebuilt although cached")

    monkeypatch.setattr(blended, "build_blending_indices", no_rebuild)
    again, _, _ = build_split_datasets(f"1 {first} 3 {second}", "9,1", num_samples, gpt(8, seed=2))
    assert not again.built_indices
    np.testing.assert_array_equal(again.dataset_sample_index, train.dataset_sample_index)
    assert len(list((tmp_path / ".mtk-cache").glob("BlendedDataset-*-description.json"))) == 2


def test_single_prefix_is_a_plain_dataset(write_corpus):
    prefix = write_corpus("only", documents(0, 40))
    train, valid, test = build_split_datasets(prefix, "1", (30, 5, 5), gpt(8, seed=1))
    assert isinstance(train, GPTDataset) and train.description["num_samples"] == 30
    assert valid is None and test is None
