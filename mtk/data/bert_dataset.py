"""BERT samples as Megatron-LM's BERTMaskedWordPieceDataset builds them: two segments of sentences
(swapped with probability 0.5 for sentence-order prediction), trimmed to the target length from a
random end of the longer one, [CLS] A [SEP] B [SEP], masked (80/10/10) and padded."""

from __future__ import annotations

import numpy as np
import torch

from mtk.data.masking import (
    BERT_MASKING,
    Masking,
    SentenceSamples,
    WordPieceIds,
    bert_replacement,
    mask_tokens,
)


class BertDataset(SentenceSamples):
    """``num_samples`` (or more) samples of ``seq_length`` tokens; ``binary_head``: two segments and
    the sentence-order label (Megatron's --bert-binary-head, the default), else one segment."""

    def __init__(
        self,
        indexed,
        split: str,
        split_index: int,
        num_samples: int,
        seq_length: int,
        seed: int,
        ids: WordPieceIds,
        *,
        binary_head: bool = True,
        short_probability: float = 0.1,
        masking: Masking = BERT_MASKING,
        cache_dir=None,
    ) -> None:
        super().__init__(
            indexed, split, split_index, num_samples, seq_length - 3, seed,
            short_probability=short_probability, min_sentences=2 if binary_head else 1, masking=masking,
            cache_dir=cache_dir,
        )  # fmt: skip
        self.seq_length, self.ids, self.binary_head = seq_length, ids, binary_head
        self.replace = bert_replacement(ids.mask, np.arange(len(ids.continues_word)))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sentences, target, rng = self.sentences(index)
        pivot, swapped = len(sentences), False
        if self.binary_head:
            pivot = int(rng.randint(low=1, high=len(sentences))) if len(sentences) >= 3 else 1
            swapped = rng.random() < 0.5
        a = [int(t) for sentence in sentences[:pivot] for t in sentence]
        b = [int(t) for sentence in sentences[pivot:] for t in sentence]
        if swapped:
            a, b = b, a
        truncated = len(a) + len(b) > target
        while len(a) + len(b) > target:
            longer = a if len(a) > len(b) else b
            del longer[0 if rng.random() < 0.5 else -1]
        ids = self.ids
        tokens = [ids.cls, *a, ids.sep] + ([*b, ids.sep] if b else [])
        types = [0] * (len(a) + 2) + [1] * (len(b) + 1 if b else 0)
        masked = mask_tokens(
            tokens, target, rng, self.masking, ids.continues_word, (ids.cls, ids.sep), self.replace
        )
        pad = self.seq_length - len(tokens)
        labels = np.full(self.seq_length, -1, np.int64)
        labels[masked.positions] = masked.labels
        loss_mask = np.zeros(self.seq_length, np.int64)
        loss_mask[masked.positions] = 1
        return {
            "text": torch.tensor(masked.tokens + [ids.pad] * pad),
            "types": torch.tensor(types + [0] * pad),
            "labels": torch.from_numpy(labels),
            "is_random": torch.tensor(int(swapped)),
            "padding_mask": torch.tensor([1] * len(tokens) + [0] * pad),
            "loss_mask": torch.from_numpy(loss_mask),
            "truncated": torch.tensor(int(truncated)),
        }
