"""Typed configuration: model, data, training and parallel layout, checked in one place.

Field names follow Megatron-LM's argument names (``num_layers``, ``hidden_size``,
``num_query_groups`` ...) so ``--set num_layers=4`` means what a Megatron user expects. Each field
declares its help text, its allowed range and, for the common ones, its command-line flag: a
section cannot hold a value outside its range, and the CLI derives its options from these
declarations. ``check_run`` holds every rule that relates several values (layout, batch, family,
precision, run length).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


class FamilyRules(Protocol):
    """What validation needs of a model family (``mtk.models.spec.TrainableFamily`` provides it)."""

    def complete(self, config: ModelConfig) -> None:
        """Fill in the values this family derives from others."""

    def problems(self, config: RunConfig) -> list[str]:
        """What in ``config`` this family cannot run."""

    def layout_problems(self, config: RunConfig) -> list[str]:
        """The parallel layouts of ``config`` this family cannot run."""


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, out of range, or inconsistent."""


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: ``low <= value`` (``low < value`` when ``open_low``), same for high."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False

    def admits(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.open_high else value > self.high))

    def __str__(self) -> str:
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.open_low else '>='} {_number(self.low)}")
        if self.high is not None:
            bounds.append(f"{'<' if self.open_high else '<='} {_number(self.high)}")
        return " and ".join(bounds)


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if value == int(value) else f"{value:g}"


NON_NEGATIVE = Range(low=0)
PROBABILITY = Range(low=0, high=1, open_high=True)  # dropout, Adam betas
STRICTLY_POSITIVE = Range(low=0, open_low=True)
EPSILON = Range(low=0, high=1, open_low=True)  # added to a denominator: above 1 it swamps what it guards
# Adam moves each weight by about the learning rate per step, and AdamW's decay multiplies weights by
# (1 - lr x weight_decay): above 1 either is no recipe, only a run that diverges later
RATE = Range(low=0, high=1)
LOSS_SCALE = Range(low=0, high=2.0**64, open_low=True)  # fp16 loss scales (Megatron starts at 2^32)

# Upper bounds of everything that sizes a resource: generous (10x or more the largest published
# recipe) but finite, so that a typo or a crafted config is refused by name, and no product of these
# values overflows the int64 sizes torch and numpy count in. Whether a model of these sizes fits
# this machine is checked where it is allocated (``mtk.models.spec``, ``mtk.plan.check_fits``).
MAX_LAYERS = 4096  # Llama 3 405B: 126 layers; DeepNet: 1000
MAX_WIDTH = 2**18  # hidden_size, kv_channels: 10x Megatron's 1T model (25600)
MAX_HEADS = 2**14  # Llama 3 405B: 128
MAX_TOKENS = 2**20  # seq_length: one-million-token contexts (Llama 3 405B trains at 8192)
MAX_POSITIONS = 2**24  # positions a checkpoint may declare (Llama 4 Scout: 10M)
MAX_VOCAB = 2**24  # Gemma: 262,144
MAX_BATCH = 2**24  # samples per step (GPT-3: 1536; BERT with LAMB: 65536)
MAX_ITERS = 10**9  # optimizer steps, and intervals counted in them (the largest recipes: ~10^6)
MAX_SAMPLES = 10**12  # samples of a run; x MAX_TOKENS stays below 2^63 (Llama 3 405B: 2 x 10^9)
MAX_RANKS = 2**16  # TP, PP, CP, VP sizes


def positive(high: float) -> Range:
    """Counts and sizes: from 1 to ``high``."""
    return Range(low=1, high=high)


def up_to(high: float) -> Range:
    """From 0 to ``high``: counts that may be 0."""
    return Range(low=0, high=high)


