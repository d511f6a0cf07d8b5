"""Entry point of the ``mtk`` command. ``mtk --help`` must be instant: it is drawn from the table
below, and a stage's module is imported only when one of its commands runs or shows its own help."""

from __future__ import annotations

import importlib

import typer
from typer.core import TyperCommand, TyperGroup

MARKUP = "rich"
# command: (module in stages/, its command function or "app" for a group of commands, summary)
COMMANDS = {
    "quickstart": ("quickstart", "quickstart",
                   "Prepare the bundled corpus, train a tiny GPT on CPU (~2 min), plot the loss, generate a sample."),
    "prepare-data": ("prepare_data", "prepare_data",
                     "Tokenize JSONL, Parquet or text into Megatron-compatible .bin/.idx files, fast."),
    "merge-data": ("merge_data", "merge_data",
                   "Merge several prepared .bin/.idx datasets into one (same tokenizer, same dtype)."),
    "train": ("train", "train",
              "Train a preset (GPT-3, Llama 3 ...) on prepared or mock data; checkpoints resume exactly."),
    "bench": ("bench", "bench",
              "Measure steady-state training speed of a preset: step time, tokens/s, TFLOP/s, MFU, memory."),
    "generate": ("generate", "generate", "Generate text from a trained run (greedy, top-k, top-p; KV cache)."),
    "eval-squad": ("eval_squad", "eval_squad",
                   "Fine-tune a T5 run on SQuAD v1.1 (text to text) and score its answers (exact match, F1)."),
    "plot": ("plot", "plot", "Draw a run's loss curve (train, valid, test) as a PNG."),
    "plan": ("plan", "plan",
             "Estimate per-GPU memory of a preset's parallel layout and suggest one that fits your GPUs."),
    "status": ("status", "status",
               "Show the workspace: each stage's outputs and key facts, what is stale or gone, the next command."),
    # the design card's stage names, as top-level commands
    "build-retro-db": ("retro", "build_db", "Same as `mtk retro build-db`."),
    "query-neighbours": ("retro", "query_neighbours", "Same as `mtk retro query-neighbours`."),
    "launch": ("launch", "app",
               "Write the torchrun command or Slurm batch script that runs an mtk command on many nodes."),
    "checkpoint": ("checkpoint", "app",
                   "Inspect checkpoints, convert them to safetensors or Hugging Face, import Hugging Face BERT."),
    "presets": ("presets", "app",
                "List the model presets (GPT-3, BERT, T5, Llama 3, RETRO, tiny), show one in full or as "
                "Megatron-LM arguments, and import a Megatron-LM launch script as a preset."),
    "tokenizer": ("tokenizer", "app",
                  "Train a GPT-2 style byte-level BPE or a BERT WordPiece vocabulary from local files."),
    "retro": ("retro", "app", "RETRO retrieval: chunk database, faiss index, neighbours of every training sample."),
}  # fmt: skip


def load(name: str) -> TyperCommand | TyperGroup:
    """The click command ``name``, built afresh from its stage module (a command caches its help
    option from the first context that asks: not to be shared between invocations)."""
    from .common import reports_file_errors

    module, attribute, summary = COMMANDS[name]
    found = getattr(importlib.import_module(f"{__package__}.{module}"), attribute)
    if attribute == "app":
        command = typer.main.get_group(found)
        command.help = summary
    else:
        single = typer.Typer(rich_markup_mode=MARKUP, add_completion=False)
        single.command(name, help=summary)(reports_file_errors(found))
        command = typer.main.get_command(single)
    command.name = name
    return command


class Stages(TyperGroup):
    """mtk's commands, each built on first use; ``mtk --help`` lists them from ``COMMANDS`` alone
    (typer's help renderer alone imports markdown and syntax highlighting: 0.1 s)."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: typer.Context, cmd_name: str) -> TyperCommand | TyperGroup | None:
        return load(cmd_name) if cmd_name in COMMANDS else None

    def format_help(self, ctx: typer.Context, formatter: object) -> None:
        from rich import box
        from rich.console import Console
        from rich.padding import Padding
        from rich.panel import Panel
        from rich.table import Table

        console = Console(width=ctx.terminal_width)  # None: the terminal's, $COLUMNS or 80, as typer's help

        def panel(title: str, rows: list[tuple[str, str]]) -> Panel:
            table = Table(box=None, show_header=False, padding=(0, 2, 0, 0), pad_edge=False)
            table.add_column(style="bold cyan", no_wrap=True)
            table.add_column()
            for row in rows:
                table.add_row(*row)
            return Panel(table, title=title, title_align="left", border_style="dim", box=box.ROUNDED)

        options = [(", ".join(sorted(param.opts + param.secondary_opts, key=lambda o: (o[1] != "-", o))), param.help or "")
                   for param in self.get_params(ctx) if param.param_type_name == "option"]  # fmt: skip
        console.print(
            Padding(f"[bold]Usage:[/] {ctx.command_path} [OPTIONS] COMMAND [ARGS]...", (1, 1, 0, 1))
        )
        console.print(Padding(self.help or "", (1, 1, 1, 1)))
        console.print(panel("Options", options))
        console.print(panel("Commands", [(name, summary) for name, (_, _, summary) in COMMANDS.items()]))


app = typer.Typer(
    name="mtk",
    cls=Stages,
    help="Pretrain large language models the Megatron-LM way: prepare data, train, resume, export.",
    no_args_is_help=True,
    rich_markup_mode=MARKUP,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _group() -> None:  # makes app a group, whose commands Stages supplies
    pass


def main() -> None:
    from .common import show_warnings_plainly

    show_warnings_plainly()
    app()


if __name__ == "__main__":
    main()
