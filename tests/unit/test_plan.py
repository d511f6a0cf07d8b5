"""`mtk plan`: the memory estimate against measured peaks, its sharding arithmetic, suggestions, CLI."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mtk.config import apply_overrides
from mtk.models.gpt import SPEC, GPTModel
from mtk.parallel.apply import ParallelModel, apply_recompute
from mtk.plan import GIB, Layout, estimate_memory, suggest_layout, valid
from mtk.presets import load_preset, preset_names
from mtk.train.optim import build_optimizer
from mtk.train.step import StepRunner
from tests.conftest import invoke

MARGIN = 0.2  # the estimate is within 20% of the measured peak


def measured_peak(config, recompute) -> int:
    """Peak bytes of two training steps in this process, every tensor counted (MemTracker, CPU)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    model = GPTModel(config.model)
    apply_recompute(SPEC.blocks(model), recompute)
    runner, optimizer = (
        StepRunner(ParallelModel([model]), SPEC, config.model),
        build_optimizer(model, config.train),
    )
    batch, seq = config.train.micro_batch_size, config.model.seq_length
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        for _ in range(2):
            tokens = torch.randint(0, config.model.vocab_size, (batch, seq))
            micro = {"tokens": tokens, "labels": tokens, "loss_mask": torch.ones(batch, seq),
                     "position_ids": torch.arange(seq).expand(batch, seq)}  # fmt: skip
            runner.run([micro], contextlib.nullcontext, lambda loss: loss)
            tracker.reset_mod_stats()
            optimizer.step()
            optimizer.zero_grad()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-tiny"])
@pytest.mark.parametrize("recompute", [None, "selective", "full"])
def test_estimate_is_within_margin_of_measured_peak(preset, recompute):
    shape = {
        "seq_length": 256,
        "micro_batch_size": 8,
        "global_batch_size": 8,
        "hidden_size": 128,
        "num_layers": 4,
    }
    config = apply_overrides(load_preset(preset).sections, shape)
    estimate = estimate_memory(config, Layout(recompute=recompute), 1).total
    assert estimate == pytest.approx(measured_peak(config, recompute), rel=MARGIN)


def test_sharding_and_parallel_sizes_divide_what_they_should():
    config = load_preset("llama3-8b").config
    alone = estimate_memory(config, Layout(), 8)
    fsdp = estimate_memory(config, Layout(strategy="optim_grads_params"), 8)
    zero2 = estimate_memory(config, Layout(strategy="optim_grads"), 8)
    assert fsdp.optimizer == pytest.approx(alone.optimizer / 8) and fsdp.gradients == pytest.approx(
        alone.gradients / 8
    )
    assert zero2.weights > alone.weights > fsdp.weights  # ZeRO-2 keeps gathered weights plus its shard
    tp2 = estimate_memory(config, Layout(tp=2), 8)
    assert tp2.weights == pytest.approx(alone.weights / 2, rel=0.01)
    # tensor parallelism materialises the logits (sharded by vocabulary): context parallelism halves them
    assert estimate_memory(config, Layout(tp=2, cp=2), 8).logits == pytest.approx(tp2.logits / 2)
    # alone, the output layer is fused with the loss: a 32 MiB chunk of fp32 logits (6 bytes a value
    # in bf16), and the gradients of the output weight and of the hidden states
    vocab, h, tokens = config.model.padded_vocab_size(1), config.model.hidden_size, config.model.seq_length
    rows = 32 * 2**20 // (4 * vocab)
    assert alone.logits == rows * vocab * 6 + 4 * (vocab + tokens) * h
    full = estimate_memory(config, Layout(recompute="full"), 8)
    assert (
        full.activations
        < estimate_memory(config, Layout(recompute="selective"), 8).activations
        < alone.activations
    )
    # 1F1B: the first stage holds the activations of min(PP, micro-batches) micro-batches in flight
    gpt = load_preset("gpt3-175b").config
    # (the largest batch of a run counts: the ramp's too)
    eight_micro_batches = apply_overrides(
        load_preset("gpt3-175b").sections, {"global_batch_size": 8, "batch_size_ramp": None}
    )
    pipelined = estimate_memory(gpt, Layout(tp=8, pp=16), 128)
    assert pipelined.activations == pytest.approx(
        2 * estimate_memory(eight_micro_batches, Layout(tp=8, pp=16), 128).activations
    )


def test_suggestion_fits_and_is_valid_or_is_none():
    config = load_preset("llama3-8b").config
    layout, estimate = suggest_layout(config, 8, 80.0)
    assert valid(config, layout, 8) and estimate.total <= 0.9 * 80 * GIB
    assert suggest_layout(load_preset("gpt3-175b").config, 1, 80.0) is None


def test_plan_cli_lists_every_recipe_and_rejects_bad_layouts():
    result = invoke("plan", "--all", env={"COLUMNS": "250"})
    for name in preset_names():
        assert (name in result.output) != load_preset(name).tiny
    result = invoke("plan", "--preset", "llama3-8b", "--gpus", "8", env={"COLUMNS": "250"})
    assert "optimizer" in result.output and "TP1 PP1 CP2 DP4 zero2" in result.output
    result = invoke("plan", "--preset", "llama3-8b", "--tp", "3", code=None, env={"COLUMNS": "250"})
    assert result.exit_code != 0 and "not a valid layout" in result.output
    assert "num_attention_heads 32 is not divisible by TP 3" in " ".join(result.output.split())


def test_tables_and_log_records_keep_one_line_each_when_output_is_not_a_terminal(tmp_path):
    """Slurm logs and pipes are 80 columns by default: a row or a record must not wrap there."""
    result = invoke("plan", "--all", env={"COLUMNS": "80"})
    for name in (n for n in preset_names() if not load_preset(n).tiny):
        (row,) = [line for line in result.output.splitlines() if f" {name} " in line]
        assert "TP" in row and (" yes " in row or " no " in row) and "…" not in row
    result = invoke("train", "--preset", "gpt-tiny", "--mock-data", "--save", tmp_path / "r", "--train-iters", "2",
                    "--log-interval", "1", "--seq-length", "16", "--num-workers", "0", env={"COLUMNS": "80"})  # fmt: skip
    records = [line for line in result.output.splitlines() if line.startswith("iter ")]
    assert len(records) == 2 and all("loss" in line and line.rstrip().endswith("GiB") for line in records)


def test_encoder_families_plan_their_layouts_and_stacks():
    """The plan skips the layouts a family refuses (CP for BERT and T5, PP for T5) and counts T5's
    decoder stack, whose cross-attention layers hold more parameters than the encoder's."""
    bert, t5 = load_preset("bert-340m").config, load_preset("t5-220m").config
    assert not valid(bert, Layout(1, 1, 2), 2) and valid(bert, Layout(1, 2, 1), 2)
    assert not valid(t5, Layout(1, 2, 1), 2) and valid(t5, Layout(2, 1, 1), 2)
    for config in (bert, t5):
        layout, _ = suggest_layout(config, 8, 80)
        assert layout.cp == 1 and (config.model.family != "t5" or layout.pp == 1)
    shallow = apply_overrides(load_preset("t5-220m").sections, {"decoder_num_layers": 1})
    one = Layout(1, 1, 1)
    deep, thin = estimate_memory(t5, one, 1), estimate_memory(shallow, one, 1)
    assert deep.weights - thin.weights == pytest.approx(4 * 11 * 9_451_776)  # 11 decoder layers, fp32
    assert deep.activations > thin.activations