def setting(
    default: Any, help: str, *, range: Range | None = None, flag: str | None = None, nargs: int | None = None
) -> Any:
    """A config field with its help, the range its numbers must lie in, and its CLI flag (if it has one);
    ``nargs``: a list field's flag takes that many values (Megatron's ``nargs``)."""
    metadata = {"help": help, "range": range, "flag": flag, "nargs": nargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    family: str = setting(
        "gpt", "Model family: a name registered in mtk.models (mtk/models/<family>.py, or register_family)."
    )
    # the shape Megatron requires (num_layers, hidden_size, num_attention_heads, seq_length) defaults
    # to GPT-2 small's, so that every config is complete
    num_layers: int = setting(
        12, "Transformer layers (the encoder's for T5). Megatron requires it.", range=positive(MAX_LAYERS)
    )
    hidden_size: int = setting(
        768, "Width of the residual stream. Megatron requires it.", range=positive(MAX_WIDTH)
    )
    num_attention_heads: int = setting(
        12, "Query heads per attention layer. Megatron requires it.", range=positive(MAX_HEADS)
    )
    ffn_hidden_size: int | None = setting(
        None,
        "MLP width (default 4 x hidden_size; with SwiGLU 2/3 of that, rounded down to a multiple of 64, "
        "as Megatron).",
        range=positive(4 * MAX_WIDTH),
    )
    num_query_groups: int | None = setting(
        None, "Key/value heads, GQA (default num_attention_heads).", range=positive(MAX_HEADS)
    )
    kv_channels: int | None = setting(
        None, "Width of one head (default hidden_size / heads).", range=positive(MAX_WIDTH)
    )
    seq_length: int = setting(
        1024, "Tokens per sample. Megatron requires it.", range=positive(MAX_TOKENS), flag="--seq-length"
    )
    max_position_embeddings: int | None = setting(
        None, "Positions the model can address (default seq_length).", range=positive(MAX_POSITIONS)
    )
    vocab_size: int | None = setting(
        None, "Tokenizer vocabulary before padding (inherited from the data).", range=positive(MAX_VOCAB)
    )
    make_vocab_size_divisible_by: int = setting(
        128, "Pad the vocabulary to a multiple of this.", range=positive(2**16)
    )
    normalization: Literal["LayerNorm", "RMSNorm"] = setting("LayerNorm", "Normalization layers.")
    norm_epsilon: float = setting(1e-5, "Epsilon of the norms.", range=EPSILON)
    apply_layernorm_1p: bool = setting(
        False,
        "Zero-centred norm weights: stored as gamma - 1 (starting at 0), applied as 1 + weight "
        "(Megatron's --apply-layernorm-1p); LayerNorm and RMSNorm.",
    )
    position_embedding_type: Literal["learned_absolute", "rope", "relative"] = setting(
        "learned_absolute",
        "Positions: learned table, rotary, or relative (T5: a learned bias per head and position bucket).",
    )
    relative_attention_num_buckets: int = setting(
        32, "T5 relative positions: buckets of relative distance, log-spaced.", range=positive(2**16)
    )
    relative_attention_max_distance: int = setting(
        128, "T5 relative positions: distances from this on share the last bucket.", range=positive(2**24)
    )
    rotary_base: int = setting(10000, "RoPE base frequency.", range=positive(10**12))
    use_rope_scaling: bool = setting(
        False, "Llama 3.1 RoPE scaling of the low frequencies (Megatron's --use-rope-scaling)."
    )
    rope_scaling_factor: float = setting(
        8.0,
        "RoPE scaling: low frequencies divided by this (Megatron's --rope-scaling-factor).",
        range=Range(low=1),
    )
    rope_scaling_low_freq_factor: float = setting(
        1.0, "RoPE scaling: wavelengths above original length / this are scaled.", range=STRICTLY_POSITIVE
    )
    rope_scaling_high_freq_factor: float = setting(
        4.0, "RoPE scaling: wavelengths below original length / this are kept.", range=STRICTLY_POSITIVE
    )
    rope_scaling_original_max_position_embeddings: int = setting(
        8192,
        "RoPE scaling: the context length the model was first trained at.",
        range=positive(MAX_POSITIONS),
    )
    swiglu: bool = setting(False, "SwiGLU MLP instead of GELU.")
    openai_gelu: bool = setting(False, "GELU's tanh approximation, as GPT-2 (Megatron's --openai-gelu).")
    relu: bool = setting(False, "T5 v1.0: ReLU MLP instead of GELU.")
    geglu: bool = setting(
        False, "T5 v1.1, Flan-T5: gated GELU MLP (GEGLU; with openai_gelu, Hugging Face's gelu_new)."
    )
    add_bias_linear: bool = setting(True, "Biases in the linear layers.")
    untie_embeddings_and_output_weights: bool = setting(
        False, "A separate output layer instead of the embedding matrix."
    )
    init_method_std: float = setting(0.02, "Std of the initial weights.", range=STRICTLY_POSITIVE)
    init_method: Literal["normal", "t5"] = setting(
        "normal",
        "Initial weights: 'normal' as Megatron (normal(0, init_method_std), output projections scaled "
        "down with depth); 't5' as Google's T5 (T5 only: each matrix normal(0, 1/sqrt(fan-in)), "
        "embeddings normal(0, 1), a tied output layer's logits scaled by 1/sqrt(hidden)).",
    )
    hidden_dropout: float = setting(0.1, "Dropout on the residual branches.", range=PROBABILITY)
    attention_dropout: float = setting(0.1, "Dropout on the attention weights.", range=PROBABILITY)
    # encoder-decoder (T5): num_layers is the encoder depth
    decoder_num_layers: int | None = setting(
        None, "T5 decoder layers (default num_layers).", range=positive(MAX_LAYERS)
    )
    decoder_seq_length: int | None = setting(
        None, "T5 decoder tokens per sample.", range=positive(MAX_TOKENS)
    )
    bert_binary_head: bool = setting(
        True, "BERT: two segments per sample and the sentence-order head (Megatron's --bert-binary-head)."
    )
    post_norm: bool = setting(
        False,
        "Norm after each residual add and on the embeddings, no final norm: the original BERT layout, "
        "as real BERT checkpoints need (default: pre-norm, as Megatron).",
    )
    retro_encoder_num_layers: int = setting(2, "RETRO neighbour-encoder layers.", range=positive(MAX_LAYERS))
    retro_num_neighbors: int = setting(2, "RETRO neighbours per chunk.", range=positive(1024))
    retro_chunk_length: int = setting(64, "RETRO chunk length in tokens.", range=positive(MAX_TOKENS))

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.ffn_hidden_size is None:
            # SwiGLU has two input projections: 2/3 of the width keeps the parameters of a 4h GELU MLP
            four_h = 4 * self.hidden_size
            self.ffn_hidden_size = int(four_h * 2 / 3 / 64) * 64 if self.swiglu else four_h
            if not self.ffn_hidden_size:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is too small for SwiGLU's default width: set ffn_hidden_size"
                )
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}: set kv_channels explicitly or change one of them"
                )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )
        low, high = self.rope_scaling_low_freq_factor, self.rope_scaling_high_freq_factor
        if self.use_rope_scaling and high <= low:
            raise ConfigError(
                f"rope_scaling_high_freq_factor={high} must be above rope_scaling_low_freq_factor={low} "
                "(the wavelengths between them are interpolated)"
            )

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        """Vocabulary padded as Megatron pads it: to a multiple of divisible_by * TP."""
        if self.vocab_size is None:
            raise ConfigError("vocab_size is unknown: give --vocab-size or data with a tokenizer manifest")
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return -(-self.vocab_size // multiple) * multiple


@dataclass
class DataConfig:
    """Where samples come from. Their length is the model's ``seq_length``; their order follows ``train.seed``."""

    data_path: str | None = setting(
        None,
        'Prepared data prefix (P_text_document), or a blend "0.3 PREFIX_A 0.7 PREFIX_B". '
        "The tokenizer and vocabulary are inherited from its manifest.",
        flag="--data",
    )
    mock_data: bool = setting(False, "Train on random tokens (benchmarks, smoke tests).", flag="--mock-data")
    split: str = setting(
        "969,30,1",
        "Train/valid/test split of the data, e.g. 949,50,1 (default: Megatron's when --split is left out).",
        flag="--split",
    )
    data_cache_path: str | None = setting(
        None,
        "Where sample indices are cached (default: .mtk-cache beside the data).",
        flag="--data-cache-path",
    )
    retro_project: str | None = setting(
        None,
        "RETRO project folder (mtk retro build-db / index / query-neighbours): the data, split, seed, "
        "sequence length, batch size, sample counts and chunk length come from it.",
        flag="--retro-project",
    )
    mask_prob: float = setting(
        0.15,
        "BERT/T5: share of tokens masked (Megatron's --mask-prob).",
        range=Range(low=0, high=1, open_low=True, open_high=True),
        flag="--mask-prob",
    )
    short_seq_prob: float = setting(
        0.1,
        "BERT/T5: probability that a sample aims at a shorter random length (Megatron's --short-seq-prob).",
        range=PROBABILITY,
        flag="--short-seq-prob",
    )

    def __post_init__(self) -> None:
        check_ranges(self)
        parse_split(self.split)


@dataclass
class TrainConfig:
    micro_batch_size: int = setting(
        1,
        "Samples per forward/backward. Megatron requires it.",
        range=positive(MAX_BATCH),
        flag="--micro-batch-size",
    )
    global_batch_size: int = setting(
        8,
        "Samples per optimizer step (accumulated); the batch a ramp ends at. Megatron's default is "
        "micro_batch_size x data-parallel size; mtk's is fixed, as sample counts and plans need it before "
        "the world size is known.",
        range=positive(MAX_BATCH),
        flag="--global-batch-size",
    )
    batch_size_ramp: list[list[float]] | str | None = setting(
        None,
        "Staircase of global batch sizes by consumed tokens, as Megatron's '0:16 2.4B:320 4.8B:624' "
        "(THRESHOLD:BATCH, K/M/B/T suffixes; GPT-3 175B), or in a preset [[0, 16], [2.4e9, 320], ...]. "
        "Thresholds become samples as tokens // seq_length.",
        flag="--step-batch-size-schedule",
    )
    rampup_batch_size: list[int] | None = setting(
        None,
        "Linear batch-size ramp, three numbers START INCREMENT SAMPLES (--rampup-batch-size 16 16 5859375): "
        "from START, +INCREMENT every SAMPLES / ((global_batch_size - START) / INCREMENT) consumed samples, "
        "then global_batch_size after SAMPLES.",
        flag="--rampup-batch-size",
        nargs=3,
    )
    train_iters: int | None = setting(
        None, "Optimizer steps to run.", range=positive(MAX_ITERS), flag="--train-iters"
    )
    train_samples: int | None = setting(
        None,
        "Samples to train on (instead of --train-iters); the schedules' lengths then count samples.",
        range=positive(MAX_SAMPLES),
        flag="--train-samples",
    )
    lr: float = setting(1e-4, "Peak learning rate. Megatron requires it.", range=RATE, flag="--lr")
    min_lr: float = setting(0.0, "Learning rate at the end of decay.", range=RATE, flag="--min-lr")
    lr_decay_style: Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"] = setting(
        "linear",
        "Decay after warmup; WSD (warmup-stable-decay) anneals over --lr-wsd-decay-iters/-samples.",
        flag="--lr-decay-style",
    )
    lr_wsd_decay_style: Literal["exponential", "linear", "cosine", "minus_sqrt"] = setting(
        "exponential", "WSD: the decay of its annealing phase.", flag="--lr-wsd-decay-style"
    )
    lr_decay_iters: int | None = setting(
        None, "Steps of decay (default: the run).", range=positive(MAX_ITERS), flag="--lr-decay-iters"
    )
    lr_decay_samples: int | None = setting(
        None,
        "Samples of decay (default: the run's train_samples).",
        range=positive(MAX_SAMPLES),
        flag="--lr-decay-samples",
    )
    lr_wsd_decay_iters: int | None = setting(
        None, "WSD: steps of the annealing phase.", range=positive(MAX_ITERS), flag="--lr-wsd-decay-iters"
    )
    lr_wsd_decay_samples: int | None = setting(
        None,
        "WSD: samples of the annealing phase.",
        range=positive(MAX_SAMPLES),
        flag="--lr-wsd-decay-samples",
    )
    lr_warmup_fraction: float | None = setting(
        None,
        "Warmup as a fraction of the decay.",
        range=Range(low=0, high=1),
        flag="--lr-warmup-fraction",
    )
    lr_warmup_iters: int = setting(
        0, "Linear warmup steps.", range=up_to(MAX_ITERS), flag="--lr-warmup-iters"
    )
    lr_warmup_samples: int | None = setting(
        None, "Warmup length in samples (unset: 0).", range=up_to(MAX_SAMPLES), flag="--lr-warmup-samples"
    )
    weight_decay: float = setting(
        0.01,
        "AdamW decoupled weight decay (not on norms/biases).",
        range=RATE,
        flag="--weight-decay",
    )
    adam_beta1: float = setting(0.9, "Adam beta1.", range=PROBABILITY)
    adam_beta2: float = setting(0.999, "Adam beta2.", range=PROBABILITY)
    adam_eps: float = setting(1e-8, "Adam epsilon.", range=EPSILON)
    clip_grad: float = setting(
        1.0, "Clip the global gradient norm to this (0: off).", range=NON_NEGATIVE, flag="--clip-grad"
    )
    precision: Literal["fp32", "bf16", "fp16"] = setting("fp32", "Mixed precision (--bf16, --fp16).")
    loss_scale: float | None = setting(
        None, "Static loss scale (default: fp16 scales dynamically).", range=LOSS_SCALE, flag="--loss-scale"
    )
    initial_loss_scale: float = setting(
        2.0**32, "fp16 dynamic loss scale at the start.", range=LOSS_SCALE, flag="--initial-loss-scale"
    )
    min_loss_scale: float = setting(
        1.0, "fp16 dynamic loss scale: never halved below this.", range=LOSS_SCALE, flag="--min-loss-scale"
    )
    loss_scale_window: int = setting(
        1000,
        "fp16 dynamic loss scale: doubled after this many steps without overflow.",
        range=positive(MAX_ITERS),
        flag="--loss-scale-window",
    )
    hysteresis: int = setting(
        2,
        "fp16 dynamic loss scale: overflows tolerated before it halves (renewed when it doubles).",
        range=positive(MAX_ITERS),
        flag="--hysteresis",
    )
    fp8: Literal["hybrid", "e4m3"] | None = setting(
        None,
        "FP8 matmuls in the transformer layers: hybrid (E4M3 forward, E5M2 gradients) or e4m3 "
        "(Megatron's --fp8-format); weights stay in --bf16/fp32.",
        flag="--fp8",
    )
    fp8_recipe: Literal["delayed", "tensorwise", "rowwise", "blockwise"] = setting(
        "delayed",
        "FP8 scaling: delayed (amax history, Transformer Engine), tensorwise or rowwise (current "
        "scaling), blockwise. A backend without the recipe falls back to tensorwise and says so.",
        flag="--fp8-recipe",
    )
    fp8_amax_history_len: int = setting(
        1, "Delayed scaling: amax history length.", range=positive(2**16), flag="--fp8-amax-history-len"
    )
    fp8_amax_compute_algo: Literal["max", "most_recent"] = setting(
        "most_recent",
        "Delayed scaling: scale from the history's max or its newest amax.",
        flag="--fp8-amax-compute-algo",
    )
    fp8_margin: int = setting(
        0, "Scale margin: scales are divided by 2^margin.", range=up_to(32), flag="--fp8-margin"
    )
    fp8_backend: Literal["auto", "te", "torchao"] = setting(
        "auto",
        "FP8 implementation: Transformer Engine (CUDA), torchao (any device; emulated on CPU), or auto "
        "(Transformer Engine where it runs the layout: CUDA, --tp 1; else torchao).",
        flag="--fp8-backend",
    )
    fp8_strict: bool = setting(
        False, "Fail instead of falling back when the backend cannot run --fp8-recipe.", flag="--fp8-strict"
    )
    first_last_layers_bf16: bool = setting(
        False,
        "Keep the first and last transformer layers out of FP8 (Megatron's --first-last-layers-bf16).",
        flag="--first-last-layers-bf16",
    )
    num_layers_at_start_in_bf16: int = setting(
        1, "Layers at the start kept out of FP8.", range=up_to(MAX_LAYERS)
    )
    num_layers_at_end_in_bf16: int = setting(1, "Layers at the end kept out of FP8.", range=up_to(MAX_LAYERS))
    compile: bool | None = setting(
        None,
        "torch.compile each transformer block in place (regional compilation, as torchtitan; parameter "
        "names unchanged, checkpoints load either way); unset: on for CUDA devices, off on CPU (it does "
        "not pay for the tiny CPU presets: docs/benchmarks.md). Generation stays eager.",
        flag="--compile/--no-compile",
    )
    log_interval: int = setting(
        100, "Steps between log lines / metrics records.", range=positive(MAX_ITERS), flag="--log-interval"
    )
    save_interval: int | None = setting(
        None,
        "Steps between checkpoints (always at the end).",
        range=positive(MAX_ITERS),
        flag="--save-interval",
    )
    eval_interval: int = setting(
        1000,
        "Steps between validation runs (0: never). Megatron's default until its configs became dataclasses "
        "(Dec 2025, now unset: never); mtk keeps validating, as every Megatron recipe does.",
        range=up_to(MAX_ITERS),
        flag="--eval-interval",
    )
    eval_iters: int = setting(
        100, "Global batches per evaluation.", range=up_to(MAX_ITERS), flag="--eval-iters"
    )
    seed: int = setting(
        1234, "Seed of data order and initialization.", range=Range(low=0, high=2**32 - 1), flag="--seed"
    )

    def __post_init__(self) -> None:
        check_ranges(self)
        if isinstance(self.batch_size_ramp, str):
            self.batch_size_ramp = parse_step_batch_size_schedule(self.batch_size_ramp)
        for point in self.batch_size_ramp or []:
            if (
                len(point) != 2
                or not 0 <= point[0] < math.inf
                or not 1 <= point[1] <= MAX_BATCH
                or point[1] != int(point[1])
            ):
                raise ConfigError(
                    f"'batch_size_ramp' point {point}: expected [consumed_tokens >= 0, "
                    f"global_batch_size from 1 to {MAX_BATCH} (a whole number)], e.g. [[0, 16], [2.4e9, 320]]"
                )
        tokens = [point[0] for point in self.batch_size_ramp or []]
        if tokens and (tokens[0] != 0 or any(low >= high for low, high in itertools.pairwise(tokens))):
            raise ConfigError(
                f"'batch_size_ramp' must list its points by consumed tokens, the first at 0 and each above "
                f"the one before (as Megatron's --step-batch-size-schedule): {tokens}"
            )
        ramp = self.rampup_batch_size
        if ramp is not None and (
            len(ramp) != 3
            or not 1 <= ramp[0] <= MAX_BATCH
            or not 1 <= ramp[1] <= MAX_BATCH
            or not 1 <= ramp[2] <= MAX_SAMPLES
        ):
            raise ConfigError(
                f"'rampup_batch_size' {ramp}: expected START INCREMENT SAMPLES, whole numbers with START and "
                f"INCREMENT from 1 to {MAX_BATCH} and SAMPLES from 1 to {MAX_SAMPLES}, e.g. 16 16 5859375"
            )

    def batch_sizes(self) -> list[int]:
        """Every global batch size a run of this config may take, ascending: the ramp's, and
        ``global_batch_size`` (the evaluation batch, and the batch after a linear ramp)."""
        sizes = {self.global_batch_size, *(int(batch) for _, batch in self.batch_size_ramp or [])}
        if self.rampup_batch_size:
            start, increment, _ = self.rampup_batch_size
            sizes.update(range(start, self.global_batch_size, increment))
        return sorted(sizes)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = setting(
        1, "Tensor-parallel size.", range=positive(MAX_RANKS), flag="--tp"
    )
    pipeline_model_parallel_size: int = setting(
        1, "Pipeline-parallel size.", range=positive(MAX_RANKS), flag="--pp"
    )
    context_parallel_size: int = setting(1, "Context-parallel size.", range=positive(MAX_RANKS), flag="--cp")
    virtual_pipeline_model_parallel_size: int | None = setting(
        None,
        "Virtual pipeline stages per rank (interleaved schedule).",
        range=positive(MAX_RANKS),
        flag="--vp",
    )
    account_for_embedding_in_pipeline_split: bool = setting(
        False, "Count the embedding as one layer when splitting layers over pipeline stages."
    )
    account_for_loss_in_pipeline_split: bool = setting(
        False, "Count the loss as one layer when splitting layers over pipeline stages."
    )
    use_distributed_optimizer: bool = setting(
        False,
        "Shard optimizer state and gradients over data-parallel ranks (= optim_grads).",
        flag="--use-distributed-optimizer",
    )
    data_parallel_sharding_strategy: Literal["no_shard", "optim_grads", "optim_grads_params"] | None = (
        setting(
            None,
            "What data-parallel ranks shard: no_shard (DDP), optim_grads (Megatron's distributed "
            "optimizer, ZeRO-2), optim_grads_params (FSDP, ZeRO-3). Default: optim_grads with "
            "use_distributed_optimizer, else no_shard.",
            flag="--data-parallel-sharding-strategy",
        )
    )
    grad_reduce_in_bf16: bool = setting(
        False, "Average data-parallel gradients in bf16 instead of fp32.", flag="--grad-reduce-in-bf16"
    )
    recompute_granularity: Literal["selective", "full"] | None = setting(
        None,
        "Recompute activations in backward: 'selective' (attention) or 'full' (whole layers).",
        flag="--recompute-granularity",
    )

    def __post_init__(self) -> None:
        check_ranges(self)

    def sharding_strategy(self) -> str:
        """The data-parallel sharding in effect: explicit, else Megatron's distributed optimizer or DDP."""
        if self.data_parallel_sharding_strategy is not None:
            return self.data_parallel_sharding_strategy
        return "optim_grads" if self.use_distributed_optimizer else "no_shard"


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
}
# keys that moved section, so that run directories written before the move still load
MOVED_KEYS = {("train", "split"): "data"}


