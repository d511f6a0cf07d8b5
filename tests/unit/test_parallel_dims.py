"""Parallel layouts are validated up front with messages that say what to change."""

from __future__ import annotations

import pytest

from mtk.config import ConfigError, apply_overrides, validate_run
from mtk.parallel.dims import ParallelDims
from mtk.presets import load_preset


def config(name, **overrides):
    return apply_overrides(load_preset(name).sections, overrides)


def test_seed_recipe_layouts_are_valid():
    # (preset, world size): the recipes' own layouts
    for name, world in [
        ("gpt3-175b", 8 * 16),
        ("bert-20b", 16),
        ("llama3-8b", 8),
        ("llama3-70b", 64),
        ("llama3-405b", 1024),
    ]:
        cfg = config(name, train_iters=1)
        dims = ParallelDims.from_config(cfg, world)
        dims.validate(cfg)
        validate_run(cfg, dims.dp)  # batch sizes (and the GPT-3 ramp) fit micro batch x DP
    llama405 = ParallelDims.from_config(config("llama3-405b"), 1024)
    assert (llama405.tp, llama405.pp, llama405.cp, llama405.vp, llama405.dp) == (8, 8, 2, 8, 8)
    assert llama405.mesh_shape() == (8, 8, 2, 8)


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        ({"tensor_model_parallel_size": 3}, 3, "num_attention_heads 4 is not divisible by TP 3"),
        ({"pipeline_model_parallel_size": 4}, 4, "num_layers 2 is not divisible by PP x VP = 4 x 1"),
        ({"context_parallel_size": 3}, 3, "seq_length 128 is not divisible by 2 x CP = 6"),
        ({"tensor_model_parallel_size": 2}, 3, "world size 3 is not a multiple of TP x PP x CP"),
        ({"virtual_pipeline_model_parallel_size": 2}, 1, "need pipeline parallelism"),
    ],
)
def test_invalid_layouts_are_rejected_with_the_fix(overrides, world, message):
    cfg = config("gpt-tiny", **overrides)
    with pytest.raises(ConfigError, match="parallel layout rejected") as err:
        ParallelDims.from_config(cfg, world).validate(cfg)
    assert message in str(err.value)


def test_global_batch_must_divide_by_micro_batch_times_dp():
    cfg = config("gpt-tiny", global_batch_size=12, micro_batch_size=4)
    dims = ParallelDims.from_config(cfg, 2)
    dims.validate(cfg)  # the layout itself is fine ...
    with pytest.raises(
        ConfigError,
        match=r"global batch size 12 is not a multiple of micro_batch_size \(4\) x data-parallel size \(2\)",
    ):
        validate_run(cfg, dims.dp)  # ... the batch is not


def test_query_groups_must_divide_by_tp():
    cfg = config("llama-tiny", tensor_model_parallel_size=4)  # 4 heads, 2 query groups
    with pytest.raises(ConfigError, match="num_query_groups 2 is not divisible by TP 4"):
        ParallelDims.from_config(cfg, 4).validate(cfg)


def test_all_problems_are_reported_at_once():
    cfg = config("gpt-tiny", tensor_model_parallel_size=3, pipeline_model_parallel_size=4)
    with pytest.raises(ConfigError) as err:
        ParallelDims.from_config(cfg, 12).validate(cfg)
    assert "TP 3" in str(err.value) and "PP x VP = 4 x 1" in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"pipeline_model_parallel_size": 2, "global_batch_size": 4}, "1 micro-batches per pipeline, fewer than PP 2"),
        (
            {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2, "num_layers": 4,
             "global_batch_size": 12},
            "interleaved schedule needs the micro-batches per pipeline (3",
        ),
    ],
)  # fmt: skip
def test_pipeline_schedules_need_enough_micro_batches(overrides, message):
    cfg = config("gpt-tiny", micro_batch_size=4, **overrides)
    with pytest.raises(ConfigError) as err:
        validate_run(cfg, 1)
    assert message in str(err.value)
