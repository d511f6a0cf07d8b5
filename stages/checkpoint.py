"""``mtk checkpoint inspect | convert | import-hf``: what a run directory's checkpoint holds, and
its weights out (safetensors, Hugging Face) and in (Hugging Face BERT)."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import console, fail, reports_file_errors

app = typer.Typer(no_args_is_help=True)


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
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="The .safetensors file to write (--to safetensors), or the folder (--to hf).",
        show_default=False,
    ),
    to: str = typer.Option(
        "safetensors",
        "--to",
        help="safetensors: every weight under mtk's names, in one file. hf: a Hugging Face folder "
        "(config.json, model.safetensors, the run's tokenizer files) that transformers loads: "
        "LlamaForCausalLM, GPT2LMHeadModel, BertForPreTraining (post-norm BERT) or "
        "MegatronBertForPreTraining (Megatron's pre-norm BERT), T5ForConditionalGeneration (Google's T5).",
    ),
    iteration: int | None = typer.Option(None, "--iteration", help="Which checkpoint (default: the latest)."),
) -> None:
    """Write the model weights of a checkpoint (whatever parallel layout saved them)."""
    from mtk.checkpoint import CheckpointError, export_safetensors
    from mtk.hf import HFError, export_hf

    if to not in ("safetensors", "hf"):
        fail(f"--to {to}: choose safetensors or hf")
    try:
        path = (
            export_safetensors(run_dir, out, iteration)
            if to == "safetensors"
            else export_hf(run_dir, out, iteration)
        )
    except (CheckpointError, HFError) as err:
        fail(str(err))
    size = sum(p.stat().st_size for p in ([path] if path.is_file() else path.iterdir()))
    console.print(f"wrote {path} ({size / 2**20:,.1f} MiB)")


@app.command("import-hf")
@reports_file_errors
def import_hf(
    folder: Path = typer.Argument(
        ...,
        help="A Hugging Face folder of a BERT ('bert', or Megatron's pre-norm 'megatron-bert'), Llama, "
        "GPT-2 or T5 (v1.0, v1.1, Flan-T5) model: config.json and *.safetensors (or pytorch_model.bin, read "
        "without running pickled code); its tokenizer.json (BERT: vocab.txt) becomes the run's tokenizer.",
        show_default=False,
    ),
    preset: str | None = typer.Option(
        None,
        "--preset",
        help="Preset whose training settings the run takes (the model comes from the folder). Default: "
        "bert-340m for BERT, llama3-8b for Llama, gpt3-345m for GPT-2, t5-220m for T5.",
        show_default=False,
    ),
    save: Path = typer.Option(
        ..., "--save", help="New run directory; `mtk train --load` it to continue.", show_default=False
    ),
    no_tokenizer: bool = typer.Option(
        False,
        "--no-tokenizer",
        help="Import the weights alone, without the folder's tokenizer (a folder without one is "
        "refused otherwise); the run then records none, so prepare its data with the model's tokenizer.",
    ),
) -> None:
    """Turn a Hugging Face checkpoint into an mtk run directory (iteration 0) that `mtk train --load`
    continues and `mtk generate` samples from.

    Example: mtk checkpoint import-hf Llama-3.2-1B/ --save runs/llama-1b
    """
    from mtk.checkpoint import CheckpointError
    from mtk.config import ConfigError
    from mtk.hf import HFError
    from mtk.hf import import_hf as run

    try:
        result = run(folder, preset, save, with_tokenizer=not no_tokenizer)
    except (HFError, CheckpointError, ConfigError) as err:
        fail(str(err))
    model = result["config"].model
    console.print(
        f"imported {result['parameters']:,} parameters ({model.num_layers} layers, hidden {model.hidden_size}) "
        f"into {save}"
    )
    if result["missing"]:
        console.print(f"not in the checkpoint, initialised: {', '.join(result['missing'])}")
    if result["unused"]:
        console.print(f"in the checkpoint, not used: {', '.join(result['unused'])}")
    if result["tokenizer"] is None:
        console.print("imported without a tokenizer (--no-tokenizer): the run records none")
    console.print(f"Continue with: mtk train --load {save} --save NEW_RUN --data PREFIX")
