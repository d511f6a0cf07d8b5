"""GPT sample indices against a plain-Python reference of Megatron's algorithm; splits, cache, mock data."""

from __future__ import annotations

import importlib.util
import json
from bisect import bisect_right
from functools import partial
from itertools import accumulate

import numpy as np
import pytest
import torch

import mtk.data.gpt_dataset as gpt_dataset
import mtk.data.helpers as helpers
from mtk.config import parse_split
from mtk.data.blended import build_split_datasets
from mtk.data.gpt_dataset import GPTDataset
from mtk.data.helpers import CacheError
from mtk.data.indexed import IndexedDataset
from mtk.data.mock import MockGPTDataset
from mtk.data.splits import split_indices


def random_documents(seed: int, count: int, max_length: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 60000, rng.integers(1, max_length + 1)).tolist() for _ in range(count)]


def reference_gpt_indices(documents, ids, num_samples, seq_length, seed):
    """Megatron's GPTDataset from its description, in plain Python: a token stream cut every seq_length."""
    lengths = [len(document) for document in documents]
    tokens_per_epoch = sum(lengths[i] for i in ids)
    num_epochs = 1
    while (num_epochs * tokens_per_epoch - 1) // seq_length < num_samples:
        num_epochs += 1
    separate = False
    if num_epochs > 1:
        before_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        per_epoch = (tokens_per_epoch - 1) // seq_length
        separate = num_samples - before_final < int(0.80 * per_epoch)

    rng = np.random.RandomState(seed)

    def shuffled(values) -> list[int]:
        array = np.array(list(values), dtype=np.int64)
        rng.shuffle(array)
        return array.tolist()

    if separate:
        document_index = shuffled(ids * (num_epochs - 1)) + shuffled(ids)
    else:
        document_index = shuffled(ids * num_epochs)
    # Sample i starts at stream position i * seq_length, the last token of sample i - 1.
    starts = list(accumulate((lengths[d] for d in document_index), initial=0))
    total = (starts[-1] - 1) // seq_length
    sample_index = []
    for i in range(total + 1):
        position = i * seq_length
        j = bisect_right(starts, position) - 1
        sample_index.append([j, position - starts[j]])
    if separate:
        shuffle_index = shuffled(range(before_final)) + shuffled(range(before_final, total))
    else:
        shuffle_index = shuffled(range(total))
    stream = [token for d in document_index for token in documents[d]]
    samples = [stream[s * seq_length : s * seq_length + seq_length + 1] for s in shuffle_index]
    return {
        "document_index": document_index,
        "sample_index": sample_index,
        "shuffle_index": shuffle_index,
        "samples": samples,
        "num_epochs": num_epochs,
        "separate": separate,
    }


