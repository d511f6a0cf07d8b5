"""Masked-LM choices (BERT, T5) and sentence-group samples, against Megatron-LM's own outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtk.data.helpers import (
    _mt32_next,
    _mt32_seed,
    _mt64_next,
    _mt64_seed,
    build_sentence_samples,
)
from mtk.data.masking import BERT_MASKING, T5_MASKING, Masking, SpanRoom, bert_replacement, mask_tokens

# ids 0-4 [PAD] [UNK] [CLS] [SEP] [MASK], 5-44 words w0..w39, 45-64 pieces ##p0..##p19
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)]
VOCAB += [f"##p{i}" for i in range(20)]
CONTINUES = np.array([token.startswith("##") for token in VOCAB])
MASK, CLS, SEP = 4, 2, 3

# (masking, tokens, target length, RandomState seed) -> (tokens, positions, labels): the outputs of
# Megatron-LM's MaskedWordPieceDataset._create_masked_lm_predictions (revision d98e8a6) run on these
# inputs, with BERTMaskedWordPieceDataset's / T5MaskedWordPieceDataset's token replacement.
# 300 such random cases agreed when this was written; these are a few of them.
MEGATRON_CASES = [
    ("bert", [2, 29, 5, 11, 30, 3, 40, 38, 23, 33, 63, 36, 3], 118, 359330905,
     [2, 4, 32, 11, 30, 3, 40, 38, 23, 33, 63, 36, 3], [1, 2], [29, 5]),
    ("bert", [2, 50, 32, 3, 20, 7, 45, 22, 21, 29, 12, 27, 23, 28, 44, 56, 45, 17, 52, 57, 3], 61, 59930934,
     [2, 50, 32, 3, 20, 7, 45, 53, 21, 29, 12, 4, 23, 4, 44, 56, 45, 17, 52, 57, 3], [7, 11, 13], [22, 27, 28]),
    ("t5", [31, 21, 29, 10, 41, 37, 26, 57, 57, 60, 19, 34, 20, 27, 35, 54, 64, 31, 6], 111, 25798106,
     [31, 4, 4, 4, 41, 37, 26, 57, 57, 60, 19, 34, 20, 27, 35, 54, 64, 31, 6], [1, 2, 3], [21, 29, 10]),
    ("t5", [38, 35, 32, 25, 29, 51, 60, 6, 12, 32, 43], 47, 133668577,
     [4, 35, 32, 4, 29, 51, 60, 6, 12, 32, 43], [0, 3], [38, 25]),
]  # fmt: skip


def run(kind, tokens, target, seed, room=None):
    masking, replace = (
        (BERT_MASKING, bert_replacement(MASK, np.arange(len(VOCAB))))
        if kind == "bert"
        else (T5_MASKING, lambda rng: MASK)
    )
    return mask_tokens(
        tokens, target, np.random.RandomState(seed), masking, CONTINUES, [CLS, SEP], replace, room
    )


@pytest.mark.parametrize("kind, tokens, target, seed, expected, positions, labels", MEGATRON_CASES)
def test_masking_draws_as_megatron(kind, tokens, target, seed, expected, positions, labels):
    masked = run(kind, tokens, target, seed)
    assert (masked.tokens, masked.positions, masked.labels) == (expected, positions, labels)


def random_sample(rng, words):
    """[CLS] A [SEP] B [SEP] with words of one to three pieces."""
    body = []
    for _ in range(words):
        body += [int(rng.integers(5, 45))] + [int(t) for t in rng.integers(45, 65, rng.integers(0, 3))]
    cut = int(rng.integers(1, len(body)))
    return [CLS, *body[:cut], SEP, *body[cut:], SEP]


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_masking_invariants(kind):
    rng = np.random.default_rng(0)
    longest = 0
    for seed in range(300):
        tokens = random_sample(rng, int(rng.integers(2, 60)))
        masked = run(kind, tokens, 128, seed)
        budget = min(0.15 * 128, max(1, round(len(tokens) * 0.15)))
        assert len(masked.positions) <= budget  # 0 when no word fits the budget
        assert masked.labels == [tokens[p] for p in masked.positions]
        assert not {CLS, SEP} & {tokens[p] for p in masked.positions}
        unchanged = set(range(len(tokens))) - set(masked.positions)
        assert all(masked.tokens[i] == tokens[i] for i in unchanged)
        for positions, labels in masked.spans:  # whole words: a span never starts or ends mid-word
            assert not CONTINUES[tokens[positions[0]]]
            assert positions[-1] + 1 == len(tokens) or not CONTINUES[tokens[positions[-1] + 1]]
            assert labels == [tokens[p] for p in positions]
        flat = [p for positions, _ in masked.spans for p in positions]
        assert flat == masked.positions  # spans are disjoint, in order, and cover the choice
        longest = max([longest, *(len(positions) for positions, _ in masked.spans)])
        if kind == "t5":
            assert all(masked.tokens[p] == MASK for p in masked.positions)
    assert longest > (6 if kind == "t5" else 3)  # n-grams of words, geometric ones longer


def span_cost(masked):
    """Decoder places of T5's spans: a sentinel and the tokens of each."""
    return len(masked.spans) + len(masked.positions)


