"""Masked-LM predictions shared by BERT and T5: which tokens a sample hides, as Megatron-LM's
``MaskedWordPieceDataset._create_masked_lm_predictions`` chooses them, draw for draw.

Candidates are words (a token and the ``##`` pieces after it, with whole-word masking) or single
tokens; [CLS]/[SEP] never are. Candidates are shuffled, and each one in turn extends into an n-gram
of up to ``max_ngram`` candidates (n drawn with probability 1/n, or from SpanBERT's geometric
distribution with p = 0.2), shortened until it fits the budget of ``probability`` x the length,
and skipped when it overlaps one already chosen. The caller decides what replaces a chosen token
(BERT: [MASK] 80%, a random token 10%, itself 10%; T5: always [MASK], then a sentinel per span).

T5 also gives a room (:class:`SpanRoom`): its decoder holds <bos>, then a sentinel and the tokens
of each span, and there are only so many sentinels. Choosing stops at the first chosen span that
would overflow the room, so a sample always fits its decoder. Megatron has no such stop and asserts
instead; wherever its sample fits, the choice here is its choice, draw for draw.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtk.data.helpers import build_sentence_samples, cached_indices, default_cache_dir, index_description
from mtk.data.indexed import IndexedDataset
from mtk.data.splits import SPLIT_NAMES, split_indices


@dataclass(frozen=True)
class Masking:
    """How tokens are chosen; the BERT and T5 recipes' values are :data:`BERT_MASKING` and
    :data:`T5_MASKING` (Megatron's pretrain_bert.py / pretrain_t5.py)."""

    probability: float = 0.15
    max_ngram: int = 3
    whole_word: bool = True
    longer_ngrams_first: bool = False  # n drawn with probability ~ n instead of ~ 1/n
    geometric: bool = False  # SpanBERT: n ~ Geometric(0.2), clipped to max_ngram

    def __post_init__(self) -> None:
        if not 0 < self.probability < 1 or self.max_ngram < 1:
            raise ValueError(f"masking probability must lie in (0, 1) and max_ngram be >= 1: {self}")


BERT_MASKING = Masking(max_ngram=3)
T5_MASKING = Masking(max_ngram=10, geometric=True)


@dataclass(frozen=True)
class SpanRoom:
    """Where T5 puts the chosen spans: ``tokens`` decoder places, each span taking one for its
    sentinel and one per token, and at most ``spans`` spans (one sentinel each)."""

    tokens: int
    spans: int


@dataclass
class Masked:
    tokens: list[int]  # the sample with its chosen tokens replaced
    positions: list[int]  # chosen positions, ascending
    labels: list[int]  # the original token at each chosen position
    spans: list[tuple[list[int], list[int]]]  # (positions, original tokens) per chosen n-gram, in order


def mask_tokens(
    tokens: Sequence[int],
    target_length: int,
    rng: np.random.RandomState,
    masking: Masking,
    continues_word: np.ndarray,
    never: Sequence[int],
    replace: Callable[[np.random.RandomState], int | None],
    room: SpanRoom | None = None,
) -> Masked:
    """Choose and replace tokens of one sample. ``continues_word[id]`` is True for ``##`` pieces;
    ``never`` are ids that are not candidates ([CLS], [SEP]); ``replace(rng)`` gives the id a
    chosen token becomes (None: it stays). With ``room``, choosing stops before the first span
    that would not fit it: the spans are the longest prefix, in the order chosen, that fits."""
    candidates: list[list[int]] = []
    excluded = set(never)
    for position, token in enumerate(tokens):
        if token in excluded:
            continue
        if continues_word[token] and masking.whole_word and candidates:
            candidates[-1].append(position)
        else:
            candidates.append([position])
    budget = min(masking.probability * target_length, max(1, int(round(len(tokens) * masking.probability))))
    sizes = np.arange(masking.max_ngram, dtype=np.int64) + 1
    weights = 1.0 / sizes
    weights = weights / weights.sum(keepdims=True)
    if masking.longer_ngrams_first:
        weights = weights[::-1]
    ngrams = [[candidates[start : start + n] for n in sizes] for start in range(len(candidates))]
    rng.shuffle(ngrams)

    out = list(tokens)
    chosen: list[tuple[int, int]] = []
    spans: list[tuple[list[int], list[int]]] = []
    taken: set[int] = set()
    for options in ngrams:
        if len(chosen) >= budget:
            break
        if masking.geometric:
            n = min(rng.geometric(0.2), masking.max_ngram)
        else:
            p = weights[: len(options)] / weights[: len(options)].sum(keepdims=True)
            n = rng.choice(sizes[: len(options)], p=p)
        while True:  # the longest n-gram, from n down, that fits the budget
            positions = sum(options[n - 1], [])
            n -= 1
            if budget >= len(chosen) + len(positions):
                break
            if n == 0:
                positions = None
                break
        if positions is None or any(position in taken for position in positions):
            continue
        if room is not None and (
            len(spans) == room.spans or len(chosen) + len(spans) + 1 + len(positions) > room.tokens
        ):
            break  # the room is used; Megatron's sample would not fit and it would assert
        for position in positions:
            taken.add(position)
            replacement = replace(rng)
            out[position] = tokens[position] if replacement is None else replacement
            chosen.append((position, tokens[position]))
        spans.append((positions, [tokens[position] for position in positions]))
    chosen.sort()
    spans.sort(key=lambda span: span[0][0])
    return Masked(out, [p for p, _ in chosen], [label for _, label in chosen], spans)


def bert_replacement(mask_id: int, vocab_ids: np.ndarray) -> Callable[[np.random.RandomState], int | None]:
    """BERT's 80/10/10: [MASK], else half the time a random vocabulary id, else the token itself."""

    def replace(rng: np.random.RandomState) -> int | None:
        if rng.random() < 0.8:
            return mask_id
        if rng.random() >= 0.5:
            return int(vocab_ids[rng.randint(0, len(vocab_ids))])
        return None

    return replace


@dataclass(frozen=True)
class WordPieceIds:
    """The ids a masked-LM sample needs from a WordPiece vocabulary (T5 adds bos/eos and sentinels)."""

    cls: int
    sep: int
    mask: int
    pad: int
    continues_word: np.ndarray  # bool per id: a "##" piece
    bos: int | None = None
    eos: int | None = None
    sentinels: tuple[int, ...] = ()

    @classmethod
    def from_vocab(cls, vocab: dict[str, int], **extra: Any) -> WordPieceIds:
        size = max(vocab.values()) + 1
        continues = np.zeros(size, bool)
        continues[[i for token, i in vocab.items() if token.startswith("##")]] = True
        missing = [t for t in ("[CLS]", "[SEP]", "[MASK]", "[PAD]") if t not in vocab]
        if missing:
            raise ValueError(
                f"the vocabulary has no {', '.join(missing)}: masked-LM samples need a BERT WordPiece one"
            )
        return cls(vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"], vocab["[PAD]"], continues, **extra)

    @classmethod
    def from_manifest(cls, entry: dict[str, Any] | None, family: str, sentinels: bool) -> WordPieceIds:
        """The ids of the WordPiece tokenizer a data manifest records (reloaded from its files, checked
        unchanged). ``sentinels``: T5's, the ``--vocab-extra-ids`` tokens, with [CLS] as <bos> and
        [SEP] as <eos> (Megatron's BertWordPieceCase); or T5's own tokenizer.json (``from_sentencepiece``)."""
        from mtk.data.tokenizer import EXTRA_ID, tokenizer_from_manifest

        if not entry:
            raise ValueError(
                f"{family} samples need the WordPiece vocabulary of the data, which has no mtk manifest: "
                "prepare it with `mtk prepare-data --tokenizer VOCAB.txt --split-sentences`"
            )
        if entry["kind"] == "hf" and sentinels:  # T5's own SentencePiece tokenizer (an imported T5)
            return cls.from_sentencepiece(
                tokenizer_from_manifest(entry).core.get_vocab(with_added_tokens=True)
            )
        if entry["kind"] != "wordpiece":
            raise ValueError(
                f"{family} trains on WordPiece data ([CLS] [SEP] [MASK] [PAD]); this data was prepared "
                f"with a {entry['kind']} tokenizer: prepare it with a BERT vocab.txt "
                "(`mtk tokenizer train --kind wordpiece` makes one)"
            )
        extra = entry.get("vocab_extra_ids", 0)
        if sentinels and not extra:
            raise ValueError(
                f"{family} samples need sentinel tokens: prepare the data with --vocab-extra-ids 100"
            )
        vocab = tokenizer_from_manifest(entry).core.get_vocab(with_added_tokens=True)
        if not sentinels:
            return cls.from_vocab(vocab)
        ids = [vocab[EXTRA_ID.format(i)] for i in range(extra)]
        return cls.from_vocab(vocab, bos=vocab["[CLS]"], eos=vocab["[SEP]"], sentinels=tuple(ids))

    @classmethod
    def from_sentencepiece(cls, vocab: dict[str, int]) -> WordPieceIds:
        """The ids of T5's SentencePiece vocabulary (a Hugging Face tokenizer.json): ``<pad>`` starts the
        decoder (Hugging Face's ``decoder_start_token_id``), ``</s>`` ends it and is never masked, the
        sentinels are ``<extra_id_0>``, ``<extra_id_1>`` ... found by name (T5 puts them last,
        ``<extra_id_0>`` the highest id), and a piece without the "▁" of a word start continues a word."""
        from mtk.data.tokenizer import EXTRA_ID

        sentinels: list[int] = []
        while EXTRA_ID.format(len(sentinels)) in vocab:
            sentinels.append(vocab[EXTRA_ID.format(len(sentinels))])
        missing = [t for t in ("<pad>", "</s>") if t not in vocab] + ([] if sentinels else ["<extra_id_0>"])
        if missing:
            raise ValueError(
                f"the tokenizer has no {', '.join(missing)}: T5 samples need T5's SentencePiece vocabulary "
                "with its sentinels, or a WordPiece one prepared with --vocab-extra-ids 100"
            )
        pad, eos = vocab["<pad>"], vocab["</s>"]
        special = {pad, eos, vocab.get("<unk>", pad), *sentinels}
        continues = np.zeros(max(vocab.values()) + 1, bool)
        continues[[i for piece, i in vocab.items() if not piece.startswith("▁") and i not in special]] = True
        # T5 samples never hold a [CLS] or [SEP]: </s> (each encoded text's end) takes their place
        return cls(
            eos, eos, vocab.get("<unk>", pad), pad, continues, bos=pad, eos=eos, sentinels=tuple(sentinels)
        )


class SentenceSamples:
    """Samples of whole sentences from split ``split_index`` of a sentence-level indexed dataset,
    as Megatron's MaskedWordPieceDataset draws them: the split cuts documents, the sample index
    (:func:`build_sentence_samples`) is cached under a hash of its inputs, and sample ``i`` gets its
    own ``RandomState(seed + i)``, so a sample is a pure function of its index (exact resume)."""

    def __init__(
        self,
        indexed: IndexedDataset,
        split: str,
        split_index: int,
        num_samples: int,
        max_length: int,
        seed: int,
        *,
        short_probability: float,
        min_sentences: int,
        masking: Masking,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        documents = indexed.document_indices
        if len(documents) > 2 and np.all(np.diff(documents) <= 1):
            raise ValueError(
                f"{indexed.prefix}: one sequence per document; masked-LM samples are groups of "
                "sentences: re-run prepare-data with --split-sentences"
            )
        chosen = split_indices(split, len(documents) - 1)[split_index]
        if len(chosen) == 0:
            raise ValueError(
                f"{indexed.prefix}: split {split!r} leaves the {SPLIT_NAMES[split_index]} split no document"
            )
        self.indexed, self.seed, self.masking = indexed, seed, masking
        self.description = index_description(
            self, indexed, split, split_index,
            num_samples=num_samples, max_length=max_length, seed=seed, short_probability=short_probability,
            min_sentences=min_sentences, masking=asdict(masking),
        )  # fmt: skip
        bounds = documents[np.append(chosen, chosen[-1] + 1)]
        arrays, self.built_indices = cached_indices(
            Path(cache_dir) if cache_dir is not None else default_cache_dir(indexed.prefix),
            self.description,
            ("sample_index",),
            lambda: {
                "sample_index": build_sentence_samples(
                    bounds,
                    indexed.sequence_lengths,
                    num_samples,
                    max_length,
                    short_probability,
                    seed,
                    min_sentences,
                )
            },
        )
        self.sample_index = arrays["sample_index"]

    def __len__(self) -> int:
        return len(self.sample_index)

    def sentences(self, index: int) -> tuple[list[np.ndarray], int, np.random.RandomState]:
        first, end, target = (int(v) for v in self.sample_index[index])
        rng = np.random.RandomState((self.seed + index) % 2**32)
        return [self.indexed[i] for i in range(first, end)], target, rng
