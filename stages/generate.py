"""``mtk generate``: continue a prompt with a trained run."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import console, fail

SUMMARY = "Generate text from a trained run (greedy, top-k, top-p; KV cache)."


def generate(
    load: Path = typer.Option(
        ...,
        "--load",
        help="Run directory of `mtk train` (its latest checkpoint is used).",
        show_default=False,
    ),
    prompt: str = typer.Option(
        ...,
        "--prompt",
        help="Text to continue (token ids separated by spaces for mock-data runs).",
        show_default=False,
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(
        0.8, "--temperature", min=0.0, help="Sampling temperature; 0 is greedy."
    ),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample among the k most likely tokens (0: all)."),
    top_p: float = typer.Option(
        1.0, "--top-p", min=0.0, max=1.0, help="Sample within this probability mass (nucleus)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed for reproducible samples."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    retro_project: Path | None = typer.Option(
        None,
        "--retro-project",
        help="RETRO runs: the retrieval project whose index finds the neighbours of the text's chunks "
        "(embedded by the project's BERT).",
    ),
) -> None:
    """Print the prompt's continuation; generation stops at the end-of-document token. Generation runs
    eager (no torch.compile, whatever the run's --compile): its KV cache grows by a token a step."""
    from mtk.checkpoint import CheckpointError
    from mtk.generate import generate as run
    from mtk.generate import load_run

    try:
        model, tokenizer = load_run(load, device)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    retrieve = _retriever(model, retro_project)
    try:
        ids = tokenizer.encode(prompt) if tokenizer else [int(t) for t in prompt.split()]
        produced = run(
            model, ids, max_new_tokens, temperature, top_k, top_p, tokenizer.eod if tokenizer else None, seed,
            retrieve,
        )  # fmt: skip
    except ValueError as err:
        fail(f"--prompt: {err}")
    eod = tokenizer.eod if tokenizer else None
    text_ids = ids + [
        t for t in produced if t != eod
    ]  # decoded whole, so pieces join as the tokenizer joins them
    console.print(
        tokenizer.decode(text_ids) if tokenizer else " ".join(map(str, text_ids)),
        highlight=False,
        markup=False,
    )


def _retriever(model, retro_project: Path | None):
    """The neighbour lookup the model's generation strategy needs (RETRO's; None when it needs none)."""
    from mtk.generate import generation_strategy

    if not generation_strategy(model.config).needs_retrieval:
        if retro_project is not None:
            fail(f"--retro-project is for RETRO runs; this run is a {model.config.family} model")
        return None
    if retro_project is None:
        fail("a RETRO model retrieves neighbours while it generates: give --retro-project DIR")
    from mtk.data.retro_project import RetroProject, RetroProjectError
    from mtk.retro.db import bert_tokenizer
    from mtk.retro.embed import BertEmbedder
    from mtk.retro.query import Retriever

    project = RetroProject(retro_project)
    try:
        db, record = project.stage("build-db"), project.stage("index")
        embedder = BertEmbedder(record["embedder"]["folder"], bert_tokenizer(db["bert"]))
        return Retriever(project, embedder, model.config.retro_num_neighbors)
    except (RetroProjectError, ValueError, FileNotFoundError) as err:
        fail(str(err))
