"""``mtk retro``: build a RETRO retrieval project (chunk database, index, neighbours) and look into it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from mtk.data.retro_settings import BUILD_DB_KEYS  # the keys build-db fixes; imports nothing

from .common import console, fail, inherited, remember, reports_file_errors
from .options import NprocPerNode, flag_of, relaunch_with_torchrun, with_config_options

app = typer.Typer(no_args_is_help=True)

Project = Annotated[
    Path | None,
    typer.Option(
        "--project",
        help="The project folder (one per retrieval corpus). Default: build-db, retro/<data name> in the "
        "workspace; the later stages, the workspace's last RETRO project.",
        show_default=False,
    ),
]
Embedder = Annotated[
    Path | None,
    typer.Option(
        "--embedder",
        help="Hugging Face BERT folder (config.json, weights) that embeds chunks (default: the "
        "--bert-tokenizer folder of build-db, when it holds weights).",
    ),
]
EmbedDevice = Annotated[
    str, typer.Option("--device", help="Where the BERT embeds: cpu or cuda (each torchrun rank its GPU).")
]
BlockSize = Annotated[
    int, typer.Option("--block-size", min=1, help="Chunks per embedding block saved on disk (resume unit).")
]


@contextlib.contextmanager
def _progress() -> Iterator:
    """A Rich progress bar per phase, with rate and ETA; yields ``update(phase, done, total)``."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed or 0:,.0f}/s")

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                   TimeRemainingColumn(), console=console)  # fmt: skip
    tasks: dict[str, int] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=total)
        bar.update(tasks[phase], completed=done, total=total)

    with bar:
        yield update


def _errors():
    from mtk.config import ConfigError
    from mtk.data.retro_project import RetroProjectError
    from mtk.data.tokenizer import TokenizerError
    from mtk.hf import HFError
    from mtk.manifest import ManifestError

    return (RetroProjectError, ManifestError, TokenizerError, HFError, ConfigError, ValueError)


RetroPreset = Annotated[
    str | None,
    typer.Option(
        "--preset",
        "-p",
        help="Preset (`mtk presets list`) or preset file whose values of these keys are the defaults: "
        "retro-857m, retro-2b and retro-4b give Megatron's RETRO project (seq_length 2048, chunks of 64, "
        "split 98,2,0, seed 1234, 200,000 train samples, global batch 256, eval every 2000 steps for 50 "
        "batches); flags override it. Left out: the config's defaults, and --train-samples is required.",
        show_default=False,
    ),
]


@with_config_options(*BUILD_DB_KEYS)
def build_db(
    bert_tokenizer: Annotated[
        Path,
        typer.Option(
            "--bert-tokenizer", help="BERT WordPiece folder (vocab.txt) or file.", show_default=False
        ),
    ],
    config_values: dict[str, Any],
    project: Project = None,
    preset: RetroPreset = None,
) -> None:
    """Cut the train split into chunks that never cross documents, keep those BERT sees as text.

    The project records these config keys by their config.json names; `mtk train --retro-project` inherits them."""
    from mtk import config as cfg
    from mtk.data.blended import parse_blend
    from mtk.data.retro_project import RetroProject
    from mtk.presets import load_preset
    from mtk.retro.db import build_db as build

    try:
        config = cfg.apply_overrides(load_preset(preset).sections if preset else {}, config_values)
    except cfg.ConfigError as err:
        fail(str(err))
    settings = {key: getattr(getattr(config, cfg.section_of(key)), key) for key in BUILD_DB_KEYS}
    if settings["data_path"] is None:
        settings["data_path"] = _last_data()
    for key in ("data_path", "train_samples"):
        if settings[key] is None:
            fail(f"build-db needs {flag_of(key)}" + (f" (the preset {preset} sets none)" if preset else ""))
    if settings["seq_length"] % settings["retro_chunk_length"]:
        fail(f"{flag_of('seq_length')} {settings['seq_length']} is not a multiple of "
             f"{flag_of('retro_chunk_length')} {settings['retro_chunk_length']}")  # fmt: skip
    try:  # absolute paths: later stages and training may run from elsewhere
        blend = parse_blend(settings["data_path"])
    except (ValueError, FileNotFoundError) as err:
        fail(str(err))
    settings["data_path"] = " ".join(
        str(Path(prefix).resolve()) if len(blend) == 1 else f"{weight} {Path(prefix).resolve()}"
        for weight, prefix in blend
    )
    if settings["data_cache_path"] is not None:
        settings["data_cache_path"] = str(Path(settings["data_cache_path"]).resolve())
    project = project or _new_project(blend[0][1])
    try:
        with _progress() as update:
            record = build(
                RetroProject(project), settings, bert_tokenizer, lambda d, t: update("documents", d, t)
            )
    except _errors() as err:
        fail(str(err))
    counts = record["counts"]
    console.print(f"{counts['chunks']:,} chunks from {counts['documents']:,} documents "
                  f"({counts['chunks_empty_for_bert']:,} empty for BERT dropped) -> {project}")  # fmt: skip
    _remember(project, "retro build-db", [prefix for _, prefix in blend])
    console.print(f"Next: mtk retro index --project {project}")


