"""Data parallelism (gloo, 2 processes under torchrun): the same losses as one process, metrics and watchdog."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtk.checkpoint import latest_iteration, load_checkpoint
from tests.conftest import invoke, read_metrics, train_losses

pytestmark = pytest.mark.slow  # several processes under torchrun

ARGS = ["--preset", "gpt-tiny", "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--log-interval", "1", "--eval-interval", "0", "--num-workers", "0", "--split", "90,5,5", "--device", "cpu"]  # fmt: skip
TOLERANCE = 1e-5  # relative: reduction order differs between one process and two


losses = train_losses


def single(*args: str) -> None:
    result = invoke("train", *ARGS, *args, code=None)
    assert result.exit_code == 0, result.output


def two_ranks(*args: str) -> str:
    command = [sys.executable, "-m", "stages.main", "train", *ARGS, *args, "--nproc-per-node", "2"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=os.getcwd(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_dp2_losses_match_one_process_and_checkpoints_move_between_layouts(tmp_path, counting_data):
    common = ["--data", counting_data, "--train-iters", "6"]
    single(*common, "--save", str(tmp_path / "one"))
    output = two_ranks(*common, "--save", str(tmp_path / "two"))
    assert "2 x cpu" in output
    reference = losses(tmp_path / "one")
    assert losses(tmp_path / "two") == pytest.approx(reference, rel=TOLERANCE)
    assert len(read_metrics(tmp_path / "two", "train")) == 6  # only rank 0 writes metrics
    # the DP2 checkpoint holds whole tensors: same names and shapes as the single-process one
    sharded, plain = load_checkpoint(tmp_path / "two")["model"], load_checkpoint(tmp_path / "one")["model"]
    assert {k: tuple(v.shape) for k, v in sharded.items()} == {k: tuple(v.shape) for k, v in plain.items()}
    assert len(load_checkpoint(tmp_path / "two")["rng"]) == 2  # every rank's RNG state

    # stop DP2 at iteration 3, continue in one process: the losses go on as in the single run
    two_ranks(*common, "--save", str(tmp_path / "moved"), "--exit-after", "3")
    assert latest_iteration(tmp_path / "moved") == 3
    single(*common, "--save", str(tmp_path / "moved"))
    assert losses(tmp_path / "moved") == pytest.approx(reference, rel=TOLERANCE)


def _worker_pid(rank: int, marker: str) -> int | None:
    """The torchrun worker of ``rank`` whose command line contains ``marker``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            marker in cmdline
            and f"RANK={rank}".encode() in environ
            and b"LOCAL_RANK=" + str(rank).encode() in environ
        ):
            return int(entry.name)
    return None


def test_a_hung_rank_aborts_the_job_with_the_rank_and_the_collective(tmp_path):
    import signal
    import time

    run = tmp_path / "hung"
    command = [sys.executable, "-m", "stages.main", "train", *ARGS, "--mock-data", "--train-iters", "100000",
               "--save", str(run), "--timeout-minutes", "0.1", "--nproc-per-node", "2"]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=os.getcwd()
    )
    deadline, stopped = time.monotonic() + 120, None
    try:
        while time.monotonic() < deadline and stopped is None:
            if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size:
                stopped = _worker_pid(1, str(run))
            time.sleep(0.1)
        assert stopped is not None, "the job did not start"
        os.kill(stopped, signal.SIGSTOP)  # rank 1 hangs: it never joins the next collective
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "did not complete within" in line:  # rank 0 gave up: end the stopped rank (torchrun
                os.kill(stopped, signal.SIGKILL)  # would wait 30 s for it to take its SIGTERM)
        output = "".join(lines)
        proc.wait(timeout=180)
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGKILL)
        proc.kill()
    assert proc.returncode != 0
    flat = " ".join(output.split())
    assert "rank 0: iteration" in flat and "did not complete within 0.1 minutes" in flat
    assert "all-reduce" in flat or "all-gather" in flat
