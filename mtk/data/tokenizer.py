"""Tokenizers for preprocessing: Hugging Face tokenizer.json, GPT-2 BPE, BERT WordPiece, null.

``load_tokenizer(spec)`` finds out what a path holds (or takes a name: ``gpt2``, GPT-2's own BPE,
whose files ship with mtk; ``bundled``, the small BPE trained on the bundled corpus) and returns a :class:`Tokenizer`, whose ``encode_batch`` is the hot path
of ``mtk prepare-data``. ``describe()`` is its manifest entry (kind, settings, files with sha256);
``tokenizer_identity(entry)`` says when two entries are the same tokenizer. Worker processes rebuild
it with ``tokenizer_from_manifest(entry)``, which refuses files that changed since; pickling a
tokenizer does the same. Training lives in ``tokenizer_training``.
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

# Preprocessing gets its parallelism from worker processes, so `tokenizers` gets one thread in each: a
# pool sized to the machine in every worker would oversubscribe the cores. One pool thread, not none
# (TOKENIZERS_PARALLELISM=false): batches encode 15-20% faster on a pool thread than on the calling
# one (measured on byte-level BPE and WordPiece). Set before `tokenizers` builds its pool.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "true"

KINDS = ("hf", "gpt2bpe", "wordpiece", "null")
# A gpt2bpe folder's vocabulary and merges: Hugging Face's names, or openai/gpt-2's (the same formats)
GPT2BPE_FILES = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
# `gpt2` names GPT-2's BPE: openai/gpt-2's files, shipped in mtk/assets/gpt2 and checked at load
# against the sha256 tiktoken pins for them (tiktoken_ext.openai_public.gpt2)
GPT2 = "gpt2"
GPT2_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "gpt2"
# `bundled` names the 4096-token BPE trained on the bundled corpus (mtk/assets/tokenizer): for trying things
BUNDLED = "bundled"
BUNDLED_ASSETS = GPT2_ASSETS.parent / "tokenizer"
GPT2_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
ENDOFTEXT = "<|endoftext|>"
# The pre-tokenizer of openai/gpt-2's encoder.py; `tokenizers`' ByteLevel uses the same one.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOD_TOKENS = (ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>")
BERT_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
TRAINED_MANIFEST = "mtk-tokenizer.json"
EXTRA_ID = "<extra_id_{}>"  # T5's sentinel tokens (--vocab-extra-ids)


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
    vocab_extra_ids: int = 0  # wordpiece: sentinels <extra_id_0> ... appended (T5)
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
        if self.vocab_extra_ids:
            entry["vocab_extra_ids"] = self.vocab_extra_ids
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
    """Byte-level BPE encoded by tiktoken, 3-5x faster, where :func:`tiktoken_ranks` proves the ids
    equal; ``prefix``/``suffix`` are the ids a tokenizer.json post-processor adds around each text."""

    backend: ClassVar[str] = "tiktoken"
    fast: Any = field(default=None, repr=False)  # tiktoken.Encoding
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # A plain loop: tiktoken's encode_batch goes through a thread pool, which costs more than it
        # gives with one thread (3.6x slower on sentence-sized texts).
        encode, allowed = self.fast.encode, self.fast.special_tokens_set
        ids = [encode(text, allowed_special=allowed, disallowed_special=()) for text in texts]
        if self.add_special_tokens and (self.prefix or self.suffix):
            return [[*self.prefix, *each, *self.suffix] for each in ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        if self.core is None:  # unpickled: the `tokenizers` pipeline is loaded when first needed
            self.core = tokenizer_from_manifest(self.describe()).core
        return super().decode(ids)

    def __reduce__(self) -> tuple[Any, ...]:
        # The proof behind ``fast`` is not redone in the receiving process (a worker): it gets the
        # encoding itself, once the files are checked to be those it was proved on.
        state = (self.fast, self.prefix, self.suffix, self.add_special_tokens)
        return _restore_tiktoken, (self.describe(), *state)


def _restore_tiktoken(entry: dict[str, Any], fast: Any, prefix: tuple, suffix: tuple, add: bool) -> Tokenizer:
    check_files(entry)
    settings = {key: entry[key] for key in ("kind", "vocab_size", "eod")}
    return TiktokenTokenizer(
        **settings, files=entry["files"], fast=fast, prefix=prefix, suffix=suffix, add_special_tokens=add
    )


def load_tokenizer(
    spec: str | os.PathLike,
    kind: str | None = None,
    vocab_size: int | None = None,
    lower_case: bool | None = None,
    vocab_extra_ids: int = 0,
) -> Tokenizer:
    """Load the tokenizer at ``spec`` (a path, ``gpt2``, ``bundled`` or ``null``), of ``kind`` or of
    the kind its files show.

    ``hf``: a tokenizer.json or a directory with one, encoded with its special tokens added (eod: the
    ``eos_token`` of a tokenizer_config.json beside it, else a common end-of-text token in the vocabulary).
    ``gpt2bpe``: a directory with GPT-2 style vocab.json + merges.txt (or openai/gpt-2's encoder.json +
    vocab.bpe); a literal ``<|endoftext|>`` in the text is that token (the eod). ``gpt2`` (not a path:
    ``./gpt2`` is one) is GPT-2's own gpt2bpe, from the files shipped with mtk (:func:`gpt2_folder`);
    ``bundled`` is the gpt2bpe trained on the bundled corpus (:data:`BUNDLED_ASSETS`).
    ``wordpiece``: a BERT vocab.txt or a directory with one; ``lower_case`` None takes the casing its
    folder declares (:func:`declared_lower_case`), or lower case (BERT's default) where it declares
    none; ``vocab_extra_ids`` N appends T5's sentinels ``<extra_id_0>`` ... as special tokens after the
    vocabulary, as Megatron's BertWordPieceCase does. ``null``: needs ``vocab_size``. A directory
    written by ``train_tokenizer`` loads as what it was trained as. Raises :class:`TokenizerError` (a
    ValueError) saying what is wrong.
    """
    if str(spec) == BUNDLED:
        spec = BUNDLED_ASSETS
    kind = kind or detect_kind(spec)
    if kind not in KINDS:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(KINDS)}")
    if vocab_size is not None and kind != "null":
        raise TokenizerError(
            f"vocab_size is for the null tokenizer; a {kind} vocabulary comes from its files"
        )
    if lower_case is not None and kind != "wordpiece":
        raise TokenizerError(f"lower_case is for wordpiece; a {kind} tokenizer's files define its casing")
    if vocab_extra_ids and kind != "wordpiece":
        raise TokenizerError(
            f"vocab_extra_ids (T5 sentinels) are added to a WordPiece vocab.txt; a {kind} tokenizer "
            "carries its own special tokens"
        )
    if kind == "null":
        if vocab_size is None or vocab_size < 1:
            raise TokenizerError("the null tokenizer needs vocab_size N >= 1 (ids lie below N; eod is N)")
        return NullTokenizer("null", vocab_size + 1, vocab_size)
    if str(spec) == GPT2:
        if kind != "gpt2bpe":
            raise TokenizerError(f"{GPT2!r} is GPT-2's byte-level BPE, of kind gpt2bpe, not {kind}")
        spec = gpt2_folder()
    path = Path(spec)
    if not path.exists():
        raise TokenizerError(f"{spec}: no such file or directory")
    if kind == "hf":
        return _load_hf(path)
    if kind == "gpt2bpe":
        return _load_gpt2bpe(path)
    return _load_wordpiece(path, lower_case, vocab_extra_ids)


def detect_kind(spec: str | os.PathLike) -> str:
    """The kind of tokenizer ``spec`` holds; raises TokenizerError listing what was looked for."""
    if str(spec) == "null":
        return "null"
    if str(spec) in (GPT2, BUNDLED):
        return "gpt2bpe"
    path = Path(spec)
    if not path.exists():
        raise TokenizerError(
            f"{spec}: no such file or directory (give a tokenizer file or directory, '{GPT2}', "
            f"'{BUNDLED}' or 'null')"
        )
    if path.is_dir():
        trained = trained_manifest(path)
        if trained is not None:
            return {"bpe": "gpt2bpe", "wordpiece": "wordpiece"}[trained["kind"]]
        # tokenizer.json first: it is the whole pipeline (normalizer, pre-tokenizer, specials), where
        # vocab.json + merges.txt beside it (Qwen, RoBERTa) would silently drop part of it
        if (path / "tokenizer.json").is_file():
            return "hf"
        if any((path / vocab).is_file() and (path / merges).is_file() for vocab, merges in GPT2BPE_FILES):
            return "gpt2bpe"
        if (path / "vocab.txt").is_file():
            return "wordpiece"
    elif path.suffix == ".json":
        return "hf"
    elif path.suffix == ".txt":
        return "wordpiece"
    raise TokenizerError(
        f"{spec}: cannot tell the tokenizer kind; looked for tokenizer.json (hf), vocab.json + merges.txt "
        "or encoder.json + vocab.bpe (gpt2bpe), vocab.txt (wordpiece) in a directory, or a .json (hf) / "
        ".txt (wordpiece) file; name the kind explicitly (--tokenizer-type)"
    )


def tokenizer_from_manifest(entry: dict[str, Any]) -> Tokenizer:
    """The tokenizer a ``describe()`` entry records, reloaded from its files: what worker processes call.

    Raises TokenizerError if a file is missing or its sha256 changed (naming the file and both hashes),
    or if the reloaded vocabulary size or eod differ from the record, or the entry is malformed.
    """
    if found := entry_problem(entry):
        key, problem = found
        raise TokenizerError(f"tokenizer manifest entry: {f'key {key!r} ' if key else ''}{problem}")
    check_files(entry)
    if entry["kind"] == "null":  # the null vocabulary counts the eod after the N ids
        tokenizer = load_tokenizer("null", "null", vocab_size=entry["vocab_size"] - 1)
    else:
        tokenizer = load_tokenizer(
            entry["files"][0]["path"],
            entry["kind"],
            lower_case=entry.get("lower_case"),
            vocab_extra_ids=entry.get("vocab_extra_ids", 0),
        )
    for name in ("vocab_size", "eod"):
        if getattr(tokenizer, name) != entry[name]:
            raise TokenizerError(
                f"{entry['files'][0]['path']}: reloaded tokenizer has {name} {getattr(tokenizer, name)}, "
                f"the manifest records {entry[name]}"
            )
    return tokenizer


def check_files(entry: dict[str, Any]) -> None:
    """Raise TokenizerError unless every file a ``describe()`` entry records is there, unchanged."""
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


def integer_problem(value: Any, low: int, high: Any = None) -> str | None:
    """What keeps ``value`` from being an integer in ``[low, high)`` (no upper bound unless ``high``
    is an integer), worded to follow a key's name; None if nothing does."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"is {value!r}, expected an integer"
    bounded = isinstance(high, int) and not isinstance(high, bool)
    if value < low or (bounded and value >= high):
        return f"is {value}, expected an integer from {low}" + (f" to {high - 1}" if bounded else " up")
    return None


def entry_problem(entry: Any) -> tuple[str, str] | None:
    """The first key of a ``describe()`` entry read from a file that would trip its use, and what is
    wrong with it (key ``""``: the entry itself); None for a sound entry."""
    if not isinstance(entry, dict):
        return "", f"is {entry!r:.60}, expected an object (the tokenizer's manifest entry)"
    kind, vocab_size, eod, files = (entry.get(key) for key in ("kind", "vocab_size", "eod", "files"))
    if not isinstance(kind, str) or kind not in KINDS:
        return "kind", f"is {kind!r}, expected one of {', '.join(KINDS)}"
    if problem := integer_problem(vocab_size, 1):
        return "vocab_size", problem
    if eod is not None and (problem := integer_problem(eod, 0, vocab_size)):
        return "eod", problem
    if not isinstance(files, list) or (kind != "null" and not files):
        return "files", f"is {files!r:.60}, expected a list of the tokenizer's files"
    for number, file in enumerate(files):
        if not (isinstance(file, dict) and all(isinstance(file.get(k), str) for k in ("path", "sha256"))):
            return f"files[{number}]", f'is {file!r:.60}, expected {{"path": ..., "sha256": ...}}'
    if not isinstance(entry.get("lower_case", False), bool):
        return "lower_case", f"is {entry['lower_case']!r}, expected true or false"
    if problem := integer_problem(entry.get("vocab_extra_ids", 0), 0):
        return "vocab_extra_ids", problem
    specials = entry.get("special_ids", {})
    if not isinstance(specials, dict) or any(integer_problem(i, 0, vocab_size) for i in specials.values()):
        return "special_ids", f"is {specials!r:.60}, expected token names mapping to ids below {vocab_size}"
    return None


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
        text = file.read_text(encoding="utf-8")
        core = Core.from_str(text)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # plain Exceptions for unreadable files, a Rust PanicException for worse
        raise TokenizerError(f"{file}: not a Hugging Face tokenizer.json ({err})") from None
    # As transformers calls it (Megatron's HuggingFaceTokenizer): whole texts, never truncated or padded
    core.no_truncation()
    core.no_padding()
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
    settings = dict(kind="hf", vocab_size=vocab_size, eod=eod, files=_describe(files), core=core)
    fast = _hf_tiktoken(json.loads(text), core, f"hf:{file}")
    if fast is None:
        return TokenizersTokenizer(**settings, add_special_tokens=True)
    encoding, prefix, suffix = fast
    return TiktokenTokenizer(**settings, add_special_tokens=True, fast=encoding, prefix=prefix, suffix=suffix)


# The Split patterns whose matches are the same in tokenizers' Oniguruma and tiktoken's regex engine
# (tests/unit/test_tokenizer.py checks each on adversarial Unicode) and which leave no text unmatched
# (tiktoken drops what no match covers; Split "Isolated" keeps it).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PATTERNS = (GPT2_PATTERN, LLAMA3_PATTERN)


def _hf_tiktoken(
    spec: dict[str, Any], core: Any, name: str
) -> tuple[Any, tuple[int, ...], tuple[int, ...]] | None:
    """tiktoken's encoding of a tokenizer.json with the ids a post-processor adds before and after
    each text, or None unless every stage is one whose ids tiktoken provably reproduces: no
    normalizer; GPT-2's ByteLevel pre-tokenizer or a known Split pattern before a regex-free
    ByteLevel; a byte-level BPE model that :func:`tiktoken_ranks` accepts; added tokens matched
    verbatim (none a prefix of another, so which one matches at a position is unambiguous); a
    post-processor that only adds fixed tokens around the text."""
    model = spec.get("model") or {}
    if spec.get("normalizer") is not None or model.get("type") != "BPE" or model.get("dropout"):
        return None
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    pattern = _byte_level_pattern(spec.get("pre_tokenizer"))
    around = _added_around(spec.get("post_processor"), spec)
    added = spec.get("added_tokens") or []
    if pattern is None or around is None or not _verbatim(added):
        return None
    vocab = model.get("vocab")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    specials = {token["content"]: token["id"] for token in added}
    if not isinstance(vocab, dict) or any(len(merge) != 2 for merge in merges):
        return None
    ranks = tiktoken_ranks(vocab, merges, core.model, set(specials))
    if ranks is None:
        return None
    import tiktoken

    encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    return (encoding, *around)


def _byte_level_pattern(pre: dict[str, Any] | None) -> str | None:
    steps = (pre or {}).get("pretokenizers", []) if (pre or {}).get("type") == "Sequence" else [pre]
    if not steps or not all(isinstance(step, dict) for step in steps):
        return None
    *split, last = steps
    if last.get("type") != "ByteLevel" or last.get("add_prefix_space"):
        return None
    if not split:
        return GPT2_PATTERN if last.get("use_regex", True) else None
    if len(split) != 1 or last.get("use_regex", True):
        return None
    split = split[0]
    pattern = (split.get("pattern") or {}).get("Regex")
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    return pattern if pattern in SPLIT_PATTERNS else None


def _added_around(post: dict[str, Any] | None, spec: dict[str, Any]) -> tuple[tuple[int, ...], ...] | None:
    """The ids a post-processor puts before and after a single text, or None for one that does more."""
    steps = (post or {}).get("processors", []) if (post or {}).get("type") == "Sequence" else [post]
    prefix: list[int] = []
    suffix: list[int] = []
    fixed = 0
    for step in filter(None, steps):
        kind = step.get("type")
        if kind == "ByteLevel":  # offsets only
            continue
        fixed += 1
        if kind in ("RobertaProcessing", "BertProcessing"):
            prefix, suffix = [step["cls"][1]], [step["sep"][1]]
        elif kind == "TemplateProcessing":
            single = step.get("single") or []
            sequences = [n for n, item in enumerate(single) if "Sequence" in item]
            if len(sequences) != 1 or single[sequences[0]]["Sequence"].get("id") != "A":
                return None
            try:
                ids = [
                    [i for item in part for i in step["special_tokens"][item["SpecialToken"]["id"]]["ids"]]
                    for part in (single[: sequences[0]], single[sequences[0] + 1 :])
                ]
            except (KeyError, TypeError):
                return None
            prefix, suffix = ids
        else:
            return None
    return (tuple(prefix), tuple(suffix)) if fixed <= 1 else None


def _verbatim(added: list[dict[str, Any]]) -> bool:
    """Added tokens found in the text as they are, in one pass, with one candidate at any position."""
    contents = [token.get("content") for token in added]
    if (
        any(not isinstance(c, str) or not c for c in contents)
        or len({t.get("normalized") for t in added}) > 1
    ):
        return False
    if any(token.get(flag) for token in added for flag in ("lstrip", "rstrip", "single_word")):
        return False
    return not any(a != b and b.startswith(a) for a in contents for b in contents)


def gpt2_folder() -> Path:
    """The folder of GPT-2's encoder.json + vocab.bpe shipped with mtk, each checked against its pinned
    sha256; raises TokenizerError naming a file that is missing, or that differs with both hashes."""
    for name, expected in GPT2_SHA256.items():
        file = GPT2_ASSETS / name
        if not file.is_file():
            raise TokenizerError(
                f"{file}: GPT-2's {name} is missing from this mtk installation; reinstall mtk, or give "
                "--tokenizer a folder holding GPT-2's encoder.json + vocab.bpe"
            )
        actual = sha256_file(file)
        if actual != expected:
            raise TokenizerError(
                f"{file}: not GPT-2's {name} as OpenAI published it (sha256 {actual}, expected "
                f"{expected}); the file is damaged or was replaced: reinstall mtk"
            )
    return GPT2_ASSETS


def _gpt2bpe_files(path: Path) -> tuple[Path, Path]:
    """The vocabulary and merges files of a gpt2bpe folder, or of the folder of one of them: the first
    pair of :data:`GPT2BPE_FILES` it holds (the pair ``path`` names, if it names a file of one)."""
    folder = path if path.is_dir() else path.parent
    named = [] if path.is_dir() else [pair for pair in GPT2BPE_FILES if path.name in pair]
    candidates = [(folder / vocab, folder / merges) for vocab, merges in named or GPT2BPE_FILES]
    best = max(candidates, key=lambda pair: sum(file.is_file() for file in pair))  # the first on a tie
    missing = next((file.name for file in best if not file.is_file()), None)
    if missing:
        wanted = " or ".join(f"{vocab.name} + {merges.name}" for vocab, merges in candidates)
        raise TokenizerError(f"{folder}: gpt2bpe needs {wanted}; {missing} is missing")
    return best


def _load_gpt2bpe(path: Path) -> Tokenizer:
    vocab_file, merges_file = _gpt2bpe_files(path)
    folder = vocab_file.parent
    try:
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise TokenizerError(f"{vocab_file}: not a JSON vocabulary ({err})") from None
    if not isinstance(vocab, dict) or not vocab or not all(isinstance(i, int) for i in vocab.values()):
        raise TokenizerError(f"{vocab_file}: expected a JSON object mapping tokens to integer ids")
    merges = _read_merges(merges_file)
    specials = {ENDOFTEXT: vocab[ENDOFTEXT]} if ENDOFTEXT in vocab else {}
    try:
        core = gpt2_core(vocab, merges)
        ranks = tiktoken_ranks(vocab, merges, core.model, set(specials))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # plain Exceptions (a merge of unknown tokens), or a Rust PanicException
        raise TokenizerError(
            f"{folder}: {vocab_file.name} and {merges_file.name} do not fit together ({err})"
        ) from None
    settings = dict(kind="gpt2bpe", vocab_size=max(vocab.values()) + 1, eod=vocab.get(ENDOFTEXT))
    files = _describe([vocab_file, merges_file])
    if ranks is None:
        return TokenizersTokenizer(**settings, files=files, core=core)
    import tiktoken

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


def tiktoken_ranks(
    vocab: dict[str, int], merges: list[tuple[str, str]], model: Any, specials: set[str]
) -> dict[bytes, int] | None:
    """tiktoken's ``mergeable_ranks`` for a byte-level BPE vocabulary, or None where tiktoken would
    give other ids than ``model`` (a ``tokenizers`` BPE of these vocab and merges).

    BPE merges the adjacent pair listed first in the merges; tiktoken merges the pair whose
    concatenation has the lowest id, and returns a piece that is a whole token without merging. They
    agree when every byte is a token, every other token but the ``specials`` is made by a merge, ids
    grow with merge order, each token is what BPE makes of its own bytes, and either each token is
    made by exactly one merge (trained vocabularies: GPT-2, ``mtk tokenizer train``), or every split
    of a token into two tokens is a merge (vocabularies converted from tiktoken's, as Llama 3's: merges
    listed by the id they make, the order in which tiktoken tries them). In the second case tiktoken
    is the algorithm the vocabulary was made with; BPE could only differ where two different pairs
    making the same lowest-id token are adjacent at once (tiktoken merges the leftmost, BPE the one
    listed first), which the tests and the benchmark corpus never showed.
    """
    symbols = set(bytes_to_unicode().values())
    regular = {token: i for token, i in vocab.items() if token not in specials}
    made = [left + right for left, right in merges]
    if set(regular) != symbols | set(made) or len(set(vocab.values())) != len(vocab):
        return None
    if not all(left in vocab and right in vocab for left, right in merges):
        return None
    made_ids = [vocab[token] for token in made]
    if any(b < a for a, b in pairwise(made_ids)):
        return None
    if len(set(made)) != len(made):  # several merges make one token: all of its splits must be merges
        pairs = set(merges)
        for token in set(made):
            for cut in range(1, len(token)):
                left, right = token[:cut], token[cut:]
                if left in regular and right in regular and (left, right) not in pairs:
                    return None
    if not getattr(model, "ignore_merges", False):  # with it, BPE returns a whole-token word as is
        from tokenizers import Tokenizer as Core

        bare = Core(model)  # no pre-tokenizer: each token's text is one word
        tokens = sorted(set(made))
        encodings = bare.encode_batch_fast(tokens, add_special_tokens=False)
        if any(encoding.ids != [vocab[token]] for encoding, token in zip(encodings, tokens, strict=True)):
            return None
    to_latin1 = {ord(symbol): byte for byte, symbol in bytes_to_unicode().items()}  # latin-1: char n = byte n
    return {token.translate(to_latin1).encode("latin-1"): i for token, i in regular.items()}


def _load_wordpiece(path: Path, lower_case: bool | None, extra_ids: int = 0) -> Tokenizer:
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
        declared = declared_lower_case(file.parent)
        lower_case = True if declared is None else declared
    # 200 characters per word as Google's WordpieceTokenizer (tokenizers' default is 100)
    core = Core(models.WordPiece(vocab, unk_token=BERT_SPECIALS["unk"], max_input_chars_per_word=200))
    bert_pipeline(core, lower_case)
    if extra_ids < 0:
        raise TokenizerError(f"vocab_extra_ids must be >= 0, got {extra_ids}")
    core.add_special_tokens([EXTRA_ID.format(i) for i in range(extra_ids)])
    specials = {name: vocab[token] for name, token in BERT_SPECIALS.items() if token in vocab}
    return TokenizersTokenizer(
        "wordpiece",
        max(core.get_vocab(with_added_tokens=True).values()) + 1,
        specials.get("sep"),
        _describe([file]),
        lower_case=lower_case,
        vocab_extra_ids=extra_ids,
        special_ids=specials,
        core=core,
    )


def declared_lower_case(folder: str | os.PathLike) -> bool | None:
    """Whether the WordPiece tokenizer in ``folder`` lower-cases, as the folder itself declares it:
    ``tokenizer_config.json``'s ``do_lower_case``, else the ``lowercase`` of ``tokenizer.json``'s
    normalizer, else the ``lower_case`` that ``mtk tokenizer train`` recorded; None where none is there.

    Never guessed from the vocabulary: uncased vocabularies hold upper-case symbols (``ℝ``).
    Raises TokenizerError naming the file and key of a declaration that is not true or false.
    """
    folder = Path(folder)
    config = folder / "tokenizer_config.json"
    if config.is_file():
        settings = _json_object(config)
        if "do_lower_case" in settings:
            return _flag(settings["do_lower_case"], config, "do_lower_case")
    pipeline = folder / "tokenizer.json"
    if pipeline.is_file():
        return _normalizer_lowercases(_json_object(pipeline).get("normalizer"), pipeline)
    trained = trained_manifest(folder)
    if trained is not None and "lower_case" in trained:
        return _flag(trained["lower_case"], folder / TRAINED_MANIFEST, "lower_case")
    return None


def _json_object(file: Path) -> dict[str, Any]:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TokenizerError(f"{file}: not readable JSON ({err})") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{file}: expected a JSON object, found {type(value).__name__}")
    return value


def _flag(value: Any, file: Path, key: str) -> bool:
    if not isinstance(value, bool):
        raise TokenizerError(f"{file}: {key} is {value!r}, expected true or false")
    return value


def _normalizer_lowercases(normalizer: Any, file: Path) -> bool:
    """Whether a tokenizer.json normalizer lower-cases (a BertNormalizer with ``lowercase``, or a
    Lowercase step, alone or in a Sequence); no normalizer keeps the case."""
    if normalizer is None:
        return False
    if not isinstance(normalizer, dict):
        raise TokenizerError(f"{file}: normalizer is {normalizer!r:.60}, expected an object or null")
    kind = normalizer.get("type")
    if kind == "Sequence":
        return any(_normalizer_lowercases(step, file) for step in normalizer.get("normalizers") or [])
    if kind == "BertNormalizer":
        return _flag(normalizer.get("lowercase", True), file, "normalizer.lowercase")
    return kind == "Lowercase"


def bert_pipeline(core: Any, lower_case: bool) -> None:
    """Google's BasicTokenizer as ``tokenizers`` parts (accents are stripped when lower-casing)."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    core.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lower_case
    )
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece()
