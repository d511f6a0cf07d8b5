"""FP8 (torchao, emulated on CPU): what a run gets, what is converted, and the amax monitor."""

from __future__ import annotations

import pytest
import torch

from mtk.config import ConfigError, apply_overrides
from mtk.models.gpt import SPEC
from mtk.parallel.apply import parallelize
from mtk.parallel.dims import ParallelDims
from mtk.parallel.fp8 import AmaxMonitor, plan_fp8
from mtk.presets import load_preset


def config(**overrides):
    return apply_overrides(
        load_preset("llama-tiny").sections, {"mock_data": True, "fp8": "hybrid", **overrides}
    )


def fp8_model(cfg):
    with torch.device("meta"):
        model = SPEC.build(cfg.model)
    return parallelize(model, SPEC, cfg, ParallelDims(1), None, "cpu")


def test_the_presets_carry_the_seed_recipe_and_megatron_defaults_stay():
    train = load_preset("llama3-8b").config.train
    assert (train.fp8, train.fp8_recipe, train.fp8_amax_history_len, train.fp8_amax_compute_algo) == (
        "hybrid", "delayed", 1024, "max",
    )  # fmt: skip
    default = apply_overrides({}, {}).train
    assert (default.fp8, default.fp8_recipe, default.fp8_amax_history_len, default.fp8_amax_compute_algo) == (
        None, "delayed", 1, "most_recent",
    )  # fmt: skip


def test_a_recipe_torchao_lacks_falls_back_out_loud_or_fails_when_strict():
    plan = plan_fp8(config(), "cpu")
    assert (plan.recipe, plan.requested_recipe, plan.backend, plan.emulated) == (
        "tensorwise",
        "delayed",
        "torchao",
        True,
    )
    assert "torchao has no delayed scaling: tensorwise current scaling instead" in plan.note
    assert "fallback" not in plan_fp8(config(fp8_recipe="rowwise"), "cpu").summary()
    assert plan_fp8(config(fp8_recipe="rowwise"), "cpu").note is None
    with pytest.raises(
        ConfigError, match="--fp8-recipe blockwise with --fp8-strict: torchao has no blockwise"
    ):
        plan_fp8(config(fp8_recipe="blockwise", fp8_strict=True), "cpu")
    with pytest.raises(ConfigError, match="--fp8-backend te: mtk does not drive Transformer Engine yet"):
        plan_fp8(config(fp8_backend="te"), "cpu")
    assert plan_fp8(config(fp8=None), "cpu") is None


@pytest.mark.parametrize(("fmt", "gradient"), [("hybrid", torch.float8_e5m2), ("e4m3", torch.float8_e4m3fn)])
def test_the_layers_linears_are_converted_and_nothing_else(fmt, gradient):
    model = fp8_model(config(fp8=fmt, fp8_recipe="tensorwise"))
    part = model.parts[0]
    converted = {name for name, m in part.named_modules() if type(m).__name__ == "Float8Linear"}
    assert converted == set(model.fp8.linears) and len(converted) == 2 * 7  # q k v out, fc1 gate fc2
    assert "output" not in converted  # the output layer stays in high precision
    layer = part.decoder.layers["0"].mlp.fc1
    assert layer.config.cast_config_input.target_dtype == torch.float8_e4m3fn
    assert layer.config.cast_config_grad_output.target_dtype == gradient


def test_first_and_last_layers_can_stay_out_of_fp8():
    model = fp8_model(config(num_layers=4, first_last_layers_bf16=True))
    layers = {name.split(".")[2] for name in model.fp8.linears}
    assert layers == {"1", "2"}


def test_fp8_is_really_applied_yet_close():
    """The same weights in fp32 and through FP8 casts: different outputs, within FP8's precision."""
    torch.manual_seed(0)
    plain = SPEC.build(config(fp8=None).model)
    fp8 = fp8_model(config(fp8_recipe="tensorwise")).parts[0]
    fp8.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, 4096, (2, 32))
    with torch.no_grad():
        a, b = plain(tokens), fp8(tokens)
    assert not torch.equal(a, b)
    assert ((a - b).norm() / a.norm()).item() < 0.1


def test_the_amax_monitor_names_the_linear_that_overflowed():
    model = fp8_model(config(fp8_recipe="tensorwise"))
    monitor = AmaxMonitor(model.parts, model.fp8.linears)
    part = model.parts[0]
    with torch.no_grad():
        part(torch.randint(0, 4096, (1, 16)))
        finite = monitor.take()
        assert 0 < finite["fp8_amax"] < 100 and finite["fp8_amax_at"].startswith("decoder.layers.")
        part.decoder.layers["1"].mlp.fc2.weight[3, 5] = float("inf")
        part(torch.randint(0, 4096, (1, 16)))
    assert monitor.take() == {"fp8_amax": float("inf"), "fp8_amax_at": "decoder.layers.1.mlp.fc2 weight"}
    assert monitor.take()["fp8_amax"] == 0.0  # each take starts a new interval


def test_fp8_hardware_needs_widths_in_multiples_of_16(monkeypatch):
    import mtk.parallel.fp8 as fp8

    monkeypatch.setattr(fp8, "_emulated", lambda device: False)  # as on an H100
    assert plan_fp8(config(), "cuda").emulated is False
    with pytest.raises(ConfigError, match="multiple of 16: ffn_hidden_size / TP = 88"):
        plan_fp8(config(tensor_model_parallel_size=2), "cuda")
