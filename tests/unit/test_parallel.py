"""Parallel mechanics in one process: pipeline cuts, CP positions and masks, TP plans, tied gradients.

The multi-process tests (tests/distributed) show every layout equals one process end to end; these
show each mechanism's arithmetic on its own, so a broken piece is named by the test that fails.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mtk.config import ParallelConfig, apply_overrides
from mtk.models import family_names, family_spec
from mtk.models.gpt import SPEC
from mtk.models.spec import PipelinedFamily
from mtk.parallel.apply import ParallelModel
from mtk.parallel.context import causal_mask, load_balanced_positions, shard_sequence
from mtk.parallel.pipeline import add_peer_gradient, layer_ranges, stage_indices
from mtk.parallel.tensor import STYLES
from mtk.presets import load_preset
from mtk.train.step import StepRunner


def tiny(name: str = "gpt-tiny", **overrides):
    return apply_overrides(load_preset(name).sections, {"num_layers": 4, "seq_length": 16, **overrides})


def test_layer_ranges_split_evenly_and_count_embedding_and_loss_as_layers():
    assert layer_ranges(8, ParallelConfig(), 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    counted = ParallelConfig(
        account_for_embedding_in_pipeline_split=True, account_for_loss_in_pipeline_split=True
    )
    ranges = layer_ranges(126, counted, 64)  # Llama 3 405B: PP 8 x VP 8
    assert [len(r) for r in ranges] == [1] + [2] * 62 + [1]
    assert ranges[0].start == 0 and ranges[-1].stop == 126
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:], strict=False))


def test_interleaved_stage_assignment():
    assert stage_indices(0, 4, 2) == [0, 4] and stage_indices(3, 4, 2) == [3, 7]
    assert sorted(i for rank in range(4) for i in stage_indices(rank, 4, 3)) == list(range(12))


def family_presets(pipelined: bool = False) -> list[str]:
    """The tiny preset of every registered family (``tiny_preset``), and llama-tiny; ``pipelined``:
    only those of families that pipeline stages can cut."""
    presets = [
        spec.tiny_preset
        for spec in map(family_spec, family_names())
        if spec.tiny_preset and (isinstance(spec, PipelinedFamily) or not pipelined)
    ]
    return presets + ["llama-tiny"]


def family_inputs(run_config, batch: int = 2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Model inputs of a family from its own mock data: tokens, and what reaches every stage."""
    from torch.utils.data import default_collate

    family = family_spec(run_config.model.family)
    config = dataclasses.replace(run_config, data=dataclasses.replace(run_config.data, mock_data=True))
    train, _, _ = family.datasets(config, (batch, 0, 0), None)
    inputs = family.model_batch(default_collate([train[i] for i in range(batch)]))
    return inputs.inputs, inputs.extra


def check_pipeline_stages_compose(run_config) -> None:
    """Two pipeline stages of the family's model, run one after the other, compute the whole model."""
    config = run_config.model
    spec = family_spec(config.family)
    torch.manual_seed(0)
    model = spec.build(config).eval()
    ranges = layer_ranges(config.num_layers, ParallelConfig(), 2)
    first, last = (spec.pipeline_stage(model, ranges[i], i == 0, i == 1) for i in range(2))
    names = {name for part in (first, last) for name, _ in part.named_parameters()}
    assert names == {name for name, _ in model.named_parameters()}  # names stay the whole model's
    stack = spec.blocks(model)[0]
    assert set(spec.blocks(first)[0]) == {"0", "1"} and set(spec.blocks(last)[0]) == {"2", "3"}
    assert set(stack) == {"0", "1", "2", "3"}
    tokens, extra = family_inputs(run_config)
    with torch.no_grad():
        torch.testing.assert_close(last(first(tokens, **extra), **extra), model(tokens, **extra))


@pytest.mark.parametrize("preset", family_presets(pipelined=True))
def test_pipeline_stages_compose_to_the_whole_model(preset):
    check_pipeline_stages_compose(tiny(preset))


