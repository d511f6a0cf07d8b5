"""`mtk tokenizer train` end to end: inputs of every kind, outputs, summary, and user errors."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mtk.data.tokenizer import load_tokenizer
from tests.conftest import invoke

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A directory with a plain-text file and a gzipped JSONL file whose text is under "body"."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog naïve café Zürich 東京 don't it's 2024".split()
    lines = [" ".join(rng.choices(words, k=12)) for _ in range(1500)]
    (folder / "a.txt").write_text("\n".join(lines[:1000]) + "\n", encoding="utf-8")
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as out:
        for line in lines[1000:]:
            out.write(json.dumps({"body": f"{line} Quetzalcoatlus", "text": 7}) + "\n")
    return folder


def train(*args, code: int = 0):
    """``mtk tokenizer train ARGS``'s result, after checking its exit code."""
    return invoke("tokenizer", "train", *args, code=code)


def test_train_bpe_from_a_directory_of_text_and_jsonl(corpus, tmp_path):
    out = tmp_path / "bpe"
    result = train(corpus, "--kind", "bpe", "--vocab-size", 400, "--out", out, "--json-key", "body")
    assert sorted(p.name for p in out.iterdir()) == [
        "merges.txt", "mtk-tokenizer.json", "tokenizer.json", "vocab.json"
    ]  # fmt: skip
    tok = load_tokenizer(out)
    assert (tok.kind, tok.backend) == ("gpt2bpe", "tiktoken") and tok.vocab_size < 400  # a small corpus
    summary = f"trained bpe: {tok.vocab_size} tokens, eod {tok.vocab_size - 1}, encodes with tiktoken"
    assert summary in result.output and f"supports {tok.vocab_size} of the 400 tokens" in result.output
    assert f"mtk prepare-data INPUT... -o PREFIX --tokenizer {out} --append-eod" in result.output
    assert len(tok.encode(" Quetzalcoatlus")) == 1  # learned from the JSONL field
    manifest = json.loads((out / "mtk-tokenizer.json").read_text())
    assert [Path(i["path"]).name for i in manifest["inputs"]] == ["a.txt", "b.jsonl.gz"]


def test_train_wordpiece_cased(corpus, tmp_path):
    out = tmp_path / "wp"
    result = train(corpus / "a.txt", "--kind", "wordpiece", "--vocab-size", 200, "--out", out, "--cased")
    assert sorted(p.name for p in out.iterdir()) == ["mtk-tokenizer.json", "vocab.txt"]
    assert ", cased, eod 3, encodes with tokenizers" in result.output and "--split-sentences" in result.output
    tok = load_tokenizer(out)
    assert (tok.kind, tok.lower_case) == ("wordpiece", False)


def test_refuses_a_non_empty_output_unless_overwriting_its_own(corpus, tmp_path):
    out = tmp_path / "tok"
    args = (corpus / "a.txt", "--kind", "bpe", "--vocab-size", 280, "--out", out)
    train(*args)
    again = train(*args, code=2)
    assert "directory is not empty" in again.output and "--overwrite" in again.output
    train(*args, "--overwrite")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    other = train(
        corpus / "a.txt",
        "--kind",
        "bpe",
        "--vocab-size",
        280,
        "--out",
        tmp_path / "mine",
        "--overwrite",
        code=2,
    )
    assert "not written by `mtk tokenizer train`" in other.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_user_errors_write_nothing(corpus, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    cases = [
        (
            (tmp_path / "nope.txt", "--kind", "bpe", "--vocab-size", 300),
            "nope.txt: no such file or directory",
        ),
        ((tmp_path / "empty.txt", "--kind", "bpe", "--vocab-size", 300), "the corpus is empty"),
        ((corpus / "a.txt", "--kind", "bpe", "--vocab-size", 100), "vocab_size 100 is too small for bpe"),
        ((corpus / "a.txt", "--kind", "bpe", "--vocab-size", 300, "--cased"), "are for --kind wordpiece"),
        ((corpus / "b.jsonl.gz", "--kind", "bpe", "--vocab-size", 300), "holds int, expected text"),
    ]
    for args, message in cases:
        result = train(*args, "--out", tmp_path / "out", code=2)
        assert message in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


def test_help_explains_every_option_without_heavy_imports():
    code = (
        "import sys; from tests.conftest import invoke;"
        "r = invoke('tokenizer', 'train', '--help', terminal_width=200); print(r.output);"
        "print('HEAVY', sorted(m for m in ('numpy', 'tokenizers', 'tiktoken') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    for option in (
        "--kind",
        "--vocab-size",
        "--out",
        "--lower-case",
        "--cased",
        "--min-frequency",
        "--json-key",
    ):
        assert option in out
    assert "--overwrite" in out and "HEAVY []" in out