def samples_for(scenario: str, tokens_per_epoch: int, seq_length: int) -> int:
    per_epoch = (tokens_per_epoch - 1) // seq_length
    if scenario == "one_epoch":
        return max(1, per_epoch // 2)
    if scenario == "separate_final_epoch":  # three epochs, the third contributing one sample
        return (2 * tokens_per_epoch - 1) // seq_length + 1
    return (3 * tokens_per_epoch - 1) // seq_length  # three epochs, the third (nearly) whole


@pytest.mark.parametrize("seq_length", [3, 8, 50])
@pytest.mark.parametrize("scenario", ["one_epoch", "separate_final_epoch", "joined_final_epoch"])
@pytest.mark.parametrize("split_index", [0, 1])
def test_indices_and_samples_match_reference(write_corpus, tmp_path, seq_length, scenario, split_index):
    documents = random_documents(seed=7, count=40, max_length=30)
    prefix = write_corpus("corpus", documents)
    ids = [list(range(0, 28)), list(range(28, 40))][split_index]
    tokens_per_epoch = sum(len(documents[i]) for i in ids)
    num_samples = samples_for(scenario, tokens_per_epoch, seq_length)
    expected = reference_gpt_indices(documents, ids, num_samples, seq_length, seed=1234)
    assert expected["num_epochs"] == (1 if scenario == "one_epoch" else 3)
    assert expected["separate"] == (scenario == "separate_final_epoch")

    dataset = GPTDataset(IndexedDataset(prefix), "7,3", split_index, num_samples, seq_length, seed=1234)

    np.testing.assert_array_equal(dataset.document_index, expected["document_index"])
    np.testing.assert_array_equal(dataset.sample_index, expected["sample_index"])
    np.testing.assert_array_equal(dataset.shuffle_index, expected["shuffle_index"])
    assert dataset.document_index.dtype == np.int32
    assert dataset.sample_index.dtype == np.int32
    assert dataset.shuffle_index.dtype == np.uint32
    assert len(dataset) == len(expected["samples"]) >= num_samples
    for i, tokens in enumerate(expected["samples"]):
        got = dataset.sample_tokens(i)
        assert got.dtype == np.int64 and len(got) == seq_length + 1
        assert got.tolist() == tokens


def test_getitem_shifts_labels_and_masks_eod(write_corpus):
    eod = 0
    documents = [[5, 6, 7, eod], [8, 9, eod], [10, 11, 12, 13, eod]] * 3
    prefix = write_corpus("eod", documents)
    masked = partial(GPTDataset, seq_length=5, seed=3, eod=eod, eod_mask_loss=True)
    dataset, _, _ = build_split_datasets(prefix, "1", (4, 0, 0), masked)
    for i in range(len(dataset)):
        text = dataset.sample_tokens(i)
        sample = dataset[i]
        assert sample["tokens"].dtype == sample["labels"].dtype == torch.int64
        assert sample["tokens"].tolist() == text[:-1].tolist()
        assert sample["labels"].tolist() == text[1:].tolist()
        assert sample["loss_mask"].dtype == torch.float32
        assert sample["loss_mask"].tolist() == [0.0 if t == eod else 1.0 for t in text[:-1]]
        assert sample["position_ids"].tolist() == list(range(5))
    unmasked, _, _ = build_split_datasets(
        prefix, "1", (4, 0, 0), partial(GPTDataset, seq_length=5, seed=3, eod=eod)
    )
    assert bool((unmasked[0]["loss_mask"] == 1.0).all())
    with pytest.raises(ValueError, match="eod"):
        build_split_datasets(
            prefix, "1", (4, 0, 0), partial(GPTDataset, seq_length=5, seed=3, eod_mask_loss=True)
        )


def test_same_seed_same_indices_other_seed_differs(write_corpus, tmp_path):
    prefix = write_corpus("corpus", random_documents(seed=1, count=50, max_length=20))
    indexed = IndexedDataset(prefix)
    first = GPTDataset(indexed, "1", 0, 100, 8, seed=5, cache_dir=tmp_path / "a")
    again = GPTDataset(indexed, "1", 0, 100, 8, seed=5, cache_dir=tmp_path / "b")
    other = GPTDataset(indexed, "1", 0, 100, 8, seed=6, cache_dir=tmp_path / "c")
    assert again.built_indices and other.built_indices
    for name in gpt_dataset.INDEX_NAMES:
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.document_index, other.document_index)
    assert not np.array_equal(first.shuffle_index, other.shuffle_index)


@pytest.mark.parametrize(
    ("split", "num_sequences", "sizes"),
    [
        ("949,50,1", 1000, [949, 50, 1]),
        ("949,50,1", 10, [9, 1, 0]),  # bookends 9.49 -> 9, 9.99 -> 10
        ("1,1,1", 10, [3, 4, 3]),  # bookends 3.33 -> 3, 6.67 -> 7
        ("98,2", 50, [49, 1, 0]),
        ("1", 7, [7, 0, 0]),
    ],
)
def test_split_sizes(split, num_sequences, sizes):
    parts = split_indices(split, num_sequences)
    assert [len(part) for part in parts] == sizes
    np.testing.assert_array_equal(np.concatenate(parts), np.arange(num_sequences))


@pytest.mark.parametrize("bad", ["", "a,b", "1,2,3,4", "-1,2", "0,0,0"])
def test_bad_split_strings_are_rejected(bad):
    with pytest.raises(ValueError, match="split"):
        parse_split(bad)


def test_builder_gives_none_for_empty_splits(write_corpus):
    prefix = write_corpus("corpus", random_documents(seed=2, count=100, max_length=20))
    gpt = partial(GPTDataset, seq_length=4, seed=1)
    train, valid, test = build_split_datasets(prefix, "90,10", (10, 3, 5), gpt)
    assert train is not None and valid is not None and test is None  # no weight
    train, valid, test = build_split_datasets(prefix, "8,1,1", (10, 0, 2), gpt)
    assert valid is None and test is not None  # no samples requested
    with pytest.raises(ValueError, match="test split none of the 100"):
        build_split_datasets(prefix, "949,50,1", (10, 1, 1), gpt)


