"""``mtk prepare-data``: JSONL / Parquet / text -> Megatron .bin/.idx."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path

import typer

from .common import console, fail, inherited, remember


class TokenizerType(StrEnum):
    auto = "auto"
    hf = "hf"
    gpt2bpe = "gpt2bpe"
    wordpiece = "wordpiece"
    null = "null"


class OnError(StrEnum):
    fail = "fail"
    skip = "skip"


class TextMode(StrEnum):
    file = "file"
    line = "line"


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_data(
    inputs: list[str] = typer.Argument(
        ...,
        help="Input files, directories (searched recursively) or globs: .jsonl/.json (optionally .gz/.zst), "
        ".parquet, or plain text with --text-mode.",
        show_default=False,
    ),
    output_prefix: str | None = typer.Option(
        None,
        "--output-prefix",
        "-o",
        help="Output prefix P: writes P_<key>_document.bin/.idx (or _sentence) "
        "and P_<key>_document.mtk.json. Default: data/<first input's name> in the workspace.",
        show_default=False,
    ),
    tokenizer: str | None = typer.Option(
        None,
        "--tokenizer",
        "-t",
        help="'gpt2' (GPT-2's BPE, shipped with mtk: nothing is downloaded); 'bundled' (a small BPE "
        "trained on the bundled corpus, for trying things); a tokenizer.json file, a directory holding "
        "tokenizer.json, GPT-2 style vocab.json + merges.txt (or encoder.json + vocab.bpe), or BERT "
        "vocab.txt; or 'null' (text is whitespace-separated ids). Default: the workspace's last tokenizer.",
        show_default=False,
    ),
    tokenizer_type: TokenizerType = typer.Option(
        TokenizerType.auto,
        "--tokenizer-type",
        help="Force the tokenizer kind instead of detecting it from the files.",
    ),
    vocab_size: int | None = typer.Option(
        None,
        "--vocab-size",
        help="Vocabulary size for --tokenizer null (ids must be below it; eod = this value).",
    ),
    lower_case: bool | None = typer.Option(
        None,
        "--lower-case/--cased",
        help="WordPiece only: lower-case (uncased BERT) or keep case. Default: what the folder declares "
        "(tokenizer_config.json do_lower_case, the tokenizer.json normalizer, mtk's training record), "
        "else lower case as BERT.",
        show_default=False,
    ),
    vocab_extra_ids: int = typer.Option(
        0,
        "--vocab-extra-ids",
        min=0,
        help="WordPiece only: append N sentinel tokens <extra_id_0> ... to the vocabulary, as Megatron "
        "does for T5 (which needs 100).",
    ),
    json_keys: list[str] = typer.Option(
        ["text"],
        "--json-keys",
        "-k",
        help="JSON keys (Parquet columns) to tokenize, one output pair per key. "
        "Repeat the option or separate with commas: --json-keys text,title.",
    ),
    append_eod: bool = typer.Option(
        False, "--append-eod", help="Append the end-of-document token to every non-empty document."
    ),
    split_sentences: bool = typer.Option(
        False,
        "--split-sentences",
        help="Store each document as a sequence of sentences (needed by BERT and T5); "
        "outputs are named _sentence. Splitter: sentencex.",
    ),
    language: str = typer.Option("en", "--language", help="Language code for --split-sentences."),
    workers: int = typer.Option(
        default_workers(), "--workers", "-w", min=1, help="Tokenizer processes (default: the CPUs available)."
    ),
    on_error: OnError = typer.Option(
        OnError.fail,
        "--on-error",
        help="Bad line (malformed JSON, missing key, non-string value, non-UTF-8): "
        "'fail' stops with file:line and writes nothing; 'skip' drops it and counts it.",
    ),
    text_mode: TextMode | None = typer.Option(
        None,
        "--text-mode",
        help="Plain-text input: one document per 'file' or per 'line'. Required for files "
        "that are not JSONL/Parquet.",
        show_default=False,
    ),
    chunk_mb: float = typer.Option(
        1.0, "--chunk-mb", min=0.01, help="Text per unit of work sent to a worker, in MB."
    ),
) -> None:
    """Tokenize documents into Megatron's MMIDIDX .bin/.idx format (readable by Megatron-LM itself).

    Example: mtk prepare-data corpus/ -o data/wiki -t gpt2 --append-eod
    """
    from rich.table import Table

    from mtk.data.prepare import PrepareError
    from mtk.data.prepare import prepare_data as run
    from mtk.data.sources import InputError
    from mtk.data.tokenizer import load_tokenizer

    keys = [key.strip() for spec in json_keys for key in spec.split(",") if key.strip()]
    if not keys:
        fail(f"--json-keys {' '.join(json_keys)!r} names no key; e.g. --json-keys text,title")
    tokenizer = tokenizer or _last_tokenizer()
    output_prefix = output_prefix or _default_prefix(inputs[0])
    try:
        tok = load_tokenizer(
            tokenizer,
            kind=None if tokenizer_type is TokenizerType.auto else tokenizer_type.value,
            vocab_size=vocab_size,
            lower_case=lower_case,
            vocab_extra_ids=vocab_extra_ids,
        )
    except (ValueError, OSError) as err:
        fail(f"--tokenizer {tokenizer}: {err}")
    with _ProgressBar() as bar:
        try:
            result = run(
                inputs,
                output_prefix,
                tok,
                json_keys=keys,
                append_eod=append_eod,
                split_sentences=split_sentences,
                language=language,
                workers=workers,
                on_error=on_error.value,
                text_mode=None if text_mode is None else text_mode.value,
                chunk_bytes=int(chunk_mb * (1 << 20)),
                progress=bar.update,
            )
        except (PrepareError, InputError) as err:
            bar.stop()
            fail(f"{err}\nNothing was written.")
        except KeyboardInterrupt:
            bar.stop()
            fail("interrupted; partial outputs were removed, nothing was written.", code=130)
    stats = result.stats
    table = Table(title="prepare-data summary", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rate = lambda n: f"{n / max(stats.seconds, 1e-9):,.0f}/s"  # noqa: E731
    table.add_row("tokenizer", f"{tok.kind} ({tok.backend}), vocab {tok.vocab_size:,}, eod {tok.eod}")
    table.add_row("documents", f"{stats.documents:,}  ({rate(stats.documents)})")
    table.add_row(
        "input",
        f"{stats.input_bytes / 1e6:,.1f} MB  ({stats.input_bytes / 1e6 / max(stats.seconds, 1e-9):,.1f} MB/s)",
    )
    for key, prefix in result.outputs.items():
        table.add_row(f"{key}: tokens", f"{stats.tokens[key]:,}  ({rate(stats.tokens[key])})")
        table.add_row(f"{key}: sequences", f"{stats.sequences[key]:,}")
        table.add_row(f"{key}: empty documents", f"{stats.empty_documents[key]:,}")
        table.add_row(f"{key}: output", f"{prefix}.bin/.idx")
    table.add_row("skipped lines", f"{stats.skipped_lines:,}")
    table.add_row("time", f"{stats.seconds:,.1f} s with {workers} worker(s)")
    console.print(table)
    for example in stats.skipped_examples:
        console.print(f"[yellow]skipped[/] {example}", highlight=False)
    if stats.skipped_lines > len(stats.skipped_examples):
        console.print(
            f"[yellow]... and {stats.skipped_lines - len(stats.skipped_examples)} more skipped lines[/]"
        )
    _remember(tokenizer, tok, result)
    preset = "bert-tiny" if split_sentences else "gpt-tiny"
    console.print(f"Train on it with: mtk train --preset {preset} (it takes this data: the workspace's last)")


# Suffixes dropped from an input's name for the default output prefix: corpus.jsonl.gz -> corpus
INPUT_SUFFIXES = (".gz", ".zst", ".jsonl", ".json", ".parquet", ".txt")


def _default_prefix(first_input: str) -> str:
    """``data/<name of the first input>`` in the workspace, said out loud."""
    from mtk.workspace import root, shown

    path = Path(first_input)
    name = path.name if not any(c in path.name for c in "*?[") else path.parent.name
    while Path(name).suffix in INPUT_SUFFIXES and Path(name).stem:
        name = Path(name).stem
    prefix = root() / "data" / (name or "corpus")
    console.print(f"output: {shown(prefix)} (from the input's name; -o to choose)", highlight=False)
    return str(prefix)


def _last_tokenizer() -> str:
    """The workspace's last tokenizer, or an end naming the choices."""
    from mtk import workspace

    remedy = (
        "choose one: -t FILE (a tokenizer.json, a BERT vocab.txt), -t FOLDER (a Hugging Face or GPT-2 "
        "style tokenizer folder, or one `mtk tokenizer train` wrote), -t gpt2 (GPT-2's BPE, shipped with "
        "mtk) or -t bundled (a small BPE trained on the bundled corpus, for trying things)"
    )
    found = inherited("tokenizer", "--tokenizer", remedy)
    return found.path if found.facts.get(workspace.NAMED) else str(workspace.location(found))


