"""One validation home: every rule of a run (layout, batch, length, family, precision, ranges) up front,
with messages that say what to change."""

from __future__ import annotations

import pytest

from mtk.config import ConfigError, ModelConfig, RunConfig, apply_overrides, check_run, run_problems
from mtk.models import family_spec
from mtk.parallel.dims import ParallelDims
from mtk.presets import load_preset


def config(name, **overrides):
    return apply_overrides(load_preset(name).sections, {"mock_data": True, **overrides})


def check(cfg, world):
    check_run(cfg, world, family_spec(cfg.model.family))


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
        problems = run_problems(cfg, world, family_spec(cfg.model.family))
        assert problems == [], (name, problems)
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
    problems = run_problems(cfg, world, family_spec("gpt"))
    assert message in " ".join(p.message for p in problems if p.rule == "layout")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check(cfg, world)


def test_global_batch_must_divide_by_micro_batch_times_dp():
    cfg = config("gpt-tiny", global_batch_size=12, micro_batch_size=4)
    (problem,) = run_problems(cfg, 2, family_spec("gpt"))
    assert problem.rule == "batch"  # the layout itself is fine, the batch is not
    with pytest.raises(
        ConfigError,
        match=r"global batch size 12 is not a multiple of micro_batch_size \(4\) x data-parallel size \(2\)",
    ):
        check(cfg, 2)


def test_query_groups_must_divide_by_tp():
    cfg = config("llama-tiny", tensor_model_parallel_size=4)  # 4 heads, 2 query groups
    with pytest.raises(ConfigError, match="num_query_groups 2 is not divisible by TP 4"):
        check(cfg, 4)


def test_all_problems_are_reported_at_once():
    cfg = config("gpt-tiny", tensor_model_parallel_size=3, pipeline_model_parallel_size=4)
    with pytest.raises(ConfigError) as err:
        check(cfg, 12)
    assert "the run cannot start" in str(err.value)
    assert "layout: num_attention_heads 4 is not divisible by TP 3" in str(err.value)
    assert "PP x VP = 4 x 1" in str(err.value)


def test_interleaved_pipelines_need_a_multiple_of_pp_micro_batches():
    cfg = config("gpt-tiny", micro_batch_size=4, pipeline_model_parallel_size=2,
                 virtual_pipeline_model_parallel_size=2, num_layers=4, global_batch_size=12)  # fmt: skip
    with pytest.raises(ConfigError) as err:
        check(cfg, 2)
    assert "interleaved schedule (--vp 2) needs the micro-batches per pipeline (3" in str(err.value)


