"""Run directories and the Checkpointer in one process: names, publishing, pruning, loading, self-description."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtk.checkpoint import (
    DESCRIPTION,
    TRACKER,
    Checkpointer,
    CheckpointError,
    RunDir,
    checkpoint_description,
    describe_files,
    load_checkpoint,
    rng_state,
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


def trainer_state(iteration: int) -> dict:
    """What the Trainer saves beside the weights, for checkpoint ``iteration``."""
    return {"iteration": iteration, "consumed_samples": 10 * iteration, "consumed_tokens": 160 * iteration,
            "skipped_iterations": 0, "scaler": {}, "rng": [rng_state()], "config": CONFIG.to_dict()}  # fmt: skip


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
        saver.save(iteration, trainer_state(iteration))
    run = RunDir(tmp_path)
    assert run.checkpoints() == [4, 6] and run.latest() == 6
    assert not list(tmp_path.glob(".*"))  # no staging folder or temporary tracker left
    described = json.loads((run.checkpoint(6) / DESCRIPTION).read_text())
    assert described == {"config": CONFIG.to_dict(), "tokenizer": TOKENIZER, "iteration": 6}
    assert checkpoint_description(tmp_path) == described

    other, other_optimizer = trained_pieces(1)
    assert not torch.equal(other.embedding.weight, model.embedding.weight)
    state = checkpointer(tmp_path, other, other_optimizer).load()
    assert state["iteration"] == 6 and state["consumed_samples"] == 60
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    moments = [s["exp_avg"] for s in optimizer.state.values()]
    restored = [s["exp_avg"] for s in other_optimizer.state.values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, restored, strict=True))
    assert load_checkpoint(tmp_path, 4)["model"].keys() == model.state_dict().keys()
    with_optimizer = load_checkpoint(tmp_path, 6, parts=("model", "optimizer"))["optimizer"]
    saved = {name: with_optimizer[f"state.{name}.exp_avg"] for name, _ in model.named_parameters()}
    assert all(
        torch.equal(saved[name], optimizer.state[p]["exp_avg"]) for name, p in model.named_parameters()
    )


def test_load_prefers_the_load_directory_and_finds_nothing_in_an_empty_one(tmp_path):
    model, optimizer = trained_pieces(0)
    checkpointer(tmp_path / "a", model, optimizer).save(3, trainer_state(3))
    fresh, fresh_optimizer = trained_pieces(1)
    assert checkpointer(tmp_path / "b", fresh, fresh_optimizer).load() is None
    loaded = checkpointer(tmp_path / "b", fresh, fresh_optimizer, load_dir=RunDir(tmp_path / "a")).load()
    assert loaded["iteration"] == 3 and torch.equal(fresh.embedding.weight, model.embedding.weight)


def test_checkpoints_written_before_they_described_themselves_are_described_by_their_run(tmp_path):
    model, optimizer = trained_pieces(0)
    checkpointer(tmp_path, model, optimizer).save(1, trainer_state(1))
    (RunDir(tmp_path).checkpoint(1) / DESCRIPTION).unlink()
    RunDir(tmp_path).config.write_text(json.dumps(CONFIG.to_dict()))
    RunDir(tmp_path).manifest.write_text(json.dumps({"stage": "train", "tokenizer": TOKENIZER}))
    assert checkpoint_description(tmp_path) == {
        "config": CONFIG.to_dict(),
        "tokenizer": TOKENIZER,
        "iteration": 1,
    }


# ---- failure behaviour -------------------------------------------------------------------------------


def saved_run(root, iterations=(2, 4), **kwargs):
    """A run directory with checkpoints at ``iterations``; the weights differ per iteration (+iteration)."""
    model, optimizer = trained_pieces(0)
    saver = checkpointer(root, model, optimizer, **kwargs)
    for iteration in iterations:
        with torch.no_grad():
            model.embedding.weight.fill_(float(iteration))
        saver.save(iteration, trainer_state(iteration))
    return saver


def loaded_iteration(root, **kwargs) -> tuple[int, list[str]]:
    model, optimizer = trained_pieces(1)
    loader = checkpointer(root, model, optimizer, **kwargs)
    state = loader.load()
    assert torch.all(model.embedding.weight == state["iteration"])  # the weights of that checkpoint
    return state["iteration"], loader.warnings


def shard(folder) -> Path:
    return next(folder.glob("*.distcp"))


DAMAGES = {
    "truncated shard": lambda f: shard(f).write_bytes(shard(f).read_bytes()[:50]),
    "emptied shard": lambda f: shard(f).write_bytes(b""),
    "garbage in a shard": lambda f: shard(f).write_bytes(bytes(len(shard(f).read_bytes()))),
    "missing .metadata": lambda f: (f / ".metadata").unlink(),
    "truncated trainer state": lambda f: (f / "trainer.safetensors").write_bytes(b"\x00" * 10),
    "missing checksums": lambda f: (f / "checksums.json").unlink(),
}


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_a_damaged_latest_checkpoint_is_skipped_for_the_newest_intact_one(tmp_path, kind):
    saved_run(tmp_path)
    DAMAGES[kind](RunDir(tmp_path).checkpoint(4))
    iteration, warnings = loaded_iteration(tmp_path)
    assert iteration == 2
    assert "iter_0000004" in warnings[0] and "resuming from" in warnings[-1] and str(tmp_path) in warnings[-1]
    with pytest.raises(CheckpointError, match="iter_0000004 is damaged"):
        load_checkpoint(tmp_path, 4)


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    saved_run(tmp_path)
    for iteration in (2, 4):
        DAMAGES["garbage in a shard"](RunDir(tmp_path).checkpoint(iteration))
    with pytest.raises(CheckpointError, match="holds checkpoints, but none is intact"):
        loaded_iteration(tmp_path)


def test_a_lost_tracker_recovers_the_newest_checkpoint(tmp_path):
    saved_run(tmp_path)
    RunDir(tmp_path).tracker.unlink()
    iteration, warnings = loaded_iteration(tmp_path)
    assert iteration == 4 and "latest_checkpointed_iteration.txt is missing" in warnings[0]
    RunDir(tmp_path).tracker.write_text("9\n")  # names a folder that is gone
    iteration, warnings = loaded_iteration(tmp_path)
    assert iteration == 4 and "names iteration 9, which is missing" in " ".join(warnings)


def test_the_save_directory_wins_over_load_and_an_empty_load_is_an_error(tmp_path):
    saved_run(tmp_path / "a", iterations=(2,))
    saved_run(tmp_path / "b", iterations=(4,))
    assert loaded_iteration(tmp_path / "b", load_dir=RunDir(tmp_path / "a"))[0] == 4  # a requeued job
    assert loaded_iteration(tmp_path / "c", load_dir=RunDir(tmp_path / "a"))[0] == 2
    model, optimizer = trained_pieces(1)
    with pytest.raises(CheckpointError, match="--load .*typo: no checkpoint there"):
        checkpointer(tmp_path / "c", model, optimizer, load_dir=RunDir(tmp_path / "typo")).load()


def test_pruning_keeps_the_tracked_checkpoint_and_goes_by_iteration(tmp_path):
    saved_run(tmp_path, iterations=(5, 10, 20))
    RunDir(tmp_path).tracker.write_text("10\n")  # rolled back: the run continues from 10
    model, optimizer = trained_pieces(1)
    saver = checkpointer(tmp_path, model, optimizer, keep_last=1)
    assert saver.load()["iteration"] == 10
    saver.save(15, trainer_state(15))
    assert RunDir(tmp_path).checkpoints() == [15, 20] and RunDir(tmp_path).latest() == 15
    with pytest.raises(CheckpointError, match="keep at least the newest"):
        checkpointer(tmp_path, model, optimizer, keep_last=0)


def test_each_iteration_is_saved_once_and_replacing_an_abandoned_one_keeps_a_checkpoint(
    tmp_path, monkeypatch
):
    published = []
    real_publish = Checkpointer._publish
    monkeypatch.setattr(
        Checkpointer, "_publish", lambda self, i, *a: published.append(i) or real_publish(self, i, *a)
    )
    saver = saved_run(tmp_path, iterations=(2, 4))
    saver.save(4, trainer_state(4))  # the final save of a run whose save interval divides its length
    assert published == [2, 4]
    model, optimizer = trained_pieces(1)
    resumed = checkpointer(tmp_path, model, optimizer)
    resumed.load()
    resumed.save(4, trainer_state(4))  # a finished run started again
    assert published == [2, 4]
    RunDir(tmp_path).tracker.write_text("2\n")
    later = checkpointer(tmp_path, model, optimizer)
    later.load()
    later.save(4, trainer_state(4))  # another iter_4 than the one on disk: replaced, never missing
    assert published == [2, 4, 4] and RunDir(tmp_path).latest() == 4 and not list(tmp_path.glob(".iter*"))


def test_a_full_disk_says_so_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    import torch.distributed.checkpoint.filesystem as filesystem

    saver = saved_run(tmp_path, iterations=(2,))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem, "_write_item", full)
    with pytest.raises(
        CheckpointError,
        match=r"no space left on device while saving checkpoint 4 to .*\.iter_0000004\.tmp; .*iter_0000002 is still the latest",
    ):
        saver.save(4, trainer_state(4))
    assert RunDir(tmp_path).latest() == 2 and not list(tmp_path.glob(".iter*"))


def test_one_run_at_a_time_holds_a_run_directory(tmp_path):
    import os
    import socket

    with RunDir(tmp_path).lock():
        with pytest.raises(
            CheckpointError, match=f"in use by pid {os.getpid()} on host {socket.gethostname()}"
        ):
            with RunDir(tmp_path).lock():
                pass
    with RunDir(tmp_path).lock():  # released with its holder
        pass


class _Exploit:
    """Unpickling this runs code: the attack a checkpoint must not carry out."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_legacy_trainer_state_that_runs_code_is_refused(tmp_path):
    import pickle

    saved_run(tmp_path, iterations=(2,))
    folder = RunDir(tmp_path).checkpoint(2)
    (folder / "trainer.safetensors").unlink()
    (folder / "checksums.json").unlink()  # as mtk 0.1 wrote checkpoints
    marker = tmp_path / "PWNED"
    torch.save({"iteration": 2, "x": _Exploit(marker)}, folder / "trainer.pt")
    for attempt in (lambda: load_checkpoint(tmp_path), lambda: loaded_iteration(tmp_path)):
        with pytest.raises(CheckpointError, match="trainer.pt: refused"):
            attempt()
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused a non-tensor entry"):
        from mtk.checkpoint import _weights_only

        _weights_only(__import__("io").BytesIO(pickle.dumps(_Exploit(marker))))
    assert not marker.exists()


def test_dcp_metadata_that_runs_code_is_refused(tmp_path):
    import pickle

    saved_run(tmp_path, iterations=(2,))
    folder = RunDir(tmp_path).checkpoint(2)
    marker = tmp_path / "PWNED"
    (folder / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    checksums = json.loads((folder / "checksums.json").read_text())  # the attacker rewrites them too
    checksums["files"][".metadata"] = describe_files(folder, [".metadata"])[".metadata"]
    (folder / "checksums.json").write_text(json.dumps(checksums))
    with pytest.raises(
        CheckpointError, match=r"\.metadata: refused .*is not part of a checkpoint's metadata"
    ):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"\.metadata: refused"):
        loaded_iteration(tmp_path)
    assert not marker.exists()
