"""Rotary position embeddings (RoPE), in the rotate-half layout Megatron and Llama use, optionally
with Llama 3.1's scaling of the low frequencies (Megatron's ``--use-rope-scaling``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mtk.config import ModelConfig


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's frequency scaling: wavelengths longer than ``original_max_position_embeddings /
    low_freq_factor`` are stretched ``factor`` times, those shorter than ``.. / high_freq_factor``
    kept, and the band between blends the two smoothly. Megatron fixes all but ``factor`` to these
    defaults."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def apply(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """The scaled inverse frequencies."""
        wavelength = 2 * math.pi / inv_freq
        # where the wavelength lies between the two bounds: 0 at the long bound, 1 at the short one
        smooth = (self.original_max_position_embeddings / wavelength - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        long = wavelength > self.original_max_position_embeddings / self.low_freq_factor
        short = wavelength < self.original_max_position_embeddings / self.high_freq_factor
        return torch.where(long, inv_freq / self.factor, torch.where(short, inv_freq, blended))


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions ``[0, max_positions)``; buffers, so they follow ``.to(device)``."""

    def __init__(
        self, head_dim: int, max_positions: int, base: float, scaling: RopeScaling | None = None
    ) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.base, self.scaling = head_dim, max_positions, base, scaling
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_buffers()

    def inverse_frequencies(self, device: torch.device | None = None) -> torch.Tensor:
        """One frequency per pair of channels: base^(-2i / head_dim), scaled when ``scaling`` is set."""
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        inv_freq = 1.0 / (self.base**exponents)
        return inv_freq if self.scaling is None else self.scaling.apply(inv_freq)

    def reset_buffers(self) -> None:
        """Compute the tables on the device the buffers are on (after ``to_empty`` from meta too)."""
        device = self.cos.device
        positions = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        angles = torch.outer(positions, self.inverse_frequencies(device))
        angles = torch.cat([angles, angles], dim=-1)
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` of shape (batch, heads, seq, head_dim) by the angles of ``position_ids`` (batch, seq)."""
        cos = self.cos[position_ids].unsqueeze(1).to(x.dtype)
        sin = self.sin[position_ids].unsqueeze(1).to(x.dtype)
        first, second = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-second, first], dim=-1) * sin


def build_rotary(config: ModelConfig) -> RotaryEmbedding:
    """The RoPE tables ``config`` describes (``position_embedding_type = "rope"``)."""
    scaling = (
        RopeScaling(
            config.rope_scaling_factor,
            config.rope_scaling_low_freq_factor,
            config.rope_scaling_high_freq_factor,
            config.rope_scaling_original_max_position_embeddings,
        )
        if config.use_rope_scaling
        else None
    )
    return RotaryEmbedding(config.kv_channels, config.max_position_embeddings, config.rotary_base, scaling)
