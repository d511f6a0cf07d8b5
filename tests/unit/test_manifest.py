"""Manifests: inheriting values from the data a run is given, and refusing what conflicts."""

from __future__ import annotations

import json

import pytest

from mtk.config import ConfigError, RunConfig
from mtk.data.prepared import data_facts
from mtk.manifest import ManifestError, data_manifest_path, inherit, write_manifest
from mtk.train.run import resolve_vocab

TOKENIZER = {"kind": "null", "vocab_size": 65, "eod": 64, "files": []}


def test_inherit_takes_the_explicit_value_only_when_it_agrees():
    assert inherit("--vocab-size", 65, None, "m.json") == 65
    assert inherit("--vocab-size", None, 70, "m.json") == 70
    assert inherit("--vocab-size", 65, 65, "m.json") == 65
    with pytest.raises(ManifestError, match="explicit value 70 conflicts with 65 recorded in m.json"):
        inherit("--vocab-size", 65, 70, "m.json")


def prepared(write_corpus, name: str, tokenizer: dict) -> str:
    prefix = write_corpus(name, [[1, 2, 3]] * 4)
    write_manifest(data_manifest_path(prefix), stage="prepare-data", tokenizer=tokenizer,
                   vocab_size=tokenizer["vocab_size"], eod=tokenizer["eod"])  # fmt: skip
    return prefix


def test_a_run_inherits_vocabulary_and_eod_from_its_data(write_corpus):
    first = prepared(write_corpus, "first", TOKENIZER)
    second = prepared(write_corpus, "second", TOKENIZER)
    facts = data_facts(f"0.5 {first} 0.5 {second}")
    assert (facts.vocab_size, facts.eod, facts.tokenizer) == (65, 64, TOKENIZER)
    assert [m["prefix"] for m in facts.manifests] == [first, second]
    config = resolve_vocab(RunConfig(), facts, None)
    assert config.model.vocab_size == 65
    with pytest.raises(ManifestError, match="conflicts with 65"):
        resolve_vocab(RunConfig(), facts, 100)


def test_blends_of_different_tokenizers_and_unreadable_manifests_are_refused(write_corpus, tmp_path):
    first = prepared(write_corpus, "first", TOKENIZER)
    other = prepared(write_corpus, "other", {**TOKENIZER, "vocab_size": 99})
    with pytest.raises(ManifestError, match="prepared with different tokenizers"):
        data_facts(f"0.5 {first} 0.5 {other}")
    data_manifest_path(other).write_text("[1, 2")
    with pytest.raises(ManifestError, match="other.mtk.json: manifest is not valid JSON"):
        data_facts(other)


def test_data_prepared_elsewhere_needs_an_explicit_vocabulary(write_corpus):
    prefix = write_corpus("megatron", [[1, 2, 3]] * 4)  # no manifest, as Megatron writes it
    facts = data_facts(prefix)
    assert facts.manifests == [] and facts.vocab_size is None
    with pytest.raises(ConfigError, match="give --vocab-size"):
        resolve_vocab(RunConfig(), facts, None)
    assert resolve_vocab(RunConfig(), facts, 50).model.vocab_size == 50
    assert json.loads(json.dumps(RunConfig().to_dict()))["data"]["split"] == "969,30,1"  # Megatron's default
