"""Start-up memory stays flat as the corpus grows: the index builders and checks work in blocks, and
the token-id scan reads the .bin through one buffer rather than a memory map (whose touched pages
stay resident: a 2 GB .bin grew the process by 2 GB). Allocations are measured with tracemalloc,
which numpy reports to; no timing."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import mtk.data.helpers as helpers
from mtk.data.indexed import CHECK_BLOCK, IndexedDataset, check_index


def peak_allocated(function, *args) -> tuple[object, int]:
    """``function(*args)`` and the most bytes it had allocated at once."""
    tracemalloc.start()
    try:
        result = function(*args)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_sample_index_sums_lengths_in_blocks():
    # 4M document-index entries (16 MB of int32): gathering every length at once would allocate as much
    lengths = np.full(1000, 10, dtype=np.int32)
    document_index = np.tile(np.arange(1000, dtype=np.int32), 4000)
    helpers.build_sample_index(lengths, document_index[:10], 5)  # numba loads its compiled loop first
    rows, peak = peak_allocated(helpers.build_sample_index, lengths, document_index, 1000)
    assert len(rows) == (10 * len(document_index) - 1) // 1000 + 1
    assert rows[1].tolist() == [100, 0] and rows[-1].tolist() == [len(document_index) - 100, 0]
    assert peak < rows.nbytes + 5 * helpers.SUM_BLOCK * 4  # one block of gathered lengths, and the rows


def test_total_length_matches_a_plain_sum(monkeypatch):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 1000, 50, dtype=np.int32)
    ids = rng.integers(0, 50, 1001)
    monkeypatch.setattr(helpers, "SUM_BLOCK", 7)
    assert helpers.total_length(lengths, ids) == int(lengths[ids].sum(dtype=np.int64))
    assert helpers.total_length(lengths, ids[:0]) == 0


def test_check_index_needs_a_few_blocks_of_memory():
    count = 4 * CHECK_BLOCK
    lengths = np.full(count, 3, dtype=np.int32)
    pointers = np.arange(count, dtype=np.int64) * 6
    documents = np.array([0, count // 2, count], dtype=np.int64)
    _, peak = peak_allocated(check_index, "x.idx", lengths, pointers, documents, 2)
    assert peak < 3 * CHECK_BLOCK * 8  # the previous pass held four int64 copies of a 4M-entry block
    pointers[CHECK_BLOCK + 5] += 2
    with pytest.raises(ValueError, match=f"sequence {CHECK_BLOCK + 5} starts at byte"):
        check_index("x.idx", lengths, pointers, documents, 2)


def test_token_scan_reads_through_a_buffer_not_a_map(write_corpus, tmp_path, monkeypatch):
    prefix = write_corpus("corpus", [[1, 2, 3], [7, 60001, 5, 4], [], [9] * 11])

    def no_map(*args, **kwargs):
        raise AssertionError("the .bin was memory-mapped for the scan")

    indexed = IndexedDataset(prefix)
    monkeypatch.setattr(np, "memmap", no_map)
    monkeypatch.setattr(helpers, "SCAN_BLOCK", 3)  # blocks that cut documents, and a short last one
    assert helpers.max_token_id(indexed, tmp_path / "cache") == 60001
