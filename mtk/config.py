"""Typed configuration: model, training and parallel layout, validated in one place.

Field names follow Megatron-LM's argument names (``num_layers``, ``hidden_size``,
``num_query_groups`` ...) so ``--set num_layers=4`` means what a Megatron user expects.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or inconsistent."""


@dataclass
class ModelConfig:
    family: Literal["gpt", "bert", "t5", "retro"] = "gpt"
    num_layers: int = 12
    hidden_size: int = 768
    num_attention_heads: int = 12
    ffn_hidden_size: int | None = None  # default 4 * hidden_size
    num_query_groups: int | None = None  # default num_attention_heads (no GQA)
    kv_channels: int | None = None  # default hidden_size // num_attention_heads
    seq_length: int = 1024
    max_position_embeddings: int | None = None  # default seq_length
    vocab_size: int | None = None  # tokenizer vocabulary, before padding
    make_vocab_size_divisible_by: int = 128
    normalization: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    norm_epsilon: float = 1e-5
    position_embedding_type: Literal["learned_absolute", "rope"] = "learned_absolute"
    rotary_base: int = 10000
    swiglu: bool = False
    add_bias_linear: bool = True
    untie_embeddings_and_output_weights: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    # encoder-decoder (T5): num_layers is the encoder depth
    decoder_num_layers: int | None = None
    decoder_seq_length: int | None = None
    # BERT
    bert_binary_head: bool = True
    # RETRO
    retro_encoder_num_layers: int = 2
    retro_num_neighbors: int = 2
    retro_chunk_length: int = 64

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
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
        if self.family == "t5" and self.decoder_num_layers is None:
            self.decoder_num_layers = self.num_layers

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        """Vocabulary padded as Megatron pads it: to a multiple of divisible_by * TP."""
        if self.vocab_size is None:
            raise ConfigError("vocab_size is unknown: give --vocab-size or data with a tokenizer manifest")
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return -(-self.vocab_size // multiple) * multiple

    def retro_layer_numbers(self) -> list[int]:
        """1-based decoder layers that carry chunked cross-attention (Megatron's rule)."""
        start = 6 if self.num_layers <= 15 else 9
        return list(range(start, self.num_layers + 1, 3))

    def layer_parameters(self, cross_attention: bool = False) -> int:
        """Parameters of one transformer layer (with a cross-attention block if asked)."""
        h, ffn = self.hidden_size, self.ffn_hidden_size
        q_width = self.num_attention_heads * self.kv_channels
        kv_width = self.num_query_groups * self.kv_channels
        bias = self.add_bias_linear
        norm = (2 if self.normalization == "LayerNorm" else 1) * h

        def attention() -> int:
            weights = h * q_width + 2 * h * kv_width + q_width * h
            return weights + (q_width + 2 * kv_width + h if bias else 0)

        mlp_in = 2 * ffn if self.swiglu else ffn
        mlp = h * mlp_in + ffn * h + (mlp_in + h if bias else 0)
        layer = norm + attention() + norm + mlp
        if cross_attention:
            layer += norm + attention()
        return layer

    def num_parameters(self, tensor_parallel: int = 1) -> int:
        """Parameter count of the whole model from its config alone (no allocation)."""
        h = self.hidden_size
        norm = (2 if self.normalization == "LayerNorm" else 1) * h
        vocab = self.padded_vocab_size(tensor_parallel)
        layer, cross_layer = self.layer_parameters(), self.layer_parameters(cross_attention=True)
        attention_block = cross_layer - layer - norm

        total = vocab * h
        if self.position_embedding_type == "learned_absolute":
            total += self.max_position_embeddings * h
        if self.family == "gpt":
            total += self.num_layers * layer + norm
            total += 0 if not self.untie_embeddings_and_output_weights else vocab * h
        elif self.family == "bert":
            total += 2 * h if self.bert_binary_head else 0  # token-type embeddings
            total += self.num_layers * layer + norm
            total += (h * h + h) + norm + vocab  # LM head: dense, norm, output bias
            total += (h * h + h) + (2 * h + 2 if self.bert_binary_head else 0)  # pooler, binary head
        elif self.family == "t5":
            total += self.num_layers * layer + norm  # encoder
            total += self.decoder_num_layers * cross_layer + norm  # decoder
            total += vocab  # LM head bias; weights tied to the embedding
        elif self.family == "retro":
            retro_layers = len(self.retro_layer_numbers())
            total += (self.num_layers - retro_layers) * layer + retro_layers * cross_layer + norm
            # neighbour encoder: its first layer cross-attends to the decoder chunk
            total += self.retro_encoder_num_layers * layer + (norm + attention_block) + norm
            total += 0 if not self.untie_embeddings_and_output_weights else vocab * h
        return total


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: int = 8
    # batch-size ramp as [consumed_tokens, global_batch_size] points (GPT-3 175B recipe)
    batch_size_ramp: list[list[float]] | None = None
    train_iters: int | None = None
    train_samples: int | None = None
    lr: float = 1e-4
    min_lr: float = 0.0
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    lr_decay_iters: int | None = None
    lr_warmup_fraction: float | None = None
    lr_warmup_iters: int = 0
    lr_warmup_samples: int | None = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    fp8: Literal["hybrid", "e4m3"] | None = None
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    split: str = "949,50,1"
    log_interval: int = 100
    save_interval: int | None = None
    eval_interval: int = 1000
    eval_iters: int = 10
    seed: int = 1234


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    # count the embedding / the loss as one layer each when splitting layers over pipeline stages
    account_for_embedding_in_pipeline_split: bool = False
    account_for_loss_in_pipeline_split: bool = False
    use_distributed_optimizer: bool = False  # shard optimizer state and gradients (= optim_grads)
    # Megatron's names: no_shard (DDP), optim_grads (ZeRO-2), optim_grads_params (ZeRO-3, FSDP);
    # None: optim_grads with use_distributed_optimizer, else no_shard
    data_parallel_sharding_strategy: Literal["no_shard", "optim_grads", "optim_grads_params"] | None = None
    grad_reduce_in_bf16: bool = False  # average data-parallel gradients in bf16 instead of fp32

    def sharding_strategy(self) -> str:
        """The data-parallel sharding in effect: explicit, else Megatron's distributed optimizer or DDP."""
        if self.data_parallel_sharding_strategy is not None:
            return self.data_parallel_sharding_strategy
        return "optim_grads" if self.use_distributed_optimizer else "no_shard"

    # activation recomputation: "selective" recomputes attention blocks, "full" whole layers
    recompute_granularity: Literal["selective", "full"] | None = None


SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "parallel": ParallelConfig}


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


