"""Preprocessing: documents -> tokens -> Megatron ``.bin/.idx`` pairs, one pair per JSON key.

The main process reads bounded chunks and writes outputs in input order; tokenization runs in
worker processes (or in-process with one worker). Outputs are written under temporary names and
renamed only when everything succeeded, so a failure or Ctrl-C never leaves a valid-looking pair.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from mtk.data.indexed import (
    IndexedDatasetError,
    IndexWriter,
    bin_path,
    check_output_prefix,
    idx_path,
    token_dtype,
)
from mtk.data.sources import Chunk, TextMode, expand_inputs, read_chunks, total_input_bytes
from mtk.manifest import atomic_outputs, data_manifest_path, describe_file, write_manifest

OnError = Literal["fail", "skip"]


class PrepareError(ValueError):
    """Bad input found while preprocessing (message names file and line)."""


@dataclass
class EncodedKey:
    tokens: np.ndarray  # all tokens of the chunk's documents, concatenated
    sequence_lengths: np.ndarray  # int32, one per non-empty sentence (or document)
    sequences_per_document: np.ndarray  # int64, one per document (0 for an empty one)


@dataclass
class EncodedChunk:
    source: str
    keys: dict[str, EncodedKey]
    documents: int
    errors: list[tuple[int, str]]  # (line, message) of rejected lines
    input_bytes: int
    text_bytes: int


@dataclass
class PrepareStats:
    documents: int = 0
    empty_documents: dict[str, int] = field(default_factory=dict)
    skipped_lines: int = 0
    sequences: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    input_bytes: int = 0
    text_bytes: int = 0
    seconds: float = 0.0
    skipped_examples: list[str] = field(default_factory=list)


@dataclass
class PrepareResult:
    outputs: dict[str, str]  # key -> output prefix (without .bin/.idx)
    stats: PrepareStats
    manifests: dict[str, dict[str, Any]]


class _Encoder:
    """Turns chunks into tokens; one instance per worker process (which unpickles ``tokenizer``:
    rebuilt from its files, checked unchanged)."""

    def __init__(self, tokenizer: Any, keys: list[str], append_eod: bool, sentences: str | None):
        self.tokenizer = tokenizer
        self.keys = keys
        self.append_eod = append_eod
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.language = sentences
        if sentences is not None:
            from mtk.data.sentences import split_sentences

            self.split = split_sentences

    def _texts(self, chunk: Chunk) -> tuple[list[int], list[dict[str, str]], list[tuple[int, str]]]:
        lines, documents, errors = [], [], []
        for position, item in enumerate(chunk.items):
            line = chunk.first_line + position
            try:
                documents.append(self._document(item, chunk.format))
                lines.append(line)
            except ValueError as err:
                errors.append((line, str(err)))
        return lines, documents, errors

    def _document(self, item: Any, fmt: str) -> dict[str, str]:
        escapes = False  # only a JSON escape sequence (backslash-u) can smuggle in a lone surrogate
        if fmt == "jsonl":
            text = _decode_utf8(item)
            if not text.strip():
                raise ValueError("empty line, expected a JSON object")
            try:
                item = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"malformed JSON: {err.msg} at column {err.colno}") from None
            except RecursionError:
                raise ValueError("JSON nested too deeply to read (more levels than Python allows)") from None
            if not isinstance(item, dict):
                raise ValueError(f"expected a JSON object, got {type(item).__name__}")
            escapes = "\\u" in text
        document = {}
        for key in self.keys:
            if key not in item:
                raise ValueError(f"missing key '{key}' (keys present: {', '.join(map(str, item)) or 'none'})")
            if item[key] is None:
                raise ValueError(f"key '{key}' is null, expected a string")
            value = item[key]
            if isinstance(value, bytes):
                value = _decode_utf8(value)
            if not isinstance(value, str):
                raise ValueError(f"key '{key}' holds {type(value).__name__}, expected a string")
            if escapes:
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise ValueError(
                        f"key '{key}' holds a lone surrogate \\u{ord(value[err.start]):04x}, not valid UTF-8"
                    ) from None
            document[key] = value
        return document

    def _encode_key(self, texts: list[str]) -> EncodedKey:
        if self.language is None:
            sentences_per_text = [[text] for text in texts]
        else:
            sentences_per_text = [self.split(text, self.language) for text in texts]
        flat = list(itertools.chain.from_iterable(sentences_per_text))
        ids = self.tokenizer.encode_batch(flat) if flat else []
        lengths, per_document, pieces = [], [], []
        cursor = 0
        for sentences in sentences_per_text:
            doc_ids = [seq for seq in ids[cursor : cursor + len(sentences)] if seq]
            cursor += len(sentences)
            if doc_ids and self.append_eod:
                doc_ids[-1] = [*doc_ids[-1], self.tokenizer.eod]
            per_document.append(len(doc_ids))
            lengths.extend(map(len, doc_ids))
            pieces.extend(doc_ids)
        total = sum(lengths)
        tokens = np.fromiter(itertools.chain.from_iterable(pieces), dtype=self.dtype, count=total)
        return EncodedKey(
            tokens=tokens,
            sequence_lengths=np.asarray(lengths, dtype=np.int32),
            sequences_per_document=np.asarray(per_document, dtype=np.int64),
        )

    def __call__(self, chunk: Chunk) -> EncodedChunk:
        try:
            return self._encode(chunk)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:
            if type(err).__name__ != "PanicException":  # a crash inside the Rust tokenizer
                raise
            raise PrepareError(
                f"{chunk.source}: the tokenizer crashed on this input ({err}); check its files"
            ) from None

    def _encode(self, chunk: Chunk) -> EncodedChunk:
        lines, documents, errors = self._texts(chunk)
        try:
            keys = {key: self._encode_key([doc[key] for doc in documents]) for key in self.keys}
        except ValueError:
            # A tokenizer rejected some text (e.g. a non-integer for the null tokenizer): find which
            # documents, report them by line like any other bad line, and encode the rest.
            good = []
            for line, document in zip(lines, documents, strict=True):
                try:
                    for key in self.keys:
                        self.tokenizer.encode(document[key])
                    good.append(document)
                except ValueError as err:
                    errors.append((line, str(err)))
            errors.sort()
            documents = good
            keys = {key: self._encode_key([doc[key] for doc in documents]) for key in self.keys}
        return EncodedChunk(chunk.source, keys, len(documents), errors, chunk.input_bytes, chunk.text_bytes)


def _decode_utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})") from None


_worker_encoder: _Encoder | None = None


def _init_worker(parent: int, *args: Any) -> None:
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and cleans up
    _exit_with_parent(parent)
    _worker_encoder = _Encoder(*args)


def _exit_with_parent(parent: int, period: float = 0.5) -> None:
    """End this worker when its parent is gone (killed with SIGKILL, it could not stop us): a worker
    blocked on its task queue would otherwise live on, orphaned."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(period)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _encode_in_worker(chunk: Chunk) -> EncodedChunk:
    assert _worker_encoder is not None
    return _worker_encoder(chunk)


