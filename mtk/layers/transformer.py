"""Transformer layers (pre-norm, or post-norm as the original BERT) and the stack of them."""

from __future__ import annotations

import math

import torch
from torch import nn

from mtk.config import ModelConfig
from mtk.layers.attention import Attention, KVCache
from mtk.layers.mlp import MLP
from mtk.layers.norms import build_norm
from mtk.layers.rotary import RotaryEmbedding, build_rotary


def scaled_output_std(config: ModelConfig, num_layers: int) -> float:
    """Megatron's init std of the projections back into the residual stream: std / sqrt(2 x layers)."""
    return config.init_method_std / math.sqrt(2.0 * num_layers)


def layer_plan(layer: nn.Module) -> dict[str, str]:
    """Tensor-parallel styles of a layer's self-attention and MLP (see ``mtk.parallel.tensor.STYLES``).

    The residual stream arrives as sequence slices: norms run on the slices, attention and the MLP
    gather the sequence, split heads / hidden units column-wise, and reduce-scatter back row-wise.
    """
    plan = {
        "attention_norm": "sequence",
        "attention": "gather_sequence",
        **{f"attention.{name}": style for name, style in layer.attention.tp_plan().items()},
        "mlp_norm": "sequence",
        "mlp": "gather_sequence",
        "mlp.fc1": "colwise",
        "mlp.fc2": "rowwise",
    }
    if layer.mlp.gate is not None:
        plan["mlp.gate"] = "colwise"
    return plan


class TransformerLayer(nn.Module):
    """A self-attention layer (GPT's decoder, BERT's and T5's encoders)::

        pre-norm (Megatron, GPT-2 on)          post-norm (``config.post_norm``: original Transformer, BERT)
        x = x + dropout(attention(norm(x)))    x = norm(x + dropout(attention(x)))
        x = x + dropout(mlp(norm(x)))          x = norm(x + dropout(mlp(x)))

    Decoders attend causally (``causal``), encoders under a padding mask (``attention_mask``).
    """

    def __init__(self, config: ModelConfig, output_std: float, rotary: RotaryEmbedding | None = None):
        super().__init__()
        self.attention_norm = build_norm(config)
        self.attention = Attention(config, output_std, rotary)
        self.mlp_norm = build_norm(config)
        self.mlp = MLP(config, output_std)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.post_norm = config.post_norm

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        causal: bool = True,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``attention_mask``: True = attend, broadcastable to (batch, heads, queries, keys); it
        overrides ``causal``. ``kv_cache``: the keys and values of the positions before ``x``."""
        if self.post_norm:
            h = self.attention(
                x, position_ids=position_ids, causal=causal, attention_mask=attention_mask, kv_cache=kv_cache
            )
            x = self.attention_norm(x + self.dropout(h))
            return self.mlp_norm(x + self.dropout(self.mlp(x)))
        h = self.attention(
            self.attention_norm(x),
            position_ids=position_ids,
            causal=causal,
            attention_mask=attention_mask,
            kv_cache=kv_cache,
        )
        x = x + self.dropout(h)
        return x + self.dropout(self.mlp(self.mlp_norm(x)))

    def tp_plan(self) -> dict[str, str]:
        """Tensor-parallel styles of this layer's modules (see ``mtk.parallel.tensor.STYLES``)."""
        return layer_plan(self)


class CrossAttentionLayer(nn.Module):
    """A self-attention layer with cross-attention to a ``context`` between self-attention and the MLP
    (T5's decoder, the first layer of RETRO's retrieval encoder)::

        x = x + dropout(attention(norm(x)))
        x = x + dropout(cross_attention(norm(x), context))
        x = x + dropout(mlp(norm(x)))

    or post-norm (``config.post_norm``) as ``TransformerLayer``.
    """

    def __init__(self, config: ModelConfig, output_std: float, rotary: RotaryEmbedding | None = None):
        super().__init__()
        self.attention_norm = build_norm(config)
        self.attention = Attention(config, output_std, rotary)
        self.cross_norm = build_norm(config)
        self.cross_attention = Attention(config, output_std, cross=True)
        self.mlp_norm = build_norm(config)
        self.mlp = MLP(config, output_std)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.post_norm = config.post_norm

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        causal: bool = True,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``context_mask``: True = attend, broadcastable to (batch, heads, queries, context keys);
        ``attention_mask``: the self-attention's, which overrides ``causal`` (T5's relative position
        bias, an additive float mask)."""
        attend = {"causal": causal, "kv_cache": kv_cache, "attention_mask": attention_mask}
        if self.post_norm:
            x = self.attention_norm(x + self.dropout(self.attention(x, **attend)))
            h = self.cross_attention(x, context=context, attention_mask=context_mask)
            x = self.cross_norm(x + self.dropout(h))
            return self.mlp_norm(x + self.dropout(self.mlp(x)))
        x = x + self.dropout(self.attention(self.attention_norm(x), **attend))
        h = self.cross_attention(self.cross_norm(x), context=context, attention_mask=context_mask)
        x = x + self.dropout(h)
        return x + self.dropout(self.mlp(self.mlp_norm(x)))

    def tp_plan(self) -> dict[str, str]:
        """As ``TransformerLayer``'s, and the cross-attention gathers both its input and its context."""
        plan = layer_plan(self)
        plan["cross_norm"] = "sequence"
        plan["cross_attention"] = "gather_sequence_and_context"
        plan.update(
            {f"cross_attention.{name}": style for name, style in self.cross_attention.tp_plan().items()}
        )
        return plan


