"""Entry point of the ``mtk`` command. Keep imports light: ``mtk --help`` must be instant."""

from __future__ import annotations

import typer

from stages import (
    bench,
    checkpoint,
    generate,
    launch,
    merge_data,
    plan,
    plot,
    prepare_data,
    presets,
    quickstart,
    tokenizer,
    train,
)

app = typer.Typer(
    name="mtk",
    help="Pretrain large language models the Megatron-LM way: prepare data, train, resume, export.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("quickstart", help=quickstart.SUMMARY)(quickstart.quickstart)
app.command("prepare-data", help=prepare_data.SUMMARY)(prepare_data.prepare_data)
app.command("merge-data", help=merge_data.SUMMARY)(merge_data.merge_data)
app.command("train", help=train.SUMMARY)(train.train)
app.command("bench", help=bench.SUMMARY)(bench.bench)
app.command("generate", help=generate.SUMMARY)(generate.generate)
app.command("plot", help=plot.SUMMARY)(plot.plot)
app.command("plan", help=plan.SUMMARY)(plan.plan)
app.add_typer(launch.app, name="launch", help=launch.SUMMARY)
app.add_typer(checkpoint.app, name="checkpoint", help=checkpoint.SUMMARY)
app.add_typer(presets.app, name="presets", help=presets.SUMMARY)
app.add_typer(tokenizer.app, name="tokenizer", help=tokenizer.SUMMARY)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