def test_indices_are_cached_and_reused(write_corpus, tmp_path, monkeypatch):
    prefix = write_corpus("corpus", random_documents(seed=3, count=30, max_length=20))
    first = GPTDataset(IndexedDataset(prefix), "9,1", 0, 50, 8, seed=1)
    assert first.built_indices and first.cache_dir == tmp_path / ".mtk-cache"
    descriptions = list(first.cache_dir.glob("*-description.json"))
    assert len(descriptions) == 1
    described = json.loads(descriptions[0].read_text())
    assert described["seed"] == 1 and described["split"] == "9,1" and described["num_samples"] == 50
    assert not [path for path in first.cache_dir.iterdir() if path.name.startswith(".")]  # no temp files

    def no_rebuild(*args, **kwargs):
        raise AssertionError("indices rebuilt although cached")

    monkeypatch.setattr(gpt_dataset, "build_indices", no_rebuild)
    second = GPTDataset(IndexedDataset(prefix), "9,1", 0, 50, 8, seed=1)
    assert not second.built_indices
    for name in gpt_dataset.INDEX_NAMES:
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    for i in range(len(first)):
        assert first.sample_tokens(i).tolist() == second.sample_tokens(i).tolist()
    monkeypatch.undo()

    # A different sample count, or the same file name with different content, is a different entry.
    assert GPTDataset(IndexedDataset(prefix), "9,1", 0, 51, 8, seed=1).built_indices
    write_corpus("corpus", random_documents(seed=4, count=30, max_length=20))
    assert GPTDataset(IndexedDataset(prefix), "9,1", 0, 50, 8, seed=1).built_indices
    assert len(list(first.cache_dir.glob("*-description.json"))) == 3


def test_crash_while_caching_leaves_no_entry(write_corpus, tmp_path, monkeypatch):
    prefix = write_corpus("corpus", random_documents(seed=3, count=30, max_length=20))
    real_save = np.save

    def crash_midway(file, array, **kwargs):
        file.write(b"\x93NUMPY half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", crash_midway)
    with pytest.raises(CacheError, match=r"cache .*\(disk full\); give --data-cache-path"):
        GPTDataset(IndexedDataset(prefix), "1", 0, 20, 8, seed=1, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(np, "save", real_save)
    assert GPTDataset(
        IndexedDataset(prefix), "1", 0, 20, 8, seed=1, cache_dir=tmp_path / "cache"
    ).built_indices


def test_helpers_work_when_numba_cannot_cache(monkeypatch):
    from numba.core import caching

    monkeypatch.setattr(caching.CacheImpl, "_locator_classes", [])  # as if no folder were writable
    spec = importlib.util.spec_from_file_location("helpers_without_cache", helpers.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lengths = np.array([3, 4], dtype=np.int32)
    rows = module.build_sample_index(lengths, np.array([0, 1], dtype=np.int32), 2)
    assert rows.tolist() == [[0, 0], [0, 2], [1, 1], [1, 3]]


def test_mock_samples_depend_only_on_seed_and_index():
    dataset = MockGPTDataset(num_samples=20, seq_length=16, vocab_size=50, seed=3)
    forward = [dataset.sample_tokens(i).tolist() for i in range(20)]
    backward = [MockGPTDataset(20, 16, 50, seed=3).sample_tokens(i).tolist() for i in reversed(range(20))]
    assert forward == backward[::-1]
    assert all(len(tokens) == 17 and 0 <= min(tokens) and max(tokens) < 50 for tokens in forward)
    assert forward != [MockGPTDataset(20, 16, 50, seed=4).sample_tokens(i).tolist() for i in range(20)]
    sample = dataset[5]
    assert sample["tokens"].tolist() == forward[5][:-1] and sample["labels"].tolist() == forward[5][1:]
    assert sample["loss_mask"].dtype == torch.float32 and bool((sample["loss_mask"] == 1).all())

    counting = MockGPTDataset(4, 8, 10, seed=0, mode="arange")
    for i in range(4):
        tokens = counting[i]["tokens"]
        assert counting[i]["labels"].tolist() == ((tokens + 1) % 10).tolist()
    with pytest.raises(IndexError):
        dataset.sample_tokens(20)
