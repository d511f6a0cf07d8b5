"""Language-model loss, the same function whatever the parallel layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


def loss_targets(labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Labels with the positions the loss skips set to ``IGNORE_INDEX``: the one tensor the loss needs."""
    return labels.masked_fill(loss_mask == 0, IGNORE_INDEX)


@dataclass
class LanguageModelLoss:
    """Mean next-token cross-entropy (fp32) over the counted positions of one micro-batch, times ``scale``.

    Logits may be a DTensor sharded over the vocabulary (under ``loss_parallel``): they are never
    gathered. With context parallelism each rank holds part of the sequence (``cp_group``): the
    count is summed over the group and the loss multiplied by its size, because gradients are
    averaged over it together with the data-parallel ranks.
    """

    scale: float = 1.0
    cp_group: Any = None

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        if hasattr(total, "full_tensor"):  # replicated DTensor from the vocabulary-parallel loss
            total = total.full_tensor()
        count = (targets != IGNORE_INDEX).sum()
        factor = self.scale
        if self.cp_group is not None:
            dist.all_reduce(count, group=self.cp_group)
            factor *= dist.get_world_size(self.cp_group)
        return total * factor / count.clamp(min=1)
