"""``mtk eval-squad``: fine-tune a T5 run on SQuAD v1.1 and report exact match and F1, or score an
existing predictions file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from .common import console, fail, last_run, remember


def eval_squad(
    load: Path | None = typer.Option(
        None,
        "--load",
        help="Run directory of a T5 `mtk train` (its latest checkpoint); not with --predictions. Default: "
        "the workspace's last T5 run.",
        show_default=False,
    ),
    train_file: Path | None = typer.Option(
        None,
        "--train-file",
        help="SQuAD v1.1 training file (train-v1.1.json) to fine-tune on.",
        show_default=False,
    ),
    dev_file: Path = typer.Option(
        ...,
        "--dev-file",
        help="SQuAD v1.1 file whose questions are answered and scored (dev-v1.1.json).",
        show_default=False,
    ),  # fmt: skip
    predictions: Path | None = typer.Option(
        None,
        "--predictions",
        help="Score this predictions file ({question id: answer text}, as the official evaluate-v1.1.py "
        "reads it) instead of a model: no --load. Unanswered questions score 0; ids that are no question "
        "of --dev-file are an error.",
        show_default=False,
    ),
    finetune_iters: int = typer.Option(1000, "--finetune-iters", min=1, help="Fine-tuning steps."),
    no_finetune: bool = typer.Option(
        False, "--no-finetune", help="Evaluate the checkpoint as it is (already fine-tuned)."
    ),
    lr: float = typer.Option(1e-4, "--lr", min=0.0, help="Peak learning rate, decayed linearly to 0."),
    lr_warmup_fraction: float = typer.Option(
        0.1,
        "--lr-warmup-fraction",
        min=0.0,
        max=1.0,
        help="Share of the fine-tuning steps that ramp the learning rate up from 0 (without it, Adam's "
        "first full-size steps can wash out a small encoder's token information).",
    ),
    micro_batch_size: int = typer.Option(
        8, "--micro-batch-size", min=1, help="Questions per forward/backward."
    ),
    global_batch_size: int = typer.Option(32, "--global-batch-size", min=1, help="Questions per step."),
    max_answer_tokens: int = typer.Option(32, "--max-answer-tokens", min=1, help="Longest answer generated."),
    answer_from_context: bool = typer.Option(
        False,
        "--answer-from-context",
        help="Restrict each generated answer to a run of its context's tokens (SQuAD v1.1's answers are "
        "spans of the context): at each step the decoder picks its likeliest token among those that keep "
        "the answer such a run. Default: free generation, as T5.",
    ),
    eval_batch_size: int = typer.Option(32, "--eval-batch-size", min=1, help="Questions answered together."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Run directory of the fine-tuning (resumes if it holds a checkpoint); results go to its squad/ "
        "folder. Default: LOAD-squad, or LOAD itself with --no-finetune. With --predictions: a folder for "
        "metrics.json (default: none written).",
        show_default=False,
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Questions become `question: Q context: C` for the encoder (contexts longer than the encoder are
    truncated at the end), answers the decoder's target; answers are generated greedily (batched by
    length, KV cache) and scored as the official SQuAD v1.1 script does, overall and per article.
    Answers are saved as they come (OUT/squad/answers.jsonl): a rerun answers only the rest.

    Example: mtk eval-squad --load runs/t5 --train-file train-v1.1.json --dev-file dev-v1.1.json
    """
    from mtk.checkpoint import CheckpointError
    from mtk.config import ConfigError
    from mtk.squad import SquadError, SquadOptions, some_ids

    try:
        if predictions is not None:
            if load is not None:
                fail("--predictions scores an existing file without a model: leave out --load")
            metrics, missing = _score_file(dev_file, predictions, out)
        else:
            load = load or last_run(
                ("t5",), "give --load (a T5 run to fine-tune and answer with) or --predictions (a file to "
                "score), or train one with `mtk train --preset t5-tiny` first",
            )  # fmt: skip
            default_out = load if no_finetune else load.with_name(f"{load.name}-squad")
            options = SquadOptions(
                out=out or default_out,
                finetune_iters=0 if no_finetune else finetune_iters,
                lr=lr,
                lr_warmup_fraction=lr_warmup_fraction,
                micro_batch_size=micro_batch_size,
                global_batch_size=global_batch_size,
                max_answer_tokens=max_answer_tokens,
                answer_from_context=answer_from_context,
                eval_batch_size=eval_batch_size,
                device=device,
            )
            metrics, missing = _evaluate(load, train_file, dev_file, options), []  # every question answered
            scores = {key: metrics[key] for key in ("questions", "exact_match", "f1")}
            remember("squad", options.out / "squad", "eval-squad", facts=scores, inputs=[dev_file])
    except (SquadError, ConfigError, CheckpointError) as err:
        fail(str(err))
    if missing:
        console.print(
            f"[yellow]warning:[/] {len(missing):,} of {metrics['questions']:,} questions have no prediction "
            f"({some_ids(missing)}); they score 0, as the official script counts them",
            highlight=False,
        )
    _summary(metrics)


def _score_file(dev_file: Path, predictions: Path, out: Path | None) -> tuple[dict[str, Any], list[str]]:
    from mtk.squad import score_predictions

    metrics, missing = score_predictions(dev_file, predictions, out)
    if out is not None:
        console.print(f"metrics in {out / 'metrics.json'}")
    return metrics, missing


def _evaluate(load: Path, train_file: Path | None, dev_file: Path, options: Any) -> dict[str, Any]:
    """Fine-tune and answer with a progress bar (``options``: a SquadOptions)."""
    from rich.progress import MofNCompleteColumn, Progress, TimeRemainingColumn

    from mtk.squad import evaluate_squad

    columns = (*Progress.get_default_columns()[:-1], MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("answering", total=None)
        metrics = evaluate_squad(
            load, str(train_file) if train_file else None, str(dev_file), options,
            show=console.print, progress=lambda n, total: bar.update(task, advance=n, total=total),
        )  # fmt: skip
    rate = metrics["questions_per_second"]
    console.print(
        f"{metrics['truncated_contexts']:,} contexts truncated ({metrics['answers_cut']:,} past every gold "
        f"answer); "
        + (f"{metrics['answered_now']:,} questions answered at {rate:,.1f}/s; " if rate else "")
        + f"results in {options.out / 'squad'}"
    )
    return metrics


def _summary(metrics: dict[str, Any]) -> None:
    """Exact match and F1 per article, then overall."""
    from rich.table import Table

    table = Table("article", "questions", "exact match", "F1", title="SQuAD v1.1")
    for article in metrics["articles"]:
        table.add_row(article["title"], f"{article['questions']:,}", f"{article['exact_match']:.2f}",
                      f"{article['f1']:.2f}")  # fmt: skip
    console.print(table)
    console.print(
        f"SQuAD v1.1 on {metrics['questions']:,} questions: exact match [bold]{metrics['exact_match']:.2f}[/], "
        f"F1 [bold]{metrics['f1']:.2f}[/]"
    )
