"""``mtk generate``: continue a prompt with a trained run."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import console, err_console, fail, last_run


def generate(
    load: Path | None = typer.Option(
        None,
        "--load",
        help="Run directory of `mtk train` (its latest checkpoint is used). Default: the workspace's last "
        "GPT or RETRO run.",
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
    compile: bool | None = typer.Option(
        None,
        "--compile/--no-compile",
        help="torch.compile the one-token decoding step, on a static KV cache (default: on for CUDA, "
        "off for CPU, where the compile time does not pay). RETRO runs eager.",
        show_default=False,
    ),
) -> None:
    """Print the prompt's continuation; generation stops at the end-of-document token. The console
    (stderr) says when the decoding step is compiled (the run's own --compile is for training)."""
    from mtk.checkpoint import CheckpointError
    from mtk.generate import generate as run
    from mtk.generate import generation_strategy, load_run
    from mtk.models import family_names, family_spec
    from mtk.parallel.compile import compile_choice

    continuing = tuple(  # the families that continue a prompt (their generation strategy says so)
        name
        for name in family_names()
        if (g := family_spec(name).generation) is not None and g.continues_text
    )
    load = load or last_run(
        continuing, "give --load RUN, or train one with `mtk train --preset gpt-tiny` first"
    )
    try:
        model, tokenizer = load_run(load, device)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    retrieve = _retriever(model, retro_project)
    compiled, reason = compile_choice(compile, device)
    strategy = generation_strategy(model.config)
    if compiled and not strategy.compiles:
        compiled = False
        err_console.print(
            f"note: a {model.config.family} model generates eager ({strategy.description}: no static KV "
            "cache to compile on)",
            highlight=False,
        )
    elif compiled:
        err_console.print(
            f"torch.compile: one-token decoding step, static KV cache ({reason})", highlight=False
        )
    try:
        ids = tokenizer.encode(prompt) if tokenizer else [int(t) for t in prompt.split()]
        produced = run(
            model, ids, max_new_tokens, temperature, top_k, top_p, tokenizer.eod if tokenizer else None, seed,
            retrieve, compiled,
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
