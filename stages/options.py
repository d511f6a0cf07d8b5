"""Command-line options, declared once: config flags derive from the config dataclasses' fields.

``with_config_options(*keys)`` gives a command one option per config key, named by the field's
``flag`` (``flag_of``: else the key with dashes) and explained by its ``help``, typed by its annotation (a Literal lists its choices; an
optional Literal also takes ``none``). The command receives the values given on the command line as
``config_values`` (config key -> value); options left out keep the preset's value.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

import typer

from mtk import config as cfg
from mtk.launch import MAX_PROCESSES_PER_NODE, local_torchrun_command

from .common import fail

NONE = "none"  # an optional choice's way of saying "unset" on the command line

Preset = Annotated[
    str,
    typer.Option(
        "--preset",
        "-p",
        help="Preset name (`mtk presets list`), or a preset file's path (./mine.toml).",
        show_default=False,
    ),
]
OptionalPreset = Annotated[
    str | None,
    typer.Option(
        "--preset",
        "-p",
        help="Preset name (`mtk presets list`), or a preset file's path (./mine.toml). Default: the preset "
        "of the workspace's last run.",
        show_default=False,
    ),
]
Overrides = Annotated[
    list[str],
    typer.Option(
        "--set",
        help="Override any config key: --set num_layers=4 (Megatron names; `mtk presets show NAME` "
        "lists them). Repeatable.",
    ),
]
BF16 = Annotated[bool, typer.Option("--bf16", help="bf16 mixed precision.")]
FP16 = Annotated[bool, typer.Option("--fp16", help="fp16 mixed precision with dynamic loss scaling.")]
Device = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available).")
]


NprocPerNode = Annotated[
    int | None,
    typer.Option(
        "--nproc-per-node",
        help="Start this many local processes through torchrun, each doing its share "
        f"(at most {MAX_PROCESSES_PER_NODE}; across nodes: mtk launch).",
    ),
]


def relaunch_with_torchrun(nproc_per_node: int | None) -> None:
    """With ``--nproc-per-node N``: run this same command as N local ranks under torchrun, and exit with
    its status; without it, return."""
    if nproc_per_node is None:
        return
    import subprocess
    import sys

    check_option("--nproc-per-node", nproc_per_node, cfg.Range(low=1, high=MAX_PROCESSES_PER_NODE))
    if "LOCAL_RANK" in os.environ:
        fail("--nproc-per-node is for starting a job; under torchrun leave it out")
    module = f"{__package__}.main"  # the CLI as this process runs it: mtk.stages, or stages in a checkout
    raise typer.Exit(subprocess.call(local_torchrun_command(sys.argv[1:], nproc_per_node, module)))


def check_option(flag: str, value: float | None, allowed: cfg.Range) -> None:
    """End the command naming the flag, its value and the range when ``value`` (None: not given) is
    outside ``allowed``: for options that are not config keys (those are checked by their sections)."""
    if value is not None and not allowed.admits(value):
        fail(f"{flag} {value} is out of range: it must be {allowed}")


def flag_of(key: str) -> str:
    """The command-line flag of config key ``key``: its field's ``flag``, else ``--`` and the key with
    dashes (``retro_chunk_length`` -> ``--retro-chunk-length``), for a command that offers a key
    ``mtk train`` does not."""
    item, _ = _field(key)
    return item.metadata.get("flag") or "--" + key.replace("_", "-")


def _field(key: str) -> tuple[dataclasses.Field, Any]:
    section = cfg.section_of(key)
    if section is None:
        raise KeyError(f"no config key {key!r}")
    cls = cfg.SECTIONS[section]
    item = next(f for f in dataclasses.fields(cls) if f.name == key)
    return item, cfg.field_types(cls)[key]


def _option_type(annotation: Any, nargs: int | None = None) -> Any:
    """The CLI type of a config field: optional always (left out = keep); optional Literals add 'none';
    a field that also takes text takes text; a list field with ``nargs`` takes that many values."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    base = args[0] if optional and len(args) == 1 else annotation
    if str in args and len(args) > 1:  # e.g. Megatron's --step-batch-size-schedule "0:16 2.4B:320"
        return str | None
    if nargs is not None and typing.get_origin(base) is list:
        return tuple[(typing.get_args(base)[0],) * nargs] | None  # type: ignore[misc]
    if typing.get_origin(base) is Literal:
        choices = typing.get_args(base) + ((NONE,) if optional else ())
        return Literal[choices] | None  # type: ignore[valid-type]
    return base | None


