"""`mtk train` and the checkpoint tools as a hostile or unlucky user meets them: crafted checkpoints,
bad values, a busy or damaged run directory, runs that only skip steps, interrupted final work."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from mtk.checkpoint import RunDir, latest_iteration
from mtk.train.loop import Trainer
from tests.conftest import invoke, run, state_differences

T = ["train", "--preset", "gpt-tiny", "--mock-data", "--num-workers", "0", "--eval-interval", "0",
     "--seq-length", "16", "--log-interval", "1", "--device", "cpu"]  # fmt: skip


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_runs_code_is_refused_by_every_command(tmp_path):
    saved = tmp_path / "run"
    run(*T, "--save", str(saved), "--train-iters", "2")
    folder = RunDir(saved).checkpoint(2)
    marker = tmp_path / "PWNED"
    (folder / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    (folder / "checksums.json").unlink()
    (folder / "trainer.safetensors").unlink()
    (folder / "trainer.pt").write_bytes(pickle.dumps({"iteration": 2, "x": _Exploit(marker)}))
    commands = [
        ["checkpoint", "inspect", str(saved)],
        ["checkpoint", "convert", str(saved), "-o", str(tmp_path / "w.safetensors")],
        ["generate", "--load", str(saved), "--prompt", "1 2 3"],
        [*T, "--save", str(saved), "--train-iters", "4"],
        [*T, "--save", str(tmp_path / "new"), "--load", str(saved), "--train-iters", "4"],
    ]
    for command in commands:
        assert "refused" in run(*command, code=2), command
    assert not marker.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "num_layers=0"], "'num_layers' = 0 is out of range: it must be >= 1"),
        (["--set", "num_layers=-1"], "'num_layers' = -1 is out of range"),
        (["--set", "num_attention_heads=0"], "'num_attention_heads' = 0 is out of range"),
        (["--set", "num_query_groups=0"], "'num_query_groups' = 0 is out of range"),
        (["--set", "hidden_size=-64"], "'hidden_size' = -64 is out of range"),
        (["--micro-batch-size", "0"], "'micro_batch_size' = 0 is out of range"),
        (["--global-batch-size", "0"], "'global_batch_size' = 0 is out of range"),
        (["--log-interval", "0"], "'log_interval' = 0 is out of range"),
        (["--tp", "0"], "'tensor_model_parallel_size' = 0 is out of range"),
        (["--set", "batch_size_ramp=[[0,0]]"], "'batch_size_ramp' point [0, 0]"),
        (["--set", "batch_size_ramp=[[0]]"], "'batch_size_ramp' point [0]"),
        (["--clip-grad", "-1"], "'clip_grad' = -1.0 is out of range: it must be >= 0"),
        (["--weight-decay", "-1"], "'weight_decay' = -1.0 is out of range"),
        (["--fp8", "hybrid", "--fp16"], "FP8 runs with bf16 or fp32 weights, not fp16"),
        (["--fp8", "e5m2"], "'e5m2' is not one of 'hybrid'"),
        (["--train-iters", "0"], "'train_iters' = 0 is out of range"),
        (["--keep-last", "-1"], "greater than or equal to 1"),
        (["--keep-last", "0"], "greater than or equal to 1"),
    ],
)
def test_bad_values_are_refused_before_anything_runs(tmp_path, args, message):
    base = [*T, "--save", str(tmp_path / "run")]
    if "--train-iters" not in args:
        base += ["--train-iters", "2"]
    assert message in run(*base, *args, code=2)
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_run_that_only_skips_steps_stops_naming_them(tmp_path):
    output = run(*T, "--save", str(tmp_path / "run"), "--train-iters", "50", "--skip-nan",
                 "--set", "init_method_std=1e30", "--max-consecutive-skips", "3", code=2)  # fmt: skip
    assert "iterations 1 to 3: all 3 steps were skipped" in output


def test_a_busy_run_directory_is_refused_naming_its_holder(tmp_path):
    import os

    with RunDir(tmp_path / "run").lock():
        output = run(*T, "--save", str(tmp_path / "run"), "--train-iters", "2", code=2)
    assert f"is in use by pid {os.getpid()}" in output
    run(*T, "--save", str(tmp_path / "run"), "--train-iters", "2")  # the holder is gone


def test_load_of_a_folder_without_a_checkpoint_is_an_error(tmp_path):
    output = run(
        *T, "--save", str(tmp_path / "run"), "--load", str(tmp_path / "typo"), "--train-iters", "2", code=2
    )
    assert "typo: no checkpoint there" in output


def test_a_requeued_load_and_save_command_resumes_from_its_own_progress(tmp_path):
    run(*T, "--save", str(tmp_path / "a"), "--train-iters", "2")
    command = [*T, "--load", str(tmp_path / "a"), "--save", str(tmp_path / "b"), "--train-iters", "8"]
    assert "resumed from iteration 2" in run(*command, "--exit-after", "5")
    assert "resumed from iteration 5" in run(*command)
    assert latest_iteration(tmp_path / "b") == 8 and latest_iteration(tmp_path / "a") == 2


def test_the_tracker_rolled_back_keeps_the_checkpoint_just_written(tmp_path):
    saved = tmp_path / "run"
    run(*T, "--save", str(saved), "--train-iters", "20", "--save-interval", "10")
    RunDir(saved).tracker.write_text("10\n")
    run(*T, "--save", str(saved), "--train-iters", "20", "--save-interval", "10", "--keep-last", "1",
        "--exit-after", "15")  # fmt: skip
    assert latest_iteration(saved) == 15 and RunDir(saved).checkpoints() == [15, 20]


def test_interrupted_final_evaluation_is_done_on_resume_and_iterations_are_logged_once(tmp_path, monkeypatch):
    saved = tmp_path / "run"
    args = [*T, "--save", str(saved), "--train-iters", "4", "--save-interval", "2", "--eval-iters", "1"]
    real = Trainer.evaluate

    def killed_at_test(self, dataset, split):
        if split == "test":
            raise RuntimeError("killed")
        return real(self, dataset, split)

    monkeypatch.setattr(Trainer, "evaluate", killed_at_test)
    with pytest.raises(RuntimeError, match="killed"):
        invoke(*args, code=None, catch_exceptions=False)
    assert latest_iteration(saved) == 2  # the last iteration is saved only once its evaluation is done
    monkeypatch.setattr(Trainer, "evaluate", real)
    with RunDir(saved).metrics.open("a") as metrics:
        metrics.write('{"iteration": 4, "lo')  # a record torn by the kill
    run(*args)
    logged = records(saved)
    assert [r["iteration"] for r in logged if "split" not in r] == [1, 2, 3, 4]
    assert [(r["split"], r["iteration"]) for r in logged if "split" in r] == [("test", 4)]
    assert "the run is complete" in run(*args)
    assert records(saved) == logged


# ---- issue 21: restart after a crash, links, checkpoints that read outside themselves, tampering -----


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A run directory with one checkpoint (iteration 2), copied by each test that tampers with it."""
    saved = tmp_path_factory.mktemp("trained") / "run"
    run(*T, "--save", str(saved), "--train-iters", "2")
    return saved


