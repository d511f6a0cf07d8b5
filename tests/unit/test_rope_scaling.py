"""Llama 3.1's RoPE scaling (Megatron's --use-rope-scaling): the frequencies against transformers'
implementation, the three bands of the specification, the config checks and the presets."""

from __future__ import annotations

import math

import pytest
import torch

from mtk.config import ConfigError, apply_overrides
from mtk.layers.rotary import RopeScaling, RotaryEmbedding, build_rotary
from mtk.presets import load_preset


def transformers_inv_freq(head_dim: int, theta: float, factor: float, low: float, high: float, original: int):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": original}  # fmt: skip
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, rope_theta=theta,
                         max_position_embeddings=4 * original, rope_scaling=scaling)  # fmt: skip
    return ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")[0]


@pytest.mark.parametrize(
    ("head_dim", "theta", "factor", "low", "high", "original"),
    [
        (128, 500000.0, 8.0, 1.0, 4.0, 8192),  # Llama 3.1 (Megatron's fixed values)
        (16, 10000.0, 8.0, 1.0, 4.0, 32),  # one frequency in each band
        (64, 500000.0, 32.0, 1.0, 4.0, 8192),  # Llama 3.2
    ],
)
def test_scaled_frequencies_equal_transformers(head_dim, theta, factor, low, high, original):
    ours = RotaryEmbedding(head_dim, 8, theta, RopeScaling(factor, low, high, original)).inverse_frequencies()
    torch.testing.assert_close(
        ours, transformers_inv_freq(head_dim, theta, factor, low, high, original), atol=0, rtol=1e-6
    )


def test_short_wavelengths_are_kept_long_ones_stretched_and_the_band_between_blended():
    plain = RotaryEmbedding(16, 8, 10000.0).inverse_frequencies()
    scaled = RotaryEmbedding(16, 8, 10000.0, RopeScaling(8.0, 1.0, 4.0, 32)).inverse_frequencies()
    wavelength = 2 * math.pi / plain
    short, long = wavelength < 32 / 4, wavelength > 32 / 1
    assert short.sum() == 1 and long.sum() == 6  # one frequency per band at least
    assert torch.equal(scaled[short], plain[short])
    torch.testing.assert_close(scaled[long], plain[long] / 8)
    between = ~(short | long)
    assert torch.all(plain[between] / 8 < scaled[between]) and torch.all(scaled[between] < plain[between])


def test_the_config_switches_the_scaling_on_with_megatrons_defaults():
    config = apply_overrides(load_preset("llama-tiny").sections, {"use_rope_scaling": True}).model
    assert build_rotary(config).scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert build_rotary(load_preset("llama-tiny").config.model).scaling is None
    with pytest.raises(ConfigError, match="rope_scaling_high_freq_factor=1.0 must be above"):
        apply_overrides({}, {"use_rope_scaling": True, "rope_scaling_high_freq_factor": 1.0})
    with pytest.raises(ConfigError, match="'rope_scaling_factor' = 0.5 is out of range"):
        apply_overrides({}, {"rope_scaling_factor": 0.5})


def test_llama3_405b_is_llama_3_1_and_the_8b_recipe_centres_its_norms():
    """405B exists only as Llama 3.1 (scaled RoPE); Megatron's Llama 3 8B script passes
    --apply-layernorm-1p, and no Llama 3 script --use-rope-scaling."""
    models = {name: load_preset(name).config.model for name in ("llama3-8b", "llama3-70b", "llama3-405b")}
    assert [model.use_rope_scaling for model in models.values()] == [False, False, True]
    assert models["llama3-405b"].rope_scaling_factor == 8.0
    assert [model.apply_layernorm_1p for model in models.values()] == [True, False, False]
