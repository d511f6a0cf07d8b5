"""Prepared datasets as their manifests describe them: the facts a run inherits, and merging.

Each ``PREFIX.bin/.idx`` written by mtk has a ``PREFIX.mtk.json`` that records its tokenizer. Data
prepared elsewhere (by Megatron itself) has none: it is accepted, but its tokenizer cannot be checked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from mtk.data.indexed import IndexedDataset, bin_path, idx_path, merge_datasets
from mtk.data.tokenizer import entry_problem, integer_problem, tokenizer_identity
from mtk.manifest import ManifestError, data_manifest_path, describe_file, read_manifest, write_manifest


@dataclass
class DataFacts:
    """What the prepared data says about itself: vocabulary, eod, tokenizer, and its manifests."""

    vocab_size: int | None
    eod: int | None
    tokenizer: dict[str, Any] | None
    manifests: list[dict[str, Any]]


@dataclass
class MergeResult:
    dataset: IndexedDataset  # the merged pair
    manifest: dict[str, Any]  # what was written to OUTPUT_PREFIX.mtk.json
    unchecked: list[str]  # input prefixes without a manifest, whose tokenizer could not be checked


def data_facts(data: str) -> DataFacts:
    """The facts recorded in the manifests of every prefix of ``data`` (a prefix or a blend).

    Prefixes without a manifest are skipped (all None and no manifests if none has one). Raises
    ManifestError naming the files if a manifest is unreadable or the manifests disagree on the tokenizer.
    """
    from mtk.data.blended import parse_blend  # here: it imports torch and numba, which merging does not need

    found = _read_manifests([prefix for _, prefix in parse_blend(data)])
    _require_one_tokenizer(found, "the datasets of the blend")
    manifests = [
        {"prefix": prefix, "path": str(data_manifest_path(prefix).resolve()), **manifest}
        for prefix, manifest in found
    ]
    if not manifests:
        return DataFacts(None, None, None, [])
    first = manifests[0]
    return DataFacts(first.get("vocab_size"), first.get("eod"), first.get("tokenizer"), manifests)


def merge_prepared(prefixes: Sequence[str], output_prefix: str) -> MergeResult:
    """Concatenate the pairs ``prefixes`` into ``output_prefix`` (see ``merge_datasets``) and write its
    manifest, which inherits the inputs' tokenizer.

    Raises ManifestError (naming each manifest and its tokenizer) if the inputs' manifests disagree on
    the tokenizer, IndexedDatasetError if the pairs cannot be merged; either way nothing is written.
    """
    found = _read_manifests(prefixes)
    _require_one_tokenizer(found, "the inputs")
    merged = merge_datasets(prefixes, output_prefix)
    tokenizer = found[0][1].get("tokenizer") if found else None
    with_manifest = {prefix for prefix, _ in found}
    manifest = write_manifest(
        data_manifest_path(output_prefix),
        stage="merge-data",
        prefix=output_prefix,
        tokenizer=tokenizer,
        vocab_size=tokenizer.get("vocab_size") if tokenizer else None,
        eod=tokenizer.get("eod") if tokenizer else None,
        dtype=str(merged.dtype),
        counts={"documents": merged.num_documents, "sequences": len(merged), "tokens": merged.num_tokens},
        inputs=[{"prefix": prefix, "manifest": prefix in with_manifest} for prefix in prefixes],
        outputs=[
            describe_file(bin_path(output_prefix), with_hash=False),
            describe_file(idx_path(output_prefix)),
        ],
    )
    unchecked = [prefix for prefix in prefixes if prefix not in with_manifest]
    return MergeResult(merged, manifest, unchecked)


def _read_manifests(prefixes: Sequence[str | os.PathLike]) -> list[tuple[str, dict[str, Any]]]:
    """``(prefix, manifest)`` for each of ``prefixes`` that has a manifest, in order, each checked
    by ``check_data_manifest``."""
    found = []
    for prefix in prefixes:
        path = data_manifest_path(prefix)
        if path.is_file():
            manifest = read_manifest(path)
            check_data_manifest(path, manifest)
            found.append((prefix, manifest))
    return found


def check_data_manifest(path: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """ManifestError naming ``path`` and the key unless what a run reads is of the right type and
    range: ``vocab_size`` (a positive integer), ``eod`` (a token id), ``tokenizer`` (an entry that
    ``entry_problem`` accepts), each absent or null where data has none. A vocabulary too small for
    the data is left to ``check_token_ids``, which names the token."""
    found = next(_manifest_problems(manifest), None)
    if found is not None:
        key, problem = found
        raise ManifestError(
            f"{path}: key {key!r} {problem}; the manifest is damaged: restore it, or prepare the data again"
        )


def _manifest_problems(manifest: dict[str, Any]) -> Iterator[tuple[str, str]]:
    vocab_size, eod, tokenizer = (manifest.get(key) for key in ("vocab_size", "eod", "tokenizer"))
    if vocab_size is not None and (problem := integer_problem(vocab_size, 1)):
        yield "vocab_size", problem
    if eod is not None and (problem := integer_problem(eod, 0)):
        yield "eod", problem
    if tokenizer is not None and (found := entry_problem(tokenizer)):
        key, problem = found
        yield f"tokenizer.{key}" if key else "tokenizer", problem


def _require_one_tokenizer(found: list[tuple[str, dict[str, Any]]], what: str) -> None:
    identities = {
        str(data_manifest_path(prefix)): tokenizer_identity(manifest.get("tokenizer"))
        for prefix, manifest in found
    }
    if len(set(identities.values())) > 1:
        listing = "\n".join(f"  {path}: {identity}" for path, identity in identities.items())
        raise ManifestError(
            f"{what} were prepared with different tokenizers, whose token ids do not mean the same:\n{listing}"
        )


def check_token_ids(data: str, vocab_size: int, cache_dir: str | os.PathLike | None = None) -> None:
    """Every token id of every prefix of ``data`` lies in the vocabulary of ``vocab_size`` tokens;
    ManifestError naming the file, the id and the vocabulary otherwise (the embedding would fail)."""
    from mtk.data.blended import parse_blend
    from mtk.data.helpers import max_token_id

    for _, prefix in parse_blend(data):
        largest = max_token_id(IndexedDataset(prefix), cache_dir)
        if largest >= vocab_size:
            raise ManifestError(
                f"{bin_path(prefix)} holds token id {largest}, outside this run's vocabulary of {vocab_size} "
                "tokens: give the --vocab-size of the tokenizer that prepared it (its manifest records it)"
            )
