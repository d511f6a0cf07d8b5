"""The thirteen seed presets as published: each passes `mtk plan`'s rules at its published GPU count,
and each starts `mtk train` on mock data with its layers and widths shrunk (one process, CPU)."""

from __future__ import annotations

import json
import math

import pytest

from mtk.config import apply_overrides, run_problems
from mtk.models import family_spec
from mtk.presets import load_preset
from tests.conftest import invoke, read_metrics

SEEDS = ["gpt3-345m", "gpt3-857m", "gpt3-175b", "bert-340m", "bert-4b", "bert-20b", "t5-220m",
         "llama3-8b", "llama3-70b", "llama3-405b", "retro-857m", "retro-2b", "retro-4b"]  # fmt: skip


def published_world(name: str) -> int:
    """The GPU count a recipe publishes, else the fewest its layout needs."""
    preset = load_preset(name)
    parallel = preset.config.parallel
    layout = (
        parallel.tensor_model_parallel_size
        * parallel.pipeline_model_parallel_size
        * parallel.context_parallel_size
    )
    return int(preset.published.get("gpus", layout))


@pytest.mark.parametrize("name", SEEDS)
def test_a_seed_preset_is_valid_at_its_published_gpu_count(name):
    config = apply_overrides(load_preset(name).sections, {"mock_data": True})
    if config.train.train_iters is None and config.train.train_samples is None:
        config = apply_overrides(load_preset(name).sections, {"mock_data": True, "train_iters": 1})
    assert run_problems(config, published_world(name), family_spec(config.model.family)) == []


def shrunk(name: str) -> list[str]:
    """Overrides keeping the preset's recipe (precision, FP8, norms, positions, schedule kind) at a CPU
    size: 6 layers (RETRO's first cross-attention layer is the 6th), width 64, one process."""
    model = load_preset(name).config.model
    sets = {
        "num_layers": 6,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_query_groups": 2 if model.num_query_groups != model.num_attention_heads else 4,
        "kv_channels": 16,
        "ffn_hidden_size": 128,
        "seq_length": 64,
        "max_position_embeddings": 64,
        "vocab_size": 512,
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "context_parallel_size": 1,
        "virtual_pipeline_model_parallel_size": None,
        "account_for_embedding_in_pipeline_split": False,
        "account_for_loss_in_pipeline_split": False,
        "batch_size_ramp": None,
        "rampup_batch_size": None,
        "initial_loss_scale": 65536,  # Megatron's 2^32 skips the first ~20 fp16 steps of any run
    }
    if model.family == "t5":
        sets |= {"decoder_num_layers": 2, "decoder_seq_length": 32}
    if model.family == "retro":
        sets |= {"retro_chunk_length": 16}
    args = [item for key, value in sets.items() for item in ("--set", f"{key}={json.dumps(value)}")]
    return [*args, "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "2",
            "--eval-interval", "0", "--log-interval", "1", "--num-workers", "0", "--device", "cpu"]  # fmt: skip


@pytest.mark.slow  # thirteen short training runs
@pytest.mark.parametrize("name", SEEDS)
def test_a_seed_preset_trains_on_mock_data_with_its_layers_shrunk(name, tmp_path):
    invoke("train", "--preset", name, "--mock-data", "--save", str(tmp_path / "run"), *shrunk(name))
    records = read_metrics(tmp_path / "run")
    assert [r["iteration"] for r in records if "split" not in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records)
