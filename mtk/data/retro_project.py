"""The RETRO project folder: each stage's settings and inputs in ``config.json``, checked by the next.

Layout: ``config.json`` (a section per stage), ``mtk.json`` (the manifest of the last stage run),
``db/`` (chunk table, index-training sample), ``embeddings/`` (blocks of chunk embeddings),
``index/`` (the faiss index), ``query/`` (blocks of neighbours, then one file per split).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mtk.manifest import atomic_output, atomic_write_text, sha256_file, write_manifest

STAGES = ("build-db", "index", "query-neighbours")
# what `mtk train --retro-project` inherits from build-db: config key -> build-db setting
INHERITED = {
    "data_path": "data",
    "data_cache_path": "data_cache_path",
    "split": "split",
    "seq_length": "seq_length",
    "max_position_embeddings": "seq_length",
    "seed": "seed",
    "train_samples": "train_samples",
    "global_batch_size": "global_batch_size",
    "eval_interval": "eval_interval",
    "eval_iters": "eval_iters",
    "retro_chunk_length": "chunk_length",
}


class RetroProjectError(ValueError):
    """A project stage that cannot run (an earlier stage missing or built from other inputs)."""


class RetroProject:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    def config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            return {}
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise RetroProjectError(
                f"{self.config_path}: unreadable ({err}); re-run `mtk retro build-db`"
            ) from None

    def stage(self, name: str) -> dict[str, Any]:
        """The record of stage ``name``; an error naming the stage to run when it is missing."""
        record = self.config().get(name)
        if record is None:
            raise RetroProjectError(
                f"{self.root}: stage {name} has not run for this project; run `mtk retro {name} --project "
                f"{self.root}` first"
            )
        return record

    def record(self, name: str, record: dict[str, Any]) -> None:
        """Save stage ``name``'s record; the records of later stages are dropped (they are stale)."""
        config = {k: v for k, v in self.config().items() if k in STAGES[: STAGES.index(name)]}
        config[name] = record
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, json.dumps(config, indent=2) + "\n")
        write_manifest(self.root / "mtk.json", stage=f"retro {name}", project=str(self.root), **record)

    def require(self, name: str, key: str, current: str) -> dict[str, Any]:
        """Stage ``name``'s record, checked to have been built from ``current`` (its ``key`` hash)."""
        record = self.stage(name)
        if record.get(key) != current:
            raise RetroProjectError(
                f"{self.root}: stage {name} was built from other inputs than the project now holds ({key} "
                f"differs); re-run `mtk retro {name} --project {self.root}`"
            )
        return record

    # ---- files -----------------------------------------------------------------------------

    @property
    def chunks_path(self) -> Path:
        return self.root / "db" / "chunks.npy"

    @property
    def sampled_path(self) -> Path:
        return self.root / "db" / "sampled.npy"

    @property
    def index_path(self) -> Path:
        return self.root / "index" / "index.faiss"

    def neighbours_path(self, split: str) -> Path:
        return self.root / "query" / f"{split}.npy"

    def chunks(self) -> np.ndarray:
        """The chunk table: rows (dataset, document, start, end, bert length), int64."""
        return np.load(self.chunks_path, mmap_mode="r")

    def db_hash(self) -> str:
        return sha256_file(self.chunks_path) if self.chunks_path.is_file() else "missing"

    def index_hash(self) -> str:
        return sha256_file(self.index_path) if self.index_path.is_file() else "missing"


def save_array(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` so that readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


class Blocks:
    """Rows ``[0, total)`` computed in blocks of ``size``, each saved as ``folder/START-END.npy`` as
    soon as it is done: a killed stage re-run computes only the missing blocks."""

    def __init__(self, folder: Path, total: int, size: int) -> None:
        self.folder, self.total, self.size = folder, total, size

    def ranges(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.size, self.total)) for s in range(0, self.total, self.size)]

    def path(self, start: int, end: int) -> Path:
        return self.folder / f"{start:012d}-{end:012d}.npy"

    def missing(self) -> list[tuple[int, int]]:
        return [r for r in self.ranges() if not self.path(*r).is_file()]

    def save(self, start: int, end: int, array: np.ndarray) -> None:
        save_array(self.path(start, end), array)

    def load(self, start: int, end: int) -> np.ndarray:
        return np.load(self.path(start, end))

    def concatenated(self) -> np.ndarray:
        return np.concatenate([self.load(*r) for r in self.ranges()]) if self.total else np.zeros((0,))
