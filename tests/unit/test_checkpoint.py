"""Run directories and the Checkpointer in one process: names, publishing, pruning, loading, self-description."""

from __future__ import annotations

import json

import pytest
import torch

from mtk.checkpoint import (
    DESCRIPTION,
    TRACKER,
    Checkpointer,
    CheckpointError,
    RunDir,
    checkpoint_description,
    load_checkpoint,
)
from mtk.config import apply_overrides
from mtk.models.gpt import SPEC
from mtk.presets import load_preset
from mtk.train.optim import build_optimizer

CONFIG = apply_overrides(load_preset("gpt-tiny").sections, {"seq_length": 16, "num_layers": 1})
TOKENIZER = {"kind": "null", "vocab_size": 4096, "files": []}


def trained_pieces(seed: int):
    torch.manual_seed(seed)
    model = SPEC.build(CONFIG.model)
    optimizer = build_optimizer(model, CONFIG.train)
    model(torch.randint(0, 4096, (2, 16))).float().mean().backward()
    optimizer.step()
    return model, optimizer


def checkpointer(root, model, optimizer, **kwargs) -> Checkpointer:
    description = {"config": CONFIG.to_dict(), "tokenizer": TOKENIZER}
    return Checkpointer(RunDir(root), [model], [optimizer], description, **kwargs)


def test_run_dir_names_every_file(tmp_path):
    run = RunDir(tmp_path)
    assert run.checkpoint(12).name == "iter_0000012" and run.staging(12).name == ".iter_0000012.tmp"
    assert (run.config.name, run.manifest.name, run.metrics.name, run.tracker.name) == (
        "config.json", "mtk.json", "metrics.jsonl", TRACKER)  # fmt: skip
    for iteration in (100, 9, 10):
        run.checkpoint(iteration).mkdir()
    (tmp_path / "iter_junk").mkdir()
    assert run.checkpoints() == [9, 10, 100] and run.latest() is None
    run.tracker.write_text("abc\n")
    with pytest.raises(CheckpointError, match="expected an iteration number"):
        run.latest()
    run.tracker.write_text("10\n")
    with pytest.raises(CheckpointError, match="names iteration 10, but .*iter_0000010 is missing"):
        run.latest()


def test_publish_prunes_and_describes_and_load_restores(tmp_path):
    model, optimizer = trained_pieces(0)
    saver = checkpointer(tmp_path, model, optimizer, keep_last=2)
    for iteration in (2, 4, 6):
        saver.save(iteration, {"iteration": iteration})
    run = RunDir(tmp_path)
    assert run.checkpoints() == [4, 6] and run.latest() == 6
    assert not list(tmp_path.glob(".*"))  # no staging folder or temporary tracker left
    described = json.loads((run.checkpoint(6) / DESCRIPTION).read_text())
    assert described == {"config": CONFIG.to_dict(), "tokenizer": TOKENIZER, "iteration": 6}
    assert checkpoint_description(tmp_path) == described

    other, other_optimizer = trained_pieces(1)
    assert not torch.equal(other.embedding.weight, model.embedding.weight)
    state = checkpointer(tmp_path, other, other_optimizer).load()
    assert state == {"iteration": 6}
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    moments = [s["exp_avg"] for s in optimizer.state.values()]
    restored = [s["exp_avg"] for s in other_optimizer.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, restored, strict=True))
    assert load_checkpoint(tmp_path, 4)["model"].keys() == model.state_dict().keys()


def test_load_prefers_the_load_directory_and_finds_nothing_in_an_empty_one(tmp_path):
    model, optimizer = trained_pieces(0)
    checkpointer(tmp_path / "a", model, optimizer).save(3, {"iteration": 3})
    fresh, fresh_optimizer = trained_pieces(1)
    assert checkpointer(tmp_path / "b", fresh, fresh_optimizer).load() is None
    loaded = checkpointer(tmp_path / "b", fresh, fresh_optimizer, load_dir=RunDir(tmp_path / "a")).load()
    assert loaded == {"iteration": 3} and torch.equal(fresh.embedding.weight, model.embedding.weight)


def test_checkpoints_written_before_they_described_themselves_are_described_by_their_run(tmp_path):
    model, optimizer = trained_pieces(0)
    checkpointer(tmp_path, model, optimizer).save(1, {"iteration": 1})
    (RunDir(tmp_path).checkpoint(1) / DESCRIPTION).unlink()
    RunDir(tmp_path).config.write_text(json.dumps(CONFIG.to_dict()))
    RunDir(tmp_path).manifest.write_text(json.dumps({"stage": "train", "tokenizer": TOKENIZER}))
    assert checkpoint_description(tmp_path) == {
        "config": CONFIG.to_dict(),
        "tokenizer": TOKENIZER,
        "iteration": 1,
    }
