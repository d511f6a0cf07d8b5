"""Training tokenizers on local text: GPT-2 style byte-level BPE and BERT WordPiece vocabularies.

``train_tokenizer`` writes a folder that :func:`mtk.data.tokenizer.load_tokenizer` loads as what it
was trained as (its ``mtk-tokenizer.json`` says which).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from mtk.data.tokenizer import (
    BERT_SPECIALS,
    ENDOFTEXT,
    TRAINED_MANIFEST,
    TokenizerError,
    bert_pipeline,
    bytes_to_unicode,
    gpt2_core,
    trained_manifest,
)
from mtk.manifest import atomic_output, describe_file, write_manifest


def train_tokenizer(
    files: Sequence[str | os.PathLike],
    kind: Literal["bpe", "wordpiece"],
    vocab_size: int,
    out_dir: str | os.PathLike,
    lower_case: bool = True,
    min_frequency: int = 2,
    show_progress: bool = True,
    overwrite: bool = False,
    json_key: str = "text",
) -> Path:
    """Train a vocabulary on local text, write it to ``out_dir`` and return that path.

    ``files``: text files (line by line), JSONL files (the ``json_key`` field of each line; .gz/.zst
    too), or directories of them. ``bpe``: GPT-2 byte-level BPE; writes vocab.json, merges.txt and
    tokenizer.json laid out like GPT-2's (ids 0..255 the bytes in GPT-2's order, then one id per merge
    in merge order, ``<|endoftext|>`` last), so the tiktoken fast path applies. ``wordpiece``: BERT
    WordPiece with [PAD] [UNK] [CLS] [SEP] [MASK]; writes vocab.txt, lower-cased and accent-stripped
    when ``lower_case``. Both write mtk-tokenizer.json. Output appears whole or not at all. Raises
    TokenizerError (or sources.InputError) for bad input, a too small ``vocab_size``, or a non-empty
    ``out_dir``; ``overwrite`` replaces only an earlier output of this function.
    """
    from mtk.data.sources import expand_inputs, total_input_bytes

    if kind not in ("bpe", "wordpiece"):
        raise TokenizerError(f"unknown kind {kind!r} to train; expected bpe or wordpiece")
    minimum = 256 + 2 if kind == "bpe" else len(BERT_SPECIALS) + 1
    if vocab_size < minimum:
        what = "256 bytes + <|endoftext|> + a merge" if kind == "bpe" else "5 special tokens + a piece"
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small for {kind}: it needs {what} (>= {minimum})"
        )
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    paths = expand_inputs([str(f) for f in files], text_mode="line")
    if total_input_bytes(paths) == 0:
        raise TokenizerError(f"the corpus is empty ({len(paths)} empty file(s))")
    texts = _corpus_texts(paths, json_key)
    with _threads_for_training():
        if kind == "bpe":
            outputs, trained_size = _train_bpe(texts, vocab_size, min_frequency, show_progress)
        else:
            outputs, trained_size = _train_wordpiece(
                texts, vocab_size, lower_case, min_frequency, show_progress
            )
    record = {
        "kind": kind,
        "vocab_size": trained_size,
        "requested_vocab_size": vocab_size,
        **({"lower_case": lower_case} if kind == "wordpiece" else {}),
        "min_frequency": min_frequency,
        "json_key": json_key,
        "inputs": [describe_file(p, with_hash=False) for p in paths],
    }
    _write_atomically(out, outputs, record)
    return out


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise TokenizerError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise TokenizerError(f"{out}: directory is not empty; choose a new output or pass --overwrite")
        if trained_manifest(out) is None:
            raise TokenizerError(
                f"{out}: holds files not written by `mtk tokenizer train` (no {TRAINED_MANIFEST}); "
                "--overwrite only replaces such outputs, so choose another directory"
            )


def _corpus_texts(paths: list[Path], json_key: str) -> Iterator[list[str]]:
    """Batches of training text: JSONL lines' ``json_key`` field, or plain text lines (blank ones skipped)."""
    from mtk.data.sources import read_chunks

    for chunk in read_chunks(paths, [json_key], text_mode="line"):
        batch = []
        for offset, item in enumerate(chunk.items):
            where = f"{chunk.source}:{chunk.first_line + offset}"
            value = _json_field(item, json_key, where) if chunk.format == "jsonl" else item[json_key]
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise TokenizerError(f"{where}: not valid UTF-8 (byte offset {err.start})") from None
            if not isinstance(value, str):
                raise TokenizerError(f"{where}: '{json_key}' holds {type(value).__name__}, expected text")
            if value.strip():
                batch.append(value)
        yield batch


