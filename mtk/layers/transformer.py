"""Pre-norm transformer layers and the stack of them."""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from mtk.config import ModelConfig
from mtk.layers.attention import Attention, KVCache
from mtk.layers.mlp import MLP
from mtk.layers.norms import build_norm
from mtk.layers.rotary import RotaryEmbedding


class TransformerLayer(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)); an optional cross-attention block in between."""

    def __init__(
        self, config: ModelConfig, rotary: RotaryEmbedding | None = None, cross_attention: bool = False
    ):
        super().__init__()
        self.attention_norm = build_norm(config)
        self.attention = Attention(config, rotary)
        self.cross_norm = build_norm(config) if cross_attention else None
        self.cross_attention = Attention(config) if cross_attention else None
        self.mlp_norm = build_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        causal: bool = True,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.dropout(
            self.attention(
                self.attention_norm(x),
                position_ids=position_ids,
                causal=causal,
                attention_mask=attention_mask,
                kv_cache=kv_cache,
            )
        )
        if self.cross_attention is not None:
            x = x + self.dropout(self.cross_attention(self.cross_norm(x), context=context))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class TransformerBlock(nn.Module):
    """``num_layers`` layers and a final norm; RoPE tables shared by all layers when used.

    Layers sit in a ModuleDict keyed by their global index ("0", "1", ...): a pipeline stage keeps a
    subset and the parameter names stay those of the whole model. A stage without the final norm
    (``final_norm = None``) returns the residual stream as is.
    """

    def __init__(self, config: ModelConfig, num_layers: int, cross_attention: bool = False) -> None:
        super().__init__()
        self.rotary = (
            RotaryEmbedding(config.kv_channels, config.max_position_embeddings, config.rotary_base)
            if config.position_embedding_type == "rope"
            else None
        )
        self.layers = nn.ModuleDict(
            {str(i): TransformerLayer(config, self.rotary, cross_attention) for i in range(num_layers)}
        )
        self.final_norm: nn.Module | None = build_norm(config)

    def forward(self, x: torch.Tensor, kv_caches: list[KVCache] | None = None, **kwargs) -> torch.Tensor:
        for i, layer in enumerate(self.layers.values()):
            x = layer(x, kv_cache=None if kv_caches is None else kv_caches[i], **kwargs)
        return x if self.final_norm is None else self.final_norm(x)


def init_weights(module: nn.Module, config: ModelConfig, num_layers: int, seed: int) -> None:
    """Megatron's init: normal(0, std) weights, output projections scaled by 1/sqrt(2 * layers), zero biases.

    Each parameter is drawn from its own generator, seeded by ``seed`` and its name, as the whole
    tensor, then this rank's shard of it is kept: any pipeline stage, tensor or data shard of the
    model starts from exactly the weights of the single-process model, and a model built on the
    meta device is initialised here after ``to_empty`` without ever existing whole.
    """
    scaled_std = config.init_method_std / math.sqrt(2.0 * num_layers)
    for name, param in module.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        owner, kind = name.split(".")[-2:]
        if "norm" in owner:
            full = torch.ones(param.shape) if kind == "weight" else torch.zeros(param.shape)
        elif kind == "bias":
            full = torch.zeros(param.shape)
        else:
            std = scaled_std if owner in ("out_proj", "fc2") else config.init_method_std
            generator = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
            full = torch.empty(param.shape).normal_(0.0, std, generator=generator)
        with torch.no_grad():
            if hasattr(param, "device_mesh"):  # a DTensor: keep this rank's shard
                from torch.distributed.tensor import distribute_tensor

                shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(shard.to_local())
            else:
                param.copy_(full)
    for child in module.modules():
        if isinstance(child, RotaryEmbedding):
            child.reset_parameters(child.cos.device)
