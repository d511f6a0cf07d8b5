"""Index builders for GPT samples and blends (numba-compiled loops), and the disk cache that keeps them.

The loops reproduce Megatron-LM's ``helpers.cpp`` (``build_sample_idx``, ``build_blending_indices``),
so the same data, split and seed give the same samples in the same order.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import weakref
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numba
import numpy as np

from mtk.data.indexed import IndexedDataset, bin_path, idx_path
from mtk.manifest import atomic_output, atomic_write_text, sha256_file


def _jit(function: Callable) -> Callable:
    """``numba.njit(cache=True)``, or plain ``njit`` where no cache folder is writable.

    numba looks for a cache location when the function is decorated and raises if none is
    writable (read-only install and home); compiling in every process is slower, not wrong.
    """
    try:
        return numba.njit(cache=True)(function)
    except RuntimeError:
        return numba.njit(function)


SUM_BLOCK = 1 << 20  # entries per numpy pass of total_length: bounded temporaries


def total_length(sequence_lengths: np.ndarray, ids: np.ndarray) -> int:
    """``sequence_lengths[ids].sum()`` without gathering every length at once: in blocks of
    ``SUM_BLOCK`` ids (a document index can hold tens of millions of entries)."""
    return sum(
        int(sequence_lengths[ids[begin : begin + SUM_BLOCK]].sum(dtype=np.int64))
        for begin in range(0, len(ids), SUM_BLOCK)
    )


@_jit
def _fill_sample_index(sequence_lengths, document_index, seq_length, sample_index):
    position = 0  # into document_index
    offset = 0  # token offset inside that document
    sample_index[0, 0] = 0
    sample_index[0, 1] = 0
    for sample in range(1, sample_index.shape[0]):
        remaining = seq_length + 1
        while remaining != 0:
            doc_length = sequence_lengths[document_index[position]] - offset
            remaining -= doc_length
            if remaining <= 0:
                # The sample ends inside this document; the next one starts on its last token,
                # which this sample keeps only as the label source (hence the -1).
                offset += remaining + doc_length - 1
                remaining = 0
            else:
                position += 1
                offset = 0
        sample_index[sample, 0] = position
        sample_index[sample, 1] = offset


def build_sample_index(
    sequence_lengths: np.ndarray, document_index: np.ndarray, seq_length: int
) -> np.ndarray:
    """Where every sample of ``seq_length + 1`` tokens starts in the stream of ``document_index``'s documents.

    Returns ``(num_samples + 1, 2)`` rows ``(position in document_index, token offset)``, where
    ``num_samples = (total_tokens - 1) // seq_length`` (the last partial sample is dropped). Sample ``i``
    runs from row ``i`` to row ``i + 1`` inclusive: consecutive samples share one token. Rows are int32
    unless a position or a length needs int64 (as Megatron chooses).
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be positive, got {seq_length}")
    document_index = np.ascontiguousarray(document_index)
    sequence_lengths = np.ascontiguousarray(sequence_lengths)
    total_tokens = total_length(sequence_lengths, document_index)
    num_samples = max(total_tokens - 1, 0) // seq_length
    largest = max(len(document_index), int(sequence_lengths.max(initial=0)))
    dtype = np.int32 if largest <= np.iinfo(np.int32).max else np.int64
    sample_index = np.empty((num_samples + 1, 2), dtype=dtype)
    _fill_sample_index(sequence_lengths, document_index, seq_length, sample_index)
    return sample_index


