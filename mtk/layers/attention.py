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
    """Keys and values of the positions seen so far, for incremental decoding of one layer.

    Dynamic (``length`` an int): attention runs over the positions written so far, so its shapes grow
    a token a step. Static (``length`` a 0-dim tensor, ``new_cache(static=True)``): writes go to tensor
    positions and attention runs over all ``max_length`` positions, those not yet written masked, so
    every one-token step has the same shapes and a compiled step compiles once.
    """

    keys: torch.Tensor  # (batch, groups, max_length, head_dim)
    values: torch.Tensor
    length: int | torch.Tensor = 0

    def append(
        self, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Write the keys and values of the next ``k.shape[2]`` positions; the keys and values to attend
        to, and the causal mask (queries, keys; True = attend) of the new positions, None where the
        plain causal mask is right (a dynamic cache's first write)."""
        new = k.shape[2]
        if isinstance(self.length, torch.Tensor):
            queries = self.length + torch.arange(new, device=k.device)
            self.keys.index_copy_(2, queries, k)
            self.values.index_copy_(2, queries, v)
            self.length.add_(new)
            keys, values = self.keys, self.values
        else:
            start = self.length
            self.length = end = start + new
            self.keys[:, :, start:end], self.values[:, :, start:end] = k, v
            keys, values = self.keys[:, :, :end], self.values[:, :, :end]
            if start == 0:
                return keys, values, None
            queries = torch.arange(start, end, device=k.device)
        return keys, values, torch.arange(keys.shape[2], device=k.device) <= queries[:, None]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """Separate q, k, v projections (weights or biases, output rows first) as one ``qkv_proj``, in
    Megatron's ``linear_qkv`` order: for each query group, its query heads, then its key, then its value.
    A column split of the rows into equal parts then gives each tensor-parallel rank whole groups."""
    return torch.cat([t.reshape(groups, -1, *t.shape[1:]) for t in (q, k, v)], dim=1).flatten(0, 1)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fuse_qkv``'s inverse: the q, k, v rows of a fused projection of ``heads`` query heads."""
    per_group = qkv.reshape(groups, -1, *qkv.shape[1:])
    head_dim = per_group.shape[1] // (heads // groups + 2)
    q, k, v = per_group.split([per_group.shape[1] - 2 * head_dim, head_dim, head_dim], dim=1)
    return q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)


class Attention(nn.Module):
    """Scaled dot-product attention through ``F.scaled_dot_product_attention`` (flash kernels on GPU).

    Self-attention projects q, k and v in one product (``qkv_proj``, laid out as ``fuse_qkv``: one
    matrix product and one bias where there were three); cross-attention (``cross``) projects the
    queries from the input (``q_proj``) and keys and values from the context (``kv_proj``: per group,
    key then value). Tensor parallelism splits each projection column-wise into whole query groups.
    ``output_std`` is the init std of the output projection (Megatron scales it with depth).
    """

    def __init__(
        self,
        config: ModelConfig,
        output_std: float,
        rotary: RotaryEmbedding | None = None,
        cross: bool = False,
    ) -> None:
        super().__init__()
        self.heads, self.groups, self.head_dim = (
            config.num_attention_heads,
            config.num_query_groups,
            config.kv_channels,
        )
        hidden, bias, std = config.hidden_size, config.add_bias_linear, config.init_method_std
        q_width, kv_width = self.heads * self.head_dim, self.groups * self.head_dim
        self.cross = cross
        if cross:
            self.q_proj = Linear(hidden, q_width, bias, std)
            self.kv_proj = Linear(hidden, 2 * kv_width, bias, std)
        else:
            self.qkv_proj = Linear(hidden, q_width + 2 * kv_width, bias, std)
        self.out_proj = Linear(q_width, hidden, bias, output_std)
        self.rotary = rotary
        self.dropout = config.attention_dropout

        # (q, k, v, attn_mask, dropout_p, is_causal, enable_gqa) -> out; context parallelism swaps it
        self.core_attention = F.scaled_dot_product_attention

    def tp_plan(self) -> dict[str, str]:
        """Tensor-parallel styles of the projections (``mtk.parallel.tensor.STYLES``)."""
        inputs = ("q_proj", "kv_proj") if self.cross else ("qkv_proj",)
        return {**{name: "colwise" for name in inputs}, "out_proj": "rowwise"}

    def _project(
        self, x: torch.Tensor, context: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as (batch, heads or groups this rank holds, seq, head_dim)."""
        batch, seq, _ = x.shape
        d = self.head_dim
        if self.cross:
            if context is None:
                raise ValueError("cross-attention attends to a context")
            q = self.q_proj(x).view(batch, seq, -1, d)
            kv = self.kv_proj(context).view(batch, context.shape[1], -1, 2, d)
            k, v = kv[..., 0, :], kv[..., 1, :]
        else:
            per_group = self.heads // self.groups
            qkv = self.qkv_proj(x).view(batch, seq, -1, per_group + 2, d)
            q = qkv[..., :per_group, :].flatten(2, 3)
            k, v = qkv[..., per_group, :], qkv[..., per_group + 1, :]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

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

        ``context``: what cross-attention attends to (keys/values from it, no causal mask, no RoPE).
        ``attention_mask`` (broadcastable to (batch, heads, seq, keys), True = attend) overrides ``causal``;
        a float one is added to the scores (T5's relative position bias, -inf where not to attend).
        """
        q, k, v = self._project(x, context)
        if self.rotary is not None and context is None:
            q, k = self.rotary(q, position_ids), self.rotary(k, position_ids)
        is_causal = causal and context is None and attention_mask is None
        if kv_cache is not None:
            k, v, mask = kv_cache.append(k, v)
            if is_causal and mask is not None:
                attention_mask, is_causal = mask, False
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.to(q.dtype)  # SDPA adds a mask of the queries' dtype
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

    def new_cache(
        self, batch: int, max_length: int, device: torch.device, dtype: torch.dtype, static: bool = False
    ) -> KVCache:
        """An empty cache of ``max_length`` positions; ``static``: its length a tensor (``KVCache``)."""
        shape = (batch, self.groups, max_length, self.head_dim)
        length = torch.zeros((), dtype=torch.long, device=device) if static else 0
        return KVCache(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
            length,
        )
