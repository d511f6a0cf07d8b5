"""``mtk plot``: the loss curve of a run as a PNG."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import console, fail


def plot(
    run_dir: Path = typer.Argument(..., help="A run directory (--save of `mtk train`).", show_default=False),
    out: Path | None = typer.Option(None, "--out", "-o", help="PNG to write (default: RUN_DIR/loss.png)."),
) -> None:
    """Read RUN_DIR/metrics.jsonl and draw the loss per iteration."""
    from mtk.train.metrics import plot_loss

    try:
        path = plot_loss(run_dir, out)
    except (FileNotFoundError, ValueError) as err:
        fail(str(err))
    console.print(f"wrote {path}")
