"""``index``: embed every database chunk (in blocks on disk, so a killed run resumes), train a faiss
index on the first chunks of the seeded sample, and add all chunks.

The default index follows the database's size: exact ``Flat`` below 4,096 chunks; up to 10M chunks
``IVF<~sqrt(n)>,PQ<dim/4>x4fs,RFlat`` (4-bit fast-scan product codes, candidates re-ranked exactly:
recall@20 0.95 where Megatron's PQ32 codes reach 0.47 on the same 290k chunks); beyond, Megatron's
reference ``OPQ32_64,IVF65536_HNSW8,PQ32`` with its lists scaled (about 4 sqrt(n)). The record
says which was chosen.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mtk.data.retro_project import Blocks, RetroProject, RetroProjectError, check_ids
from mtk.manifest import atomic_output
from mtk.retro.db import ChunkReader, check_bert_tokenizer, check_inputs
from mtk.retro.ranks import Ranks, available_cores

MIN_POINTS_PER_LIST = 39  # faiss warns below this many training points per centroid
REFERENCE_MIN_CHUNKS = 10_000_000  # from here the exact re-ranking copy (4 bytes x dim a chunk) weighs


def default_index(chunks: int, dim: int) -> str:
    """The index for ``chunks`` embeddings of ``dim`` dimensions."""
    if chunks < 4096:
        return "Flat"
    lists = min(65536, 2 ** round(math.log2(4 * math.sqrt(chunks))))  # ~4 sqrt(n), as the reference
    while lists * MIN_POINTS_PER_LIST > chunks:  # k-means needs points to place its centroids
        lists //= 2
    if chunks >= REFERENCE_MIN_CHUNKS:  # Megatron's reference, its lists scaled
        return f"OPQ32_64,IVF{lists}_HNSW8,PQ32"
    # measured (docs/benchmarks.md): 4-bit fast-scan PQ, candidates re-ranked exactly
    return f"IVF{lists},PQ{dim // 4}x4fs,RFlat" if dim % 4 == 0 else f"IVF{lists},Flat"


def ivf_lists(index_type: str) -> int:
    """The IVF lists of a factory string (0: not an IVF index)."""
    for part in index_type.split(","):
        if part.startswith("IVF"):
            return int(part[3:].split("_")[0])
    return 0


def default_nprobe(index_type: str) -> int:
    """Lists searched per query: with fast-scan codes 5/64 of them (recall@20 0.95 on 290k chunks,
    measured) and at least a quarter of the first 256 (small databases: recall over speed); a
    sixteenth otherwise."""
    lists = ivf_lists(index_type)
    if not lists:
        return 1
    return max(lists * 5 // 64, min(lists, 256) // 4, 1) if "fs" in index_type else max(1, lists // 16)


def embedding_blocks(project: RetroProject, block_size: int, dim: int) -> Blocks:
    return Blocks(project.root / "embeddings", len(project.chunks()), block_size, np.float32, (dim,), "index")


def embed_database(
    project: RetroProject,
    embedder,
    block_size: int,
    progress: Callable[[int, int], None] | None = None,
    ranks: Ranks = Ranks(),
) -> Blocks:
    """Embeddings of every chunk, computing only the blocks not yet on disk, each rank its share."""
    blocks = embedding_blocks(project, block_size, embedder.dim)
    mine = ranks.share(ranks.from_main(blocks.missing()))
    reader = ChunkReader(project) if mine else None
    total, done = sum(end - start for start, end in mine), 0
    for start, end in mine:
        blocks.save(start, end, embedder(reader.texts(range(start, end))))
        done += end - start
        if progress is not None:
            progress(done, total)
    ranks.barrier()
    return blocks


def _rows(blocks: Blocks, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` (sorted) of the blocks, reading only the blocks that hold some."""
    parts = [
        blocks.load(start, end)[ids[(ids >= start) & (ids < end)] - start] for start, end in blocks.ranges()
    ]
    return np.concatenate(parts).astype(np.float32)


