"""``mtk prepare-data``: JSONL / Parquet / text -> Megatron .bin/.idx."""

from __future__ import annotations

SUMMARY = "Tokenize JSONL, Parquet or text into Megatron-compatible .bin/.idx files, fast."


def prepare_data() -> None:
    pass
