"""``mtk tokenizer train``: make a vocabulary from local text, with no internet."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path

import typer

from .common import console, fail, remember, reports_file_errors

app = typer.Typer(no_args_is_help=True)


class Kind(StrEnum):
    bpe = "bpe"
    wordpiece = "wordpiece"


@app.callback()
def _group() -> None:
    # a callback keeps `train` a named subcommand (Typer would fold a lone command into the group)
    pass


@app.command("train")
@reports_file_errors
def train(
    corpus: list[Path] = typer.Argument(
        ...,
        help="Text files (read line by line), JSONL files (.jsonl/.json/.ndjson, optionally .gz/.zst; "
        "the --json-key field of each line), or directories of them, searched recursively.",
        show_default=False,
    ),
    kind: Kind = typer.Option(
        ...,
        "--kind",
        help="bpe: GPT-2 byte-level BPE with <|endoftext|> (vocab.json + merges.txt + tokenizer.json). "
        "wordpiece: BERT WordPiece with [PAD] [UNK] [CLS] [SEP] [MASK] (vocab.txt).",
        show_default=False,
    ),
    vocab_size: int = typer.Option(
        ...,
        "--vocab-size",
        help="Tokens in the vocabulary, special tokens included (bpe: 256 bytes + merges + "
        "<|endoftext|>, so at least 258). A small corpus may give fewer.",
        show_default=False,
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Output directory: must not exist or be empty (see --overwrite).",
        show_default=False,
    ),
    lower_case: bool | None = typer.Option(
        None,
        "--lower-case/--cased",
        help="wordpiece only: lower-case and strip accents, as uncased BERT (the default), or keep the "
        "text as it is. Byte-level BPE always keeps it as it is.",
        show_default=False,
    ),
    min_frequency: int = typer.Option(
        2, "--min-frequency", min=1, help="Learn only pieces seen at least this many times."
    ),
    json_key: str = typer.Option("text", "--json-key", "-k", help="Field of each JSONL line to train on."),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace --out if it holds an earlier `mtk tokenizer train` output (never another directory).",
    ),
) -> None:
    """Train a vocabulary on local files (nothing is downloaded) and write it to --out.

    Example: mtk tokenizer train corpus/ --kind bpe --vocab-size 32000 --out tok/bpe32k
    """
    from mtk.data.sources import InputError
    from mtk.data.tokenizer import TokenizerError, load_tokenizer
    from mtk.data.tokenizer_training import train_tokenizer

    if kind is Kind.bpe and lower_case is not None:
        fail("--lower-case/--cased are for --kind wordpiece; byte-level BPE keeps the text as it is")
    try:
        train_tokenizer(
            corpus,
            kind.value,
            vocab_size,
            out,
            lower_case=lower_case is not False,
            min_frequency=min_frequency,
            show_progress=sys.stderr.isatty(),
            overwrite=overwrite,
            json_key=json_key,
        )
        tokenizer = load_tokenizer(out)
    except (TokenizerError, InputError, OSError) as err:
        fail(str(err))

    def say(text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)  # keep paths and commands on one line

    casing = "" if kind is Kind.bpe else (", lower-cased" if tokenizer.lower_case else ", cased")
    say(
        f"trained {kind.value}: {tokenizer.vocab_size:,} tokens{casing}, eod {tokenizer.eod}, "
        f"encodes with {tokenizer.backend}"
    )
    if tokenizer.vocab_size < vocab_size:
        say(
            f"[yellow]note:[/] the corpus supports {tokenizer.vocab_size:,} of the {vocab_size:,} tokens asked for"
        )
    say(f"wrote {out}/: {' '.join(sorted(path.name for path in out.iterdir()))}")
    remember(
        "tokenizer",
        out,
        "tokenizer train",
        facts={"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
    )
    extra = " --split-sentences" if kind is Kind.wordpiece else " --append-eod"
    say(f"Use it: mtk prepare-data INPUT... -o PREFIX --tokenizer {out}{extra}")