def _merge(into, shard, offset: int) -> None:
    """Append the vectors of ``shard`` to ``into`` (copies of one trained index), their ids shifted by
    ``offset``: the index that adding them all in order to ``into`` gives."""
    import faiss

    target, source, count = faiss.downcast_index(into), faiss.downcast_index(shard), shard.ntotal
    # (new names: the callers' objects own the C++ indexes that these views point into)
    if isinstance(target, faiss.IndexIVF):
        target.merge_from(source, offset)
    elif isinstance(target, faiss.IndexFlatCodes) and target.ntotal == offset:  # its ids are positions
        target.merge_from(source, 0)
    elif isinstance(target, faiss.IndexRefine | faiss.IndexPreTransform):  # RFlat, OPQ: merge the parts
        inner = ("base_index", "refine_index") if isinstance(target, faiss.IndexRefine) else ("index",)
        for name in inner:
            _merge(getattr(target, name), getattr(source, name), offset)
        target.ntotal += count
    else:
        raise RetroProjectError(
            f"faiss cannot merge shards of a {type(target).__name__} index; index with one rank or another "
            "--index-type"
        )


def _zero_padding(index) -> None:
    """Zero the unused slots of each fast-scan list's last block: merging copies them uninitialised,
    and the index file must not depend on how many ranks added the vectors."""
    import faiss

    try:
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    except RuntimeError:  # not an IVF index
        return
    if not isinstance(lists, faiss.BlockInvertedLists):
        return
    zero, per_block = np.zeros(lists.packer.code_size, np.uint8), lists.n_per_block
    for number in range(lists.nlist):
        size = lists.list_size(number)
        if size % per_block:
            blocks = -(-size // per_block)
            codes = faiss.rev_swig_ptr(lists.get_codes(number), blocks * lists.block_size)
            for slot in range(size, blocks * per_block):
                lists.packer.pack_1(zero, slot, codes.reshape(blocks, lists.block_size))


def _train(index, index_type: str, sample: np.ndarray) -> None:
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)  # the other ranks wait: all the node's cores
    if faiss.get_num_gpus() > 0 and "IVF" in index_type:  # faiss-gpu (the gpu extra): k-means on the GPUs
        ivf = faiss.extract_index_ivf(index)
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    try:
        index.train(sample)
    except RuntimeError as err:
        raise RetroProjectError(
            f"faiss could not train {index_type!r} on {len(sample)} chunks ({err}); give more --train-chunks "
            "or a smaller index"
        ) from None


def _add(
    project: RetroProject, blocks: Blocks, ranks: Ranks, progress: Callable[[str, int, int], None] | None
):
    """The trained index holding every chunk: each rank adds its contiguous part of the blocks to a
    copy of it and writes that shard; rank 0 merges the shards in rank order (None on other ranks)."""
    import faiss

    folder = project.index_path.parent
    index = faiss.read_index(str(folder / "trained.faiss"))
    faiss.omp_set_num_threads(available_cores())
    mine = ranks.part(blocks.ranges())
    for start, end in mine:
        index.add(np.ascontiguousarray(blocks.load(start, end), dtype=np.float32))
        if progress:
            progress("add", end - mine[0][0], mine[-1][1] - mine[0][0])
    shard = folder / f"shard-{ranks.rank}.faiss"
    if not ranks.main:
        with atomic_output(shard) as tmp:
            faiss.write_index(index, str(tmp))
    ranks.barrier()
    if not ranks.main:
        return None
    for rank in range(1, ranks.world):
        part = Ranks(rank, ranks.world).part(blocks.ranges())
        path = folder / f"shard-{rank}.faiss"
        _merge(index, faiss.read_index(str(path)), part[0][0] if part else index.ntotal)
        path.unlink()
    _zero_padding(index)
    return index


