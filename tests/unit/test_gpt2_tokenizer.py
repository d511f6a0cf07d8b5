"""`gpt2`: GPT-2's BPE files shipped with mtk, checked against their pinned hashes, and giving the ids
of tiktoken's `gpt2` encoding and of `tokenizers`' byte-level BPE of the same files; no network."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from mtk.data import tokenizer as tokenizer_module
from mtk.data.tokenizer import (
    GPT2_ASSETS,
    GPT2_SHA256,
    TokenizerError,
    detect_kind,
    load_tokenizer,
    tokenizer_from_manifest,
    tokenizer_identity,
)
from mtk.presets import load_preset

SAMPLE = GPT2_ASSETS.parent / "sample.jsonl"
# where tiktoken_ext.openai_public.gpt2 downloads them from: its cache names a file by the URL's sha1
URLS = {
    name: f"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{name}" for name in GPT2_SHA256
}
EDGE_CASES = [
    "",
    "Hello world",
    "don't it's we're they've I'm you'll he'd DON'T 'S 'twas",
    "  leading spaces\tand\ttabs\n\nnew lines   \n  trailing  ",
    "\n\n\n\t\t \u00a0nbsp \u2003em space\r\nwindows\r\n",
    "naïve café, Zürich — déjà vu; e\u0301 (combining) Ærø",
    "東京は日本の首都です。中文 한국어 Москва ٣٤٥ १२३",
    "emoji 🙂👩‍💻 and a flag 🇫🇷 \ufeffBOM \u200bzero width",
    "numbers 12345678901234567890 3.14159 1,000,000 0x1F",
    "before<|endoftext|>after <|endoftext|><|endoftext|> <|endoftext <|startoftext|>",
    "def f(x):\n    return {'a': [1, 2]}  # code\n",
]


@pytest.fixture
def tiktoken_gpt2(tmp_path, monkeypatch) -> tiktoken.Encoding:
    """tiktoken's own `gpt2` encoding (its pattern, special tokens and pinned hashes), read from the
    shipped files placed in its cache; any download fails the test."""
    from tiktoken_ext import openai_public

    for name, url in URLS.items():
        shutil.copy(GPT2_ASSETS / name, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))

    def no_download(url: str) -> bytes:  # tiktoken fetches what its cache lacks or holds with another hash
        raise AssertionError(f"tiktoken tried to download {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_download)
    return tiktoken.Encoding(**openai_public.gpt2())


def tokenizers_gpt2() -> Tokenizer:
    """`tokenizers`' byte-level BPE read straight from the shipped files (not through mtk)."""
    core = Tokenizer(models.BPE.from_file(str(GPT2_ASSETS / "encoder.json"), str(GPT2_ASSETS / "vocab.bpe")))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    return core


def sample_texts() -> list[str]:
    records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    return [record[key] for record in records for key in ("title", "text")]


def test_ids_equal_tiktoken_gpt2_and_tokenizers_bpe(tiktoken_gpt2):
    texts = sample_texts() + EDGE_CASES
    tok = load_tokenizer("gpt2")
    assert (tok.kind, tok.backend, tok.vocab_size, tok.eod) == ("gpt2bpe", "tiktoken", 50257, 50256)
    assert tiktoken_gpt2.n_vocab == 50257 and tiktoken_gpt2.eot_token == 50256
    ids = tok.encode_batch(texts)
    assert ids == [tiktoken_gpt2.encode(text, allowed_special="all") for text in texts]
    encodings = tokenizers_gpt2().encode_batch(texts, add_special_tokens=False)
    assert ids == [encoding.ids for encoding in encodings]
    assert sum(map(len, ids)) > 100_000  # the whole sample, not a few words
    assert tok.encode("Hello world<|endoftext|>") == [15496, 995, 50256]  # GPT-2's ids, as published
    assert [tok.decode(each) for each in ids] == texts


def test_name_resolves_to_the_shipped_files(tmp_path):
    tok = load_tokenizer("gpt2")
    entry = tok.describe()
    assert detect_kind("gpt2") == "gpt2bpe"
    assert {Path(f["path"]).name: f["sha256"] for f in entry["files"]} == GPT2_SHA256
    assert [Path(f["path"]).parent for f in entry["files"]] == [GPT2_ASSETS] * 2
    again = tokenizer_from_manifest(json.loads(json.dumps(entry)))  # how workers and runs reload it
    assert again.backend == "tiktoken" and again.encode("Hello world") == [15496, 995]
    with pytest.raises(TokenizerError, match="'gpt2' is GPT-2's byte-level BPE, of kind gpt2bpe, not hf"):
        load_tokenizer("gpt2", kind="hf")
    # the same files elsewhere (as openai/gpt-2 downloads them) are the same tokenizer, by content
    copy = tmp_path / "openai-gpt2"
    shutil.copytree(GPT2_ASSETS, copy)
    assert detect_kind(copy) == "gpt2bpe"
    assert tokenizer_identity(load_tokenizer(copy).describe()) == tokenizer_identity(entry)


@pytest.mark.parametrize("name", sorted(GPT2_SHA256))
def test_a_corrupted_copy_is_refused_with_both_hashes(name, tmp_path, monkeypatch):
    copy = tmp_path / "gpt2"
    shutil.copytree(GPT2_ASSETS, copy)
    with open(copy / name, "ab") as handle:
        handle.write(b"\n")
    actual = hashlib.sha256((copy / name).read_bytes()).hexdigest()
    monkeypatch.setattr(tokenizer_module, "GPT2_ASSETS", copy)
    message = f"{copy / name}: not GPT-2's {name} as OpenAI published it (sha256 {actual}, expected "
    with pytest.raises(TokenizerError, match=re.escape(message + GPT2_SHA256[name])):
        load_tokenizer("gpt2")
    (copy / name).unlink()
    with pytest.raises(TokenizerError, match=rf"{name} is missing from this mtk installation"):
        load_tokenizer("gpt2")


@pytest.mark.parametrize("name", ["gpt3-345m", "gpt3-857m", "gpt3-175b"])
def test_gpt3_presets_name_gpt2(name):
    preset = load_preset(name)
    assert preset.tokenizer.split()[0] == "gpt2"
    assert preset.config.model.vocab_size == load_tokenizer("gpt2").vocab_size
