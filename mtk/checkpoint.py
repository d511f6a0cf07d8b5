"""Checkpoints: ``SAVE/iter_NNNNNNN/`` folders, a tracker naming the latest complete one, atomic writes.

Weights and optimizer state are saved with ``torch.distributed.checkpoint`` (DCP): every rank writes
its own shards, keyed by parameter name with their place in the whole tensor, so a checkpoint loads
into any parallel layout (DCP reshards on load). ``trainer.pt`` holds the rest (iteration, samples,
loss scaler, every rank's RNG state, config); rank 0 writes it last. A checkpoint is written into a
temporary folder and renamed into place before the tracker is updated, so a crash at any moment
leaves the previous checkpoint usable and never a half one.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

TRACKER = "latest_checkpointed_iteration.txt"  # Megatron's name, so its users find it
TRAINER_STATE = "trainer.pt"


class CheckpointError(ValueError):
    """A checkpoint is missing or unreadable."""


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | os.PathLike) -> int | None:
    """The iteration the tracker names, or None when ``root`` holds no complete checkpoint."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}")
    iteration = int(text)
    if not (iteration_dir(root, iteration) / TRAINER_STATE).is_file():
        raise CheckpointError(
            f"{tracker} names iteration {iteration}, but {iteration_dir(root, iteration)} is missing"
        )
    return iteration


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def single_process_quietly():
    """DCP warns on every call without a process group; one process is a normal case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable")
        yield


def staging_dir(root: str | os.PathLike, iteration: int) -> Path:
    """Where checkpoint ``iteration`` is written before it is renamed into place (same on every rank)."""
    return Path(root) / f".{iteration_dir(root, iteration).name}.tmp"


def publish_checkpoint(
    root: str | os.PathLike, iteration: int, trainer_state: dict[str, Any], keep_last: int | None = None
) -> Path:
    """Complete a checkpoint whose shards are in ``staging_dir``: add the trainer state, rename it into
    place, point the tracker at it, drop all but the newest ``keep_last``. Runs on one rank."""
    root = Path(root)
    final, staged = iteration_dir(root, iteration), staging_dir(root, iteration)
    try:
        torch.save(trainer_state, staged / TRAINER_STATE)
        if final.exists():  # re-saving the same iteration (e.g. after a resume)
            shutil.rmtree(final)
        os.replace(staged, final)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    tracker_tmp = root / f".{TRACKER}.tmp-{os.getpid()}"
    tracker_tmp.write_text(f"{iteration}\n")
    os.replace(tracker_tmp, root / TRACKER)
    if keep_last:
        for old in sorted(root.glob("iter_*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoint_path(root: str | os.PathLike, iteration: int | None) -> Path:
    if iteration is None:
        iteration = latest_iteration(root)
        if iteration is None:
            raise CheckpointError(f"{root}: no checkpoint ({TRACKER} not found)")
    path = iteration_dir(root, iteration)
    if not (path / TRAINER_STATE).is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    return path


def load_trainer_state(root: str | os.PathLike, iteration: int | None = None) -> dict[str, Any]:
    """Iteration, samples, scaler, RNG states and config of a checkpoint (no tensors of the model)."""
    return torch.load(
        _checkpoint_path(root, iteration) / TRAINER_STATE, map_location="cpu", weights_only=False
    )


def load_checkpoint(root: str | os.PathLike, iteration: int | None = None) -> dict[str, Any]:
    """A checkpoint as plain full tensors in this process: ``model`` (name -> tensor) and the trainer
    state. For tools (inspect, convert, generate); training resumes shard by shard instead."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = _checkpoint_path(root, iteration)
    state: dict[str, Any] = {}
    with single_process_quietly():
        _load_state_dict(
            state,
            storage_reader=FileSystemReader(path),
            planner=_EmptyStateDictLoadPlanner(keys={"model"}),
            no_dist=True,
        )
    return {**load_trainer_state(root, iteration), "model": state["model"]}


def export_safetensors(root: str | os.PathLike, out: str | os.PathLike, iteration: int | None = None) -> Path:
    """The weights of a checkpoint as one ``.safetensors`` file (config and iteration in its metadata).

    Shared storage (tied weights) is written once per name, as plain copies, which safetensors requires.
    """
    import json

    from safetensors.torch import save_file

    state = load_checkpoint(root, iteration)
    weights = {name: tensor.detach().contiguous().clone() for name, tensor in state["model"].items()}
    metadata = {"format": "pt", "iteration": str(state["iteration"]), "config": json.dumps(state["config"])}
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file(weights, str(tmp), metadata=metadata)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
