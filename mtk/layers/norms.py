"""Normalization layers, chosen by ``ModelConfig.normalization``.

With ``apply_layernorm_1p`` (Megatron's ``--apply-layernorm-1p``, Transformer Engine's
``zero_centered_gamma``) a norm's weight holds gamma - 1: it starts at zero, is applied as
1 + weight, and weight decay pulls gamma towards 1 rather than 0. Both norm types honour it, as
Transformer Engine's LayerNorm and RMSNorm (Megatron's default norms) do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtk.config import ModelConfig
from mtk.layers.init import ZEROS, Init


class LayerNorm(nn.LayerNorm):
    def __init__(self, hidden_size: int, eps: float, zero_centered_gamma: bool = False) -> None:
        super().__init__(hidden_size, eps=eps)
        self.zero_centered_gamma = zero_centered_gamma
        self.initial_gamma = 1.0

    def parameter_inits(self) -> dict[str, Init]:
        return {"weight": gamma_init(self), "bias": ZEROS}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, gamma(self), self.bias, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", zero_centered_gamma=True" if self.zero_centered_gamma else "")


class RMSNorm(nn.RMSNorm):
    def __init__(self, hidden_size: int, eps: float, zero_centered_gamma: bool = False) -> None:
        super().__init__(hidden_size, eps=eps)
        self.zero_centered_gamma = zero_centered_gamma
        self.initial_gamma = 1.0

    def parameter_inits(self) -> dict[str, Init]:
        return {"weight": gamma_init(self)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, gamma(self), self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + (", zero_centered_gamma=True" if self.zero_centered_gamma else "")


def gamma_init(norm: LayerNorm | RMSNorm) -> Init:
    """The weight's initial value: gamma starts at ``initial_gamma`` (1 unless a model scales it)."""
    return Init(fill=norm.initial_gamma - 1 if norm.zero_centered_gamma else norm.initial_gamma)


def gamma(norm: LayerNorm | RMSNorm) -> torch.Tensor:
    """The scale a norm applies: its weight, or 1 + weight when the weight is zero-centred."""
    return norm.weight + 1 if norm.zero_centered_gamma else norm.weight


def build_norm(config: ModelConfig) -> nn.Module:
    kind = RMSNorm if config.normalization == "RMSNorm" else LayerNorm
    return kind(config.hidden_size, eps=config.norm_epsilon, zero_centered_gamma=config.apply_layernorm_1p)


def zero_centered_weights(model: nn.Module) -> list[str]:
    """Names of the parameters of ``model`` that hold gamma - 1 (what a checkpoint without the
    convention, such as a Hugging Face one, stores as gamma)."""
    return [
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if getattr(module, "zero_centered_gamma", False)
    ]
