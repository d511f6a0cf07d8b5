"""Run directories and checkpoints: ``RunDir`` names every file of a run, ``Checkpointer`` saves and loads.

Weights and optimizer state are saved with ``torch.distributed.checkpoint`` (DCP): every rank writes
its own shards, keyed by parameter name with their place in the whole tensor, so a checkpoint loads
into any parallel layout (DCP reshards on load). ``trainer.safetensors`` holds the rest (iteration,
samples, loss scaler, every rank's RNG state, config) as JSON and tensors, ``checkpoint.json``
describes the checkpoint (config, tokenizer), and ``checksums.json`` records the size and sha256
of every file. Nothing is unpickled on load except DCP's metadata, through an unpickler that only
builds DCP's own metadata classes.

A checkpoint is written into a temporary folder and renamed into place before the tracker is
updated, so a crash at any moment leaves the previous checkpoint usable and never a half one. On
load every file is checked against its checksum; a damaged checkpoint is skipped, with a warning
naming what is wrong, for the newest intact one. One run at a time holds a run directory (a lock).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import pickle
import random
import shutil
import socket
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mtk.collectives import barrier, gather_objects, is_distributed, rank_and_world
from mtk.config import ConfigError, RunConfig
from mtk.manifest import (
    atomic_output,
    atomic_write_text,
    inside,
    open_nofollow,
    process_alive,
    refuse_link,
    remove_path,
)

TRACKER = "latest_checkpointed_iteration.txt"  # Megatron's name, so its users find it
TRAINER_STATE = "trainer.safetensors"
LEGACY_TRAINER_STATE = "trainer.pt"  # written by mtk before 0.2: read without running code
DESCRIPTION = "checkpoint.json"
CHECKSUMS = "checksums.json"
LOCK = ".lock"


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or unreadable, or the run directory is in use."""


class RunDir:
    """The files of a run directory (``mtk train --save``), each named here once."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def config(self) -> Path:
        """The effective config of the run (``RunConfig.to_dict`` as JSON)."""
        return self.root / "config.json"

    @property
    def manifest(self) -> Path:
        """The stage manifest: data inputs with hashes, tokenizer, command line."""
        return self.root / "mtk.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def tracker(self) -> Path:
        return self.root / TRACKER

    def checkpoint(self, iteration: int) -> Path:
        return self.root / f"iter_{iteration:07d}"

    def staging(self, iteration: int) -> Path:
        """Where checkpoint ``iteration`` is written before it is renamed into place (same on every rank)."""
        return self.root / f".{self.checkpoint(iteration).name}.tmp"

    def checkpoints(self) -> list[int]:
        """Iterations of the ``iter_*`` folders present, in increasing order."""
        found = []
        for path in self.root.glob("iter_*"):
            digits = path.name.removeprefix("iter_")
            if digits.isdigit() and path.is_dir():
                found.append(int(digits))
        return sorted(found)

    def tracked(self) -> int | None:
        """The iteration the tracker names (None without a tracker); CheckpointError if unreadable."""
        try:
            text = self.tracker.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(
                f"{self.tracker}: unreadable ({err}); it should hold an iteration number"
            ) from None
        if not text.isdigit():
            raise CheckpointError(f"{self.tracker}: expected an iteration number, found {text[:40]!r}")
        return int(text)

    def latest(self) -> int | None:
        """The iteration the tracker names, or None when the directory holds no complete checkpoint."""
        iteration = self.tracked()
        if iteration is None:
            return None
        if not has_trainer_state(self.checkpoint(iteration)):
            raise CheckpointError(
                f"{self.tracker} names iteration {iteration}, but {self.checkpoint(iteration)} is missing"
            )
        return iteration

    def candidates(self) -> list[int]:
        """Checkpoints to resume from, best first: the tracker's, then the others from the newest."""
        present = [i for i in reversed(self.checkpoints()) if has_trainer_state(self.checkpoint(i))]
        tracked = self.tracked()
        if tracked in present:
            present.remove(tracked)
            present.insert(0, tracked)
        return present

    def checkpoint_path(self, iteration: int | None = None) -> Path:
        """The folder of checkpoint ``iteration`` (default: the latest); CheckpointError if absent."""
        if iteration is None:
            iteration = self.latest()
            if iteration is None:
                raise CheckpointError(f"{self.root}: no checkpoint ({TRACKER} not found)")
        path = self.checkpoint(iteration)
        if not has_trainer_state(path):
            raise CheckpointError(f"{path}: checkpoint not found")
        return path

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold this run directory for the duration; CheckpointError naming the holder if another
        process holds it. A POSIX record lock: it belongs to this process alone (forked children such
        as DataLoader workers do not inherit it) and dies with it, so a restart right after a crash
        finds the directory free."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / LOCK
        key = path.resolve()
        if key in _HELD:  # POSIX locks do not exclude their own process
            raise CheckpointError(self._in_use(_holder_text(os.getpid())))
        handle = open_nofollow(path, "a+")
        held = False
        try:
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
                handle.seek(0)
                raise CheckpointError(self._in_use(handle.read().strip())) from None
            _HELD.add(key)
            held = True
            handle.seek(0)
            handle.truncate()
            handle.write(_holder_text(os.getpid()))
            handle.flush()
            yield
        finally:
            if held:
                _HELD.discard(key)
            handle.close()  # releases the lock

    def _in_use(self, holder: str) -> str:
        """Who holds this directory, and whether that process still runs (when it is on this host)."""
        words = holder.split()
        if len(words) >= 5 and words[0] == "pid" and words[1].isdigit() and words[4] == socket.gethostname():
            if int(words[1]) != os.getpid() and not process_alive(int(words[1])):
                holder += (
                    " (that process has ended; another one holds the directory now and has not yet "
                    "named itself: try again in a moment)"
                )
            else:
                holder += " (running)"
        return (
            f"{self.root} is in use by {holder or 'another process'}; wait for that run to end (or stop "
            "it), or give this run another --save directory"
        )


