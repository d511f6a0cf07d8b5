"""Feed-forward block: GELU (GPT-3, BERT, Megatron's T5), ReLU (T5 v1.0), SwiGLU (Llama) or GEGLU (T5 v1.1)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from mtk.config import ModelConfig
from mtk.layers.init import Linear


class MLP(nn.Module):
    """``output_std`` is the init std of ``fc2``, the projection back to the residual stream."""

    def __init__(self, config: ModelConfig, output_std: float) -> None:
        super().__init__()
        hidden, ffn, bias = config.hidden_size, config.ffn_hidden_size, config.add_bias_linear
        std = config.init_method_std
        self.fc1 = Linear(hidden, ffn, bias, std)
        self.gate = Linear(hidden, ffn, bias, std) if config.swiglu or config.geglu else None
        self.fc2 = Linear(ffn, hidden, bias, output_std)
        approximate = "tanh" if config.openai_gelu else "none"
        self.activation: Callable[[torch.Tensor], torch.Tensor] = (
            F.silu if config.swiglu else F.relu if config.relu else partial(F.gelu, approximate=approximate)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """fc2(act(fc1(x))), or gated: fc2(act(gate(x)) * fc1(x))."""
        if self.gate is None:
            return self.fc2(self.activation(self.fc1(x)))
        return self.fc2(self.activation(self.gate(x)) * self.fc1(x))
