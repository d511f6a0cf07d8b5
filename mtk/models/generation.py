"""How a family's model produces text token by token: its generation strategy (the spec's
``TrainableFamily.generation``).

A strategy turns a model into a *step*: (the new tokens, the whole sequence so far) -> the logits of
the next token of every row. The sampling loop (``mtk.generate``) is the same for every family; the
strategy says how the model is run at each step and what it needs:

- ``CachedDecoding`` (GPT/Llama): a decoder-only model continues the sequence on a KV cache, so each
  step runs only the new tokens.
- ``RetrievalDecoding`` (RETRO): the decoder continues the sequence on a KV cache; a retriever finds
  the neighbours of each chunk as it completes (``needs_retrieval``), encoded once and kept.
- ``EncoderDecoderDecoding`` (T5): the encoder runs once on the input, the decoder token by token on a
  KV cache; it answers an input rather than continuing a prompt (``continues_text`` False).

A family without a strategy (BERT, ``None``) does not generate.

With ``compile`` (``compiles`` strategies), the cache is static (``mtk.layers.attention.KVCache``) and
the one-token step goes through ``torch.compile(fullgraph=True)``: every such step has the same
shapes, so it compiles once; the prompt (many tokens) runs eager on the same cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

# (new tokens [batch, n], the whole sequence so far [batch, t]) -> next-token logits [batch, padded vocab]
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# a sequence's tokens -> the neighbour tokens of its chunks, [1, chunks, k, r] (those of an incomplete
# last chunk are never read)
Retrieve = Callable[[list[int]], torch.Tensor]


class GenerationStrategy(ABC):
    """How a family's model is run to produce one more token per row."""

    description: ClassVar[str]
    needs_retrieval: ClassVar[bool] = False  # neighbours from a retriever at every step (--retro-project)
    continues_text: ClassVar[bool] = True  # it continues a prompt; False: the input goes to an encoder
    compiles: ClassVar[bool] = False  # its one-token step can be compiled (``start(compile=True)``)

    @abstractmethod
    def start(
        self,
        model: nn.Module,
        batch: int,
        max_length: int,
        *,
        retrieve: Retrieve | None = None,
        encoder_tokens: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        compile: bool = False,
    ) -> Step:
        """The step function of one generation of ``batch`` rows up to ``max_length`` decoder tokens;
        ``compile`` only where the strategy ``compiles``."""


def cached_step(run: Callable[[torch.Tensor], torch.Tensor], compile: bool) -> Step:
    """A step of ``run`` (new tokens -> their logits, on a KV cache that is static when ``compile``);
    with ``compile``, one-token calls run compiled, longer ones (the prompt) eager."""
    if not compile:
        return lambda new, sequence: run(new)[:, -1]
    compiled = torch.compile(run, fullgraph=True)
    return lambda new, sequence: (compiled if new.shape[1] == 1 else run)(new)[:, -1]


class CachedDecoding(GenerationStrategy):
    """A decoder-only model on a KV cache: each step runs only the new tokens."""

    description = "decoder-only, KV cache"
    compiles = True

    def start(
        self,
        model,
        batch,
        max_length,
        *,
        retrieve=None,
        encoder_tokens=None,
        encoder_mask=None,
        compile=False,
    ) -> Step:
        caches = model.new_kv_caches(batch, max_length, static=compile)
        return cached_step(lambda new: model(new, kv_caches=caches), compile)


class RetrievalDecoding(GenerationStrategy):
    """A retrieval-augmented decoder on its cache (``RetroModel.new_cache``): each step runs only the
    new tokens; ``retrieve`` is called when they complete a chunk (and at the first step), and the
    encoder runs only on the neighbours of the completed chunks. Eager only (``compiles`` False): a
    step that completes a chunk runs the encoder, the others do not."""

    description = "decoder with retrieved neighbours, dynamic KV cache"
    needs_retrieval = True

    def start(
        self,
        model,
        batch,
        max_length,
        *,
        retrieve=None,
        encoder_tokens=None,
        encoder_mask=None,
        compile=False,
    ) -> Step:
        if retrieve is None:
            raise ValueError(f"a {model.config.family} model retrieves neighbours while it generates")
        if batch != 1:
            raise ValueError("retrieval generates one sequence at a time")
        cache, m = model.new_cache(batch, max_length), model.config.retro_chunk_length
        neighbours: torch.Tensor | None = None

        def step(new: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
            nonlocal neighbours
            if neighbours is None or sequence.shape[1] // m > cache.length // m:
                neighbours = retrieve(sequence[0].tolist()).to(sequence.device)
            return model(new, neighbours=neighbours, cache=cache)[:, -1]

        return step


class EncoderDecoderDecoding(GenerationStrategy):
    """An encoder-decoder: the encoder runs once on ``encoder_tokens``, the decoder token by token on a
    KV cache."""

    description = "encoder-decoder, decoder KV cache"
    continues_text = False
    compiles = True

    def start(
        self,
        model,
        batch,
        max_length,
        *,
        retrieve=None,
        encoder_tokens=None,
        encoder_mask=None,
        compile=False,
    ) -> Step:
        if encoder_tokens is None:
            raise ValueError(f"a {model.config.family} model generates from an encoder input")
        encoded = model.encode(encoder_tokens, encoder_mask)
        caches = model.new_decoder_caches(batch, max_length, static=compile)
        return cached_step(lambda new: model.decode(encoded, new, encoder_mask, kv_caches=caches), compile)
