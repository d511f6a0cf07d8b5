"""Set up a training run: inherit tokenizer facts from the data manifests, build data and model, run.

The run directory (``--save``) describes itself: ``config.json`` (effective config), ``mtk.json``
(stage manifest: inputs with hashes, command line), ``metrics.jsonl``, checkpoints, ``loss.png``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtk.config import ConfigError, RunConfig, validate_run
from mtk.manifest import (
    ManifestError,
    atomic_write_text,
    data_manifest_path,
    inherit,
    read_manifest,
    write_manifest,
)
from mtk.train.loop import Trainer, TrainingError, TrainOptions, TrainState, split_sample_counts
from mtk.train.metrics import MetricsLogger, device_peak_tflops, plot_loss


@dataclass
class DataFacts:
    """What the prepared data says about itself: vocabulary, eod, tokenizer, and its manifests."""

    vocab_size: int | None
    eod: int | None
    tokenizer: dict[str, Any] | None
    manifests: list[dict[str, Any]]


def data_facts(data: str) -> DataFacts:
    """Read the manifests of every prefix of ``data`` (a prefix or a blend); they must agree."""
    from mtk.data.blended import parse_blend

    manifests, identities = [], {}
    for _, prefix in parse_blend(data):
        path = data_manifest_path(prefix)
        if not path.is_file():
            continue  # e.g. data prepared by Megatron itself: the vocabulary must then be given
        manifest = read_manifest(path)
        manifests.append({"prefix": prefix, "path": str(path.resolve()), **manifest})
        tokenizer = manifest.get("tokenizer") or {}
        identities[prefix] = (
            manifest.get("vocab_size"),
            manifest.get("eod"),
            sorted(f.get("sha256", "") for f in tokenizer.get("files", [])),
        )
    if len({json.dumps(v) for v in identities.values()}) > 1:
        listing = "; ".join(f"{p}: vocab {v[0]}, eod {v[1]}" for p, v in identities.items())
        raise ManifestError(f"the datasets of the blend were prepared with different tokenizers ({listing})")
    if not manifests:
        return DataFacts(None, None, None, [])
    first = manifests[0]
    return DataFacts(first.get("vocab_size"), first.get("eod"), first.get("tokenizer"), manifests)


def resolve_vocab(config: RunConfig, facts: DataFacts | None, explicit_vocab: int | None) -> RunConfig:
    """The config with the vocabulary the data was prepared with; a conflicting explicit value is an error."""
    if facts is None:  # mock data: the preset's vocabulary unless given
        vocab = explicit_vocab or config.model.vocab_size
    else:
        source = facts.manifests[0]["path"] if facts.manifests else "the data"
        vocab = inherit("--vocab-size", facts.vocab_size, explicit_vocab, source)
        if vocab is None:
            raise ConfigError("the data has no mtk manifest (prepared elsewhere?): give --vocab-size")
    if vocab is None:
        raise ConfigError("the vocabulary size is unknown: give --vocab-size")
    config.model.vocab_size = vocab
    return config


def build_datasets(
    config: RunConfig, data: str | None, facts: DataFacts | None, cache_dir: Path | None
) -> tuple:
    train = config.train
    counts = split_sample_counts(config)
    if data is None:
        from mtk.data.mock import MockGPTDataset

        return tuple(
            MockGPTDataset(count, config.model.seq_length, config.model.vocab_size, train.seed + i)
            if count
            else None
            for i, count in enumerate(counts)
        )
    from mtk.data.blended import build_blended_datasets

    return build_blended_datasets(
        data,
        train.split,
        counts,
        config.model.seq_length,
        train.seed,
        cache_dir=cache_dir,
        eod=facts.eod if facts else None,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_resumable(config: RunConfig, options: TrainOptions) -> None:
    """A checkpoint of another model shape would fail deep in load_state_dict; say so plainly instead."""
    for root in (options.load, options.save):
        saved = root / "config.json" if root is not None else None
        if saved is not None and saved.is_file() and any(root.glob("iter_*")):
            previous = json.loads(saved.read_text())["model"]
            current = config.to_dict()["model"]
            changed = {k: (previous.get(k), v) for k, v in current.items() if previous.get(k) != v}
            if changed:
                detail = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
                raise ConfigError(
                    f"{root} holds checkpoints of another model ({detail}); use a new --save directory"
                )
            return


def run_training(
    config: RunConfig,
    options: TrainOptions,
    data: str | None = None,
    explicit_vocab: int | None = None,
    cache_dir: Path | None = None,
    show: Any = None,
) -> TrainState:
    """Train ``config`` on ``data`` (a prefix or blend; None = mock data) into ``options.save``.

    Under torchrun every rank calls this and holds its part of the model (``mtk.parallel``); every
    rank writes its checkpoint shards, only rank 0 the run description, metrics and plot.
    """
    from mtk.models.gpt import GPTModel
    from mtk.parallel.apply import parallelize
    from mtk.parallel.dims import ParallelDims
    from mtk.parallel.distributed import barrier, init_distributed

    env = init_distributed(options.device, options.timeout_minutes)
    facts = data_facts(data) if data is not None else None
    config = resolve_vocab(config, facts, explicit_vocab)
    dims = ParallelDims.from_config(config, env.world_size)
    dims.validate(config)
    validate_run(config, dims.dp)
    if config.model.family != "gpt":
        raise ConfigError(
            f"`mtk train` supports the gpt family so far; {config.model.family} is not trained yet"
        )
    check_resumable(config, options)
    seed_everything(config.train.seed)
    datasets = build_datasets(config, data, facts, cache_dir)
    mesh = dims.build_mesh(env.device.split(":")[0]) if env.world_size > 1 else None
    # described on the meta device, cut to this rank's stages and shards, then allocated: initial
    # weights are drawn per parameter from the seed, the same in every layout
    with torch.device("meta"):
        model = GPTModel(config.model)
    model = parallelize(model, dims, mesh, config.parallel, env.device, seed=config.train.seed)
    options.device, options.dp_size = env.device, dims.dp
    options.dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    trainer = Trainer(config, model, datasets, options)
    if env.is_main:
        write_run_description(config, options, data, facts)
    barrier()
    peak = device_peak_tflops(config.train.precision, options.device)
    logger = MetricsLogger(
        options.save, options.tensorboard_dir, peak, options.device, show, enabled=env.is_main
    )
    logger.message(
        f"{config.model.num_parameters():,} parameters, {trainer.iters} iterations on "
        f"{env.world_size} x {options.device}, {'mock data' if data is None else data}"
    )
    try:
        if trainer.resume():
            logger.message(
                f"resumed from iteration {trainer.state.iteration} ({trainer.state.consumed_samples:,} samples)"
            )
        state = trainer.run(logger)
    except RuntimeError as err:  # torch.distributed's errors (DistBackendError ...) are RuntimeErrors
        if env.world_size > 1 and "timed out" in str(err).lower():
            raise TrainingError(
                f"rank {env.rank}: {trainer.phase} did not complete within {options.timeout_minutes:g} minutes "
                f"({str(err).strip().splitlines()[0]}); another rank is stuck or died, so this job stops "
                "instead of hanging. Resume from the last checkpoint once the cause is fixed."
            ) from None
        raise
    finally:
        logger.close()
    if env.is_main:
        plot_loss(options.save)
    return state


def write_run_description(
    config: RunConfig, options: TrainOptions, data: str | None, facts: DataFacts | None
) -> None:
    """``config.json`` and the stage manifest ``mtk.json`` of the run directory."""
    options.save.mkdir(parents=True, exist_ok=True)
    atomic_write_text(options.save / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    write_manifest(
        options.save / "mtk.json",
        stage="train",
        data=data,
        mock_data=data is None,
        inputs=[
            {"prefix": m["prefix"], "manifest": m["path"], "outputs": m.get("outputs", [])}
            for m in (facts.manifests if facts else [])
        ],
        tokenizer=facts.tokenizer if facts else None,
        parameters=config.model.num_parameters(),
    )


__all__ = ["run_training", "TrainingError", "TrainOptions", "data_facts", "resolve_vocab"]
