"""RETRO generation on its cache (decoder KV cache, neighbours encoded once per chunk) against the
whole-sequence forward: same logits at every step, same greedy tokens, retrieval only as chunks complete."""

from __future__ import annotations

import pytest
import torch

from mtk.config import ModelConfig, apply_overrides
from mtk.generate import generate
from mtk.models.generation import RetrievalDecoding
from mtk.models.retro import RetroModel
from mtk.presets import load_preset

CHUNK = 4  # retro-tiny with short chunks: a generation crosses many chunk boundaries


def tiny_config(**overrides) -> ModelConfig:
    sections = load_preset("retro-tiny").sections
    return apply_overrides(sections, {"retro_chunk_length": CHUNK, **overrides}).model


class FakeRetriever:
    """Deterministic neighbour tokens (1, chunks, k, 2m): each complete chunk's from its own tokens (as
    a real index would find them), an incomplete last chunk's end-of-document tokens (0); it records
    the sequence lengths it was called with."""

    def __init__(self, config: ModelConfig) -> None:
        self.k, self.vocab, self.calls = config.retro_num_neighbors, config.vocab_size, []

    def __call__(self, tokens: list[int]) -> torch.Tensor:
        self.calls.append(len(tokens))
        chunks, complete = -(-len(tokens) // CHUNK), len(tokens) // CHUNK
        keys = torch.tensor(tokens[: complete * CHUNK]).view(complete, 1, 1, CHUNK).sum(-1)
        span = torch.arange(self.k * 2 * CHUNK).view(1, self.k, 2 * CHUNK)
        neighbours = torch.zeros(chunks, self.k, 2 * CHUNK, dtype=torch.long)
        neighbours[:complete] = (keys * 7 + span) % self.vocab
        return neighbours[None]


@pytest.mark.parametrize(
    ("overrides", "prompt_length"),
    [({}, 6), ({}, 2), ({"position_embedding_type": "rope", "num_query_groups": 2}, 9)],
)
def test_cached_steps_give_the_whole_sequence_logits_and_greedy_tokens(overrides, prompt_length):
    torch.manual_seed(0)
    config = tiny_config(**overrides)
    model = RetroModel(config).eval()
    retrieve, reference = FakeRetriever(config), FakeRetriever(config)
    sequence = torch.randint(1, config.vocab_size, (1, prompt_length))
    new_tokens = 3 * CHUNK + 3  # crosses more than three chunk boundaries
    step = RetrievalDecoding().start(model, 1, prompt_length + new_tokens, retrieve=retrieve)
    new = sequence
    with torch.no_grad():
        for _ in range(new_tokens):
            cached = step(new, sequence)
            whole = model(sequence, neighbours=reference(sequence[0].tolist()))[:, -1]
            torch.testing.assert_close(cached, whole, atol=1e-5, rtol=0)
            new = whole[:, : config.vocab_size].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, new], dim=1)
    # retrieval at the first step, then only at the steps that complete a chunk
    steps = retrieve.calls
    assert steps[0] == prompt_length and all(length % CHUNK == 0 for length in steps[1:])
    assert len(steps) == 1 + (prompt_length + new_tokens - 1) // CHUNK - prompt_length // CHUNK

    produced = generate(
        model, sequence[0, :prompt_length].tolist(), new_tokens, temperature=0, retrieve=retrieve
    )
    assert produced == sequence[0, prompt_length:].tolist()


def test_a_sequence_run_in_pieces_on_the_cache_gives_the_whole_forward():
    """Several tokens a call (as a prompt), pieces starting and ending anywhere in a chunk, two rows."""
    torch.manual_seed(0)
    config = tiny_config()
    model = RetroModel(config).eval()
    tokens = torch.randint(1, config.vocab_size, (2, 23))
    neighbours = torch.cat([FakeRetriever(config)(row.tolist()) for row in tokens])
    cache = model.new_cache(2, 23)
    with torch.no_grad():
        pieces = [model(tokens[:, a:b], neighbours=neighbours, cache=cache) for a, b in
                  ((0, 2), (2, 3), (3, 10), (10, 11), (11, 12), (12, 23))]  # fmt: skip
        whole = model(tokens, neighbours=neighbours)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=0)
    assert cache.length == 23 and cache.encoded.shape[1] == 5 and cache.states.shape[1] == 3
