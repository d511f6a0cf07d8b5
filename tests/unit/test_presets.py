"""Presets carry exactly the recipe figures of shared/SEEDS.md; configs validate their input."""

from __future__ import annotations

import pytest

from mtk.config import ConfigError, ModelConfig, RunConfig
from mtk.presets import load_preset, preset_names

RECIPES = {
    "gpt3-345m", "gpt3-857m", "gpt3-175b", "bert-340m", "bert-4b", "bert-20b", "t5-220m",
    "llama3-8b", "llama3-70b", "llama3-405b", "retro-857m", "retro-2b", "retro-4b",
}  # fmt: skip
TINY = {"gpt-tiny", "llama-tiny", "bert-tiny", "t5-tiny", "retro-tiny"}

# (layers, hidden, heads, seq, TP, PP) from the recipe tables
TABLE = {
    "gpt3-345m": (12, 512, 8, 1024, 1, 1),
    "gpt3-857m": (24, 1024, 16, 2048, 1, 1),
    "gpt3-175b": (96, 12288, 96, 2048, 8, 16),
    "bert-340m": (24, 1024, 16, 512, 1, 1),
    "bert-4b": (48, 2560, 32, 512, 1, 1),
    "bert-20b": (48, 6144, 96, 512, 4, 4),
    "retro-857m": (24, 1024, 16, 2048, 1, 1),
    "retro-2b": (32, 2048, 32, 2048, 8, 1),
    "retro-4b": (48, 2560, 32, 2048, 1, 1),
}


def test_every_recipe_and_tiny_preset_exists():
    assert set(preset_names()) == RECIPES | TINY
    assert preset_names()[-len(TINY) :] == sorted(TINY)  # tiny presets listed last


@pytest.mark.parametrize("name", sorted(TABLE))
def test_table_rows(name):
    preset = load_preset(name)
    model, parallel = preset.config.model, preset.config.parallel
    got = (
        model.num_layers,
        model.hidden_size,
        model.num_attention_heads,
        model.seq_length,
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
    )
    assert got == TABLE[name]


def test_gpt3_175b_training_recipe():
    train = load_preset("gpt3-175b").config.train
    assert (train.micro_batch_size, train.global_batch_size, train.train_iters) == (1, 1536, 500_000)
    assert train.batch_size_ramp == [
        [0, 16],
        [2.4e9, 320],
        [4.8e9, 624],
        [7.2e9, 928],
        [9.6e9, 1232],
        [12e9, 1536],
    ]
    assert (train.lr, train.min_lr, train.lr_decay_style, train.lr_decay_iters) == (
        6e-5,
        6e-6,
        "cosine",
        430_000,
    )
    assert (train.lr_warmup_fraction, train.weight_decay, train.adam_beta1, train.adam_beta2) == (
        0.001,
        0.1,
        0.9,
        0.95,
    )
    assert (train.clip_grad, train.precision, train.split) == (1.0, "fp16", "949,50,1")
    assert (train.log_interval, train.save_interval, train.eval_interval, train.eval_iters) == (
        100,
        10000,
        1000,
        10,
    )
    assert load_preset("gpt3-175b").config.model.init_method_std == 0.006


def test_bert_340m_training_recipe():
    train = load_preset("bert-340m").config.train
    assert (train.micro_batch_size, train.global_batch_size, train.train_iters) == (4, 32, 1_000_000)
    assert (train.lr, train.min_lr, train.lr_decay_style, train.lr_decay_iters) == (
        1e-4,
        1e-5,
        "linear",
        990_000,
    )
    assert (train.lr_warmup_fraction, train.weight_decay, train.clip_grad, train.precision) == (
        0.01,
        0.01,
        1.0,
        "fp16",
    )
    assert train.split == "949,50,1"


def test_t5_220m_recipe():
    preset = load_preset("t5-220m")
    model, train = preset.config.model, preset.config.train
    assert (model.num_layers, model.decoder_num_layers, model.hidden_size, model.num_attention_heads) == (
        12,
        12,
        768,
        12,
    )
    assert (model.kv_channels, model.ffn_hidden_size, model.seq_length, model.decoder_seq_length) == (
        64,
        3072,
        512,
        128,
    )
    assert (model.max_position_embeddings, model.init_method_std) == (512, 0.015)
    assert (train.micro_batch_size, train.global_batch_size, train.lr, train.min_lr) == (64, 512, 1e-4, 1e-5)
    assert (train.lr_decay_style, train.lr_warmup_fraction, train.weight_decay, train.clip_grad) == (
        "linear",
        0.01,
        0.01,
        1.0,
    )
    assert (train.precision, train.split) == ("bf16", "99982,9,9")
    assert "63.44%" in preset.published["result"]


