"""The loss: ignored targets, micro-batch scaling, and the context-parallel factor, against plain references."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import mtk.layers.loss as loss_module
from mtk.config import apply_overrides
from mtk.layers.loss import IGNORE_INDEX, loss_targets, projected_cross_entropy, token_cross_entropy
from mtk.models.gpt import SPEC
from mtk.parallel.apply import ParallelModel
from mtk.parallel.context import shard_sequence
from mtk.presets import load_preset
from mtk.train.loss import LossReduction
from mtk.train.step import StepRunner


def test_ignored_targets_count_for_nothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]], dtype=torch.float32)
    targets = loss_targets(labels, mask)
    assert (targets == IGNORE_INDEX).sum() == 3
    total, count = token_cross_entropy(logits, targets)
    kept = mask.bool()
    reference = F.cross_entropy(logits[kept], labels[kept], reduction="sum")
    torch.testing.assert_close(total, reference)
    assert count.item() == 9
    assert LossReduction()({"lm": (total, count)}).item() == pytest.approx(reference.item() / 9, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_cross_entropy_has_the_loss_and_gradient_of_torchs(dtype):
    """Forward and backward of ``token_cross_entropy`` (softmax - one-hot written in place) against
    ``F.cross_entropy`` with ignored targets, a scaled upstream gradient and low-precision logits."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50, 97, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, 97, (3, 50))
    targets[0, :7] = IGNORE_INDEX
    total, count = token_cross_entropy(logits, targets)
    (total * 0.37).backward()
    ours, logits.grad = logits.grad, None
    reference = F.cross_entropy(
        logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    (reference * 0.37).backward()
    assert count == 143 and total.dtype == torch.float32
    torch.testing.assert_close(total, reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours, logits.grad, rtol=0, atol=1e-7)
    assert torch.all(ours[0, :7] == 0)


def _projected_and_reference(dtype, autocast: torch.dtype | None, chunk_rows: int, monkeypatch):
    """(loss, hidden gradient, weight gradient) of the fused projection and of the plain one."""
    monkeypatch.setattr(loss_module, "fused_chunk_rows", lambda vocab: chunk_rows)
    torch.manual_seed(0)
    hidden = torch.randn(3, 50, 16, dtype=dtype, requires_grad=True)
    weight = (torch.randn(97, 16, dtype=dtype) * 0.3).requires_grad_()
    targets = torch.randint(0, 97, (3, 50))
    targets[0, :7] = IGNORE_INDEX
    results = []
    for fused in (True, False):
        context = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
        with context:
            project = lambda x: F.linear(x, weight)  # noqa: E731
            total, count = (
                projected_cross_entropy(hidden, weight, targets, project)
                if fused
                else token_cross_entropy(project(hidden), targets)
            )
        (total * 0.37).backward()
        assert count == 143 and total.dtype == torch.float32
        results.append((total.detach(), hidden.grad, weight.grad))
        hidden.grad = weight.grad = None
    return results


@pytest.mark.parametrize("chunk_rows", [7, 4096])
def test_the_output_layer_fused_with_the_loss_equals_the_projection_then_the_loss(chunk_rows, monkeypatch):
    """``projected_cross_entropy``: the output layer and the loss in chunks of rows (7: the last chunk
    short; 4,096: one chunk), the gradients computed in the forward and scaled in the backward."""
    (total, hidden_grad, weight_grad), (reference, hidden_ref, weight_ref) = _projected_and_reference(
        torch.float32, None, chunk_rows, monkeypatch
    )
    torch.testing.assert_close(total, reference, rtol=1e-6, atol=0)
    torch.testing.assert_close(hidden_grad, hidden_ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight_grad, weight_ref, rtol=1e-5, atol=1e-7)
    assert torch.all(hidden_grad[0, :7] == 0)  # ignored positions: no gradient


def test_the_fused_output_layer_under_bf16_autocast_is_as_close_to_fp32_as_the_plain_one(monkeypatch):
    """Under bf16 autocast both forms multiply in bf16; the fused one accumulates the weight's
    gradient over chunks in fp32. Each is compared with the fp32 result: the fused one is no farther."""
    exact, _ = _projected_and_reference(torch.float32, None, 7, monkeypatch)
    fused, plain = _projected_and_reference(torch.float32, torch.bfloat16, 7, monkeypatch)
    assert fused[1].dtype == fused[2].dtype == torch.float32
    torch.testing.assert_close(fused[0], exact[0], rtol=1e-3, atol=0)
    for index in (1, 2):  # the hidden states' gradient, the weight's
        error, plain_error = ((result[index] - exact[index]).norm() for result in (fused, plain))
        assert error <= 1.1 * plain_error and error < 1e-2 * exact[index].norm()


def test_the_output_layer_is_not_fused_where_it_cannot_be(monkeypatch):
    """Under no_grad the fused form computes no gradients; under fp16 (loss scaling) it gives way to
    the projection: ``project`` is what runs."""
    calls = []

    def project(x):
        calls.append(x.shape)
        return F.linear(x, weight)

    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8), torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        total, _ = projected_cross_entropy(hidden, weight, targets, project)
    assert calls == [] and not total.requires_grad
    torch.testing.assert_close(total, token_cross_entropy(F.linear(hidden, weight), targets)[0].detach())
    with torch.autocast("cpu", dtype=torch.float16):
        projected_cross_entropy(hidden, weight, targets, project)
    assert calls == [torch.Size([2, 5, 8])]


