"""Batch-size, run-length and learning-rate schedules against Megatron-LM's formulas.

The references below are transcriptions, written here, of Megatron-LM at commit d98e8a64dd
(megatron/core/optimizer_param_scheduler.py ``OptimizerParamScheduler.get_lr``,
megatron/training/training.py ``get_optimizer_param_scheduler`` and ``update_train_iters``,
megatron/core/num_microbatches_calculator.py ``StepBatchsizeNumMicroBatchesCalculator``), and of
``RampupBatchsizeNumMicroBatchesCalculator`` and the ramp-up ``update_train_iters`` at 0b9bc2088b,
the last commit before Megatron replaced ``--rampup-batch-size`` with step schedules. The learning
rates are also checked against values worked out by hand.
"""

from __future__ import annotations

import math

import pytest

from mtk.config import ConfigError, RunConfig, TrainConfig, apply_overrides, parse_step_batch_size_schedule
from mtk.presets import load_preset
from mtk.train.schedule import global_batch_size, learning_rate, schedule_samples, total_iterations

GPT3_SCHEDULE = "0:16 2.4B:320 4.8B:624 7.2B:928 9.6B:1232 12B:1536"


def run(seq_length: int = 2048, **train) -> RunConfig:
    return apply_overrides({"model": {"seq_length": seq_length}}, train)


# ---- Megatron's code, transcribed -----------------------------------------------------------------


