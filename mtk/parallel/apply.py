"""Turn a plain single-device model into this rank's part of a parallel one, from outside the model code.

The order follows torchtitan: FP8 conversion of the layers' linears, pipeline split, tensor (+
sequence) parallel, context parallel, activation recomputation, torch.compile of each transformer
block (``mtk.parallel.compile``, with ``compile`` on), then data parallelism through FSDP2 (which must
see the final modules).
What to split where comes from the family spec (``mtk.models.spec``); ``ParallelModel`` holds the
result: this rank's model parts, the layout and the mesh. Running steps on it is ``mtk.train.step``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mtk.config import ParallelConfig, RunConfig
from mtk.layers.init import initial_values, initialize
from mtk.models.spec import ModelBatch, TrainableFamily
from mtk.parallel.dims import ParallelDims

CHECKPOINT_WRAPPER_PREFIX = "_checkpoint_wrapped_module."


def apply_recompute(blocks: list[nn.ModuleDict], granularity: str | None) -> None:
    """Recompute activations in the backward pass instead of keeping them.

    ``full``: each transformer layer keeps only its input. ``selective``: each layer's attention block
    is recomputed (it holds the activations that grow with sequence length). RNG state is replayed, so
    dropout masks, and hence losses, are the same as without recomputation. Parameter names do not
    change in checkpoints (the state-dict API drops the wrapper's prefix).
    """
    if granularity is None:
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for layers in blocks:
        for name, layer in layers.items():
            if granularity == "full":
                layers[name] = checkpoint_wrapper(layer, preserve_rng_state=True)
            else:
                layer.attention = checkpoint_wrapper(layer.attention, preserve_rng_state=True)


def apply_data_parallel(
    model: nn.Module, blocks: list[nn.ModuleDict], dp_mesh, parallel: ParallelConfig
) -> None:
    """FSDP2 on each layer of ``blocks``, then the whole (stage) model, over the data- (and context-) parallel ranks.

    ``optim_grads_params`` shards parameters, gradients and optimizer state (ZeRO-3);
    ``optim_grads`` keeps parameters gathered from forward to backward (ZeRO-2, Megatron's
    distributed optimizer); ``no_shard`` replicates everything and all-reduces gradients (DDP).
    Gradients are averaged in fp32, or in bf16 with ``grad_reduce_in_bf16``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(reduce_dtype=torch.bfloat16 if parallel.grad_reduce_in_bf16 else None)
    layers = [layer for container in blocks for layer in container.values()]
    strategy = parallel.sharding_strategy()
    if strategy == "no_shard":
        from torch.distributed._composable.replicate_with_fsdp import replicate

        for module in [*layers, model]:
            replicate(module, mesh=dp_mesh, mp_policy=policy)
        return
    keep_gathered = strategy == "optim_grads"
    for module in [*layers, model]:
        fully_shard(module, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=not keep_gathered)


def plain_name(name: str) -> str:
    """A parameter's name in the plain model, seen through recomputation wrappers."""
    return name.replace(CHECKPOINT_WRAPPER_PREFIX, "")


def keep_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Store the whole initial tensor ``full`` into ``param``: this rank's shard of it for a DTensor."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        param = param.to_local()
    param.copy_(full)


def parallelize(
    model: nn.Module,
    family: TrainableFamily,
    config: RunConfig,
    dims: ParallelDims,
    mesh,
    device: str,
    wrap_alone: bool = False,
) -> ParallelModel:
    """This rank's part of ``model`` (configured by ``config``) under the layout ``dims`` (``mesh``
    None for a single process). ``wrap_alone``: wrap data parallelism (the sharding strategy of
    ``config``) even when this is the only data-parallel rank (``mtk bench --fsdp`` measures the
    wrappers' cost on one process; a training run wraps only with two or more).

    A model built on the meta device is split and sharded first, then only this rank's part is
    allocated and initialised from ``config.train.seed`` (the same weights as a single-process
    model), so no rank ever holds the whole model.
    """
    from mtk.parallel.compile import CompilePlan, apply_compile, compile_wanted
    from mtk.parallel.fp8 import convert_to_fp8, plan_fp8

    parallel, seed = config.parallel, config.train.seed
    on_meta = next(model.parameters()).device.type == "meta"
    inits = initial_values(model)  # declared by the plain modules, before anything wraps them
    fp8 = plan_fp8(config, device)
    if fp8 is not None:  # torchao's Float8Linear in place of the layers' linears, before TP and FSDP
        convert_to_fp8(model, family.blocks(model), config, fp8)
    compiled = CompilePlan(*compile_wanted(config, device))

    def materialise(part: nn.Module) -> None:
        if on_meta:
            part.to_empty(device=device)
            initialize(part, seed, inits, assign=keep_shard, name_of=plain_name)

    if mesh is None:
        apply_recompute(family.blocks(model), parallel.recompute_granularity)
        if compiled.enabled:
            apply_compile(model, family.blocks(model), compiled)
        materialise(model)
        return ParallelModel([model.to(device)], device=device, fp8=fp8, compiled=compiled)
    from mtk.parallel.context import apply_context_parallel
    from mtk.parallel.pipeline import split_model
    from mtk.parallel.tensor import apply_tensor_parallel

    if dims.pp > 1:
        parts, indices = split_model(model, family, config, mesh["pp"].get_local_rank(), dims.pp, dims.vp)
    else:
        parts, indices = [model], [0]
    if dims.dp * dims.cp > 1:
        data_mesh = mesh["dp", "cp"]._flatten("dp_cp")
    else:
        data_mesh = mesh["dp"] if wrap_alone else None
    for part in parts:
        if not on_meta:
            part.to(device)
        if dims.tp > 1:
            apply_tensor_parallel(part, family.tp_plan(part), mesh["tp"])
        if dims.cp > 1:
            apply_context_parallel(family.blocks(part), mesh["cp"])
        apply_recompute(family.blocks(part), parallel.recompute_granularity)
        if compiled.enabled:  # the checkpoint-wrapped blocks, before FSDP2 wraps them
            apply_compile(part, family.blocks(part), compiled)
        if data_mesh is not None:
            apply_data_parallel(part, family.blocks(part), data_mesh, parallel)
        materialise(part)
    return ParallelModel(
        parts, dims, mesh, device, indices, fp8, data_parallel=data_mesh is not None, compiled=compiled
    )


@dataclass
class ParallelModel:
    """This rank's model parts (pipeline stages, in order), the layout and its mesh."""

    parts: list[nn.Module]
    dims: ParallelDims = field(default_factory=lambda: ParallelDims(world_size=1))
    mesh: Any = None
    device: str = "cpu"
    stage_indices: list[int] = field(default_factory=lambda: [0])
    fp8: Any = None  # mtk.parallel.fp8.FP8Plan when FP8 is on
    data_parallel: bool = False  # the parts are wrapped by FSDP2 / replicate
    compiled: Any = None  # mtk.parallel.compile.CompilePlan: whether (and what) torch.compile compiled

    @property
    def cp_group(self):
        return self.mesh["cp"].get_group() if self.dims.cp > 1 else None

    @property
    def holds_first_stage(self) -> bool:
        return 0 in self.stage_indices

    @property
    def holds_last_stage(self) -> bool:
        return self.dims.pp * self.dims.vp - 1 in self.stage_indices

    def parameters(self) -> Iterator[nn.Parameter]:
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

    def place(self, batch: ModelBatch) -> ModelBatch:
        """A micro-batch on this rank's device, cut to this rank's part of the sequence under CP."""
        batch = batch.map(lambda tensor: tensor.to(self.device, non_blocking=True))
        if self.dims.cp > 1:
            from mtk.parallel.context import shard_sequence

            rank = self.mesh["cp"].get_local_rank()
            batch = batch.map(lambda tensor: shard_sequence(tensor, self.dims.cp, rank))
        return batch
