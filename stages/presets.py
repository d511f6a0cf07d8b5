"""``mtk presets list|show|import-megatron``: the named model and training recipes, and the bridge to
Megatron-LM's launch scripts (``mtk/megatron.py``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer

from mtk.config import SECTIONS

from .common import console, fail

app = typer.Typer(no_args_is_help=True)


def _human(count: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f}{unit}"
    return str(int(count))


@app.command("list")
def list_presets() -> None:
    """One line per preset: architecture, size computed from its config, and default layout."""
    from rich import box
    from rich.table import Table

    from mtk.models import family_spec
    from mtk.presets import load_preset, preset_names

    table = Table(title="mtk presets", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("preset", "family", "layers", "hidden", "heads", "seq", "params", "TP", "PP", "CP"):
        table.add_column(column, justify="left" if column in ("preset", "family") else "right", no_wrap=True)
    for name in preset_names():
        preset = load_preset(name)
        model, parallel = preset.config.model, preset.config.parallel
        family = family_spec(model.family)
        params = family.num_parameters(model, parallel.tensor_model_parallel_size)
        table.add_row(
            name,
            model.family,
            family.layers_label(model),
            str(model.hidden_size),
            str(model.num_attention_heads),
            str(model.seq_length),
            _human(params),
            str(parallel.tensor_model_parallel_size),
            str(parallel.pipeline_model_parallel_size),
            str(parallel.context_parallel_size),
        )
    console.print(table)


@app.command("show")
def show_preset(
    name: str = typer.Argument(
        ..., help="Preset name, as printed by `mtk presets list`, or a preset file's path (./mine.toml)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the resolved preset as JSON instead of tables."
    ),
    megatron: bool = typer.Option(
        False,
        "--megatron",
        help="Print the Megatron-LM pretrain_*.py command that trains the same model on the same schedule, "
        "one argument a line, ready to paste; what Megatron cannot express is named in the comments above it.",
    ),
) -> None:
    """Every setting of one preset (another family's model settings only where it sets them), the
    parameter count computed from it by part of the model, and the published figures."""
    from rich.table import Table

    from mtk.config import ConfigError
    from mtk.models import family_spec
    from mtk.models.spec import config_defaults
    from mtk.presets import load_preset

    try:
        preset = load_preset(name)
        family = family_spec(preset.config.model.family)
    except ConfigError as err:
        fail(str(err))
    family.complete(preset.config.model)
    if megatron:
        from mtk.megatron import megatron_command, render_command

        try:
            command = megatron_command(preset.config)
        except ConfigError as err:
            fail(str(err))
        text = render_command(command, preset.name, preset.config, preset.description, preset.tokenizer)
        typer.echo(text, nl=False)
        return
    model, parallel = preset.config.model, preset.config.parallel
    tp = parallel.tensor_model_parallel_size
    params = family.num_parameters(model, tp)
    breakdown = family.parameter_breakdown(model, tp)
    if as_json:
        payload = {
            "name": preset.name,
            "description": preset.description,
            "tokenizer": preset.tokenizer,
            "num_parameters": params,
            "parameter_breakdown": breakdown,
            "padded_vocab_size": model.padded_vocab_size(tp),
            **preset.config.to_dict(),
            "published": preset.published,
        }
        console.print_json(json.dumps(payload))
        return
    console.print(f"[bold]{preset.name}[/]: {preset.description}")
    if preset.tokenizer:
        console.print(f"tokenizer: {preset.tokenizer}")
    console.print(
        f"parameters: [bold]{params:,}[/] ({_human(params)}), computed from the config with the "
        f"vocabulary padded to {model.padded_vocab_size(tp):,} (TP {tp})"
    )
    table = Table(title="parameters by part", title_justify="left", show_header=False)
    for column in ("part", "parameters", "share"):
        table.add_column(column, justify="left" if column == "part" else "right")
    for part, count in breakdown.items():
        table.add_row(part, f"{count:,}", f"{count / params:.1%}" if params else "")
    console.print(table)
    # another family's model settings are listed only where this preset sets them
    defaults = config_defaults()
    hidden = {key for key in family.foreign_fields() if getattr(model, key) == defaults[key]}
    for section in SECTIONS:
        table = Table(title=f"{section} settings", title_justify="left", show_header=False)
        table.add_column("key")
        table.add_column("value")
        explicit = preset.sections.get(section, {})
        for item in dataclasses.fields(getattr(preset.config, section)):
            if section == "model" and item.name in hidden and item.name not in explicit:
                continue
            value = getattr(getattr(preset.config, section), item.name)
            shown = repr(value) if isinstance(value, str) else str(value)
            if item.name in explicit:
                table.add_row(item.name, f"[bold]{shown}[/]")
            else:
                table.add_row(f"[dim]{item.name}[/]", f"[dim]{shown} (default)[/]")
        console.print(table)
    if preset.published:
        table = Table(title="published figures", title_justify="left", show_header=False)
        table.add_column("key")
        table.add_column("value")
        for key, value in preset.published.items():
            table.add_row(key, str(value))
        console.print(table)


@app.command("import-megatron")
def import_megatron(
    script: Path = typer.Argument(
        ...,
        help="A Megatron-LM launch script (bash: arrays, variables, `\\` continuations) that runs pretrain_*.py.",
        show_default=False,
    ),
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        help="The preset file to write (NAME.toml); train it with --preset ./NAME.toml.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace the output file if it exists."),
) -> None:
    """Read a Megatron-LM launch script into an mtk preset: the model and schedule of its pretrain_*.py
    command, in mtk's config keys. Arguments mtk has no setting for are listed by name, and those that
    describe the machine (paths, launcher, logging, kernels) listed as skipped, in this output and in
    the file's comments.

    Example: mtk presets import-megatron train_llama3_8b_h100_fp8.sh -o llama3.toml
    """
    from mtk.config import ConfigError
    from mtk.manifest import atomic_output
    from mtk.megatron import import_script, imported_toml
    from mtk.shell_script import ScriptError

    if output.exists() and not force:
        fail(f"{output} exists: give --force to replace it, or another --output")
    try:
        text = script.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        fail(f"{script}: cannot be read ({getattr(err, 'strerror', None) or err})")
    try:
        imported = import_script(text, where=str(script))
    except (ScriptError, ConfigError) as err:
        fail(str(err))
    with atomic_output(output) as tmp:
        tmp.write_text(imported_toml(imported, script.name), encoding="utf-8")
    echo = typer.echo
    echo(f"wrote {output}: {imported.family} ({imported.script}), {len(imported.values)} settings "
         f"from {len(imported.read)} of its arguments")  # fmt: skip
    if imported.unknown:
        echo("not imported (mtk has no such setting):")
        for item in imported.unknown:
            echo(f"  {item}")
    if imported.skipped:
        echo("skipped (they describe the machine, not the model):")
        for reason, flags in imported.skipped.items():
            echo(f"  {reason}: {' '.join(flags)}")
    if imported.defaults:
        echo("Megatron's defaults, written where mtk's differ:")
        for item in imported.defaults:
            echo(f"  {item}")
    for note in imported.notes:
        echo(f"note: {note}")
    preset = f"./{output}" if not output.is_absolute() and "/" not in str(output) else str(output)
    from mtk.models import family_spec

    data = family_spec(imported.family).train_inputs
    echo(f"train it: mtk train --preset {preset} {data} --save DIR")