def megatron_rampup_batch(start: int, increment: int, ramp_samples: int, final: int, consumed: int) -> int:
    """RampupBatchsizeNumMicroBatchesCalculator.update (0b9bc2088b)."""
    per_increment = ramp_samples / ((final - start) // increment)
    if consumed > ramp_samples:
        return final
    return start + int(consumed / per_increment) * increment


def megatron_step_batch(schedule: str, seq_length: int, consumed: int) -> int:
    """StepBatchsizeNumMicroBatchesCalculator: tokens -> samples by // seq_length, last threshold reached."""
    points = sorted(
        (threshold // seq_length, batch) for threshold, batch in parse_step_batch_size_schedule(schedule)
    )
    size = points[0][1]
    for threshold, batch in points:
        if consumed >= threshold:
            size = batch
    return size


def megatron_step_iterations(schedule: str, seq_length: int, train_samples: int) -> int:
    """update_train_iters with a step schedule (d98e8a64dd): steps until train_samples are consumed."""
    iterations = consumed = 0
    while consumed < train_samples:
        consumed += megatron_step_batch(schedule, seq_length, consumed)
        iterations += 1
    return iterations


def megatron_rampup_iterations(ramp: list[int], final: int, train_samples: int) -> int:
    """update_train_iters with --rampup-batch-size (0b9bc2088b): the ramp step by step, then whole batches."""
    iterations = consumed = 0
    while consumed <= ramp[2] and consumed <= train_samples:
        consumed += megatron_rampup_batch(*ramp, final, consumed)
        iterations += 1
    if train_samples > consumed:
        iterations += (train_samples - consumed) // final
    return iterations


def megatron_lr(max_lr, min_lr, warmup, decay, style, num_steps, wsd_decay=None, wsd_style=None) -> float:
    """OptimizerParamScheduler.get_lr (d98e8a64dd), init_lr 0; steps count samples."""
    if warmup > 0 and num_steps <= warmup:
        return max_lr * float(num_steps) / float(warmup)
    if style == "constant":
        return max_lr
    if num_steps > decay:
        return min_lr
    if style == "inverse-square-root":
        return max(min_lr, max_lr * max(warmup, 1) ** 0.5 / (max(num_steps, 1) ** 0.5))
    ratio = float(num_steps - warmup) / float(decay - warmup)
    if style == "linear":
        coeff = 1.0 - ratio
    elif style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:
        start = decay - wsd_decay
        if num_steps <= start:
            coeff = 1.0
        else:
            wsd_ratio = float(num_steps - start) / float(wsd_decay)
            coeff = {
                "linear": 1.0 - wsd_ratio,
                "cosine": 0.5 * (math.cos(math.pi * wsd_ratio) + 1.0),
                "exponential": 2.0 * math.pow(0.5, wsd_ratio) - 1.0,
                "minus_sqrt": 1.0 - math.sqrt(wsd_ratio),
            }[wsd_style]
    return min_lr + coeff * (max_lr - min_lr)


# ---- batch size -----------------------------------------------------------------------------------


def test_linear_rampup_as_megatron():
    """--rampup-batch-size 16 16 5859375 to 1536: +16 every 5859375 / 95 = 61677.6 samples."""
    config = run(global_batch_size=1536, rampup_batch_size=[16, 16, 5859375])
    at = {0: 16, 61_677: 16, 61_678: 32, 1_000_000: 272, 5_859_375: 1536, 5_859_376: 1536}
    assert {consumed: global_batch_size(config, consumed) for consumed in at} == at
    for consumed in [*range(0, 6_000_000, 997), *range(61_600, 62_000), *range(5_859_000, 5_859_500)]:
        assert global_batch_size(config, consumed) == megatron_rampup_batch(16, 16, 5859375, 1536, consumed)
    uneven = run(global_batch_size=100, rampup_batch_size=[4, 8, 1000])  # per increment 1000 / 12 = 83.3
    for consumed in range(0, 1100):
        assert global_batch_size(uneven, consumed) == megatron_rampup_batch(4, 8, 1000, 100, consumed)


def test_step_schedule_counts_tokens_turned_into_samples():
    """Megatron compares consumed samples with tokens // seq_length (floor), for any sequence length."""
    gpt3 = load_preset("gpt3-175b").config
    assert gpt3.train.batch_size_ramp == parse_step_batch_size_schedule(GPT3_SCHEDULE)
    assert [global_batch_size(gpt3, s) for s in (0, 1_171_874, 1_171_875, 5_859_374, 5_859_375, 10**9)] == [
        16,
        16,
        320,
        1232,
        1536,
        1536,
    ]  # fmt: skip  (2.4B / 2048 = 1171875 samples)
    odd = run(seq_length=1000, global_batch_size=8, batch_size_ramp="0:2 2500:4 7.5K:8")
    assert [global_batch_size(odd, s) for s in (1, 2, 6, 7)] == [
        2,
        4,
        4,
        8,
    ]  # 2500 // 1000 = 2, 7500 // 1000 = 7
    for seq_length in (1000, 2048, 4096):
        config = run(seq_length=seq_length, global_batch_size=1536, batch_size_ramp=GPT3_SCHEDULE)
        for consumed in range(0, 13 * 10**9 // seq_length, 9973):
            assert global_batch_size(config, consumed) == megatron_step_batch(
                GPT3_SCHEDULE, seq_length, consumed
            )


def test_step_schedule_string_and_list_forms_are_one_schedule():
    as_list = [[0, 16], [2.4e9, 320], [4.8e9, 624], [7.2e9, 928], [9.6e9, 1232], [12e9, 1536]]
    listed = run(global_batch_size=1536, batch_size_ramp=as_list)
    written = run(global_batch_size=1536, batch_size_ramp=GPT3_SCHEDULE)
    assert written.train.batch_size_ramp == [[int(tokens), batch] for tokens, batch in as_list]
    for consumed in range(0, 6_000_000, 4999):
        assert global_batch_size(listed, consumed) == global_batch_size(written, consumed)
    # suffixes in either case, commas, entries in any order: Megatron sorts them
    assert parse_step_batch_size_schedule("1.5k:8, 0:4 2m:16 1T:32 3b:24") == [
        [0, 4], [1500, 8], [2_000_000, 16], [3_000_000_000, 24], [10**12, 32]]  # fmt: skip


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ("0:16 2.4B", "expected THRESHOLD:BATCH"),
        ("0:16 2.4X:320", "'2.4X' is not a number"),
        ("0:16 inf:32", "'INF' is not a number"),
        ("", "no THRESHOLD:BATCH entry"),
        ("1M:16 2M:32", "the first at 0"),
        ("0:16 1M:32 1000K:64", "each above the one before"),
        ("0:0", "global_batch_size from 1"),
    ],
)
def test_malformed_step_schedules_are_refused(schedule, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(batch_size_ramp=schedule)


@pytest.mark.parametrize("ramp", [[16, 16], [16, 16, 100, 4], [0, 16, 100], [16, 0, 100], [16, 16, 0]])
def test_malformed_rampups_are_refused(ramp):
    with pytest.raises(ConfigError, match="'rampup_batch_size'.*START INCREMENT SAMPLES"):
        TrainConfig(rampup_batch_size=ramp)


def test_batch_sizes_hold_every_batch_the_schedule_gives():
    """check_run and mtk plan validate ``TrainConfig.batch_sizes()``: every batch of the run is one of them."""
    for config in (
        run(global_batch_size=1536, rampup_batch_size=[16, 16, 5859375]),
        run(global_batch_size=1536, batch_size_ramp=GPT3_SCHEDULE),
        run(global_batch_size=64),
    ):
        given = {global_batch_size(config, consumed) for consumed in range(0, 7_000_000, 1013)}
        assert given <= set(config.train.batch_sizes()) and max(given) == config.train.global_batch_size
    assert run(global_batch_size=64, rampup_batch_size=[16, 16, 100]).train.batch_sizes() == [16, 32, 48, 64]


# ---- run length -----------------------------------------------------------------------------------


def test_sample_based_run_lengths_as_megatron():
    assert (
        total_iterations(run(global_batch_size=32, train_samples=1000)) == 31
    )  # the partial batch is dropped
    assert total_iterations(run(global_batch_size=32, train_iters=7)) == 7
    for samples in (1, 100, 61_678, 1_000_000, 5_859_375, 5_859_376, 9_000_001):
        ramp = run(global_batch_size=1536, rampup_batch_size=[16, 16, 5859375], train_samples=samples)
        assert total_iterations(ramp) == megatron_rampup_iterations([16, 16, 5859375], 1536, samples), samples
    for seq_length, samples in [(2048, 1), (2048, 1_171_875), (2048, 9_000_001), (1000, 12_345_678)]:
        steps = run(seq_length, global_batch_size=1536, batch_size_ramp=GPT3_SCHEDULE, train_samples=samples)
        assert total_iterations(steps) == megatron_step_iterations(GPT3_SCHEDULE, seq_length, samples)
    uneven = run(global_batch_size=100, rampup_batch_size=[4, 8, 1000], train_samples=5000)
    assert total_iterations(uneven) == megatron_rampup_iterations([4, 8, 1000], 100, 5000)


# ---- learning rate --------------------------------------------------------------------------------


def test_iteration_lengths_count_global_batches_of_samples():
    """Iteration-based: warmup 10 x 4 = 40 samples, decay over the run, 100 x 4 = 400 samples (by hand)."""
    config = TrainConfig(lr=1.0, min_lr=0.1, global_batch_size=4, train_iters=100, lr_warmup_iters=10,
                         lr_decay_style="cosine")  # fmt: skip
    assert schedule_samples(config) == (40, 400, None)
    assert learning_rate(config, 0) == 0.0
    assert learning_rate(config, 20) == pytest.approx(0.5)
    assert learning_rate(config, 40) == pytest.approx(1.0)
    assert learning_rate(config, 220) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 x 0.5
    assert learning_rate(config, 400) == pytest.approx(0.1)
    assert learning_rate(config, 401) == 0.1


def test_sample_lengths_decay_over_train_samples_not_whole_batches():
    """Sample-based: decay over train_samples 1000 (not 31 x 32 = 992), warmup 100 samples (by hand)."""
    config = TrainConfig(lr=0.8, min_lr=0.0, global_batch_size=32, train_samples=1000, lr_warmup_samples=100,
                         lr_decay_style="linear")  # fmt: skip
    assert schedule_samples(config) == (100, 1000, None)
    assert learning_rate(config, 50) == pytest.approx(0.4)
    assert learning_rate(config, 550) == pytest.approx(0.4)  # (550 - 100) / 900 = 0.5 of the decay
    assert learning_rate(config, 992) == pytest.approx(0.8 * 8 / 900)
    shorter = TrainConfig(lr=0.8, global_batch_size=32, train_samples=1000, lr_decay_samples=500,
                          lr_decay_style="linear")  # fmt: skip
    assert learning_rate(shorter, 250) == pytest.approx(0.4)
    assert learning_rate(shorter, 501) == 0.0


def test_warmup_fraction_is_a_share_of_the_decay_in_samples():
    """Megatron keeps the fraction's samples as a float: 0.015 x 100 iterations x 8 = 12 samples, so the
    first step of 8 samples is at 8/12 of the peak (an iteration count would round the warmup to 1 step)."""
    config = TrainConfig(lr=0.9, global_batch_size=8, train_iters=1000, lr_decay_iters=100,
                         lr_warmup_fraction=0.015, lr_decay_style="linear")  # fmt: skip
    warmup, decay, _ = schedule_samples(config)
    assert (warmup, decay) == (pytest.approx(12.0), 800)
    assert learning_rate(config, 8) == pytest.approx(0.6)
    assert learning_rate(config, 801) == 0.0


def test_inverse_square_root_and_constant():
    config = TrainConfig(lr=1.0, min_lr=0.05, global_batch_size=10, train_samples=10_000, lr_warmup_samples=100,
                         lr_decay_style="inverse-square-root")  # fmt: skip
    assert learning_rate(config, 50) == pytest.approx(0.5)  # warmup
    assert learning_rate(config, 400) == pytest.approx(0.5)  # sqrt(100 / 400)
    assert learning_rate(config, 10_000) == pytest.approx(0.1)  # sqrt(100 / 10000)
    assert learning_rate(config, 10_001) == 0.05  # past the decay
    floor = TrainConfig(lr=1.0, min_lr=0.2, train_samples=10_000, lr_decay_style="inverse-square-root")
    assert learning_rate(floor, 0) == 1.0 and learning_rate(floor, 10_000) == 0.2  # never below min_lr
    constant = TrainConfig(lr=0.3, train_iters=100, lr_warmup_iters=10, global_batch_size=2,
                           lr_decay_style="constant")  # fmt: skip
    assert learning_rate(constant, 10) == pytest.approx(0.15) and learning_rate(constant, 10**6) == 0.3


@pytest.mark.parametrize(
    ("style", "at_900"),
    [("exponential", 2 * 0.5**0.5 - 1), ("linear", 0.5), ("cosine", 0.5), ("minus_sqrt", 1 - 0.5**0.5)],
)
def test_warmup_stable_decay(style, at_900):
    """WSD: 100 samples of warmup, lr until the last 200 of 1000 samples, then annealed (by hand at 900)."""
    for lengths in ({"lr_warmup_iters": 10, "lr_wsd_decay_iters": 20}, {"lr_wsd_decay_samples": 200}):
        config = TrainConfig(lr=1.0, global_batch_size=10, train_iters=100, lr_decay_style="WSD",
                             lr_wsd_decay_style=style, **lengths)  # fmt: skip
        assert schedule_samples(config)[1:] == (1000, 200)
        assert learning_rate(config, 500) == 1.0 and learning_rate(config, 800) == 1.0
        assert learning_rate(config, 900) == pytest.approx(at_900)
        assert learning_rate(config, 1000) == pytest.approx(0.0)
    assert TrainConfig().lr_wsd_decay_style == "exponential"  # Megatron's default
    with pytest.raises(ConfigError, match="WSD needs"):
        learning_rate(TrainConfig(train_iters=10, lr_decay_style="WSD"), 5)


def test_every_style_follows_megatrons_scheduler():
    """Sample by sample against the transcription, iteration- and sample-based, every decay style."""
    base = {"lr": 0.7, "min_lr": 0.07, "global_batch_size": 6}
    lengths = [
        ({"train_iters": 50, "lr_warmup_iters": 5}, (30, 300)),
        ({"train_iters": 50, "lr_decay_iters": 40, "lr_warmup_fraction": 0.05}, (0.05 * 240, 240)),
        ({"train_samples": 301, "lr_warmup_samples": 17}, (17, 301)),
        ({"train_samples": 301, "lr_decay_samples": 250, "lr_warmup_fraction": 0.1}, (25.0, 250)),
    ]
    for style in ("constant", "linear", "cosine", "inverse-square-root", "WSD"):
        for run_length, (warmup, decay) in lengths:
            wsd = {"lr_wsd_decay_samples": 60, "lr_wsd_decay_style": "cosine"} if style == "WSD" else {}
            config = TrainConfig(**base, **run_length, **wsd, lr_decay_style=style)
            for consumed in range(0, 320):
                expected = megatron_lr(0.7, 0.07, warmup, decay, style, consumed, 60, "cosine")
                assert learning_rate(config, consumed) == pytest.approx(expected), (
                    style,
                    run_length,
                    consumed,
                )