def _last_data() -> str:
    """The workspace's last document-level prepared data, said out loud."""
    from mtk.workspace import location

    found = inherited(
        "dataset", "--data", "give --data PREFIX, or run `mtk prepare-data FILE` first",
        fits=lambda record: record.facts.get("level") == "document", what="document-level prepared data",
    )  # fmt: skip
    return str(location(found))


def _new_project(prefix: str) -> Path:
    """``retro/<data name>`` in the workspace, said out loud."""
    from mtk.workspace import root, shown

    project = root() / "retro" / Path(prefix).name
    console.print(f"project: {shown(project)} (named after the data; --project to choose)", highlight=False)
    return project


def _last_project(project: Path | None) -> Path:
    """``project``, else the workspace's last RETRO project, said out loud."""
    from mtk.workspace import location

    if project is not None:
        return project
    found = inherited("retro", "--project", "give --project DIR, or run `mtk retro build-db` first",
                      what="RETRO project")  # fmt: skip
    return location(found)


def _remember(project: Path, stage: str, prefixes: list[str] | None = None) -> None:
    """Record the project (stale when its data's manifests change); a later stage keeps build-db's inputs."""
    from mtk import workspace
    from mtk.manifest import data_manifest_path

    if prefixes is None:  # index, query-neighbours: the data build-db recorded
        earlier = None
        with contextlib.suppress(workspace.WorkspaceError):  # a damaged file: remember warns of it
            earlier = next(
                (r for r in workspace.records("retro") if r.path == workspace.relative(project)), None
            )
        inputs = list(earlier.inputs) if earlier else []
    else:
        inputs = [data_manifest_path(prefix) for prefix in prefixes]
    remember("retro", project, stage, inputs=inputs)


def _embedder(project: Path, embedder: Path | None, device: str = "cpu"):
    from mtk.data.retro_project import RetroProject
    from mtk.retro.db import bert_tokenizer
    from mtk.retro.embed import BertEmbedder

    db = RetroProject(project).stage("build-db")
    folder = embedder or Path(db["bert"])
    if not (folder / "config.json").is_file():
        fail(f"{folder}: not a Hugging Face BERT folder (config.json and weights); give --embedder DIR")
    if device == "cuda":  # under torchrun, this rank's GPU
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return BertEmbedder(folder, bert_tokenizer(db["bert"]), device)


@contextlib.contextmanager
def _ranks() -> Iterator[tuple[Any, Any]]:
    """This process's ranks (torchrun's job, or one) and a progress callback (rank 0 draws it)."""
    from mtk.retro.ranks import join, leave

    ranks = join()
    if ranks.main:
        with _progress() as update:
            yield ranks, update
    else:
        yield ranks, None
    leave(ranks)


def index(
    project: Project = None,
    index_type: Annotated[
        str | None,
        typer.Option(
            "--index-type",
            help="faiss factory string (default: chosen by the database's size, recorded in the config).",
        ),
    ] = None,
    embedder: Embedder = None,
    train_chunks: Annotated[
        int | None, typer.Option("--train-chunks", min=1, help="Chunks that train the index (default: all).")
    ] = None,
    nprobe: Annotated[
        int | None, typer.Option("--nprobe", min=1, help="IVF lists searched per query.")
    ] = None,
    ef_search: Annotated[int, typer.Option("--ef-search", min=1, help="HNSW quantiser efSearch.")] = 32,
    k_factor: Annotated[
        int,
        typer.Option("--k-factor", min=1, help="Re-ranked candidates per neighbour (indexes with RFlat)."),
    ] = 8,
    block_size: BlockSize = 100_000,
    device: EmbedDevice = "cpu",
    nproc_per_node: NprocPerNode = None,
) -> None:
    """Embed every chunk (resumable blocks), train the faiss index and add all chunks.

    With --nproc-per-node N, or under torchrun (`mtk launch torchrun -- mtk retro index ...`),
    the ranks share the blocks."""
    from mtk.data.retro_project import RetroProject
    from mtk.retro.index import build_index

    relaunch_with_torchrun(nproc_per_node)
    project = _last_project(project)
    try:
        with _ranks() as (ranks, update):
            model = _embedder(project, embedder, device)
            record = build_index(RetroProject(project), model, index_type, train_chunks, nprobe, ef_search,
                                 block_size, k_factor, update, ranks)  # fmt: skip
    except _errors() as err:
        fail(str(err))
    if not ranks.main:
        return
    console.print(
        f"index {record['index_type']} (nprobe {record['nprobe']}) over {record['chunks']:,} chunks"
    )
    _remember(project, "retro index")
    console.print(f"Next: mtk retro query-neighbours --project {project}")


