"""Megatron-LM's ``MMIDIDX`` indexed dataset: a ``.bin`` of raw tokens and an ``.idx`` describing it.

``.idx`` layout (all little-endian)::

    b"MMIDIDX\\x00\\x00"              9-byte magic
    uint64  version = 1
    uint8   dtype code (see DTYPE_CODES)
    uint64  sequence_count            S
    uint64  document_count            D + 1 (entries of document_indices)
    int32   sequence_lengths[S]       tokens per sequence (sentence, or whole document)
    int64   sequence_pointers[S]      byte offset of each sequence in the .bin
    int64   document_indices[D + 1]   sequence index where each document starts, then S

A document with no tokens keeps its ``document_indices`` entry (two equal neighbours).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from mtk.manifest import atomic_outputs

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(dtype): code for code, dtype in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """An ``.idx``/``.bin`` pair is missing, malformed, or inconsistent."""


def token_dtype(vocab_size: int | None) -> np.dtype:
    """Megatron's choice: uint16 when the vocabulary fits comfortably, else int32."""
    return np.dtype(np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32)


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.idx")


def encode_index(dtype: np.dtype, sequence_lengths: np.ndarray, document_indices: np.ndarray) -> bytes:
    """The exact bytes of an ``.idx`` file."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(sequence_lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= dtype.itemsize
    documents = np.asarray(document_indices, dtype=np.int64)
    header = (
        INDEX_MAGIC
        + struct.pack("<Q", INDEX_VERSION)
        + struct.pack("<B", CODE_OF_DTYPE[dtype])
        + struct.pack("<Q", len(lengths))
        + struct.pack("<Q", len(documents))
    )
    return header + lengths.tobytes() + pointers.tobytes() + documents.tobytes()


class IndexWriter:
    """Accumulates sequence lengths and document boundaries; serialises them at the end."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        self._lengths: list[np.ndarray] = []
        self._doc_ends: list[np.ndarray] = []  # absolute sequence counts at each document end
        self.sequence_count = 0
        self.document_count = 0

    def add_documents(self, sequence_lengths: np.ndarray, sequences_per_document: np.ndarray) -> None:
        """Append documents; document i holds ``sequences_per_document[i]`` sequences (0 if empty)."""
        lengths = np.asarray(sequence_lengths, dtype=np.int32)
        counts = np.asarray(sequences_per_document, dtype=np.int64)
        if counts.sum() != len(lengths):
            raise ValueError("sequences_per_document does not add up to the number of sequences")
        self._lengths.append(lengths)
        self._doc_ends.append(self.sequence_count + np.cumsum(counts))
        self.sequence_count += len(lengths)
        self.document_count += len(counts)

    def sequence_lengths(self) -> np.ndarray:
        return np.concatenate([np.zeros(0, np.int32), *self._lengths])

    def document_indices(self) -> np.ndarray:
        return np.concatenate([np.zeros(1, np.int64), *self._doc_ends])

    def to_bytes(self) -> bytes:
        return encode_index(self.dtype, self.sequence_lengths(), self.document_indices())


CHECK_BLOCK = 1 << 20  # entries per numpy pass of check_index: a few MB of temporaries at any size
CORRUPT = "the index is damaged or was not written for this data: restore it, or prepare the data again"


def _first(bad: np.ndarray) -> int | None:
    """Index of the first True of a boolean array, or None."""
    return int(bad.argmax()) if bad.any() else None


