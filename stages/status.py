"""``mtk status``: the workspace at a glance: what each stage produced, what is stale, what to run next."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from .common import console, fail


def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON, for scripts.")] = False,
) -> None:
    """What the stages run in this workspace (the current directory, or $MTK_WORKSPACE) produced:
    tokenizers, prepared datasets (documents, tokens, tokenizer), runs (preset, iteration, last loss,
    finished), RETRO projects (completed stages); each output deleted or moved since, each one whose
    inputs changed since (stale); and the command that makes sense next."""
    from mtk import workspace

    try:
        records = workspace.records()
    except workspace.WorkspaceError as err:
        fail(str(err))
    entries = [_entry(record) for record in reversed(records)]  # newest first
    report = {"root": str(workspace.root()), "outputs": entries, "next": _next(entries)}
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(f"workspace [bold]{report['root']}[/]", highlight=False)
    if not entries:
        console.print("  nothing recorded yet")
    for kind, title in workspace.KINDS.items():
        lines = [entry for entry in entries if entry["kind"] == kind]
        if lines:
            console.print(f"{title}:")
        for entry in lines:
            problems = ([f"[red]gone: {entry['missing']}[/]"] if entry["missing"] else []) + (
                [f"[yellow]stale: {', '.join(entry['stale'])} changed since[/]"] if entry["stale"] else []
            )
            console.print(f"  {entry['path']}  {_facts(entry)}  {'  '.join(problems)}".rstrip(),
                          highlight=False, soft_wrap=True)  # fmt: skip
    console.print(f"next: {report['next']}", highlight=False, markup=False, soft_wrap=True)


def _entry(record: Any) -> dict[str, Any]:
    """A record with what its output says now: gone, stale, and a run's or project's progress."""
    from dataclasses import asdict

    from mtk import workspace

    gone = workspace.missing(record)
    facts = dict(record.facts)
    if not gone and record.kind == "run":
        facts |= workspace.run_progress(workspace.location(record))
    if not gone and record.kind == "retro":
        facts["stages"] = workspace.retro_stages(workspace.location(record))
    entry = asdict(record) | {
        "facts": facts,
        "missing": gone,
        "stale": [] if gone else workspace.stale(record),
    }
    return entry


def _facts(entry: dict[str, Any]) -> str:
    facts, kind = entry["facts"], entry["kind"]
    number = lambda key: "?" if facts.get(key) is None else f"{facts[key]:,}"  # noqa: E731
    if kind == "tokenizer":
        return f"{facts.get('kind', '?')}, vocabulary {number('vocab_size')}"
    if kind == "dataset":
        return (f"{number('documents')} documents, {number('tokens')} tokens, {facts.get('level', '?')} level, "
                f"tokenizer {facts.get('tokenizer', '?')}")  # fmt: skip
    if kind == "run":
        loss = "?" if facts.get("loss") is None else f"{facts['loss']:.4f}"
        done = {True: " (finished)", False: " (unfinished)", None: ""}[facts.get("finished")]
        return (f"preset {facts.get('preset', '?')}, iteration {number('iteration')} of {number('train_iters')}"
                f"{done}, loss {loss}, data {facts.get('data') or 'mock'}")  # fmt: skip
    if kind == "retro":
        return f"stages done: {', '.join(facts.get('stages', [])) or 'none'}"
    return ", ".join(f"{key} {value}" for key, value in facts.items())


def _next(entries: list[dict[str, Any]]) -> str:
    """The command that makes sense next, from the newest outputs."""
    from mtk import workspace
    from mtk.data.tokenizer import BUNDLED

    latest = {kind: next((e for e in entries if e["kind"] == kind), None) for kind in ("dataset", "run")}
    dataset, run = latest["dataset"], latest["run"]
    if dataset is None:
        return f"mtk prepare-data YOUR.jsonl -t gpt2 (or -t {BUNDLED}, a small BPE for trying things)"
    if dataset["missing"] or dataset["stale"]:
        facts = dataset["facts"]
        prefix = dataset["path"].removesuffix(f"_{facts.get('key')}_{facts.get('level')}")
        why = "gone" if dataset["missing"] else "stale"
        source = workspace.shown(next(iter(dataset["inputs"]), "INPUT"))
        return f"mtk prepare-data {source} -o {prefix} -t {facts.get('tokenizer')} (again: the data is {why})"
    preset = "bert-tiny" if dataset["facts"].get("level") == "sentence" else "gpt-tiny"
    if run is None or run["missing"] or run["time"] < dataset["time"]:
        return f"mtk train --preset {preset} --train-iters 200"
    facts = run["facts"]
    if facts.get("finished") is False:
        save = "" if run["path"] == f"runs/{facts.get('preset')}" else f" --save {run['path']}"
        return f"mtk train --preset {facts.get('preset')}{save} (resumes {run['path']})"
    if facts.get("family") in ("gpt", "retro"):
        return f'mtk generate --prompt "..." (samples {run["path"]}), or mtk bench --fp8'
    return f"mtk train --preset {facts.get('preset')} --train-iters MORE, or mtk bench"