class TransformerBlock(nn.Module):
    """``num_layers`` layers (``CrossAttentionLayer`` with ``cross_attention``) and a final norm; RoPE
    tables shared by all layers when used.

    Layers sit in a ModuleDict keyed by their global index ("0", "1", ...): a pipeline stage keeps a
    subset and the parameter names stay those of the whole model. A stage without the final norm
    (``final_norm = None``, and a post-norm stack, whose layers end with a norm) returns the residual
    stream as is. The output projections of every layer start with std / sqrt(2 x ``num_layers``),
    as Megatron initialises them.
    """

    def __init__(self, config: ModelConfig, num_layers: int, cross_attention: bool = False) -> None:
        super().__init__()
        self.rotary = build_rotary(config) if config.position_embedding_type == "rope" else None
        output_std = scaled_output_std(config, num_layers)
        layer = CrossAttentionLayer if cross_attention else TransformerLayer
        self.layers = nn.ModuleDict(
            {str(i): layer(config, output_std, self.rotary) for i in range(num_layers)}
        )
        self.final_norm: nn.Module | None = None if config.post_norm else build_norm(config)

    def forward(self, x: torch.Tensor, kv_caches: list[KVCache] | None = None, **kwargs) -> torch.Tensor:
        """``kwargs``: the arguments of every layer's ``forward``; ``kv_caches``: one per layer."""
        for i, layer in enumerate(self.layers.values()):
            x = layer(x, kv_cache=None if kv_caches is None else kv_caches[i], **kwargs)
        return self.final_norm(x) if self.final_norm is not None else x

    def tp_plan(self, prefix: str) -> dict[str, str]:
        """The plan of every layer (and the final norm) under ``prefix`` (this block's path)."""
        plan = {
            f"{prefix}.layers.{name}.{path}": style
            for name, layer in self.layers.items()
            for path, style in layer.tp_plan().items()
        }
        if self.final_norm is not None:
            plan[f"{prefix}.final_norm"] = "sequence"
        return plan


def layer_parameters(config: ModelConfig, cross_attention: bool = False) -> int:
    """Parameters of one ``TransformerLayer`` (a ``CrossAttentionLayer`` if asked), from the config."""
    hidden, ffn = config.hidden_size, config.ffn_hidden_size
    q_width = config.num_attention_heads * config.kv_channels
    kv_width = config.num_query_groups * config.kv_channels
    bias = config.add_bias_linear
    norm = norm_parameters(config)
    attention = hidden * q_width + 2 * hidden * kv_width + q_width * hidden
    attention += q_width + 2 * kv_width + hidden if bias else 0
    mlp_in = 2 * ffn if config.swiglu or config.geglu else ffn
    mlp = hidden * mlp_in + ffn * hidden + (mlp_in + hidden if bias else 0)
    return norm + attention + norm + mlp + (norm + attention if cross_attention else 0)


def norm_parameters(config: ModelConfig) -> int:
    """One norm's parameters."""
    return (2 if config.normalization == "LayerNorm" else 1) * config.hidden_size


def embedding_parameters(config: ModelConfig, tensor_parallel: int = 1) -> int:
    """The word embedding (vocabulary padded for ``tensor_parallel``) and learned positions, if any."""
    total = config.padded_vocab_size(tensor_parallel) * config.hidden_size
    if config.position_embedding_type == "learned_absolute":
        total += config.max_position_embeddings * config.hidden_size
    return total
