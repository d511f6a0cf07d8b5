"""T5 (encoder-decoder, span corruption): presets and parameter count so far; training comes next."""

from __future__ import annotations

from mtk.config import ModelConfig
from mtk.layers.transformer import layer_parameters, norm_parameters
from mtk.models.spec import FamilySpec


class T5Family(FamilySpec):
    name = "t5"

    def num_parameters(self, config: ModelConfig, tensor_parallel: int = 1) -> int:
        hidden, vocab = config.hidden_size, config.padded_vocab_size(tensor_parallel)
        norm = norm_parameters(config)
        total = vocab * hidden + config.max_position_embeddings * hidden
        total += config.num_layers * layer_parameters(config) + norm  # encoder
        total += config.decoder_num_layers * layer_parameters(config, cross_attention=True) + norm  # decoder
        return total + vocab  # LM head bias; weights tied to the embedding


SPEC = T5Family()
