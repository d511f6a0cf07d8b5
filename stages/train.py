"""``mtk train``: pretrain a preset on prepared data or mock data; resumes from its own checkpoints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from mtk.config import Range

from .common import console, fail, inherited, remember, said
from .options import (
    BF16,
    FP16,
    Device,
    NprocPerNode,
    Overrides,
    Preset,
    build_config,
    check_option,
    flagged_keys,
    relaunch_with_torchrun,
    with_config_options,
)

# DataLoader workers of one rank: each is a process holding a copy of the dataset's state, and eight
# ranks a node with 64 each are already 512 processes; more only forks a machine to a standstill
MAX_WORKERS = 64
WEEK_MINUTES = 7 * 24 * 60  # --timeout-minutes: a collective waiting longer is a hung job


@with_config_options(*flagged_keys("model", "data", "train", "parallel"))
def train(
    preset: Preset,
    config_values: dict[str, Any],
    save: Annotated[
        Path | None,
        typer.Option(
            "--save",
            help="Run directory: config, manifest, metrics, checkpoints. A directory that holds a "
            "checkpoint is resumed. Default: runs/<preset> in the workspace (resumed only if it holds "
            "this run).",
            show_default=False,
        ),
    ] = None,
    load: Annotated[
        Path | None,
        typer.Option("--load", help="Resume from this run directory's latest checkpoint instead."),
    ] = None,
    tensorboard_dir: Annotated[
        Path | None, typer.Option("--tensorboard-dir", help="Write TensorBoard scalars here.")
    ] = None,
    overrides: Overrides = [],  # noqa: B006 - typer copies it
    vocab_size: Annotated[
        int | None,
        typer.Option("--vocab-size", help="Vocabulary for --mock-data (default: the preset's)."),
    ] = None,
    bf16: BF16 = False,
    fp16: FP16 = False,
    keep_last: Annotated[
        int | None,
        typer.Option(
            "--keep-last",
            min=1,
            help="Keep only the newest K checkpoints (by iteration; the tracker's is always kept).",
        ),
    ] = None,
    skip_nan: Annotated[
        bool,
        typer.Option("--skip-nan", help="Skip steps with a non-finite loss or gradient instead of stopping."),
    ] = False,
    max_consecutive_skips: Annotated[
        int,
        typer.Option(
            "--max-consecutive-skips",
            min=1,
            help="Stop when this many steps in a row were skipped (non-finite loss or gradient, fp16 overflow).",
        ),
    ] = 100,
    num_workers: Annotated[
        int,
        typer.Option("--num-workers", help=f"DataLoader worker processes of each rank (0 to {MAX_WORKERS})."),
    ] = 2,
    device: Device = None,
    nproc_per_node: NprocPerNode = None,
    async_save: Annotated[
        bool,
        typer.Option("--async-save", help="Write checkpoints in the background while training continues."),
    ] = False,
    timeout_minutes: Annotated[
        float,
        typer.Option(
            "--timeout-minutes",
            help="Abort the job when a collective waits longer (a hung or dead rank); at most a week.",
        ),
    ] = 10.0,
    exit_after: Annotated[
        int | None, typer.Option("--exit-after", help="Save and stop after this iteration (resume later).")
    ] = None,
) -> None:
    """Pretrain a model; the effective config is printed and saved in the run directory.

    Without --data (or --mock-data, --retro-project) it trains on the workspace's last prepared data
    that fits the preset's family (sentence-level for BERT and T5, a RETRO project for RETRO).

    Example: mtk train --preset gpt-tiny --data data/corpus_text_document --save runs/tiny --train-iters 200
    """
    from mtk.checkpoint import RunDir
    from mtk.config import ConfigError
    from mtk.manifest import ManifestError
    from mtk.train.run import TrainingError, TrainOptions, run_training

    check_option("--num-workers", num_workers, Range(low=0, high=MAX_WORKERS))
    check_option("--timeout-minutes", timeout_minutes, Range(low=0.01, high=WEEK_MINUTES))
    check_option("--exit-after", exit_after, Range(low=1))
    relaunch_with_torchrun(nproc_per_node)
    config = build_config(preset, overrides, config_values, bf16, fp16)
    data = config.data
    if data.data_path is None and not data.mock_data and not data.retro_project:
        config_values = config_values | _inherited_data(config.model.family)
        config = build_config(preset, overrides, config_values, bf16, fp16)
    save = save or _default_save(preset, config)
    options = TrainOptions(
        save=save,
        load=load,
        keep_last=keep_last,
        tensorboard_dir=tensorboard_dir,
        skip_nan=skip_nan,
        max_consecutive_skips=max_consecutive_skips,
        num_workers=num_workers,
        device=device,
        stop_after=exit_after,
        timeout_minutes=timeout_minutes,
        async_save=async_save,
    )
    try:
        state = run_training(config, options, vocab_size, show=_printer(config))
    except (ConfigError, ManifestError, TrainingError, FileNotFoundError, ValueError) as err:
        fail(str(err))
    finally:
        if RunDir(save).config.is_file():  # a run that started, finished or not
            remember_run(preset, save)
    if os.environ.get("RANK", "0") != "0":
        return
    console.print(
        f"done: iteration {state.iteration}, run directory {save} (loss curve: {RunDir(save).plot})"
    )


def _inherited_data(family: str) -> dict[str, Any]:
    """The config value that trains ``family`` on the workspace's last fitting output (its spec's
    ``train_data``), said out loud."""
    from mtk.models import family_spec
    from mtk.workspace import location

    wanted = family_spec(family).train_data
    if wanted == "retro":
        found = inherited("retro", "--retro-project", "give --retro-project, or build one with "
                          "`mtk retro build-db` first (or train on --mock-data)", what="RETRO project")  # fmt: skip
        return {"retro_project": str(location(found))}
    level = wanted
    split = " --split-sentences" if level == "sentence" else ""
    found = inherited(
        "dataset", "--data", f"give --data PREFIX, or run `mtk prepare-data FILE{split}` first (or train on --mock-data)",
        fits=lambda record: record.facts.get("level") == level, what=f"{level}-level prepared data for a {family} model",
    )  # fmt: skip
    return {"data_path": str(location(found))}


def _default_save(preset: str, config) -> Path:  # noqa: ANN001 - a RunConfig
    """``runs/<preset>`` in the workspace, said out loud: resumed if it holds this run (the same model
    on the same data), else the command ends naming what is there."""
    from mtk.checkpoint import RunDir
    from mtk.presets import is_preset_path
    from mtk.workspace import root, shown

    save = root() / "runs" / (Path(preset).stem if is_preset_path(preset) else preset)
    previous = _read_json(RunDir(save).config)
    if previous is None:
        said(f"save: {shown(save)} (a new run of {preset}; --save to choose)")
        return save
    differences = _run_differences(previous, config.to_dict())
    if differences:
        fail(f"--save is not given, and {shown(save)} holds another run of {preset} ({'; '.join(differences)}): "
             f"give --save NEW_FOLDER to start this one, or the settings of that run to resume it")  # fmt: skip
    said(f"save: {shown(save)} (resuming this run of {preset}; --save to choose)")
    return save


def _read_json(path: Path, quiet: bool = False) -> dict[str, Any] | None:
    """The JSON object of ``path``; None if absent (or, ``quiet``, unreadable), else the command ends."""
    import json

    try:
        found = json.loads(path.read_text(encoding="utf-8"))
        return found if isinstance(found, dict) else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        if quiet:
            return None
        fail(f"{path}: unreadable ({err}); give --save to train elsewhere")


def _run_differences(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between the run a folder holds and this one: the data, and the model settings
    this one sets (the vocabulary is the data's, resolved when training starts)."""
    from mtk.workspace import root, shown

    def where(value: Any) -> Any:  # a path as a record or a message shows it
        return value if value is None or isinstance(value, bool) else shown(root() / value)

    data = previous.get("data", {})
    found = [
        f"{key} {where(data.get(key))} there, {where(now)} here"
        for key in ("data_path", "mock_data", "retro_project")
        if where(data.get(key)) != where(now := current["data"][key])
    ]
    model = previous.get("model", {})
    found += [
        f"{key} {model.get(key)} there, {now} here"
        for key, now in current["model"].items()
        if now is not None and key != "vocab_size" and model.get(key) != now
    ]
    return found


