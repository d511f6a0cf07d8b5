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

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def scaled_output_std(config: ModelConfig, num_layers: int) -> float:
    """Megatron's init std of the projections back into the residual stream: std / sqrt(2 x layers)."""
    return config.init_method_std / math.sqrt(2.0 * num_layers)


class TransformerLayer(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)); an optional cross-attention block in between.

    ``config.post_norm``: norm(x + attention(x)) and norm(x + mlp(x)), the original Transformer and
    BERT layout, which real BERT checkpoints need.
    """

    def __init__(
        self,
        config: ModelConfig,
        output_std: float,
        rotary: RotaryEmbedding | None = None,
        cross_attention: bool = False,
    ):
        super().__init__()
        self.attention_norm = build_norm(config)
        self.attention = Attention(config, output_std, rotary)
        self.cross_norm = build_norm(config) if cross_attention else None
        self.cross_attention = Attention(config, output_std) if cross_attention else None
        self.mlp_norm = build_norm(config)
        self.mlp = MLP(config, output_std)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.post_norm = config.post_norm

    def _residual(self, x: torch.Tensor, norm: nn.Module, block) -> torch.Tensor:
        if self.post_norm:
            return norm(x + self.dropout(block(x)))
        return x + self.dropout(block(norm(x)))

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        causal: bool = True,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``attention_mask`` / ``context_mask``: True = attend, broadcastable to (batch, heads,
        queries, keys), for self-attention and for the cross-attention to ``context``."""
        x = self._residual(
            x,
            self.attention_norm,
            lambda h: self.attention(
                h, position_ids=position_ids, causal=causal, attention_mask=attention_mask, kv_cache=kv_cache
            ),
        )
        if self.cross_attention is not None:
            x = self._residual(
                x,
                self.cross_norm,
                lambda h: self.cross_attention(h, context=context, attention_mask=context_mask),
            )
        return self._residual(x, self.mlp_norm, self.mlp)

    def tp_plan(self) -> dict[str, str]:
        """Tensor-parallel styles of this layer's modules (see ``mtk.parallel.tensor.STYLES``).

        The residual stream arrives as sequence slices: norms run on the slices, attention and the MLP
        gather the sequence, split heads / hidden units column-wise, and reduce-scatter back row-wise.
        """
        plan = {
            "attention_norm": "sequence",
            "attention": "gather_sequence",
            "attention.q_proj": "colwise",
            "attention.k_proj": "colwise",
            "attention.v_proj": "colwise",
            "attention.out_proj": "rowwise",
            "mlp_norm": "sequence",
            "mlp": "gather_sequence",
            "mlp.fc1": "colwise",
            "mlp.fc2": "rowwise",
        }
        if self.mlp.gate is not None:
            plan["mlp.gate"] = "colwise"
        if self.cross_attention is not None:
            plan["cross_norm"] = "sequence"
            plan["cross_attention"] = "gather_sequence_and_context"
            plan.update({f"cross_attention.{name}": plan[f"attention.{name}"] for name in PROJECTIONS})
        return plan


class TransformerBlock(nn.Module):
    """``num_layers`` layers and a final norm; RoPE tables shared by all layers when used.

    Layers sit in a ModuleDict keyed by their global index ("0", "1", ...): a pipeline stage keeps a
    subset and the parameter names stay those of the whole model. A stage without the final norm
    (``final_norm = None``, and a post-norm stack, whose layers end with a norm) returns the residual
    stream as is. The output projections of every layer
    start with std / sqrt(2 x ``num_layers``), as Megatron initialises them.
    """

    def __init__(self, config: ModelConfig, num_layers: int, cross_attention: bool = False) -> None:
        super().__init__()
        self.rotary = build_rotary(config) if config.position_embedding_type == "rope" else None
        output_std = scaled_output_std(config, num_layers)
        self.layers = nn.ModuleDict(
            {
                str(i): TransformerLayer(config, output_std, self.rotary, cross_attention)
                for i in range(num_layers)
            }
        )
        self.final_norm: nn.Module | None = None if config.post_norm else build_norm(config)

    def forward(self, x: torch.Tensor, kv_caches: list[KVCache] | None = None, **kwargs) -> torch.Tensor:
        for i, layer in enumerate(self.layers.values()):
            x = layer(x, kv_cache=None if kv_caches is None else kv_caches[i], **kwargs)
        return x if self.final_norm is None else self.final_norm(x)

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
    """Parameters of one ``TransformerLayer`` (with a cross-attention block if asked), from the config."""
    hidden, ffn = config.hidden_size, config.ffn_hidden_size
    q_width = config.num_attention_heads * config.kv_channels
    kv_width = config.num_query_groups * config.kv_channels
    bias = config.add_bias_linear
    norm = norm_parameters(config)
    attention = hidden * q_width + 2 * hidden * kv_width + q_width * hidden
    attention += q_width + 2 * kv_width + hidden if bias else 0
    mlp_in = 2 * ffn if config.swiglu else ffn
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
