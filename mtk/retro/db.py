"""``build-db``: cut the documents of the train split into chunks of GPT tokens, as Megatron's RETRO
does, and keep those that BERT sees as text.

Each document loses its trailing end-of-document token, then is cut into chunks of
``retro_chunk_length`` tokens that never cross documents (the last one may be shorter). Each chunk is decoded with the GPT
tokenizer and re-encoded with the BERT tokenizer; chunks empty for BERT are dropped. The table holds
(dataset, document, start, end, BERT length) per chunk; ``sampled.npy`` is a seeded order of the
chunks, whose first ones train the index.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mtk.data.blended import parse_blend
from mtk.data.indexed import IndexedDataset, idx_path
from mtk.data.prepared import data_facts
from mtk.data.retro_project import RetroProject, RetroProjectError, save_array
from mtk.data.splits import split_indices
from mtk.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_manifest
from mtk.manifest import data_manifest_path, sha256_file

BATCH_DOCUMENTS = 64


def bert_tokenizer(spec: str | Path) -> Tokenizer:
    """A BERT WordPiece tokenizer from a folder (vocab.txt, or tokenizer.json) or a file."""
    path = Path(spec)
    if path.is_dir() and (path / "vocab.txt").is_file():
        tokenizer = load_tokenizer(path / "vocab.txt", "wordpiece")
    else:
        tokenizer = load_tokenizer(path)
    if tokenizer.lower_case is None:  # its casing is what the project records and later stages check
        raise RetroProjectError(
            f"{spec}: a {tokenizer.kind} tokenizer; RETRO embeds chunks with a BERT WordPiece tokenizer "
            "(a folder with vocab.txt)"
        )
    return tokenizer


def gpt_tokenizer(data: str) -> Tokenizer:
    facts = data_facts(data)
    if facts.tokenizer is None:
        raise RetroProjectError(
            f"{data}: no tokenizer manifest (PREFIX.mtk.json); prepare the data with `mtk prepare-data` "
            "so that chunks can be decoded to text"
        )
    return tokenizer_from_manifest(facts.tokenizer)


def input_hashes(data: str) -> dict[str, str]:
    """sha256 of the files of each prefix that fix the data, for the inputs record: the .idx (every
    document's length) and the manifest, which holds the .bin's sha256 from prepare-data (so data
    prepared again in place is caught without hashing a large .bin at each training start)."""
    paths = [
        path for _, prefix in parse_blend(data) for path in (idx_path(prefix), data_manifest_path(prefix))
    ]
    return {str(path): sha256_file(path) if path.is_file() else "missing" for path in paths}


def document_chunks(tokens: np.ndarray, eod: int | None, chunk_length: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk of one document."""
    length = len(tokens) - (1 if eod is not None and len(tokens) and tokens[-1] == eod else 0)
    return [(start, min(start + chunk_length, length)) for start in range(0, length, chunk_length)]


def build_db(
    project: RetroProject,
    settings: dict[str, Any],
    bert: str | Path,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Build the chunk table of ``settings["data_path"]``; returns the stage record (also saved).
    ``settings``: config keys (``data_path``, ``retro_chunk_length``, ``split``, ``seed``, ...), recorded
    under their config.json names."""
    data, chunk_length = settings["data_path"], settings["retro_chunk_length"]
    gpt = gpt_tokenizer(data)
    bert_tok = bert_tokenizer(bert)
    prefixes = [prefix for _, prefix in parse_blend(data)]
    datasets = [IndexedDataset(prefix) for prefix in prefixes]
    train_docs = [split_indices(settings["split"], len(ds))[0] for ds in datasets]
    total, done = sum(len(docs) for docs in train_docs), 0
    rows: list[tuple[int, int, int, int, int]] = []
    empty = 0
    for dataset_index, (dataset, docs) in enumerate(zip(datasets, train_docs, strict=True)):
        for first in range(0, len(docs), BATCH_DOCUMENTS):
            batch = docs[first : first + BATCH_DOCUMENTS]
            spans, texts = [], []
            for doc in batch:
                tokens = dataset.get(int(doc))
                for start, end in document_chunks(tokens, gpt.eod, chunk_length):
                    spans.append((int(doc), start, end))
                    texts.append(gpt.decode(tokens[start:end].tolist()))
            lengths = [len(ids) for ids in bert_tok.encode_batch(texts)] if texts else []
            for (doc, start, end), bert_length in zip(spans, lengths, strict=True):
                if bert_length == 0:
                    empty += 1
                    continue
                rows.append((dataset_index, doc, start, end, bert_length))
            done += len(batch)
            if progress is not None:
                progress(done, total)
    if not rows:
        raise RetroProjectError(
            f"{data}: the train split holds no chunk with text; check the data and --split"
        )
    table = np.asarray(rows, dtype=np.int64)
    order = np.random.default_rng(settings["seed"]).permutation(len(table)).astype(np.int64)
    project.root.mkdir(parents=True, exist_ok=True)
    save_array(project.sampled_path, order)
    save_array(project.chunks_path, table)
    record = dict(settings)
    record.update(
        gpt_tokenizer=gpt.describe(),
        bert_tokenizer=bert_tok.describe(),
        bert=str(Path(bert).resolve()),
        lower_case=bert_tok.lower_case,
        inputs=input_hashes(data),
        counts={
            "documents": int(total),
            "chunks": len(table),
            "chunks_empty_for_bert": empty,
            "tokens": int((table[:, 3] - table[:, 2]).sum()),
        },
        db_sha256=project.db_hash(),
    )
    project.record("build-db", record)
    return record


def check_inputs(project: RetroProject) -> dict[str, Any]:
    """The build-db record, checked against what the project now holds: the data it was built from
    (``input_hashes``), the chunk table's sha256, and the table's chunks, which must be the ones
    ``retro_chunk_length`` cuts from those documents. Every stage, generation and training call it first."""
    record = project.stage("build-db")
    try:
        found = input_hashes(record["data_path"])
    except (ValueError, FileNotFoundError) as err:
        raise RetroProjectError(
            f"{project.config_path}: build-db.data_path: {err}; {project.rerun('build-db')}"
        ) from None
    for path in sorted(found.keys() | record["inputs"].keys()):
        if found.get(path) != record["inputs"].get(path):
            raise RetroProjectError(
                f"{path}: the data changed since build-db (sha256 {found.get(path, 'not an input')}, "
                f"build-db.inputs in {project.config_path} records {record['inputs'].get(path, 'none')}); "
                f"{project.rerun('build-db')}"
            )
    if project.db_hash() != record["db_sha256"]:
        raise RetroProjectError(
            f"{project.chunks_path}: missing or changed since build-db wrote it (its sha256 is not "
            f"build-db.db_sha256 of {project.config_path}); {project.rerun('build-db')}"
        )
    check_chunk_table(project, record)
    return record


def check_chunk_table(project: RetroProject, record: dict[str, Any]) -> None:
    """Refuse a chunk table whose rows are not chunks of ``record``'s documents cut every
    ``retro_chunk_length`` tokens (e.g. config.json's retro_chunk_length edited after build-db)."""
    table, m = project.chunks(), record["retro_chunk_length"]
    datasets = [IndexedDataset(prefix) for _, prefix in parse_blend(record["data_path"])]
    dataset, doc, start, end, bert_length = (table[:, i] for i in range(5))

    def refuse(what: str) -> RetroProjectError:
        return RetroProjectError(
            f"{project.chunks_path}: {what}; the table disagrees with build-db in {project.config_path} "
            f"(retro_chunk_length {m}, data_path {record['data_path']}): {project.rerun('build-db')}"
        )

    if len(table) and (dataset.min() < 0 or dataset.max() >= len(datasets)):
        raise refuse(f"a dataset number outside the {len(datasets)} of the data")
    length = np.zeros(len(table), dtype=np.int64)  # of each chunk's document
    for number, indexed in enumerate(datasets):
        rows = dataset == number
        if rows.any() and (doc[rows].min() < 0 or doc[rows].max() >= len(indexed)):
            raise refuse(f"a document number outside the {len(indexed)} of {indexed.prefix}")
        length[rows] = indexed.sequence_lengths[doc[rows]]
    size = end - start
    # a chunk is m tokens from a multiple of m, shorter only at its document's end (less its eod)
    bad = (start < 0) | (start % m != 0) | (size < 1) | (size > m) | (end > length) | (bert_length < 1)
    bad |= (size < m) & (end < length - 1)
    if bad.any():
        row = int(np.argmax(bad))
        raise refuse(
            f"chunk {row} is tokens [{start[row]}, {end[row]}) of a {length[row]}-token document, not a "
            f"chunk of {m} tokens"
        )


def check_bert_tokenizer(project: RetroProject, record: dict[str, Any], tokenizer: Tokenizer) -> None:
    """Refuse a BERT tokenizer other than the one build-db measured the chunks with (``record``): its
    casing, vocabulary or special tokens changed since, so the embeddings would not match the index."""
    if tokenizer.lower_case != record["lower_case"]:
        raise RetroProjectError(
            f"{project.config_path}: build-db.lower_case is {json.dumps(record['lower_case'])}, but the BERT "
            f"tokenizer {record['bert']} now loads with lower_case {json.dumps(tokenizer.lower_case)}; "
            f"{project.rerun('build-db')} (and the stages after it)"
        )
    recorded, current = record["bert_tokenizer"], tokenizer.describe()
    for key in sorted(recorded.keys() | current.keys()):
        if recorded.get(key) != current.get(key):
            raise RetroProjectError(
                f"{project.config_path}: build-db.bert_tokenizer.{key} is {recorded.get(key)!r}, but the "
                f"BERT tokenizer {record['bert']} now gives {current.get(key)!r}; {project.rerun('build-db')}"
            )


class ChunkReader:
    """Database chunks as tokens or text, with the project's data and GPT tokenizer opened once."""

    def __init__(self, project: RetroProject) -> None:
        db = project.stage("build-db")
        self.gpt, self.chunk_length = gpt_tokenizer(db["data_path"]), db["retro_chunk_length"]
        self.datasets = [IndexedDataset(prefix) for _, prefix in parse_blend(db["data_path"])]
        self.table = np.asarray(project.chunks())

    def texts(self, rows) -> list[str]:
        texts = []
        for row in rows:
            dataset, doc, start, end, _ = (int(v) for v in self.table[row])
            texts.append(self.gpt.decode(self.datasets[dataset].get(doc, start, end - start).tolist()))
        return texts

    def neighbour_tokens(self, rows: np.ndarray) -> np.ndarray:
        """See ``mtk.data.retro.neighbour_tokens``."""
        from mtk.data.retro import neighbour_tokens

        return neighbour_tokens(rows, self.table, self.datasets, self.chunk_length, self.gpt.eod)
