"""Tensor + sequence parallelism (Megatron's TP with --sequence-parallel) as DTensor plans.

A family's plan is plain data, module path -> style name; ``STYLES`` says what each name means.
Between layers the residual stream is a plain tensor holding this rank's slice of the sequence.
Norms run on that slice; attention and the MLP gather the sequence, run their heads / hidden units
(column-wise), and reduce-scatter back to sequence slices (row-wise). Embeddings are
vocabulary-parallel; the output layer produces logits sharded over the vocabulary, which the loss
consumes under ``loss_parallel`` without gathering them. Tied output weights are the embedding's,
sharded the same way (over rows).
"""

from __future__ import annotations

from torch import nn

STYLES = {
    "sequence": "runs on this rank's sequence slice (norms)",
    "gather_sequence": "the module's input arrives as sequence slices and is all-gathered",
    "colwise": "output features split over ranks (q/k/v, fc1, gate)",
    "rowwise": "input features split; the output is reduce-scattered to sequence slices (out_proj, fc2)",
    "vocab_embedding": "rows (vocabulary or positions) split; output as sequence slices",
    "gather_output": "the module's output (sequence slices) is gathered whole, kept a DTensor",
    "vocab_output": "logits split over the vocabulary, kept a DTensor for loss_parallel",
}


def _style(name: str):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
    )

    if name not in STYLES:
        raise ValueError(f"unknown tensor-parallel style '{name}' (known: {', '.join(STYLES)})")
    return {
        "sequence": lambda: SequenceParallel(),
        "gather_sequence": lambda: PrepareModuleInput(
            input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
        ),
        "colwise": lambda: ColwiseParallel(),
        "rowwise": lambda: RowwiseParallel(output_layouts=Shard(1)),
        "vocab_embedding": lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "gather_output": lambda: PrepareModuleOutput(
            output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=False
        ),
        "vocab_output": lambda: ColwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(-1), use_local_output=False
        ),
    }[name]()


def apply_tensor_parallel(model: nn.Module, plan: dict[str, str], tp_mesh) -> None:
    """Shard ``model`` (a whole model or one pipeline stage of it) over ``tp_mesh`` by ``plan``, in place."""
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(model, tp_mesh, {path: _style(style) for path, style in plan.items()})