def check_room(masked, free, tokens, room):
    """``masked`` is the choice ``free`` cut at ``room``: within it, made of ``free``'s spans with
    the same replacements, and all of ``free`` when that fits."""
    assert span_cost(masked) <= room.tokens and len(masked.spans) <= room.spans
    assert all(span in free.spans for span in masked.spans)
    assert all(masked.tokens[p] == free.tokens[p] for p in masked.positions)  # the same draws
    unchanged = set(range(len(tokens))) - set(masked.positions)
    assert all(masked.tokens[i] == tokens[i] for i in unchanged)
    assert masked.labels == [tokens[p] for p in masked.positions]
    assert [p for positions, _ in masked.spans for p in positions] == masked.positions
    if span_cost(free) <= room.tokens and len(free.spans) <= room.spans:
        assert (masked.tokens, masked.positions, masked.spans) == (free.tokens, free.positions, free.spans)
        return False
    return True


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_spans_stop_where_the_room_is_full(kind):
    """A room cuts the choice before the first span that would overflow it: a smaller room keeps a
    subset of what a larger one keeps, and a room the whole choice fits changes nothing (Megatron's
    choice, draw for draw)."""
    rng = np.random.default_rng(1)
    cut = 0
    for seed in range(150):
        tokens = random_sample(rng, int(rng.integers(20, 120)))
        free = run(kind, tokens, 256, seed)
        smaller: list = []
        for places in (6, 10, 18, 40, 10**6):
            room = SpanRoom(tokens=places, spans=100)
            masked = run(kind, tokens, 256, seed, room)
            cut += check_room(masked, free, tokens, room)
            assert all(span in masked.spans for span in smaller)
            smaller = masked.spans
        room = SpanRoom(tokens=10**6, spans=3)  # the sentinels run out
        cut += check_room(run(kind, tokens, 256, seed, room), free, tokens, room)
    assert cut > 300  # the small rooms did cut


def test_bert_replacement_is_80_10_10():
    replace = bert_replacement(MASK, np.arange(5, 45))
    rng = np.random.RandomState(7)
    draws = [replace(rng) for _ in range(20000)]
    masks = sum(d == MASK for d in draws) / len(draws)
    keeps = sum(d is None for d in draws) / len(draws)
    assert abs(masks - 0.8) < 0.01 and abs(keeps - 0.1) < 0.01
    assert {d for d in draws if d not in (MASK, None)} == set(range(5, 45))


def test_masking_without_whole_words_takes_pieces():
    tokens = [CLS, 5, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, SEP]
    whole = mask_tokens(
        tokens, 100, np.random.RandomState(1), Masking(0.15, 1), CONTINUES, [CLS, SEP], lambda r: MASK
    )
    pieces = mask_tokens(
        tokens,
        100,
        np.random.RandomState(1),
        Masking(0.15, 1, whole_word=False),
        CONTINUES,
        [CLS, SEP],
        lambda r: MASK,
    )
    assert whole.positions == []  # the one word is longer than the budget of 2
    assert len(pieces.positions) == 2 and all(len(p) == 1 for p, _ in pieces.spans)
    with pytest.raises(ValueError, match="masking probability"):
        Masking(probability=1.5)


# ---------------------------------------------------------------- Megatron's generators


def test_mersenne_twisters_are_the_cxx_standard_ones():
    # [rand.predef]: the 10000th output of a default-constructed (seed 5489) engine
    state, position = _mt32_seed(5489), np.full(1, 624, np.int64)
    for _ in range(9999):
        _mt32_next(state, position)
    assert int(_mt32_next(state, position)) == 4123659995
    state, position = _mt64_seed(5489), np.full(1, 312, np.int64)
    for _ in range(9999):
        _mt64_next(state, position)
    assert int(_mt64_next(state, position)) == 9981545732273789042
    # numpy's legacy RandomState(seed) is the same 32-bit generator, seeded the same way
    state, position = _mt32_seed(1234), np.full(1, 624, np.int64)
    ours = [int(_mt32_next(state, position)) for _ in range(700)]  # past one twist
    assert ours == np.random.RandomState(1234).randint(0, 2**32, 700, dtype=np.uint32).tolist()


