"""``build-db``: cut the documents of the train split into chunks of GPT tokens, as Megatron's RETRO
does, and keep those that BERT sees as text.

Each document loses its trailing end-of-document token, then is cut into chunks of ``chunk_length``
tokens that never cross documents (the last one may be shorter). Each chunk is decoded with the GPT
tokenizer and re-encoded with the BERT tokenizer; chunks empty for BERT are dropped. The table holds
(dataset, document, start, end, BERT length) per chunk; ``sampled.npy`` is a seeded order of the
chunks, whose first ones train the index.
"""

from __future__ import annotations

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
from mtk.manifest import sha256_file

BATCH_DOCUMENTS = 64


def bert_tokenizer(spec: str | Path) -> Tokenizer:
    """A BERT WordPiece tokenizer from a folder (vocab.txt, or tokenizer.json) or a file."""
    path = Path(spec)
    if path.is_dir() and (path / "vocab.txt").is_file():
        return load_tokenizer(path / "vocab.txt", "wordpiece")
    return load_tokenizer(path)


def gpt_tokenizer(data: str) -> Tokenizer:
    facts = data_facts(data)
    if facts.tokenizer is None:
        raise RetroProjectError(
            f"{data}: no tokenizer manifest (PREFIX.mtk.json); prepare the data with `mtk prepare-data` "
            "so that chunks can be decoded to text"
        )
    return tokenizer_from_manifest(facts.tokenizer)


def input_hashes(data: str) -> dict[str, str]:
    """sha256 of each prefix's .idx (it fixes every document's length) for the inputs record."""
    return {prefix: sha256_file(idx_path(prefix)) for _, prefix in parse_blend(data)}


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
    """Build the chunk table of ``settings["data"]``; returns the stage record (also saved)."""
    data, chunk_length = settings["data"], settings["chunk_length"]
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
    """The build-db record, checked against the data it was built from."""
    record = project.stage("build-db")
    if input_hashes(record["data"]) != record["inputs"]:
        raise RetroProjectError(
            f"{project.root}: the data {record['data']} changed since build-db; re-run `mtk retro build-db`"
        )
    return project.require("build-db", "db_sha256", project.db_hash())


class ChunkReader:
    """Database chunks as tokens or text, with the project's data and GPT tokenizer opened once."""

    def __init__(self, project: RetroProject) -> None:
        db = project.stage("build-db")
        self.gpt, self.chunk_length = gpt_tokenizer(db["data"]), db["chunk_length"]
        self.datasets = [IndexedDataset(prefix) for _, prefix in parse_blend(db["data"])]
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
