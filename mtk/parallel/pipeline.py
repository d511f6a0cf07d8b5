"""Pipeline parallelism through ``torch.distributed.pipelining``.

The model is cut into PP x VP stages by layer ranges (the family spec says how to cut it: embedding
on the first, output and loss on the last). Pipeline rank r holds stages r, r + PP, r + 2PP, ...
(Megatron's interleaved assignment); one stage per rank runs the 1F1B schedule, several the
interleaved one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from mtk.config import ParallelConfig, RunConfig
from mtk.models.spec import PipelinedFamily


def layer_ranges(num_layers: int, parallel: ParallelConfig, stages: int) -> list[range]:
    """The layers of each stage; the embedding / loss may count as a layer (Megatron's flags)."""
    embedding = int(parallel.account_for_embedding_in_pipeline_split)
    loss = int(parallel.account_for_loss_in_pipeline_split)
    per_stage = (num_layers + embedding + loss) // stages
    ranges, start = [], 0
    for stage in range(stages):
        count = per_stage - (embedding if stage == 0 else 0) - (loss if stage == stages - 1 else 0)
        ranges.append(range(start, start + count))
        start += count
    return ranges


def stage_indices(pp_rank: int, pp: int, vp: int) -> list[int]:
    return [pp_rank + chunk * pp for chunk in range(vp)]


def split_model(
    model: nn.Module, family: PipelinedFamily, config: RunConfig, pp_rank: int, pp: int, vp: int
) -> tuple[list[nn.Module], list[int]]:
    """This pipeline rank's stages of ``model`` and their global stage indices."""
    stages = pp * vp
    ranges = layer_ranges(family.pipeline_layers(config.model), config.parallel, stages)
    indices = stage_indices(pp_rank, pp, vp)
    parts = [family.pipeline_stage(model, ranges[i], i == 0, i == stages - 1) for i in indices]
    return parts, indices


def build_schedule(parts, indices, num_stages, pp_mesh, device, micro_batches: int, loss_fn):
    """The 1F1B schedule for one stage per rank, the interleaved 1F1B one for several. With fewer
    micro-batches than stages (the first phases of a batch-size ramp) 1F1B cannot fill the pipeline:
    GPipe runs them instead, with the same gradients and a larger bubble."""
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
    )

    group = pp_mesh.get_group()
    stages = [
        PipelineStage(part, index, num_stages, torch.device(device), group=group)
        for part, index in zip(parts, indices, strict=True)
    ]
    if len(stages) == 1:
        schedule = ScheduleGPipe if micro_batches < num_stages else Schedule1F1B
        return schedule(stages[0], micro_batches, loss_fn=loss_fn, scale_grads=False)
    return ScheduleInterleaved1F1B(stages, micro_batches, loss_fn=loss_fn, scale_grads=False)


def find_parameter(parts: list[nn.Module], name: str) -> nn.Parameter | None:
    """The parameter ``name`` in the first of ``parts`` that holds it."""
    for part in parts:
        found = dict(part.named_parameters()).get(name)
        if found is not None:
            return found
    return None


def add_peer_gradient(param: nn.Parameter, exchange: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Add to ``param``'s gradient the gradient of its copy, which ``exchange`` swaps for this one's."""
    sharded = hasattr(param, "placements")
    # the gradient may come out in another layout than the weight (replicated from the embedding's
    # backward): bring it to the weight's, which is the same on both ranks
    grad = param.grad.redistribute(param.device_mesh, param.placements).to_local() if sharded else param.grad
    total = grad + exchange(grad.contiguous())
    if sharded:
        from torch.distributed.tensor import DTensor

        total = DTensor.from_local(
            total, param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
        )
    param.grad = total


def sync_tied_parameters(parts: list[nn.Module], names: list[str], pp_mesh) -> None:
    """Sum the gradients of parameters held by both the first and the last pipeline stage.

    A tied model uses its embedding twice, on different pipeline ranks; like Megatron, both copies
    start equal and take the same update because their gradients are summed after each backward.
    """
    ranks = pp_mesh.mesh.flatten().tolist()
    me = dist.get_rank()
    if len(ranks) < 2 or me not in (ranks[0], ranks[-1]):
        return
    peer = ranks[-1] if me == ranks[0] else ranks[0]

    def exchange(grad: torch.Tensor) -> torch.Tensor:
        received = torch.empty_like(grad)
        ops = [dist.P2POp(dist.isend, grad, peer), dist.P2POp(dist.irecv, received, peer)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return received

    for name in names:
        param = find_parameter(parts, name)
        if param is not None:
            add_peer_gradient(param, exchange)
