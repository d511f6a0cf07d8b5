"""Cross-entropy terms of the losses: a sum and a count, which the training step reduces over ranks.

A family's loss is a set of named terms ``(sum, count)``; its value is the sum over terms of
``sum / count`` (``mtk.train.loss``). Keeping the count apart lets context parallelism count the
positions of the whole sequence, spread over ranks, without the model knowing about ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # a target the loss skips


def loss_targets(labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Labels with the positions the loss skips set to ``IGNORE_INDEX``: the one tensor the loss needs."""
    return labels.masked_fill(loss_mask == 0, IGNORE_INDEX)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed fp32 cross-entropy of ``logits`` (..., vocab) against ``targets`` (...), and the count of
    targets that are not ``IGNORE_INDEX``. Logits sharded over the vocabulary (a DTensor under
    ``loss_parallel``) are never gathered."""
    total = F.cross_entropy(
        logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total, (targets != IGNORE_INDEX).sum()