def _encode_all(chunks: Iterator[Chunk], encoder_args: tuple, workers: int) -> Iterator[EncodedChunk]:
    """Encoded chunks in input order, with at most ``2 * workers`` chunks in flight.

    This process is one of the ``workers``: it encodes every ``workers``-th chunk on threads (the
    tokenizer releases the GIL, so reading, parsing and writing overlap the encoding), worker
    processes the others; one worker needs no process at all."""
    workers = max(workers, 1)
    encoder = _Encoder(*encoder_args)
    local = ThreadPoolExecutor(2 if workers == 1 else 1, thread_name_prefix="encode")
    # An executor, not multiprocessing.Pool: a worker that cannot start raises BrokenProcessPool
    # here instead of being respawned forever.
    processes = (
        ProcessPoolExecutor(
            workers - 1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(os.getpid(), *encoder_args),
        )
        if workers > 1
        else None
    )
    try:
        pending: deque = deque()
        for index, chunk in enumerate(chunks):
            if processes is None or index % workers == 0:
                pending.append(local.submit(encoder, chunk))
            else:
                pending.append(processes.submit(_encode_in_worker, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise PrepareError(
            "a tokenizer worker process could not start or died; run with --workers 1 to see why"
        ) from None
    finally:
        local.shutdown(wait=True, cancel_futures=True)
        if processes is not None:
            processes.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C so the cleanup below runs (only possible in the main thread)."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _PairWriter:
    """Appends encoded keys to the open ``.bin`` of one pair and collects its index."""

    def __init__(self, prefix: str, dtype: np.dtype, bin_file: BinaryIO) -> None:
        self.prefix = prefix
        self.bin_file = bin_file
        self.index = IndexWriter(dtype)
        self.bin_sha256 = hashlib.sha256()

    def write(self, encoded: EncodedKey) -> None:
        data = encoded.tokens.tobytes()
        self.bin_file.write(data)
        self.bin_sha256.update(data)
        self.index.add_documents(encoded.sequence_lengths, encoded.sequences_per_document)


def output_prefix_for(output_prefix: str, key: str, split_sentences: bool) -> str:
    return f"{output_prefix}_{key}_{'sentence' if split_sentences else 'document'}"


def prepare_data(
    inputs: list[str],
    output_prefix: str,
    tokenizer: Any,
    json_keys: list[str] | None = None,
    append_eod: bool = False,
    split_sentences: bool = False,
    language: str = "en",
    workers: int = 1,
    on_error: OnError = "fail",
    text_mode: TextMode | None = None,
    chunk_bytes: int = 1 << 20,
    progress: Callable[[PrepareStats, int], None] | None = None,
) -> PrepareResult:
    """Tokenize ``inputs`` into ``{output_prefix}_{key}_{document|sentence}.bin/.idx`` (+ manifest).

    ``tokenizer`` is a loaded :class:`mtk.data.tokenizer.Tokenizer`. ``progress(stats, total_bytes)``
    is called after each chunk. Raises :class:`PrepareError` on bad input with ``on_error="fail"``.
    """
    keys = list(json_keys) if json_keys is not None else ["text"]
    if not keys or not all(key.strip() for key in keys):
        raise PrepareError(f"--json-keys {json_keys}: name the JSON keys to tokenize, e.g. --json-keys text")
    if len(set(keys)) != len(keys):
        raise PrepareError(f"--json-keys lists a key twice: {keys}")
    if append_eod and tokenizer.eod is None:
        raise PrepareError(f"--append-eod: the {tokenizer.kind} tokenizer has no end-of-document token")
    try:
        check_output_prefix(output_prefix)
    except IndexedDatasetError as err:
        raise PrepareError(str(err)) from None
    paths = expand_inputs(inputs, text_mode)
    total_bytes = total_input_bytes(paths)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    prefixes = {key: output_prefix_for(output_prefix, key, split_sentences) for key in keys}
    stats = PrepareStats(
        empty_documents=dict.fromkeys(keys, 0),
        sequences=dict.fromkeys(keys, 0),
        tokens=dict.fromkeys(keys, 0),
    )
    encoder_args = (tokenizer, keys, append_eod, language if split_sentences else None)
    start = time.perf_counter()
    try:
        # every key's .bin, .idx and manifest appear together, or none of them (the old ones stay)
        finals = {key: (bin_path(p), idx_path(p), data_manifest_path(p)) for key, p in prefixes.items()}
        with _sigterm_as_interrupt(), atomic_outputs([f for key in keys for f in finals[key]]) as temporaries:
            staged = dict(zip([f for key in keys for f in finals[key]], temporaries, strict=True))
            with contextlib.ExitStack() as files:
                writers = {
                    key: _PairWriter(
                        prefix,
                        dtype,
                        files.enter_context(open(staged[finals[key][0]], "wb", buffering=1 << 24)),
                    )
                    for key, prefix in prefixes.items()
                }
                chunks = read_chunks(paths, keys, text_mode, chunk_bytes)
                for encoded in _encode_all(chunks, encoder_args, workers):
                    _account(encoded, stats, on_error)
                    for key, writer in writers.items():
                        writer.write(encoded.keys[key])
                        stats.sequences[key] += len(encoded.keys[key].sequence_lengths)
                        stats.tokens[key] += len(encoded.keys[key].tokens)
                        stats.empty_documents[key] += int(
                            (encoded.keys[key].sequences_per_document == 0).sum()
                        )
                    stats.seconds = time.perf_counter() - start
                    if progress is not None:
                        progress(stats, total_bytes)
            stats.seconds = time.perf_counter() - start
            manifests = {}
            for key, writer in writers.items():
                bin_file, idx_file, manifest_file = (staged[path] for path in finals[key])
                idx_file.write_bytes(writer.index.to_bytes())
                manifests[key] = _write_data_manifest(
                    manifest_file, key, tokenizer, dtype, paths, stats, writer,
                    {bin_file: finals[key][0], idx_file: finals[key][1]}, split_sentences, language, append_eod,
                )  # fmt: skip
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, f"{output_prefix}_*") from None  # a write: name the outputs
    return PrepareResult(outputs=prefixes, stats=stats, manifests=manifests)


def _account(encoded: EncodedChunk, stats: PrepareStats, on_error: OnError) -> None:
    if encoded.errors:
        line, message = encoded.errors[0]
        if on_error == "fail":
            raise PrepareError(
                f"{encoded.source}:{line}: {message}\n"
                "Fix the line, or pass --on-error skip to drop bad lines (they are counted and reported)."
            )
        stats.skipped_lines += len(encoded.errors)
        for line, message in encoded.errors[: max(0, 5 - len(stats.skipped_examples))]:
            stats.skipped_examples.append(f"{encoded.source}:{line}: {message}")
    stats.documents += encoded.documents
    stats.input_bytes += encoded.input_bytes
    stats.text_bytes += encoded.text_bytes


def _write_data_manifest(
    manifest_file: Path,
    key: str,
    tokenizer: Any,
    dtype: np.dtype,
    paths: list[Path],
    stats: PrepareStats,
    writer: _PairWriter,
    outputs: dict[Path, Path],
    split_sentences: bool,
    language: str,
    append_eod: bool,
) -> dict[str, Any]:
    """Write the manifest of ``writer``'s pair to ``manifest_file``; ``outputs`` maps the staged
    .bin and .idx to the paths they are published under, which the manifest records."""
    (bin_file, bin_final), (idx_file, idx_final) = outputs.items()
    bin_entry = {**describe_file(bin_file, with_hash=False), "path": str(bin_final.resolve())}
    bin_entry["sha256"] = writer.bin_sha256.hexdigest()
    idx_entry = {**describe_file(idx_file), "path": str(idx_final.resolve())}
    prefix = writer.prefix
    return write_manifest(
        manifest_file,
        stage="prepare-data",
        prefix=str(Path(prefix).resolve()),
        json_key=key,
        level="sentence" if split_sentences else "document",
        tokenizer=tokenizer.describe(),
        vocab_size=tokenizer.vocab_size,
        eod=tokenizer.eod,
        dtype=str(dtype),
        append_eod=append_eod,
        sentence_splitter=f"sentencex ({language})" if split_sentences else None,
        counts={
            "documents": stats.documents,
            "empty_documents": stats.empty_documents[key],
            "sequences": stats.sequences[key],
            "tokens": stats.tokens[key],
            "skipped_lines": stats.skipped_lines,
        },
        inputs=[describe_file(p, with_hash=False) for p in paths],
        outputs=[bin_entry, idx_entry],
    )
