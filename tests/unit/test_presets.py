"""Presets: every recipe exists, its size follows from its config, its published figures fit it; configs validate."""

from __future__ import annotations

import pytest

from mtk.config import ConfigError, ModelConfig, RunConfig
from mtk.models import family_spec
from mtk.presets import load_preset, preset_names

RECIPES = {
    "gpt3-345m", "gpt3-857m", "gpt3-175b", "bert-340m", "bert-4b", "bert-20b", "t5-220m",
    "llama3-8b", "llama3-70b", "llama3-405b", "retro-857m", "retro-2b", "retro-4b",
}  # fmt: skip
TINY = {"gpt-tiny", "llama-tiny", "bert-tiny", "t5-tiny", "retro-tiny"}


def test_every_count_is_inside_the_models_name():
    """The size a recipe is named after (bert-340m, t5-220m, llama3-70b ...), within 11% (bert-20b has 22B), from the config alone."""
    sizes = {"bert-340m": 340e6, "bert-4b": 4e9, "bert-20b": 20e9, "t5-220m": 220e6, "gpt3-175b": 175e9,
             "llama3-8b": 8e9, "llama3-70b": 70e9, "llama3-405b": 405e9, "retro-2b": 2e9}  # fmt: skip
    for name, size in sizes.items():
        config = load_preset(name).config
        family = family_spec(config.model.family)
        count = family.num_parameters(config.model, config.parallel.tensor_model_parallel_size)
        assert abs(count - size) / size < 0.11, (name, count)


def test_published_figures_describe_the_presets_own_layout():
    for name in preset_names():
        preset = load_preset(name)
        published, parallel = preset.published, preset.config.parallel
        if "tensor_parallel" not in published:
            continue
        assert (published["tensor_parallel"], published["pipeline_parallel"], published["context_parallel"],
                published["virtual_pipeline"]) == (parallel.tensor_model_parallel_size,
                parallel.pipeline_model_parallel_size, parallel.context_parallel_size,
                parallel.virtual_pipeline_model_parallel_size or 1), name  # fmt: skip
        train = preset.config.train
        assert (published["global_batch_size"], published["micro_batch_size"], published["seq_length"]) == (
            train.global_batch_size, train.micro_batch_size, preset.config.model.seq_length), name  # fmt: skip


def _reference_gpt_params(layers, hidden, vocab, seq, ffn=None):
    """Standard GPT formula: 12*L*h^2 weights + 13*L*h biases/norms + V*h + seq*h + final norm."""
    ffn = ffn or 4 * hidden
    per_layer = 4 * hidden * hidden + 2 * hidden * ffn + 4 * hidden + ffn + hidden + 4 * hidden
    return layers * per_layer + vocab * hidden + seq * hidden + 2 * hidden


def test_parameter_counts_match_standard_formulas():
    gpt = load_preset("gpt3-175b").config.model
    count = family_spec("gpt").num_parameters
    assert count(gpt, 8) == _reference_gpt_params(96, 12288, 51200, 2048)
    assert abs(count(gpt, 8) - 175e9) / 175e9 < 0.01
    llama = load_preset("llama3-8b").config.model
    # Llama 3 8B: embeddings and output 2*V*h, attention h*(h + 2*1024) + h*h, SwiGLU 3*h*ffn, 2 RMSNorms
    per_layer = 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    assert count(llama) == 32 * per_layer + 2 * 128256 * 4096 + 4096
    assert round(count(llama) / 1e9, 2) == 8.03


def test_config_validation_messages():
    with pytest.raises(ConfigError, match="unknown key 'num_layer'"):
        RunConfig.from_dict({"model": {"num_layer": 4}})
    with pytest.raises(ConfigError, match="'hidden_size' = '64' is not of type int"):
        RunConfig.from_dict({"model": {"hidden_size": "64"}})
    with pytest.raises(ConfigError, match="unknown section"):
        RunConfig.from_dict({"optim": {}})
    with pytest.raises(ConfigError, match="not a multiple of num_query_groups"):
        ModelConfig(num_attention_heads=6, hidden_size=96, num_query_groups=4)
    with pytest.raises(ConfigError, match=r"'precision' = 'fp8' is not of type 'fp32' \| 'bf16' \| 'fp16'"):
        RunConfig.from_dict({"train": {"precision": "fp8"}})
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'"):
        load_preset("gpt5")
    assert RunConfig.from_dict({"train": {"lr": 1}}).train.lr == 1.0  # ints are accepted for floats


def test_padded_vocab_follows_megatron():
    model = ModelConfig(vocab_size=50257)
    assert model.padded_vocab_size(1) == 50304
    assert model.padded_vocab_size(8) == 51200


