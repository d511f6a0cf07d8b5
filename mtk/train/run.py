"""Set up a training run: inherit tokenizer facts from the data manifests, build data and model, run.

The run directory (``--save``, see ``mtk.checkpoint.RunDir``) describes itself: the effective config,
the stage manifest (inputs with hashes, command line), metrics, checkpoints, the loss curve.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
from typing import Any

import numpy as np
import torch

from mtk.checkpoint import CheckpointError, RunDir
from mtk.config import MAX_SAMPLES, ConfigError, ModelConfig, RunConfig, check_run, check_value
from mtk.data.prepared import DataFacts, check_token_ids, data_facts
from mtk.manifest import atomic_write_text, inherit, write_manifest
from mtk.models import family_spec
from mtk.train.build import build_model, check_config
from mtk.train.loop import Trainer, TrainingError, TrainOptions, TrainState
from mtk.train.metrics import MetricsLogger, device_peak_tflops, plot_loss
from mtk.train.schedule import split_sample_counts


def resolve_vocab(config: RunConfig, facts: DataFacts | None, explicit_vocab: int | None) -> RunConfig:
    """The config with the vocabulary the data was prepared with; a conflicting explicit value is an error."""
    if explicit_vocab is not None:
        check_value(ModelConfig, "vocab_size", explicit_vocab, "--vocab-size")
    if facts is None:  # mock data: the preset's vocabulary unless given
        vocab = config.model.vocab_size if explicit_vocab is None else explicit_vocab
    else:
        source = facts.manifests[0]["path"] if facts.manifests else "the data"
        vocab = inherit("--vocab-size", facts.vocab_size, explicit_vocab, source)
        if vocab is None:
            raise ConfigError("the data has no mtk manifest (prepared elsewhere?): give --vocab-size")
    if vocab is None:
        raise ConfigError("the vocabulary size is unknown: give --vocab-size")
    config.model = dataclasses.replace(config.model, vocab_size=vocab)  # checked against its range
    return config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_resumable(config: RunConfig, options: TrainOptions) -> None:
    """A checkpoint of another model shape would fail deep in load_state_dict; say so plainly instead."""
    for root in (options.load, options.save):
        if root is None:
            continue
        run_dir = RunDir(root)
        if run_dir.config.is_file() and run_dir.checkpoints():
            previous = RunConfig.from_json_file(run_dir.config).to_dict()["model"]
            current = config.to_dict()["model"]
            changed = {k: (previous.get(k), v) for k, v in current.items() if previous.get(k) != v}
            if changed:
                detail = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
                raise ConfigError(
                    f"{root} holds checkpoints of another model ({detail}); use a new --save directory"
                )
            return


def run_training(
    config: RunConfig, options: TrainOptions, explicit_vocab: int | None = None, show: Any = None
) -> TrainState:
    """Train ``config`` on its data (``config.data``) into ``options.save``.

    Under torchrun every rank calls this and holds its part of the model (``mtk.parallel``); every
    rank writes its checkpoint shards, only rank 0 the run description, metrics and plot.
    """
    from mtk.collectives import any_rank
    from mtk.parallel.distributed import init_distributed, shutdown_distributed

    env = init_distributed(options.device, options.timeout_minutes)
    data = config.data
    facts = data_facts(data.data_path) if data.data_path is not None else None
    config = resolve_vocab(config, facts, explicit_vocab)
    if data.data_path is not None:
        check_token_ids(data.data_path, config.model.vocab_size, data.data_cache_path)
    family = family_spec(config.model.family)
    check_run(config, env.world_size, family)
    counts = split_sample_counts(config)
    if sum(counts) > MAX_SAMPLES:
        raise ConfigError(
            f"the run would read {sum(counts):,} samples (train, validation, test: {', '.join(map(str, counts))}), "
            f"more than {MAX_SAMPLES:,}; lower --train-iters or --train-samples, --global-batch-size, or "
            "--eval-iters"
        )
    family = check_config(config, env.world_size, env.device)  # the builder's checks (check_fits ...)
    check_resumable(config, options)
    run_dir = RunDir(options.save)
    with contextlib.ExitStack() as held:
        refused = None
        if env.is_main:  # one holder per job: rank 0
            try:
                held.enter_context(run_dir.lock())
            except CheckpointError as err:
                refused = err
        if any_rank(refused is not None):
            raise refused or CheckpointError(f"{run_dir.root} is in use by another run")
        state = _train(config, options, env, family, facts, counts, run_dir, show)
    shutdown_distributed()
    return state


def _train(config, options, env, family, facts, counts, run_dir: RunDir, show) -> TrainState:
    from mtk.collectives import barrier

    seed_everything(config.train.seed)
    datasets = family.datasets(config, counts, facts)
    # described on the meta device, cut to this rank's stages and shards, then allocated: initial
    # weights are drawn per parameter from the seed, the same in every layout (checked above)
    model = build_model(config, env.device, env.world_size, check=False).model
    mesh = model.mesh
    options.device, options.dp_size = env.device, model.dims.dp
    options.dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    trainer = Trainer(config, model, datasets, options, tokenizer=facts.tokenizer if facts else None)
    if env.is_main:
        fp8 = model.fp8.describe() if model.fp8 is not None else None
        compiled = model.compiled.describe() if model.compiled is not None else None
        write_run_description(
            config, run_dir, facts, family.num_parameters(config.model), fp8=fp8, compile=compiled
        )
    barrier()
    peak = device_peak_tflops(config.train.precision, options.device)
    logger = MetricsLogger(run_dir, options.tensorboard_dir, peak, options.device, show, enabled=env.is_main)
    data = config.data
    logger.message(
        f"{family.num_parameters(config.model):,} parameters, {trainer.iters} iterations on "
        f"{env.world_size} x {options.device}, {'mock data' if data.mock_data else data.data_path}"
    )
    if model.fp8 is not None:
        logger.message(model.fp8.summary())
    if model.compiled is not None:
        logger.message(model.compiled.summary())
        model.compiled.warn = logger.message  # a recompile storm, named, in the log
    try:
        resumed = trainer.resume()
        for warning in trainer.checkpointer.warnings:
            logger.message(f"warning: {warning}")
        if resumed:
            logger.message(
                f"resumed from iteration {trainer.state.iteration} ({trainer.state.consumed_samples:,} samples)"
            )
        logger.forget_after(trainer.state.iteration)  # replayed iterations are logged once
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
        plot_loss(run_dir.root)
    return state


def write_run_description(
    config: RunConfig, run_dir: RunDir, facts: DataFacts | None, parameters: int, **extra: Any
) -> None:
    """The effective config and the stage manifest of the run directory."""
    run_dir.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir.config, json.dumps(config.to_dict(), indent=2) + "\n")
    write_manifest(
        run_dir.manifest,
        stage="train",
        data=config.data.data_path,
        mock_data=config.data.mock_data,
        inputs=[
            {"prefix": m["prefix"], "manifest": m["path"], "outputs": m.get("outputs", [])}
            for m in (facts.manifests if facts else [])
        ],
        tokenizer=facts.tokenizer if facts else None,
        parameters=parameters,
        **extra,
    )


def save_weights_checkpoint(
    config: RunConfig, model: torch.nn.Module, save: str | os.PathLike, tokenizer: dict[str, Any] | None
) -> None:
    """An iteration-0 checkpoint of ``model``'s weights in run directory ``save`` (``mtk checkpoint
    import-hf``), without building a trainer: no optimizer state (``Checkpointer`` without optimizers),
    and the trainer state of a run that has not started (the loss scaler of ``config``, this process's
    RNG). ``mtk train --load`` resumes from it with a fresh optimizer; generate and export read it as
    any checkpoint."""
    from mtk.checkpoint import Checkpointer, rng_state
    from mtk.train.scaler import LossScaler

    start = {name: value for name, value in dataclasses.asdict(TrainState()).items() if name != "losses"}
    trainer_state = {
        "scaler": LossScaler(config.train).state_dict(),
        **start,
        "rng": [rng_state()],  # as every rank's list (one rank)
        "config": config.to_dict(),
    }
    checkpointer = Checkpointer(
        RunDir(save), [model], [], {"config": config.to_dict(), "tokenizer": tokenizer}
    )
    checkpointer.save(0, trainer_state)
    checkpointer.finish()


__all__ = ["run_training", "save_weights_checkpoint", "TrainingError", "TrainOptions", "resolve_vocab"]
