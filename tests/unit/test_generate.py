"""Sampling filters and generation with the KV cache."""

from __future__ import annotations

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
