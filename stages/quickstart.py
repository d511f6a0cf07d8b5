"""``mtk quickstart``: the whole pipeline on the bundled corpus, on CPU, in about two minutes."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import console


def quickstart(
    out: Path = typer.Option(Path("runs/quickstart"), "--out", help="Where data, run directory and plot go."),
    train_iters: int = typer.Option(
        300, "--train-iters", min=1, help="Training iterations (300 take about two minutes)."
    ),
) -> None:
    """A first run of mtk with nothing to download: data preparation, training, checkpoint, loss curve, sample."""
    from mtk.checkpoint import RunDir
    from mtk.quickstart import run_quickstart

    result = run_quickstart(
        out, train_iters, show=lambda line: console.print(line, highlight=False, markup=False)
    )
    _remember(result)
    console.print(result.sample, highlight=False, markup=False)
    console.print(
        f"\nloss {result.first_loss:.2f} -> {result.last_loss:.2f}; checkpoint and metrics in {result.run_dir}, "
        f"loss curve {RunDir(result.run_dir).plot}\n\nNext:\n"
        f'  mtk generate --load {result.run_dir} --prompt "The import statement"\n'
        f"  mtk train --preset gpt-tiny --data {result.data_prefix} --save runs/mine --train-iters 1000\n"
        "  mtk tokenizer train YOUR.jsonl --kind bpe --vocab-size 32000 --out tok\n"
        "  mtk prepare-data YOUR.jsonl -o data/yours -t tok --append-eod\n"
        "  mtk presets list",
        highlight=False,
        markup=False,
    )


def _remember(result) -> None:  # noqa: ANN001 - a QuickstartResult
    """Record the bundled tokenizer, the prepared corpus and the run, as the stages do."""
    from mtk.data.tokenizer import BUNDLED
    from mtk.manifest import data_manifest_path, read_manifest

    from .prepare_data import remember_dataset, remember_tokenizer
    from .train import remember_run

    vocab_size = read_manifest(data_manifest_path(result.data_prefix))["vocab_size"]
    remember_tokenizer(BUNDLED, "gpt2bpe", vocab_size, "quickstart")
    remember_dataset(result.data_prefix, BUNDLED, "quickstart")
    remember_run("gpt-tiny", result.run_dir, "quickstart")
