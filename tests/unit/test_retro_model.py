"""The RETRO model: Megatron's layer rule and parameter count, causal chunk alignment, its refusals."""

from __future__ import annotations

import pytest
import torch

from mtk.config import ConfigError, ModelConfig, check_run
from mtk.models.retro import SPEC, RetroModel, retro_layer_numbers
from mtk.presets import load_preset


def megatron_test_config(**overrides) -> ModelConfig:
    """Megatron's own RETRO unit-test configuration (tests/unit_tests/transformer/test_retro_attention.py)."""
    values = dict(
        family="retro", num_layers=12, hidden_size=16, num_attention_heads=4, retro_chunk_length=4,
        retro_num_neighbors=2, seq_length=32, vocab_size=100, hidden_dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    return ModelConfig(**(values | overrides))


def test_layers_and_parameters_match_megatrons_test_configuration():
    config = megatron_test_config()
    model = RetroModel(config)
    assert retro_layer_numbers(config) == [6, 9, 12]
    assert retro_layer_numbers(megatron_test_config(num_layers=24)) == [9, 12, 15, 18, 21, 24]
    first = model.decoder.layers["5"].cross_attention  # layer 6 (1-based) owns the retrieval encoder
    assert first.encoder is not None and model.decoder.layers["8"].cross_attention.encoder is None
    assert sum(p.numel() for p in first.parameters()) == 8768  # CCA + encoder, Megatron's figure
    assert SPEC.num_parameters(config) == sum(p.numel() for p in model.parameters())


def test_a_token_sees_only_earlier_tokens_and_neighbours_of_complete_chunks():
    torch.manual_seed(0)
    config = megatron_test_config()
    model = RetroModel(config).eval()
    tokens, neighbours = torch.randint(0, 100, (2, 32)), torch.randint(0, 100, (2, 8, 2, 8))
    with torch.no_grad():
        base = model(tokens, neighbours=neighbours)
        changed_token = tokens.clone()
        changed_token[:, 20] = (changed_token[:, 20] + 1) % 100
        changed_neighbours = neighbours.clone()
        changed_neighbours[:, 5] = (changed_neighbours[:, 5] + 1) % 100  # chunk 5 = tokens 20..23
        by_token = (model(changed_token, neighbours=neighbours) - base).abs().amax(-1)
        by_neighbour = (model(tokens, neighbours=changed_neighbours) - base).abs().amax(-1)
    assert (by_token[:, :20] == 0).all() and (by_token[:, 20:] > 0).all()
    # chunk 5's neighbours are retrieved with all of chunk 5 known: visible from its last token on
    assert (by_neighbour[:, :23] == 0).all() and (by_neighbour[:, 23:] > 0).all()


def test_each_chunk_reads_only_its_own_neighbours():
    torch.manual_seed(0)
    model = RetroModel(megatron_test_config()).eval()
    tokens, neighbours = torch.randint(0, 100, (2, 32)), torch.randint(0, 100, (2, 8, 2, 8))
    changed = neighbours.clone()
    changed[1] = (changed[1] + 1) % 100  # only the second sample's neighbours
    with torch.no_grad():
        difference = (model(tokens, neighbours=changed) - model(tokens, neighbours=neighbours)).abs()
    assert difference[0].max() == 0 and difference[1].max() > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"seq_length": 120}, "seq_length 120 is not a multiple of retro_chunk_length 16"),
        ({"num_layers": 5}, "num_layers 5 has no chunked cross-attention layer"),
        ({"pipeline_model_parallel_size": 2}, "Megatron trains RETRO without pipeline stages"),
        ({"context_parallel_size": 2}, "chunked cross-attention needs whole chunks"),
    ],
)
def test_retro_refuses_what_it_cannot_run(overrides, message):
    from mtk.config import apply_overrides

    sections = load_preset("retro-tiny").sections
    config = apply_overrides(sections, {"mock_data": True, "global_batch_size": 16, **overrides})
    with pytest.raises(ConfigError, match=message):
        check_run(config, 2 if "parallel" in str(overrides) or "context" in str(overrides) else 1, SPEC)


def test_the_default_index_follows_the_database_size():
    from mtk.retro.index import default_index, default_nprobe

    assert default_index(4095, 384) == "Flat"
    assert default_index(4096, 384) == "IVF64,PQ96x4fs,RFlat"  # at least 39 chunks a list
    assert default_nprobe("IVF64,PQ96x4fs,RFlat") == 16  # a quarter: small databases keep recall
    assert default_index(290_000, 384) == "IVF2048,PQ96x4fs,RFlat"  # ~4 sqrt(n) lists
    assert default_nprobe("IVF2048,PQ96x4fs,RFlat") == 160  # 5/64 of them, as measured
    assert default_index(1_036_834, 384) == "IVF4096,PQ96x4fs,RFlat"
    assert default_index(20_000_000, 1024) == "OPQ32_64,IVF16384_HNSW8,PQ32"
    assert default_index(30_000_000_000, 1024) == "OPQ32_64,IVF65536_HNSW8,PQ32"  # the reference itself
    assert default_nprobe("OPQ32_64,IVF65536_HNSW8,PQ32") == 4096 and default_nprobe("Flat") == 1
