"""Decoder-only language model covering GPT-3 and Llama 3: the config picks norm, positions, MLP, GQA, tying."""

from __future__ import annotations

import torch
from torch import nn

from mtk.config import ModelConfig
from mtk.layers.attention import KVCache
from mtk.layers.transformer import TransformerBlock, init_weights


class GPTModel(nn.Module):
    """tokens (batch, seq) -> logits (batch, seq, padded vocab).

    A pipeline stage is this model with parts removed (``mtk.parallel.pipeline``): ``pre_process``
    (Megatron's name) says the stage embeds tokens, else its input is the previous stage's hidden
    states; ``post_process`` says it ends with the final norm and the output layer, else it returns
    hidden states. With tied embeddings the last stage keeps ``embedding`` for the output projection.
    """

    pre_process: bool = True
    post_process: bool = True

    def __init__(self, config: ModelConfig, tensor_parallel: int = 1) -> None:
        super().__init__()
        self.config = config
        vocab = config.padded_vocab_size(tensor_parallel)
        self.embedding = nn.Embedding(vocab, config.hidden_size)
        self.position_embedding = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_embedding_type == "learned_absolute"
            else None
        )
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.decoder = TransformerBlock(config, config.num_layers)
        self.output = (
            nn.Linear(config.hidden_size, vocab, bias=False)
            if config.untie_embeddings_and_output_weights
            else None
        )
        if self.embedding.weight.device.type != "meta":  # on meta: initialised once materialised
            self.init_weights()

    def init_weights(self, seed: int | None = None) -> None:
        """Initial weights from ``seed`` (default: drawn from torch's global generator)."""
        if seed is None:
            seed = int(torch.randint(2**62, ()).item())
        init_weights(self, self.config, self.config.num_layers, seed)

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
    ) -> torch.Tensor:
        if position_ids is None:
            start = 0 if kv_caches is None else kv_caches[0].length
            position_ids = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(
                tokens
            )
        if self.pre_process:
            x = self.embedding(tokens)
            if self.position_embedding is not None:
                x = x + self.position_embedding(position_ids)
            x = self.embedding_dropout(x)
        else:
            x = tokens
        x = self.decoder(x, kv_caches=kv_caches, position_ids=position_ids)
        if not self.post_process:
            return x
        return self.output(x) if self.output is not None else nn.functional.linear(x, self.embedding.weight)

    def new_kv_caches(self, batch: int, max_length: int, dtype: torch.dtype | None = None) -> list[KVCache]:
        weight = self.embedding.weight
        return [
            layer.attention.new_cache(batch, max_length, weight.device, dtype or weight.dtype)
            for layer in self.decoder.layers.values()
        ]