_HELD: set[Path] = set()  # the lock files this process holds


def _holder_text(pid: int) -> str:
    return f"pid {pid} on host {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})"


def latest_iteration(root: str | os.PathLike) -> int | None:
    """The latest complete checkpoint's iteration in run directory ``root`` (None: none yet)."""
    return RunDir(root).latest()


def has_trainer_state(path: Path) -> bool:
    return (path / TRAINER_STATE).is_file() or (path / LEGACY_TRAINER_STATE).is_file()


# ---- data-only trainer state --------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's random generators: Python's, numpy's, torch's (and CUDA's) states."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able ``value`` with every tensor moved to ``tensors`` under a path-like name."""
    if isinstance(value, torch.Tensor):
        tensors[name] = value.detach().cpu().contiguous()
        return {"__tensor__": name}
    if isinstance(value, dict):
        return {str(k): _encode(v, f"{name}.{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, f"{name}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(value: Any, tensors: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors.get_tensor(value["__tensor__"])
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def write_trainer_state(path: Path, state: dict[str, Any]) -> None:
    """``state`` (numbers, strings, lists, dicts and tensors) as a safetensors file: data only."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, "state", tensors)
    # bytes written here, not by save_file, which creates 0600 files teammates cannot read
    path.write_bytes(save(tensors, metadata={"mtk_trainer_state": json.dumps(encoded)}))


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """The trainer state of checkpoint folder ``folder``, read without running any code in it and
    checked field by field (``check_trainer_state``)."""
    path = folder / TRAINER_STATE
    if not path.is_file():
        path = folder / LEGACY_TRAINER_STATE
        state = _read_legacy_trainer_state(path)
    else:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as tensors:
                encoded = json.loads((tensors.metadata() or {})["mtk_trainer_state"])
                state = _decode(encoded, tensors)
        except Exception as err:  # safetensors raises its own error types for torn or foreign files
            raise CheckpointError(
                f"{path}: not a readable trainer state ({str(err).splitlines()[0]})"
            ) from None
    problem = trainer_state_problem(state, folder)
    if problem:
        raise CheckpointError(f"{path}: {problem}; the checkpoint was changed or is not one of mtk's")
    return state


MAX_COUNT = 2**62  # iterations, samples, tokens: anything above is not a real run


def trainer_state_problem(state: Any, folder: Path | None = None) -> str | None:
    """What is wrong with a trainer state read from disk (None when every field has its type and range)."""
    if not isinstance(state, dict):
        return f"expected a table of fields, found {type(state).__name__}"
    for key in ("iteration", "consumed_samples", "consumed_tokens", "skipped_iterations"):
        value = state.get(key)
        if not _is_int(value) or not 0 <= value < MAX_COUNT:
            return f"{key!r} is {value!r}, expected a whole number in [0, 2^62)"
    for key in (
        "schedule_steps",
        "schedule_samples",
        "consumed_valid_samples",
    ):  # absent in older checkpoints
        value = state.get(key, 0)
        if not _is_int(value) or not 0 <= value < MAX_COUNT:
            return f"{key!r} is {value!r}, expected a whole number in [0, 2^62)"
    digits = folder.name.removeprefix("iter_") if folder is not None else ""
    if digits.isdigit() and int(digits) != state["iteration"]:
        return f"'iteration' is {state['iteration']} in the folder of iteration {int(digits)}"
    if state["skipped_iterations"] > state["iteration"]:
        return f"'skipped_iterations' {state['skipped_iterations']} exceeds 'iteration' {state['iteration']}"
    scaler = state.get("scaler")
    if not isinstance(scaler, dict) or not all(
        _is_int(v) or isinstance(v, float) and math.isfinite(v) for v in scaler.values()
    ):
        return f"'scaler' is {scaler!r}, expected the loss scaler's table of finite numbers"
    rngs = state.get("rng")
    if not isinstance(rngs, list) or not rngs:
        return f"'rng' is {type(rngs).__name__}, expected a list of every rank's random states"
    for rank, rng in enumerate(rngs):
        problem = _rng_problem(rng)
        if problem:
            return f"'rng' of rank {rank}: {problem}"
    if not isinstance(state.get("config"), dict):
        return "'config' is missing or not a table"
    try:
        RunConfig.from_dict(state["config"], where="'config'")
    except ConfigError as err:
        return str(err)
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rng_problem(rng: Any) -> str | None:
    """What is wrong with one rank's random states (``rng_state``'s form), None when nothing is."""
    if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= set(rng):
        return "expected python, numpy and torch states"
    python = rng["python"]
    if not (
        isinstance(python, list)
        and len(python) == 3
        and _is_int(python[0])
        and isinstance(python[1], list)
        and len(python[1]) == 625
        and all(_is_int(v) and 0 <= v < 2**32 for v in python[1])
        and (python[2] is None or isinstance(python[2], float))
    ):
        return "python's state is not the Mersenne Twister's (version, 625 words, gauss)"
    numpy = rng["numpy"]
    keys = numpy[1] if isinstance(numpy, list) and len(numpy) == 5 else None
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy()
    if not (
        isinstance(keys, np.ndarray)
        and keys.shape == (624,)
        and keys.dtype.kind in "iu"
        and numpy[0] == "MT19937"
        and _is_int(numpy[2])
        and 0 <= numpy[2] <= 624
        and _is_int(numpy[3])
        and isinstance(numpy[4], (int, float))
    ):
        return "numpy's state is not MT19937's (624 keys, position, gauss)"
    expected = torch.get_rng_state()
    generator = rng["torch"]
    if not (
        isinstance(generator, torch.Tensor)
        and generator.dtype == torch.uint8
        and generator.shape == expected.shape
    ):
        return f"torch's state is not a uint8 tensor of shape {tuple(expected.shape)}"
    cuda = rng.get("cuda", [])
    if not isinstance(cuda, list) or not all(
        isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 for t in cuda
    ):
        return "CUDA's states are not uint8 tensors"
    return None


def _read_legacy_trainer_state(path: Path) -> dict[str, Any]:
    """A ``trainer.pt`` of mtk 0.1 through torch's weights-only unpickler, which builds tensors,
    containers and numpy arrays and nothing else."""
    allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"{path}: refused; it is not the data-only trainer state mtk writes ({str(err).splitlines()[0]})"
        ) from None


# ---- DCP without unpickling -----------------------------------------------------------------------

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``, building only DCP's metadata classes, sizes, paths and dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_metadata(folder: Path) -> Any:
    """DCP's metadata of checkpoint ``folder``, unpickled with ``_MetadataUnpickler`` and checked by
    ``metadata_problem``: CheckpointError naming the file and the first bad entry."""
    path = Path(folder) / ".metadata"
    try:
        with open(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream).load()
    except OSError as err:
        raise CheckpointError(f"{path}: unreadable ({err.strerror or err})") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as err:
        raise CheckpointError(f"{path}: refused ({err})") from None
    problem = metadata_problem(metadata, Path(folder))
    if problem:
        raise CheckpointError(f"{path}: refused, {problem}")
    return metadata


def _is_size(value: Any, dims: int | None = None) -> bool:
    return (
        isinstance(value, (torch.Size, tuple, list))
        and all(_is_int(v) and v >= 0 for v in value)
        and (dims is None or len(value) == dims)
    )


def metadata_problem(metadata: Any, folder: Path) -> str | None:
    """What is wrong with DCP metadata read from ``folder`` (None when nothing is): every field of its
    type, every tensor covered by its chunks, every storage entry a file of ``folder`` (never a path
    outside it) holding at least its chunk's bytes, no two entries sharing bytes, so that what a load
    allocates is bounded by the files on disk."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    if not isinstance(metadata, Metadata):
        return f"expected DCP's Metadata, found {type(metadata).__name__}"
    entries, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        return "its tensor and storage tables are not tables"
    if not isinstance(metadata.planner_data, (dict, type(None))):
        return "its planner data is not a table"
    chunk_bytes: dict[tuple[str, tuple[int, ...]], int] = {}
    for fqn, entry in entries.items():
        if isinstance(entry, BytesStorageMetadata) and isinstance(fqn, str):
            continue
        if not isinstance(fqn, str) or not isinstance(entry, TensorStorageMetadata):
            return f"entry {fqn!r} is neither a tensor nor bytes"
        dims = len(entry.size) if _is_size(entry.size) else -1
        if dims < 0 or not isinstance(getattr(entry.properties, "dtype", None), torch.dtype):
            return f"tensor {fqn!r} has no valid size and dtype"
        if not isinstance(entry.chunks, list) or not all(
            _is_size(c.offsets, dims) and _is_size(c.sizes, dims) for c in entry.chunks
        ):
            return f"tensor {fqn!r} has malformed chunks"
        for chunk in entry.chunks:
            if any(o + n > whole for o, n, whole in zip(chunk.offsets, chunk.sizes, entry.size, strict=True)):
                return f"a chunk of tensor {fqn!r} lies outside its size {tuple(entry.size)}"
            chunk_bytes[(fqn, tuple(chunk.offsets))] = (
                math.prod(chunk.sizes) * entry.properties.dtype.itemsize
            )
        if sum(math.prod(c.sizes) for c in entry.chunks) != math.prod(entry.size):
            return f"the chunks of tensor {fqn!r} do not cover its size {tuple(entry.size)}"
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or index.fqn not in entries:
            return f"storage entry {index!r} names no tensor of the checkpoint"
        if not (
            isinstance(info, _StorageInfo)
            and isinstance(info.relative_path, str)
            and _is_int(info.offset)
            and _is_int(info.length)
            and info.offset >= 0
            and info.length >= 0
            and not getattr(info, "transform_descriptors", None)
        ):
            return f"the storage entry of {index.fqn!r} is malformed"
        try:
            inside(folder, info.relative_path, f"the storage entry of {index.fqn!r}")
        except OSError as err:
            return err.strerror
        needed = chunk_bytes.get((index.fqn, tuple(index.offset or ())), 0)
        if info.length < needed:
            return f"the storage entry of {index.fqn!r} holds {info.length} bytes, its chunk needs {needed}"
        spans.setdefault(info.relative_path, []).append((info.offset, info.offset + info.length, index.fqn))
    for name, ranges in spans.items():
        ranges.sort()
        size = (folder / name).stat().st_size if (folder / name).is_file() else None
        if size is None:
            return f"its storage file {name!r} is missing"
        for (_, end, fqn), (start, _, following) in zip(ranges, ranges[1:], strict=False):
            if start < end:
                return f"the storage entries of {fqn!r} and {following!r} overlap in {name!r}"
        if ranges[-1][1] > size:
            return f"the storage entry of {ranges[-1][2]!r} ends past the end of {name!r} ({size} bytes)"
    return None


def _safe_reader(path: Path, metadata: Any = None):
    """DCP's file reader serving ``metadata`` (default: ``read_metadata(path)``), read and checked
    here, before DCP asks for it, so that a refusal is reported as such rather than through DCP's
    retries, and the file is unpickled once."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    checked = read_metadata(path) if metadata is None else metadata

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            if getattr(checked, "storage_meta", None) is None:
                checked.storage_meta = StorageMeta()
            checked.storage_meta.load_id = self.load_id
            return checked

    return SafeReader(path)


def _weights_only(value: io.BytesIO) -> Any:
    try:
        return torch.load(value, weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"refused a non-tensor entry of a checkpoint ({str(err).splitlines()[0]})"
        ) from None


def _safe_planner(keys: set[str] | None = None):
    """DCP's load planner with non-tensor entries (optimizer hyperparameters) read weights-only."""
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

    base = DefaultLoadPlanner if keys is None else _EmptyStateDictLoadPlanner

    class SafePlanner(base):
        def load_bytes(self, read_item, value):
            loaded = _weights_only(value)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafePlanner() if keys is None else SafePlanner(keys=keys)


# ---- checksums -------------------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def describe_files(folder: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {
        name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_of(folder / name)} for name in names
    }


