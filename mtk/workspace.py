"""The workspace: the folder a user works in remembers what each stage produced, so that the next
stage can start from it (``mtk train --preset P`` trains on the last prepared dataset) and ``mtk
status`` can show it.

The workspace root is the current directory, or the folder the environment variable ``MTK_WORKSPACE``
names. Its memory is one small file, ``ROOT/.mtk/workspace.json``: one record per output (its kind
and path, relative to the root when inside it), newest last, with the stage that wrote it, the output's
key facts, the hashes its manifest carries, and the size and mtime of its inputs, to tell when they
changed since. Every change is a read-modify-write under an exclusive lock (``.mtk/lock``), published
atomically, so stages recording at once lose no record. Nothing depends on it: explicit paths always
win, and every output folder describes itself without it. Light: no numpy or torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtk.manifest import LinkRefused, atomic_write_text, inside, open_nofollow, refuse_link

ENV = "MTK_WORKSPACE"
FOLDER = ".mtk"
STATE = "workspace.json"
VERSION = 1
# what a record can hold, and how status names each kind
KINDS = {
    "tokenizer": "tokenizers",
    "dataset": "datasets",
    "run": "runs",
    "retro": "RETRO projects",
    "squad": "SQuAD results",
}
NAMED = "named"  # a tokenizer fact: the path is a name (gpt2, bundled), not a file


class WorkspaceError(ValueError):
    """The workspace's state file cannot be read or written."""


@dataclass
class Record:
    """One output of a stage: ``path`` relative to the workspace root (absolute when outside it)."""

    kind: str
    path: str
    stage: str
    time: float
    facts: dict[str, Any] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)  # file name -> sha256, as the manifest has it
    inputs: dict[str, list[int]] = field(default_factory=dict)  # input path -> [size, mtime_ns]


def root() -> Path:
    """The workspace root: ``$MTK_WORKSPACE``, else the current directory (absolute)."""
    return Path(os.environ.get(ENV) or os.getcwd()).absolute()


def state_file(base: Path | None = None) -> Path:
    return (base or root()) / FOLDER / STATE


def relative(path: str | os.PathLike, base: Path | None = None) -> str:
    """``path`` as a record holds it: relative to the root when inside it, else absolute."""
    base = base or root()
    absolute = Path(os.path.abspath(path))
    return str(absolute.relative_to(base)) if absolute.is_relative_to(base) else str(absolute)


def location(record: Record, base: Path | None = None) -> Path:
    """Where ``record`` points. A relative path must stay inside the root, links resolved (a crafted
    state file never leads mtk outside it); an absolute one, given by the user, must not be a link."""
    if record.facts.get(NAMED):
        return Path(record.path)
    if Path(record.path).is_absolute():
        return refuse_link(record.path)
    return inside(base or root(), record.path, f"{state_file(base)}'s {record.kind} record")


def shown(path: str | os.PathLike) -> str:
    """``path`` for a message: relative to the current directory when inside it."""
    absolute = Path(os.path.abspath(path))
    return str(absolute.relative_to(Path.cwd())) if absolute.is_relative_to(Path.cwd()) else str(absolute)


def missing(record: Record, base: Path | None = None) -> str | None:
    """Why ``record``'s output is not there any more (deleted, moved, or a link now), else None."""
    try:
        where = location(record, base)
    except LinkRefused as err:
        return err.strerror
    if record.facts.get(NAMED):
        return None
    files = [Path(f"{where}.bin"), Path(f"{where}.idx")] if record.kind == "dataset" else [where]
    gone = [str(f) for f in files if not f.exists()]
    return f"{', '.join(shown(f) for f in gone)} no longer there (deleted or moved)" if gone else None


def snapshot(paths: Iterable[str | os.PathLike]) -> dict[str, list[int]]:
    """Size and mtime of each existing file of ``paths``, by absolute path: what ``stale`` compares."""
    found = {}
    for path in paths:
        with contextlib.suppress(OSError):
            stat = os.stat(path)
            found[os.path.abspath(path)] = [stat.st_size, stat.st_mtime_ns]
    return found


def stale(record: Record) -> list[str]:
    """The inputs of ``record`` that changed (size or mtime) or went away since it was written."""
    return [shown(path) for path, seen in record.inputs.items() if snapshot([path]).get(path) != seen]