# ---------------------------------------------------------------- sentence-group samples


def documents_of(sentences_per_doc):
    return np.concatenate([[0], np.cumsum(sentences_per_doc)]).astype(np.int64)


def test_sentence_samples_pack_whole_sentences_of_one_document():
    rng = np.random.default_rng(0)
    per_doc = rng.integers(0, 12, 200)
    per_doc[5] = 1  # too few sentences for pairs
    documents = documents_of(per_doc)
    sizes = rng.integers(1, 40, documents[-1]).astype(np.int32)
    sizes[documents[9]] = 600  # a document with a sentence over 512 tokens is left out
    rows = build_sentence_samples(documents, sizes, None, 125, 0.1, 1234, 2)
    again = build_sentence_samples(documents, sizes, None, 125, 0.1, 1234, 2)
    assert np.array_equal(rows, again)
    doc_of = np.searchsorted(documents, rows[:, 0], side="right") - 1
    assert np.all(rows[:, 1] <= documents[doc_of + 1]) and np.all(rows[:, 1] - rows[:, 0] >= 2)
    assert 5 not in doc_of and 9 not in doc_of
    assert np.all((rows[:, 2] >= 2) & (rows[:, 2] <= 125)) and 0 < np.mean(rows[:, 2] < 125) < 0.2
    covered = np.zeros(documents[-1], bool)  # one pass covers every sentence of the kept documents once
    for first, end, _ in rows:
        assert not covered[first:end].any()
        covered[first:end] = True
    kept = [d for d in range(200) if per_doc[d] >= 2 and d != 9]
    assert all(covered[documents[d] : documents[d + 1]].all() for d in kept)
    assert not np.array_equal(rows[:, 0], np.sort(rows[:, 0]))  # shuffled
    for first, end, target in rows:  # a sample closes once it reaches its target, leaving >= 2 behind
        doc = np.searchsorted(documents, first, side="right") - 1
        if end < documents[doc + 1]:
            assert sizes[first:end].sum() >= target
    more = build_sentence_samples(documents, sizes, 3 * len(rows) + 1, 125, 0.1, 1234, 2)
    assert len(more) >= 3 * len(rows) + 1  # whole passes, as Megatron
    no_short = build_sentence_samples(documents, sizes, None, 125, 0.0, 1234, 1)
    assert np.all(no_short[:, 2] == 125)
    with pytest.raises(ValueError, match="prepare the data with --split-sentences"):
        build_sentence_samples(documents_of([1, 1, 1]), np.ones(3, np.int32), None, 64, 0.1, 1, 2)


# ---------------------------------------------------------------- BERT and T5 samples


def write_pair(prefix, documents, dtype):
    """Documents as lists of sentences, written as prepare-data --split-sentences writes them."""
    from mtk.data.indexed import IndexWriter

    writer = IndexWriter(dtype)
    writer.add_documents([len(s) for doc in documents for s in doc], [len(doc) for doc in documents])
    prefix.with_suffix(".bin").write_bytes(
        np.array([t for d in documents for s in d for t in s], dtype).tobytes()
    )
    prefix.with_suffix(".idx").write_bytes(writer.to_bytes())


@pytest.fixture
def sentence_data(tmp_path):
    """60 documents of 1-6 sentences of 2-12 words (words: a w-id and 0-2 ##pieces)."""
    rng = np.random.default_rng(3)
    documents = []
    for _ in range(60):
        document = []
        for _ in range(int(rng.integers(1, 7))):
            sentence = []
            for _ in range(int(rng.integers(2, 13))):
                sentence += [int(rng.integers(5, 45))] + [
                    int(t) for t in rng.integers(45, 65, rng.integers(0, 3))
                ]
            document.append(sentence)
        documents.append(document)
    write_pair(tmp_path / "corpus", documents, np.uint16)
    from mtk.data.indexed import IndexedDataset

    return IndexedDataset(tmp_path / "corpus"), documents


def ids(**extra):
    from mtk.data.masking import WordPieceIds

    return WordPieceIds.from_vocab({token: i for i, token in enumerate(VOCAB)}, **extra)


