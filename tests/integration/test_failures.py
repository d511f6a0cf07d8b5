"""`mtk train` and the checkpoint tools as a hostile or unlucky user meets them: crafted checkpoints,
bad values, a busy or damaged run directory, runs that only skip steps, interrupted final work."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtk.checkpoint import RunDir, latest_iteration
from mtk.train.loop import Trainer
from stages.main import app

runner = CliRunner()
T = ["train", "--preset", "gpt-tiny", "--mock-data", "--num-workers", "0", "--eval-interval", "0",
     "--seq-length", "16", "--log-interval", "1", "--device", "cpu"]  # fmt: skip


def run(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    output = " ".join(result.output.split())
    assert result.exit_code == code, output
    assert "Traceback" not in result.output
    return output


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
        runner.invoke(app, args, catch_exceptions=False)
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
