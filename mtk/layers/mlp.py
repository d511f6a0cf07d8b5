"""Feed-forward block: GELU (GPT-3, BERT, T5) or SwiGLU (Llama)."""

from __future__ import annotations

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
        self.gate = Linear(hidden, ffn, bias, std) if config.swiglu else None
        self.fc2 = Linear(ffn, hidden, bias, output_std)
        self.approximate = "tanh" if config.openai_gelu else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))
        return self.fc2(F.silu(self.gate(x)) * self.fc1(x))
