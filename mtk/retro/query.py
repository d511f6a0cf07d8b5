"""``query-neighbours``: for every chunk of every GPT sample that training will see, the nearest
database chunks that do not come from any document of the sample itself.

The samples are built exactly as ``mtk train --retro-project`` builds them (same data, split, seed,
sequence length and sample counts, hence the same cached indices). Each chunk's text is embedded
like the database's, the index returns ``query_k`` candidates, those from the sample's own
documents are dropped, and the first ``num_neighbours`` are kept (-1 where fewer survive). Samples
are done in blocks saved as they finish, so a killed run resumes; then each split is one file.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import numpy as np

from mtk.config import RunConfig, apply_overrides
from mtk.data.retro import sample_documents
from mtk.data.retro_project import (
    INHERITED,
    SPLITS,
    Blocks,
    RetroProject,
    RetroProjectError,
    check_ids,
    save_array,
)
from mtk.retro.db import ChunkReader, check_bert_tokenizer, check_inputs, gpt_tokenizer
from mtk.retro.index import embedding_blocks, load_index, search
from mtk.retro.ranks import Ranks

RECALL_QUERIES = 1000


def training_values(db: dict[str, Any]) -> dict[str, Any]:
    """The config values ``mtk train --retro-project`` inherits from the build-db record."""
    return {key: db[setting] for key, setting in INHERITED.items()} | {"train_iters": None}


def gpt_samples(db: dict[str, Any]) -> tuple:
    """Train, valid and test GPT datasets exactly as training builds them for this project."""
    from mtk.data.prepared import data_facts
    from mtk.models.gpt import SPEC as GPT

    return GPT.datasets(project_config(db), sample_counts(db), data_facts(db["data_path"]))


def project_config(db: dict[str, Any]) -> RunConfig:
    from mtk.models.gpt import SPEC as GPT  # the samples RETRO's neighbours are found for are GPT's

    return apply_overrides({}, training_values(db) | {"family": GPT.name})


def sample_counts(db: dict[str, Any]) -> tuple[int, int, int]:
    """Samples of each split a run on this project reads: the ones that need neighbours (a dataset
    may hold more, up to a whole epoch)."""
    from mtk.train.schedule import split_sample_counts

    return split_sample_counts(project_config(db))


def verified_neighbours(project: RetroProject) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The build-db record and each split's saved neighbours of a project to train on, verified: the
    data, chunk table and records as the stages left them (``check_inputs``), query-neighbours finished
    with the current index, and each neighbours file of the recorded shape, its ids in the database.
    ``mtk train --retro-project`` calls it before it uses the project."""
    db = check_inputs(project)
    index = project.require("index", "db_sha256", db["db_sha256"])
    query = project.require("query-neighbours", "db_sha256", db["db_sha256"])
    rerun = project.rerun("query-neighbours")
    if not (index["complete"] and query["complete"]):
        raise RetroProjectError(f"{project.root}: query-neighbours did not finish; {rerun}")
    if query["index_sha256"] != index["index_sha256"]:
        raise RetroProjectError(
            f"{project.config_path}: query-neighbours.index_sha256 is not index.index_sha256: the neighbours "
            f"were found with another index; {rerun}"
        )
    per_sample = db["seq_length"] // db["retro_chunk_length"]
    if query["chunks_per_sample"] != per_sample:
        raise RetroProjectError(
            f"{project.config_path}: query-neighbours.chunks_per_sample is {query['chunks_per_sample']}, but "
            f"build-db's seq_length / retro_chunk_length is {per_sample}; {rerun}"
        )
    chunks, k = len(project.chunks()), query["num_neighbours"]
    found = {
        split: project.neighbours(split, (count, per_sample, k), chunks)
        for split, count in query["samples"].items()
    }
    return db, found


def _key(dataset: np.ndarray | int, doc: np.ndarray | int):
    return np.asarray(dataset, dtype=np.int64) * (1 << 32) + np.asarray(doc, dtype=np.int64)


