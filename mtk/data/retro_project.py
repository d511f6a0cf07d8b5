"""The RETRO project folder: each stage's settings and inputs in ``config.json``, checked by the next.

Layout: ``config.json`` (a section per stage), ``mtk.json`` (the manifest of the last stage run),
``db/`` (chunk table, index-training sample), ``embeddings/`` (blocks of chunk embeddings),
``index/`` (the faiss index), ``query/`` (blocks of neighbours, then one file per split). Each
stage's folder also holds its own ``mtk.json``: the record it wrote, which ``config.json`` must
still agree with when a later stage or training reads it.

Nothing read back is trusted: every record is checked for its fields' types and ranges, and every
array for its dtype, shape and (neighbour ids) bounds, each error naming the file, the key and
the stage to re-run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mtk.data.retro_settings import BUILD_DB_KEYS
from mtk.manifest import (
    ManifestError,
    atomic_output,
    atomic_write_text,
    read_manifest,
    sha256_file,
    write_manifest,
)

STAGES = ("build-db", "index", "query-neighbours")
FOLDERS = {"build-db": "db", "index": "index", "query-neighbours": "query"}
SPLITS = ("train", "valid", "test")
# the config keys build-db records (under their config.json names) and `mtk train --retro-project`
# inherits, with the one key derived from them: config key -> build-db record key
INHERITED = {key: key for key in BUILD_DB_KEYS} | {"max_position_embeddings": "seq_length"}


class RetroProjectError(ValueError):
    """A project stage that cannot run (an earlier stage missing or built from other inputs)."""


# ---- what each stage records: key -> (what it must be, its check) ------------------------------

Field = tuple[str, Callable[[Any], bool]]


def _integer(low: int) -> Field:
    return f"an integer >= {low}", lambda v: type(v) is int and v >= low


def _object_of(what: str, item: Field, keys: tuple[str, ...] | None = None) -> Field:
    """An object whose values are each ``item`` (and whose keys are among ``keys``)."""
    return (
        f"an object of {what}",
        lambda v: (
            isinstance(v, dict)
            and all(item[1](x) for x in v.values())
            and (keys is None or set(v) <= set(keys))
        ),
    )


TEXT: Field = ("a string", lambda v: isinstance(v, str))
FLAG: Field = ("true or false", lambda v: isinstance(v, bool))
OBJECT: Field = ("an object", lambda v: isinstance(v, dict))
SHA256: Field = (
    "a sha256 (64 hex digits)",
    lambda v: isinstance(v, str) and bool(re.fullmatch("[0-9a-f]{64}", v)),
)
EMBEDDER: Field = (
    "an object with folder, dim and files",
    lambda v: isinstance(v, dict) and TEXT[1](v.get("folder")) and _integer(1)[1](v.get("dim"))
    and OBJECT[1](v.get("files")),
)  # fmt: skip
FIELDS: dict[str, dict[str, Field]] = {
    "build-db": {
        "data_path": TEXT, "retro_chunk_length": _integer(1), "seq_length": _integer(1), "split": TEXT,
        "seed": _integer(0), "train_samples": _integer(1), "global_batch_size": _integer(1),
        "eval_interval": _integer(0), "eval_iters": _integer(0),
        "data_cache_path": ("a string or null", lambda v: v is None or isinstance(v, str)),
        "gpt_tokenizer": OBJECT, "bert_tokenizer": OBJECT, "bert": TEXT, "lower_case": FLAG,
        "inputs": _object_of("sha256s", SHA256), "counts": _object_of("counts", _integer(0)),
        "db_sha256": SHA256,
    },
    "index": {
        "embedder": EMBEDDER, "block_size": _integer(1), "complete": FLAG, "db_sha256": SHA256,
        "index_type": TEXT, "index_type_default": FLAG, "train_chunks": _integer(1), "nprobe": _integer(1),
        "ef_search": _integer(1), "k_factor": _integer(1), "chunks": _integer(1), "faiss": TEXT,
        "index_sha256": SHA256,
    },
    "query-neighbours": {
        "num_neighbours": _integer(1), "query_k": _integer(1), "index_sha256": SHA256, "complete": FLAG,
        "db_sha256": SHA256, "samples": _object_of("sample counts of splits", _integer(0), SPLITS),
        "chunks_per_sample": _integer(1),
    },
}  # fmt: skip
# what a stage records when it starts (complete: false); the other fields come when it finishes
STARTED = {
    "index": ("embedder", "block_size", "complete", "db_sha256"),
    "query-neighbours": ("num_neighbours", "query_k", "index_sha256", "complete", "db_sha256"),
}


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


class RetroProject:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    def manifest_path(self, name: str) -> Path:
        """The manifest stage ``name`` leaves in its own folder: the record it wrote."""
        return self.root / FOLDERS[name] / "mtk.json"

    def rerun(self, name: str) -> str:
        return f"re-run `mtk retro {name} --project {self.root}`"

    def config(self) -> dict[str, Any]:
        """``config.json`` as read (an object; its stage records are checked by ``stage``)."""
        if not self.config_path.is_file():
            return {}
        try:
            config = json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RetroProjectError(
                f"{self.config_path}: unreadable ({err}); {self.rerun('build-db')}"
            ) from None
        if not isinstance(config, dict):
            raise RetroProjectError(
                f"{self.config_path}: a JSON {type(config).__name__}, where a project's config is an object "
                f"of stage records ({', '.join(STAGES)}); restore it or {self.rerun('build-db')}"
            )
        return config

    def stage(self, name: str) -> dict[str, Any]:
        """The record of stage ``name``, checked: its fields' types and ranges, and equal to the one the
        stage left in its folder's manifest. An error naming the file, the key and the stage to run."""
        record = self.config().get(name)
        if record is None:
            raise RetroProjectError(
                f"{self.root}: stage {name} has not run for this project; run `mtk retro {name} --project "
                f"{self.root}` first"
            )
        self._check_fields(name, record)
        try:
            manifest = read_manifest(self.manifest_path(name))
        except ManifestError as err:
            raise RetroProjectError(f"{err}; {self.rerun(name)}") from None
        for key, value in record.items():
            if manifest.get(key) != value:
                raise RetroProjectError(
                    f"{self.config_path}: {name}.{key} is {_shown(value)}, but {self.manifest_path(name)} "
                    f"records {_shown(manifest.get(key))}, the value {name} ran with; restore config.json "
                    f"or {self.rerun(name)}"
                )
        return record

    def _check_fields(self, name: str, record: Any) -> None:
        where = f"{self.config_path}: {name}"
        if not isinstance(record, dict):
            raise RetroProjectError(
                f"{where} is a JSON {type(record).__name__}, expected an object; {self.rerun(name)}"
            )
        required = FIELDS[name] if record.get("complete", True) is True else STARTED[name]
        for key, (expected, valid) in FIELDS[name].items():
            if key not in record:
                if key in required:
                    raise RetroProjectError(f"{where}.{key} is missing; {self.rerun(name)}")
            elif not valid(record[key]):
                raise RetroProjectError(
                    f"{where}.{key} is {_shown(record[key])}, expected {expected}; restore config.json or "
                    f"{self.rerun(name)}"
                )
        if name == "build-db" and record["seq_length"] % record["retro_chunk_length"]:
            raise RetroProjectError(
                f"{where}.seq_length {record['seq_length']} is not a multiple of retro_chunk_length "
                f"{record['retro_chunk_length']}; restore config.json or {self.rerun(name)}"
            )
        if name == "query-neighbours" and record["query_k"] < record["num_neighbours"]:
            raise RetroProjectError(
                f"{where}.query_k {record['query_k']} is below num_neighbours {record['num_neighbours']}; "
                f"restore config.json or {self.rerun(name)}"
            )

    def record(self, name: str, record: dict[str, Any]) -> None:
        """Save stage ``name``'s record (in config.json and its folder's manifest); the records of later
        stages are dropped (they are stale)."""
        earlier = STAGES[: STAGES.index(name)]
        config = {stage: self.stage(stage) for stage in earlier if stage in self.config()}
        config[name] = record
        self.manifest_path(name).parent.mkdir(parents=True, exist_ok=True)
        write_manifest(self.manifest_path(name), stage=f"retro {name}", **record)
        atomic_write_text(self.config_path, json.dumps(config, indent=2) + "\n")
        write_manifest(self.root / "mtk.json", stage=f"retro {name}", project=str(self.root), **record)

    def require(self, name: str, key: str, current: str) -> dict[str, Any]:
        """Stage ``name``'s record, checked to have been built from ``current`` (its ``key`` hash)."""
        record = self.stage(name)
        if record.get(key) != current:
            raise RetroProjectError(
                f"{self.root}: stage {name} was built from other inputs than the project now holds ({key} "
                f"differs); {self.rerun(name)}"
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
        return load_array(self.chunks_path, np.int64, (None, 5), "build-db")

    def sampled(self) -> np.ndarray:
        """The seeded order of the chunks (its first ones train the index)."""
        chunks = len(self.chunks())
        order = load_array(self.sampled_path, np.int64, (chunks,), "build-db")
        check_ids(order, chunks, self.sampled_path, "build-db", none=False)
        return order

    def neighbours(self, split: str, shape: tuple[int, int, int], chunks: int) -> np.ndarray:
        """The saved neighbours of ``split``: (samples, chunks per sample, k) ids of database chunks."""
        path = self.neighbours_path(split)
        return check_ids(
            load_array(path, np.int64, shape, "query-neighbours"), chunks, path, "query-neighbours"
        )

    def db_hash(self) -> str:
        return sha256_file(self.chunks_path) if self.chunks_path.is_file() else "missing"

    def index_hash(self) -> str:
        return sha256_file(self.index_path) if self.index_path.is_file() else "missing"


def load_array(path: Path, dtype: type, shape: tuple[int | None, ...], stage: str) -> np.ndarray:
    """``path`` memory-mapped, refused unless it holds a ``dtype`` array of ``shape`` (None: any size)."""
    try:
        array = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise RetroProjectError(f"{path}: missing; re-run `mtk retro {stage}`") from None
    except (OSError, ValueError) as err:
        raise RetroProjectError(
            f"{path}: not a NumPy array file ({err}); re-run `mtk retro {stage}`"
        ) from None
    fits = array.ndim == len(shape) and all(
        n is None or n == m for n, m in zip(shape, array.shape, strict=True)
    )
    if array.dtype != dtype or not fits:
        expected = ", ".join("any" if n is None else str(n) for n in shape)
        raise RetroProjectError(
            f"{path}: a {array.dtype} array of shape {array.shape}, expected {np.dtype(dtype)} of shape "
            f"({expected}); the file was replaced or damaged: re-run `mtk retro {stage}`"
        )
    return array


def check_ids(ids: np.ndarray, chunks: int, where: Path | str, stage: str, none: bool = True) -> np.ndarray:
    """``ids``, refused unless each is a database chunk (0 to ``chunks`` - 1) or, with ``none``, -1."""
    low = -1 if none else 0
    if ids.size and (ids.min() < low or ids.max() >= chunks):
        bad = ids[(ids < low) | (ids >= chunks)].flat[0]
        allowed = f"0 to {chunks - 1}" + (", or -1 for none" if none else "")
        raise RetroProjectError(
            f"{where}: chunk id {bad} is outside the database of {chunks} chunks ({allowed}); the file is "
            f"not this project's: re-run `mtk retro {stage}`"
        )
    return ids


def save_array(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` so that readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array)


class Blocks:
    """Rows ``[0, total)`` computed in blocks of ``size``, each saved as ``folder/START-END.npy`` as
    soon as it is done: a killed stage re-run computes only the missing blocks. A block read back must
    hold ``dtype`` rows of ``row_shape``."""

    def __init__(
        self, folder: Path, total: int, size: int, dtype: type, row_shape: tuple[int, ...], stage: str
    ) -> None:
        self.folder, self.total, self.size = folder, total, size
        self.dtype, self.row_shape, self.stage = dtype, row_shape, stage

    def ranges(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.size, self.total)) for s in range(0, self.total, self.size)]

    def path(self, start: int, end: int) -> Path:
        return self.folder / f"{start:012d}-{end:012d}.npy"

    def missing(self) -> list[tuple[int, int]]:
        return [r for r in self.ranges() if not self.path(*r).is_file()]

    def save(self, start: int, end: int, array: np.ndarray) -> None:
        save_array(self.path(start, end), array)

    def load(self, start: int, end: int) -> np.ndarray:
        return load_array(self.path(start, end), self.dtype, (end - start, *self.row_shape), self.stage)

    def concatenated(self) -> np.ndarray:
        if not self.total:
            return np.zeros((0, *self.row_shape), self.dtype)
        return np.concatenate([self.load(*r) for r in self.ranges()])
