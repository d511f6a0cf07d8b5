"""``mtk merge-data``: concatenate several prepared .bin/.idx pairs into one."""

from __future__ import annotations

SUMMARY = "Merge several prepared .bin/.idx datasets into one (same tokenizer, same dtype)."


def merge_data() -> None:
    pass
