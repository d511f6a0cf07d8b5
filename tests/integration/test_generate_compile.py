"""`mtk generate --compile`: the one-token step compiled on a static KV cache (mtk/models/generation.py).

Tolerance: compiled and eager fp32 logits agree within 1e-4 (absolute and relative; inductor reorders
reductions), and greedy tokens are the same token for token. Every one-token step has the same
shapes, so a generation compiles one graph.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from mtk.generate import generate, generate_seq2seq, generation_strategy
from mtk.models import family_spec
from mtk.models.gpt import GPTModel
from mtk.presets import load_preset

TOLERANCE = 1e-4


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # each test in its own state, as in its own process
    counters.clear()


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_compiled_steps_give_the_eager_logits_two_rows_and_compile_once(name):
    torch.manual_seed(0)
    model = GPTModel(load_preset(name).config.model).eval()
    strategy = generation_strategy(model.config)
    sequence = new = torch.randint(0, 4000, (2, 6))
    logits: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    with torch.no_grad():
        steps = {compiled: strategy.start(model, 2, 30, compile=compiled) for compiled in logits}
        for _ in range(24):  # the prompt (eager on the static cache), then 23 compiled one-token steps
            for compiled, step in steps.items():
                logits[compiled].append(step(new, sequence))
            new = logits[False][-1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, new], dim=1)
    torch.testing.assert_close(
        torch.stack(logits[True]), torch.stack(logits[False]), atol=TOLERANCE, rtol=TOLERANCE
    )
    assert graphs() == 1


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_compiled_greedy_generation_equals_eager_token_for_token(name):
    torch.manual_seed(0)
    model = GPTModel(load_preset(name).config.model).eval()
    for prompt in ([5, 17, 99, 3], [7]):  # a one-token prompt: its first step is compiled too
        eager = generate(model, prompt, 40, temperature=0)
        assert generate(model, prompt, 40, temperature=0, compile=True) == eager


def test_compiled_t5_answers_equal_eager_ones():
    from mtk.models.t5 import T5Model

    torch.manual_seed(0)
    config = load_preset("t5-tiny").config.model
    config.decoder_num_layers = config.decoder_num_layers or config.num_layers
    model = T5Model(config).eval()
    tokens = torch.randint(5, 100, (3, 12))
    mask = torch.ones_like(tokens)
    mask[1, 8:] = 0
    eager = generate_seq2seq(model, tokens, mask, 1, 2, 16)
    assert generate_seq2seq(model, tokens, mask, 1, 2, 16, compile=True) == eager
    assert graphs() == 1


def test_retro_generates_eager():
    assert [family_spec(name).generation.compiles for name in ("gpt", "t5", "retro")] == [True, True, False]
