"""Tensor + sequence parallelism (Megatron's TP with --sequence-parallel) as DTensor plans.

Between layers the residual stream is a plain tensor holding this rank's slice of the sequence.
Norms run on that slice (``SequenceParallel``); attention and the MLP gather the sequence, run
their heads / hidden units (q, k, v, fc1, gate column-wise), and reduce-scatter back to sequence
slices (out_proj, fc2 row-wise). Embeddings are vocabulary-parallel; the output layer produces
logits sharded over the vocabulary, which the loss consumes under ``loss_parallel`` without
gathering them. Tied output weights are the embedding's, sharded the same way (over rows).
"""

from __future__ import annotations

from torch import nn


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Shard ``model`` (a GPTModel or one pipeline stage of it) over ``tp_mesh``, in place."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    def gather_sequence():
        return PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))

    vocab_parallel = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    plan = {}
    if model.embedding is not None:
        plan["embedding"] = vocab_parallel
    if getattr(model, "position_embedding", None) is not None:
        plan["position_embedding"] = vocab_parallel  # positions split like a vocabulary
    for name, layer in model.decoder.layers.items():
        prefix = f"decoder.layers.{name}."
        plan[prefix + "attention_norm"] = SequenceParallel()
        plan[prefix + "attention"] = gather_sequence()
        for projection in ("q_proj", "k_proj", "v_proj"):
            plan[prefix + "attention." + projection] = ColwiseParallel()
        plan[prefix + "attention.out_proj"] = RowwiseParallel(output_layouts=Shard(1))
        plan[prefix + "mlp_norm"] = SequenceParallel()
        plan[prefix + "mlp"] = gather_sequence()
        plan[prefix + "mlp.fc1"] = ColwiseParallel()
        if layer.mlp.gate is not None:
            plan[prefix + "mlp.gate"] = ColwiseParallel()
        plan[prefix + "mlp.fc2"] = RowwiseParallel(output_layouts=Shard(1))
    if model.post_process:
        plan["decoder.final_norm"] = SequenceParallel()
        plan["decoder"] = PrepareModuleOutput(
            output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=False
        )
        if model.output is not None:
            plan["output"] = ColwiseParallel(
                input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False
            )
    parallelize_module(model, tp_mesh, plan)
