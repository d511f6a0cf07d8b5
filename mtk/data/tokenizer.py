"""Tokenizers for preprocessing: Hugging Face tokenizer.json, GPT-2 BPE, BERT WordPiece, null.

``load_tokenizer(spec)`` finds out what a path holds and returns a :class:`Tokenizer`, whose
``encode_batch`` is the hot path of ``mtk prepare-data``. ``describe()`` is its manifest entry (kind,
settings, files with sha256); ``tokenizer_identity(entry)`` says when two entries are the same
tokenizer. Worker processes rebuild it with ``tokenizer_from_manifest(entry)``, which refuses files
that changed since; pickling a tokenizer does the same. Training lives in ``tokenizer_training``.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar

from mtk.manifest import ManifestError, describe_file, read_manifest, sha256_file

# Preprocessing gets its parallelism from worker processes; a thread pool inside `tokenizers` in every
# worker would only oversubscribe the cores. `tokenizers` reads this at each call.
os.environ["TOKENIZERS_PARALLELISM"] = "false"

KINDS = ("hf", "gpt2bpe", "wordpiece", "null")
ENDOFTEXT = "<|endoftext|>"
# The pre-tokenizer of openai/gpt-2's encoder.py; `tokenizers`' ByteLevel uses the same one.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOD_TOKENS = (ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>")
BERT_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
TRAINED_MANIFEST = "mtk-tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer cannot be found, loaded, reloaded as recorded, or trained."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, in the order of GPT-2's ids 0..255."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [byte for byte in range(256) if byte not in printable]
    return {
        **{byte: chr(byte) for byte in printable},
        **{byte: chr(256 + n) for n, byte in enumerate(others)},
    }


@dataclass(eq=False)
class Tokenizer(ABC):
    """A loaded tokenizer: every id is below ``vocab_size``; ``eod`` ends a document (None: no such token).

    Subclasses differ only in how they encode and decode; ``backend`` names the encoder in use.
    """

    kind: str
    vocab_size: int
    eod: int | None
    files: list[dict[str, Any]] = field(default_factory=list)  # describe_file() entries; [0] reloads it
    lower_case: bool | None = None  # wordpiece only
    special_ids: dict[str, int] = field(default_factory=dict)  # wordpiece: pad, unk, cls, sep, mask
    backend: ClassVar[str]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text; single-threaded (parallelism comes from worker processes)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""

    def describe(self) -> dict[str, Any]:
        """The manifest entry: kind, settings, vocab_size, eod, and the files read, with sha256."""
        entry: dict[str, Any] = {"kind": self.kind}
        if self.lower_case is not None:
            entry["lower_case"] = self.lower_case
        entry.update(vocab_size=self.vocab_size, eod=self.eod)
        if self.special_ids:
            entry["special_ids"] = dict(self.special_ids)
        entry["files"] = [dict(file) for file in self.files]
        return entry

    def __reduce__(self) -> tuple[Any, ...]:
        # rebuilt from its files in the receiving process, which also checks they did not change
        return tokenizer_from_manifest, (self.describe(),)


@dataclass(eq=False)
class NullTokenizer(Tokenizer):
    """Megatron's NullTokenizer: text is whitespace-separated ids below N; eod is N, vocab_size N + 1."""

    backend: ClassVar[str] = "python"

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._ids(text) for text in texts]

    def _ids(self, text: str) -> list[int]:
        limit = self.vocab_size - 1
        try:
            ids = list(map(int, text.split()))
        except ValueError:
            for piece in text.split():  # find the culprit only once there is one
                try:
                    int(piece)
                except ValueError:
                    raise ValueError(f"null tokenizer: {piece!r} is not an integer token id") from None
            raise
        if ids and (min(ids) < 0 or max(ids) >= limit):
            bad = next(i for i in ids if not 0 <= i < limit)
            raise ValueError(f"null tokenizer: token {bad} is outside [0, {limit}) (vocab_size {limit})")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(map(str, ids))