def _remember(spec: str, tok, result) -> None:  # noqa: ANN001 - a Tokenizer and a PrepareResult
    """Record the tokenizer (unless null: it needs --vocab-size) and each output dataset."""
    if tok.kind != "null":
        remember_tokenizer(spec, tok.kind, tok.vocab_size, "prepare-data")
    for prefix in result.outputs.values():
        remember_dataset(prefix, spec, "prepare-data")


def remember_tokenizer(spec: str, kind: str, vocab_size: int, stage: str) -> None:
    from mtk.data.tokenizer import BUNDLED, GPT2
    from mtk.workspace import NAMED

    named = {NAMED: True} if spec in (GPT2, BUNDLED) else {}
    remember("tokenizer", spec, stage, facts={"kind": kind, "vocab_size": vocab_size} | named)


def remember_dataset(prefix: str, tokenizer: str, stage: str) -> None:
    """Record prepared data ``PREFIX`` with the facts and hashes of its manifest; stale when its input
    files or tokenizer files change."""
    from mtk.manifest import data_manifest_path, read_manifest
    from mtk.workspace import manifest_hashes

    manifest = read_manifest(data_manifest_path(prefix))
    files = [entry["path"] for entry in manifest.get("inputs", []) + manifest["tokenizer"].get("files", [])]
    counts, described = manifest["counts"], manifest["tokenizer"]
    facts = {
        "key": manifest["json_key"],
        "level": manifest["level"],
        "documents": counts["documents"],
        "tokens": counts["tokens"],
        "tokenizer": tokenizer,
        "vocab_size": described.get("vocab_size"),
    }
    remember("dataset", prefix, stage, facts=facts, hashes=manifest_hashes(manifest), inputs=files)


class _ProgressBar:
    """Rich progress bar fed by the pipeline's stats: bytes done, documents/s, tokens/s, MB/s."""

    def __enter__(self) -> _ProgressBar:
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]tokenizing"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[docs]} docs/s  {task.fields[tokens]} tok/s  {task.fields[mbs]} MB/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("tokenizing", total=None, docs="-", tokens="-", mbs="-")
        return self

    def update(self, stats, total_bytes: int) -> None:
        seconds = max(stats.seconds, 1e-9)
        self.progress.update(
            self.task,
            total=total_bytes,
            completed=stats.input_bytes,
            docs=f"{stats.documents / seconds:,.0f}",
            tokens=f"{sum(stats.tokens.values()) / seconds:,.0f}",
            mbs=f"{stats.input_bytes / 1e6 / seconds:,.1f}",
        )

    def stop(self) -> None:
        self.progress.stop()

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()
