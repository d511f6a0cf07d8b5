"""``mtk checkpoint inspect``: what a run directory's checkpoint holds."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import console, fail, reports_file_errors

SUMMARY = "Inspect checkpoints (iteration, config, tensors) and convert them to safetensors."
app = typer.Typer(no_args_is_help=True, help=SUMMARY)


@app.command("inspect")
@reports_file_errors
def inspect(
    run_dir: Path = typer.Argument(..., help="A run directory (--save of `mtk train`).", show_default=False),
    iteration: int | None = typer.Option(None, "--iteration", help="Which checkpoint (default: the latest)."),
) -> None:
    """Print the checkpoint's iteration, consumed samples, config, and every tensor with its shape."""
    from rich.table import Table

    from mtk.checkpoint import CheckpointError, load_checkpoint

    try:
        state = load_checkpoint(run_dir, iteration)
    except CheckpointError as err:
        fail(str(err))
    weights = state["model"]
    console.print(
        f"iteration [bold]{state['iteration']}[/], consumed samples {state['consumed_samples']:,}, "
        f"tokens {state['consumed_tokens']:,}, skipped iterations {state['skipped_iterations']}"
    )
    console.print(
        f"parameters: [bold]{sum(t.numel() for t in weights.values()):,}[/] in {len(weights)} tensors"
    )
    config = Table(title="config", title_justify="left", show_header=False)
    for section, values in state["config"].items():
        for key, value in values.items():
            config.add_row(f"{section}.{key}", str(value))
    console.print(config)
    tensors = Table(title="tensors", title_justify="left")
    for column in ("name", "shape", "dtype", "numel"):
        tensors.add_column(column, no_wrap=column == "name")
    for name, tensor in weights.items():
        tensors.add_row(
            name, str(tuple(tensor.shape)), str(tensor.dtype).removeprefix("torch."), f"{tensor.numel():,}"
        )
    console.print(tensors)


@app.command("convert")
@reports_file_errors
def convert(
    run_dir: Path = typer.Argument(..., help="A run directory (--save of `mtk train`).", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="The .safetensors file to write.", show_default=False),
    iteration: int | None = typer.Option(None, "--iteration", help="Which checkpoint (default: the latest)."),
) -> None:
    """Write the model weights as a single .safetensors file (whatever parallel layout saved them)."""
    from mtk.checkpoint import CheckpointError, export_safetensors

    try:
        path = export_safetensors(run_dir, out, iteration)
    except CheckpointError as err:
        fail(str(err))
    console.print(f"wrote {path} ({path.stat().st_size / 2**20:,.1f} MiB)")