def remember_run(preset: str, save: Path, stage: str = "train") -> None:
    """Record the run directory with its preset, family and data, stale when its data's manifests change."""
    from mtk.checkpoint import RunDir
    from mtk.manifest import data_manifest_path
    from mtk.workspace import manifest_hashes, relative

    manifest = _read_json(RunDir(save).manifest, quiet=True) or {}
    config = _read_json(RunDir(save).config, quiet=True) or {}
    data = manifest.get("data")
    prefixes = [entry.get("prefix") for entry in manifest.get("inputs", []) if entry.get("prefix")]
    data = relative(data) if data else None
    facts = {"preset": preset, "family": config.get("model", {}).get("family"), "data": data}
    hashes = {k: v for entry in manifest.get("inputs", []) for k, v in manifest_hashes(entry).items()}
    remember("run", save, stage, facts=facts, hashes=hashes, inputs=[data_manifest_path(p) for p in prefixes])


def _printer(config):
    """Print the effective config once (as a table), then pass log lines through."""
    from rich.table import Table

    shown = False

    def show(line: str) -> None:
        nonlocal shown
        if not shown:
            table = Table(title="effective config", title_justify="left", show_header=False)
            for section, values in config.to_dict().items():
                for key, value in values.items():
                    table.add_row(f"{section}.{key}", str(value))
            console.print(table)
            shown = True
        console.print(line, highlight=False)

    return show
