"""Per-GPU memory of a training layout, estimated from the config alone, and a layout that fits.

The estimate follows what mtk allocates: fp32 parameters (bf16/fp16 through autocast), fp32
gradients, two fp32 Adam moments; FSDP2 shards them over the data- and context-parallel ranks
as the sharding strategy says. Activations per layer follow Korthikanti et al. (2022) for
mtk's layers: what each op keeps for the backward pass, per token, with tensor + sequence
parallelism dividing what is split over heads or over the sequence, and the inputs that
sequence parallelism all-gathers kept whole. The first pipeline stage holds the activations
of PP micro-batches in flight under 1F1B (x (1 + (PP-1)/(PP x VP)) interleaved). On GPU the
attention kernel keeps no score matrix; on CPU the math kernel does, and the estimate adds it.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace

import torch

from mtk.config import ConfigError, RunConfig, micro_batches_per_step, run_problems
from mtk.layers.loss import fused_chunk_rows
from mtk.models import family_spec
from mtk.models.spec import GIB, available_memory
from mtk.parallel.dims import ParallelDims

MARGIN = 0.2  # the estimate lies within 20% of measured peaks (tests/unit/test_plan.py)
HEADROOM = 0.9  # share of a GPU's memory a layout may plan to use (allocator fragmentation, workspaces)
STRATEGIES = ("no_shard", "optim_grads", "optim_grads_params")
# short names of the data-parallel sharding strategies, for one-line layouts
SHARDING_NAMES = {"no_shard": "ddp", "optim_grads": "zero2", "optim_grads_params": "zero3"}
RECOMPUTE = (None, "selective", "full")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    vp: int = 1
    strategy: str = "no_shard"
    recompute: str | None = None

    def describe(self, world_size: int) -> str:
        """Compact: ``TP8 PP16 DP8 zero2`` (CP and VP when above 1, recomputation when on)."""
        dp = world_size // (self.tp * self.pp * self.cp)
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        parts += [f"VP{self.vp}"] if self.vp > 1 else []
        parts += [f"CP{self.cp}"] if self.cp > 1 else []
        parts += [f"DP{dp}", SHARDING_NAMES[self.strategy]]
        return " ".join(parts + ([f"recompute-{self.recompute}"] if self.recompute else []))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the busiest rank: the sum over the pipeline stage that needs the most."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits


def _activation_bytes_per_token(config: RunConfig, layout: Layout) -> tuple[float, float]:
    """(kept per layer, transient while one layer is recomputed) per local token, in bytes."""
    model = config.model
    t = layout.tp
    h, f = model.hidden_size, model.ffn_hidden_size
    kv = model.num_query_groups * model.kv_channels
    act = 4 if config.train.precision == "fp32" else 2  # autocast keeps matmul inputs in bf16/fp16
    residual = 4  # the residual stream and norm inputs stay fp32
    norm_inputs = 2 * h / t * residual  # sequence-parallel slices
    gathered = 2 * h * act  # attention / MLP inputs, all-gathered over the sequence and kept whole
    attention = (h + 2 * kv * layout.cp) / t * act + 2 * h / t * act  # q, k, v (all-gathered over CP), output
    mlp = (3 if model.swiglu or model.geglu else 2) * f / t * act
    full = norm_inputs + gathered + attention + mlp
    if layout.recompute == "full":
        return h / t * residual, full
    if layout.recompute == "selective":  # attention recomputed from its (sequence-parallel) input
        return norm_inputs + h / t * residual + h * act + mlp, attention + h * act
    return full, 0.0


def estimate_memory(config: RunConfig, layout: Layout, world_size: int) -> MemoryEstimate:
    model, train = config.model, config.train
    dims = ParallelDims(world_size, layout.tp, layout.pp, layout.cp, layout.vp)
    t, pp, vp = layout.tp, layout.pp, layout.vp
    shards = dims.dp * layout.cp  # FSDP shards over data- and context-parallel ranks together
    h = model.hidden_size
    vocab = model.padded_vocab_size(t)
    stacks = family_spec(model.family).stacks(model)
    # every stack's layers, each weighted by its tokens per sample against the first stack's
    layer = sum(count * parameters for count, parameters, _ in stacks) / sum(c for c, _, _ in stacks) / t
    layers_per_rank = sum(count for count, _, _ in stacks) / pp
    activation_layers = sum(count * length / model.seq_length for count, _, length in stacks) / pp
    embedding = vocab * h / t + (
        model.max_position_embeddings * h / t if model.position_embedding_type == "learned_absolute" else 0
    )
    output = vocab * h / t if (model.untie_embeddings_and_output_weights or pp > 1) else 0
    tokens = train.micro_batch_size * model.seq_length / layout.cp
    kept, transient = _activation_bytes_per_token(config, layout)
    # the largest batch of the run (after a batch-size ramp) keeps the most micro-batches in flight
    micro_batches = micro_batches_per_step(max(train.batch_sizes()), train.micro_batch_size, dims.dp)
    in_flight = 1.0 if pp == 1 else min(pp, micro_batches) * (1 + (pp - 1) / (pp * vp) if vp > 1 else 1)
    # the last stage's loss: the logits, their fp32 copy (none in fp32) and the fp32 log-probabilities
    # at its forward; in the backward pass the log-probabilities become the gradient in place
    # (mtk.layers.loss) and are freed after the output layer, so a recomputed layer's transient memory
    # meets the logits alone
    logit_bytes, kept_logit_bytes = (8, 4) if train.precision == "fp32" else (10, 2)
    # where the output layer is fused with the loss (mtk.layers.loss.projected_cross_entropy: one
    # stage, no tensor parallelism, no fp16), a chunk of logits at a time (projected and in fp32),
    # and the gradients of the hidden states and of the output weight kept from forward to backward
    fused = pp == 1 and t == 1 and train.precision != "fp16" and family_spec(model.family).model_takes_targets
    chunk = min(tokens, fused_chunk_rows(vocab)) * vocab * (4 if train.precision == "fp32" else 6)
    best = None
    for stage in ("first", "last") if pp > 1 else ("only",):
        params = layers_per_rank * layer
        params += embedding if stage in ("first", "only") else 0
        params += output if stage in ("last", "only") else 0
        sharded = layout.strategy != "no_shard"
        weights = 4 * params / (shards if layout.strategy == "optim_grads_params" else 1)
        if layout.strategy == "optim_grads_params" and shards > 1:
            weights += 2 * 4 * layer  # the layers gathered around the one computing
        elif layout.strategy == "optim_grads" and shards > 1:
            weights += 4 * params / shards  # the shards FSDP keeps besides the gathered parameters
        gradients = 4 * params / (shards if sharded else 1)
        optimizer = 8 * params / (shards if sharded else 1)
        stage_in_flight = in_flight if stage in ("first", "only") else 1.0
        boundary = 4 * h * (1 if stage == "first" else 3)  # embedding output; final norm in and out
        logit_values = tokens * vocab / t if stage in ("last", "only") else 0.0
        logits = logit_values * logit_bytes
        freed = logit_values * (logit_bytes - kept_logit_bytes)
        if fused:
            logits, freed = chunk + 4 * (vocab + tokens) * h, chunk
        activations = tokens * (kept * activation_layers + boundary) * stage_in_flight
        activations += max(0.0, tokens * transient - freed)
        estimate = MemoryEstimate(weights, gradients, optimizer, activations, logits)
        if best is None or estimate.total > best.total:
            best = estimate
    return best


def check_fits(config: RunConfig, world_size: int, device: str) -> None:
    """ConfigError naming the estimate and the memory available when a training run of ``config`` on
    ``world_size`` ranks cannot fit ``device``, before anything is allocated. Only a run whose
    estimate exceeds the memory even at the estimate's lower margin is refused; on a host without
    CUDA, the ranks of this node share its memory."""
    where = torch.device(device)
    available = available_memory(where)
    if available is None:
        return
    estimate = estimate_memory(config, preset_layout(config), world_size)
    ranks = 1 if where.type == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if estimate.total * ranks * (1 - MARGIN) <= available:
        return
    parameters = family_spec(config.model.family).num_parameters(config.model)
    parts = ", ".join(
        f"{name} {getattr(estimate, name) / GIB:,.1f}"
        for name in ("weights", "gradients", "optimizer", "activations", "logits")
    )
    shared = f" x {ranks} ranks on this host" if ranks > 1 else ""
    raise ConfigError(
        f"the run does not fit in memory: {parameters:,} parameters, and training needs about "
        f"{estimate.total / GIB:,.1f} GiB per rank{shared} ({parts} GiB), while {where} has "
        f"{available / GIB:,.1f} GiB available. Lower --micro-batch-size or --seq-length, recompute "
        "activations (--recompute-granularity), split the model (--tp, --pp) or choose a smaller one; "
        "`mtk plan` suggests a layout"
    )


def preset_layout(config: RunConfig) -> Layout:
    parallel = config.parallel
    return Layout(
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.context_parallel_size,
        parallel.virtual_pipeline_model_parallel_size or 1,
        parallel.sharding_strategy(),
        parallel.recompute_granularity,
    )


# what a plan does not depend on: where the data is, how long the run is, whether mtk trains the
# family yet (its shape is what the estimate needs) or in which precision the matmuls run
PLAN_IGNORES = ("data", "length", "schedule", "family", "precision")


def with_layout(config: RunConfig, layout: Layout) -> RunConfig:
    """``config`` with the parallel sizes of ``layout``."""
    parallel = replace(
        config.parallel,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        context_parallel_size=layout.cp,
        virtual_pipeline_model_parallel_size=layout.vp if layout.vp > 1 else None,
    )
    return replace(config, parallel=parallel)


def layout_problems(config: RunConfig, layout: Layout, world_size: int) -> list[str]:
    """Why ``layout`` cannot train ``config`` on ``world_size`` GPUs (``mtk.config.check_run``'s rules)."""
    family = family_spec(config.model.family)
    problems = run_problems(with_layout(config, layout), world_size, family)
    return [p.message for p in problems if p.rule not in PLAN_IGNORES]


def valid(config: RunConfig, layout: Layout, world_size: int) -> bool:
    return not layout_problems(config, layout, world_size)


def suggest_layout(
    config: RunConfig,
    world_size: int,
    gpu_memory_gib: float,
    gpus_per_node: int = 8,
    headroom: float = HEADROOM,
) -> tuple[Layout, MemoryEstimate] | None:
    """The cheapest layout that fits: least recomputation, then least model parallelism (TP within a
    node before CP, CP before PP), with Megatron's distributed optimizer whenever there is DP."""
    powers = [1, 2, 4, 8, 16, 32, 64]
    candidates = []
    for recompute, tp, pp, cp in itertools.product(RECOMPUTE, powers, powers, powers[:4]):
        if tp > gpus_per_node:
            continue
        dp = world_size // max(1, tp * pp * cp)
        for strategy in ("optim_grads", "optim_grads_params") if dp * cp > 1 else ("no_shard",):
            layout = Layout(tp, pp, cp, 1, strategy, recompute)
            if not valid(config, layout, world_size):
                continue
            cost = (RECOMPUTE.index(recompute), tp * pp * cp, cp, pp, STRATEGIES.index(strategy))
            candidates.append((cost, layout))
    for _, layout in sorted(candidates, key=lambda item: item[0]):
        estimate = estimate_memory(config, layout, world_size)
        if estimate.total <= headroom * gpu_memory_gib * GIB:
            return layout, estimate
    return None