def parse_split(split: str) -> list[float]:
    """Megatron's ``--split "949,50,1"`` -> normalised train/valid/test weights; missing trailing
    weights are 0. ConfigError for anything else."""
    try:
        weights = [float(part) for part in re.split(r"[,/]", split)]
    except ValueError:
        weights = []
    if not 0 < len(weights) <= 3 or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) == 0:
        raise ConfigError(
            f"split {split!r}: expected one to three non-negative numbers, not all zero, such as '949,50,1'"
        )
    weights += [0.0] * (3 - len(weights))
    return [weight / sum(weights) for weight in weights]


SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def parse_step_batch_size_schedule(text: str) -> list[list[int]]:
    """Megatron's ``--step-batch-size-schedule "0:16 2.4B:320 ..."`` -> [[tokens, batch], ...] by tokens.

    Entries are THRESHOLD:BATCH, separated by spaces or commas; a number may end in K, M, B or T
    (10^3 ... 10^12) and is read as Megatron reads it, ``int(float(number) * suffix)``.
    """

    def number(part: str, entry: str) -> int:
        part = part.strip().upper()
        scale = SUFFIXES.get(part[-1:], 1)
        try:
            return int(float(part[:-1] if scale > 1 else part) * scale)
        except (ValueError, OverflowError):
            raise ConfigError(
                f"step batch-size schedule entry {entry!r}: {part!r} is not a number (K, M, B, T suffixes)"
            ) from None

    points = []
    for entry in text.replace(",", " ").split():
        threshold, colon, batch = entry.partition(":")
        if not colon:
            raise ConfigError(
                f"step batch-size schedule entry {entry!r}: expected THRESHOLD:BATCH, e.g. '0:16 2.4B:320'"
            )
        points.append([number(threshold, entry), number(batch, entry)])
    if not points:
        raise ConfigError(
            f"step batch-size schedule {text!r}: no THRESHOLD:BATCH entry, e.g. '0:16 2.4B:320'"
        )
    return sorted(points, key=lambda point: point[0])


