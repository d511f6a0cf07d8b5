"""Turn a plain single-device model into this rank's part of a parallel one, from outside the model code.

The order follows torchtitan: pipeline split, tensor (+ sequence) parallel, context parallel,
activation recomputation, then data parallelism through FSDP2 (which must see the final modules).
``ParallelModel`` then runs a training or evaluation step of micro-batches on whatever layout.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mtk.config import ParallelConfig
from mtk.parallel.dims import ParallelDims
from mtk.train.loss import LanguageModelLoss, loss_targets


def apply_recompute(model: nn.Module, granularity: str | None) -> None:
    """Recompute activations in the backward pass instead of keeping them.

    ``full``: each transformer layer keeps only its input. ``selective``: each layer's attention block
    is recomputed (it holds the activations that grow with sequence length). RNG state is replayed, so
    dropout masks, and hence losses, are the same as without recomputation. Parameter names do not
    change in checkpoints (the state-dict API drops the wrapper's prefix).
    """
    if granularity is None:
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = model.decoder.layers
    for name, layer in layers.items():
        if granularity == "full":
            layers[name] = checkpoint_wrapper(layer, preserve_rng_state=True)
        else:
            layer.attention = checkpoint_wrapper(layer.attention, preserve_rng_state=True)


def apply_data_parallel(model: nn.Module, dp_mesh, parallel: ParallelConfig) -> None:
    """FSDP2 on each layer, then the whole (stage) model, over the data- (and context-) parallel ranks.

    ``optim_grads_params`` shards parameters, gradients and optimizer state (ZeRO-3);
    ``optim_grads`` keeps parameters gathered from forward to backward (ZeRO-2, Megatron's
    distributed optimizer); ``no_shard`` replicates everything and all-reduces gradients (DDP).
    Gradients are averaged in fp32, or in bf16 with ``grad_reduce_in_bf16``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(reduce_dtype=torch.bfloat16 if parallel.grad_reduce_in_bf16 else None)
    strategy = parallel.sharding_strategy()
    if strategy == "no_shard":
        from torch.distributed._composable.replicate_with_fsdp import replicate

        for layer in model.decoder.layers.values():
            replicate(layer, mesh=dp_mesh, mp_policy=policy)
        replicate(model, mesh=dp_mesh, mp_policy=policy)
        return
    keep_gathered = strategy == "optim_grads"
    for layer in model.decoder.layers.values():
        fully_shard(layer, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=not keep_gathered)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=not keep_gathered)


def parallelize(
    model: nn.Module, dims: ParallelDims, mesh, parallel: ParallelConfig, device: str, seed: int = 0
) -> ParallelModel:
    """This rank's part of ``model`` under the layout ``dims`` (``mesh`` None for a single process).

    A model built on the meta device is split and sharded first, then only this rank's part is
    allocated and initialised from ``seed`` (the same weights as a single-process model), so no
    rank ever holds the whole model.
    """
    on_meta = next(model.parameters()).device.type == "meta"

    def materialise(part: nn.Module) -> None:
        if on_meta:
            part.to_empty(device=device)
            part.init_weights(seed)

    if mesh is None:
        apply_recompute(model, parallel.recompute_granularity)
        materialise(model)
        return ParallelModel([model.to(device)], device=device)
    from mtk.parallel.context import apply_context_parallel
    from mtk.parallel.pipeline import split_model
    from mtk.parallel.tensor import apply_tensor_parallel

    if dims.pp > 1:
        parts, indices = split_model(model, parallel, mesh["pp"].get_local_rank(), dims.pp, dims.vp)
    else:
        parts, indices = [model], [0]
    data_mesh = mesh["dp", "cp"]._flatten("dp_cp") if dims.dp * dims.cp > 1 else None
    for part in parts:
        if not on_meta:
            part.to(device)
        if dims.tp > 1:
            apply_tensor_parallel(part, mesh["tp"])
        if dims.cp > 1:
            apply_context_parallel(part, mesh["cp"])
        apply_recompute(part, parallel.recompute_granularity)
        if data_mesh is not None:
            apply_data_parallel(part, data_mesh, parallel)
        materialise(part)
    return ParallelModel(parts, dims, mesh, device, indices)


