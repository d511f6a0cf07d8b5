"""GPT samples from an indexed dataset, built the way Megatron-LM's ``GPTDataset`` builds them.

A split's sequences are repeated for as many epochs as the requested samples need and shuffled
(document index), the resulting token stream is cut into samples of ``seq_length + 1`` tokens that
share one token with their neighbour (sample index), and the samples are shuffled (shuffle index).
One ``numpy.random.RandomState(seed)`` drives both shuffles, in that order, as in Megatron.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from mtk.data.helpers import (
    build_sample_index,
    cached_indices,
    default_cache_dir,
    index_description,
    total_length,
)
from mtk.data.indexed import IndexedDataset
from mtk.data.splits import SPLIT_NAMES, split_indices

INDEX_NAMES = ("document_index", "sample_index", "shuffle_index")
# When the last epoch contributes less than this share of an epoch, Megatron shuffles it on its own:
# its samples then come after all the full epochs, so the run sees those epochs evenly.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


def _shuffled(array: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
    rng.shuffle(array)
    return array


def build_indices(
    sequence_lengths: np.ndarray, indices: np.ndarray, num_samples: int, seq_length: int, seed: int
) -> dict[str, np.ndarray]:
    """Megatron's document, sample and shuffle indices for ``num_samples`` samples from ``indices``.

    ``document_index`` (int32 sequence ids, all epochs), ``sample_index`` (see ``build_sample_index``)
    and ``shuffle_index`` (uint32, or int64 when that large): sample ``i`` of the dataset is row
    ``shuffle_index[i]`` of the sample index. There are at least ``num_samples`` samples.
    """
    tokens_per_epoch = total_length(sequence_lengths, indices)
    if tokens_per_epoch < 2:
        raise ValueError(f"{len(indices)} sequences hold {tokens_per_epoch} tokens: too few to make samples")
    # n samples of seq_length + 1 tokens, each sharing one with the next, need n * seq_length + 1 tokens.
    num_epochs = -(-(num_samples * seq_length + 1) // tokens_per_epoch)
    samples_before_final_epoch = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    samples_per_epoch = (tokens_per_epoch - 1) // seq_length
    separate_final_epoch = num_epochs > 1 and num_samples - samples_before_final_epoch < int(
        SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch
    )

    rng = np.random.RandomState(seed)
    epoch_groups = [num_epochs - 1, 1] if separate_final_epoch else [num_epochs]
    document_index = np.concatenate(
        [_shuffled(np.tile(indices.astype(np.int32), epochs), rng) for epochs in epoch_groups]
    )
    sample_index = build_sample_index(sequence_lengths, document_index, seq_length)

    total = len(sample_index) - 1
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    cut = samples_before_final_epoch if separate_final_epoch else total
    # Shuffling the empty second range of the unseparated case draws nothing from rng, as in Megatron.
    shuffle_index = np.concatenate(
        [_shuffled(np.arange(0, cut, dtype=dtype), rng), _shuffled(np.arange(cut, total, dtype=dtype), rng)]
    )
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


def gpt_sample(text: np.ndarray, mask_token: int | None = None) -> dict[str, torch.Tensor]:
    """The training dict for ``seq_length + 1`` tokens ``text``, as Megatron's GPTDataset returns it.

    ``tokens`` = text[:-1], ``labels`` = text[1:] (int64), ``loss_mask`` (float32) is 1 except at
    positions where ``tokens == mask_token`` (Megatron's ``eod_mask_loss``), ``position_ids`` = arange.
    """
    text = torch.as_tensor(np.asarray(text, dtype=np.int64))
    tokens, labels = text[:-1], text[1:]
    loss_mask = torch.ones(len(tokens), dtype=torch.float32)
    if mask_token is not None:
        loss_mask[tokens == mask_token] = 0.0
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": torch.arange(len(tokens)),
    }


class GPTDataset:
    """``num_samples`` (or a few more) GPT samples from split ``split_index`` of an indexed dataset.

    Indices are built once and cached in ``cache_dir`` (default ``<dir of prefix>/.mtk-cache``) under a
    hash of everything that affects them; ``built_indices`` says whether this instance built them.
    """

    def __init__(
        self,
        indexed: IndexedDataset,
        split: str,
        split_index: int,
        num_samples: int,
        seq_length: int,
        seed: int,
        *,
        cache_dir: str | os.PathLike | None = None,
        eod: int | None = None,
        eod_mask_loss: bool = False,
    ) -> None:
        if eod_mask_loss and eod is None:
            raise ValueError("eod_mask_loss needs the end-of-document token id: pass eod=")
        if num_samples < 1 or seq_length < 1:
            raise ValueError(f"num_samples ({num_samples}) and seq_length ({seq_length}) must be positive")
        indices = split_indices(split, len(indexed))[split_index]
        if len(indices) == 0:
            raise ValueError(
                f"{indexed.prefix}: split {split!r} leaves the {SPLIT_NAMES[split_index]} split none of the "
                f"{len(indexed)} sequences; give it a larger share or request no {SPLIT_NAMES[split_index]} samples"
            )
        self.indexed = indexed
        self.seq_length = seq_length
        self.mask_token = eod if eod_mask_loss else None
        self.description = index_description(
            self, indexed, split, split_index,
            num_samples=num_samples, seq_length=seq_length, seed=seed, add_extra_token=1,
        )  # fmt: skip
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(indexed.prefix)
        arrays, self.built_indices = cached_indices(
            self.cache_dir,
            self.description,
            INDEX_NAMES,
            lambda: build_indices(indexed.sequence_lengths, indices, num_samples, seq_length, seed),
        )
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def sample_tokens(self, index: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens (int64) of sample ``index``, documents in document-index order."""
        row = int(self.shuffle_index[index])
        first, first_offset = (int(value) for value in self.sample_index[row])
        last, last_offset = (int(value) for value in self.sample_index[row + 1])
        parts = []
        for position in range(first, last + 1):
            offset = first_offset if position == first else 0
            length = last_offset + 1 - offset if position == last else None
            parts.append(self.indexed.get(int(self.document_index[position]), offset, length))
        return np.concatenate(parts, dtype=np.int64)

    def sample_documents(self, index: int) -> np.ndarray:
        """Ids of the documents that sample ``index`` takes tokens from (its extra last token included)."""
        row = int(self.shuffle_index[index])
        first, last = int(self.sample_index[row][0]), int(self.sample_index[row + 1][0])
        return np.asarray(self.document_index[first : last + 1], dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return gpt_sample(self.sample_tokens(index), self.mask_token)