def check_index(
    index_file: Path, lengths: np.ndarray, pointers: np.ndarray, documents: np.ndarray, itemsize: int
) -> None:
    """IndexedDatasetError naming ``index_file`` and its first bad entry unless the lengths are
    non-negative, the pointers are the running sum of ``lengths * itemsize`` from 0 (so every sequence
    lies inside a .bin of the size the lengths add up to, which the caller checks), and the document
    indices climb from 0 to the sequence count without going down (so each lies in range).

    Vectorised in blocks of CHECK_BLOCK entries: O(n) time, bounded memory."""
    count = len(lengths)
    if len(documents) == 0 or documents[0] != 0:
        first = int(documents[0]) if len(documents) else "missing"
        raise IndexedDatasetError(f"{index_file}: document index 0 is {first}, expected 0; {CORRUPT}")
    if documents[-1] != count:
        raise IndexedDatasetError(
            f"{index_file}: the last document index ({len(documents) - 1}) is {int(documents[-1])}, "
            f"expected the sequence count {count}; {CORRUPT}"
        )
    start = 0  # byte offset where the block's first sequence must begin
    expected = np.empty(min(count, CHECK_BLOCK), np.int64)  # reused: where each sequence must begin
    for begin in range(0, count, CHECK_BLOCK):
        block = lengths[begin : begin + CHECK_BLOCK]
        bad = _first(block < 0)
        if bad is not None:
            raise IndexedDatasetError(
                f"{index_file}: sequence {begin + bad} has length {int(block[bad])}; lengths cannot be "
                f"negative; {CORRUPT}"
            )
        starts = expected[: len(block)]
        starts[0] = start
        np.cumsum(block[:-1], dtype=np.int64, out=starts[1:])
        starts[1:] *= itemsize
        starts[1:] += start
        bad = _first(pointers[begin : begin + CHECK_BLOCK] != starts)
        if bad is not None:
            raise IndexedDatasetError(
                f"{index_file}: sequence {begin + bad} starts at byte {int(pointers[begin + bad])}, expected "
                f"{int(starts[bad])} (the {itemsize}-byte tokens of the sequences before it); {CORRUPT}"
            )
        start = int(starts[-1]) + int(block[-1]) * itemsize
    for begin in range(0, len(documents) - 1, CHECK_BLOCK):
        block = documents[begin : begin + CHECK_BLOCK + 1]
        bad = _first(block[1:] < block[:-1])
        if bad is not None:
            raise IndexedDatasetError(
                f"{index_file}: document index {begin + bad + 1} is {int(block[bad + 1])}, below the one "
                f"before it ({int(block[bad])}); document indices cannot go down; {CORRUPT}"
            )


