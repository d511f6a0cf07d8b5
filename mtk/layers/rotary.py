"""Rotary position embeddings (RoPE), in the rotate-half layout Megatron and Llama use."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions ``[0, max_positions)``; buffers, so they follow ``.to(device)``."""

    def __init__(self, head_dim: int, max_positions: int, base: float) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.base = head_dim, max_positions, base
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Compute the tables on the device the buffers are on (after ``to_empty`` from meta too)."""
        device = self.cos.device
        inv_freq = 1.0 / (
            self.base
            ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim)
        )
        angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float32, device=device), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape (batch, heads, seq, head_dim) by the angles of ``position_ids`` (batch, seq)."""
        cos = self.cos[position_ids].unsqueeze(1).to(x.dtype)
        sin = self.sin[position_ids].unsqueeze(1).to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-second, first], dim=-1) * sin
