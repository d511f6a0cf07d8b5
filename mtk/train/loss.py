"""The loss of a micro-batch from a family's loss terms, the same value whatever the parallel layout."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mtk.layers.loss import loss_value
from mtk.models.spec import LossTerms


@dataclass
class LossReduction:
    """The loss of a micro-batch by ``mtk.layers.loss.loss_value`` (sum over terms of ``sum / count``),
    times ``scale`` (1 / micro-batches of the step).

    Logits sharded over the vocabulary give a replicated DTensor sum, read whole. Under context
    parallelism each rank holds part of the sequence: ``total_count`` sums a count over the cp ranks,
    and the loss is multiplied by ``cp_size``, because gradients are averaged over the cp ranks
    together with the data-parallel ones.
    """

    scale: float = 1.0
    total_count: Callable[[torch.Tensor], torch.Tensor] | None = None  # cp: the count over the cp ranks
    cp_size: int = 1
    # each call's terms (detached, scaled the same way): what metrics report
    calls: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def __call__(self, terms: LossTerms) -> torch.Tensor:
        whole = {
            name: (total.full_tensor() if hasattr(total, "full_tensor") else total, count)
            for name, (total, count) in terms.items()
        }
        loss, values = loss_value(whole, self.scale * self.cp_size, self.total_count)
        self.calls.append({name: value.detach().float() for name, value in values.items()})
        return loss

    def terms(self, calls: int) -> dict[str, torch.Tensor]:
        """Each term summed over the last ``calls`` calls (a pipeline schedule makes one more, on
        placeholder tensors, the first time it runs), and the record emptied."""
        summed: dict[str, torch.Tensor] = {}
        for values in self.calls[-calls:] if calls else []:
            for name, value in values.items():
                summed[name] = summed.get(name, 0) + value
        self.calls = []
        return summed


def cp_total_count(cp_group) -> Callable[[torch.Tensor], torch.Tensor]:
    """Sum a count over the context-parallel ranks of ``cp_group``."""
    import torch.distributed as dist

    def total(count: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(count, group=cp_group)
        return count

    return total
