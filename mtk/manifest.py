"""Manifests: the JSON file every stage leaves beside its output so later stages can inherit from it."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mtk import __version__

MANIFEST_SUFFIX = ".mtk.json"


class ManifestError(ValueError):
    """A manifest is missing, unreadable, or conflicts with an explicit value."""


class LinkRefused(OSError):
    """A path mtk would write is a symbolic link (mtk never writes through one), or a path read from
    a file's own metadata leads outside the folder it belongs to."""


def refuse_link(path: str | os.PathLike) -> Path:
    """``path``, unless it is a symbolic link (LinkRefused naming the link and its target)."""
    path = Path(path)
    if path.is_symlink():
        raise LinkRefused(
            errno.ELOOP,
            f"is a symbolic link (to {os.readlink(path)}); mtk never writes through a link: "
            "remove the link, or use another folder",
            str(path),
        )
    return path


def open_nofollow(path: str | os.PathLike, mode: str = "a", encoding: str | None = "utf-8"):
    """``open(path, mode)`` for writing (``a``, ``a+``, ``w``), refusing a symbolic link at ``path``
    (O_NOFOLLOW: no window between a check and the open) and closed in child processes on exec."""
    flags = {"a": os.O_WRONLY | os.O_APPEND, "a+": os.O_RDWR | os.O_APPEND, "w": os.O_WRONLY | os.O_TRUNC}
    try:
        descriptor = os.open(path, flags[mode] | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            refuse_link(path)
        raise
    return os.fdopen(descriptor, mode, encoding=encoding)


def inside(folder: str | os.PathLike, name: str, what: str) -> Path:
    """``folder / name`` where ``name`` was read from a file of ``folder`` (``what`` says which entry):
    LinkRefused unless it is a plain relative name that stays inside ``folder``, links resolved."""
    folder = Path(folder)
    candidate = folder / name
    if (
        not isinstance(name, str)
        or not name
        or Path(name).is_absolute()
        or ".." in Path(name).parts
        or not candidate.resolve().is_relative_to(folder.resolve())
    ):
        raise LinkRefused(
            errno.EACCES,
            f"{what} names {name!r}, which is outside this folder; the folder was changed by hand or "
            "crafted: restore it from its source",
            str(folder),
        )
    return candidate


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def describe_file(path: str | os.PathLike, with_hash: bool = True) -> dict[str, Any]:
    path = Path(path)
    entry: dict[str, Any] = {"path": str(path.resolve()), "bytes": path.stat().st_size}
    if with_hash:
        entry["sha256"] = sha256_file(path)
    return entry


def _temporary(path: Path, kind: str) -> Path:
    """A hidden name beside ``path`` that says whose it is: ``.NAME.KIND-PID``."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}{path.suffix}")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete what processes that died (SIGKILL, power loss) left beside ``path`` while writing it:
    ``.NAME.tmp-PID`` and ``.NAME.old-PID`` of pids that no longer run. Returns what was removed."""
    removed = []
    for kind in ("tmp", "old"):
        for stale in path.parent.glob(f".{glob.escape(path.name)}.{kind}-*"):
            pid = stale.name.removeprefix(f".{path.name}.{kind}-").split(".", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
                remove_path(stale)
                removed.append(stale)
    return removed


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Temporary paths beside ``paths`` to write files (or fill folders) into, published together
    when the block succeeds and removed when it fails: readers see all the old outputs or all the new.

    An output that is a symbolic link is refused (``LinkRefused``): the link is never replaced or followed.
    Publishing moves each existing output aside, renames every temporary into place, then deletes
    the old ones; if a rename fails, the new outputs are removed and the old ones put back. Every
    temporary must exist when the block ends. Stale temporaries of dead processes are removed first.
    """
    paths = [refuse_link(path) for path in paths]
    for path in paths:
        remove_stale_temporaries(path)
    temporaries = [_temporary(path, "tmp") for path in paths]
    for tmp in temporaries:  # whatever is there (a planted link) is not written through
        remove_path(tmp)
    finals = {str(tmp): path for tmp, path in zip(temporaries, paths, strict=True)}
    try:
        try:
            yield temporaries
        except OSError as err:  # name the output the user asked for, not its temporary
            if str(err.filename) not in finals:
                raise
            raise OSError(err.errno, err.strerror, str(finals[str(err.filename)])) from None
        missing = [str(tmp) for tmp in temporaries if not (tmp.exists() or tmp.is_symlink())]
        if missing:
            raise FileNotFoundError(f"nothing was written to {', '.join(missing)}")
        if len(paths) == 1 and not temporaries[0].is_dir():
            os.replace(temporaries[0], paths[0])  # one file: rename over it, atomically
        else:
            _publish_together(list(zip(temporaries, paths, strict=True)))
    finally:
        for tmp in temporaries:
            remove_path(tmp)


def _publish_together(moves: list[tuple[Path, Path]]) -> None:
    aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for _, path in moves:
            if path.exists() or path.is_symlink():
                old = _temporary(path, "old")
                os.replace(path, old)
                aside.append((old, path))
        for tmp, path in moves:
            os.replace(tmp, path)
            placed.append(path)
    except BaseException:
        for path in placed:
            remove_path(path)
        for old, path in aside:
            os.replace(old, path)
        raise
    for old, _ in aside:
        remove_path(old)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """``atomic_outputs`` of one path: a temporary to write a file (or fill a folder) into."""
    with atomic_outputs([path]) as (tmp,):
        yield tmp


def remove_path(path: Path) -> None:
    """Delete a file, a folder or a link (never what a link points to); nothing if absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see either the old content or the whole new one."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_manifest(path: str | os.PathLike, stage: str, **content: Any) -> dict[str, Any]:
    manifest = {
        "stage": stage,
        "mtk_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command_line": sys.argv,
        **content,
    }
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: manifest is not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: expected a JSON object, found a {type(manifest).__name__}")
    return manifest


def data_manifest_path(prefix: str | os.PathLike) -> Path:
    """Manifest of an indexed dataset ``PREFIX.bin/.idx``: ``PREFIX.mtk.json``."""
    return Path(f"{prefix}{MANIFEST_SUFFIX}")


def inherit(
    name: str,
    inherited: Any,
    explicit: Any,
    source: str,
    *,
    instead: str | None = None,
    unset_is_recorded: bool = False,
) -> Any:
    """The explicit value if given, else the inherited one; both given and different is an error.

    Every stage that takes a value an earlier stage recorded goes through here (the vocabulary of
    prepared data, the settings of a RETRO project). ``instead`` says what to do to use the explicit
    value (default: prepare the data with it); ``unset_is_recorded``: an inherited None is a recorded
    value too (the source fixes the key unset), not a missing one.
    """
    if explicit is None:
        return inherited
    if (inherited is not None or unset_is_recorded) and inherited != explicit:
        raise ManifestError(
            f"{name}: the explicit value {explicit!r} conflicts with {inherited!r} recorded in {source}; "
            f"drop the option to inherit it, or {instead or f'use data prepared with {explicit!r}'}"
        )
    return explicit
