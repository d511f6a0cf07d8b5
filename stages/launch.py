"""``mtk launch torchrun|slurm``: multi-node launch commands for any mtk command (written after --)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import console, fail, reports_file_errors

app = typer.Typer(no_args_is_help=True)
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _spec(ctx: typer.Context, **options):
    from mtk.launch import LaunchSpec

    try:
        return LaunchSpec(command=list(ctx.args), **options)
    except ValueError as err:
        fail(str(err))


@app.command("torchrun", context_settings=EXTRA)
def torchrun(
    ctx: typer.Context,
    nodes: int = typer.Option(1, "--nodes", help="Number of nodes."),
    gpus_per_node: int = typer.Option(8, "--gpus-per-node", help="Processes (GPUs) per node."),
    head: str = typer.Option(
        "HEAD_NODE_ADDRESS", "--head", help="Address of the first node (the rendezvous)."
    ),
    port: int = typer.Option(29500, "--port", help="Rendezvous port on the first node."),
    job_name: str = typer.Option(
        "mtk", "--job-name", help="Rendezvous id: the same on every node of one job."
    ),
) -> None:
    """Print the command to start on every node. Example: mtk launch torchrun --nodes 2 -- mtk train --preset gpt3-857m ..."""
    from mtk.launch import torchrun_text

    spec = _spec(ctx, nodes=nodes, gpus_per_node=gpus_per_node, port=port, job_name=job_name)
    console.print(torchrun_text(spec, head), highlight=False, markup=False, soft_wrap=True)


@app.command("slurm", context_settings=EXTRA)
@reports_file_errors
def slurm(
    ctx: typer.Context,
    nodes: int = typer.Option(..., "--nodes", help="Number of nodes.", show_default=False),
    gpus_per_node: int = typer.Option(8, "--gpus-per-node", help="GPUs per node (one rank each)."),
    out: Path = typer.Option(Path("mtk-job.sbatch"), "--out", "-o", help="Where to write the batch script."),
    job_name: str = typer.Option("mtk", "--job-name", help="Slurm job name (also names the log)."),
    partition: str | None = typer.Option(None, "--partition", help="Slurm partition."),
    account: str | None = typer.Option(None, "--account", help="Slurm account."),
    time: str | None = typer.Option(
        None, "--time", help="Time limit, e.g. 04:00:00 (the job is requeued after it)."
    ),
    log_dir: str = typer.Option("logs", "--log-dir", help="Folder of the per-job logs (%x-%j.out)."),
    container_image: str | None = typer.Option(
        None, "--container-image", help="Run inside this image (pyxis/enroot)."
    ),
    container_mounts: list[str] = typer.Option(
        [], "--container-mounts", help="SRC:DST mounts for the container. Repeatable."
    ),
    port: int = typer.Option(29500, "--port", help="Rendezvous port on the first node."),
    submit: bool = typer.Option(False, "--submit", help="Submit the script with sbatch after writing it."),
) -> None:
    """Write an sbatch script: one torchrun per node (srun), c10d rendezvous, per-job logs, requeue on preemption.

    Example: mtk launch slurm --nodes 16 --gpus-per-node 8 --time 04:00:00 -- mtk train --preset gpt3-175b ...
    """
    import shutil
    import subprocess

    from mtk.launch import slurm_script

    spec = _spec(
        ctx, nodes=nodes, gpus_per_node=gpus_per_node, job_name=job_name, partition=partition, account=account,
        time=time, log_dir=log_dir, container_image=container_image, container_mounts=list(container_mounts), port=port,
    )  # fmt: skip
    out.write_text(slurm_script(spec))
    out.chmod(0o755)
    console.print(f"wrote {out}")
    if submit:
        if shutil.which("sbatch") is None:
            fail(
                "--submit: sbatch is not on PATH (is this a Slurm login node?); the script is written, submit it there"
            )
        raise typer.Exit(subprocess.call(["sbatch", str(out)]))
    console.print(f"submit it with: sbatch {out}")
