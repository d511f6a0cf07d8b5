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


MOCK_SPECIALS = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}


def mock_wordpiece_ids(vocab_size: int, sentinels: int = 0):
    """WordPiece ids for mock masked-LM data: the first five ids are the specials, the last
    ``sentinels`` ids T5's sentinels ([CLS] and [SEP] as its <bos> and <eos>)."""
    from mtk.data.masking import WordPieceIds

    if vocab_size < len(MOCK_SPECIALS) + sentinels + 10:
        raise ValueError(
            f"mock masked-LM data needs a vocabulary of {len(MOCK_SPECIALS) + sentinels + 10}+ ids"
        )
    vocab = {**MOCK_SPECIALS, **{f"w{i}": i for i in range(len(MOCK_SPECIALS), vocab_size)}}
    extra = {}
    if sentinels:
        ids = tuple(range(vocab_size - sentinels, vocab_size))
        extra = {"bos": vocab["[CLS]"], "eos": vocab["[SEP]"], "sentinels": ids}
    return WordPieceIds.from_vocab(vocab, **extra)


def mock_sentences(ids, vocab_size: int, seed: int, documents: int = 512):
    """A sentence-level ``IndexedDataset`` of random sentences (2-12 per document, 4-40 tokens of
    regular ids each), a pure function of ``seed``, written to a temporary folder removed at exit;
    returns it and that folder (for its sample-index cache)."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from mtk.data.indexed import IndexedDataset, IndexWriter, token_dtype

    rng = np.random.default_rng(seed)
    regular_end = vocab_size - len(ids.sentinels)
    per_document = rng.integers(2, 13, documents)
    lengths = rng.integers(4, 41, int(per_document.sum()))
    tokens = rng.integers(len(MOCK_SPECIALS), regular_end, int(lengths.sum()))
    folder = Path(tempfile.mkdtemp(prefix="mtk-mock-"))
    atexit.register(shutil.rmtree, folder, True)
    dtype = token_dtype(vocab_size)
    writer = IndexWriter(dtype)
    writer.add_documents(lengths.astype(np.int32), per_document.astype(np.int64))
    (folder / "mock.bin").write_bytes(tokens.astype(dtype).tobytes())
    (folder / "mock.idx").write_bytes(writer.to_bytes())
    return IndexedDataset(folder / "mock"), folder


class MockRetroDataset(MockGPTDataset):
    """Mock GPT samples with uniform random neighbour tokens (batch, chunks, k, 2 x chunk length)."""

    def __init__(self, num_samples: int, config, seed: int) -> None:
        super().__init__(num_samples, config.seq_length, config.vocab_size, seed)
        from mtk.data.retro import neighbour_shape

        self.shape = neighbour_shape(config.seq_length, config.retro_chunk_length, config.retro_num_neighbors)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index, 1])
        neighbours = torch.from_numpy(rng.integers(0, self.vocab_size, self.shape, dtype=np.int64))
        return super().__getitem__(index) | {"neighbours": neighbours}