def check_ranges(section: Any) -> None:
    """Every number of ``section`` inside its declared range (None means unset and passes)."""
    for item in dataclasses.fields(section):
        check_value(type(section), item.name, getattr(section, item.name))


def check_value(section: type, key: str, value: Any, flag: str | None = None) -> None:
    """ConfigError naming ``key``, ``value``, the range and the flag (``flag``, else the field's own)
    when ``value`` is outside the range ``section`` declares for ``key``."""
    item = next(f for f in dataclasses.fields(section) if f.name == key)
    allowed: Range | None = item.metadata.get("range")
    if allowed is None or value is None or isinstance(value, bool) or allowed.admits(value):
        return
    flag = flag or item.metadata.get("flag")
    raise ConfigError(
        f"'{key}' = {value!r} is out of range: it must be {allowed}" + (f" ({flag})" if flag else "")
    )


def section_of(key: str) -> str | None:
    """The section that has a field ``key``."""
    return next((name for name, cls in SECTIONS.items() if key in field_names(cls)), None)


def field_names(cls: type) -> set[str]:
    return {item.name for item in dataclasses.fields(cls)}


def _type_matches(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin is typing.Union or origin is types.UnionType:
        return any(_type_matches(value, arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_type_matches(v, item) for v in value)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The evaluated annotations of a config section (``typing.get_type_hints``, which compiles each
    string annotation: done once per section, not per key or per config built)."""
    return typing.get_type_hints(cls)


def build_section(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build one config dataclass from a dict, rejecting unknown keys, wrong types and values out of range."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table of key = value, found {values!r}")
    hints = field_types(cls)
    known = field_names(cls)
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(known))})")
        if not _type_matches(value, hints[key]):
            raise ConfigError(f"{where}: '{key}' = {value!r} is not of type {describe_type(hints[key])}")
    values = dict(values)
    for key, value in values.items():
        if hints[key] is float and isinstance(value, int):
            if abs(value) > sys.float_info.max:  # float() would raise OverflowError
                raise ConfigError(f"{where}: '{key}' = {value} is too large for a float")
            values[key] = float(value)
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def describe_type(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


@dataclass
class RunConfig:
    """Everything a training run is configured by."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any]], where: str = "config") -> RunConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected sections {sorted(SECTIONS)}, found {type(data).__name__}")
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)} (known: {sorted(SECTIONS)})")
        sections = {name: dict(data.get(name, {})) for name in SECTIONS}
        for (old, key), new in MOVED_KEYS.items():
            if key in sections[old]:
                sections[new].setdefault(key, sections[old].pop(key))
        return cls(
            **{
                name: build_section(section_cls, sections[name], f"{where} [{name}]")
                for name, section_cls in SECTIONS.items()
            }
        )

    @classmethod
    def from_json_file(cls, path: Any) -> RunConfig:
        """A config saved with ``to_dict`` (a run's or a checkpoint's ``config.json``)."""
        from pathlib import Path

        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: not a readable config ({err})") from None
        return cls.from_dict(data, where=str(path))


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, value); the value is read as JSON (numbers, true/false, null, lists) or text."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set num_layers=4")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


