"""One step of micro-batches on any layout: forward, the family's loss, backward, loss and norm reductions.

Without pipeline parallelism each micro-batch runs forward and backward in turn (gradients
accumulate in the parameters); with it, the pipeline schedule runs them all. Each micro-batch's loss
counts 1 / (micro-batches of the step), so accumulated gradients are those of the global batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from mtk.config import ModelConfig
from mtk.models.spec import ModelBatch, TrainableFamily
from mtk.parallel.apply import ParallelModel, plain_name
from mtk.train.loss import LossReduction, cp_total_count

ScaleLoss = Callable[[torch.Tensor], torch.Tensor]


class StepRunner:
    """Runs the micro-batches of one global batch through ``model`` (this rank's parts of a ``family``
    model configured by ``config``)."""

    def __init__(self, model: ParallelModel, family: TrainableFamily, config: ModelConfig) -> None:
        self.model, self.family = model, family
        self.tied = family.tied_parameters(config)
        self.loss_names = family.loss_names(config)
        self._schedules: dict[int, Any] = {}
        self._reductions: dict[int, LossReduction] = {}
        self._loss_scale: ScaleLoss = lambda loss: loss
        self.terms: dict[str, torch.Tensor] = {}  # this rank's share of each loss term, last run

    def _reduction(self, micro_batches: int) -> LossReduction:
        """The reduction of a step of ``micro_batches``, its term totals reset."""
        if micro_batches not in self._reductions:
            cp_group = self.model.cp_group
            self._reductions[micro_batches] = (
                LossReduction(1.0 / micro_batches)
                if cp_group is None
                else LossReduction(1.0 / micro_batches, cp_total_count(cp_group), self.model.dims.cp)
            )
        return self._reductions[micro_batches]

    def run(
        self,
        micro_batches: list[dict[str, torch.Tensor]],
        autocast: Callable[[], contextlib.AbstractContextManager],
        scale_loss: ScaleLoss | None = None,
    ) -> torch.Tensor:
        """Forward (and, given ``scale_loss``, backward) of one global batch's micro-batches.

        Returns this rank's share of the mean micro-batch loss: ``reduce_loss`` makes it the loss.
        """
        batches = [self.model.place(self.family.model_batch(batch)) for batch in micro_batches]
        backward = scale_loss is not None
        with self.model.loss_context(), contextlib.nullcontext() if backward else torch.no_grad():
            if self.model.dims.pp > 1:
                return self._pipeline(batches, autocast, scale_loss)
            reduction = self._reduction(len(batches))
            total = torch.zeros((), device=self.model.device)
            for batch in batches:
                with autocast():
                    loss = reduction(self.family.forward_loss(self.model.parts[0], batch))
                if backward:
                    scale_loss(loss).backward()
                total += loss.detach()
            self.terms = reduction.terms(len(batches))
            return total

    def _pipeline(self, batches: list[ModelBatch], autocast, scale_loss: ScaleLoss | None) -> torch.Tensor:
        from mtk.parallel.pipeline import build_schedule, sync_tied_parameters

        model, count = self.model, len(batches)
        reduction = self._reduction(count)
        if count not in self._schedules:

            def loss_fn(outputs, targets):
                return self._loss_scale(reduction(self.family.loss_terms(outputs, targets)))

            self._schedules[count] = build_schedule(
                model.parts,
                model.stage_indices,
                model.dims.pp * model.dims.vp,
                model.mesh["pp"],
                model.device,
                count,
                loss_fn,
            )
        schedule = self._schedules[count]
        inputs = torch.cat([b.inputs for b in batches])
        extra = {key: torch.cat([b.extra[key] for b in batches]) for key in batches[0].extra}
        target = torch.cat([b.targets for b in batches]) if model.holds_last_stage else None
        args = (inputs,) if model.holds_first_stage else ()
        losses: list[torch.Tensor] = []
        self._loss_scale = scale_loss or (lambda loss: loss)
        with autocast():
            if scale_loss is None:
                schedule.eval(*args, **extra, target=target, losses=losses)
            else:
                schedule.step(*args, **extra, target=target, losses=losses)
        self.terms = reduction.terms(count)
        if scale_loss is not None:
            if self.tied:
                sync_tied_parameters(model.parts, self.tied, model.mesh["pp"])
        total = torch.zeros((), device=model.device)
        for loss in losses:
            total += loss.detach().float()
        unscaled = self._loss_scale(torch.ones((), device=model.device))
        return total / unscaled

    def reduce_loss(self, local: torch.Tensor) -> float:
        """The loss from each rank's share: summed over all ranks, divided by the ranks that hold one copy."""
        if self.model.mesh is None:
            return local.item()
        value = local.detach().clone()
        dist.all_reduce(value)
        return value.item() / (dist.get_world_size() // self.model.dims.pp)

    def reduce_terms(self) -> dict[str, float]:
        """Each loss term of the last run (when the family's loss has more than one), reduced as the loss.
        Every rank calls it: pipeline ranks without the loss contribute zeros."""
        if len(self.loss_names) < 2:
            return {}
        zero = torch.zeros((), device=self.model.device)
        local = torch.stack([self.terms.get(name, zero) for name in self.loss_names])
        if self.model.mesh is not None:
            dist.all_reduce(local)
            local /= dist.get_world_size() // self.model.dims.pp
        return dict(zip(self.loss_names, local.tolist(), strict=True))

    def clip_grad_norm(self, max_norm: float) -> float:
        """Total gradient norm over every stage and shard (a tied copy counted once, on the first stage);
        clip to ``max_norm`` unless it is infinite."""
        params, counted = [], []
        for part, stage in zip(self.model.parts, self.model.stage_indices, strict=True):
            for name, param in part.named_parameters():
                if param.grad is None:
                    continue
                params.append(param)
                if stage == 0 or plain_name(name) not in self.tied:
                    counted.append(param.grad)
        norm = torch.nn.utils.get_total_norm(counted, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        if self.model.dims.pp > 1:
            norm = norm.pow(2)
            dist.all_reduce(norm, group=self.model.mesh["pp"].get_group())
            norm = norm.sqrt()
        if math.isfinite(max_norm):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        return norm.item()