@dataclass
class ParallelModel:
    """This rank's model parts (pipeline stages), and how to run micro-batches through them."""

    parts: list[nn.Module]
    dims: ParallelDims = field(default_factory=lambda: ParallelDims(world_size=1))
    mesh: Any = None
    device: str = "cpu"
    stage_indices: list[int] = field(default_factory=lambda: [0])
    _schedules: dict[int, Any] = field(default_factory=dict)
    _loss_scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss

    @property
    def cp_group(self):
        return self.mesh["cp"].get_group() if self.dims.cp > 1 else None

    def parameters(self):
        for part in self.parts:
            yield from part.parameters()

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    def loss_context(self) -> contextlib.AbstractContextManager:
        """Vocabulary-parallel cross-entropy under TP; it must cover both forward and backward."""
        if self.dims.tp == 1:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    def _prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        prepared = {
            "tokens": batch["tokens"],
            "position_ids": batch["position_ids"],
            "targets": loss_targets(batch["labels"], batch["loss_mask"]),
        }
        if self.dims.cp > 1:
            from mtk.parallel.context import shard_sequence

            prepared = shard_sequence(prepared, self.dims.cp, self.mesh["cp"].get_local_rank())
        return prepared

    def step(
        self,
        micro_batches: list[dict[str, torch.Tensor]],
        autocast: Callable[[], contextlib.AbstractContextManager],
        scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Forward (and, given ``scale_loss``, backward) of one global batch's micro-batches.

        Returns this rank's share of the mean micro-batch loss: ``reduce_loss`` makes it the loss.
        Gradients accumulate in the parameters; each micro-batch's loss counts 1 / len(micro_batches).
        """
        batches = [self._prepare(b) for b in micro_batches]
        backward = scale_loss is not None
        with self.loss_context(), contextlib.nullcontext() if backward else torch.no_grad():
            if self.dims.pp > 1:
                return self._pipeline_step(batches, autocast, scale_loss)
            loss_fn = LanguageModelLoss(1.0 / len(batches), self.cp_group)
            total = torch.zeros((), device=self.device)
            for batch in batches:
                with autocast():
                    logits = self.parts[0](batch["tokens"], batch["position_ids"])
                loss = loss_fn(logits, batch["targets"])
                if backward:
                    scale_loss(loss).backward()
                total += loss.detach()
            return total

    def _pipeline_step(self, batches, autocast, scale_loss) -> torch.Tensor:
        from mtk.parallel.pipeline import build_schedule, sync_tied_embedding

        count = len(batches)
        if count not in self._schedules:
            base = LanguageModelLoss(1.0 / count, self.cp_group)
            self._schedules[count] = build_schedule(
                self.parts,
                self.stage_indices,
                self.dims.pp * self.dims.vp,
                self.mesh["pp"],
                self.device,
                count,
                lambda logits, targets: self._loss_scale(base(logits, targets)),
            )
        schedule = self._schedules[count]
        whole = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        first = 0 in self.stage_indices
        last = self.dims.pp * self.dims.vp - 1 in self.stage_indices
        losses: list[torch.Tensor] = []
        args = (whole["tokens"],) if first else ()
        target = whole["targets"] if last else None
        self._loss_scale = scale_loss or (lambda loss: loss)
        with autocast():
            if scale_loss is None:
                schedule.eval(*args, position_ids=whole["position_ids"], target=target, losses=losses)
            else:
                schedule.step(*args, position_ids=whole["position_ids"], target=target, losses=losses)
        if scale_loss is not None:
            sync_tied_embedding(self.parts, self.mesh["pp"])
        total = torch.zeros((), device=self.device)
        for loss in losses:
            total += loss.detach().float()
        unscaled = self._loss_scale(torch.ones((), device=self.device))
        return total / unscaled

    def reduce_loss(self, local: torch.Tensor) -> float:
        """The loss from each rank's share: summed over all ranks, divided by the ranks that hold one copy."""
        if self.mesh is None:
            return local.item()
        value = local.detach().clone()
        dist.all_reduce(value)
        return value.item() / (dist.get_world_size() // self.dims.pp)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Total gradient norm over every stage and shard (a tied embedding copy counted once); clip to it."""
        params, counted = [], []
        for part in self.parts:
            for name, param in part.named_parameters():
                if param.grad is None:
                    continue
                params.append(param)
                if not (name == "embedding.weight" and not part.pre_process):
                    counted.append(param.grad)
        norm = torch.nn.utils.get_total_norm(counted, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        if self.dims.pp > 1:
            norm = norm.pow(2)
            dist.all_reduce(norm, group=self.mesh["pp"].get_group())
            norm = norm.sqrt()
        if math.isfinite(max_norm):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        return norm.item()
