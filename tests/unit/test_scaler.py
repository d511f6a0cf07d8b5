"""The fp16 loss scaler against Megatron's DynamicGradScaler and ConstantGradScaler.

Reference: megatron/core/optimizer/grad_scaler.py of NVIDIA/Megatron-LM at commit
d98e8a64ddf34856e74b24714e3bedb2f5a39553 (growth 2, backoff 0.5, as megatron/core/optimizer/__init__.py
builds it for fp16). Expected scales below follow its rules step by step, written out by hand.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mtk.config import ConfigError, TrainConfig
from mtk.train.scaler import LossScaler

FP16 = TrainConfig(precision="fp16", initial_loss_scale=2.0**10, min_loss_scale=2.0**8, loss_scale_window=3,
                   hysteresis=2)  # fmt: skip


def scales_after(scaler: LossScaler, overflows: list[bool]) -> list[float]:
    scales = []
    for found_inf in overflows:
        scaler.update(found_inf)
        scales.append(scaler.scale)
    return scales


def test_megatron_defaults():
    train = TrainConfig()
    assert (train.initial_loss_scale, train.min_loss_scale, train.loss_scale_window, train.hysteresis) == (
        2.0**32, 1.0, 1000, 2,
    )  # fmt: skip
    assert train.loss_scale is None
    assert LossScaler(dataclasses.replace(train, precision="fp16")).scale == 2.0**32


def test_scale_halves_after_hysteresis_overflows_never_below_min_and_doubles_after_the_window():
    scaler = LossScaler(FP16)
    overflows = [True, True, True, True, True, False, False, False, True, False, False, False]
    expected = [
        1024,  # 1st overflow: hysteresis 2 -> 1, the scale stays
        512,  # 2nd: hysteresis spent, halved
        256,  # every further overflow halves ...
        256,  # ... never below min_loss_scale
        256,
        256,
        256,
        512,  # 3 (the window) overflow-free steps: doubled, hysteresis renewed
        512,  # so one overflow is tolerated again
        512,
        512,
        1024,  # the window counts from the last overflow
    ]
    assert scales_after(scaler, overflows) == expected


def test_good_steps_short_of_the_window_do_not_renew_the_hysteresis():
    scaler = LossScaler(FP16)
    assert scales_after(scaler, [True, False, False, True]) == [1024, 1024, 1024, 512]


def test_state_round_trip_continues_exactly():
    overflows = [True, False, True, True, False, False, False, True, False, False]
    straight = LossScaler(FP16)
    expected = scales_after(straight, overflows)
    first = LossScaler(FP16)
    scales = scales_after(first, overflows[:5])
    state = first.state_dict()
    assert all(isinstance(value, (int, float)) for value in state.values())  # what checkpoint.py admits
    resumed = LossScaler(dataclasses.replace(FP16, initial_loss_scale=2.0**20))  # the saved scale wins
    resumed.load_state_dict(state)
    assert scales + scales_after(resumed, overflows[5:]) == expected


def test_a_torch_grad_scaler_state_of_earlier_checkpoints_loads_with_the_whole_hysteresis():
    scaler = LossScaler(FP16)
    scaler.load_state_dict({"scale": 4096.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 1000,
                            "_growth_tracker": 2})  # fmt: skip
    assert scaler.scale == 4096.0 and scaler.growth_tracker == 2 and scaler.hysteresis_tracker == 2
    assert scales_after(scaler, [False, True, True]) == [8192, 8192, 4096]
    empty = LossScaler(FP16)
    empty.load_state_dict({})  # saved by a bf16 or fp32 run: the configured start
    assert empty.scale == 1024


def test_static_loss_scale_never_changes():
    scaler = LossScaler(dataclasses.replace(FP16, loss_scale=128.0))
    assert scales_after(scaler, [True, True, True, False, False, False]) == [128.0] * 6
    scaler.load_state_dict({"scale": 4.0, "growth_tracker": 0, "hysteresis_tracker": 2})
    assert scaler.scale == 128.0  # the configured value, as Megatron's ConstantGradScaler


def test_without_fp16_the_scaler_is_the_identity():
    scaler = LossScaler(TrainConfig(precision="bf16"))
    loss = torch.tensor(2.5)
    assert scaler.scale_loss(loss) is loss and scaler.scale == 1.0
    scaler.update(True)
    assert scaler.scale == 1.0 and scaler.state_dict() == {}


def test_unscale_divides_every_gradient_and_scale_loss_multiplies():
    scaler = LossScaler(FP16)
    weight = torch.nn.Parameter(torch.ones(3))
    frozen = torch.nn.Parameter(torch.ones(2))  # no gradient: left alone
    scaler.scale_loss((weight * torch.tensor([1.0, 2.0, 3.0])).sum()).backward()
    assert weight.grad.tolist() == [1024.0, 2048.0, 3072.0]
    scaler.unscale_([weight, frozen])
    assert weight.grad.tolist() == [1.0, 2.0, 3.0] and frozen.grad is None


@pytest.mark.parametrize(("key", "value"), [("min_loss_scale", 0.0), ("initial_loss_scale", float("inf")),
                                            ("hysteresis", 0), ("loss_scale_window", 0)])  # fmt: skip
def test_loss_scale_settings_are_range_checked(key, value):
    with pytest.raises(ConfigError, match=key):
        TrainConfig(**{key: value})


def test_a_minimum_above_the_initial_scale_is_refused_before_the_run():
    from mtk.config import apply_overrides, run_problems
    from mtk.models import family_spec
    from mtk.presets import load_preset

    config = apply_overrides(
        load_preset("gpt-tiny").sections, {"min_loss_scale": 8.0, "initial_loss_scale": 4.0}
    )
    messages = [problem.message for problem in run_problems(config, 1, family_spec("gpt"))]
    assert "min_loss_scale 8 is above initial_loss_scale 4" in messages