@_jit
def _fill_blending_indices(weights, dataset_index, dataset_sample_index):
    counts = np.zeros(len(weights), dtype=np.int64)
    for sample in range(len(dataset_index)):
        scale = max(float(sample), 1.0)
        best = 0
        best_error = weights[0] * scale - counts[0]
        for dataset in range(1, len(weights)):
            error = weights[dataset] * scale - counts[dataset]
            if error > best_error:
                best = dataset
                best_error = error
        dataset_index[sample] = best
        dataset_sample_index[sample] = counts[best]
        counts[best] += 1


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blend: sample ``i`` comes from the dataset furthest behind its share.

    ``weights`` must be normalised. Returns ``dataset_index`` (int16, which dataset serves sample ``i``)
    and ``dataset_sample_index`` (int64, the how-many-th sample of that dataset it is).
    """
    weights = np.asarray(weights, dtype=np.float64)
    if not 0 < len(weights) <= np.iinfo(np.int16).max:
        raise ValueError(f"a blend needs 1 to {np.iinfo(np.int16).max} datasets, got {len(weights)}")
    dataset_index = np.empty(size, dtype=np.int16)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    _fill_blending_indices(weights, dataset_index, dataset_sample_index)
    return dataset_index, dataset_sample_index


# ---------------------------------------------------------------- sentence-pair samples (BERT, T5)
# std::mt19937 and std::mt19937_64, the generators helpers.cpp draws with, so the sample index is
# Megatron's for the same data, length and seed.


@_jit
def _mt32_seed(seed):
    state = np.empty(624, np.uint32)
    state[0] = np.uint32(seed)
    for i in range(1, 624):
        previous = np.uint64(state[i - 1])
        state[i] = np.uint32(
            (np.uint64(1812433253) * (previous ^ (previous >> np.uint64(30))) + np.uint64(i))
            & np.uint64(0xFFFFFFFF)
        )
    return state


@_jit
def _mt32_twist(state):
    for i in range(624):
        y = (np.uint32(state[i]) & np.uint32(0x80000000)) | (
            np.uint32(state[(i + 1) % 624]) & np.uint32(0x7FFFFFFF)
        )
        value = np.uint32(state[(i + 397) % 624]) ^ (y >> np.uint32(1))
        if y & np.uint32(1):
            value ^= np.uint32(0x9908B0DF)
        state[i] = value


@_jit
def _mt32_next(state, position):
    """(next output, new position); ``position`` 624 means the state needs twisting."""
    if position[0] >= 624:
        _mt32_twist(state)
        position[0] = 0
    y = np.uint32(state[position[0]])
    position[0] += 1
    y ^= y >> np.uint32(11)
    y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
    y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
    y ^= y >> np.uint32(18)
    return y


@_jit
def _mt64_seed(seed):
    state = np.empty(312, np.uint64)
    state[0] = np.uint64(seed)
    for i in range(1, 312):
        previous = state[i - 1]
        state[i] = np.uint64(6364136223846793005) * (previous ^ (previous >> np.uint64(62))) + np.uint64(i)
    return state


@_jit
def _mt64_next(state, position):
    if position[0] >= 312:
        for i in range(312):
            y = (state[i] & np.uint64(0xFFFFFFFF80000000)) | (state[(i + 1) % 312] & np.uint64(0x7FFFFFFF))
            value = state[(i + 156) % 312] ^ (y >> np.uint64(1))
            if y & np.uint64(1):
                value ^= np.uint64(0xB5026F5AA96619E9)
            state[i] = value
        position[0] = 0
    y = state[position[0]]
    position[0] += 1
    y ^= (y >> np.uint64(29)) & np.uint64(0x5555555555555555)
    y ^= (y << np.uint64(17)) & np.uint64(0x71D67FFFEDA60000)
    y ^= (y << np.uint64(37)) & np.uint64(0xFFF7EEE000000000)
    y ^= y >> np.uint64(43)
    return y


@_jit
def _target_length(short_ratio, max_length, state, position):
    if short_ratio == 0:
        return max_length
    draw = _mt32_next(state, position)
    if draw % np.uint32(short_ratio) == 0:
        return 2 + np.int64(draw % np.uint32(max_length - 1))
    return max_length


LONG_SENTENCE = 512  # helpers.cpp: documents with a longer sentence are left out


@_jit
def _sentence_samples(
    documents, sizes, epochs, max_samples, max_length, short_ratio, seed, min_sentences, out
):
    """One pass of helpers.cpp's build_mapping; fills ``out`` when it is big enough, returns the count."""
    state, position = _mt32_seed(seed), np.full(1, 624, np.int64)
    count = 0
    for _ in range(epochs):
        if count >= max_samples:
            break
        for doc in range(documents.shape[0] - 1):
            first, last = documents[doc], documents[doc + 1]
            remaining = last - first
            long_sentence = False
            if remaining > 1:
                for sentence in range(first, last):
                    if sizes[sentence] > LONG_SENTENCE:
                        long_sentence = True
                        break
            if remaining < min_sentences or long_sentence:
                continue
            start, length, sentences = first, 0, 0
            target = _target_length(short_ratio, max_length, state, position)
            for sentence in range(first, last):
                length += sizes[sentence]
                sentences += 1
                remaining -= 1
                if (length >= target and remaining > 1 and sentences >= min_sentences) or remaining == 0:
                    if count < out.shape[0]:
                        out[count, 0] = start
                        out[count, 1] = sentence + 1
                        out[count, 2] = target
                    count += 1
                    start = sentence + 1
                    target = _target_length(short_ratio, max_length, state, position)
                    length, sentences = 0, 0
    return count