@dataclass(eq=False)
class TokenizersTokenizer(Tokenizer):
    """Encodes with a Hugging Face ``tokenizers`` pipeline: hf, wordpiece, and gpt2bpe without the fast path."""

    backend: ClassVar[str] = "tokenizers"
    core: Any = field(default=None, repr=False)  # tokenizers.Tokenizer
    add_special_tokens: bool = False  # hf: True, as Megatron's HuggingFaceTokenizer

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self.core.encode_batch_fast(list(texts), add_special_tokens=self.add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        return self.core.decode(list(map(int, ids)), skip_special_tokens=False)


@dataclass(eq=False)
class TiktokenTokenizer(TokenizersTokenizer):
    """GPT-2 BPE encoded by tiktoken, about 5x faster (see :func:`_tiktoken_ranks` for when it applies)."""

    backend: ClassVar[str] = "tiktoken"
    fast: Any = field(default=None, repr=False)  # tiktoken.Encoding

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # A plain loop: tiktoken's encode_batch goes through a thread pool, which costs more than it
        # gives with one thread (3.6x slower on sentence-sized texts).
        encode, allowed = self.fast.encode, self.fast.special_tokens_set
        return [encode(text, allowed_special=allowed, disallowed_special=()) for text in texts]


def load_tokenizer(
    spec: str | os.PathLike,
    kind: str | None = None,
    vocab_size: int | None = None,
    lower_case: bool | None = None,
) -> Tokenizer:
    """Load the tokenizer at ``spec`` (a path, or ``null``), of ``kind`` or of the kind its files show.

    ``hf``: a tokenizer.json or a directory with one, encoded with its special tokens added (eod: the
    ``eos_token`` of a tokenizer_config.json beside it, else a common end-of-text token in the vocabulary).
    ``gpt2bpe``: a directory with GPT-2 vocab.json + merges.txt; a literal ``<|endoftext|>`` in the text
    is that token (the eod). ``wordpiece``: a BERT vocab.txt or a directory with one; ``lower_case``
    None detects it. ``null``: needs ``vocab_size``. A directory written by ``train_tokenizer``
    loads as what it was trained as. Raises :class:`TokenizerError` (a ValueError) saying what is wrong.
    """
    kind = kind or detect_kind(spec)
    if kind not in KINDS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")
    if vocab_size is not None and kind != "null":
        raise TokenizerError(
            f"vocab_size is for the null tokenizer; a {kind} vocabulary comes from its files"
        )
    if lower_case is not None and kind != "wordpiece":
        raise TokenizerError(f"lower_case is for wordpiece; a {kind} tokenizer's files define its casing")
    if kind == "null":
        if vocab_size is None or vocab_size < 1:
            raise TokenizerError("the null tokenizer needs vocab_size N >= 1 (ids lie below N; eod is N)")
        return NullTokenizer("null", vocab_size + 1, vocab_size)
    path = Path(spec)
    if not path.exists():
        raise TokenizerError(f"{spec}: no such file or directory")
    if kind == "hf":
        return _load_hf(path)
    if kind == "gpt2bpe":
        return _load_gpt2bpe(path)
    return _load_wordpiece(path, lower_case)


def detect_kind(spec: str | os.PathLike) -> str:
    """The kind of tokenizer ``spec`` holds; raises TokenizerError listing what was looked for."""
    if str(spec) == "null":
        return "null"
    path = Path(spec)
    if not path.exists():
        raise TokenizerError(
            f"{spec}: no such file or directory (give a tokenizer file or directory, or 'null')"
        )
    if path.is_dir():
        trained = trained_manifest(path)
        if trained is not None:
            return {"bpe": "gpt2bpe", "wordpiece": "wordpiece"}[trained["kind"]]
        # tokenizer.json first: it is the whole pipeline (normalizer, pre-tokenizer, specials), where
        # vocab.json + merges.txt beside it (Qwen, RoBERTa) would silently drop part of it
        if (path / "tokenizer.json").is_file():
            return "hf"
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return "gpt2bpe"
        if (path / "vocab.txt").is_file():
            return "wordpiece"
    elif path.suffix == ".json":
        return "hf"
    elif path.suffix == ".txt":
        return "wordpiece"
    raise TokenizerError(
        f"{spec}: cannot tell the tokenizer kind; looked for tokenizer.json (hf), vocab.json + merges.txt "
        "(gpt2bpe), vocab.txt (wordpiece) in a directory, or a .json (hf) / .txt (wordpiece) file; "
        "name the kind explicitly (--tokenizer-type)"
    )


def tokenizer_from_manifest(entry: dict[str, Any]) -> Tokenizer:
    """The tokenizer a ``describe()`` entry records, reloaded from its files: what worker processes call.

    Raises TokenizerError if a file is missing or its sha256 changed (naming the file and both hashes),
    or if the reloaded vocabulary size or eod differ from the record.
    """
    for recorded in entry["files"]:
        path = Path(recorded["path"])
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file recorded in the manifest is missing")
        actual = sha256_file(path)
        if actual != recorded["sha256"]:
            raise TokenizerError(
                f"{path}: tokenizer file changed since it was recorded "
                f"(sha256 {recorded['sha256']} in the manifest, {actual} now)"
            )
    if entry["kind"] == "null":  # the null vocabulary counts the eod after the N ids
        tokenizer = load_tokenizer("null", "null", vocab_size=entry["vocab_size"] - 1)
    else:
        tokenizer = load_tokenizer(
            entry["files"][0]["path"], entry["kind"], lower_case=entry.get("lower_case")
        )
    for name in ("vocab_size", "eod"):
        if getattr(tokenizer, name) != entry[name]:
            raise TokenizerError(
                f"{entry['files'][0]['path']}: reloaded tokenizer has {name} {getattr(tokenizer, name)}, "
                f"the manifest records {entry[name]}"
            )
    return tokenizer


def tokenizer_identity(entry: dict[str, Any] | None) -> str:
    """What makes two ``describe()`` entries the same tokenizer: kind, settings and the contents of its
    files, not their paths; ``"unknown"`` for no entry."""
    if not entry:
        return "unknown"
    files = sorted(file.get("sha256", "") for file in entry.get("files", []))
    settings = {key: value for key, value in sorted(entry.items()) if key != "files"}
    return f"{settings} files={files}"


def trained_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest ``tokenizer_training.train_tokenizer`` left in ``folder``, if any."""
    path = folder / TRAINED_MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_manifest(path)
    except ManifestError as err:
        raise TokenizerError(str(err)) from None
    if manifest.get("stage") != "tokenizer-train" or manifest.get("kind") not in ("bpe", "wordpiece"):
        return None
    return manifest


def _describe(paths: list[Path]) -> list[dict[str, Any]]:
    return [describe_file(path) for path in paths]


def _load_hf(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as Core

    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"{path}: no tokenizer.json in this directory")
    try:
        core = Core.from_file(str(file))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # plain Exceptions for unreadable files, a Rust PanicException for worse
        raise TokenizerError(f"{file}: not a Hugging Face tokenizer.json ({err})") from None
    files, eod = [file], None
    config = file.with_name("tokenizer_config.json")
    if config.is_file():
        files.append(config)
        try:
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        except (ValueError, AttributeError) as err:
            raise TokenizerError(f"{config}: not a JSON object ({err})") from None
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if eos is not None:
            eod = core.token_to_id(eos)
            if eod is None:
                raise TokenizerError(f"{config}: eos_token {eos!r} is not in the vocabulary of {file}")
    if eod is None:
        eod = next((core.token_to_id(t) for t in EOD_TOKENS if core.token_to_id(t) is not None), None)
    vocab_size = max(core.get_vocab(with_added_tokens=True).values()) + 1
    return TokenizersTokenizer("hf", vocab_size, eod, _describe(files), core=core, add_special_tokens=True)


def _load_gpt2bpe(path: Path) -> Tokenizer:
    folder = path if path.is_dir() else path.parent
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    for file in (vocab_file, merges_file):
        if not file.is_file():
            raise TokenizerError(f"{folder}: gpt2bpe needs vocab.json and merges.txt; {file.name} is missing")
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise TokenizerError(f"{vocab_file}: not a JSON vocabulary ({err})") from None
    if not isinstance(vocab, dict) or not vocab or not all(isinstance(i, int) for i in vocab.values()):
        raise TokenizerError(f"{vocab_file}: expected a JSON object mapping tokens to integer ids")
    merges = _read_merges(merges_file)
    try:
        core = gpt2_core(vocab, merges)
        ranks = _tiktoken_ranks(vocab, merges, core)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # plain Exceptions (a merge of unknown tokens), or a Rust PanicException
        raise TokenizerError(f"{folder}: vocab.json and merges.txt do not fit together ({err})") from None
    settings = dict(kind="gpt2bpe", vocab_size=max(vocab.values()) + 1, eod=vocab.get(ENDOFTEXT))
    files = _describe([vocab_file, merges_file])
    if ranks is None:
        return TokenizersTokenizer(**settings, files=files, core=core)
    import tiktoken

    specials = {ENDOFTEXT: vocab[ENDOFTEXT]} if ENDOFTEXT in vocab else {}
    fast = tiktoken.Encoding(
        name=f"gpt2bpe:{folder}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )
    return TiktokenTokenizer(**settings, files=files, core=core, fast=fast)


def _read_merges(file: Path) -> list[tuple[str, str]]:
    lines = file.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
    first = 1 if lines[0].startswith("#version") else 0
    merges = [tuple(line.split(" ")) for line in lines[first:] if line]
    if any(len(pair) != 2 for pair in merges):
        number, line = next(
            (n, line) for n, line in enumerate(lines[first:], first + 1) if line and len(line.split(" ")) != 2
        )
        raise TokenizerError(f"{file}:{number}: expected two tokens separated by a space, got {line!r}")
    return merges


def gpt2_core(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Any:
    """GPT-2's byte-level BPE as a ``tokenizers`` pipeline (also what train_tokenizer saves)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Core

    core = Core(models.BPE(vocab, merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    if ENDOFTEXT in vocab:
        core.add_special_tokens([AddedToken(ENDOFTEXT, special=True)])
    return core


def _tiktoken_ranks(
    vocab: dict[str, int], merges: list[tuple[str, str]], core: Any
) -> dict[bytes, int] | None:
    """tiktoken's ``mergeable_ranks`` for this vocabulary, or None where tiktoken would give other ids.

    GPT-2 merges the adjacent pair listed first in merges.txt; tiktoken merges the pair whose
    concatenation has the lowest id, and returns a piece that is a whole token without merging. They
    agree when every byte is a token, every other token but <|endoftext|> is made by exactly one merge,
    ids grow with merge order, and each token is what merges-based BPE makes of its own bytes.
    """
    symbols = list(bytes_to_unicode().values())
    made = [left + right for left, right in merges]
    if set(vocab) - {ENDOFTEXT} != set(symbols) | set(made) or len(set(made)) != len(made):
        return None
    made_ids = [vocab[token] for token in made]
    if len(set(vocab.values())) != len(vocab) or any(b <= a for a, b in pairwise(made_ids)):
        return None
    from tokenizers import Tokenizer as Core

    bare = Core(core.model)  # no pre-tokenizer: each token's text is one word
    encodings = bare.encode_batch_fast(made, add_special_tokens=False)
    if any(encoding.ids != [i] for encoding, i in zip(encodings, made_ids, strict=True)):
        return None
    to_latin1 = {ord(symbol): byte for byte, symbol in bytes_to_unicode().items()}  # latin-1: char n = byte n
    return {
        token.translate(to_latin1).encode("latin-1"): i for token, i in vocab.items() if token != ENDOFTEXT
    }


def _load_wordpiece(path: Path, lower_case: bool | None) -> Tokenizer:
    from tokenizers import Tokenizer as Core
    from tokenizers import models

    file = path / "vocab.txt" if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"{path}: no vocab.txt in this directory")
    with file.open(encoding="utf-8") as lines:  # as BERT's load_vocab: stripped lines, later ids win
        vocab = {line.strip(): index for index, line in enumerate(lines)}
    if BERT_SPECIALS["unk"] not in vocab:
        raise TokenizerError(f"{file}: no [UNK] token; is this a BERT vocab.txt?")
    if lower_case is None:
        trained = trained_manifest(file.parent)
        lower_case = trained["lower_case"] if trained and "lower_case" in trained else _looks_uncased(vocab)
    # 200 characters per word as Google's WordpieceTokenizer (tokenizers' default is 100)
    core = Core(models.WordPiece(vocab, unk_token=BERT_SPECIALS["unk"], max_input_chars_per_word=200))
    bert_pipeline(core, lower_case)
    specials = {name: vocab[token] for name, token in BERT_SPECIALS.items() if token in vocab}
    return TokenizersTokenizer(
        "wordpiece",
        max(vocab.values()) + 1,
        specials.get("sep"),
        _describe([file]),
        lower_case=lower_case,
        special_ids=specials,
        core=core,
    )


def _looks_uncased(vocab: dict[str, int]) -> bool:
    """Uncased BERT vocabularies hold no upper-case letter outside the [...] special tokens."""
    regular = (t for t in vocab if not (t.startswith("[") and t.endswith("]")))
    return not any(char.isupper() for token in regular for char in token)


def bert_pipeline(core: Any, lower_case: bool) -> None:
    """Google's BasicTokenizer as ``tokenizers`` parts (accents are stripped when lower-casing)."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    core.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lower_case
    )
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece()
