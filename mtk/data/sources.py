"""Input discovery and streaming for preprocessing: JSONL (plain/.gz/.zst), Parquet, plain text.

Everything is read in bounded chunks so memory does not grow with the corpus. Chunks keep their
file and first line number so errors found later (in worker processes) can say ``file:line``.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED_SUFFIXES = (".gz", ".zst")
PARQUET_SUFFIXES = (".parquet", ".pq")
TextMode = Literal["file", "line"]


class InputError(ValueError):
    """Input files are missing, of an unknown kind, or unreadable."""


@dataclass
class Chunk:
    """A bounded piece of one input file, in reading order."""

    source: str
    first_line: int  # 1-based line (JSONL/text), row (Parquet) or file number of items[0]
    format: Literal["jsonl", "records"]
    items: list[Any]  # raw JSON lines (bytes) for "jsonl"; {key: value} dicts for "records"
    input_bytes: int  # bytes of the input file consumed by this chunk (compressed size if compressed)
    text_bytes: int  # uncompressed bytes of text in this chunk


def input_format(path: Path, text_mode: TextMode | None) -> str:
    name = path.name.lower()
    for suffix in COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if text_mode is not None:
        return "text"
    raise InputError(
        f"{path}: not JSONL ({'/'.join(JSONL_SUFFIXES)}) or Parquet; for plain text pass "
        "--text-mode file (one document per file) or --text-mode line (one per line)"
    )


def expand_inputs(inputs: list[str], text_mode: TextMode | None = None) -> list[Path]:
    """Files named by the inputs (file, directory searched recursively, or glob), sorted, de-duplicated."""
    found: list[Path] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            candidates = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if text_mode is None:
                candidates = [p for p in candidates if _known_structured(p)]
            if not candidates:
                raise InputError(f"{path}: directory holds no input files")
            found.extend(candidates)
        elif glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not matches:
                raise InputError(f"{spec}: glob matches no files")
            found.extend(matches)
        else:
            raise InputError(f"{spec}: no such file or directory")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    for path in unique:
        input_format(path, text_mode)  # fail early on unknown kinds
    return unique


def _known_structured(path: Path) -> bool:
    try:
        return input_format(path, None) in ("jsonl", "parquet")
    except InputError:
        return False


class _CountingReader(io.RawIOBase):
    """Wraps a binary file and counts the bytes read from it (compressed progress)."""

    def __init__(self, raw: io.BufferedReader) -> None:
        self.raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(buffer)
        self.count += n or 0
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _open_binary(path: Path) -> tuple[io.BufferedIOBase, _CountingReader]:
    counter = _CountingReader(open(path, "rb"))  # noqa: SIM115 - closed by the caller
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=counter, mode="rb"), counter
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            counter.close()
            raise InputError(
                f"{path}: reading .zst needs the zstandard package (pip install zstandard)"
            ) from None
        reader = zstandard.ZstdDecompressor().stream_reader(counter, read_across_frames=True)
        return io.BufferedReader(reader, buffer_size=1 << 20), counter
    return io.BufferedReader(counter, buffer_size=1 << 20), counter


def read_chunks(
    paths: list[Path],
    keys: list[str],
    text_mode: TextMode | None = None,
    chunk_bytes: int = 1 << 20,
) -> Iterator[Chunk]:
    """Stream every input file as chunks of about ``chunk_bytes`` of text."""
    for path in paths:
        kind = input_format(path, text_mode)
        if kind == "jsonl":
            yield from _jsonl_chunks(path, chunk_bytes)
        elif kind == "parquet":
            yield from _parquet_chunks(path, keys, chunk_bytes)
        elif text_mode == "line":
            yield from _text_line_chunks(path, keys, chunk_bytes)
        else:
            yield from _text_file_chunks(path, keys)


def _jsonl_chunks(path: Path, chunk_bytes: int) -> Iterator[Chunk]:
    stream, counter = _open_binary(path)
    with stream, counter:
        line_number, consumed = 1, 0
        try:
            while lines := stream.readlines(chunk_bytes):
                yield Chunk(
                    str(path), line_number, "jsonl", lines, counter.count - consumed, sum(map(len, lines))
                )
                consumed = counter.count
                line_number += len(lines)
        except (OSError, EOFError) as err:  # corrupt gzip/zstd stream
            raise InputError(f"{path}: cannot decompress after line {line_number - 1}: {err}") from None


def _text_line_chunks(path: Path, keys: list[str], chunk_bytes: int) -> Iterator[Chunk]:
    """One document per line; lines stay bytes and are decoded (and checked) by the workers."""
    for chunk in _jsonl_chunks(path, chunk_bytes):
        chunk.format = "records"
        chunk.items = [{key: line.rstrip(b"\r\n") for key in keys} for line in chunk.items]
        yield chunk


def _text_file_chunks(path: Path, keys: list[str]) -> Iterator[Chunk]:
    stream, counter = _open_binary(path)
    with stream, counter:
        data = stream.read()
    yield Chunk(str(path), 1, "records", [{key: data for key in keys}], counter.count, len(data))


def _parquet_chunks(path: Path, keys: list[str], chunk_bytes: int) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise InputError(f"{path}: not a readable Parquet file ({err})") from None
    schema = parquet.schema_arrow
    for key in keys:
        if key not in schema.names:
            raise InputError(
                f"{path}: no column '{key}' (columns: {', '.join(schema.names)}); check --json-keys"
            )
    file_bytes = path.stat().st_size
    rows_total = max(parquet.metadata.num_rows, 1)
    # choose a batch size of roughly chunk_bytes of text, from the file's average row size
    uncompressed = sum(
        parquet.metadata.row_group(i).total_byte_size for i in range(parquet.metadata.num_row_groups)
    )
    batch_rows = max(1, int(chunk_bytes / max(uncompressed / rows_total, 1)))
    row = 1
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=keys):
        columns = {key: batch.column(key).to_pylist() for key in keys}
        items = [{key: columns[key][i] for key in keys} for i in range(batch.num_rows)]
        text_bytes = sum(len(v) for c in columns.values() for v in c if isinstance(v, (str, bytes)))
        yield Chunk(str(path), row, "records", items, file_bytes * batch.num_rows // rows_total, text_bytes)
        row += batch.num_rows


def total_input_bytes(paths: list[Path]) -> int:
    return sum(os.path.getsize(p) for p in paths)
