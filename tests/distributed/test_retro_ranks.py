"""RETRO's index and query-neighbours on several ranks (gloo on CPU): one rank and two give
byte-identical embeddings, index files and neighbours, and a two-rank run stopped part-way resumes at
one rank to the same project."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from mtk.data.retro_project import RetroProject
from mtk.retro.db import build_db
from mtk.retro.index import build_index
from mtk.retro.query import query_neighbours
from mtk.retro.ranks import Ranks
from tests.conftest import invoke
from tests.integration.test_retro import build_db as build_db_cli
from tests.integration.test_retro import prepare_corpus
from tests.integration.test_retro_integrity import SETTINGS, CountingEmbedder, minilm, write_data

__all__ = ["minilm"]  # the fixture: MiniLM's folder

INDEX = {
    "index_type": "IVF4,PQ4x4fs,RFlat",
    "block_size": 50,
}  # fast-scan lists and an exact copy: both merged
QUERY = {"num_neighbours": 2, "query_k": 8, "block_samples": 3}


class Stopped(Exception):
    """A rank stopped on purpose, as if killed after its first block."""


class StopAfter:
    """``embedder`` that raises :class:`Stopped` at its call ``calls + 1``."""

    def __init__(self, embedder: CountingEmbedder, calls: int) -> None:
        self.embedder, self.calls = embedder, calls
        self.folder, self.dim, self.tokenizer = embedder.folder, embedder.dim, embedder.tokenizer
        self.description = embedder.description

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self.calls == 0:
            raise Stopped
        self.calls -= 1
        return self.embedder(texts)


def _rank(rank: int, world: int, store: str, root: str, minilm: Path, stage: str, stop: int | None) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    embedder = CountingEmbedder(minilm)
    embedder = embedder if stop is None else StopAfter(embedder, stop)
    ranks, project = Ranks(rank, world), RetroProject(root)
    try:
        if stage == "index":
            build_index(project, embedder, **INDEX, ranks=ranks)
        else:
            query_neighbours(project, embedder, **QUERY, ranks=ranks)
    except Stopped:
        return  # no collective is pending: every rank stops after its first block
    dist.destroy_process_group()


def two_ranks(tmp_path: Path, project: Path, minilm: Path, stage: str, stop: int | None = None) -> None:
    store = tmp_path / f"store-{stage}-{stop}"
    mp.spawn(_rank, (2, str(store), str(project), minilm, stage, stop), nprocs=2)


def files(project: Path) -> dict[str, bytes]:
    """What index and query-neighbours leave: embedding blocks, the index, each split's neighbours."""
    paths = [*sorted((project / "embeddings").glob("*.npy")), project / "index" / "index.faiss",
             *sorted((project / "query").glob("*.npy"))]  # fmt: skip
    return {str(path.relative_to(project)): path.read_bytes() for path in paths}


@pytest.mark.slow  # processes spawned for each stage
def test_two_ranks_equal_one_and_a_stopped_two_rank_run_resumes_at_one(tmp_path, minilm):
    embedder = CountingEmbedder(minilm)
    built = RetroProject(tmp_path / "db")
    build_db(built, SETTINGS | {"data_path": write_data(tmp_path, "corpus", 0)}, minilm)
    one, two, resumed = (shutil.copytree(built.root, tmp_path / name) for name in ("one", "two", "resumed"))

    build_index(RetroProject(one), embedder, **INDEX)
    query_neighbours(RetroProject(one), embedder, **QUERY)
    reference = files(one)
    assert len([name for name in reference if name.startswith("embeddings")]) >= 6  # blocks to share

    two_ranks(tmp_path, two, minilm, "index")
    two_ranks(tmp_path, two, minilm, "query")
    assert files(two) == reference
    assert RetroProject(two).stage("query-neighbours") == RetroProject(one).stage("query-neighbours")

    two_ranks(tmp_path, resumed, minilm, "index", stop=1)  # each rank embeds one block, then stops
    assert len(list((resumed / "embeddings").glob("*.npy"))) == 2
    assert not RetroProject(resumed).stage("index")["complete"]
    build_index(RetroProject(resumed), embedder, **INDEX)
    two_ranks(tmp_path, resumed, minilm, "query", stop=1)
    assert len(list((resumed / "query" / "train").glob("*.npy"))) == 2
    query_neighbours(RetroProject(resumed), embedder, **QUERY)
    assert files(resumed) == reference
    assert [path.name for path in (resumed / "index").glob("*.faiss")] == ["index.faiss"]  # no shard left


def torchrun(*args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "stages.main", *args]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, cwd=os.getcwd(), timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow  # a real BERT embeds a few hundred chunks four times
def test_the_cli_under_torchrun_and_nproc_per_node_equals_one_process_with_a_real_bert(tmp_path, minilm):
    one, two = tmp_path / "one", tmp_path / "two"
    corpus = prepare_corpus(tmp_path, documents=30)
    build_db_cli(one, corpus, minilm)
    shutil.copytree(one, two)
    index = ["--block-size", "100", "--index-type", "IVF8,PQ96x4fs,RFlat"]
    query = ["--block-samples", "30"]
    invoke("retro", "index", "--project", str(one), *index)
    invoke("retro", "query-neighbours", "--project", str(one), *query)
    torchrun("retro", "index", "--project", str(two), *index)
    proc = subprocess.run([sys.executable, "-m", "stages.main", "retro", "query-neighbours", "--project", str(two),
                           *query, "--nproc-per-node", "2"], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert files(two) == files(one)


def test_mtk_launch_writes_the_torchrun_command_of_a_retro_stage():
    output = invoke("launch", "torchrun", "--nodes", "2", "--gpus-per-node", "4", "--",
                    "mtk", "retro", "index", "--project", "retro", "--device", "cuda").output  # fmt: skip
    command = " ".join(output.replace("\\\n", " ").split())
    assert "--nnodes=2 --nproc-per-node=4" in command
    assert "-m mtk.stages.main retro index --project retro --device cuda" in command
