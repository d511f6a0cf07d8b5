"""``mtk eval-squad``: fine-tune a T5 run on SQuAD v1.1 and report exact match and F1."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import console, fail

SUMMARY = "Fine-tune a T5 run on SQuAD v1.1 (text to text) and score its answers (exact match, F1)."


def eval_squad(
    load: Path = typer.Option(
        ..., "--load", help="Run directory of a T5 `mtk train` (its latest checkpoint).", show_default=False
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
    finetune_iters: int = typer.Option(1000, "--finetune-iters", min=1, help="Fine-tuning steps."),
    no_finetune: bool = typer.Option(
        False, "--no-finetune", help="Evaluate the checkpoint as it is (already fine-tuned)."
    ),
    lr: float = typer.Option(1e-4, "--lr", min=0.0, help="Peak learning rate, decayed linearly to 0."),
    micro_batch_size: int = typer.Option(
        8, "--micro-batch-size", min=1, help="Questions per forward/backward."
    ),
    global_batch_size: int = typer.Option(32, "--global-batch-size", min=1, help="Questions per step."),
    max_answer_tokens: int = typer.Option(32, "--max-answer-tokens", min=1, help="Longest answer generated."),
    eval_batch_size: int = typer.Option(32, "--eval-batch-size", min=1, help="Questions answered together."),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Run directory of the fine-tuning (resumes if it holds a checkpoint); results go to its squad/ "
        "folder. Default: LOAD-squad, or LOAD itself with --no-finetune.",
        show_default=False,
    ),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Questions become `question: Q context: C` for the encoder (contexts longer than the encoder are
    truncated at the end), answers the decoder's target; answers are generated greedily (batched, KV
    cache) and scored as the official SQuAD v1.1 script does.

    Example: mtk eval-squad --load runs/t5 --train-file train-v1.1.json --dev-file dev-v1.1.json
    """
    from rich.progress import Progress

    from mtk.checkpoint import CheckpointError
    from mtk.config import ConfigError
    from mtk.squad import SquadError, SquadOptions, evaluate_squad

    if no_finetune:
        finetune_iters = 0
    default_out = load if no_finetune else load.with_name(f"{load.name}-squad")
    options = SquadOptions(
        out=out or default_out,
        finetune_iters=finetune_iters,
        lr=lr,
        micro_batch_size=micro_batch_size,
        global_batch_size=global_batch_size,
        max_answer_tokens=max_answer_tokens,
        eval_batch_size=eval_batch_size,
        device=device,
    )
    try:
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("answering", total=None)
            metrics = evaluate_squad(
                load, str(train_file) if train_file else None, str(dev_file), options,
                show=console.print, progress=lambda n: bar.advance(task, n),
            )  # fmt: skip
    except (SquadError, ConfigError, CheckpointError) as err:
        fail(str(err))
    console.print(
        f"SQuAD v1.1 on {metrics['questions']:,} questions: exact match [bold]{metrics['exact_match']:.2f}[/], "
        f"F1 [bold]{metrics['f1']:.2f}[/] ({metrics['truncated_contexts']} contexts truncated); "
        f"results in {options.out / 'squad'}"
    )