@_jit
def _shuffle_rows(rows, seed):
    state, position = _mt64_seed(seed), np.full(1, 312, np.int64)
    for i in range(rows.shape[0] - 1, 0, -1):
        j = np.int64(_mt64_next(state, position) % np.uint64(i + 1))
        for column in range(rows.shape[1]):
            rows[i, column], rows[j, column] = rows[j, column], rows[i, column]


def build_sentence_samples(
    documents: np.ndarray,
    sizes: np.ndarray,
    num_samples: int | None,
    max_length: int,
    short_probability: float,
    seed: int,
    min_sentences: int,
) -> np.ndarray:
    """Megatron's sentence-group samples (``helpers.build_mapping``): rows (first sentence, end
    sentence, target length), shuffled. A sample packs whole sentences of one document up to a target
    length (``max_length``, or with ``short_probability`` a random shorter one); documents with fewer
    than ``min_sentences`` sentences, or a sentence over 512 tokens, are left out. ``documents``
    holds each document's first sentence and the end; passes repeat until ``num_samples`` (None: one).
    """
    if not 0 <= short_probability <= 1 or max_length < 2 or seed <= 0:
        raise ValueError(
            f"bad sample settings: max_length {max_length}, short probability {short_probability}, seed {seed}"
        )
    short_ratio = int(round(1 / short_probability)) if short_probability > 0 else 0
    documents = np.ascontiguousarray(documents, dtype=np.int64)
    sizes = np.ascontiguousarray(sizes, dtype=np.int32)
    empty = np.zeros((0, 3), np.int64)
    per_pass = _sentence_samples(documents, sizes, 1, 1, max_length, short_ratio, seed, min_sentences, empty)
    if per_pass == 0:
        raise ValueError(
            f"no document has {min_sentences} or more sentences of at most {LONG_SENTENCE} tokens: "
            "prepare the data with --split-sentences"
        )
    # as helpers.cpp: whole passes until num_samples (a pass's count varies with its short targets)
    epochs, limit = (1, per_pass) if num_samples is None else (np.iinfo(np.int32).max - 1, num_samples)
    count = _sentence_samples(
        documents, sizes, epochs, limit, max_length, short_ratio, seed, min_sentences, empty
    )
    rows = np.empty((count, 3), np.int64)
    _sentence_samples(documents, sizes, epochs, limit, max_length, short_ratio, seed, min_sentences, rows)
    _shuffle_rows(rows, seed + 1)
    return rows


def default_cache_dir(prefix: str | os.PathLike) -> Path:
    return Path(prefix).resolve().parent / ".mtk-cache"


# Computed once per open dataset: the splits of one file share it, and a big .idx takes seconds to hash.
_idx_hashes: weakref.WeakKeyDictionary[IndexedDataset, str] = weakref.WeakKeyDictionary()


def idx_sha256(indexed: IndexedDataset) -> str:
    """sha256 of the dataset's ``.idx``: it fixes every sequence length, hence every index built on it."""
    if indexed not in _idx_hashes:
        _idx_hashes[indexed] = sha256_file(idx_path(indexed.prefix))
    return _idx_hashes[indexed]


def index_description(
    owner: object, indexed: IndexedDataset, split: str, split_index: int, **settings: Any
) -> dict:
    """What a dataset's cached indices depend on: its class, the data (path and .idx hash), the split,
    and ``settings``; the cache key of :func:`cached_indices`."""
    return {
        "class": type(owner).__name__,
        "path_prefix": str(Path(indexed.prefix).resolve()),
        "idx_sha256": idx_sha256(indexed),
        "split": split,
        "split_index": split_index,
        **settings,
    }


CHECKSUMS = "cached_files"  # key of the description file: {name: {"bytes": size, "crc32": checksum}}


class CacheWarning(UserWarning):
    """A sample-index cache entry was damaged, and has been built again."""


