"""T5 samples as Megatron-LM's T5MaskedWordPieceDataset builds them: sentences up to the encoder
length, spans chosen by the shared masking (geometric n-grams up to 10), each span replaced in the
encoder input by a sentinel, and the decoder given <bos> then each sentinel with its span.

One difference: the spans stop where the decoder (or the sentinels) would overflow, so every sample
fits its encoder and decoder lengths. Megatron asserts per sample instead, and its t5-220m recipe
(encoder 512, decoder 128) can draw a sample of up to 153 decoder tokens: many one-token spans.
Wherever Megatron's sample fits, this one is the same."""

from __future__ import annotations

import numpy as np
import torch

from mtk.data.masking import T5_MASKING, Masking, SentenceSamples, SpanRoom, WordPieceIds, mask_tokens


class T5Dataset(SentenceSamples):
    """``num_samples`` (or more) samples: encoder ``encoder_length`` and decoder ``decoder_length``
    tokens, every one within them; ``ids`` must carry bos, eos and the sentinels
    (``--vocab-extra-ids``)."""

    def __init__(
        self,
        indexed,
        split: str,
        split_index: int,
        num_samples: int,
        encoder_length: int,
        decoder_length: int,
        seed: int,
        ids: WordPieceIds,
        *,
        short_probability: float = 0.1,
        masking: Masking = T5_MASKING,
        cache_dir=None,
    ) -> None:
        if ids.bos is None or ids.eos is None or not ids.sentinels:
            raise ValueError(
                "T5 samples need bos, eos and sentinel tokens: prepare the data with --vocab-extra-ids 100"
            )
        super().__init__(
            indexed, split, split_index, num_samples, encoder_length - 2, seed,
            short_probability=short_probability, min_sentences=1, masking=masking, cache_dir=cache_dir,
        )  # fmt: skip
        self.encoder_length, self.decoder_length, self.ids = encoder_length, decoder_length, ids

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sentences, target, rng = self.sentences(index)
        tokens = [int(t) for sentence in sentences for t in sentence]
        truncated = len(tokens) > target
        tokens = tokens[:target]
        ids = self.ids
        room = SpanRoom(tokens=self.decoder_length - 1, spans=len(ids.sentinels))  # after <bos>
        never = (ids.cls, ids.sep)
        masked = mask_tokens(
            tokens, target, rng, self.masking, ids.continues_word, never, lambda r: ids.mask, room
        )
        encoder, decoder_in, decoder_out, start = [], [ids.bos], [], 0
        for (positions, labels), sentinel in zip(masked.spans, ids.sentinels, strict=False):
            encoder += [*masked.tokens[start : positions[0]], sentinel]
            decoder_in += [sentinel, *labels]
            decoder_out += [sentinel, *labels]
            start = positions[-1] + 1
        encoder += masked.tokens[start:]
        decoder_out.append(ids.eos)
        enc_pad, dec_pad = self.encoder_length - len(encoder), self.decoder_length - len(decoder_in)
        loss_mask = np.zeros(self.decoder_length, np.int64)
        loss_mask[: len(decoder_in)] = 1
        return {
            "text_enc": torch.tensor(encoder + [ids.pad] * enc_pad),
            "text_dec": torch.tensor(decoder_in + [ids.pad] * dec_pad),
            "labels": torch.tensor(decoder_out + [-1] * dec_pad),
            "loss_mask": torch.from_numpy(loss_mask),
            "enc_mask": torch.tensor([1] * len(encoder) + [0] * enc_pad),
            "dec_mask": torch.tensor([1] * len(decoder_in) + [0] * dec_pad),
            "truncated": torch.tensor(int(truncated)),
        }
