"""Damaged or crafted data files are refused or repaired before training reads them: an .idx whose
entries contradict each other, a sample-index cache changed on disk, blend weights that overflow,
a data manifest whose keys have the wrong type."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

import mtk.data.indexed as indexed
from mtk.data.blended import BlendedDataset, parse_blend
from mtk.data.gpt_dataset import GPTDataset
from mtk.data.helpers import CacheWarning
from mtk.data.indexed import IndexedDataset, IndexedDatasetError
from mtk.data.prepare import prepare_data
from mtk.data.prepared import data_facts, merge_prepared
from mtk.data.tokenizer import load_tokenizer
from mtk.manifest import ManifestError, data_manifest_path
from tests.conftest import run

TRAIN = ["train", "--preset", "gpt-tiny", "--num-workers", "0", "--eval-interval", "0", "--seq-length", "8",
         "--train-iters", "1", "--device", "cpu", "--split", "1", "--vocab-size", "64"]  # fmt: skip


def train_error(tmp_path: Path, data: str) -> str:
    """The one-line error of `mtk train --data DATA` (exit code 2, no traceback)."""
    output = run(*TRAIN, "--data", data, "--save", tmp_path / "run", code=2)
    assert output.startswith("error: ")
    return output


# ---------------------------------------------------------------- .idx entries, checked on open


def write_raw_pair(prefix: Path, lengths, pointers, documents, bin_bytes: int) -> str:
    """An MMIDIDX v1 .idx with exactly these entries (uint16 tokens), written from the format
    specification, and a .bin of ``bin_bytes`` bytes."""
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(lengths), len(documents))
    body = (
        np.asarray(lengths, "<i4").tobytes()
        + np.asarray(pointers, "<i8").tobytes()
        + np.asarray(documents, "<i8").tobytes()
    )
    Path(f"{prefix}.idx").write_bytes(header + body)
    Path(f"{prefix}.bin").write_bytes(np.arange(bin_bytes // 2, dtype="<u2").tobytes())
    return str(prefix)


# Three documents [0 1 2] [3 4] [5] of uint16 tokens: lengths 3 2 1, byte pointers 0 6 10, 12 bytes.
SOUND = dict(lengths=[3, 2, 1], pointers=[0, 6, 10], documents=[0, 1, 2, 3])
CRAFTED = {  # each keeps the file sizes of SOUND, so only the entries give it away
    "negative length": (
        dict(lengths=[3, -2, 5], pointers=[0, 6, 2]),
        "sequence 1 has length -2; lengths cannot be negative",
    ),
    "pointer past the .bin": (
        dict(pointers=[0, 6, 1000]),
        "sequence 2 starts at byte 1000, expected 10",
    ),
    "overlapping pointer": (dict(pointers=[0, 2, 10]), "sequence 1 starts at byte 2, expected 6"),
    "first pointer not 0": (dict(pointers=[4, 10, 14]), "sequence 0 starts at byte 4, expected 0"),
    "document index going down": (
        dict(documents=[0, 2, 1, 3]),
        r"document index 2 is 1, below the one before it \(2\)",
    ),
    "document index out of range": (
        dict(documents=[0, 9, 2, 3]),
        r"document index 2 is 2, below the one before it \(9\)",
    ),
    "documents not starting at 0": (
        dict(documents=[1, 1, 2, 3]),
        "document index 0 is 1, expected 0",
    ),
    "documents not ending at the sequence count": (
        dict(documents=[0, 1, 2, 2]),
        r"the last document index \(3\) is 2, expected the sequence count 3",
    ),
}


def test_a_sound_index_opens_and_reads_its_sequences(tmp_path):
    prefix = write_raw_pair(tmp_path / "sound", **SOUND, bin_bytes=12)
    dataset = IndexedDataset(prefix)
    assert [dataset[i].tolist() for i in range(3)] == [[0, 1, 2], [3, 4], [5]]


@pytest.mark.parametrize("case", CRAFTED)
def test_a_crafted_index_is_refused_on_open_naming_file_and_first_bad_entry(tmp_path, case):
    change, message = CRAFTED[case]
    prefix = write_raw_pair(tmp_path / "crafted", **{**SOUND, **change}, bin_bytes=12)
    with pytest.raises(IndexedDatasetError, match=message) as err:
        IndexedDataset(prefix)
    assert str(err.value).startswith(f"{prefix}.idx: ") and "prepare the data again" in str(err.value)


def test_entries_are_checked_block_by_block_and_named_by_their_global_position(tmp_path, monkeypatch):
    monkeypatch.setattr(indexed, "CHECK_BLOCK", 2)  # 7 sequences: blocks of 2, 2, 2, 1
    lengths = [1, 2, 3, 4, 5, 6, 7]
    pointers = (2 * np.concatenate([[0], np.cumsum(lengths)[:-1]])).tolist()
    documents = [0, 1, 3, 3, 5, 7]
    sound = write_raw_pair(tmp_path / "blocks", lengths, pointers, documents, bin_bytes=56)
    assert [len(IndexedDataset(sound)[i]) for i in range(7)] == lengths
    write_raw_pair(tmp_path / "blocks", lengths, [*pointers[:5], 999, pointers[6]], documents, 56)
    with pytest.raises(IndexedDatasetError, match=f"sequence 5 starts at byte 999, expected {pointers[5]}"):
        IndexedDataset(sound)
    write_raw_pair(tmp_path / "blocks", lengths, pointers, [0, 1, 3, 3, 2, 7], 56)
    with pytest.raises(IndexedDatasetError, match="document index 4 is 2, below the one before it"):
        IndexedDataset(sound)


def test_training_on_a_crafted_index_stops_before_training_with_a_one_line_error(tmp_path):
    change, message = CRAFTED["negative length"]
    prefix = write_raw_pair(tmp_path / "crafted", **{**SOUND, **change}, bin_bytes=12)
    assert f"{prefix}.idx: sequence 1 has length -2" in train_error(tmp_path, prefix)


# ---------------------------------------------------------------- the sample-index cache


def corpus(tmp_path: Path, name: str, count: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, count)
    tokens = rng.integers(0, 60000, int(lengths.sum())).astype(np.uint16)
    writer = indexed.IndexWriter(np.uint16)
    writer.add_documents(lengths, [1] * count)
    (tmp_path / f"{name}.bin").write_bytes(tokens.tobytes())
    (tmp_path / f"{name}.idx").write_bytes(writer.to_bytes())
    return str(tmp_path / name)


def samples(dataset) -> list[list[int]]:
    return [dataset[i]["tokens"].tolist() + dataset[i]["labels"][-1:].tolist() for i in range(len(dataset))]


def entry_file(cache: Path, name: str) -> Path:
    (path,) = cache.glob(f"*-{name}.npy")
    return path


def scramble(path: Path) -> None:
    """Other values of the same dtype and shape: the file keeps its size and stays a valid .npy."""
    array = np.load(path)
    np.save(path, np.ascontiguousarray(array[::-1]), allow_pickle=False)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-8])


@pytest.mark.parametrize("name", ["document_index", "sample_index", "shuffle_index"])
@pytest.mark.parametrize("damage", [scramble, truncate])
def test_a_damaged_gpt_cache_file_is_built_again_with_a_warning(tmp_path, name, damage):
    prefix = corpus(tmp_path, "corpus", 50, seed=1)
    fresh = GPTDataset(IndexedDataset(prefix), "1", 0, 40, 8, seed=3)
    expected = samples(fresh)
    path = entry_file(tmp_path / ".mtk-cache", name)
    before = path.stat().st_size
    damage(path)
    assert (path.stat().st_size == before) is (damage is scramble)
    with pytest.warns(CacheWarning, match=rf"{path.name} changed since it was written .*; built it again"):
        again = GPTDataset(IndexedDataset(prefix), "1", 0, 40, 8, seed=3)
    assert again.built_indices and samples(again) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt entry is sound again: loaded, silently
        third = GPTDataset(IndexedDataset(prefix), "1", 0, 40, 8, seed=3)
    assert not third.built_indices and samples(third) == expected


def test_a_damaged_blend_cache_is_built_again_and_reads_the_same_samples(tmp_path):
    first = GPTDataset(IndexedDataset(corpus(tmp_path, "a", 40, seed=1)), "1", 0, 30, 8, seed=3)
    second = GPTDataset(IndexedDataset(corpus(tmp_path, "b", 40, seed=2)), "1", 0, 30, 8, seed=3)
    blend = BlendedDataset([first, second], [0.4, 0.6], 40, tmp_path / "cache")
    expected = samples(blend)
    path = entry_file(tmp_path / "cache", "dataset_index")
    np.save(path, np.full(40, 7, dtype=np.int16))  # a dataset the blend does not have
    with pytest.warns(CacheWarning, match="dataset_index.npy changed since it was written"):
        again = BlendedDataset([first, second], [0.4, 0.6], 40, tmp_path / "cache")
    assert again.built_indices and samples(again) == expected


def test_cache_entries_without_checksums_or_files_are_built_again_with_a_warning(tmp_path):
    prefix = corpus(tmp_path, "corpus", 50, seed=1)
    expected = samples(GPTDataset(IndexedDataset(prefix), "1", 0, 40, 8, seed=3))
    (description,) = (tmp_path / ".mtk-cache").glob("*-description.json")
    record = json.loads(description.read_text())
    assert set(record["cached_files"]) == {"document_index", "sample_index", "shuffle_index"}
    del record["cached_files"]  # as mtk wrote entries before it recorded checksums
    description.write_text(json.dumps(record))
    with pytest.warns(CacheWarning, match="records no checksums of its files"):
        assert samples(GPTDataset(IndexedDataset(prefix), "1", 0, 40, 8, seed=3)) == expected
    entry_file(tmp_path / ".mtk-cache", "sample_index").unlink()
    with pytest.warns(CacheWarning, match="sample_index.npy is missing; built it again"):
        assert samples(GPTDataset(IndexedDataset(prefix), "1", 0, 40, 8, seed=3)) == expected


# ---------------------------------------------------------------- blend weights


@pytest.mark.parametrize(
    "weights, message",
    [
        (("1e308", "1e308"), r"the weights 1e\+308 \+ 1e\+308 overflow when added; .*scale them down"),
        (("1e-320", "1e10"), "weight 1e-320 is too small next to the total"),
        (("0", "0"), "weight '0' of .* must be a positive number"),
        (("-1", "2"), "weight '-1' of .* must be a positive number"),
        (("nan", "1"), "weight 'nan' of .* must be a positive number"),
        (("inf", "1"), "weight 'inf' of .* must be a positive number"),
    ],
)
def test_blend_weights_that_give_no_finite_positive_shares_are_refused(tmp_path, weights, message):
    first, second = corpus(tmp_path, "a", 20, seed=1), corpus(tmp_path, "b", 20, seed=2)
    with pytest.raises(ValueError, match=message):
        parse_blend(f"{weights[0]} {first} {weights[1]} {second}")


def test_training_on_overflowing_blend_weights_is_a_one_line_error(tmp_path):
    first, second = corpus(tmp_path, "a", 20, seed=1), corpus(tmp_path, "b", 20, seed=2)
    output = train_error(tmp_path, f"1e308 {first} 1e308 {second}")
    assert "the weights 1e+308 + 1e+308 overflow when added" in output


# ---------------------------------------------------------------- data manifests


@pytest.fixture
def prepared(tmp_path) -> str:
    lines = [json.dumps({"text": " ".join(str((i + j) % 40) for j in range(20))}) for i in range(30)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    result = prepare_data(
        [str(tmp_path / "in.jsonl")], str(tmp_path / "p"), load_tokenizer("null", vocab_size=40)
    )
    return result.outputs["text"]


BAD_KEYS = {  # key path in the manifest -> (value, what the error says after the key)
    "vocab_size": ("big", "is 'big', expected an integer"),
    "eod": (-1, "is -1, expected an integer from 0 up"),
    "tokenizer": ("gpt2", "is 'gpt2', expected an object"),
    "tokenizer.kind": ("sentencepiece", "is 'sentencepiece', expected one of hf, gpt2bpe, wordpiece, null"),
    "tokenizer.vocab_size": (True, "is True, expected an integer"),
    "tokenizer.eod": (41, "is 41, expected an integer from 0 to 40"),
    "tokenizer.files": ("vocab.txt", "is 'vocab.txt', expected a list of the tokenizer's files"),
    "tokenizer.lower_case": ("yes", "is 'yes', expected true or false"),
}


def set_key(prefix: str, key: str, value) -> Path:
    path = data_manifest_path(prefix)
    manifest = json.loads(path.read_text())
    *parents, last = key.split(".")
    target = manifest
    for parent in parents:
        target = target[parent]
    target[last] = value
    path.write_text(json.dumps(manifest))
    return path


@pytest.mark.parametrize("key", BAD_KEYS)
def test_a_manifest_key_of_the_wrong_type_or_range_is_named_with_its_file(prepared, key):
    value, problem = BAD_KEYS[key]
    path = set_key(prepared, key, value)
    with pytest.raises(ManifestError) as err:
        data_facts(prepared)
    assert str(err.value).startswith(f"{path}: key '{key}' {problem}")
    assert str(err.value).endswith("the manifest is damaged: restore it, or prepare the data again")
    with pytest.raises(ManifestError, match="the manifest is damaged"):
        merge_prepared([prepared], str(Path(prepared).parent / "merged"))


def test_a_sound_manifest_gives_its_facts(prepared):
    facts = data_facts(prepared)
    assert (facts.vocab_size, facts.eod, facts.tokenizer["kind"]) == (41, 40, "null")


def test_training_on_a_manifest_with_a_text_vocab_size_is_a_one_line_error(tmp_path, prepared):
    path = set_key(prepared, "vocab_size", "big")
    assert f"{path}: key 'vocab_size' is 'big', expected an integer" in train_error(tmp_path, prepared)
