"""Text generation from a trained run: greedy, top-k and top-p (nucleus) sampling with a KV cache."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtk.checkpoint import checkpoint_description, load_checkpoint
from mtk.config import ConfigError, RunConfig
from mtk.models import family_spec


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[nn.Module, Any]:
    """The model of a run directory's latest checkpoint, and its tokenizer (None for mock-data runs);
    both as the checkpoint describes them."""
    from mtk.data.tokenizer import tokenizer_from_manifest

    description = checkpoint_description(run_dir)
    config = RunConfig.from_dict(description["config"], where=f"{run_dir} (checkpoint config)")
    family = family_spec(config.model.family)
    model = family.build(config.model) if family.trainable else None
    if not hasattr(model, "new_kv_caches"):
        raise ConfigError(f"{run_dir}: a {config.model.family} model does not generate text token by token")
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
    retrieve: Callable[[list[int]], torch.Tensor] | None = None,
) -> list[int]:
    """Continue ``prompt``; ``temperature=0`` is greedy. Stops at ``eod`` or the model's context length.

    ``retrieve`` (RETRO): the neighbour tokens of a sequence; the model then runs on the whole
    sequence at each step (no KV cache), with the neighbours of its complete chunks."""
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
    generator = torch.Generator(device=model.embedding.weight.device)
    if seed is not None:
        generator.manual_seed(seed)
    total = min(len(prompt) + max_new_tokens, limit)
    device = model.embedding.weight.device
    sequence = list(prompt)
    if retrieve is None:
        caches = model.new_kv_caches(1, total)

        def step(new: list[int]) -> torch.Tensor:
            return model(torch.tensor([new], device=device), kv_caches=caches)[0, -1]
    else:

        def step(new: list[int]) -> torch.Tensor:
            neighbours = retrieve(sequence).to(device)
            return model(torch.tensor([sequence], device=device), neighbours=neighbours)[0, -1]

    logits = step(prompt)
    produced: list[int] = []
    for _ in range(total - len(prompt)):
        logits = logits[: model.config.vocab_size].float()  # never sample vocabulary padding
        if temperature == 0:
            token = int(logits.argmax())
        else:
            probabilities = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            token = int(torch.multinomial(probabilities, 1, generator=generator))
        produced.append(token)
        sequence.append(token)
        if token == eod or len(prompt) + len(produced) == total:
            break
        logits = step([token])
    return produced


@torch.no_grad()
def generate_seq2seq(
    model: nn.Module,
    encoder_tokens: torch.Tensor,
    encoder_mask: torch.Tensor,
    bos: int,
    eos: int,
    max_new_tokens: int,
) -> list[list[int]]:
    """Greedy answers of an encoder-decoder (T5) for a batch: the encoder runs once, the decoder
    token by token on a KV cache; each answer ends before its ``eos`` (or after ``max_new_tokens``)."""
    batch = encoder_tokens.shape[0]
    limit = min(max_new_tokens, model.config.max_position_embeddings - 1)
    encoded = model.encode(encoder_tokens, encoder_mask)
    caches = model.new_decoder_caches(batch, limit + 1)
    token = torch.full((batch, 1), bos, device=encoder_tokens.device)
    answers: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=encoder_tokens.device)
    for _ in range(limit):
        logits = model.decode(encoded, token, encoder_mask, kv_caches=caches)[
            :, -1, : model.config.vocab_size
        ]
        token = logits.float().argmax(-1, keepdim=True)
        done_now = done | (token[:, 0] == eos)
        for row in (~done_now).nonzero()[:, 0].tolist():
            answers[row].append(int(token[row, 0]))
        done = done_now
        if bool(done.all()):
            break
    return answers
