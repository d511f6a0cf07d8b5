"""Run length, batch-size and learning-rate schedules, as functions of consumed samples.

Megatron counts both schedules in samples. The global batch size follows the samples consumed: a
staircase (``--step-batch-size-schedule``, ``train.batch_size_ramp``) or a linear ramp
(``--rampup-batch-size``, ``train.rampup_batch_size``). The learning rate follows the samples of the
updates applied (``OptimizerParamScheduler``, stepped by each update's global batch); lengths given
in iterations count ``global_batch_size`` samples each, as ``get_optimizer_param_scheduler`` converts
them. Nothing to save but the counts.
"""

from __future__ import annotations

import math

from mtk.config import ConfigError, RunConfig, TrainConfig


def global_batch_size(config: RunConfig, consumed_samples: int) -> int:
    """The global batch of the step that starts after ``consumed_samples`` samples: the one place
    the batch size per step is computed (training, its metrics and the run length follow it).

    A staircase gives the batch of the last point reached; its thresholds count tokens, which
    Megatron turns into samples with ``tokens // seq_length``. A linear ramp adds ``increment``
    every ``ramp_samples / ((global_batch_size - start) / increment)`` samples, and gives
    ``global_batch_size`` once more than ``ramp_samples`` are consumed (Megatron's
    ``RampupBatchsizeNumMicroBatchesCalculator``).
    """
    train = config.train
    if train.batch_size_ramp:
        size = int(train.batch_size_ramp[0][1])
        for tokens, batch in train.batch_size_ramp:
            if consumed_samples >= int(tokens) // config.model.seq_length:
                size = int(batch)
        return size
    if train.rampup_batch_size:
        start, increment, ramp_samples = train.rampup_batch_size
        increments = (train.global_batch_size - start) // increment
        if increments <= 0 or consumed_samples > ramp_samples:
            return train.global_batch_size
        return start + int(consumed_samples / (ramp_samples / increments)) * increment
    return train.global_batch_size


