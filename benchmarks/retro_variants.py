"""Search variants faiss's factory strings cannot express, on the embeddings and queries that
`benchmarks/retro.py --out OUT` left (docs/benchmarks.md, RETRO retrieval). Not a test.

    python benchmarks/retro_variants.py --out bench-retro-1m implem       # the fast-scan kernels
    python benchmarks/retro_variants.py --out bench-retro-1m spill --alpha 1.15 --nprobe 128 160
    python benchmarks/retro_variants.py --out bench-retro-1m adaptive    # lists probed per query

``implem``: the default index searched with each of faiss's fast-scan implementations and query block
sizes. ``spill``: an IVF fast-scan index whose chunks also sit in their second-nearest list when it
is within ``alpha`` x the distance of the nearest (ScaNN's "spilling"); each query's results are
deduplicated. faiss adds with given lists only through ``IndexIVFPQ.add_core``, so the codes are
made there and copied into a fast-scan index. ``adaptive``: how many lists each query needs (the
lists of its exact neighbours, ranked by centroid distance), what probing each query just enough
would cost (an oracle), and what a predictor trained on half of the queries (scikit-learn's quantile
gradient boosting over a first pass's distances; `pip install scikit-learn`) gets on the other half. Recall@20 is tie-aware,
as retro.py's, except in ``adaptive`` (the exact neighbours' ids: the lists are what is measured).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rate(search, queries: np.ndarray) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    """The better queries/s of two passes, and the results."""
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        result = search(queries)
        best = max(best, len(queries) / (time.perf_counter() - start))
    return best, result


def first_copies(distances: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``k`` results of each row with each id once (a spilled chunk comes back twice)."""
    repeated = np.tril(ids[:, :, None] == ids[:, None, :], -1).any(2)
    order = np.argsort(repeated, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, order, 1), np.take_along_axis(ids, order, 1)


