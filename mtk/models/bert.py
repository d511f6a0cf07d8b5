"""BERT (encoder, masked-LM + sentence-order head): presets and parameter count so far; training comes next."""

from __future__ import annotations

from mtk.config import ModelConfig
from mtk.layers.transformer import embedding_parameters, layer_parameters, norm_parameters
from mtk.models.spec import FamilySpec


class BertFamily(FamilySpec):
    name = "bert"

    def num_parameters(self, config: ModelConfig, tensor_parallel: int = 1) -> int:
        hidden, vocab = config.hidden_size, config.padded_vocab_size(tensor_parallel)
        norm = norm_parameters(config)
        total = embedding_parameters(config, tensor_parallel)
        total += 2 * hidden if config.bert_binary_head else 0  # token-type embeddings
        total += config.num_layers * layer_parameters(config) + norm
        total += (hidden * hidden + hidden) + norm + vocab  # LM head: dense, norm, output bias
        total += (hidden * hidden + hidden) + (
            2 * hidden + 2 if config.bert_binary_head else 0
        )  # pooler, SOP
        return total


SPEC = BertFamily()