class IndexedDataset:
    """Read-only, memory-mapped view of a ``PREFIX.bin`` / ``PREFIX.idx`` pair."""

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = str(prefix)
        index_file, data_file = idx_path(prefix), bin_path(prefix)
        for path in (index_file, data_file):
            if not path.exists():
                raise IndexedDatasetError(f"{path}: not found (expected the pair {data_file} / {index_file})")
        if index_file.stat().st_size == 0:
            raise IndexedDatasetError(f"{index_file}: empty file, not an MMIDIDX index")
        raw = np.memmap(index_file, dtype=np.uint8, mode="r")
        header_size = len(INDEX_MAGIC) + 8 + 1 + 8 + 8
        if len(raw) < header_size or bytes(raw[: len(INDEX_MAGIC)]) != INDEX_MAGIC:
            raise IndexedDatasetError(f"{index_file}: not an MMIDIDX index (bad magic)")
        offset = len(INDEX_MAGIC)
        (version,) = struct.unpack_from("<Q", raw, offset)
        (code,) = struct.unpack_from("<B", raw, offset + 8)
        sequence_count, document_count = struct.unpack_from("<QQ", raw, offset + 9)
        if version != INDEX_VERSION:
            raise IndexedDatasetError(f"{index_file}: unsupported index version {version}")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{index_file}: unknown dtype code {code}")
        expected = header_size + sequence_count * (4 + 8) + document_count * 8
        if len(raw) != expected:
            raise IndexedDatasetError(
                f"{index_file}: {len(raw)} bytes, expected {expected} for {sequence_count} sequences "
                f"and {document_count} document indices (truncated or not an MMIDIDX v1 file)"
            )
        self.dtype = np.dtype(DTYPE_CODES[code])
        start = header_size
        self.sequence_lengths = np.frombuffer(raw, np.int32, sequence_count, start)
        start += sequence_count * 4
        self.sequence_pointers = np.frombuffer(raw, np.int64, sequence_count, start)
        start += sequence_count * 8
        self.document_indices = np.frombuffer(raw, np.int64, document_count, start)
        self._index_map = raw
        lengths, pointers, documents = self.sequence_lengths, self.sequence_pointers, self.document_indices
        check_index(index_file, lengths, pointers, documents, self.dtype.itemsize)
        total = int(self.sequence_lengths.sum(dtype=np.int64))
        data_bytes = data_file.stat().st_size
        if data_bytes != total * self.dtype.itemsize:
            raise IndexedDatasetError(
                f"{data_file}: {data_bytes} bytes, but {index_file} describes {total} tokens of "
                f"{self.dtype} ({total * self.dtype.itemsize} bytes); the pair does not belong together"
            )
        # np.memmap refuses empty files; an empty dataset gets an empty array instead.
        self.tokens = np.memmap(data_file, dtype=self.dtype, mode="r") if total else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        """Number of sequences (documents, or sentences for ``_sentence`` files)."""
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of sequence ``index``, or the slice ``[offset, offset + length)`` of it."""
        size = int(self.sequence_lengths[index])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"slice [{offset}, {offset + length}) outside sequence {index} of length {size}")
        start = int(self.sequence_pointers[index]) // self.dtype.itemsize + offset
        return self.tokens[start : start + length]

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get(index)

    def document(self, index: int) -> list[np.ndarray]:
        """The sequences (sentences) of document ``index``; empty list for an empty document."""
        begin, end = self.document_indices[index], self.document_indices[index + 1]
        return [self.get(i) for i in range(begin, end)]


@contextlib.contextmanager
def atomic_pair(prefix: str | os.PathLike) -> Iterator[tuple[Path, Path]]:
    """Temporary ``.bin`` and ``.idx`` paths to write the pair ``prefix`` into, published together
    when the block succeeds (``atomic_outputs``, the .bin first: a crash in between leaves a pair
    without its index, never a new .bin with an old .idx)."""
    with atomic_outputs([bin_path(prefix), idx_path(prefix)]) as (tmp_bin, tmp_idx):
        yield tmp_bin, tmp_idx


def check_output_prefix(prefix: str | os.PathLike, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """An output prefix names files (``DIR/NAME``), and is none of the ``inputs``: IndexedDatasetError
    saying so before anything is written."""
    text = str(prefix)
    if not Path(text).name or text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise IndexedDatasetError(
            f"output prefix {text!r} names a folder; give DIR/NAME, e.g. {os.path.join(text, 'corpus')}"
        )
    target = bin_path(text).resolve()
    for source in inputs:
        if bin_path(source).resolve() == target:
            raise IndexedDatasetError(f"the output {text} is one of the inputs; write the result elsewhere")


def merge_datasets(prefixes: Sequence[str | os.PathLike], output_prefix: str | os.PathLike) -> IndexedDataset:
    """Concatenate several pairs into one, as Megatron's ``tools/merge_datasets.py`` does.

    The output pair appears whole or not at all (see ``atomic_pair``).
    """
    check_output_prefix(output_prefix, prefixes)
    datasets = [IndexedDataset(prefix) for prefix in prefixes]
    if not datasets:
        raise IndexedDatasetError("nothing to merge: give at least one input prefix")
    dtypes = {str(ds.dtype) for ds in datasets}
    if len(dtypes) != 1:
        listing = ", ".join(f"{ds.prefix} ({ds.dtype})" for ds in datasets)
        raise IndexedDatasetError(f"cannot merge datasets of different token dtypes: {listing}")
    writer = IndexWriter(datasets[0].dtype)
    with atomic_pair(output_prefix) as (tmp_bin, tmp_idx):
        with open(tmp_bin, "wb") as sink:
            for ds in datasets:
                with open(bin_path(ds.prefix), "rb") as source:
                    shutil.copyfileobj(source, sink, 1 << 24)
                writer.add_documents(ds.sequence_lengths, np.diff(ds.document_indices))
        tmp_idx.write_bytes(writer.to_bytes())
    return IndexedDataset(output_prefix)
