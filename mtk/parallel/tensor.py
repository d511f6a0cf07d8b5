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

import torch
from torch import nn

STYLES = {
    "sequence": "runs on this rank's sequence slice (norms)",
    "gather_sequence": "the module's input arrives as sequence slices and is all-gathered",
    "colwise": "output features split over ranks (q/k/v, fc1, gate)",
    "rowwise": "input features split; the output is reduce-scattered to sequence slices (out_proj, fc2)",
    "vocab_embedding": "rows (vocabulary or positions) split; output as sequence slices",
    "gather_output": "the module's output (sequence slices) is gathered whole, kept a DTensor",
    "vocab_output": "logits split over the vocabulary, kept a DTensor for loss_parallel",
    "gather_sequence_and_context": "gather_sequence for the input and the `context` (cross-attention)",
    "chunked_cross_attention": "RETRO's CCA: the input (sequence slices) gathered whole as a plain "
    "tensor, the neighbour context passed as is, the update cut back to this rank's slice",
    "rowwise_whole": "input features split; the output all-reduced whole (inside RETRO's CCA)",
    "gather_output_local": "the module's output (sequence slices) gathered whole as a plain tensor",
    "replicate": "parameters whole on every rank (small heads), output kept a DTensor",
    "replicate_local_output": "parameters whole on every rank, output a plain tensor (a head the loss "
    "reads whole)",
    "vocab_bias": "parameters whole on every rank but `bias`, split over the vocabulary like the logits "
    "it is added to",
}


def _parameters_style(shard_bias: bool = False, local_output: bool = False):
    """A style that distributes a module's own parameters (whole, or ``bias`` over its rows)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
    from torch.distributed.tensor.parallel import ParallelStyle

    class Parameters(ParallelStyle):
        def _apply(self, module: nn.Module, mesh) -> nn.Module:
            def partition(name: str, submodule: nn.Module, mesh) -> None:
                for key, param in list(submodule.named_parameters(recurse=False)):
                    placement = (
                        Shard(0) if shard_bias and submodule is module and key == "bias" else Replicate()
                    )
                    submodule.register_parameter(
                        key, nn.Parameter(distribute_tensor(param, mesh, [placement]))
                    )

            def inputs(module, args, mesh):
                return tuple(
                    DTensor.from_local(a, mesh, [Replicate()], run_check=False)
                    if isinstance(a, torch.Tensor) and not isinstance(a, DTensor)
                    else a
                    for a in args
                )

            def outputs(module, output, mesh):
                return output.to_local() if local_output and isinstance(output, DTensor) else output

            return distribute_module(module, mesh, partition, inputs, outputs)

    return Parameters()


def _style(name: str):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleInputOutput,
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
        "gather_sequence_and_context": lambda: PrepareModuleInput(
            input_layouts=(Shard(1),),
            desired_input_layouts=(Replicate(),),
            input_kwarg_layouts={"context": Shard(1)},
            desired_input_kwarg_layouts={"context": Replicate()},
        ),
        "chunked_cross_attention": lambda: PrepareModuleInputOutput(
            input_layouts=(Shard(1), None),
            desired_input_layouts=(Replicate(), None),
            use_local_input=True,
            output_layouts=(Replicate(), None),
            desired_output_layouts=(Shard(1), None),
            use_local_output=True,
        ),
        "rowwise_whole": lambda: RowwiseParallel(output_layouts=Replicate()),
        "gather_output_local": lambda: PrepareModuleOutput(
            output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True
        ),
        "replicate": lambda: _parameters_style(),
        "replicate_local_output": lambda: _parameters_style(local_output=True),
        "vocab_bias": lambda: _parameters_style(shard_bias=True),
    }[name]()


def apply_tensor_parallel(model: nn.Module, plan: dict[str, str], tp_mesh) -> None:
    """Shard ``model`` (a whole model or one pipeline stage of it) over ``tp_mesh`` by ``plan``, in place."""
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(model, tp_mesh, {path: _style(style) for path, style in plan.items()})
