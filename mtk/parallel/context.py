"""Context parallelism: each cp rank holds 2 of the 2 x CP chunks of every sequence.

Load-balanced causal sharding (Megatron's): rank r holds chunks r and 2CP-1-r, so every rank has
as much causal-attention work as the others. Attention all-gathers keys and values over the cp
ranks (Megatron's ``all_gather`` CP communication type) and masks by global position; the
gather's backward reduce-scatters their gradients. It runs on any backend, gloo included.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn


def load_balanced_positions(seq_length: int, cp: int, rank: int) -> torch.Tensor:
    """Global positions (of a ``seq_length`` sequence) that cp rank ``rank`` holds, in its local order."""
    chunk = seq_length // (2 * cp)
    first, second = rank * chunk, (2 * cp - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def shard_sequence(tensor: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """This rank's part of a (batch, seq, ...) tensor of a micro-batch."""
    return tensor.index_select(1, load_balanced_positions(tensor.shape[1], cp, rank).to(tensor.device))


def causal_mask(local_length: int, cp: int, rank: int) -> torch.Tensor:
    """Causal mask (True = attend) of cp rank ``rank``'s ``local_length`` queries against the keys of
    every rank, gathered in rank order: by global position, as one process would mask them."""
    seq = local_length * cp
    queries = load_balanced_positions(seq, cp, rank)
    keys = torch.cat([load_balanced_positions(seq, cp, r) for r in range(cp)])
    return keys[None, :] <= queries[:, None]


class ContextParallelAttention:
    """Drop-in for ``F.scaled_dot_product_attention`` (causal self-attention) on a cp-sharded sequence."""

    def __init__(self, cp_mesh) -> None:
        self.mesh = cp_mesh
        self.size, self.rank = cp_mesh.size(), cp_mesh.get_local_rank()
        self._masks: dict[tuple[int, torch.device], torch.Tensor] = {}

    def _mask(self, local_length: int, device: torch.device) -> torch.Tensor:
        key = (local_length, device)
        if key not in self._masks:
            self._masks[key] = causal_mask(local_length, self.size, self.rank).to(device)
        return self._masks[key]

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = True,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        if attn_mask is not None or not is_causal:
            raise ValueError(
                "context parallelism shards causal self-attention; this attention has a mask or is not causal"
            )
        k = funcol.all_gather_single_autograd(k.contiguous(), gather_dim=2, group=self.mesh)
        v = funcol.all_gather_single_autograd(v.contiguous(), gather_dim=2, group=self.mesh)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=self._mask(q.shape[2], q.device),
            dropout_p=dropout_p,
            enable_gqa=enable_gqa,
        )


def apply_context_parallel(blocks: list[nn.ModuleDict], cp_mesh) -> None:
    """Make the self-attention of every layer of ``blocks`` attend across the cp ranks."""
    attention = ContextParallelAttention(cp_mesh)  # one instance: its masks serve every layer
    for layers in blocks:
        for layer in layers.values():
            layer.attention.core_attention = attention
