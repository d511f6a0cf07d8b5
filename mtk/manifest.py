"""Manifests: the JSON file every stage leaves beside its output so later stages can inherit from it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mtk import __version__

MANIFEST_SUFFIX = ".mtk.json"


class ManifestError(ValueError):
    """A manifest is missing, unreadable, or conflicts with an explicit value."""


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


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write a file (or fill a folder) into, renamed onto ``path``
    when the block succeeds and removed when it fails: readers see the old output or the whole new one.

    A folder replaces an existing folder ``path`` whole: the old one is moved aside for the rename,
    deleted after it, and put back if the rename fails.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            _replace_folder(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def _replace_folder(new: Path, path: Path) -> None:
    # rename cannot put a folder over a non-empty one: move that aside, so a failure can put it back
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


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
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: manifest is not valid JSON ({err})") from None


def data_manifest_path(prefix: str | os.PathLike) -> Path:
    """Manifest of an indexed dataset ``PREFIX.bin/.idx``: ``PREFIX.mtk.json``."""
    return Path(f"{prefix}{MANIFEST_SUFFIX}")


def inherit(name: str, inherited: Any, explicit: Any, source: str) -> Any:
    """The explicit value if given, else the inherited one; both given and different is an error."""
    if explicit is None:
        return inherited
    if inherited is not None and inherited != explicit:
        raise ManifestError(
            f"{name}: the explicit value {explicit!r} conflicts with {inherited!r} recorded in {source}; "
            f"drop the option to inherit it, or use data prepared with {explicit!r}"
        )
    return explicit
