"""Sampling filters and generation with the KV cache."""

from __future__ import annotations

import pytest
import torch

from mtk.generate import filter_logits, generate
from mtk.models.gpt import GPTModel
from mtk.presets import load_preset


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    kept = lambda out: torch.isfinite(out).nonzero().flatten().tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [0, 1]
    assert kept(filter_logits(logits, top_p=0.6)) == [0, 1]  # 0.5 < 0.6, so the second token is needed
    assert kept(filter_logits(logits, top_p=0.5)) == [0]
    assert kept(filter_logits(logits, top_p=0.86)) == [0, 1, 2, 3]
    assert kept(filter_logits(logits[[3, 0, 4, 1, 2]], top_p=0.6)) == [1, 3]  # order does not matter


def test_greedy_generation_equals_argmax_of_full_forward_passes():
    torch.manual_seed(0)
    model = GPTModel(load_preset("llama-tiny").config.model).eval()
    prompt = [5, 17, 99, 3]
    produced = generate(model, prompt, 12, temperature=0)
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([sequence]))[0, -1, : model.config.vocab_size]
            sequence.append(int(logits.argmax()))
    assert produced == sequence[len(prompt) :]


def test_sampling_is_reproducible_with_a_seed_and_stops_at_eod():
    torch.manual_seed(0)
    model = GPTModel(load_preset("gpt-tiny").config.model).eval()
    first = generate(model, [1, 2, 3], 20, temperature=1.0, top_k=50, seed=7)
    assert first == generate(model, [1, 2, 3], 20, temperature=1.0, top_k=50, seed=7)
    stop = first[5]
    assert generate(model, [1, 2, 3], 20, temperature=1.0, top_k=50, seed=7, eod=stop)[-1] == stop
    limit = model.config.max_position_embeddings
    assert len(generate(model, list(range(limit - 4)), 50, temperature=0)) == 4  # the context is the limit


def test_greedy_seq2seq_answers_equal_argmax_of_uncached_decoding():
    from mtk.generate import generate_seq2seq
    from mtk.models.t5 import T5Model

    torch.manual_seed(0)
    config = load_preset("t5-tiny").config.model
    config.decoder_num_layers = config.decoder_num_layers or config.num_layers
    model = T5Model(config).eval()
    tokens = torch.randint(5, 100, (2, 12))
    mask = torch.ones_like(tokens)
    mask[1, 8:] = 0
    bos, eos = 1, 2
    answers = generate_seq2seq(model, tokens, mask, bos, eos, 6)
    with torch.no_grad():
        encoded = model.encode(tokens, mask)
        for row in range(2):
            decoded = [bos]
            for _ in range(6):
                logits = model.decode(encoded[row : row + 1], torch.tensor([decoded]), mask[row : row + 1])
                decoded.append(int(logits[0, -1, : config.vocab_size].argmax()))
                if decoded[-1] == eos:
                    break
            expected = decoded[1:]
            assert answers[row] == (expected[:-1] if expected[-1] == eos else expected)


def test_each_family_says_how_it_generates_and_bert_does_not():
    import pytest

    from mtk.config import ConfigError
    from mtk.generate import generation_strategy
    from mtk.models import family_spec
    from mtk.models.generation import CachedDecoding, EncoderDecoderDecoding, RetrievalDecoding

    kinds = {name: type(family_spec(name).generation) for name in ("gpt", "t5", "retro")}
    assert kinds == {"gpt": CachedDecoding, "t5": EncoderDecoderDecoding, "retro": RetrievalDecoding}
    assert [family_spec(name).generation.needs_retrieval for name in ("gpt", "t5", "retro")] == [0, 0, 1]
    assert family_spec("bert").generation is None
    with pytest.raises(ConfigError, match="a bert model does not generate text token by token"):
        generation_strategy(load_preset("bert-tiny").config.model)


def test_every_hf_adapter_resolves_to_the_spec_that_declares_it():
    import pytest

    from mtk.hf import HFError, adapters, architecture, for_config
    from mtk.models import family_names, family_spec

    declared = {a.model_type: name for name in family_names() for a in family_spec(name).hf_adapters}
    assert declared == {"llama": "gpt", "gpt2": "gpt", "bert": "bert", "megatron-bert": "bert", "t5": "t5"}
    assert list(adapters()) == list(declared)
    for model_type, family in declared.items():
        adapter = architecture(model_type)
        assert adapter in family_spec(family).hf_adapters and adapter.model_type == model_type
    for preset, model_type in (("llama-tiny", "llama"), ("gpt-tiny", "gpt2")):
        config = load_preset(preset).config.model
        assert for_config(config).model_type == model_type
        assert for_config(config) in family_spec(config.family).hf_adapters
    bert = load_preset("bert-tiny").config.model
    for post_norm, model_type in ((True, "bert"), (False, "megatron-bert")):
        bert.post_norm = post_norm
        assert for_config(bert).model_type == model_type
    t5 = load_preset("t5-tiny").config.model  # Megatron's T5: not Google's (learned positions, biases)
    with pytest.raises(HFError, match="only a Google-T5-shaped model"):
        for_config(t5).hf_config(t5)
    retro = load_preset("retro-tiny").config.model
    with pytest.raises(HFError, match="a retro model has no Hugging Face export in mtk"):
        for_config(retro)


def test_the_retriever_requirement_of_mtk_generate_comes_from_the_strategy(monkeypatch, capsys):
    """stages/generate.py asks the strategy, never the family name: a GPT family whose strategy
    retrieves needs --retro-project, and with its own strategy refuses one."""
    from types import SimpleNamespace

    import pytest
    import typer

    from mtk.models.generation import RetrievalDecoding
    from mtk.models.gpt import GPTFamily
    from stages.generate import _retriever

    model = SimpleNamespace(config=load_preset("gpt-tiny").config.model)
    assert _retriever(model, None) is None
    with pytest.raises(typer.Exit):
        _retriever(model, "project")
    assert "--retro-project is for RETRO runs; this run is a gpt model" in capsys.readouterr().err
    monkeypatch.setattr(GPTFamily, "generation", RetrievalDecoding())
    with pytest.raises(typer.Exit):
        _retriever(model, None)
    assert "give --retro-project DIR" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_a_static_kv_cache_gives_the_logits_of_the_dynamic_one(name):
    """The static cache (tensor length, attention over every position, the unwritten ones masked) that
    a compiled step runs on, eager here: the prompt, then one token at a time, two rows."""
    torch.manual_seed(0)
    model = GPTModel(load_preset(name).config.model).eval()
    tokens = torch.randint(0, 4000, (2, 14))
    with torch.no_grad():
        logits = []
        for static in (False, True):
            caches = model.new_kv_caches(2, 20, static=static)
            pieces = [model(tokens[:, :8], kv_caches=caches)]
            pieces += [model(tokens[:, i : i + 1], kv_caches=caches) for i in range(8, 14)]
            logits.append(torch.cat(pieces, dim=1))
    assert int(caches[0].length) == 14
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)