def query_neighbours(
    project: Project = None,
    num_neighbours: Annotated[
        int, typer.Option("--num-neighbours", min=1, help="Neighbours kept per chunk.")
    ] = 20,
    query_k: Annotated[int, typer.Option("--query-k", min=1, help="Candidates asked of the index.")] = 200,
    embedder: Embedder = None,
    block_samples: Annotated[
        int, typer.Option("--block-samples", min=1, help="Samples per saved block.")
    ] = 1000,
    device: EmbedDevice = "cpu",
    nproc_per_node: NprocPerNode = None,
) -> None:
    """Neighbours of every chunk of every training sample, none from the sample's own documents.

    With --nproc-per-node, or under torchrun, the ranks share the blocks of samples."""
    from mtk.data.retro_project import RetroProject
    from mtk.retro.query import query_neighbours as query

    relaunch_with_torchrun(nproc_per_node)
    project = _last_project(project)
    try:
        with _ranks() as (ranks, update):
            model = _embedder(project, embedder, device)
            record = query(
                RetroProject(project), model, num_neighbours, query_k, block_samples, update, ranks
            )
    except _errors() as err:
        fail(str(err))
    if not ranks.main:
        return
    recall = record[f"recall_at_{num_neighbours}"]
    console.print(
        f"neighbours of {record['samples']} samples; recall@{num_neighbours} against exact search {recall}"
    )
    _remember(project, "retro query-neighbours")
    console.print(
        f"Train: mtk train --preset retro-tiny --retro-project {project} (or leave it out: the workspace's last)"
    )


def inspect(project: Annotated[Path, typer.Argument(help="The project folder.")]) -> None:
    """What each stage did (settings, counts, recall) and which are missing."""
    import json

    from rich.markup import escape

    from mtk.data.retro_project import STAGES, RetroProject, RetroProjectError

    retro = RetroProject(project)
    try:
        config = retro.config()
    except RetroProjectError as err:
        fail(str(err))
    if not config:
        fail(f"{project}: not a RETRO project (no config.json); start with `mtk retro build-db`")
    for stage in STAGES:
        if stage not in config:
            console.print(
                f"[bold]{stage}[/]: [yellow]missing[/] (run `mtk retro {stage} --project {project}`)"
            )
            continue
        try:
            record = retro.stage(stage)
        except RetroProjectError as err:
            console.print(f"[bold]{stage}[/]: [red]{escape(str(err))}[/]", soft_wrap=True)
            continue
        shown = {k: v for k, v in record.items() if k not in ("gpt_tokenizer", "bert_tokenizer", "embedder")}
        state = "" if record.get("complete", True) else " [yellow](unfinished: run it again)[/]"
        console.print(f"[bold]{stage}[/]{state}: {json.dumps(shown)}", soft_wrap=True)


def neighbours(
    project: Annotated[Path, typer.Argument(help="The project folder.")],
    sample: Annotated[int, typer.Option("--sample", min=0, help="Training sample to show.")] = 0,
    split: Annotated[str, typer.Option("--split", help="train, valid or test.")] = "train",
    count: Annotated[int, typer.Option("--count", min=1, help="Neighbours shown per chunk.")] = 2,
) -> None:
    """A sample's chunks as text next to the text of their retrieved neighbours."""
    from mtk.data.retro_project import SPLITS, RetroProject
    from mtk.retro.db import ChunkReader
    from mtk.retro.query import gpt_samples, verified_neighbours

    if split not in SPLITS:
        fail(f"--split {split!r}: one of {', '.join(SPLITS)}")
    retro = RetroProject(project)
    try:
        db, neighbours = verified_neighbours(retro)
        samples = gpt_samples(db)[SPLITS.index(split)]
    except (*_errors(), FileNotFoundError) as err:
        fail(str(err))
    if split not in neighbours:
        fail(f"{project}: no neighbours for the {split} split (query-neighbours found no {split} samples)")
    found = neighbours[split]
    if sample >= len(found):
        fail(f"--sample {sample}: the {split} split has {len(found)} samples")
    reader = ChunkReader(retro)
    gpt, m = reader.gpt, reader.chunk_length
    tokens = samples[sample]["tokens"].numpy()
    for j, rows in enumerate(found[sample]):
        console.print(f"[bold]chunk {j}[/]")  # no rule: the console is unbounded when redirected
        console.print(repr(gpt.decode(tokens[j * m : (j + 1) * m].tolist())), soft_wrap=True)
        for rank, text in enumerate(reader.texts([r for r in rows[:count] if r >= 0])):
            console.print(f"  [green]neighbour {rank}[/]: {text!r}", soft_wrap=True)


for _name, _command in [("build-db", build_db), ("index", index), ("query-neighbours", query_neighbours),
                        ("inspect", inspect), ("neighbours", neighbours)]:  # fmt: skip
    app.command(_name)(reports_file_errors(_command))