def build_index(
    project: RetroProject,
    embedder,
    index_type: str | None = None,
    train_chunks: int | None = None,
    nprobe: int | None = None,
    ef_search: int = 32,
    block_size: int = 100_000,
    k_factor: int = 8,
    progress: Callable[[str, int, int], None] | None = None,
    ranks: Ranks = Ranks(),
) -> dict[str, Any]:
    """Embed, train and add, on every rank of ``ranks`` (rank 0 records); the record, on every rank."""
    import faiss

    db = check_inputs(project)
    check_bert_tokenizer(project, db, embedder.tokenizer)
    total = len(project.chunks())
    described = embedder.description
    if ranks.main:
        previous = project.config().get("index")
        previous = previous if isinstance(previous, dict) else {}
        if previous.get("embedder") != described or previous.get("block_size", block_size) != block_size:
            for stale in embedding_blocks(project, block_size, embedder.dim).folder.glob("*.npy"):
                stale.unlink()  # embeddings of another model or blocking
        project.record("index", {"embedder": described, "block_size": block_size, "complete": False,
                                 "db_sha256": db["db_sha256"]})  # fmt: skip
    ranks.barrier()
    blocks = embed_database(
        project, embedder, block_size, lambda d, t: progress and progress("embed", d, t), ranks
    )
    default = default_index(total, embedder.dim)
    index_type = index_type or default
    train_chunks = min(train_chunks or total, total)
    trained = project.index_path.parent / "trained.faiss"
    if ranks.main:
        try:
            index = faiss.index_factory(embedder.dim, index_type)
        except RuntimeError as err:
            raise RetroProjectError(f"--index-type {index_type!r}: faiss cannot build it ({err})") from None
        _train(index, index_type, _rows(blocks, np.sort(project.sampled()[:train_chunks])))
        if progress:
            progress("train", 1, 1)
        trained.parent.mkdir(parents=True, exist_ok=True)
        for stale in trained.parent.glob("shard-*.faiss"):  # of a killed run
            stale.unlink()
        with atomic_output(trained) as tmp:
            faiss.write_index(index, str(tmp))
    ranks.barrier()
    index = _add(project, blocks, ranks, progress)
    record = None
    if ranks.main:
        with atomic_output(project.index_path) as tmp:
            faiss.write_index(index, str(tmp))
        trained.unlink()
        record = {
            "embedder": described,
            "block_size": block_size,
            "complete": True,
            "index_type": index_type,
            "index_type_default": index_type == default,
            "train_chunks": int(train_chunks),
            "nprobe": nprobe or default_nprobe(index_type),
            "ef_search": ef_search,
            "k_factor": k_factor,
            "chunks": total,
            "faiss": faiss.__version__,
            "db_sha256": db["db_sha256"],
            "index_sha256": project.index_hash(),
        }
        project.record("index", record)
    return ranks.from_main(record)


def load_index(project: RetroProject, record: dict[str, Any]):
    """The project's index, verified to be the file the index stage wrote (its recorded sha256) over
    this database, with its search settings (nprobe, efSearch) applied."""
    import faiss

    path, rerun = project.index_path, project.rerun("index")
    if not record["complete"]:
        raise RetroProjectError(f"{project.root}: `mtk retro index` did not finish; {rerun}")
    if not path.is_file():
        raise RetroProjectError(f"{path}: missing; {rerun}")
    if project.index_hash() != record["index_sha256"]:
        raise RetroProjectError(
            f"{path}: changed since `mtk retro index` wrote it (its sha256 is not index.index_sha256 of "
            f"{project.config_path}): the file is corrupt or was replaced; {rerun}"
        )
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as err:
        raise RetroProjectError(
            f"{path}: faiss cannot read it ({str(err).splitlines()[-1]}); {rerun}"
        ) from None
    chunks, dim = len(project.chunks()), record["embedder"]["dim"]
    if (index.ntotal, index.d) != (chunks, dim):
        raise RetroProjectError(
            f"{path}: {index.ntotal} vectors of {index.d} dimensions, but the database has {chunks} chunks "
            f"embedded in {dim}; {rerun}"
        )
    space = faiss.ParameterSpace()
    if ivf_lists(record["index_type"]):
        space.set_index_parameter(index, "nprobe", record["nprobe"])
        if "HNSW" in record["index_type"]:
            space.set_index_parameter(index, "quantizer_efSearch", record["ef_search"])
    if "RFlat" in record["index_type"]:  # candidates re-ranked exactly: k x k_factor of them
        space.set_index_parameter(index, "k_factor_rf", record["k_factor"])
    return index


def search(index, queries: np.ndarray, k: int, where: Path) -> np.ndarray:
    """Ids (queries, k) of each query's nearest database chunks, best first, from ``index`` (read
    from ``where``). faiss pads a row with -1 after its last candidate when it found fewer than k:
    an IVF or graph index that reached fewer, or any index of fewer than k chunks; an exact Flat
    index of k chunks or more always finds k. Any other id outside the database is refused."""
    import faiss

    ids = np.asarray(index.search(queries, k)[1])
    check_ids(ids, index.ntotal, where, "index")
    none = ids == -1
    exact = isinstance(index, faiss.IndexFlat) and index.ntotal >= k
    bad = (none[:, :-1] & ~none[:, 1:]).any(axis=1) | (exact & none.any(axis=1))
    if bad.any():
        found = ids[int(np.argmax(bad))].tolist()
        shown = ", ".join(map(str, found[:10])) + (", ..." if len(found) > 10 else "")
        raise RetroProjectError(
            f"{where}: a search returned chunks [{shown}]: -1 (none found) "
            + ("from an exact index that holds enough chunks" if exact else "before a chunk")
            + "; the index is damaged: re-run `mtk retro index`"
        )
    return ids