def recorded_checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """The files ``checksums.json`` of checkpoint ``folder`` records, each checked to be a name inside
    the folder with a size and a sha256; CheckpointError naming the entry otherwise."""
    path = folder / CHECKSUMS
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path} is unreadable ({err})") from None
    files = recorded.get("files") if isinstance(recorded, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{path} is not a table of files with their sizes and sha256")
    for name, entry in files.items():
        try:
            inside(folder, name, f"{path}")
        except OSError as err:
            raise CheckpointError(err.strerror) from None
        if not (
            isinstance(entry, dict) and _is_int(entry.get("bytes")) and isinstance(entry.get("sha256"), str)
        ):
            raise CheckpointError(f"{path}: the entry of {name!r} has no size and sha256")
    return files


def required_files(folder: Path) -> set[str]:
    """Every file a load of checkpoint ``folder`` reads: DCP's metadata and the files it names, the
    trainer state and the description."""
    names = {".metadata", TRAINER_STATE, DESCRIPTION}
    names |= {info.relative_path for info in read_metadata(folder).storage_data.values()}
    return names


def damage(folder: Path, names: Sequence[str] | None = None) -> list[str]:
    """What is wrong with checkpoint ``folder`` (empty when intact): files missing, cut or changed
    against ``checksums.json``, or read by a load without being recorded there (an empty or partial
    list does not vouch for anything). ``names`` restricts the hashing to those files (one rank's
    share); the list itself is checked in full."""
    checksums = folder / CHECKSUMS
    if not checksums.is_file():
        if (folder / LEGACY_TRAINER_STATE).is_file() and (folder / ".metadata").is_file():
            return []  # written by mtk 0.1, before checksums: nothing to compare against
        return [f"{checksums} is missing"]
    try:
        recorded = recorded_checksums(folder)
    except CheckpointError as err:
        return [str(err)]
    problems = []
    for name in sorted(recorded) if names is None else names:
        path, expected = folder / name, recorded[name]
        if path.is_symlink() or not path.is_file():
            problems.append(
                f"{path} is missing" + (" (a symbolic link is there)" if path.is_symlink() else "")
            )
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, {expected['bytes']} were written")
        elif sha256_of(path) != expected["sha256"]:
            problems.append(f"{path} changed since it was written (sha256 differs)")
    if problems:
        return problems
    try:
        uncovered = sorted(required_files(folder) - set(recorded))
    except CheckpointError as err:
        return [str(err)]
    return [f"{checksums} does not record {name}, which a load reads" for name in uncovered]


@contextlib.contextmanager
def single_process_quietly():
    """DCP warns on every call without a process group; one process is a normal case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable")
        yield


def _out_of_space(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it, on any rank) is a full disk."""
    seen: list[BaseException] = [err]
    while seen:
        current = seen.pop()
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "no space left on device" in str(current).lower():
            return True
        seen += [e for e in (current.__cause__, current.__context__) if e is not None]
        seen += [failure[0] for failure in getattr(current, "failures", {}).values()]
    return False


class Checkpointer:
    """Saves and loads the model parts and optimizers of this rank with DCP, into any layout.

    ``save`` writes every rank's shards (in the background with ``async_save``) into a staging
    folder; ``finish`` waits for them, checksums every file (each rank a share) and publishes the
    checkpoint from rank 0: trainer state, ``checkpoint.json`` (``description`` plus the iteration),
    checksums, rename into place, tracker, pruning to the newest ``keep_last`` (never the one the
    tracker names). ``load`` resumes from the newest intact checkpoint of ``save_dir``, else of
    ``load_dir``. Each iteration is saved once: saving the iteration just loaded or published does nothing.

    Without ``optimizers`` it saves the weights alone (``mtk checkpoint import-hf``'s iteration-0
    checkpoint); loading such a checkpoint sets the weights and leaves the optimizers as they are.
    """

    def __init__(
        self,
        save_dir: RunDir,
        parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],  # empty: a weights-only checkpoint
        description: dict[str, Any],
        load_dir: RunDir | None = None,
        keep_last: int | None = None,
        async_save: bool = False,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise CheckpointError(f"--keep-last {keep_last}: keep at least the newest checkpoint (1 or more)")
        refuse_link(save_dir.tracker)  # said before training, not at the first save
        self.save_dir, self.load_dir = save_dir, load_dir
        self.parts, self.optimizers = list(parts), list(optimizers)
        self.description, self.keep_last, self.async_save = description, keep_last, async_save
        self.warnings: list[str] = []  # what load had to skip, for the run to report
        self.current: int | None = None  # the iteration whose checkpoint holds the current state
        self._pending: tuple[Any, int, dict[str, Any]] | None = None
        self._save_group = None

    def _sharded_state(self) -> tuple[dict[str, Any], list[tuple[set[str], set[str]]]]:
        """Model and optimizer state of this rank's parts, as DCP saves and loads it (DTensor shards
        keyed by parameter name; flattened optimizer keys), and the keys of each part."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(flatten_optimizer_state_dict=True)
        state: dict[str, Any] = {"model": {}, "optimizer": {}}
        keys = []
        optimizers = self.optimizers or [None] * len(self.parts)  # weights only: no optimizer state
        for part, optimizer in zip(self.parts, optimizers, strict=True):
            model = get_model_state_dict(part, options=options)
            optim = {} if optimizer is None else get_optimizer_state_dict(part, optimizer, options=options)
            state["model"].update(model)
            state["optimizer"].update(optim)
            keys.append((set(model), set(optim)))
        if not self.optimizers:
            del state["optimizer"]
        return state, keys

    # ---- load ----------------------------------------------------------------------------------
    def _damage(self, folder: Path) -> list[str]:
        """``damage`` of ``folder`` checked by all ranks together, each a share of the files."""
        rank, world = rank_and_world()
        try:
            recorded = sorted(recorded_checksums(folder))
        except CheckpointError:
            return damage(folder)  # no or unreadable checksums: every rank finds the same
        return sorted(
            {p for problems in gather_objects(damage(folder, recorded[rank::world])) for p in problems}
        )

    def load(self) -> dict[str, Any] | None:
        """Load the newest intact checkpoint into the parts and optimizers and return its trainer
        state; None when there is none to resume from. Damaged checkpoints are skipped with a warning
        in ``warnings``; CheckpointError when checkpoints exist but none is intact, or when ``load_dir``
        (an explicit --load) holds none."""
        for run_dir in (self.save_dir, self.load_dir):
            if run_dir is None:
                continue
            skipped = []
            if run_dir.tracked() is None and run_dir.checkpoints():
                self.warnings.append(
                    f"{run_dir.tracker} is missing: looking for the newest intact checkpoint"
                )
            elif run_dir.tracked() is not None and run_dir.tracked() not in run_dir.candidates():
                skipped.append(f"{run_dir.tracker} names iteration {run_dir.tracked()}, which is missing")
            for iteration in run_dir.candidates():
                folder = run_dir.checkpoint(iteration)
                problems = self._damage(folder)
                if problems:
                    skipped.append(f"{folder}: " + "; ".join(problems))
                    continue
                state = self._load_from(folder)
                self.warnings += [f"skipped a damaged checkpoint: {s}" for s in skipped]
                if skipped:
                    self.warnings.append(f"resuming from {folder} instead")
                self.current = iteration if run_dir is self.save_dir else None
                return state
            if skipped:
                raise CheckpointError(
                    f"{run_dir.root} holds checkpoints, but none is intact:\n  "
                    + "\n  ".join(skipped)
                    + "\nrestore them, or train into another --save directory"
                )
        if self.load_dir is not None:
            raise CheckpointError(
                f"--load {self.load_dir.root}: no checkpoint there ({TRACKER} and iter_* not found)"
            )
        return None

    def _load_from(self, folder: Path) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if (folder / DESCRIPTION).is_file():
            read_description(folder / DESCRIPTION)  # a checkpoint that misdescribes itself is not resumed
        state, keys = self._sharded_state()
        metadata = read_metadata(folder)
        entries = metadata.state_dict_metadata
        saved = {name: getattr(entries.get(f"model.{name}"), "size", None) for name in state["model"]}
        differences = [
            f"{name}: {'absent' if saved[name] is None else tuple(saved[name])} in the checkpoint, "
            f"{tuple(tensor.shape)} in this model"
            for name, tensor in state["model"].items()
            if saved[name] is None or tuple(saved[name]) != tuple(tensor.shape)
        ]
        if differences:
            raise CheckpointError(
                f"{folder} holds another model ({'; '.join(differences[:3])}"
                f"{f'; {len(differences) - 3} more' if len(differences) > 3 else ''}); train with the "
                f"model settings of its {DESCRIPTION}, or use a new --save directory"
            )
        # a weights-only checkpoint (mtk checkpoint import-hf) holds no optimizer state: the optimizers
        # keep theirs, as fresh as DCP's state-dict API made them above
        with_optimizer = "optimizer" in state and any(name.startswith("optimizer.") for name in entries)
        if not with_optimizer:
            state.pop("optimizer", None)
        with single_process_quietly():
            dcp.load(
                state,
                storage_reader=_safe_reader(folder, metadata),
                planner=_safe_planner(),
                no_dist=not is_distributed(),
            )
        options = StateDictOptions(flatten_optimizer_state_dict=True)
        optimizers = self.optimizers or [None] * len(self.parts)
        for part, optimizer, (model_keys, optim_keys) in zip(self.parts, optimizers, keys, strict=True):
            set_model_state_dict(part, {k: state["model"][k] for k in model_keys}, options=options)
            if with_optimizer:
                set_optimizer_state_dict(
                    part, optimizer, {k: state["optimizer"][k] for k in optim_keys}, options=options
                )
        return read_trainer_state(folder)

    # ---- save ----------------------------------------------------------------------------------
    def save(self, iteration: int, trainer_state: dict[str, Any]) -> None:
        """Every rank writes its shards of checkpoint ``iteration``; published by ``finish``."""
        import torch.distributed.checkpoint as dcp

        self.finish()
        if iteration == self.current:
            return  # this state is already the checkpoint of this iteration
        staged = self.save_dir.staging(iteration)
        rank, _ = rank_and_world()
        if rank == 0:
            remove_path(staged)  # a folder left by a crash, or a link planted there: never written through
            staged.mkdir(parents=True)
        barrier()
        state, _ = self._sharded_state()
        no_dist = not is_distributed()
        try:
            with single_process_quietly():
                if self.async_save:
                    if self._save_group is None and not no_dist:  # its own group: saving overlaps training
                        self._save_group = torch.distributed.new_group(backend="gloo")
                    future = dcp.async_save(
                        state, checkpoint_id=staged, process_group=self._save_group, no_dist=no_dist
                    )
                else:
                    dcp.save(state, checkpoint_id=staged, no_dist=no_dist)
                    future = None
        except BaseException as err:  # DCP's CheckpointException is a BaseException
            self._failed(iteration, err)
        self._pending = (future, iteration, trainer_state)
        if future is None:
            self.finish()

    def finish(self) -> None:
        """Wait for the save in flight, if any, and publish it (checksums, trainer state, rename, tracker)."""
        if self._pending is None:
            return
        future, iteration, trainer_state = self._pending
        self._pending = None
        staged = self.save_dir.staging(iteration)
        try:
            if future is not None:
                future.result()
            barrier()
            rank, world = rank_and_world()
            written = sorted(p.name for p in staged.iterdir())  # the shards and DCP's metadata
            checksums = gather_objects(describe_files(staged, written[rank::world]))
            if rank == 0:
                files = {name: entry for share in checksums for name, entry in share.items()}
                self._publish(iteration, trainer_state, files)
            barrier()
        except BaseException as err:
            if isinstance(err, KeyboardInterrupt):
                shutil.rmtree(staged, ignore_errors=True)
                raise
            self._failed(iteration, err)
        self.current = iteration

    def _failed(self, iteration: int, err: BaseException):
        """Clean the staging folder and say what went wrong; the previous checkpoint is untouched."""
        staged = self.save_dir.staging(iteration)
        shutil.rmtree(staged, ignore_errors=True)
        kept = self.save_dir.tracked()
        previous = (
            f"{self.save_dir.checkpoint(kept)} is still the latest checkpoint"
            if kept
            else "no checkpoint was kept"
        )
        if _out_of_space(err):
            raise CheckpointError(
                f"no space left on device while saving checkpoint {iteration} to {staged}; {previous}. "
                "Free space (or lower --keep-last) and run again to resume"
            ) from None
        if isinstance(err, OSError):
            raise CheckpointError(
                f"could not save checkpoint {iteration} to {staged} ({err.strerror or err}); {previous}"
            ) from None
        raise err

    def _publish(self, iteration: int, trainer_state: dict[str, Any], files: dict[str, Any]) -> Path:
        """Complete a checkpoint whose shards are in the staging folder: trainer state, description and
        checksums, then rename it into place and point the tracker at it. An older folder of the same
        iteration (from a run the tracker was rolled back from) is replaced only once the new one is
        in place."""
        run_dir = self.save_dir
        final, staged = run_dir.checkpoint(iteration), run_dir.staging(iteration)
        write_trainer_state(staged / TRAINER_STATE, trainer_state)
        description = {**self.description, "iteration": iteration}
        (staged / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        files.update(describe_files(staged, [TRAINER_STATE, DESCRIPTION]))
        (staged / CHECKSUMS).write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")
        replaced = None
        if final.exists():  # not the checkpoint the tracker names: that one is never replaced
            replaced = final.with_name(f".{final.name}.replaced-{os.getpid()}")
            os.replace(final, replaced)
        os.replace(staged, final)
        atomic_write_text(run_dir.tracker, f"{iteration}\n")
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        self._prune()
        return final

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` checkpoints by iteration, and always the one the tracker names."""
        if not self.keep_last:
            return
        run_dir = self.save_dir
        keep = set(run_dir.checkpoints()[-self.keep_last :]) | {run_dir.tracked()}
        for iteration in run_dir.checkpoints():
            if iteration not in keep:
                shutil.rmtree(run_dir.checkpoint(iteration), ignore_errors=True)


def load_trainer_state(root: str | os.PathLike, iteration: int | None = None) -> dict[str, Any]:
    """Iteration, samples, scaler, RNG states and config of a checkpoint (no tensors of the model)."""
    return read_trainer_state(RunDir(root).checkpoint_path(iteration))


def checkpoint_description(root: str | os.PathLike, iteration: int | None = None) -> dict[str, Any]:
    """What a checkpoint says of itself: ``config`` (as ``RunConfig.to_dict``), ``tokenizer`` (its
    manifest entry, None for mock data) and ``iteration``. Checkpoints written before checkpoints
    described themselves are described by their run directory's config and manifest."""
    run_dir = RunDir(root)
    path = run_dir.checkpoint_path(iteration)
    if (path / DESCRIPTION).is_file():
        return read_description(path / DESCRIPTION)
    try:
        manifest = json.loads(run_dir.manifest.read_text()) if run_dir.manifest.is_file() else {}
        description = {
            "config": json.loads(run_dir.config.read_text(encoding="utf-8")),
            "tokenizer": manifest.get("tokenizer") if isinstance(manifest, dict) else None,
            "iteration": int(path.name.removeprefix("iter_")),
        }
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: its description is unreadable ({err})") from None
    return _checked_description(description, run_dir.config)


def read_description(path: Path) -> dict[str, Any]:
    """A checkpoint's ``checkpoint.json``, checked: a config mtk can build, a tokenizer table or none."""
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from None
    return _checked_description(description, path)


def _checked_description(description: Any, source: Path) -> dict[str, Any]:
    if not isinstance(description, dict) or not isinstance(description.get("config"), dict):
        raise CheckpointError(
            f"{source}: expected a table with the run's 'config', found {description!r:.80}"
        )
    if not isinstance(description.get("tokenizer"), (dict, type(None))):
        raise CheckpointError(f"{source}: 'tokenizer' is not a table")
    from mtk.models import family_spec

    try:
        config = RunConfig.from_dict(description["config"], where=str(source))
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    try:
        family_spec(config.model.family)  # a family this installation knows (or one registered)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None
    return description


def load_checkpoint(
    root: str | os.PathLike, iteration: int | None = None, parts: tuple[str, ...] = ("model",)
) -> dict[str, Any]:
    """A checkpoint as plain full tensors in this process: ``model`` (name -> tensor; with ``parts``
    naming ``optimizer`` too, the optimizer's state) and the trainer state, after checking every file.
    For tools (inspect, convert, generate); training resumes shard by shard instead."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = RunDir(root).checkpoint_path(iteration)
    problems = damage(path)
    if problems:
        raise CheckpointError(f"{path} is damaged: " + "; ".join(problems))
    checkpoint_description(root, iteration)  # checked too: tools trust what the checkpoint says of itself
    state: dict[str, Any] = {}
    with single_process_quietly():
        _load_state_dict(
            state, storage_reader=_safe_reader(path), planner=_safe_planner(keys=set(parts)), no_dist=True
        )
    return {**read_trainer_state(path), **{part: state[part] for part in parts}}


def export_safetensors(root: str | os.PathLike, out: str | os.PathLike, iteration: int | None = None) -> Path:
    """The weights of a checkpoint as one ``.safetensors`` file (config and iteration in its metadata).

    Shared storage (tied weights) is written once per name, as plain copies, which safetensors requires.
    """
    from safetensors.torch import save_file

    state = load_checkpoint(root, iteration)
    weights = {name: tensor.detach().contiguous().clone() for name, tensor in state["model"].items()}
    metadata = {"format": "pt", "iteration": str(state["iteration"]), "config": json.dumps(state["config"])}
    out = Path(out)
    with atomic_output(out) as tmp:
        save_file(weights, str(tmp), metadata=metadata)
    return out
