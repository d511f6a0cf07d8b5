"""Synthetic GPT samples for benchmarks and tests that have no data on disk."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from mtk.data.gpt_dataset import gpt_sample


class MockGPTDataset:
    """``num_samples`` samples in GPTDataset's format, each a pure function of ``(seed, index)``.

    ``mode="random"``: uniform tokens in ``[0, vocab_size)``. ``mode="arange"``: consecutive ids from a
    random start, wrapping at ``vocab_size``, so every label is its token plus one (a learnable task).
    """

    def __init__(
        self,
        num_samples: int,
        seq_length: int,
        vocab_size: int,
        seed: int,
        mode: Literal["random", "arange"] = "random",
    ) -> None:
        if mode not in ("random", "arange"):
            raise ValueError(f"mode must be 'random' or 'arange', got {mode!r}")
        if num_samples < 1 or seq_length < 1 or vocab_size < 1:
            raise ValueError("num_samples, seq_length and vocab_size must be positive")
        self.num_samples, self.seq_length, self.vocab_size = num_samples, seq_length, vocab_size
        self.seed, self.mode = seed, mode

    def __len__(self) -> int:
        return self.num_samples

    def sample_tokens(self, index: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens (int64) of sample ``index``."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} outside [0, {self.num_samples})")
        rng = np.random.default_rng([self.seed, index])
        if self.mode == "random":
            return rng.integers(0, self.vocab_size, self.seq_length + 1, dtype=np.int64)
        start = rng.integers(0, self.vocab_size)
        return (start + np.arange(self.seq_length + 1, dtype=np.int64)) % self.vocab_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return gpt_sample(self.sample_tokens(index))
