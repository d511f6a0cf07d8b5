"""Multi-head attention with grouped-query heads, optional RoPE, self or cross, and a KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtk.config import ModelConfig
from mtk.layers.init import Linear
from mtk.layers.rotary import RotaryEmbedding


@dataclass
class KVCache:
    """Keys and values of the positions seen so far, for incremental decoding of one layer."""

    keys: torch.Tensor  # (batch, groups, max_length, head_dim)
    values: torch.Tensor
    length: int = 0


class Attention(nn.Module):
    """Scaled dot-product attention through ``F.scaled_dot_product_attention`` (flash kernels on GPU).

    Separate q/k/v/out projections keep tensor-parallel plans a plain column/row split per layer.
    ``output_std`` is the init std of the output projection (Megatron scales it with depth).
    """

    def __init__(self, config: ModelConfig, output_std: float, rotary: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.heads, self.groups, self.head_dim = (
            config.num_attention_heads,
            config.num_query_groups,
            config.kv_channels,
        )
        hidden, bias, std = config.hidden_size, config.add_bias_linear, config.init_method_std
        self.q_proj = Linear(hidden, self.heads * self.head_dim, bias, std)
        self.k_proj = Linear(hidden, self.groups * self.head_dim, bias, std)
        self.v_proj = Linear(hidden, self.groups * self.head_dim, bias, std)
        self.out_proj = Linear(self.heads * self.head_dim, hidden, bias, output_std)
        self.rotary = rotary
        self.dropout = config.attention_dropout

        # (q, k, v, attn_mask, dropout_p, is_causal, enable_gqa) -> out; context parallelism swaps it
        self.core_attention = F.scaled_dot_product_attention

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim); the heads this rank holds."""
        batch, seq, _ = x.shape
        return x.view(batch, seq, -1, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        causal: bool = True,
        attention_mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``x`` (batch, seq, hidden) -> (batch, seq, hidden).

        ``context`` switches to cross-attention (keys/values from it, no causal mask, no RoPE).
        ``attention_mask`` (broadcastable to (batch, heads, seq, keys), True = attend) overrides ``causal``.
        """
        source = x if context is None else context
        q = self._split_heads(self.q_proj(x))
        k = self._split_heads(self.k_proj(source))
        v = self._split_heads(self.v_proj(source))
        if self.rotary is not None and context is None:
            q, k = self.rotary(q, position_ids), self.rotary(k, position_ids)
        is_causal = causal and context is None and attention_mask is None
        if kv_cache is not None:
            start, end = kv_cache.length, kv_cache.length + x.shape[1]
            kv_cache.keys[:, :, start:end] = k
            kv_cache.values[:, :, start:end] = v
            kv_cache.length = end
            k, v = kv_cache.keys[:, :, :end], kv_cache.values[:, :, :end]
            if is_causal and start > 0:  # queries sit at positions start..end-1 of the keys
                keys = torch.arange(end, device=x.device)
                attention_mask = keys[None, :] <= torch.arange(start, end, device=x.device)[:, None]
                is_causal = False
        out = self.core_attention(
            q,
            k,
            v,
            attn_mask=attention_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
            enable_gqa=self.groups != self.heads,
        )
        batch, _, seq, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, seq, -1))

    def new_cache(self, batch: int, max_length: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        shape = (batch, self.groups, max_length, self.head_dim)
        return KVCache(
            torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
        )