def test_bert_samples(sentence_data, tmp_path):
    from mtk.data.bert_dataset import BertDataset

    indexed, documents = sentence_data
    data = BertDataset(indexed, "90,10,0", 0, 100, 48, 1234, ids(), cache_dir=tmp_path / "cache")
    again = BertDataset(indexed, "90,10,0", 0, 100, 48, 1234, ids(), cache_dir=tmp_path / "cache")
    assert len(data) >= 100 and data.built_indices and not again.built_indices
    swapped = chosen = masks = 0
    for i in range(len(data)):
        sample = data[i]
        assert all(torch.equal(sample[k], again[i][k]) for k in sample)  # a pure function of the index
        text, types, pad = sample["text"], sample["types"], sample["padding_mask"]
        n = int(pad.sum())
        assert text.shape == (48,) and torch.all(text[n:] == 0) and text[0] == CLS and text[n - 1] == SEP
        masked = sample["loss_mask"].bool()
        assert int(masked.sum()) <= round(0.15 * 45) and torch.all(sample["labels"][~masked] == -1)
        original = text.clone()
        original[masked] = sample["labels"][masked]
        chosen, masks = chosen + int(masked.sum()), masks + int((text[masked] == MASK).sum())
        assert int((original[:n] == SEP).sum()) == 2 and types[n - 1] == 1 and types[0] == 0  # two segments
        swapped += int(sample["is_random"])
        words = original[1:n].tolist()
        assert not any(w in (CLS, MASK) for w in words)
    assert 0.3 < swapped / len(data) < 0.7 and chosen > 3 * len(data) and 0.7 < masks / chosen < 0.9
    valid = BertDataset(indexed, "90,10,0", 1, 10, 48, 1234, ids(), cache_dir=tmp_path / "cache")
    assert valid.sample_index[:, 0].min() >= indexed.document_indices[54]  # documents 54.. are valid


def check_t5_sample(sample, source, sentinels, lengths=None):
    """The sample is ``source`` with each span behind a sentinel, in order, and the decoder <bos>
    (98), then each sentinel with its span, the labels the same shifted by one, ending in <eos> (99);
    the masks mark the tokens. Returns ``source`` with every span token as [MASK]."""
    if lengths is not None:
        assert tuple(sample["text_enc"].shape) == (lengths[0],)
        assert all(tuple(sample[k].shape) == (lengths[1],) for k in ("text_dec", "labels", "loss_mask"))
    encoding, decoding = int(sample["enc_mask"].sum()), int(sample["dec_mask"].sum())
    assert sample["enc_mask"][:encoding].all() and sample["dec_mask"][:decoding].all()
    assert torch.equal(sample["loss_mask"], sample["dec_mask"])
    assert torch.all(sample["text_enc"][encoding:] == 0) and torch.all(sample["text_dec"][decoding:] == 0)
    assert torch.all(sample["labels"][decoding:] == -1)
    encoder = sample["text_enc"][:encoding].tolist()
    decoder = sample["text_dec"][:decoding].tolist()
    labels = sample["labels"][:decoding].tolist()
    assert decoder[0] == 98 and labels[-1] == 99 and decoder[1:] == labels[:-1]
    rebuilt, spans = [], {}  # undo: every sentinel in the encoder stands for its decoder span
    current = None
    for token in labels[:-1]:
        if token in sentinels:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    assert all(spans.values())  # no empty span
    for token in encoder:
        rebuilt += [MASK] * len(spans[token]) if token in sentinels else [token]
    assert len(rebuilt) == len(source)
    assert [s for t, s in zip(rebuilt, source, strict=True) if t != s] == [
        t for span in spans.values() for t in span
    ]
    assert [sentinels.index(t) for t in encoder if t in sentinels] == list(range(len(spans)))
    return rebuilt


def source_of(data, indexed, index):
    first, end, target = (int(v) for v in data.sample_index[index])
    return [int(t) for s in range(first, end) for t in indexed[s]][:target]


def test_t5_samples_put_each_span_behind_a_sentinel(sentence_data, tmp_path):
    from mtk.data.t5_dataset import T5Dataset

    indexed, _ = sentence_data
    sentinels = tuple(range(100, 110))
    with pytest.raises(ValueError, match="--vocab-extra-ids"):
        T5Dataset(indexed, "1,0,0", 0, 10, 64, 32, 1234, ids(), cache_dir=tmp_path)
    data = T5Dataset(
        indexed, "1,0,0", 0, 50, 64, 32, 1234, ids(bos=98, eos=99, sentinels=sentinels), cache_dir=tmp_path
    )
    for i in range(len(data)):
        check_t5_sample(data[i], source_of(data, indexed, i), sentinels, (64, 32))


