"""Launch commands for multi-node jobs: a torchrun command line and a Slurm batch script.

One torchrun per node with a c10d rendezvous on the first node; ``mtk train`` reads the standard
torchrun environment, resumes from its ``--save`` directory, and saves on SIGTERM, so a requeued
Slurm job continues where the preempted one stopped.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

CLI_MODULE = "mtk.stages.main"  # where the installed wheel puts the checkout's stages/ folder
# Processes one node starts: 8x the largest GPU node (16); CPU ranks beyond it are interpreters that
# each hold torch (~0.5 GB), so more would exhaust a host instead of training faster
MAX_PROCESSES_PER_NODE = 128
MAX_NODES = 65536  # the largest machines have ~10^4 nodes


@dataclass
class LaunchSpec:
    command: list[str]  # the mtk command to run on every rank, e.g. ["mtk", "train", ...]
    nodes: int = 1
    gpus_per_node: int = 8
    port: int = 29500
    job_name: str = "mtk"
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # Slurm time limit, e.g. 04:00:00
    log_dir: str = "logs"
    container_image: str | None = None
    container_mounts: list[str] = field(default_factory=list)
    preempt_warning_seconds: int = 120  # SIGTERM this long before the time limit: save, then requeue

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError(
                "no command to launch: put it after --, e.g. -- mtk train --preset gpt3-857m ..."
            )
        if any(arg.startswith("--nproc-per-node") for arg in self.command):
            raise ValueError("leave --nproc-per-node out of the command: the launcher starts the processes")
        for option, value, high in (
            ("--nodes", self.nodes, MAX_NODES),
            ("--gpus-per-node", self.gpus_per_node, MAX_PROCESSES_PER_NODE),
            ("--port", self.port, 65535),
        ):
            if not 1 <= value <= high:
                raise ValueError(f"{option} {value} is out of range: it must be >= 1 and <= {high}")
        if self.container_mounts and not self.container_image:
            raise ValueError(
                "--container-mounts needs --container-image: mounts apply to a container, and without "
                "one the job would run on the host without them"
            )
        sbatch_values = {
            "--job-name": self.job_name,
            "--partition": self.partition,
            "--account": self.account,
            "--time": self.time,
            "--log-dir": self.log_dir,
        }
        for option, value in sbatch_values.items():
            if value is not None and any(char.isspace() or not char.isprintable() for char in value):
                raise ValueError(
                    f"{option} {value!r}: an #SBATCH value may not hold spaces or control characters"
                )


def _entry(command: list[str]) -> list[str]:
    """torchrun runs a module or a script: ``mtk ...`` becomes ``-m mtk.stages.main ...``."""
    if command[0] == "mtk":
        return ["-m", CLI_MODULE, *command[1:]]
    return command


def torchrun_command(
    command: list[str],
    nproc_per_node: int,
    rendezvous: tuple[int, str, str] | None = None,
    launcher: Sequence[str] = ("torchrun",),
) -> list[str]:
    """torchrun starting ``nproc_per_node`` ranks of ``command`` (``mtk ...`` or a script): alone on
    this node, or with ``rendezvous`` = (nodes, endpoint, job id) as one node of a c10d job."""
    if rendezvous is None:
        placement = ["--standalone", f"--nproc-per-node={nproc_per_node}"]
    else:
        nodes, endpoint, job_id = rendezvous
        placement = [f"--nnodes={nodes}", f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint={endpoint}", f"--rdzv-id={job_id}"]  # fmt: skip
    return [*launcher, *placement, *_entry(command)]


def local_torchrun_command(argv: list[str], nproc_per_node: int, module: str = CLI_MODULE) -> list[str]:
    """This mtk command line (``argv`` after ``mtk``) as ``nproc_per_node`` ranks on this machine,
    ``--nproc-per-node`` left out of what each rank runs; ``module`` is the CLI module that runs now
    (``stages.main`` in a checkout run with ``python -m``)."""
    args, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            args.append(arg)
    launcher = (sys.executable, "-m", "torch.distributed.run")
    return torchrun_command(["-m", module, *args], nproc_per_node, launcher=launcher)


def torchrun_text(spec: LaunchSpec, head: str = "HEAD_NODE_ADDRESS") -> str:
    """The command to start on every node of a plain (non-Slurm) cluster."""
    command = torchrun_command(
        spec.command, spec.gpus_per_node, (spec.nodes, f"{head}:{spec.port}", spec.job_name)
    )
    return " \\\n    ".join(shlex.join(part) for part in _groups(command))


def _groups(command: list[str]) -> list[list[str]]:
    """Split a command into lines at its options, for a readable script."""
    groups: list[list[str]] = []
    for arg in command:
        if not groups or arg.startswith("-"):
            groups.append([arg])
        else:
            groups[-1].append(arg)
    return groups


def slurm_script(spec: LaunchSpec) -> str:
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={spec.job_name}",
        f"#SBATCH --nodes={spec.nodes}",
        "#SBATCH --ntasks-per-node=1  # one torchrun per node; it starts the per-GPU ranks",
        f"#SBATCH --gpus-per-node={spec.gpus_per_node}",
        "#SBATCH --exclusive",
        f"#SBATCH --output={spec.log_dir}/%x-%j.out",
        "#SBATCH --open-mode=append  # a requeued job appends to the same log",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{spec.preempt_warning_seconds}  # near the time limit: requeue (see below)",
    ]
    for option, value in (("partition", spec.partition), ("account", spec.account), ("time", spec.time)):
        if value:
            lines.append(f"#SBATCH --{option}={value}")
    container = []
    if spec.container_image:
        container.append(f"--container-image={spec.container_image}")
        if spec.container_mounts:
            container.append(f"--container-mounts={','.join(spec.container_mounts)}")
    run = [["srun", "--kill-on-bad-exit=1"], *([arg] for arg in container)]
    rendezvous = (spec.nodes, '"$HEAD_NODE:$MASTER_PORT"', '"$SLURM_JOB_ID"')
    command = torchrun_command(spec.command, spec.gpus_per_node, rendezvous)
    expanded = {
        f"--rdzv-endpoint={rendezvous[1]}",
        f"--rdzv-id={rendezvous[2]}",
    }  # "$VAR"s the script fills in
    run += _groups(command)
    body = " \\\n    ".join(
        " ".join(arg if arg in expanded else shlex.quote(arg) for arg in part) for part in run
    )
    lines += [
        "",
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(spec.log_dir)}",
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"MASTER_PORT={spec.port}",
        'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES nodes, rendezvous $HEAD_NODE:$MASTER_PORT"',
        "# Requeueing sends SIGTERM to every rank: mtk train finishes its step, saves and exits; the",
        "# requeued job resumes from the --save directory. Preemption (with --requeue) does the same.",
        'trap \'echo "time limit near: requeueing"; scontrol requeue "$SLURM_JOB_ID"\' USR1',
        "",
        body + " &",
        'wait "$!" || wait "$!"  # the first wait returns early when the trap fires',
        "",
    ]
    return "\n".join(lines)