def _batch_changes(config: RunConfig) -> list[int]:
    """Consumed-sample counts, ascending, at which ``global_batch_size`` may change (none inside)."""
    train = config.train
    if train.batch_size_ramp:
        return sorted({int(tokens) // config.model.seq_length for tokens, _ in train.batch_size_ramp})
    if not train.rampup_batch_size:
        return []
    start, increment, ramp_samples = train.rampup_batch_size
    increments = (train.global_batch_size - start) // increment
    if increments <= 0:
        return []
    per_increment = ramp_samples / increments
    changes = []
    for step in range(1, increments + 1):
        # the first count whose int(count / per_increment) reaches ``step``, in the float arithmetic
        # global_batch_size uses
        first = math.ceil(step * per_increment)
        while int(first / per_increment) < step:
            first += 1
        while first > 0 and int((first - 1) / per_increment) >= step:
            first -= 1
        if first > ramp_samples:
            break
        changes.append(first)
    return [*changes, ramp_samples + 1]


def _steps_until(config: RunConfig, target: int) -> tuple[int, int]:
    """(steps, samples consumed) from the start of the run, stepping while fewer than ``target``
    samples are consumed."""
    steps = consumed = 0
    for boundary in [*_batch_changes(config), target]:
        boundary = min(boundary, target)
        if consumed >= boundary:
            continue
        batch = global_batch_size(config, consumed)  # constant up to the boundary
        count = -(-(boundary - consumed) // batch)
        steps, consumed = steps + count, consumed + count * batch
    return steps, consumed


def total_iterations(config: RunConfig) -> int:
    """Optimizer steps of the whole run: ``train_iters``, else from ``train_samples`` as Megatron's
    ``update_train_iters`` counts them (a staircase counts the partial last batch as a step; a
    linear ramp counts its ramp steps, then whole batches of ``global_batch_size``)."""
    train = config.train
    if train.train_iters is not None:
        return train.train_iters
    if train.train_samples is None:
        raise ConfigError("give train_iters or train_samples")
    if train.batch_size_ramp:
        return _steps_until(config, train.train_samples)[0]
    if train.rampup_batch_size:
        ramp_samples = train.rampup_batch_size[2]
        steps, consumed = _steps_until(config, min(ramp_samples, train.train_samples) + 1)
        return steps + max(train.train_samples - consumed, 0) // train.global_batch_size
    return train.train_samples // train.global_batch_size


def split_sample_counts(config: RunConfig) -> tuple[int, int, int]:
    """Samples each split must provide for the whole run, as Megatron computes them."""
    train = config.train
    iters = total_iterations(config)
    train_samples = train.train_samples or iters * max(train.batch_sizes())
    evaluations = iters // train.eval_interval + 1 if train.eval_interval else 0
    return (
        train_samples,
        evaluations * train.eval_iters * train.global_batch_size,
        train.eval_iters * train.global_batch_size,
    )


def schedule_samples(config: TrainConfig) -> tuple[float, int, int | None]:
    """(warmup, decay, WSD annealing) of the learning-rate schedule in samples, as Megatron's
    ``get_optimizer_param_scheduler`` converts them: a length in iterations counts
    ``global_batch_size`` samples each; decay defaults to the run (``train_iters`` x global batch,
    else ``train_samples``); ``lr_warmup_fraction`` is a share of the decay."""
    batch = config.global_batch_size
    if config.lr_decay_samples is not None:
        decay = config.lr_decay_samples
    elif config.lr_decay_iters is not None:
        decay = config.lr_decay_iters * batch
    elif config.train_iters is not None:
        decay = config.train_iters * batch
    elif config.train_samples is not None:
        decay = config.train_samples
    else:
        raise ConfigError("give train_iters or train_samples: the learning rate decays over the run")
    if config.lr_warmup_fraction is not None:
        warmup: float = config.lr_warmup_fraction * decay
    else:
        warmup = config.lr_warmup_samples or config.lr_warmup_iters * batch
    annealing = config.lr_wsd_decay_samples
    if annealing is None and config.lr_wsd_decay_iters is not None:
        annealing = config.lr_wsd_decay_iters * batch
    return warmup, decay, annealing


def learning_rate(config: TrainConfig, consumed_samples: int) -> float:
    """Megatron's ``OptimizerParamScheduler.get_lr`` after updates of ``consumed_samples`` samples:
    linear warmup from 0, then ``lr_decay_style`` down to ``min_lr`` by the end of the decay (min_lr
    after it; ``constant`` stays at lr; ``inverse-square-root`` falls as 1/sqrt(samples) from the
    end of warmup, never below min_lr; ``WSD`` holds lr, then anneals over its last
    ``lr_wsd_decay_*`` in ``lr_wsd_decay_style``).
    """
    warmup, decay, annealing = schedule_samples(config)
    if warmup > 0 and consumed_samples <= warmup:
        return config.lr * consumed_samples / warmup
    style = config.lr_decay_style
    if style == "constant":
        return config.lr
    if consumed_samples > decay:
        return config.min_lr
    if style == "inverse-square-root":
        rate = config.lr * max(warmup, 1) ** 0.5 / max(consumed_samples, 1) ** 0.5
        return max(config.min_lr, rate)
    ratio = (consumed_samples - warmup) / (decay - warmup)
    if style == "linear":
        coefficient = 1.0 - ratio
    elif style == "cosine":
        coefficient = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:  # WSD: stable at lr, then annealed over the end of the decay
        coefficient = _warmup_stable_decay(config, consumed_samples, decay, annealing)
    return config.min_lr + (config.lr - config.min_lr) * coefficient


def _warmup_stable_decay(
    config: TrainConfig, consumed_samples: int, decay: int, annealing: int | None
) -> float:
    """WSD's coefficient: 1 until the last ``annealing`` samples of the decay, then down to 0 in
    ``lr_wsd_decay_style``."""
    if annealing is None:
        raise ConfigError("lr_decay_style WSD needs --lr-wsd-decay-iters or --lr-wsd-decay-samples")
    anneal_start = decay - annealing
    if consumed_samples <= anneal_start:
        return 1.0
    ratio = (consumed_samples - anneal_start) / annealing
    style = config.lr_wsd_decay_style
    if style == "linear":
        return 1.0 - ratio
    if style == "cosine":
        return 0.5 * (math.cos(math.pi * ratio) + 1.0)
    if style == "exponential":
        return 2.0 * 0.5**ratio - 1.0
    return 1.0 - math.sqrt(ratio)  # minus_sqrt
