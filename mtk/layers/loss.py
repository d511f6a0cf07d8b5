"""Cross-entropy terms of the losses, and the one convention that turns terms into the loss.

A family's loss is a set of named terms ``(summed loss, count)`` (``token_cross_entropy``);
``loss_value`` makes them the loss. Keeping the count apart lets context parallelism count the
positions of the whole sequence, spread over ranks, without the model knowing about ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a target the loss skips

LossTerm = tuple[torch.Tensor, torch.Tensor]  # (summed loss, the count it averages over)


def loss_targets(labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Labels with the positions the loss skips set to ``IGNORE_INDEX``: the one tensor the loss needs."""
    return labels.masked_fill(loss_mask == 0, IGNORE_INDEX)


class _SummedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (tokens, vocab) logits whose backward is ``softmax - one-hot`` written
    over the saved log-probabilities in place: one pass over a (tokens, vocab) tensor where
    ``F.cross_entropy``'s backward makes three (a zero-filled one-hot gradient, its scatter, then
    log-softmax's backward into a new tensor). Same mathematics; the idea of Megatron's
    ``--cross-entropy-loss-fusion``. On CPU it takes the loss's backward from 6 ms to 2 ms at
    1,024 x 4,096 (gpt-tiny's step), about a tenth of the step."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=-1)
        keep = targets != IGNORE_INDEX
        index = targets.masked_fill(~keep, 0).unsqueeze(1)
        picked = log_probs.gather(1, index).squeeze(1).masked_fill(~keep, 0.0)
        ctx.save_for_backward(log_probs, index, keep)
        return -picked.sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        log_probs, index, keep = ctx.saved_tensors
        probs = log_probs.exp_()  # the log-probabilities are needed by nothing else: reuse their memory
        probs.scatter_add_(1, index, probs.new_full(index.shape, -1.0))
        return probs.mul_((grad * keep).unsqueeze(1)), None


def fused_chunk_rows(vocab: int) -> int:
    """Rows of logits the fused output layer and loss holds at once: 32 MiB of fp32 logits."""
    return max(1, 32 * 2**20 // (4 * vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, with the gradients of
    ``hidden`` and ``weight`` computed in the forward, chunk of rows by chunk: the (tokens, vocab)
    logits never exist whole, and each chunk is projected, turned into ``softmax - one-hot`` in place
    (one exponential per logit, where a log-softmax and its backward take two) and multiplied back
    while it is in cache. The backward scales the saved gradients. The same mathematics as the
    projection followed by ``_SummedCrossEntropy``; on CPU it takes gpt-tiny's output layer and loss
    (1,024 x 64 -> 4,096) from about 12 ms to 9.5 ms forward and backward. (Liger's and torchtune's
    chunked "linear cross-entropy" do the same; Megatron materialises the logits.)"""

    @staticmethod
    def forward(ctx, hidden, weight, targets, with_grad: bool):  # noqa: ANN001, ANN205
        keep = targets != IGNORE_INDEX
        index = targets.masked_fill(~keep, 0).unsqueeze(1)
        rows = fused_chunk_rows(weight.shape[0])
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if with_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if with_grad else None
        for start in range(0, hidden.shape[0], rows):
            part, chunk = slice(start, start + rows), hidden[start : start + rows]
            projected = torch.mm(chunk, weight.t())  # the compute dtype: autocast's where it is on
            z = projected.float()
            picked = z.gather(1, index[part]).squeeze(1)
            top = z.amax(1, keepdim=True)
            z.sub_(top).exp_()
            sums = z.sum(1, keepdim=True)
            kept = keep[part]
            total += (sums.log() + top).squeeze(1).sub_(picked).masked_fill_(~kept, 0.0).sum()
            if with_grad:
                z.mul_(kept.unsqueeze(1) / sums)  # softmax; rows the loss skips are zero
                z.scatter_add_(1, index[part], -kept.to(z.dtype).unsqueeze(1))
                grad = z.to(projected.dtype)
                grad_hidden[part] = torch.mm(grad, weight)
                if grad.dtype == grad_weight.dtype:
                    grad_weight.addmm_(grad.t(), chunk)
                else:  # accumulated in fp32 over the chunks
                    grad_weight += torch.mm(grad.t(), chunk)
        if with_grad:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN205
        grad_hidden, grad_weight = ctx.saved_tensors  # used once: scaled in place
        return grad_hidden.mul_(grad), grad_weight.mul_(grad), None, None


def _plain(tensor: torch.Tensor) -> bool:
    return type(tensor) in (torch.Tensor, torch.nn.Parameter)


def projected_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor],
) -> LossTerm:
    """``token_cross_entropy(project(hidden), targets)`` where ``project`` is the output layer,
    ``hidden @ weight.T``: fused with the loss (``_LinearCrossEntropy``) when both are plain tensors
    outside fp16, else through ``project`` (a tensor-parallel module's hooks and sharded logits,
    fp16's loss scaling, which the unscaled gradients of the fused form would underflow)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if not (_plain(hidden) and _plain(weight)) or torch.float16 in (dtype, weight.dtype):
        return token_cross_entropy(project(hidden), targets)
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    flat = hidden.flatten(0, -2)
    total = _LinearCrossEntropy.apply(flat, weight, targets.flatten(), with_grad)
    return total, (targets != IGNORE_INDEX).sum()


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> LossTerm:
    """Summed fp32 cross-entropy of ``logits`` (..., vocab) against ``targets`` (...), and the count of
    targets that are not ``IGNORE_INDEX``. Logits sharded over the vocabulary (a DTensor under
    ``loss_parallel``) are never gathered: tensor subclasses take ``F.cross_entropy``, which DTensor
    shards; plain tensors the fused form."""
    logits, flat_targets = logits.float().flatten(0, -2), targets.flatten()
    if type(logits) is not torch.Tensor:
        total = F.cross_entropy(logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="sum")
    else:
        total = _SummedCrossEntropy.apply(logits, flat_targets)
    return total, (targets != IGNORE_INDEX).sum()


def loss_value(
    terms: Mapping[str, LossTerm],
    factor: float = 1.0,
    total_count: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss convention, stated and computed here only: each term ``(sum, count)`` is worth
    ``sum * factor / count`` (a count of 0 counts as 1: a term with nothing to average adds 0), and
    the loss is the sum of the terms' values. Returns the loss and each term's value.

    ``total_count`` (default: the count as it is) gives the count over the ranks that share a
    sequence (context parallelism sums it over the cp ranks). ``factor`` is what the training step
    multiplies by (``mtk.train.loss.LossReduction``): 1 / micro-batches, so that a step's loss is
    the mean of its micro-batches', times the cp size, because gradients are averaged over the cp
    ranks together with the data-parallel ones. The step's loss is then averaged over the
    data-parallel ranks (``mtk.train.step.StepRunner.reduce_loss``).
    """
    loss, values = None, {}
    for name, (total, count) in terms.items():
        if total_count is not None:
            count = total_count(count)
        values[name] = total * factor / count.clamp(min=1)
        loss = values[name] if loss is None else loss + values[name]
    if loss is None:
        raise ValueError("a loss needs at least one (sum, count) term")
    return loss, values
