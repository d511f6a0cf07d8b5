"""`mtk merge-data`: concatenation with a manifest, and refusal to mix tokenizers."""

from __future__ import annotations

import json

from mtk.data.indexed import IndexedDataset
from mtk.data.prepare import prepare_data
from mtk.data.tokenizer import load_tokenizer
from mtk.manifest import read_manifest
from tests.conftest import invoke


def prepared(tmp_path, name, texts, vocab_size=50):
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return prepare_data(
        [str(src)], str(tmp_path / name), load_tokenizer("null", vocab_size=vocab_size)
    ).outputs["text"]


def test_merge_concatenates_and_records_the_tokenizer(tmp_path):
    a = prepared(tmp_path, "a", ["1 2", "3"])
    b = prepared(tmp_path, "b", ["", "4 5 6"])
    invoke("merge-data", a, b, "-o", tmp_path / "all")
    merged = IndexedDataset(tmp_path / "all")
    assert [[t for s in merged.document(d) for t in s.tolist()] for d in range(4)] == [
        [1, 2],
        [3],
        [],
        [4, 5, 6],
    ]
    manifest = read_manifest(tmp_path / "all.mtk.json")
    assert manifest["stage"] == "merge-data" and manifest["tokenizer"]["kind"] == "null"
    assert manifest["counts"] == {"documents": 4, "sequences": 3, "tokens": 6}


def test_merge_refuses_different_tokenizers(tmp_path):
    a = prepared(tmp_path, "a", ["1 2"], vocab_size=50)
    b = prepared(tmp_path, "b", ["1 2"], vocab_size=60)
    result = invoke("merge-data", a, b, "-o", tmp_path / "all", code=2)
    assert "prepared with different tokenizers" in result.output
    assert not (tmp_path / "all.bin").exists()