def test_fewer_micro_batches_than_stages_run_every_phase_of_the_gpt3_ramp():
    """GPT-3 175B at 1024 GPUs (TP8 PP16 DP8): its ramp starts at 16 samples, 2 micro-batches per
    pipeline of 16 stages. GPipe runs such phases, so every phase of the recipe is valid."""
    cfg = config("gpt3-175b")
    assert run_problems(cfg, 1024, family_spec("gpt")) == []
    assert run_problems(config("gpt-tiny", micro_batch_size=4, global_batch_size=4,
                               pipeline_model_parallel_size=2), 2, family_spec("gpt")) == []  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "rule", "message"),
    [
        ({"mock_data": False}, "data", "give exactly one of --data PREFIX and --mock-data"),
        ({"data_path": "corpus_text_document"}, "data", "give exactly one of --data PREFIX and --mock-data"),
        ({"train_iters": None}, "length", "give --train-iters or --train-samples"),
        ({"train_iters": 10, "train_samples": 64}, "length", "not both"),
        ({"lr_decay_iters": 10, "lr_decay_samples": 80}, "schedule", "decay is given in iterations and in"),
        (
            {"lr_warmup_iters": 10, "lr_warmup_samples": 80},
            "schedule",
            "warmup is given in iterations and in",
        ),
        ({"lr_warmup_fraction": 0.1, "lr_warmup_iters": 10}, "schedule", "give one warmup length"),
        ({"lr_decay_style": "WSD"}, "schedule", "WSD needs the annealing length"),
        ({"rampup_batch_size": [4, 4, 100], "batch_size_ramp": "0:4"}, "batch", "give one batch-size ramp"),
        ({"rampup_batch_size": [4, 12, 100]}, "batch", "batch size 8 must be START plus a whole"),
        ({"rampup_batch_size": [16, 4, 100]}, "batch", "batch size 8 must be START plus a whole"),
        ({"rampup_batch_size": [2, 2, 100]}, "batch", "ramp reaches global batch size 2, not a"),
        ({"batch_size_ramp": "0:4 1K:6 2K:8"}, "batch", "ramp reaches global batch size 6, not a"),
        ({"min_lr": 0.1}, "schedule", "min_lr 0.1 is above lr 0.001"),
        ({"fp8": "hybrid", "precision": "fp16"}, "precision", "FP8 runs with bf16 or fp32 weights, not fp16"),
        ({"family": "retro"}, "family", "has no chunked cross-attention layer"),
        ({"family": "t5", "decoder_seq_length": 16}, "family", "set decoder_seq_length >= 20"),
        ({"max_position_embeddings": 16}, "layout", "seq_length 128 exceeds max_position_embeddings 16"),
    ],
)
def test_every_rule_has_its_kind_and_says_what_to_change(overrides, rule, message):
    cfg = config("gpt-tiny", **overrides)
    (problem,) = run_problems(cfg, 1, family_spec(cfg.model.family))
    assert problem.rule == rule and message in problem.message
    with pytest.raises(ConfigError, match=message):
        check(cfg, 1)
    check_run(cfg, 1, family_spec(cfg.model.family), ignore=[rule])  # what plan does for its kinds


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("num_layers", 0, ">= 1"),
        ("num_layers", -1, ">= 1"),
        ("num_attention_heads", 0, ">= 1"),
        ("num_query_groups", 0, ">= 1"),
        ("hidden_size", -64, ">= 1"),
        ("micro_batch_size", 0, ">= 1"),
        ("global_batch_size", 0, ">= 1"),
        ("log_interval", 0, ">= 1"),
        ("tensor_model_parallel_size", 0, ">= 1"),
        ("clip_grad", -1.0, ">= 0"),
        ("weight_decay", -1.0, ">= 0"),
        ("hidden_dropout", 1.0, ">= 0 and < 1"),
        ("lr", float("nan"), ">= 0 and <= 1"),
        ("seed", -1, ">= 0 and <= 4294967295"),
        ("num_layers", 10**30, ">= 1 and <= 4096"),
        ("hidden_size", 2**20, ">= 1 and <= 262144"),
        ("weight_decay", 1e30, ">= 0 and <= 1"),
    ],
)
def test_values_out_of_their_declared_range_are_rejected_naming_the_key(key, value, allowed):
    with pytest.raises(ConfigError) as err:
        config("gpt-tiny", **{key: value})
    assert f"'{key}' = {value!r} is out of range: it must be {allowed}" in str(err.value)


@pytest.mark.parametrize("ramp", [[[0, 0]], [[0]], [[0, 4], [-1, 8]], [[100, 4], [0, 8]], [[0, 2.5]]])
def test_malformed_batch_size_ramps_are_rejected(ramp):
    with pytest.raises(ConfigError, match="batch_size_ramp"):
        config("gpt-tiny", batch_size_ramp=ramp)


