"""fp16 loss scaling as Megatron's: a dynamic scale with hysteresis (its DynamicGradScaler), or a static one.

The loss is multiplied by the scale before backward, so that small fp16 gradients do not flush to
zero, and the gradients are divided by it before clipping and the optimizer. A step whose gradients
overflowed (inf or NaN on any rank) is skipped by the caller, which reports it to ``update``.

Dynamic scaling (``--initial-loss-scale``, ``--min-loss-scale``, ``--loss-scale-window``,
``--hysteresis``): each overflow spends one unit of hysteresis, and once it is spent every overflow
halves the scale, never below the minimum; ``loss_scale_window`` overflow-free steps in a row double
the scale and restore the hysteresis. torch's GradScaler has no hysteresis: it halves on every overflow.
A static ``--loss-scale`` never changes; overflowing steps are skipped all the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from mtk.config import TrainConfig

GROWTH = 2.0  # Megatron's growth_factor
BACKOFF = 0.5  # Megatron's backoff_factor


class LossScaler:
    """The loss scale of a run configured by ``config``: active with fp16 or a static ``loss_scale``,
    else the identity (scale 1, nothing to save)."""

    def __init__(self, config: TrainConfig) -> None:
        self.enabled = config.precision == "fp16" or config.loss_scale is not None
        self.dynamic = self.enabled and config.loss_scale is None
        self.scale = float(config.loss_scale or config.initial_loss_scale) if self.enabled else 1.0
        self.min_scale = config.min_loss_scale
        self.window = config.loss_scale_window
        self.hysteresis = config.hysteresis
        self.growth_tracker = 0  # overflow-free steps since the last overflow or growth
        self.hysteresis_tracker = config.hysteresis  # overflows left before the scale halves

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the scale: what backward starts from."""
        return loss * self.scale if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Divide the gradients of ``parameters`` by the scale, in place (each rank its own shards)."""
        if not self.enabled:
            return
        grads = [_local(p.grad) for p in parameters if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, found_inf: bool) -> None:
        """After each step: ``found_inf`` says whether its gradients overflowed (on any rank)."""
        if not self.dynamic:
            return
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * BACKOFF, self.min_scale)
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.window:
            self.growth_tracker = 0
            self.hysteresis_tracker = self.hysteresis
            self.scale *= GROWTH

    def state_dict(self) -> dict[str, Any]:
        """The numbers a resumed run needs (empty when scaling is off)."""
        if not self.enabled:
            return {}
        return {
            "scale": self.scale,
            "growth_tracker": self.growth_tracker,
            "hysteresis_tracker": self.hysteresis_tracker,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; a static scale keeps its configured value, as Megatron's does.

        A state without hysteresis (earlier mtk saved torch's GradScaler: ``_growth_tracker``) starts with
        the whole hysteresis; an empty one (saved without scaling) leaves the configured start.
        """
        if not self.dynamic or "scale" not in state:
            return
        self.scale = max(float(state["scale"]), self.min_scale)
        self.growth_tracker = int(state.get("growth_tracker", state.get("_growth_tracker", 0)))
        self.hysteresis_tracker = int(state.get("hysteresis_tracker", self.hysteresis))


def _local(grad: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor gradient (a plain tensor as it is)."""
    return grad.to_local() if hasattr(grad, "to_local") else grad