def _problem(file: Path, what: str) -> WorkspaceError:
    return WorkspaceError(
        f"{file}: {what}. It is mtk's memory of what the stages of this folder produced, nothing else "
        "depends on it: delete it and mtk starts a new one (every output folder still describes itself)"
    )


def _read(file: Path) -> list[Record]:
    if file.is_symlink():
        raise _problem(file, "is a symbolic link; mtk never follows one here")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _problem(file, f"unreadable ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise _problem(file, "not a workspace state file (expected an object with a 'records' list)")
    names = {f.name for f in dataclasses.fields(Record)}
    try:
        records = [Record(**item) for item in data["records"]]
    except TypeError:
        raise _problem(file, f"a record is malformed (each holds {', '.join(sorted(names))})") from None
    if any(
        r.kind not in KINDS or not isinstance(r.path, str) or not isinstance(r.facts, dict) for r in records
    ):
        raise _problem(file, "a record has an unknown kind or a malformed path or facts")
    return records


@contextlib.contextmanager
def _locked(base: Path) -> Iterator[None]:
    """Exclusive hold of the workspace (``.mtk/lock``, released when the process ends, however)."""
    folder = refuse_link(base / FOLDER)
    folder.mkdir(parents=True, exist_ok=True)
    with open_nofollow(folder / "lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def records(kind: str | None = None, base: Path | None = None) -> list[Record]:
    """The workspace's records (of ``kind``), oldest first; WorkspaceError if the state file is damaged."""
    return [r for r in _read(state_file(base)) if kind is None or r.kind == kind]


def record(
    kind: str,
    path: str | os.PathLike,
    stage: str,
    facts: dict[str, Any] | None = None,
    hashes: dict[str, str] | None = None,
    inputs: Iterable[str | os.PathLike] = (),
    base: Path | None = None,
) -> Record:
    """Remember that ``stage`` produced ``path`` (a ``kind`` output), replacing an older record of the
    same output; ``inputs`` are the files whose change makes it stale. Named tokenizers (``facts``
    with ``named``) keep their name as their path."""
    base = base or root()
    named = bool((facts or {}).get(NAMED))
    entry = Record(
        kind, str(path) if named else relative(path, base), stage, time.time(),
        facts or {}, hashes or {}, snapshot(inputs),
    )  # fmt: skip
    file = state_file(base)
    with _locked(base):
        kept = [r for r in _read(file) if (r.kind, r.path) != (kind, entry.path)]
        state = {"version": VERSION, "records": [dataclasses.asdict(r) for r in [*kept, entry]]}
        atomic_write_text(file, json.dumps(state, indent=1) + "\n")
    return entry


def latest(
    kind: str, fits: Callable[[Record], bool] | None = None, base: Path | None = None
) -> Record | None:
    """The most recent record of ``kind`` that ``fits`` (all, if None); None when there is none."""
    return next((r for r in reversed(records(kind, base)) if fits is None or fits(r)), None)


def manifest_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    """File name -> sha256 of the outputs a manifest describes with a hash."""
    return {
        Path(entry["path"]).name: entry["sha256"]
        for entry in manifest.get("outputs", [])
        if isinstance(entry, dict) and "path" in entry and "sha256" in entry
    }


def run_progress(run_dir: Path) -> dict[str, Any]:
    """What a run directory says of its progress, read from its files as they are now: the last logged
    iteration and loss (``metrics.jsonl``), the iterations asked for (``config.json``), and whether it
    got there."""
    progress: dict[str, Any] = {"iteration": None, "loss": None, "train_iters": None, "finished": None}
    with contextlib.suppress(OSError, ValueError, AttributeError):
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
        progress["train_iters"] = config["train"]["train_iters"]
    with contextlib.suppress(OSError):
        for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                entry = json.loads(line)
                if "split" not in entry and "loss" in entry:
                    progress["iteration"], progress["loss"] = entry.get("iteration"), entry["loss"]
    if progress["iteration"] is not None and progress["train_iters"]:
        progress["finished"] = progress["iteration"] >= progress["train_iters"]
    return progress


def retro_stages(project: Path) -> list[str]:
    """The stages a RETRO project has completed: the sections of its ``config.json``."""
    with contextlib.suppress(OSError, ValueError):
        config = json.loads((project / "config.json").read_text(encoding="utf-8"))
        return [name for name, section in config.items() if isinstance(section, dict)]
    return []