def test_saved_configs_with_the_split_in_the_train_section_still_load():
    legacy = RunConfig.from_dict({"train": {"split": "98,2,0"}})
    assert legacy.data.split == "98,2,0"
    with pytest.raises(ConfigError, match="split '1,x'"):
        RunConfig.from_dict({"data": {"split": "1,x"}})
    with pytest.raises(ConfigError, match="not a multiple of num_query_groups"):
        ModelConfig(num_attention_heads=6, hidden_size=96, num_query_groups=4)


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_encoder_families_refuse_context_parallelism_and_t5_pipelines(family):
    """Layout rules of a family: reported as layout problems, so `mtk plan` skips those layouts."""
    cfg = config(f"{family}-tiny", mock_data=True, context_parallel_size=2, pipeline_model_parallel_size=2)
    messages = [p.message for p in run_problems(cfg, 4, family_spec(family)) if p.rule == "layout"]
    assert any(
        "bidirectional encoder attends to the whole sequence, so run it with --cp 1" in m for m in messages
    )
    assert any("pipeline parallelism would cut the encoder and the decoder" in m for m in messages) == (
        family == "t5"
    )


def test_an_override_replaces_what_the_preset_gives_in_other_units():
    """--train-samples turns a preset's run of train_iters sample-based, as one Megatron flag would."""
    by_samples = config("gpt-tiny", train_samples=120, lr_warmup_fraction=0.1, rampup_batch_size=[4, 4, 24])
    train = by_samples.train
    assert (train.train_iters, train.train_samples, train.lr_warmup_iters, train.lr_warmup_fraction) == (
        None, 120, 0, 0.1)  # fmt: skip
    assert run_problems(by_samples, 1, family_spec("gpt")) == []
    staircase = config("gpt3-175b", rampup_batch_size=[16, 16, 5859375])
    assert staircase.train.batch_size_ramp is None


@pytest.mark.parametrize(
    ("preset", "overrides", "message"),
    [
        ("gpt-tiny", {"retro_chunk_length": 32},
         "retro_chunk_length = 32 is a setting of family 'retro'; this run is family 'gpt': remove it"),
        ("llama-tiny", {"decoder_num_layers": 4},
         "decoder_num_layers = 4 is a setting of family 't5'; this run is family 'gpt': remove it"),
        ("bert-tiny", {"decoder_seq_length": 64},
         "decoder_seq_length = 64 is a setting of family 't5'; this run is family 'bert': remove it"),
        ("t5-tiny", {"bert_binary_head": False},
         "bert_binary_head = False is a setting of family 'bert'; this run is family 't5': remove it"),
        ("retro-tiny", {"retro_num_neighbors": 4, "decoder_num_layers": 2},
         "decoder_num_layers = 2 is a setting of family 't5'; this run is family 'retro': remove it"),
    ],
)  # fmt: skip
def test_a_setting_of_another_family_is_refused_naming_its_family(preset, overrides, message):
    """Each family declares the model settings only it reads (``config_fields``); a run of another
    family that moves one from its default is refused, whatever else it gets right."""
    cfg = config(preset, **overrides)
    (problem,) = run_problems(cfg, 1, family_spec(cfg.model.family))
    assert (problem.rule, problem.message) == ("family", message)
    with pytest.raises(ConfigError, match=message):
        check(cfg, 1)


def test_settings_several_families_read_and_defaults_given_again_are_no_problem():
    assert run_problems(config("gpt-tiny", post_norm=True), 1, family_spec("gpt")) == []
    again = config("gpt-tiny", retro_chunk_length=64, bert_binary_head=True, decoder_num_layers=None)
    assert run_problems(again, 1, family_spec("gpt")) == []
    for name in family_spec("retro").config_fields:
        assert (
            name in family_spec("gpt").foreign_fields() and name not in family_spec("retro").foreign_fields()
        )


def test_no_preset_sets_another_familys_settings():
    from mtk.presets import preset_names

    for name in preset_names():
        cfg = config(name, train_iters=1)
        spec = family_spec(cfg.model.family)
        assert spec.foreign_settings(cfg.model) == [], name


def test_retro_refuses_post_norm_before_building():
    cfg = config("retro-tiny", post_norm=True)
    problems = run_problems(cfg, 1, family_spec("retro"))
    assert [p.rule for p in problems] == ["family"]
    assert "retro: post_norm is not supported: the RETRO decoder is pre-norm" in problems[0].message
    with pytest.raises(ConfigError, match="post_norm is not supported"):
        check(cfg, 1)