def flagged_keys(*sections: str) -> list[str]:
    """The config keys of ``sections`` that have a command-line flag, in declaration order."""
    return [
        item.name
        for name in sections
        for item in dataclasses.fields(cfg.SECTIONS[name])
        if item.metadata.get("flag")
    ]


def with_config_options(*keys: str) -> Callable[[Callable], Callable]:
    """Add an option for each config key in ``keys`` to a command that takes ``config_values``."""
    declared = {key: _field(key) for key in keys}

    def decorate(command: Callable) -> Callable:
        signature = inspect.signature(command)
        hints = typing.get_type_hints(command, include_extras=True)
        params = [
            parameter.replace(annotation=hints[name])
            for name, parameter in signature.parameters.items()
            if name != "config_values"
        ]
        for key, (item, annotation) in declared.items():
            option = typer.Option(flag_of(key), help=item.metadata["help"], show_default=False)
            params.append(
                inspect.Parameter(
                    key,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[_option_type(annotation, item.metadata.get("nargs")), option],
                )
            )

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            values = {}
            for key in declared:
                value = kwargs.pop(key)
                if value is not None:
                    values[key] = (
                        None if value == NONE else list(value) if isinstance(value, tuple) else value
                    )
            return command(**kwargs, config_values=values)

        run.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        # typer reads the signature and the annotations: both the new ones, resolved, not the command's
        run.__annotations__ = {parameter.name: parameter.annotation for parameter in params}
        del run.__wrapped__
        return run

    return decorate


def _inherit_retro_project(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with what the RETRO project fixes (``manifest.inherit``: a value given with another
    one is an error)."""
    from mtk.data.retro_project import RetroProject
    from mtk.manifest import ManifestError, inherit
    from mtk.retro.query import training_values, verified_neighbours

    project = values["retro_project"]
    try:  # the data, chunk table, records and neighbours as the stages left them
        inherited = training_values(verified_neighbours(RetroProject(project))[0])
    except (ValueError, OSError) as err:
        fail(str(err))
    source = f"the RETRO project {project} (build-db)"
    try:
        for key, value in inherited.items():
            given = next(
                (v for k, v in values.items() if k.rpartition(".")[2] == key), None
            )  # also --set section.key
            instead = (
                f"train for the project's train_samples ({inherited['train_samples']})"
                if key == "train_iters"
                else "build a project with it (`mtk retro build-db`)"
            )
            inherit(key, value, given, source, instead=instead, unset_is_recorded=True)
    except ManifestError as err:
        fail(str(err))
    return values | inherited


def build_config(
    preset: str, overrides: list[str], config_values: dict[str, Any], bf16: bool = False, fp16: bool = False
) -> cfg.RunConfig:
    """The preset with ``--set`` overrides, then flag values, then precision flags applied; a
    ConfigError becomes a clean exit naming the key."""
    from mtk.presets import load_preset

    if bf16 and fp16:
        fail("--bf16 and --fp16 exclude each other")
    try:
        values = dict(cfg.parse_override(item) for item in overrides)
        values.update(config_values)
        if bf16 or fp16:
            values["precision"] = "bf16" if bf16 else "fp16"
        if "data.retro_project" in values:  # the project is inherited (and verified) however it is given
            values["retro_project"] = values.pop("data.retro_project")
        if values.get("retro_project"):
            values = _inherit_retro_project(values)
        return cfg.apply_overrides(load_preset(preset).sections, values)
    except cfg.ConfigError as err:
        fail(str(err))