def query_neighbours(
    project: RetroProject,
    embedder,
    num_neighbours: int = 20,
    query_k: int = 200,
    block_samples: int = 1000,
    progress: Callable[[str, int, int], None] | None = None,
    ranks: Ranks = Ranks(),
) -> dict[str, Any]:
    """Every rank of ``ranks`` queries its share of the missing blocks (rank 0 records); the record,
    on every rank."""
    if query_k < num_neighbours:
        raise RetroProjectError(f"--query-k {query_k} is below --num-neighbours {num_neighbours}; raise it")
    db = check_inputs(project)
    check_bert_tokenizer(project, db, embedder.tokenizer)
    record = project.require("index", "db_sha256", db["db_sha256"])
    if record["complete"] and record["embedder"] != embedder.description:
        raise RetroProjectError(
            f"the embedder {embedder.folder} is not the one that built the index ({record['embedder']['folder']}); "
            "query with the same --embedder"
        )
    index = load_index(project, record)  # verified before anything is recorded
    settings = {"num_neighbours": num_neighbours, "query_k": query_k, "index_sha256": record["index_sha256"]}
    folder = project.root / "query"
    if ranks.main:
        previous = project.config().get("query-neighbours")
        if not isinstance(previous, dict) or {k: previous.get(k) for k in settings} != settings:
            shutil.rmtree(folder, ignore_errors=True)  # blocks of other settings or another index
        project.record("query-neighbours", settings | {"complete": False, "db_sha256": db["db_sha256"]})
    ranks.barrier()
    gpt = gpt_tokenizer(db["data_path"])
    table = project.chunks()
    keys = _key(table[:, 0], table[:, 1])
    m = db["retro_chunk_length"]
    per_sample = db["seq_length"] // m
    counts = {}
    for split, samples, needed in zip(SPLITS, gpt_samples(db), sample_counts(db), strict=True):
        if samples is None:
            continue
        total = min(needed, len(samples))
        blocks = Blocks(
            folder / split, total, block_samples, np.int64, (per_sample, num_neighbours), "query-neighbours"
        )
        mine = ranks.share(ranks.from_main(blocks.missing()))
        mine_samples, done = sum(end - start for start, end in mine), 0
        for start, end in mine:
            texts, own = [], []
            for i in range(start, end):
                tokens = samples[i]["tokens"].numpy()
                texts += [gpt.decode(tokens[j * m : (j + 1) * m].tolist()) for j in range(per_sample)]
                own.append(_key(*np.asarray(sample_documents(samples, i)).T))
            found = search(index, embedder(texts), query_k, project.index_path)
            kept = np.full((len(texts), num_neighbours), -1, dtype=np.int64)
            for row, candidates in enumerate(found):
                candidates = candidates[candidates >= 0]
                candidates = candidates[~np.isin(keys[candidates], own[row // per_sample])]
                kept[row, : min(num_neighbours, len(candidates))] = candidates[:num_neighbours]
            blocks.save(start, end, kept.reshape(end - start, per_sample, num_neighbours))
            done += end - start
            if progress is not None:
                progress(split, done, mine_samples)
        ranks.barrier()
        if ranks.main:
            save_array(
                project.neighbours_path(split),
                check_ids(blocks.concatenated(), len(table), blocks.folder, "query-neighbours"),
            )
            shutil.rmtree(blocks.folder)
        counts[split] = blocks.total
    result = None
    if ranks.main:
        recall = measure_recall(project, index, record, num_neighbours)
        result = settings | {"complete": True, "db_sha256": db["db_sha256"], "samples": counts,
                             "chunks_per_sample": per_sample, f"recall_at_{num_neighbours}": recall}  # fmt: skip
        project.record("query-neighbours", result)
    return ranks.from_main(result)


def measure_recall(project: RetroProject, index, record: dict[str, Any], k: int) -> float:
    """Recall@k of the index against exact search over the same embeddings, for up to 1,000 database
    chunks as queries (the seeded sample's first ones): the share of the k returned chunks no farther
    than the k-th exact neighbour, so that a duplicate of a neighbour (technical text repeats whole
    chunks) counts as found whichever copy comes back. The exact search reads one embedding block
    at a time: its memory does not grow with the database."""
    import faiss

    blocks = embedding_blocks(project, record["block_size"], record["embedder"]["dim"])
    k = min(k, blocks.total)
    wanted = np.sort(project.sampled()[:RECALL_QUERIES])
    queries, heap = [], faiss.ResultHeap(len(wanted), k, keep_max=False)
    for start, end in blocks.ranges():
        block = blocks.load(start, end)
        queries.append(block[wanted[(wanted >= start) & (wanted < end)] - start])
    queries = np.ascontiguousarray(np.concatenate(queries))
    found = search(index, queries, k, project.index_path)
    distances = np.full(found.shape, np.inf, np.float32)  # exact distances of what the index returned
    for start, end in blocks.ranges():
        block = np.ascontiguousarray(blocks.load(start, end))
        exact, ids = faiss.knn(queries, block, min(k, end - start))
        heap.add_result(np.pad(exact, ((0, 0), (0, k - exact.shape[1])), constant_values=np.inf),
                        np.pad(ids + start, ((0, 0), (0, k - ids.shape[1])), constant_values=-1))  # fmt: skip
        rows, cols = np.nonzero((found >= start) & (found < end))
        distances[rows, cols] = ((queries[rows] - block[found[rows, cols] - start]) ** 2).sum(axis=1)
    heap.finalize()
    return round(tie_aware_recall(distances, heap.D[:, k - 1]), 4)


def tie_aware_recall(found: np.ndarray, kth: np.ndarray) -> float:
    """The share of returned neighbours whose exact distances ``found`` (queries, k; inf for none) are
    no farther than each query's k-th exact neighbour ``kth`` (queries,), with slack for the float
    rounding of equal vectors' distances: of duplicate chunks, whichever copy comes back counts."""
    return float((found <= kth[:, None] * (1 + 1e-5) + 1e-6).mean())


class Retriever:
    """Neighbour tokens (1, chunks, k, 2m) for a growing sequence of GPT tokens (generation): each
    chunk is embedded and searched once it is complete; an incomplete last chunk has none (no token
    attends to a chunk's neighbours before the chunk's last token)."""

    def __init__(self, project: RetroProject, embedder, num_neighbors: int) -> None:
        db = check_inputs(project)
        check_bert_tokenizer(project, db, embedder.tokenizer)
        record = project.require("index", "db_sha256", db["db_sha256"])
        if record["complete"] and record["embedder"] != embedder.description:
            raise RetroProjectError(f"the embedder {embedder.folder} is not the one that built the index")
        self.index, self.embedder, self.k = load_index(project, record), embedder, num_neighbors
        self.where = project.index_path
        self.reader = ChunkReader(project)
        self.gpt, self.m = self.reader.gpt, self.reader.chunk_length
        self.found: list[np.ndarray] = []

    def __call__(self, tokens: list[int]):
        import torch

        complete = len(tokens) // self.m
        while len(self.found) < complete:
            c = len(self.found)
            text = self.gpt.decode(tokens[c * self.m : (c + 1) * self.m])
            self.found.append(search(self.index, self.embedder([text]), self.k, self.where)[0])
        rows = np.full((-(-len(tokens) // self.m), self.k), -1, dtype=np.int64)
        if complete:
            rows[:complete] = np.stack(self.found[:complete])
        return torch.from_numpy(self.reader.neighbour_tokens(rows))[None]
