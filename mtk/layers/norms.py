"""Normalization layers, chosen by ``ModelConfig.normalization``."""

from __future__ import annotations

from torch import nn

from mtk.config import ModelConfig


def build_norm(config: ModelConfig) -> nn.Module:
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_epsilon)
