"""Output heads of the encoder families: the masked-LM head (BERT, T5) and BERT's pooler."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtk.config import ModelConfig
from mtk.layers.init import ZEROS, Init, Linear
from mtk.layers.norms import build_norm


class LMHead(nn.Module):
    """Logits over the vocabulary from hidden states, projecting with the (tied) word embedding
    ``weight`` and adding a bias per token (unless ``bias`` is False: T5 without biases). With
    ``transform`` (BERT) a dense layer, GELU and a norm come first, as Megatron's BertLMHead and Hugging
    Face's ``cls.predictions`` do."""

    def __init__(self, config: ModelConfig, transform: bool, bias: bool = True) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.dense = Linear(hidden, hidden, True, config.init_method_std) if transform else None
        self.norm = build_norm(config) if transform else None
        self.bias = nn.Parameter(torch.empty(config.padded_vocab_size())) if bias else None

    def parameter_inits(self) -> dict[str, Init]:
        return {"bias": ZEROS}

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            x = self.norm(F.gelu(self.dense(x)))
        logits = F.linear(x, weight)
        return logits if self.bias is None else logits + self.bias


class Pooler(nn.Module):
    """tanh(dense(hidden state of the first token)): BERT's sentence representation."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = Linear(config.hidden_size, config.hidden_size, True, config.init_method_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))
