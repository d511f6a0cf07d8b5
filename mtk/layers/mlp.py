"""Feed-forward block: GELU (GPT-3, BERT, T5) or SwiGLU (Llama)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtk.config import ModelConfig


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden, ffn, bias = config.hidden_size, config.ffn_hidden_size, config.add_bias_linear
        self.fc1 = nn.Linear(hidden, ffn, bias=bias)
        self.gate = nn.Linear(hidden, ffn, bias=bias) if config.swiglu else None
        self.fc2 = nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.fc2(F.gelu(self.fc1(x)))
        return self.fc2(F.silu(self.gate(x)) * self.fc1(x))
