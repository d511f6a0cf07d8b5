"""Pipeline parallelism through ``torch.distributed.pipelining``.

The model is cut into PP x VP stages by layer ranges (embedding on the first, final norm, output
and loss on the last). Pipeline rank r holds stages r, r + PP, r + 2PP, ... (Megatron's
interleaved assignment); one stage per rank runs the 1F1B schedule, several the interleaved one.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from mtk.config import ModelConfig, ParallelConfig


def layer_ranges(config: ModelConfig, parallel: ParallelConfig, stages: int) -> list[range]:
    """The decoder layers of each stage; the embedding / loss may count as a layer (Megatron's flags)."""
    embedding = int(parallel.account_for_embedding_in_pipeline_split)
    loss = int(parallel.account_for_loss_in_pipeline_split)
    per_stage = (config.num_layers + embedding + loss) // stages
    ranges, start = [], 0
    for stage in range(stages):
        count = per_stage - (embedding if stage == 0 else 0) - (loss if stage == stages - 1 else 0)
        ranges.append(range(start, start + count))
        start += count
    return ranges


def stage_indices(pp_rank: int, pp: int, vp: int) -> list[int]:
    return [pp_rank + chunk * pp for chunk in range(vp)]


def build_stage(model: nn.Module, layers: range, first: bool, last: bool) -> nn.Module:
    """A copy of ``model`` keeping only what one stage runs; parameter names stay the whole model's."""
    stage = copy.deepcopy(model)
    stage.pre_process, stage.post_process = first, last
    for name in list(stage.decoder.layers.keys()):
        if int(name) not in layers:
            del stage.decoder.layers[name]
    tied = stage.output is None
    if not first:
        stage.position_embedding = None
        if not (last and tied):  # the last stage of a tied model projects with its copy of the embedding
            stage.embedding = None
    if not last:
        stage.decoder.final_norm = None
        stage.output = None
    return stage


def split_model(
    model: nn.Module, parallel: ParallelConfig, pp_rank: int, pp: int, vp: int
) -> tuple[list[nn.Module], list[int]]:
    """This pipeline rank's stages of ``model`` and their global stage indices."""
    stages = pp * vp
    ranges = layer_ranges(model.config, parallel, stages)
    indices = stage_indices(pp_rank, pp, vp)
    parts = [build_stage(model, ranges[i], i == 0, i == stages - 1) for i in indices]
    return parts, indices


def build_schedule(parts, indices, num_stages, pp_mesh, device, micro_batches: int, loss_fn):
    """The 1F1B schedule for one stage per rank, the interleaved 1F1B one for several."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    group = pp_mesh.get_group()
    stages = [
        PipelineStage(part, index, num_stages, torch.device(device), group=group)
        for part, index in zip(parts, indices, strict=True)
    ]
    if len(stages) == 1:
        return Schedule1F1B(stages[0], micro_batches, loss_fn=loss_fn, scale_grads=False)
    return ScheduleInterleaved1F1B(stages, micro_batches, loss_fn=loss_fn, scale_grads=False)


def sync_tied_embedding(parts: list[nn.Module], pp_mesh) -> None:
    """Sum the gradients of the embedding held by the first stage and its copy on the last stage.

    A tied model uses the embedding twice, on different pipeline ranks; like Megatron, both copies
    start equal and take the same update because their gradients are summed after each backward.
    """
    if parts[0].config.untie_embeddings_and_output_weights:
        return
    ranks = pp_mesh.mesh.flatten().tolist()
    me = dist.get_rank()
    holders = [p for p in parts if p.embedding is not None]
    if len(ranks) < 2 or me not in (ranks[0], ranks[-1]) or not holders:
        return
    weight = holders[0].embedding.weight
    sharded = hasattr(weight, "placements")
    # the gradient may come out in another layout than the weight (replicated from the embedding's
    # backward): bring it to the weight's, which is the same on both ranks
    grad = (
        weight.grad.redistribute(weight.device_mesh, weight.placements).to_local() if sharded else weight.grad
    )
    peer = ranks[-1] if me == ranks[0] else ranks[0]
    received = torch.empty_like(grad)
    ops = [dist.P2POp(dist.isend, grad.contiguous(), peer), dist.P2POp(dist.irecv, received, peer)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    total = grad + received
    if sharded:
        from torch.distributed.tensor import DTensor

        total = DTensor.from_local(
            total, weight.device_mesh, weight.placements, shape=weight.shape, stride=weight.stride()
        )
    weight.grad = total
