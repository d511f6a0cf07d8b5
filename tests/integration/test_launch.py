"""`mtk launch`: the printed torchrun command and the Slurm script really start a 2-rank training job.

Slurm itself is absent here: stand-in `srun` and `scontrol` scripts run the batch script on this machine.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from mtk.checkpoint import latest_iteration
from tests.conftest import invoke, read_metrics

TRAIN = ["mtk", "train", "--preset", "gpt-tiny", "--mock-data", "--seq-length", "32", "--micro-batch-size", "2",
         "--global-batch-size", "4", "--train-iters", "3", "--log-interval", "1", "--eval-interval", "0",
         "--num-workers", "0", "--device", "cpu", "--split", "90,5,5"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def iterations(run: Path) -> list[int]:
    return [r["iteration"] for r in read_metrics(run, "train")]


@pytest.mark.slow  # torchrun with two ranks
def test_printed_torchrun_command_trains_on_two_ranks(tmp_path):
    run = tmp_path / "run"
    result = invoke("launch", "torchrun", "--nodes", "1", "--gpus-per-node", "2", "--head", "127.0.0.1", "--port", str(free_port()),
         "--", *TRAIN, "--save", str(run), code=None)  # fmt: skip
    assert result.exit_code == 0, result.output
    command = result.output
    assert "--rdzv-backend=c10d" in command and "-m mtk.stages.main train" in command
    proc = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, cwd=os.getcwd(), timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 x cpu" in " ".join(proc.stdout.split()) and iterations(run) == [1, 2, 3]


def fake_slurm(bin_dir: Path) -> None:
    """srun drops its own options and runs the command; scontrol names this host as the only node."""
    bin_dir.mkdir()
    scripts = {
        "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
        "scontrol": '#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] && echo 127.0.0.1\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)


@pytest.mark.slow  # torchrun with two ranks
def test_slurm_script_runs_and_resumes_like_a_requeued_job(tmp_path):
    run, script = tmp_path / "run", tmp_path / "job.sbatch"
    result = invoke("launch", "slurm", "--nodes", "1", "--gpus-per-node", "2", "--time", "00:10:00", "--port", str(free_port()),
         "--log-dir", str(tmp_path / "logs"), "-o", str(script), "--", *TRAIN, "--save", str(run), code=None)  # fmt: skip
    assert result.exit_code == 0, result.output
    text = script.read_text()
    for line in ("#SBATCH --nodes=1", "#SBATCH --gpus-per-node=2", "#SBATCH --requeue", "#SBATCH --time=00:10:00",
                 "#SBATCH --signal=B:USR1@120", f"#SBATCH --output={tmp_path / 'logs'}/%x-%j.out", "scontrol requeue"):  # fmt: skip
        assert line in text
    fake_slurm(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1"}  # fmt: skip
    first = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, env=env, cwd=os.getcwd(), timeout=300
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert latest_iteration(run) == 3
    # a requeued job runs the same script again: it resumes and finds the run complete
    again = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, env=env, cwd=os.getcwd(), timeout=300
    )
    assert again.returncode == 0 and "the run is complete: iteration 3 of 3" in " ".join(again.stdout.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["launch", "slurm", "--nodes", "2"], "no command to launch"),
        (["launch", "torchrun", "--", "mtk", "train", "--nproc-per-node", "2"], "leave --nproc-per-node out"),
    ],
)
def test_launch_errors(args, message):
    result = invoke(*args, code=None)
    assert result.exit_code == 2 and message in result.output


def test_hostile_arguments_reach_the_command_as_text_and_never_run(tmp_path):
    """The batch script quotes every argument: "$(...)" in an argument stays text when the job starts."""
    script, marker = tmp_path / "job.sbatch", tmp_path / "PWN"
    hostile = ['x"$(touch PWN)"', "$(touch PWN)", "`touch PWN`", "a'b", "semi;touch PWN", "new\nline"]
    result = invoke("launch", "slurm", "--nodes", "1", "--gpus-per-node", "2", "-o", str(script),
                                 "--log-dir", str(tmp_path / "logs"), "--", "mtk", "train", "--data", *hostile, code=None)  # fmt: skip
    assert result.exit_code == 0, result.output
    fake_slurm(tmp_path / "bin")
    recorded = tmp_path / "argv.json"
    torchrun = tmp_path / "bin" / "torchrun"  # records what it was given instead of starting ranks
    torchrun.write_text(
        f'#!/usr/bin/env python3\nimport json, sys\njson.dump(sys.argv[1:], open("{recorded}", "w"))\n'
    )
    torchrun.chmod(stat.S_IRWXU)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1"}  # fmt: skip
    proc = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argv = json.loads(recorded.read_text())
    assert argv[-len(hostile) :] == hostile and not marker.exists()
    assert "--rdzv-endpoint=127.0.0.1:29500" in argv and "--rdzv-id=7" in argv  # the placeholders expanded


@pytest.mark.parametrize(
    ("option", "value"),
    [("--job-name", "x\ntouch PWN"), ("--partition", "gpu\rq"), ("--account", "a b"), ("--time", "1:00\x00")],
)
def test_sbatch_values_with_control_characters_are_refused(tmp_path, option, value):
    result = invoke("launch", "slurm", "--nodes", "1", option, value, "-o", str(tmp_path / "j"),
                                 "--", "mtk", "train", code=None)  # fmt: skip
    assert result.exit_code == 2 and "may not hold spaces or control characters" in result.output
    assert not (tmp_path / "j").exists()