def _json_field(line: bytes, key: str, where: str) -> Any:
    if not line.strip():
        return ""
    try:
        record = json.loads(line)
    except ValueError as err:
        raise TokenizerError(f"{where}: malformed JSON ({err})") from None
    if not isinstance(record, dict) or key not in record:
        raise TokenizerError(f"{where}: no '{key}' key in this JSON line (choose the field with --json-key)")
    return record[key]


@contextmanager
def _threads_for_training() -> Iterator[None]:
    """Training is the one place where `tokenizers`' own threads help: nothing else runs meanwhile."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = previous or "false"


def _train_bpe(
    texts: Iterator[list[str]], vocab_size: int, min_frequency: int, show_progress: bool
) -> tuple[dict[str, str], int]:
    """The files to write ({name: content}) and the vocabulary size."""
    from tokenizers import Tokenizer as Core
    from tokenizers import models, pre_tokenizers, trainers

    core = Core(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.add_special_tokens([ENDOFTEXT])  # cut out of the text, so that no merge rebuilds it
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer)
    learned = json.loads(core.to_str())["model"]["merges"]
    if not learned:
        raise TokenizerError("learned no merges: the corpus is too small (or lower --min-frequency)")
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned]
    # GPT-2's layout: the trainer numbers tokens its own way (specials first, alphabet sorted)
    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))  # rarely, two merges make one token: it keeps one id
    vocab[ENDOFTEXT] = len(vocab)
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges),
        "tokenizer.json": gpt2_core(vocab, merges).to_str(),
    }
    return files, len(vocab)


def _train_wordpiece(
    texts: Iterator[list[str]], vocab_size: int, lower_case: bool, min_frequency: int, show_progress: bool
) -> tuple[dict[str, str], int]:
    """The files to write ({name: content}) and the vocabulary size."""
    from tokenizers import Tokenizer as Core
    from tokenizers import models, trainers

    core = Core(models.WordPiece(unk_token=BERT_SPECIALS["unk"]))
    bert_pipeline(core, lower_case)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=list(BERT_SPECIALS.values()),
    )
    core.train_from_iterator(texts, trainer)
    vocab = core.get_vocab()
    if len(vocab) <= len(BERT_SPECIALS):
        raise TokenizerError("learned no word pieces: the corpus is too small (or lower --min-frequency)")
    if len(vocab) > vocab_size:
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small for this corpus: WordPiece keeps every character, "
            f"and they alone take {len(vocab) - len(BERT_SPECIALS)} pieces besides the 5 special tokens"
        )
    return {"vocab.txt": "".join(f"{token}\n" for token in sorted(vocab, key=vocab.get))}, len(vocab)


def _write_atomically(out: Path, outputs: dict[str, str], manifest: dict[str, Any]) -> None:
    """Write the files and the manifest to a temporary directory, then swap it in for ``out``."""
    with atomic_output(out) as tmp:
        tmp.mkdir(parents=True)
        for name, text in outputs.items():
            (tmp / name).write_text(text, encoding="utf-8")
        described = [{**describe_file(tmp / name), "path": str((out / name).resolve())} for name in outputs]
        write_manifest(tmp / TRAINED_MANIFEST, stage="tokenizer-train", **manifest, outputs=described)
