"""Run length, learning-rate and batch-size schedules, as functions of the step count (nothing to save but the count)."""

from __future__ import annotations

import math

from mtk.config import ConfigError, RunConfig, TrainConfig


def total_iterations(config: RunConfig) -> int:
    """Optimizer steps of the whole run."""
    train = config.train
    if train.train_iters is not None:
        return train.train_iters
    if train.train_samples is not None and not train.batch_size_ramp:
        return train.train_samples // train.global_batch_size
    raise ConfigError("give train_iters (or train_samples without a batch-size ramp)")


def split_sample_counts(config: RunConfig) -> tuple[int, int, int]:
    """Samples each split must provide for the whole run, as Megatron computes them."""
    train = config.train
    iters = total_iterations(config)
    largest_batch = max([train.global_batch_size, *(int(b) for _, b in train.batch_size_ramp or [])])
    train_samples = train.train_samples or iters * largest_batch
    evaluations = iters // train.eval_interval + 1 if train.eval_interval else 0
    return (
        train_samples,
        evaluations * train.eval_iters * train.global_batch_size,
        train.eval_iters * train.global_batch_size,
    )


def warmup_iters(config: TrainConfig, decay_iters: int) -> int:
    if config.lr_warmup_fraction is not None:
        return int(config.lr_warmup_fraction * decay_iters)
    if config.lr_warmup_samples is not None:
        return config.lr_warmup_samples // config.global_batch_size
    return config.lr_warmup_iters


def learning_rate(config: TrainConfig, step: int, total_iters: int) -> float:
    """Megatron's schedule at ``step`` optimizer steps taken: linear warmup from 0, then decay to min_lr.

    Decay runs over ``lr_decay_iters`` (default: the whole run); past it the rate stays at min_lr.
    """
    decay_iters = config.lr_decay_iters or total_iters
    warmup = warmup_iters(config, decay_iters)
    if warmup > 0 and step <= warmup:
        return config.lr * step / warmup
    if config.lr_decay_style == "constant":
        return config.lr
    if step > decay_iters:
        return config.min_lr
    ratio = (step - warmup) / max(decay_iters - warmup, 1)
    if config.lr_decay_style == "linear":
        coefficient = 1.0 - ratio
    else:
        coefficient = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return config.min_lr + (config.lr - config.min_lr) * coefficient


def global_batch_size(config: TrainConfig, consumed_tokens: int) -> int:
    """The global batch at this point of the run: the last ramp point reached, else the configured one."""
    if not config.batch_size_ramp:
        return config.global_batch_size
    size = int(config.batch_size_ramp[0][1])
    for tokens, batch in config.batch_size_ramp:
        if consumed_tokens >= tokens:
            size = int(batch)
    return size
