"""MMIDIDX format: golden bytes written from the format specification, reading, merging."""

from __future__ import annotations

import numpy as np
import pytest

from mtk.data.indexed import (
    IndexedDataset,
    IndexedDatasetError,
    IndexWriter,
    encode_index,
    merge_datasets,
    token_dtype,
)

# Three documents: [1, 2, 3], an empty one, [4, 5]; uint16 tokens (dtype code 8).
GOLDEN_IDX_UINT16 = bytes.fromhex(
    "4d4d494449445800 00"  # b"MMIDIDX\0\0"
    "0100000000000000"  # version 1
    "08"  # dtype code 8 = uint16
    "0200000000000000"  # 2 sequences
    "0400000000000000"  # 4 document indices
    "03000000"
    "02000000"  # sequence lengths (int32)
    "0000000000000000"
    "0600000000000000"  # byte pointers (int64): 0, 3 tokens * 2 bytes
    "0000000000000000"
    "0100000000000000"
    "0100000000000000"
    "0200000000000000"  # document indices
)
GOLDEN_BIN_UINT16 = bytes.fromhex("01000200030004000500")


def write_pair(prefix, documents: list[list[list[int]]], dtype) -> None:
    """Write documents (each a list of sentences) with IndexWriter, the way prepare-data does."""
    writer = IndexWriter(dtype)
    sentences = [s for doc in documents for s in doc]
    writer.add_documents([len(s) for s in sentences], [len(doc) for doc in documents])
    flat = np.array([t for s in sentences for t in s], dtype=dtype)
    (prefix.parent / f"{prefix.name}.bin").write_bytes(flat.tobytes())
    (prefix.parent / f"{prefix.name}.idx").write_bytes(writer.to_bytes())


def test_golden_bytes_uint16(tmp_path):
    prefix = tmp_path / "golden"
    write_pair(prefix, [[[1, 2, 3]], [], [[4, 5]]], np.uint16)
    assert (tmp_path / "golden.idx").read_bytes() == GOLDEN_IDX_UINT16
    assert (tmp_path / "golden.bin").read_bytes() == GOLDEN_BIN_UINT16


def test_golden_bytes_int32_sentences():
    # one document of two sentences [7] and [8, 9]: int32 tokens (code 4), pointers step 4 bytes
    expected = bytes.fromhex(
        "4d4d49444944580000"
        "0100000000000000"
        "04"
        "0200000000000000"
        "0200000000000000"
        "01000000"
        "02000000"
        "0000000000000000"
        "0400000000000000"
        "0000000000000000"
        "0200000000000000"
    )
    assert encode_index(np.dtype(np.int32), np.array([1, 2]), np.array([0, 2])) == expected


def test_dtype_choice_follows_megatron():
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65499) == np.uint16
    assert token_dtype(65500) == np.int32
    assert token_dtype(128256) == np.int32


def test_reader_opens_golden_files(tmp_path):
    (tmp_path / "g.idx").write_bytes(GOLDEN_IDX_UINT16)
    (tmp_path / "g.bin").write_bytes(GOLDEN_BIN_UINT16)
    ds = IndexedDataset(tmp_path / "g")
    assert ds.dtype == np.uint16
    assert len(ds) == 2 and ds.num_documents == 3 and ds.num_tokens == 5
    assert ds[0].tolist() == [1, 2, 3]
    assert ds.get(1, offset=1, length=1).tolist() == [5]
    assert [s.tolist() for s in ds.document(0)] == [[1, 2, 3]]
    assert ds.document(1) == []
    assert [s.tolist() for s in ds.document(2)] == [[4, 5]]
    with pytest.raises(IndexError, match="outside sequence 0"):
        ds.get(0, offset=2, length=5)


def test_reader_rejects_bad_magic_truncation_and_mismatched_bin(tmp_path):
    (tmp_path / "a.bin").write_bytes(GOLDEN_BIN_UINT16)
    (tmp_path / "a.idx").write_bytes(b"NOTANIDX" + GOLDEN_IDX_UINT16[8:])
    with pytest.raises(IndexedDatasetError, match="bad magic"):
        IndexedDataset(tmp_path / "a")
    (tmp_path / "a.idx").write_bytes(GOLDEN_IDX_UINT16[:-8])
    with pytest.raises(IndexedDatasetError, match="truncated"):
        IndexedDataset(tmp_path / "a")
    (tmp_path / "a.idx").write_bytes(GOLDEN_IDX_UINT16)
    (tmp_path / "a.bin").write_bytes(GOLDEN_BIN_UINT16 + b"\0\0")
    with pytest.raises(IndexedDatasetError, match="does not belong together"):
        IndexedDataset(tmp_path / "a")
    with pytest.raises(IndexedDatasetError, match="not found"):
        IndexedDataset(tmp_path / "missing")


def test_empty_dataset_round_trips(tmp_path):
    write_pair(tmp_path / "e", [[], []], np.uint16)
    ds = IndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and ds.num_documents == 2 and ds.num_tokens == 0


def test_merge_concatenates_documents_and_offsets_indices(tmp_path):
    write_pair(tmp_path / "a", [[[1, 2]], [[3], [4, 5]]], np.uint16)
    write_pair(tmp_path / "b", [[], [[6, 7, 8]]], np.uint16)
    merged = merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    write_pair(tmp_path / "expected", [[[1, 2]], [[3], [4, 5]], [], [[6, 7, 8]]], np.uint16)
    assert (tmp_path / "m.idx").read_bytes() == (tmp_path / "expected.idx").read_bytes()
    assert (tmp_path / "m.bin").read_bytes() == (tmp_path / "expected.bin").read_bytes()
    assert merged.num_documents == 4


def test_merge_refuses_mixed_dtypes_and_leaves_nothing(tmp_path):
    write_pair(tmp_path / "a", [[[1]]], np.uint16)
    write_pair(tmp_path / "b", [[[1]]], np.int32)
    with pytest.raises(IndexedDatasetError, match="different token dtypes"):
        merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.idx", "b.bin", "b.idx"]