# keys that give one setting in different units (Megatron accepts one of each group): an override of
# one replaces what the preset sets for the others, so --train-samples turns a preset's run sample-based
ALTERNATIVES = (
    ("train_iters", "train_samples"),
    ("lr_decay_iters", "lr_decay_samples"),
    ("lr_warmup_iters", "lr_warmup_samples", "lr_warmup_fraction"),
    ("lr_wsd_decay_iters", "lr_wsd_decay_samples"),
    ("batch_size_ramp", "rampup_batch_size"),
)


def apply_overrides(sections: dict[str, dict[str, Any]], overrides: dict[str, Any]) -> RunConfig:
    """The config of ``sections`` (explicit values only, e.g. a preset's) with ``overrides`` applied.

    Keys are field names (``num_layers``) or ``section.field``. Values left unset stay derived
    (``kv_channels`` follows a new ``hidden_size``); an override drops the ``sections``' values of
    its ALTERNATIVES that are not overridden too.
    """
    data = {name: dict(sections.get(name, {})) for name in SECTIONS}
    given = {key.rpartition(".")[2] for key in overrides}
    for group in ALTERNATIVES:
        if given & set(group):
            for key in set(group) - given:
                data["train"].pop(key, None)
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        if section and section not in SECTIONS:
            raise ConfigError(f"--set {key}: unknown section '{section}' (known: {', '.join(SECTIONS)})")
        section = section or section_of(name)
        if section is None or name not in field_names(SECTIONS[section]):
            raise ConfigError(f"--set {key}: unknown key '{name}'; `mtk presets show NAME` lists every key")
        data[section][name] = value
    return RunConfig.from_dict(data, where="settings (preset, --set and flags)")


