"""Manifests: the JSON file every stage leaves beside its output so later stages can inherit from it."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
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


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers see either the old content or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