def tampered_copy(trained_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``trained_run`` and the folder of its checkpoint."""
    import shutil

    saved = tmp_path / "run"
    shutil.copytree(trained_run, saved)
    return saved, RunDir(saved).checkpoint(2)


def recount(folder: Path) -> None:
    """Record every file of checkpoint ``folder`` in its checksums, as a tamperer who knows the format would."""
    from mtk.checkpoint import CHECKSUMS, describe_files

    names = sorted(p.name for p in folder.iterdir() if p.name != CHECKSUMS)
    (folder / CHECKSUMS).write_text(json.dumps({"files": describe_files(folder, names)}))


def test_a_run_restarts_at_once_after_sigkill_with_dataloader_workers(tmp_path):
    """The run lock dies with the trainer: forked children (DataLoader workers) never hold it."""
    import subprocess
    import sys
    import time

    holder = tmp_path / "holder.py"
    holder.write_text(
        "import os, sys, time\n"
        "from mtk.checkpoint import RunDir\n"
        "with RunDir(sys.argv[1]).lock():\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(60)\n"  # a child that outlives its parent, as DataLoader workers do
        "        os._exit(0)\n"
        "    open(sys.argv[1] + '.locked', 'w').close()\n"
        "    os._exit(0) if sys.argv[2] == 'exit' else time.sleep(60)\n"
    )
    busy = subprocess.Popen([sys.executable, str(holder), str(tmp_path / "busy"), "stay"])
    while not (tmp_path / "busy.locked").exists():
        time.sleep(0.01)
    output = run(*T, "--save", str(tmp_path / "busy"), "--train-iters", "2", code=2)
    assert f"in use by pid {busy.pid}" in output and "(running)" in output
    busy.kill()
    busy.wait()
    subprocess.run([sys.executable, str(holder), str(tmp_path / "crashed"), "exit"], check=True)
    assert (tmp_path / "crashed.locked").exists()  # its child still sleeps, with the lock file open
    run(*T, "--save", str(tmp_path / "crashed"), "--train-iters", "2")


@pytest.mark.slow  # two training subprocesses with DataLoader workers, one killed
def test_a_run_killed_with_dataloader_workers_resumes_exactly_when_restarted_at_once(
    tmp_path, kill_during_training
):
    common = [*T, "--train-iters", "30", "--num-workers", "2", "--set", "hidden_dropout=0.1"]
    run(*common, "--save", str(tmp_path / "straight"))
    killed = tmp_path / "killed"
    assert kill_during_training([*common[1:], "--save-interval", "4"], killed, 8) < 30
    run(*common, "--save", str(killed), "--save-interval", "4")  # at once: the workers may still run
    assert [r["loss"] for r in records(killed) if "split" not in r] == [
        r["loss"] for r in records(tmp_path / "straight") if "split" not in r
    ], state_differences(tmp_path / "straight", killed)


def test_no_write_follows_a_symbolic_link(tmp_path, trained_run):
    victim = tmp_path / "victim.txt"
    victim.write_text("2\n")  # readable as the tracker it replaces: only the write can refuse it
    for name in (".lock", "metrics.jsonl", "mtk.json", "latest_checkpointed_iteration.txt"):
        saved, _ = tampered_copy(trained_run, tmp_path / name)
        (saved / name).unlink()
        (saved / name).symlink_to(victim)
        output = run(*T, "--save", str(saved), "--train-iters", "4", code=2)
        assert f"{saved / name}: is a symbolic link (to {victim})" in output, name
        assert victim.read_text() == "2\n", name
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / ".lock").symlink_to(tmp_path / "nowhere")
    assert "is a symbolic link" in run(*T, "--save", str(dangling), "--train-iters", "2", code=2)
    assert not (tmp_path / "nowhere").exists()
    # a staging folder planted as a link to another folder: the link is removed, nothing written there
    saved, _ = tampered_copy(trained_run, tmp_path / "staging")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    RunDir(saved).staging(4).symlink_to(elsewhere)
    run(*T, "--save", str(saved), "--train-iters", "4")
    assert latest_iteration(saved) == 4 and list(elsewhere.iterdir()) == []
    # prepared data: an output that is a link is refused, its target untouched
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "1 2 3"}\n')
    (tmp_path / "data_text_document.idx").symlink_to(victim)
    output = run("prepare-data", str(corpus), "-o", str(tmp_path / "data"), "-t", "null", "--vocab-size", "8",
                 "--workers", "1", code=2)  # fmt: skip
    assert "data_text_document.idx: is a symbolic link" in output and victim.read_text() == "2\n"


def _rewrite_metadata(folder: Path, change) -> None:
    from mtk.checkpoint import read_metadata

    metadata = read_metadata(folder)
    change(metadata)
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    recount(folder)


def test_a_checkpoint_never_reads_outside_its_folder(tmp_path, trained_run):
    other, _ = tampered_copy(trained_run, tmp_path / "other")
    shard = next(RunDir(other).checkpoint(2).glob("*.distcp"))
    readers = [["checkpoint", "inspect"], ["generate", "--prompt", "1 2", "--max-new-tokens", "2", "--load"]]
    for target in (str(shard), f"../../other/run/iter_0000002/{shard.name}", "/etc/passwd"):

        def point_elsewhere(metadata, target=target):
            for info in metadata.storage_data.values():
                info.relative_path = target

        saved, folder = tampered_copy(trained_run, tmp_path / "t" / str(abs(hash(target))))
        _rewrite_metadata(folder, point_elsewhere)
        for command in readers:
            output = run(*command, str(saved), code=2)
            assert f"names {target!r}, which is outside this folder" in output, (command, output)
        output = run(*T, "--save", str(saved), "--train-iters", "4", code=2)
        assert "outside this folder" in output and "none is intact" in output
    saved, folder = tampered_copy(trained_run, tmp_path / "shadow")
    (folder / "checksums.json").write_text(
        json.dumps({"files": {"../../etc/shadow": {"bytes": 1, "sha256": "0"}}})
    )
    output = run("checkpoint", "inspect", str(saved), code=2)
    assert "names '../../etc/shadow', which is outside this folder" in output
    saved, folder = tampered_copy(trained_run, tmp_path / "empty")
    (folder / "checksums.json").write_text('{"files": {}}')
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(bytes(shard.stat().st_size))  # corrupt, and no checksum says so
    output = run("checkpoint", "inspect", str(saved), code=2)
    assert "checksums.json does not record __0_0.distcp, which a load reads" in output


def _trainer_metadata(folder: Path, change) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "trainer.safetensors"
    with safe_open(str(path), framework="pt") as stored:
        tensors = {key: stored.get_tensor(key) for key in stored.keys()}  # noqa: SIM118
        state = json.loads(stored.metadata()["mtk_trainer_state"])
    tensors = change(state, tensors) or tensors
    save_file(tensors, str(path), metadata={"mtk_trainer_state": json.dumps(state)})


def _description(change) -> callable:
    def tamper(folder: Path) -> None:
        path = folder / "checkpoint.json"
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return tamper


def _set(section: str, key: str, value):
    def change(description):
        description["config"][section][key] = value
        return description

    return change


TAMPERINGS = {
    "metadata of wrong field types": (
        lambda f: _rewrite_metadata(f, lambda m: setattr(m, "storage_data", "abc")),
        ".metadata: refused, its tensor and storage tables are not tables",
    ),
    "storage offset not a number": (
        lambda f: _rewrite_metadata(
            f, lambda m: [setattr(i, "offset", "x") for i in m.storage_data.values()]
        ),
        "is malformed",
    ),
    "negative iteration": (
        lambda f: _trainer_metadata(f, lambda s, t: s.update(iteration=-5)),
        "trainer.safetensors: 'iteration' is -5, expected a whole number",
    ),
    "iteration as text": (
        lambda f: _trainer_metadata(f, lambda s, t: s.update(iteration="abc")),
        "'iteration' is 'abc'",
    ),
    "huge iteration": (
        lambda f: _trainer_metadata(f, lambda s, t: s.update(iteration=10**30)),
        "'iteration' is 1000000000000000000000000000000",
    ),
    "negative consumed samples": (
        lambda f: _trainer_metadata(f, lambda s, t: s.update(consumed_samples=-1)),
        "'consumed_samples' is -1",
    ),
    "missing tensor reference": (
        lambda f: _trainer_metadata(f, lambda s, t: s["rng"][0].update(torch={"__tensor__": "gone"})),
        "trainer.safetensors: not a readable trainer state",
    ),
    "rng of the wrong shape": (
        lambda f: _trainer_metadata(
            f,
            lambda s, t: {**t, s["rng"][0]["torch"]["__tensor__"]: t[s["rng"][0]["torch"]["__tensor__"]][:7]},
        ),
        "'rng' of rank 0: torch's state is not a uint8 tensor",
    ),
    "NaN epsilon": (
        _description(_set("model", "norm_epsilon", float("nan"))),
        "'norm_epsilon' = nan is out of range",
    ),
    "unknown family": (_description(_set("model", "family", "mamba")), "unknown model family 'mamba'"),
    "description as a list": (
        _description(lambda d: [d]),
        "checkpoint.json: expected a table with the run's 'config'",
    ),
    "checksums as a list": (None, "checksums.json is not a table of files"),
}


@pytest.mark.parametrize("kind", sorted(TAMPERINGS))
def test_tampered_checkpoint_content_ends_in_one_message_naming_the_file(tmp_path, trained_run, kind):
    tamper, message = TAMPERINGS[kind]
    saved, folder = tampered_copy(trained_run, tmp_path)
    if tamper is None:
        (folder / "checksums.json").write_text("[1, 2]")
    else:
        tamper(folder)
        recount(folder)  # consistent checksums: the content itself must be refused
    for command in (["checkpoint", "inspect", str(saved)], [*T, "--save", str(saved), "--train-iters", "4"]):
        output = run(*command, code=2)
        assert message in output, (command, output)


def test_a_legacy_trainer_state_missing_keys_is_refused_naming_the_file(tmp_path, trained_run):
    saved, folder = tampered_copy(trained_run, tmp_path)
    (folder / "trainer.safetensors").unlink()
    (folder / "checksums.json").unlink()
    torch.save({"iteration": 2}, folder / "trainer.pt")
    output = run("checkpoint", "inspect", str(saved), code=2)
    assert "trainer.pt: 'consumed_samples' is None" in output


def test_trainer_state_is_readable_by_teammates_as_every_other_checkpoint_file(trained_run):
    folder = RunDir(trained_run).checkpoint(2)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes["trainer.safetensors"] == modes["checkpoint.json"], modes


def test_load_of_another_model_shape_says_so(tmp_path, trained_run):
    saved, _ = tampered_copy(trained_run, tmp_path)
    RunDir(saved).config.unlink()  # nothing to compare against but the checkpoint itself
    output = run(*T, "--save", str(tmp_path / "new"), "--load", str(saved), "--train-iters", "4",
                 "--set", "hidden_size=32", code=2)  # fmt: skip
    assert (
        "holds another model (embedding.weight: (4096, 64) in the checkpoint, (4096, 32) in this model"
        in output
    )


def test_a_run_whose_every_step_was_skipped_fails(tmp_path):
    output = run(*T, "--save", str(tmp_path / "run"), "--train-iters", "3", "--skip-nan",
                 "--set", "init_method_std=1e30", code=2)  # fmt: skip
    assert "iterations 1 to 3: every step of this run was skipped" in output
    assert latest_iteration(tmp_path / "run") == 3  # saved all the same: nothing is lost


def test_plot_of_malformed_metrics_is_a_message(tmp_path, trained_run):
    saved, _ = tampered_copy(trained_run, tmp_path)
    RunDir(saved).metrics.write_text('{"iteration": 1, "loss": 2.0}\n[1, 2]\n{"iteration": 2, "loss": 1.0}\n')
    output = run("plot", str(saved), code=2)
    assert "metrics.jsonl:2: not a metrics record" in output