# ---- rules across values ----------------------------------------------------------------------------

RULES = ("data", "layout", "batch", "length", "schedule", "family", "precision")


@dataclass(frozen=True)
class Problem:
    """One broken rule: ``rule`` is one of RULES, ``message`` says what to change."""

    rule: str
    message: str


def micro_batches_per_step(global_batch_size: int, micro_batch_size: int, data_parallel_size: int) -> int:
    """Micro-batches each data-parallel rank runs for one optimizer step (gradient accumulation)."""
    per_step = micro_batch_size * data_parallel_size
    if global_batch_size % per_step:
        raise ConfigError(
            f"global batch size {global_batch_size} is not a multiple of micro_batch_size ({micro_batch_size}) "
            f"x data-parallel size ({data_parallel_size}); change --global-batch-size or --micro-batch-size"
        )
    return global_batch_size // per_step


def data_parallel_size(parallel: ParallelConfig, world_size: int) -> int:
    """Data parallelism fills what tensor, pipeline and context parallelism leave of the world."""
    model_parallel = (
        parallel.tensor_model_parallel_size
        * parallel.pipeline_model_parallel_size
        * parallel.context_parallel_size
    )
    return max(1, world_size // model_parallel)


def run_problems(config: RunConfig, world_size: int, family: FamilyRules) -> list[Problem]:
    """Every rule ``config`` breaks on ``world_size`` processes; ``family`` is its model family's spec,
    which first completes ``config.model`` (the values the family derives, ``complete``)."""
    family.complete(config.model)
    model, train, parallel = config.model, config.train, config.parallel
    problems: list[Problem] = []

    def problem(rule: str, message: str) -> None:
        problems.append(Problem(rule, message))

    if (config.data.data_path is None) == (not config.data.mock_data):
        problem("data", "give exactly one of --data PREFIX and --mock-data")

    tp, pp, cp = (
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.context_parallel_size,
    )
    vp = parallel.virtual_pipeline_model_parallel_size or 1
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        problem(
            "layout",
            f"world size {world_size} is not a multiple of TP x PP x CP = {tp} x {pp} x {cp} = {model_parallel}; "
            f"use {model_parallel * max(1, world_size // model_parallel)} processes or change --tp/--pp/--cp",
        )
    if model.num_attention_heads % tp:
        problem("layout", f"num_attention_heads {model.num_attention_heads} is not divisible by TP {tp}")
    if model.num_query_groups % tp:
        problem(
            "layout",
            f"num_query_groups {model.num_query_groups} is not divisible by TP {tp}; choose TP dividing it",
        )
    if vp > 1 and pp == 1:
        problem("layout", "virtual pipeline stages (--vp) need pipeline parallelism (--pp > 1)")
    split = (
        model.num_layers
        + parallel.account_for_embedding_in_pipeline_split
        + parallel.account_for_loss_in_pipeline_split
    )
    if split % (pp * vp):
        counted = "" if split == model.num_layers else f" (+ embedding/loss counted as layers = {split})"
        problem(
            "layout",
            f"num_layers {model.num_layers}{counted} is not divisible by PP x VP = {pp} x {vp}; "
            "each (virtual) stage needs the same number of layers",
        )
    if cp > 1 and model.seq_length % (2 * cp):
        problem(
            "layout",
            f"seq_length {model.seq_length} is not divisible by 2 x CP = {2 * cp} "
            "(load-balanced causal sharding cuts the sequence into 2 x CP chunks)",
        )
    dp = data_parallel_size(parallel, world_size)
    if train.batch_size_ramp and train.rampup_batch_size:
        problem(
            "batch", "give one batch-size ramp: --step-batch-size-schedule or --rampup-batch-size, not both"
        )
    if train.rampup_batch_size:
        start, increment, _ = train.rampup_batch_size
        if start > train.global_batch_size or (train.global_batch_size - start) % increment:
            problem(
                "batch",
                f"--rampup-batch-size {start} {increment} ...: global batch size {train.global_batch_size} "
                "must be START plus a whole number of INCREMENTs; change --global-batch-size or the ramp",
            )
    # one problem of each kind, for the smallest batch of the run that breaks it
    divisible = interleaved = True
    for batch in train.batch_sizes():
        try:
            micro_batches = micro_batches_per_step(batch, train.micro_batch_size, dp)
        except ConfigError as err:
            in_ramp = (
                f"the batch-size ramp reaches global batch size {batch}, not a multiple of micro_batch_size "
                f"({train.micro_batch_size}) x data-parallel size ({dp}); change the ramp or --micro-batch-size"
            )
            if divisible:
                problem("batch", str(err) if batch == train.global_batch_size else in_ramp)
            divisible = False
            continue
        # one stage per rank: 1F1B, or GPipe for a phase with fewer micro-batches than stages (a larger
        # bubble, the same gradients); interleaved stages follow Megatron's rule
        if pp > 1 and vp > 1 and micro_batches % pp and interleaved:
            problem(
                "batch",
                f"the interleaved schedule (--vp {vp}) needs the micro-batches per pipeline ({micro_batches}, "
                f"from global batch {batch}) to be a multiple of PP {pp}; change --global-batch-size or "
                "--micro-batch-size, or leave out --vp",
            )
            interleaved = False
    if train.train_iters is None and train.train_samples is None:
        problem("length", "give --train-iters or --train-samples")
    elif train.train_iters is not None and train.train_samples is not None:
        problem("length", "give --train-iters or --train-samples, not both")
    for what, iters, samples in [
        ("decay", train.lr_decay_iters, train.lr_decay_samples),
        ("warmup", train.lr_warmup_iters, train.lr_warmup_samples),
        ("WSD annealing", train.lr_wsd_decay_iters, train.lr_wsd_decay_samples),
    ]:
        if iters and samples:
            problem("schedule", f"the learning-rate {what} is given in iterations and in samples: give one")
    if train.lr_warmup_fraction is not None and (train.lr_warmup_iters or train.lr_warmup_samples):
        problem(
            "schedule",
            "give one warmup length: --lr-warmup-fraction, --lr-warmup-iters or --lr-warmup-samples",
        )
    if (
        train.lr_decay_style == "WSD"
        and train.lr_wsd_decay_iters is None
        and train.lr_wsd_decay_samples is None
    ):
        problem(
            "schedule",
            "--lr-decay-style WSD needs the annealing length: --lr-wsd-decay-iters or --lr-wsd-decay-samples",
        )
    if (
        model.position_embedding_type == "learned_absolute"
        and model.seq_length > model.max_position_embeddings
    ):
        problem(
            "layout",
            f"seq_length {model.seq_length} exceeds max_position_embeddings {model.max_position_embeddings}",
        )
    if train.min_lr > train.lr:
        problem("schedule", f"min_lr {train.min_lr} is above lr {train.lr}")
    if train.fp8 is not None and train.precision == "fp16":
        problem("precision", "FP8 runs with bf16 or fp32 weights, not fp16: use --bf16 with --fp8")
    if train.min_loss_scale > train.initial_loss_scale:
        problem(
            "precision",
            f"min_loss_scale {train.min_loss_scale:g} is above initial_loss_scale {train.initial_loss_scale:g}",
        )
    problems += [Problem("layout", message) for message in family.layout_problems(config)]
    problems += [Problem("family", message) for message in family.problems(config)]
    return problems


def check_run(config: RunConfig, world_size: int, family: FamilyRules, ignore: Sequence[str] = ()) -> None:
    """Raise ConfigError listing every broken rule (except those of the kinds in ``ignore``)."""
    problems = [p for p in run_problems(config, world_size, family) if p.rule not in ignore]
    if len(problems) == 1:
        raise ConfigError(problems[0].message)
    if problems:
        listing = "\n  - ".join(f"{p.rule}: {p.message}" for p in problems)
        raise ConfigError(f"the run cannot start:\n  - {listing}")
