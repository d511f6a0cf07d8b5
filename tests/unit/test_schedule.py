"""Learning-rate and batch-size schedules against their closed forms."""

from __future__ import annotations

import math

import pytest

from mtk.config import TrainConfig
from mtk.train.schedule import global_batch_size, learning_rate


def test_warmup_then_cosine_to_min():
    config = TrainConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=10, lr_decay_style="cosine")
    assert learning_rate(config, 0, 110) == 0.0
    assert learning_rate(config, 5, 110) == pytest.approx(0.5)
    assert learning_rate(config, 10, 110) == pytest.approx(1.0)
    assert learning_rate(config, 60, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(math.pi * 0.5) + 1))
    assert learning_rate(config, 110, 110) == pytest.approx(0.1)
    assert learning_rate(config, 500, 110) == pytest.approx(0.1)


def test_linear_constant_and_warmup_fraction():
    linear = TrainConfig(
        lr=0.8, min_lr=0.0, lr_decay_style="linear", lr_decay_iters=100, lr_warmup_fraction=0.1
    )
    assert learning_rate(linear, 10, 1000) == pytest.approx(0.8)  # warmup = 0.1 * decay iters
    assert learning_rate(linear, 55, 1000) == pytest.approx(0.4)
    by_samples = TrainConfig(lr=1.0, lr_warmup_samples=640, global_batch_size=32, lr_decay_style="constant")
    assert learning_rate(by_samples, 10, 100) == pytest.approx(0.5)  # 640 samples = 20 steps of 32
    constant = TrainConfig(lr=0.3, lr_decay_style="constant")
    assert learning_rate(constant, 77, 100) == 0.3


def test_batch_size_ramp_by_consumed_tokens():
    config = TrainConfig(global_batch_size=1536, batch_size_ramp=[[0, 16], [2.4e9, 320], [4.8e9, 624]])
    assert global_batch_size(config, 0) == 16
    assert global_batch_size(config, int(2.4e9) - 1) == 16
    assert global_batch_size(config, int(2.4e9)) == 320
    assert global_batch_size(config, int(9e9)) == 624
    assert global_batch_size(TrainConfig(global_batch_size=64), 10**12) == 64
