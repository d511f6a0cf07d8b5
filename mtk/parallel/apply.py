"""Turn a plain single-device model into a parallel one, from outside the model code.

The order follows torchtitan: activation recomputation, then FSDP2 (which must see the final modules).
"""

from __future__ import annotations

from torch import nn

from mtk.config import ConfigError, ParallelConfig
from mtk.parallel.dims import ParallelDims


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
    for index, layer in enumerate(layers):
        if granularity == "full":
            layers[index] = checkpoint_wrapper(layer, preserve_rng_state=True)
        else:
            layer.attention = checkpoint_wrapper(layer.attention, preserve_rng_state=True)


def parallelize(model: nn.Module, dims: ParallelDims, mesh, parallel: ParallelConfig) -> nn.Module:
    """Apply the layout: recomputation, then data parallelism through FSDP2 (each layer, then the root).

    Parameters, gradients and optimizer state are sharded over the dp ranks; gradients are
    averaged across them, so DP N computes the same update as one process on the whole batch.
    """
    if dims.tp > 1 or dims.pp > 1 or dims.cp > 1:
        raise ConfigError(
            f"TP {dims.tp} / PP {dims.pp} / CP {dims.cp}: this version of mtk trains data parallel only "
            "(--tp, --pp and --cp must be 1)"
        )
    apply_recompute(model, parallel.recompute_granularity)
    if dims.dp > 1:
        from torch.distributed.fsdp import fully_shard

        dp_mesh = mesh["dp"]
        for layer in model.decoder.layers:
            fully_shard(layer, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    return model
