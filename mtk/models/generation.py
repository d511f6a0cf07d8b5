"""How a family's model produces text token by token: its generation strategy (the spec's
``TrainableFamily.generation``).

A strategy turns a model into a *step*: (the new tokens, the whole sequence so far) -> the logits of
the next token of every row. The sampling loop (``mtk.generate``) is the same for every family; the
strategy says how the model is run at each step and what it needs:

- ``CachedDecoding`` (GPT/Llama): a decoder-only model continues the sequence on a KV cache, so each
  step runs only the new tokens.
- ``RetrievalDecoding`` (RETRO): the decoder re-runs the whole sequence at each step (no KV cache)
  with the neighbours a retriever finds for its complete chunks (``needs_retrieval``).
- ``EncoderDecoderDecoding`` (T5): the encoder runs once on the input, the decoder token by token on a
  KV cache; it answers an input rather than continuing a prompt (``continues_text`` False).

A family without a strategy (BERT, ``None``) does not generate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

# (new tokens [batch, n], the whole sequence so far [batch, t]) -> next-token logits [batch, padded vocab]
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# a sequence's tokens -> the neighbour tokens of its complete chunks, [1, chunks, k, r]
Retrieve = Callable[[list[int]], torch.Tensor]


class GenerationStrategy(ABC):
    """How a family's model is run to produce one more token per row."""

    description: ClassVar[str]
    needs_retrieval: ClassVar[bool] = False  # neighbours from a retriever at every step (--retro-project)
    continues_text: ClassVar[bool] = True  # it continues a prompt; False: the input goes to an encoder

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
    ) -> Step:
        """The step function of one generation of ``batch`` rows up to ``max_length`` decoder tokens."""


class CachedDecoding(GenerationStrategy):
    """A decoder-only model on a KV cache: each step runs only the new tokens."""

    description = "decoder-only, KV cache"

    def start(
        self, model, batch, max_length, *, retrieve=None, encoder_tokens=None, encoder_mask=None
    ) -> Step:
        caches = model.new_kv_caches(batch, max_length)

        def step(new: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
            return model(new, kv_caches=caches)[:, -1]

        return step


class RetrievalDecoding(GenerationStrategy):
    """A retrieval-augmented decoder: the whole sequence at every step (no KV cache), with the
    neighbours ``retrieve`` finds for its complete chunks."""

    description = "decoder with retrieved neighbours, whole sequence each step"
    needs_retrieval = True

    def start(
        self, model, batch, max_length, *, retrieve=None, encoder_tokens=None, encoder_mask=None
    ) -> Step:
        if retrieve is None:
            raise ValueError(f"a {model.config.family} model retrieves neighbours while it generates")
        if batch != 1:
            raise ValueError("retrieval generates one sequence at a time")

        def step(new: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
            neighbours = retrieve(sequence[0].tolist()).to(sequence.device)
            return model(sequence, neighbours=neighbours)[:, -1]

        return step


class EncoderDecoderDecoding(GenerationStrategy):
    """An encoder-decoder: the encoder runs once on ``encoder_tokens``, the decoder token by token on a
    KV cache."""

    description = "encoder-decoder, decoder KV cache"
    continues_text = False

    def start(
        self, model, batch, max_length, *, retrieve=None, encoder_tokens=None, encoder_mask=None
    ) -> Step:
        if encoder_tokens is None:
            raise ValueError(f"a {model.config.family} model generates from an encoder input")
        encoded = model.encode(encoder_tokens, encoder_mask)
        caches = model.new_decoder_caches(batch, max_length)

        def step(new: torch.Tensor, sequence: torch.Tensor) -> torch.Tensor:
            return model.decode(encoded, new, encoder_mask, kv_caches=caches)[:, -1]

        return step