def test_load_balanced_positions_and_shards_cover_the_sequence_once():
    assert load_balanced_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert load_balanced_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    held = torch.cat([load_balanced_positions(24, 3, rank) for rank in range(3)])
    assert sorted(held.tolist()) == list(range(24))
    batch = torch.arange(2 * 8).view(2, 8)
    assert shard_sequence(batch, 2, 1).tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_attention_rows_equal_one_process_attention(cp):
    """Each rank's queries against the keys gathered from every rank, masked by global position,
    give exactly the rows of causal attention over the whole sequence."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8 * cp, 4) for _ in range(3))
    whole = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    gathered_k = torch.cat([shard_sequence(k.transpose(1, 2), cp, r) for r in range(cp)], 1).transpose(1, 2)
    gathered_v = torch.cat([shard_sequence(v.transpose(1, 2), cp, r) for r in range(cp)], 1).transpose(1, 2)
    for rank in range(cp):
        local_q = shard_sequence(q.transpose(1, 2), cp, rank).transpose(1, 2)
        mask = causal_mask(local_q.shape[2], cp, rank)
        out = F.scaled_dot_product_attention(local_q, gathered_k, gathered_v, attn_mask=mask)
        expected = shard_sequence(whole.transpose(1, 2), cp, rank).transpose(1, 2)
        torch.testing.assert_close(out, expected)


def check_tp_plan(config) -> None:
    """The family's TP plan names modules that exist (of the whole model and of pipeline stages),
    with known styles, and leaves no linear layer out."""
    spec = family_spec(config.family)
    with torch.device("meta"):
        model = spec.build(config)
    parts = [model]
    if isinstance(spec, PipelinedFamily):
        ranges = layer_ranges(config.num_layers, ParallelConfig(), 2)
        parts += [spec.pipeline_stage(model, ranges[i], i == 0, i == 1) for i in range(2)]
    for part in parts:
        plan = spec.tp_plan(part)
        modules = dict(part.named_modules())
        assert set(plan) <= set(modules) and set(plan.values()) <= set(STYLES)
        linears = {name for name, module in modules.items() if isinstance(module, torch.nn.Linear)}
        assert linears <= set(plan) | {f"{path}.dense" for path in plan}  # no projection left out
        if getattr(part, "embedding", None) is not None:
            assert plan.get("embedding") == "vocab_embedding"  # a tied output's weight is sharded too


@pytest.mark.parametrize("preset", family_presets())
def test_tp_plan_names_existing_modules_with_known_styles_and_covers_every_linear(preset):
    overrides = {"num_layers": 6, "retro_chunk_length": 8} if preset == "retro-tiny" else {}
    check_tp_plan(tiny(preset, **overrides).model)


def test_tied_embedding_gradients_summed_across_stages_equal_the_whole_models():
    """Split a tied model into two stages in one process: after exchanging the embedding gradients,
    both copies hold the whole model's gradient, and the gradient norm counts the copy once."""
    config = tiny(hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = SPEC.build(config.model)
    ranges = layer_ranges(4, ParallelConfig(), 2)
    first, last = (SPEC.pipeline_stage(model, ranges[i], i == 0, i == 1) for i in range(2))
    assert SPEC.tied_parameters(config.model) == ["embedding.weight"]
    tokens = torch.randint(0, config.model.vocab_size, (2, 16))
    model(tokens).float().logsumexp(-1).mean().backward()
    last(first(tokens)).float().logsumexp(-1).mean().backward()
    grads = [first.embedding.weight.grad.clone(), last.embedding.weight.grad.clone()]
    add_peer_gradient(first.embedding.weight, lambda grad: grads[1])
    add_peer_gradient(last.embedding.weight, lambda grad: grads[0])
    for stage in (first, last):
        torch.testing.assert_close(stage.embedding.weight.grad, model.embedding.weight.grad)
    runner = StepRunner(
        ParallelModel([first, last], stage_indices=[0, 1]), SPEC, config.model
    )  # one rank holding both stages: no collective runs
    whole = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert runner.clip_grad_norm(float("inf")) == pytest.approx(whole.item(), rel=1e-6)


def test_model_batch_and_its_sharding_keep_samples_and_positions_together():
    batch = {"tokens": torch.arange(8).view(1, 8), "labels": torch.arange(1, 9).view(1, 8),
             "loss_mask": torch.tensor([[1.0] * 7 + [0.0]]), "position_ids": torch.arange(8).view(1, 8)}  # fmt: skip
    model_batch = SPEC.model_batch(batch)
    assert model_batch.targets.tolist() == [[1, 2, 3, 4, 5, 6, 7, -100]]
    sharded = model_batch.map(lambda t: shard_sequence(t, 2, 0))
    assert sharded.inputs.tolist() == [[0, 1, 6, 7]] and sharded.extra["position_ids"].tolist() == [
        [0, 1, 6, 7]
    ]
    assert sharded.targets.tolist() == [[1, 2, 7, -100]]
    assert dataclasses.is_dataclass(sharded)
