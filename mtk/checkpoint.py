"""Run directories and checkpoints: ``RunDir`` names every file of a run, ``Checkpointer`` saves and loads.

Weights and optimizer state are saved with ``torch.distributed.checkpoint`` (DCP): every rank writes
its own shards, keyed by parameter name with their place in the whole tensor, so a checkpoint loads
into any parallel layout (DCP reshards on load). ``trainer.pt`` holds the rest (iteration, samples,
loss scaler, every rank's RNG state, config) and ``checkpoint.json`` describes the checkpoint (config,
tokenizer), so that any ``iter_*`` folder stands on its own. A checkpoint is written into a temporary
folder and renamed into place before the tracker is updated, so a crash at any moment leaves the
previous checkpoint usable and never a half one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mtk.manifest import atomic_output, atomic_write_text

TRACKER = "latest_checkpointed_iteration.txt"  # Megatron's name, so its users find it
TRAINER_STATE = "trainer.pt"
DESCRIPTION = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint is missing or unreadable."""


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

    def latest(self) -> int | None:
        """The iteration the tracker names, or None when the directory holds no complete checkpoint."""
        if not self.tracker.is_file():
            return None
        text = self.tracker.read_text().strip()
        if not text.isdigit():
            raise CheckpointError(f"{self.tracker}: expected an iteration number, found {text!r}")
        iteration = int(text)
        if not (self.checkpoint(iteration) / TRAINER_STATE).is_file():
            raise CheckpointError(
                f"{self.tracker} names iteration {iteration}, but {self.checkpoint(iteration)} is missing"
            )
        return iteration

    def checkpoint_path(self, iteration: int | None = None) -> Path:
        """The folder of checkpoint ``iteration`` (default: the latest); CheckpointError if absent."""
        if iteration is None:
            iteration = self.latest()
            if iteration is None:
                raise CheckpointError(f"{self.root}: no checkpoint ({TRACKER} not found)")
        path = self.checkpoint(iteration)
        if not (path / TRAINER_STATE).is_file():
            raise CheckpointError(f"{path}: checkpoint not found")
        return path


def latest_iteration(root: str | os.PathLike) -> int | None:
    """The latest complete checkpoint's iteration in run directory ``root`` (None: none yet)."""
    return RunDir(root).latest()


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


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if _distributed():
        import torch.distributed as dist

        dist.barrier()