# Megatron-LM's argument defaults at commit d98e8a64dd (megatron/training/arguments.py and the config
# dataclasses it builds its arguments from: training/config/training_config.py, common_config.py,
# core/transformer/transformer_config.py), for every mtk field that has a counterpart; RETRO's from
# fc6969fbb3^, before Megatron removed RETRO
MEGATRON_DEFAULTS = {
    "model": {
        "ffn_hidden_size": None, "num_query_groups": None, "kv_channels": None, "max_position_embeddings": None,
        "make_vocab_size_divisible_by": 128, "normalization": "LayerNorm", "norm_epsilon": 1e-5,
        "position_embedding_type": "learned_absolute", "rotary_base": 10000, "swiglu": False,
        "openai_gelu": False, "add_bias_linear": True, "untie_embeddings_and_output_weights": False,
        "init_method_std": 0.02, "hidden_dropout": 0.1, "attention_dropout": 0.1, "decoder_num_layers": None,
        "decoder_seq_length": None, "bert_binary_head": True, "retro_encoder_num_layers": 2,
        "retro_num_neighbors": 2,
    },
    "data": {"split": "969,30,1", "mask_prob": 0.15, "short_seq_prob": 0.1, "mock_data": False},
    "train": {
        "batch_size_ramp": None, "rampup_batch_size": None, "train_iters": None, "train_samples": None,
        "min_lr": 0.0, "lr_decay_style": "linear", "lr_wsd_decay_style": "exponential", "lr_decay_iters": None,
        "lr_decay_samples": None, "lr_wsd_decay_iters": None, "lr_wsd_decay_samples": None,
        "lr_warmup_fraction": None, "lr_warmup_iters": 0, "weight_decay": 0.01, "adam_beta1": 0.9,
        "adam_beta2": 0.999, "adam_eps": 1e-8, "clip_grad": 1.0, "precision": "fp32", "fp8": None,
        "fp8_recipe": "delayed", "fp8_amax_history_len": 1, "fp8_amax_compute_algo": "most_recent",
        "fp8_margin": 0, "first_last_layers_bf16": False, "num_layers_at_start_in_bf16": 1,
        "num_layers_at_end_in_bf16": 1, "log_interval": 100, "save_interval": None, "eval_iters": 100,
        "seed": 1234,
    },
    "parallel": {
        "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "context_parallel_size": 1,
        "virtual_pipeline_model_parallel_size": None, "account_for_embedding_in_pipeline_split": False,
        "account_for_loss_in_pipeline_split": False, "use_distributed_optimizer": False,
        "grad_reduce_in_bf16": False, "recompute_granularity": None,
    },
}  # fmt: skip
# where mtk's default differs, its help says so: Megatron requires the value, or has none that mtk can use
DIFFERENT = {"num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size", "lr",
             "global_batch_size", "eval_interval"}  # fmt: skip


def test_defaults_are_megatrons():
    import dataclasses

    from mtk.config import SECTIONS, TrainConfig

    defaults = RunConfig().to_dict()
    derived = {"ffn_hidden_size", "num_query_groups", "kv_channels", "max_position_embeddings"}  # below
    for section, values in MEGATRON_DEFAULTS.items():
        for key, value in values.items():
            if key not in derived:
                assert defaults[section][key] == value, (section, key)
        for item in dataclasses.fields(SECTIONS[section]):
            if item.name in DIFFERENT:
                assert "Megatron" in item.metadata["help"], item.name
    assert TrainConfig().lr_warmup_samples in (None, 0)  # unset: no warmup by samples, as Megatron's 0
    # derived as Megatron derives them: 4h, or 2/3 of it for SwiGLU in multiples of 64; heads; h / heads
    model = ModelConfig(hidden_size=4096, num_attention_heads=32)
    assert (model.ffn_hidden_size, model.num_query_groups, model.kv_channels) == (16384, 32, 128)
    assert ModelConfig(hidden_size=4096, num_attention_heads=32, swiglu=True).ffn_hidden_size == 10880


def test_recipe_rows_train_as_their_megatron_script():
    """examples/gpt3 and examples/bert: the 345M/857M and 4B/20B rows change the model arguments of the
    175B and 340M scripts, so they train with those scripts' settings."""
    for rows, script in [(("gpt3-345m", "gpt3-857m"), "gpt3-175b"), (("bert-4b", "bert-20b"), "bert-340m")]:
        reference = load_preset(script).config
        for row in rows:
            config = load_preset(row).config
            assert config.train == reference.train and config.data == reference.data, row
            assert config.model.init_method_std == reference.model.init_method_std, row
    gpt3 = load_preset("gpt3-175b").config.train
    assert (gpt3.lr_decay_style, gpt3.eval_iters, gpt3.eval_interval) == ("cosine", 10, 1000)
    assert load_preset("bert-340m").config.train.eval_iters == 10


def test_tiny_presets_keep_the_settings_their_tests_rely_on():
    for name in TINY:
        config = load_preset(name).config
        assert config.data.split == "949,50,1", name
        train = config.train
        assert (train.lr_decay_style, train.eval_iters, train.eval_interval, train.lr_warmup_iters) == (
            "cosine", 5, 100, 10), name  # fmt: skip


def test_presets_show_lists_the_parameters_by_part_and_only_this_familys_settings():
    """`presets show`: the count by part of the model (summing to the count, in --json too), and the
    model settings of other families only where the preset sets them."""
    import json
    import re

    from tests.conftest import invoke, run

    shown = run("presets", "show", "gpt3-175b")
    assert "parameters by part" in shown and re.search(r"decoder layers\W+173,961,510,912\W+99\.6%", shown)
    for hidden in ("retro_chunk_length", "retro_num_neighbors", "decoder_num_layers", "bert_binary_head"):
        assert hidden not in shown
    assert "post_norm" in shown  # read by every family's layers
    t5 = run("presets", "show", "t5-tiny")
    assert "decoder_num_layers" in t5 and "decoder final norm" in t5 and "retro_chunk_length" not in t5
    retro = run("presets", "show", "retro-857m")
    assert (
        "retrieval encoder" in retro and "retro_num_neighbors" in retro and "decoder_seq_length" not in retro
    )
    for name in ("gpt3-175b", "t5-220m", "retro-tiny", "bert-tiny"):
        payload = json.loads(invoke("presets", "show", name, "--json").output)
        parts = payload["parameter_breakdown"]
        assert sum(parts.values()) == payload["num_parameters"] and "embeddings" in parts
        assert "retro_chunk_length" in payload["model"]  # the JSON keeps the whole config