def test_llama3_8b_recipe_and_fp8_table():
    preset = load_preset("llama3-8b")
    model, train, parallel = preset.config.model, preset.config.train, preset.config.parallel
    assert (model.num_layers, model.hidden_size, model.ffn_hidden_size, model.num_attention_heads) == (
        32,
        4096,
        14336,
        32,
    )
    assert (model.num_query_groups, model.kv_channels, model.seq_length, model.rotary_base) == (
        8,
        128,
        8192,
        1_000_000,
    )
    assert (model.normalization, model.position_embedding_type, model.swiglu) == ("RMSNorm", "rope", True)
    assert not model.add_bias_linear and model.untie_embeddings_and_output_weights
    assert (model.hidden_dropout, model.attention_dropout, model.init_method_std, model.vocab_size) == (
        0,
        0,
        0.0134,
        128256,
    )
    assert (train.micro_batch_size, train.global_batch_size, train.lr, train.min_lr) == (1, 128, 1.5e-4, 1e-5)
    assert (train.weight_decay, train.adam_beta1, train.adam_beta2, train.clip_grad) == (0.1, 0.9, 0.95, 1.0)
    assert (train.precision, train.fp8, train.fp8_amax_history_len, train.fp8_amax_compute_algo) == (
        "bf16",
        "hybrid",
        1024,
        "max",
    )
    assert parallel.use_distributed_optimizer
    rows = {
        "llama3-8b": (8, 128, 1, 8192, 1, 1, 2, 1, 13812, 800),
        "llama3-70b": (64, 128, 1, 8192, 4, 8, 1, 5, 1621, 780),
        "llama3-405b": (1024, 512, 1, 8192, 8, 8, 2, 8, 315, 834),
    }
    for name, row in rows.items():
        p = load_preset(name).published
        keys = ("gpus", "global_batch_size", "micro_batch_size", "seq_length", "tensor_parallel",
                "pipeline_parallel", "context_parallel", "virtual_pipeline", "tokens_per_s_per_gpu", "tflops_per_gpu")  # fmt: skip
        assert tuple(p[k] for k in keys) == row
        par = load_preset(name).config.parallel
        assert (
            par.tensor_model_parallel_size,
            par.pipeline_model_parallel_size,
            par.context_parallel_size,
        ) == row[4:7]


def test_retro_recipe():
    for name in ("retro-857m", "retro-2b", "retro-4b"):
        train = load_preset(name).config.train
        assert (train.micro_batch_size, train.lr, train.min_lr, train.lr_decay_style) == (
            4,
            6e-4,
            6e-5,
            "cosine",
        )
        assert (train.weight_decay, train.adam_beta1, train.adam_beta2, train.precision, train.split) == (
            0.1, 0.9, 0.95, "bf16", "98,2,0")  # fmt: skip
        assert (train.global_batch_size, train.train_samples, train.eval_interval, train.eval_iters, train.seed) == (
            256, 200000, 2000, 50, 1234)  # fmt: skip
        assert load_preset(name).config.model.init_method_std == 0.023


def _reference_gpt_params(layers, hidden, vocab, seq, ffn=None):
    """Standard GPT formula: 12*L*h^2 weights + 13*L*h biases/norms + V*h + seq*h + final norm."""
    ffn = ffn or 4 * hidden
    per_layer = 4 * hidden * hidden + 2 * hidden * ffn + 4 * hidden + ffn + hidden + 4 * hidden
    return layers * per_layer + vocab * hidden + seq * hidden + 2 * hidden


def test_parameter_counts_match_standard_formulas():
    gpt = load_preset("gpt3-175b").config.model
    assert gpt.num_parameters(8) == _reference_gpt_params(96, 12288, 51200, 2048)
    assert abs(gpt.num_parameters(8) - 175e9) / 175e9 < 0.01
    llama = load_preset("llama3-8b").config.model
    # Llama 3 8B: embeddings and output 2*V*h, attention h*(h + 2*1024) + h*h, SwiGLU 3*h*ffn, 2 RMSNorms
    per_layer = 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    assert llama.num_parameters() == 32 * per_layer + 2 * 128256 * 4096 + 4096
    assert round(llama.num_parameters() / 1e9, 2) == 8.03


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
