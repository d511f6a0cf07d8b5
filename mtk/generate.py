"""Text generation from a trained run: greedy, top-k and top-p (nucleus) sampling.

The sampling loop is the same for every family; how the model runs at each step (a KV cache, with
retrieved neighbours, an encoder-decoder) is its family's generation strategy
(``TrainableFamily.generation``, ``mtk.models.generation``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtk.checkpoint import checkpoint_description, load_checkpoint
from mtk.config import ConfigError, ModelConfig, RunConfig
from mtk.models import family_spec
from mtk.models.generation import GenerationStrategy, Retrieve, Step


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, Any]:
    """The model of a run directory's latest checkpoint, and its tokenizer (None for mock-data runs);
    both as the checkpoint describes them."""
    from mtk.data.tokenizer import tokenizer_from_manifest

    description = checkpoint_description(run_dir)
    config = RunConfig.from_dict(description["config"], where=f"{run_dir} (checkpoint config)")
    family = family_spec(config.model.family)
    if family.generation is None or not family.generation.continues_text:
        raise ConfigError(f"{run_dir}: a {config.model.family} model does not generate text token by token")
    from mtk.train.build import build_model

    # as every command builds it (mtk.train.build), for forward use: no FP8, recomputation or sharding
    model = build_model(config, device, training=False).module
    model.load_state_dict(load_checkpoint(run_dir)["model"])
    entry = description.get("tokenizer")
    tokenizer = tokenizer_from_manifest(entry) if entry else None
    return model.to(device).eval(), tokenizer


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits with everything outside the top-k and outside the top-p probability mass set to -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probabilities = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = probabilities.cumsum(-1) - probabilities >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def generation_strategy(config: ModelConfig) -> GenerationStrategy:
    """How a model of ``config`` generates (its family's strategy); ConfigError for a family that does
    not generate."""
    strategy = family_spec(config.family).generation
    if strategy is None:
        raise ConfigError(f"a {config.family} model does not generate text token by token")
    return strategy


def _decode(
    step: Step,
    start: torch.Tensor,
    steps: int,
    choose: Callable[[torch.Tensor], torch.Tensor],
    end: int | None,
) -> list[list[int]]:
    """The sampling loop: up to ``steps`` tokens after each row of ``start`` (batch, tokens), each the
    one ``choose`` picks from the row's next-token logits (float32, padded vocabulary); a row ends with
    its ``end`` token (kept), the loop when every row has ended."""
    sequence = new = start
    done = torch.zeros(start.shape[0], dtype=torch.bool, device=start.device)
    produced: list[list[int]] = [[] for _ in range(start.shape[0])]
    for _ in range(steps):
        token = choose(step(new, sequence).float())
        for row, value in enumerate(token.tolist()):
            if not done[row]:
                produced[row].append(value)
        if end is not None:
            done = done | (token == end)
        if bool(done.all()):
            break
        new = token[:, None]
        sequence = torch.cat([sequence, new], dim=1)
    return produced


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eod: int | None = None,
    seed: int | None = None,
    retrieve: Retrieve | None = None,
    compile: bool = False,
) -> list[int]:
    """Continue ``prompt``; ``temperature=0`` is greedy. Stops at ``eod`` or the model's context length.

    How the model runs each step is its family's strategy: a KV cache (GPT), or (RETRO, which needs
    ``retrieve``: the neighbour tokens of a sequence) a KV cache and the encoded neighbours of its
    complete chunks, retrieved as each chunk completes. ``compile``: a compiled one-token step on a static KV cache,
    where the strategy ``compiles`` (else eager)."""
    strategy = generation_strategy(model.config)
    if not strategy.continues_text:
        raise ValueError(f"a {model.config.family} model generates from an encoder input, not a prompt")
    if not prompt:
        raise ValueError("the prompt is empty")
    vocab = model.config.vocab_size
    outside = [token for token in prompt if not 0 <= token < vocab]
    if outside:
        raise ValueError(
            f"token id {outside[0]} is outside the model's vocabulary of {vocab} tokens (0 to {vocab - 1})"
        )
    limit = model.config.max_position_embeddings
    if len(prompt) >= limit:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {limit}")
    if retrieve is not None and not strategy.needs_retrieval:
        raise ValueError(f"a {model.config.family} model does not retrieve neighbours")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    total = min(len(prompt) + max_new_tokens, limit)
    step = strategy.start(model, 1, total, retrieve=retrieve, compile=compile and strategy.compiles)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        logits = logits[:, :vocab]  # never sample vocabulary padding
        if temperature == 0:
            return logits.argmax(-1)
        probabilities = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
        return torch.multinomial(probabilities, 1, generator=generator)[:, 0]

    return _decode(step, torch.tensor([prompt], device=device), total - len(prompt), choose, eod)[0]


@torch.no_grad()
def generate_seq2seq(
    model: nn.Module,
    encoder_tokens: torch.Tensor,
    encoder_mask: torch.Tensor,
    bos: int,
    eos: int,
    max_new_tokens: int,
    compile: bool = False,
    choose: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[list[int]]:
    """Greedy answers of an encoder-decoder (T5) for a batch, through its family's strategy (the
    encoder runs once, the decoder token by token on a KV cache, compiled on a static one with
    ``compile``); each answer ends before its ``eos`` (or after ``max_new_tokens``). ``choose``:
    the next tokens from the logits (batch, vocabulary), instead of the most likely ones."""
    strategy = generation_strategy(model.config)
    if strategy.continues_text:
        raise ValueError(f"a {model.config.family} model continues a prompt; it has no encoder input")
    batch = encoder_tokens.shape[0]
    limit = min(max_new_tokens, model.config.max_position_embeddings - 1)
    step = strategy.start(
        model,
        batch,
        limit + 1,
        encoder_tokens=encoder_tokens,
        encoder_mask=encoder_mask,
        compile=compile and strategy.compiles,
    )
    vocab = model.config.vocab_size
    start = torch.full((batch, 1), bos, device=encoder_tokens.device)
    pick = choose or (lambda logits: logits.argmax(-1))
    answers = _decode(step, start, limit, lambda logits: pick(logits[:, :vocab]), eos)
    return [answer[:-1] if answer and answer[-1] == eos else answer for answer in answers]
