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