class Checkpointer:
    """Saves and loads the model parts and optimizers of this rank with DCP, into any layout.

    ``save`` writes every rank's shards (in the background with ``async_save``) into a staging
    folder; ``finish`` waits for them and publishes the checkpoint from rank 0: trainer state and
    ``checkpoint.json`` (``description`` plus the iteration), rename into place, tracker, pruning to
    the newest ``keep_last``. ``load`` reads the latest checkpoint of ``load_dir`` if it has one,
    else of ``save_dir``.
    """

    def __init__(
        self,
        save_dir: RunDir,
        parts: Sequence[nn.Module],
        optimizers: Sequence[torch.optim.Optimizer],
        description: dict[str, Any],
        load_dir: RunDir | None = None,
        keep_last: int | None = None,
        async_save: bool = False,
    ) -> None:
        self.save_dir, self.load_dir = save_dir, load_dir
        self.parts, self.optimizers = list(parts), list(optimizers)
        self.description, self.keep_last, self.async_save = description, keep_last, async_save
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
        for part, optimizer in zip(self.parts, self.optimizers, strict=True):
            model = get_model_state_dict(part, options=options)
            optim = get_optimizer_state_dict(part, optimizer, options=options)
            state["model"].update(model)
            state["optimizer"].update(optim)
            keys.append((set(model), set(optim)))
        return state, keys

    def load(self) -> dict[str, Any] | None:
        """Load the latest checkpoint into the parts and optimizers; its trainer state, or None if none."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        for run_dir in (self.load_dir, self.save_dir):
            if run_dir is None or (iteration := run_dir.latest()) is None:
                continue
            state, keys = self._sharded_state()
            with single_process_quietly():
                dcp.load(state, checkpoint_id=run_dir.checkpoint(iteration), no_dist=not _distributed())
            options = StateDictOptions(flatten_optimizer_state_dict=True)
            for part, optimizer, (model_keys, optim_keys) in zip(
                self.parts, self.optimizers, keys, strict=True
            ):
                set_model_state_dict(part, {k: state["model"][k] for k in model_keys}, options=options)
                set_optimizer_state_dict(
                    part, optimizer, {k: state["optimizer"][k] for k in optim_keys}, options=options
                )
            return load_trainer_state(run_dir.root, iteration)
        return None

    def save(self, iteration: int, trainer_state: dict[str, Any]) -> None:
        """Every rank writes its shards of checkpoint ``iteration``; published by ``finish``."""
        import torch.distributed.checkpoint as dcp

        self.finish()
        staged = self.save_dir.staging(iteration)
        if _rank() == 0:
            shutil.rmtree(staged, ignore_errors=True)
            staged.mkdir(parents=True)
        _barrier()
        state, _ = self._sharded_state()
        no_dist = not _distributed()
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
        self._pending = (future, iteration, trainer_state)
        if future is None:
            self.finish()

    def finish(self) -> None:
        """Wait for the save in flight, if any, and publish it (trainer state, rename, tracker)."""
        if self._pending is None:
            return
        future, iteration, trainer_state = self._pending
        self._pending = None
        if future is not None:
            future.result()
        _barrier()
        if _rank() == 0:
            self._publish(iteration, trainer_state)
        _barrier()

    def _publish(self, iteration: int, trainer_state: dict[str, Any]) -> Path:
        """Complete a checkpoint whose shards are in the staging folder: add the trainer state and the
        description, rename it into place, point the tracker at it, drop all but the newest ``keep_last``."""
        run_dir = self.save_dir
        final, staged = run_dir.checkpoint(iteration), run_dir.staging(iteration)
        try:
            torch.save(trainer_state, staged / TRAINER_STATE)
            description = {**self.description, "iteration": iteration}
            (staged / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
            if final.exists():  # re-saving the same iteration (e.g. after a resume)
                shutil.rmtree(final)
            os.replace(staged, final)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        atomic_write_text(run_dir.tracker, f"{iteration}\n")
        if self.keep_last:
            for old in run_dir.checkpoints()[: -self.keep_last]:
                shutil.rmtree(run_dir.checkpoint(old), ignore_errors=True)
        return final


def load_trainer_state(root: str | os.PathLike, iteration: int | None = None) -> dict[str, Any]:
    """Iteration, samples, scaler, RNG states and config of a checkpoint (no tensors of the model)."""
    return torch.load(
        RunDir(root).checkpoint_path(iteration) / TRAINER_STATE, map_location="cpu", weights_only=False
    )


def checkpoint_description(root: str | os.PathLike, iteration: int | None = None) -> dict[str, Any]:
    """What a checkpoint says of itself: ``config`` (as ``RunConfig.to_dict``), ``tokenizer`` (its
    manifest entry, None for mock data) and ``iteration``. Checkpoints written before checkpoints
    described themselves are described by their run directory's config and manifest."""
    run_dir = RunDir(root)
    path = run_dir.checkpoint_path(iteration)
    if (path / DESCRIPTION).is_file():
        return json.loads((path / DESCRIPTION).read_text(encoding="utf-8"))
    manifest = json.loads(run_dir.manifest.read_text()) if run_dir.manifest.is_file() else {}
    return {
        "config": json.loads(run_dir.config.read_text(encoding="utf-8")),
        "tokenizer": manifest.get("tokenizer"),
        "iteration": int(path.name.removeprefix("iter_")),
    }


def load_checkpoint(root: str | os.PathLike, iteration: int | None = None) -> dict[str, Any]:
    """A checkpoint as plain full tensors in this process: ``model`` (name -> tensor) and the trainer
    state. For tools (inspect, convert, generate); training resumes shard by shard instead."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = RunDir(root).checkpoint_path(iteration)
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
    from safetensors.torch import save_file

    state = load_checkpoint(root, iteration)
    weights = {name: tensor.detach().contiguous().clone() for name, tensor in state["model"].items()}
    metadata = {"format": "pt", "iteration": str(state["iteration"]), "config": json.dumps(state["config"])}
    out = Path(out)
    with atomic_output(out) as tmp:
        save_file(weights, str(tmp), metadata=metadata)
    return out