def spilled_search(index, settings, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """20 results a query from a spilled index: 40 asked, each chunk's second copy dropped."""
    return first_copies(*index.search(queries, 40, params=settings), 20)


def fast_scan_index(embeddings: np.ndarray, lists: int, sample: np.ndarray):
    """The kind of mtk's default index, ``IVF<lists>,PQ<dim/4>x4fs,RFlat``, trained on ``sample`` and
    holding every embedding."""
    import faiss

    index = faiss.index_factory(embeddings.shape[1], f"IVF{lists},PQ{embeddings.shape[1] // 4}x4fs,RFlat")
    index.train(embeddings[sample])
    index.add(embeddings)
    return index


def adaptive(index, embeddings: np.ndarray, queries: np.ndarray, exact_ids: np.ndarray) -> None:
    import faiss

    ivf = faiss.extract_index_ivf(index)
    lists = ivf.nlist
    centroid_distances, order = ivf.quantizer.search(queries, lists)
    rank = np.empty_like(order)
    rows = np.arange(len(queries))[:, None]
    rank[rows, order] = np.arange(lists)
    home = ivf.quantizer.search(embeddings, 1)[1][:, 0]
    needed = np.sort(rank[rows, home[exact_ids]], 1)  # list rank holding each exact neighbour, nearest first

    def report(kind: str, nprobe: np.ndarray, part: slice = slice(None), **extra) -> None:
        recall = float((needed[part] < nprobe[:, None]).mean())
        row = {"kind": kind, "mean_nprobe": round(float(nprobe.mean()), 1), "recall_at_20": round(recall, 4)}
        print(json.dumps({**row, **extra}), flush=True)

    quantiles = dict(zip((50, 75, 90), np.percentile(needed[:, 18] + 1, (50, 75, 90)).tolist(), strict=True))
    print(json.dumps({"kind": "lists for 19 of 20, quantiles", **quantiles}), flush=True)
    for nprobe in (160, 240, 320, 480):
        report("fixed", np.full(len(queries), nprobe))
    grid = np.unique(np.r_[np.arange(1, 64), np.geomspace(64, lists, 100).astype(int)])
    recall = np.stack([(needed < p).mean(1) for p in grid], 1)
    for price in (1e-4, 3e-4, 1e-3):  # each query probes what maximises its recall - price x nprobe
        report("oracle", grid[np.argmax(recall - price * grid, 1)], price=price)

    from sklearn.ensemble import HistGradientBoostingRegressor

    first = 16
    faiss.ParameterSpace().set_index_parameters(index, f"nprobe={first},k_factor_rf=8")
    speed, (distances, _) = rate(lambda q: index.search(q, 20), queries)
    logs = np.log(
        np.maximum(np.c_[distances[:, [0, 9, 19]], centroid_distances[:, [0, first - 1, 127]]], 1e-9)
    )
    half = len(queries) // 2
    for quantile in (0.5, 0.7):
        model = HistGradientBoostingRegressor(
            loss="quantile", quantile=quantile, max_iter=200, random_state=0
        )
        model.fit(logs[:half], np.log1p(needed[:half, 18]))  # lists for 19 of the 20
        for scale in (1.0, 1.5, 2.0):
            nprobe = np.clip(np.exp(model.predict(logs[half:])) * scale, first, lists)
            report("predicted", nprobe, slice(half, None), quantile=quantile, scale=scale,
                   first_pass_queries_per_s=round(speed))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="The folder benchmarks/retro.py wrote.")
    parser.add_argument("--lists", type=int, default=None, help="IVF lists (default: mtk's default index's).")
    variants = parser.add_subparsers(dest="variant", required=True)
    variants.add_parser("implem", help="The default index under each fast-scan implementation.")
    variants.add_parser("adaptive", help="Lists probed per query: needed, oracle, predicted.")
    spill = variants.add_parser("spill", help="Chunks spilled into their second-nearest list.")
    spill.add_argument("--alpha", type=float, nargs="+", default=[1.15])
    spill.add_argument("--nprobe", type=int, nargs="+", default=[128, 160])
    spill.add_argument("--k-factor", type=int, default=8)
    args = parser.parse_args()

    import faiss

    from mtk.data.retro_project import RetroProject
    from mtk.retro.index import default_index, embedding_blocks, ivf_lists
    from mtk.retro.query import tie_aware_recall

    project = RetroProject(args.out / "project")
    record = project.stage("index")
    embeddings = embedding_blocks(project, record["block_size"], record["embedder"]["dim"]).concatenated()
    queries = np.load(args.out / "queries.npy")
    n, dim = embeddings.shape
    exact = faiss.IndexFlatL2(dim)
    exact.add(embeddings)
    exact_distances, exact_ids = exact.search(queries, 20)
    kth = exact_distances[:, 19]
    del exact
    lists = args.lists or ivf_lists(default_index(n, dim))
    sample = np.sort(project.sampled()[: min(n, 200_000)])

    def report(row: dict, distances: np.ndarray) -> None:
        print(json.dumps({**row, "recall_at_20": round(tie_aware_recall(distances, kth), 4)}), flush=True)

    if args.variant == "adaptive":
        adaptive(fast_scan_index(embeddings, lists, sample), embeddings, queries, exact_ids)
        return
    if args.variant == "implem":
        index = fast_scan_index(embeddings, lists, sample)
        faiss.ParameterSpace().set_index_parameters(index, f"nprobe={lists * 5 // 64},k_factor_rf=8")
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        for implem, qbs in ((0, 0), (10, 0), (11, 0), (12, 0), (13, 16), (13, 64), (14, 0), (15, 0)):
            ivf.implem, ivf.qbs = implem, qbs
            speed, (distances, _) = rate(lambda q, index=index: index.search(q, 20), queries)
            report(
                {"implem": implem, "qbs": qbs, "nprobe": ivf.nprobe, "queries_per_s": round(speed)}, distances
            )
        return

    trained = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, lists, dim // 4, 4)
    trained.by_residual = False  # as the factory's fast-scan PQ
    trained.train(embeddings[sample])
    nearest, lists_of = trained.quantizer.search(embeddings, 2)
    ids = np.arange(n, dtype=np.int64)
    first = np.ascontiguousarray(lists_of[:, 0])
    for alpha in args.alpha:
        codes = faiss.clone_index(trained)
        codes.add_core(n, faiss.swig_ptr(embeddings), faiss.swig_ptr(ids), faiss.swig_ptr(first))
        spilled = np.nonzero(nearest[:, 1] <= alpha * nearest[:, 0])[0]
        vectors, spilled_ids = np.ascontiguousarray(embeddings[spilled]), ids[spilled]
        second = np.ascontiguousarray(lists_of[spilled, 1])
        codes.add_core(
            len(spilled), faiss.swig_ptr(vectors), faiss.swig_ptr(spilled_ids), faiss.swig_ptr(second)
        )
        fast = faiss.IndexIVFPQFastScan(codes)
        fast.ntotal = n  # the exact copy for re-ranking holds each chunk once
        index = faiss.IndexRefineFlat(fast, faiss.swig_ptr(embeddings))
        settings = faiss.IndexRefineSearchParameters(k_factor=args.k_factor)
        for nprobe in args.nprobe:
            fast.nprobe = nprobe
            speed, (distances, _) = rate(functools.partial(spilled_search, index, settings), queries)
            row = {"lists": lists, "alpha": alpha, "spilled": round(len(spilled) / n, 3), "nprobe": nprobe,
                   "k_factor": args.k_factor, "queries_per_s": round(speed)}  # fmt: skip
            report(row, distances)


if __name__ == "__main__":
    main()
