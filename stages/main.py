"""Entry point of the ``mtk`` command. Keep imports light: ``mtk --help`` must be instant."""

from __future__ import annotations

import typer

from . import (
    bench,
    checkpoint,
    eval_squad,
    generate,
    launch,
    merge_data,
    plan,
    plot,
    prepare_data,
    presets,
    quickstart,
    retro,
    status,
    tokenizer,
    train,
)
from .common import reports_file_errors, show_warnings_plainly

app = typer.Typer(
    name="mtk",
    help="Pretrain large language models the Megatron-LM way: prepare data, train, resume, export.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
for name, module, command in [
    ("quickstart", quickstart, quickstart.quickstart),
    ("prepare-data", prepare_data, prepare_data.prepare_data),
    ("merge-data", merge_data, merge_data.merge_data),
    ("train", train, train.train),
    ("bench", bench, bench.bench),
    ("generate", generate, generate.generate),
    ("eval-squad", eval_squad, eval_squad.eval_squad),
    ("plot", plot, plot.plot),
    ("plan", plan, plan.plan),
    ("status", status, status.status),
]:
    app.command(name, help=module.SUMMARY)(reports_file_errors(command))
app.add_typer(launch.app, name="launch", help=launch.SUMMARY)
app.add_typer(checkpoint.app, name="checkpoint", help=checkpoint.SUMMARY)
app.add_typer(presets.app, name="presets", help=presets.SUMMARY)
app.add_typer(tokenizer.app, name="tokenizer", help=tokenizer.SUMMARY)
app.add_typer(retro.app, name="retro", help=retro.SUMMARY)
# the design card's stage names, as top-level commands
app.command("build-retro-db", help="Same as `mtk retro build-db`.")(reports_file_errors(retro.build_db))
app.command("query-neighbours", help="Same as `mtk retro query-neighbours`.")(
    reports_file_errors(retro.query_neighbours)
)


def main() -> None:
    show_warnings_plainly()
    app()


if __name__ == "__main__":
    main()
