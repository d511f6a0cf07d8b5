"""T5 (encoder-decoder, span corruption): presets and parameter count so far; training comes next."""

from __future__ import annotations

from mtk.config import ModelConfig
from mtk.layers.transformer import embedding_parameters, layer_parameters, norm_parameters
from mtk.models.spec import FamilySpec


class T5Family(FamilySpec):
    name = "t5"

    def num_parameters(self, config: ModelConfig, tensor_parallel: int = 1) -> int:
        vocab = config.padded_vocab_size(tensor_parallel)
        norm = norm_parameters(config)
        total = embedding_parameters(config, tensor_parallel)
        total += config.num_layers * layer_parameters(config) + norm  # encoder
        total += config.decoder_num_layers * layer_parameters(config, cross_attention=True) + norm  # decoder
        return total + vocab  # LM head bias; weights tied to the embedding


SPEC = T5Family()