def test_terms_add_and_scale_by_micro_batches():
    terms = {"a": (torch.tensor(6.0), torch.tensor(3)), "b": (torch.tensor(1.0), torch.tensor(4))}
    assert LossReduction(scale=0.5)(terms).item() == pytest.approx(0.5 * (2.0 + 0.25))
    assert LossReduction()({"empty": (torch.tensor(0.0), torch.tensor(0))}).item() == 0.0  # no 0 / 0


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_losses_average_to_the_whole_sequence_loss(cp):
    """Each cp rank sees part of the sequence; with the count summed over ranks and the cp factor,
    the ranks' mean (what gradient averaging over dp x cp takes) is the one-process loss."""
    torch.manual_seed(1)
    logits = torch.randn(2, 8 * cp, 13)
    targets = torch.randint(0, 13, (2, 8 * cp))
    targets[0, :5] = IGNORE_INDEX  # uneven counts across ranks
    whole = LossReduction()({"lm": token_cross_entropy(logits, targets)})
    total_count = (targets != IGNORE_INDEX).sum()
    per_rank = [
        LossReduction(total_count=lambda count: total_count, cp_size=cp)(
            {"lm": token_cross_entropy(shard_sequence(logits, cp, r), shard_sequence(targets, cp, r))}
        )
        for r in range(cp)
    ]
    torch.testing.assert_close(torch.stack(per_rank).mean(), whole)


def two_micro_batches(config):
    """A seeded GPT model, a batch of 4 sequences of 16 tokens, its two halves, and their step runner."""
    torch.manual_seed(0)
    model = SPEC.build(config.model)
    tokens = torch.randint(0, 4000, (4, 17))
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(4, 16),
             "position_ids": torch.arange(16).expand(4, 16)}  # fmt: skip
    halves = [{k: v[i : i + 2] for k, v in batch.items()} for i in (0, 2)]
    return model, batch, halves, StepRunner(ParallelModel([model]), SPEC, config.model)


def test_a_step_of_micro_batches_is_the_global_batch_loss_and_gradient():
    config = apply_overrides(load_preset("gpt-tiny").sections, {"seq_length": 16, "hidden_dropout": 0.0,
                                                                "attention_dropout": 0.0})  # fmt: skip
    model, batch, halves, runner = two_micro_batches(config)
    loss = runner.reduce_loss(runner.run(halves, contextlib.nullcontext, lambda loss: loss))
    accumulated = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = F.cross_entropy(model(batch["tokens"]).flatten(0, 1), batch["labels"].flatten())
    reference.backward()
    assert loss == pytest.approx(reference.item(), rel=1e-6)
    for got, want in zip(accumulated, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_a_scaled_step_reports_the_loss_and_unscales_to_the_same_gradients():
    """The loss scaler (mtk/train/scaler.py) multiplies what backward starts from, not the reported loss;
    unscaling gives back the gradients of the plain step (a power-of-two scale: exactly)."""
    from mtk.config import TrainConfig
    from mtk.train.scaler import LossScaler

    config = apply_overrides(load_preset("gpt-tiny").sections, {"seq_length": 16})
    model, batch, halves, runner = two_micro_batches(config)
    plain = runner.reduce_loss(runner.run(halves, contextlib.nullcontext, lambda loss: loss))
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    scaler = LossScaler(TrainConfig(loss_scale=2.0**12))
    scaled = runner.reduce_loss(runner.run(halves, contextlib.nullcontext, scaler.scale_loss))
    assert [p.grad for p in model.parameters()][0].abs().max() > 2**11 * expected[0].abs().max()
    scaler.unscale_(model.parameters())
    assert scaled == plain
    for got, want in zip((p.grad for p in model.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cpu_training_keeps_freed_host_memory_for_the_next_step():
    import sys

    from mtk.train.loop import keep_host_heap

    # glibc (Linux) accepts both settings; other platforms are left as they are
    assert keep_host_heap() is sys.platform.startswith("linux")
