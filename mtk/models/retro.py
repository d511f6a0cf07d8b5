"""RETRO (retrieval-enhanced decoder): presets and parameter count so far; training comes next."""

from __future__ import annotations

from mtk.config import ModelConfig
from mtk.layers.transformer import embedding_parameters, layer_parameters, norm_parameters
from mtk.models.spec import FamilySpec


def retro_layer_numbers(config: ModelConfig) -> list[int]:
    """1-based decoder layers that carry chunked cross-attention (Megatron's rule)."""
    start = 6 if config.num_layers <= 15 else 9
    return list(range(start, config.num_layers + 1, 3))


class RetroFamily(FamilySpec):
    name = "retro"

    def num_parameters(self, config: ModelConfig, tensor_parallel: int = 1) -> int:
        hidden, vocab = config.hidden_size, config.padded_vocab_size(tensor_parallel)
        norm = norm_parameters(config)
        layer, cross_layer = layer_parameters(config), layer_parameters(config, cross_attention=True)
        attention_block = cross_layer - layer - norm
        total = embedding_parameters(config, tensor_parallel)
        retro_layers = len(retro_layer_numbers(config))
        total += (config.num_layers - retro_layers) * layer + retro_layers * cross_layer + norm
        # neighbour encoder: its first layer cross-attends to the decoder chunk
        total += config.retro_encoder_num_layers * layer + (norm + attention_block) + norm
        return total + (vocab * hidden if config.untie_embeddings_and_output_weights else 0)


SPEC = RetroFamily()