def cached_indices(
    cache_dir: str | os.PathLike,
    description: dict[str, Any],
    names: Sequence[str],
    build: Callable[[], dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], bool]:
    """Load the arrays ``names`` cached under ``description``, or ``build()`` and cache them.

    Files are ``CACHE_DIR/<class>-<md5 of description JSON>-<name>.npy`` plus ``...-description.json``,
    which also records each file's size and crc32 (``CHECKSUMS``). Each is written under a temporary
    name and renamed; the description goes last and marks the entry complete, so a crash or a
    concurrent builder never leaves a half-written entry that gets loaded. An entry whose files are
    missing, truncated or changed is built again, with a :class:`CacheWarning` saying what was wrong.
    Returns the arrays (memory-mapped when loaded) and whether they were built now.
    """
    cache_dir = Path(cache_dir)
    text = json.dumps(description, sort_keys=True, indent=2)
    stem = f"{description['class']}-{hashlib.md5(text.encode()).hexdigest()}"
    description_path = cache_dir / f"{stem}-description.json"
    paths = {name: cache_dir / f"{stem}-{name}.npy" for name in names}
    if description_path.exists():
        problem = _damage(description_path, description, paths)
        if problem is None:
            try:
                return {name: np.load(path, mmap_mode="r") for name, path in paths.items()}, False
            except (OSError, ValueError) as err:
                problem = f"it cannot be read ({err})"
        warnings.warn(f"sample-index cache {description_path}: {problem}; built it again", CacheWarning, 2)
    arrays = build()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for name, path in paths.items():  # written with the umask's mode: others may share the cache
            with atomic_output(path) as tmp, open(tmp, "wb") as sink:
                np.save(sink, arrays[name], allow_pickle=False)
        record = {**description, CHECKSUMS: {name: _checksum(path) for name, path in paths.items()}}
        atomic_write_text(description_path, json.dumps(record, sort_keys=True, indent=2) + "\n")
    except OSError as err:
        raise CacheError(
            f"cannot write the sample-index cache in {cache_dir} ({err.strerror or err}); "
            "give --data-cache-path DIR on a disk you can write to"
        ) from None
    return arrays, True


def _checksum(path: Path) -> dict[str, int]:
    """Size and crc32 of a file: crc32 reads 2 GB/s where sha256 reads 1.4, and guards against
    damage (truncation, a bad copy), not against someone forging an entry."""
    crc = 0
    buffer = bytearray(1 << 20)  # reused: reading 16 MB blocks as new objects held 16 MB each time
    with open(path, "rb", buffering=0) as source:
        while count := source.readinto(buffer):
            crc = zlib.crc32(memoryview(buffer)[:count], crc)
    return {"bytes": path.stat().st_size, "crc32": crc}


def _damage(description_path: Path, description: dict[str, Any], paths: dict[str, Path]) -> str | None:
    """What is wrong with the cache entry ``description_path`` describes, or None if nothing is."""
    try:
        record = json.loads(description_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"the description cannot be read ({err})"
    checksums = record.pop(CHECKSUMS, None) if isinstance(record, dict) else None
    if record != json.loads(json.dumps(description)):
        return "the description does not match the data and settings it is filed under"
    if not isinstance(checksums, dict) or set(checksums) != set(paths):
        return "it records no checksums of its files (an older mtk wrote it)"
    for name, path in paths.items():
        if not path.is_file():
            return f"{path.name} is missing"
        actual, recorded = _checksum(path), checksums[name]
        if actual != recorded:
            return (
                f"{path.name} changed since it was written ({actual['bytes']} bytes, crc32 {actual['crc32']}; "
                f"the description records {recorded})"
            )
    return None


class CacheError(ValueError):
    """The sample-index cache cannot be written where it was asked to be."""


SCAN_BLOCK = 1 << 22  # tokens per read of max_token_id


def max_token_id(indexed: IndexedDataset, cache_dir: str | os.PathLike | None = None) -> int:
    """The largest token id in the dataset's ``.bin`` (-1 if it holds none): read once, then cached
    beside the sample indices under the file's identity (its .idx hash, size and modification time)."""
    bin_file = bin_path(indexed.prefix)
    stat = bin_file.stat()
    description = {"class": "MaxTokenId", "path_prefix": str(Path(indexed.prefix).resolve()),
                   "idx_sha256": idx_sha256(indexed), "bin_bytes": stat.st_size, "bin_mtime_ns": stat.st_mtime_ns}  # fmt: skip

    def scan() -> dict[str, np.ndarray]:
        # read into one reused buffer, not through a memory map: a map keeps every page it touched
        # resident, so scanning a 2 GB .bin grew the process by 2 GB
        largest = -1
        buffer = np.empty(SCAN_BLOCK, dtype=indexed.dtype)
        with open(bin_file, "rb", buffering=0) as source:
            while count := source.readinto(memoryview(buffer).cast("B")) // indexed.dtype.itemsize:
                largest = max(largest, int(buffer[:count].max()))
        return {"max_token_id": np.array([largest], dtype=np.int64)}

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(indexed.prefix)
    arrays, _ = cached_indices(cache, description, ["max_token_id"], scan)
    return int(arrays["max_token_id"][0])