def build_section(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build one config dataclass from a dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(known))})")
        if not _type_matches(value, hints[key]):
            raise ConfigError(f"{where}: '{key}' = {value!r} is not of type {_describe(hints[key])}")
    values = {k: float(v) if hints[k] is float and isinstance(v, int) else v for k, v in values.items()}
    return cls(**values)


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


@dataclass
class RunConfig:
    """Everything a training run is configured by."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, Any]], where: str = "config") -> RunConfig:
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)} (known: {sorted(SECTIONS)})")
        return cls(
            **{
                name: build_section(section_cls, data.get(name, {}), f"{where} [{name}]")
                for name, section_cls in SECTIONS.items()
            }
        )


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, value); the value is read as JSON (numbers, true/false, null, lists) or text."""
    import json

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set num_layers=4")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def apply_overrides(sections: dict[str, dict[str, Any]], overrides: dict[str, Any]) -> RunConfig:
    """The config of ``sections`` (explicit values only, e.g. a preset's) with ``overrides`` applied.

    Keys are field names (``num_layers``) or ``section.field``. Values left unset stay derived
    (``kv_channels`` follows a new ``hidden_size``).
    """
    data = {name: dict(sections.get(name, {})) for name in SECTIONS}
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        if section:
            if section not in SECTIONS:
                raise ConfigError(f"--set {key}: unknown section '{section}' (known: {', '.join(SECTIONS)})")
            sections = [section]
        else:
            sections = [s for s, cls in SECTIONS.items() if name in {f.name for f in dataclasses.fields(cls)}]
        if not sections:
            raise ConfigError(f"--set {key}: unknown key '{name}'; `mtk presets show NAME` lists every key")
        data[sections[0]][name] = value
    return RunConfig.from_dict(data, where="--set")


def validate_run(config: RunConfig, data_parallel_size: int = 1) -> None:
    """Checks across sections, done once at start-up; each error says what to change."""
    model, train = config.model, config.train
    per_step = train.micro_batch_size * data_parallel_size
    batches = [train.global_batch_size, *(int(b) for _, b in train.batch_size_ramp or [])]
    for batch in batches:
        if batch % per_step:
            raise ConfigError(
                f"global batch size {batch} is not a multiple of micro_batch_size ({train.micro_batch_size}) "
                f"x data-parallel size ({data_parallel_size}); change --global-batch-size or --micro-batch-size"
            )
        pp, vp = (
            config.parallel.pipeline_model_parallel_size,
            config.parallel.virtual_pipeline_model_parallel_size,
        )
        micro_batches = batch // per_step
        if pp > 1 and micro_batches < pp:
            raise ConfigError(
                f"global batch size {batch} gives {micro_batches} micro-batches per pipeline, fewer than PP {pp}; "
                "the pipeline needs at least one per stage: raise --global-batch-size or lower --micro-batch-size"
            )
        if pp > 1 and (vp or 1) > 1 and micro_batches % pp:
            raise ConfigError(
                f"the interleaved schedule needs the micro-batches per pipeline ({micro_batches}, from global batch "
                f"{batch}) to be a multiple of PP {pp}; change --global-batch-size or --micro-batch-size"
            )
    if train.train_iters is None and train.train_samples is None:
        raise ConfigError("give --train-iters or --train-samples")
    if (
        model.position_embedding_type == "learned_absolute"
        and model.seq_length > model.max_position_embeddings
    ):
        raise ConfigError(
            f"seq_length {model.seq_length} exceeds max_position_embeddings {model.max_position_embeddings}"
        )
    if train.min_lr > train.lr:
        raise ConfigError(f"min_lr {train.min_lr} is above lr {train.lr}")
