"""Normalization layers, chosen by ``ModelConfig.normalization``."""

from __future__ import annotations

from torch import nn

from mtk.config import ModelConfig
from mtk.layers.init import LayerNorm, RMSNorm


def build_norm(config: ModelConfig) -> nn.Module:
    if config.normalization == "RMSNorm":
        return RMSNorm(config.hidden_size, eps=config.norm_epsilon)
    return LayerNorm(config.hidden_size, eps=config.norm_epsilon)