@pytest.fixture
def long_documents(tmp_path):
    """12 documents of 30-60 sentences of 5-25 words (a word: a w-id and 0-2 ##pieces), so most
    samples fill a 512-token encoder."""
    rng = np.random.default_rng(4)
    documents = []
    for _ in range(12):
        document = []
        for _ in range(int(rng.integers(30, 61))):
            sentence = []
            for _ in range(int(rng.integers(5, 26))):
                sentence += [int(rng.integers(5, 45))]
                sentence += [int(t) for t in rng.integers(45, 65, rng.choice(3, p=[0.8, 0.15, 0.05]))]
            document.append(sentence)
        documents.append(document)
    write_pair(tmp_path / "long", documents, np.uint16)
    from mtk.data.indexed import IndexedDataset

    return IndexedDataset(tmp_path / "long")


@pytest.mark.parametrize("decoder_length", [128, 78])  # t5-220m's, and the least check_run accepts
def test_every_t5_sample_fits_encoder_512_and_its_decoder(long_documents, tmp_path, decoder_length):
    """Megatron's t5-220m samples (encoder 512, decoder 128) can need up to 153 decoder tokens; ours
    stop their spans where the decoder is full, and are Megatron's choice wherever that fits."""
    from mtk.data.t5_dataset import T5Dataset

    sentinels = tuple(range(100, 200))
    wordpiece = ids(bos=98, eos=99, sentinels=sentinels)
    args = (long_documents, "1,0,0", 0, 120, 512, decoder_length, 1234, wordpiece)
    data = T5Dataset(*args, cache_dir=tmp_path / "cache")
    again = T5Dataset(*args, cache_dir=tmp_path / "cache")
    full = cut = 0
    for i in range(120):
        sample = data[i]
        if i % 10 == 0:  # same seed, same sample
            assert all(torch.equal(sample[k], again[i][k]) for k in sample)
        source = source_of(data, long_documents, i)
        full += len(source) == 510
        rebuilt = check_t5_sample(sample, source, sentinels, (512, decoder_length))
        free = mask_tokens(  # the choice without a decoder to fit (Megatron's)
            source, int(data.sample_index[i][2]), np.random.RandomState(1234 + i), T5_MASKING,
            wordpiece.continues_word, [CLS, SEP], lambda rng: MASK,
        )  # fmt: skip
        if 1 + len(free.spans) + len(free.positions) <= decoder_length:
            assert rebuilt == free.tokens
        else:  # cut: fewer spans, each one of the free choice's
            cut += 1
            assert rebuilt != free.tokens
            assert all(free.tokens[p] == MASK for p, t in enumerate(rebuilt) if t == MASK)
        assert int(sample["dec_mask"].sum()) > 1  # at least one span
    assert full > 40  # the encoder was full
    assert cut > 20 or decoder_length == 128


def test_document_level_data_is_refused(tmp_path):
    from mtk.data.bert_dataset import BertDataset
    from mtk.data.indexed import IndexedDataset

    write_pair(tmp_path / "docs", [[[5, 6, 7]], [[8, 9]], [[10, 11]]], np.uint16)
    with pytest.raises(ValueError, match="re-run prepare-data with --split-sentences"):
        BertDataset(IndexedDataset(tmp_path / "docs"), "1,0,0", 0, 10, 32, 1, ids(), cache_dir=tmp_path)


def test_sentence_samples_equal_megatrons_helpers():
    # helpers_cpp.build_mapping of Megatron-LM d98e8a6 (compiled from its helpers.cpp) on these
    # inputs, num_epochs int32 max - 1, 12 samples, max length 16, short probability 0.3, seed 5, two
    # sentences at least; larger random cases agreed in full when this was written.
    documents = np.array([0, 3, 4, 8, 8, 13, 15, 21, 23])
    sizes = np.array([5, 9, 2, 7, 4, 4, 8, 1, 6, 3, 9, 2, 5, 7, 3, 2, 8, 4, 6, 1, 5, 3, 7], np.int32)
    expected = [
        [11, 13, 16], [4, 6, 5], [4, 8, 16], [19, 21, 16], [15, 19, 16], [6, 8, 2], [0, 3, 16], [13, 15, 14],
        [11, 13, 11], [21, 23, 16], [21, 23, 11], [15, 19, 16], [0, 3, 5], [13, 15, 16], [19, 21, 16],
        [8, 11, 16], [8, 11, 16],
    ]  # fmt: skip
    assert build_sentence_samples(documents, sizes, 12, 16, 0.3, 5, 2).tolist() == expected
