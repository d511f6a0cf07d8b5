"""Turn a plain single-device model into a parallel one, from outside the model code."""

from __future__ import annotations

from torch import nn

from mtk.config import ConfigError
from mtk.parallel.dims import ParallelDims


def parallelize(model: nn.Module, dims: ParallelDims, mesh) -> nn.Module:
    """Apply the layout: data parallelism through FSDP2 (each transformer layer, then the root).

    Parameters, gradients and optimizer state are sharded over the dp ranks; gradients are
    averaged across them, so DP N computes the same update as one process on the whole batch.
    """
    if dims.tp > 1 or dims.pp > 1 or dims.cp > 1:
        raise ConfigError(
            f"TP {dims.tp} / PP {dims.pp} / CP {dims.cp}: this version of mtk trains data parallel only "
            "(--tp, --pp and --cp must be 1)"
        )
    if dims.dp > 1:
        from torch.distributed.fsdp import fully_shard

        dp_mesh = mesh["dp"]
        for layer in model.decoder.layers:
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    return model
